"""Task workers: one long-lived process per GPU that loads its pipeline once and serves every task run.

`recast worker edit --gpu 0` pins the process to one GPU, loads and warms the pipeline before taking work
(so no request pays the cold start), then serves edit task runs one at a time until stopped. Any number of
workers, on any number of machines pointed at one Prefect server, share the queue.
"""

from __future__ import annotations

import logging
import os
import time

from recast.flows import respawn
from recast.tasks.errors import BadInput
from recast.tasks.models import loading
from recast.tasks.settings import get_settings

log = logging.getLogger("recast.worker")


def serve_worker(kinds: list[str], gpu: int | None = None, profile_name: str | None = None,
                 video_profile_name: str | None = None, gpus: list[int] | None = None) -> None:
    """Load (and warm) the pipelines of `kinds` ("edit", "animate"), then serve their task runs one at a time.

    The worker serves exactly the profiles it loaded: a job for another profile is refused (ProfileNotServed),
    so nobody can make it load a second model. With both kinds, the memory policy keeps both pipelines resident
    when they fit the card and otherwise swaps them as jobs arrive."""
    if gpus and len(gpus) > 1:
        return serve_team(kinds, gpus, profile_name, video_profile_name)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # before torch initialises CUDA
    respawn.keep_cuda_forkable()  # before anything imported here asks CUDA for its devices
    if not os.environ.get("PREFECT_API_URL"):
        raise BadInput("PREFECT_API_URL", None, "task workers need a Prefect server, not the ephemeral API",
                       "leave RECAST_CLI_SERVER unset (the worker then uses the CLI's background server), or start one "
                       "(`make serve` or `prefect server start`) and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    from recast.flows import fleet
    from recast.tasks.animate import animate_task_for
    from recast.tasks.edit import edit_task_for

    settings = get_settings()
    served = []  # (loader kind, profile, task): jobs are routed by profile (their task keys)
    if "edit" in kinds:
        profile = settings.get_profile(profile_name)
        served.append(("edit", profile, edit_task_for(profile.name)))
    if "animate" in kinds:
        profile = settings.get_video_profile(video_profile_name)
        served.append(("video", profile, animate_task_for(profile.name)))
    loading.serve_only({(kind, profile.name) for kind, profile, _ in served})
    # From here on in a serving process its parent starts again when it dies (worker_respawns); this one returns.
    pairs = [(kind, profile) for kind, profile, _ in served]
    respawn.supervise(lambda: loading.import_ahead(pairs), settings.worker_respawns,
                      uses_cuda=any(profile.device.startswith("cuda") for _, profile in pairs))
    # Load (and for compiled profiles, compile) before the first task can arrive.
    for kind, profile, _ in served:
        loaded, _ = loading.get_pipeline(kind, profile)
        print(f"recast worker: {kind} {profile.name} ({profile.model_id}) ready on {loading.describe_device(profile)} "
              f"after a {loaded.cold_start_s:.1f}s cold start" + _respawned(), flush=True)
    print(f"recast worker {' '.join(kinds)}: serving one task at a time on the GPU", flush=True)
    respawn.serving()
    withdraw = fleet.advertise({kind: profile.name for kind, profile, _ in served})

    async def serve() -> None:
        # One job on the GPU, one more getting ready (worker_take_next: on_gpu), up to MAX_FINISHING finishing
        # beside them (created inside the event loop).
        worker = _overlapping_worker()(*[task for _, _, task in served], limit=_job_limit())
        await worker.astart()

    if settings.worker_idle_s > 0:
        _stop_when_idle(settings.worker_idle_s, on_forced_exit=withdraw)
    try:
        _serve_until_stopped(serve)
    finally:
        withdraw()


def _respawned() -> str:
    """What a serving process its parent started again says of its start."""
    if not respawn.generation:
        return ""
    return f" ({time.time() - respawn.forked_at:.1f}s since it was started again, respawn {respawn.generation})"


# What the idle stop watches: when the worker last started or finished a job, and how many it has now.
_activity = {"last": 0.0, "running": 0}


# How long an idle worker's orderly stop may take before it exits anyway: on a busy machine one stopped at Ctrl-C
# and never ended (its event loop waiting on a thread that did not return), a process nobody would stop.
IDLE_STOP_GRACE_S = 30.0


def _stop_when_idle(idle_s: float, on_forced_exit=None, grace_s: float = IDLE_STOP_GRACE_S) -> None:
    """Interrupt this worker (as Ctrl-C would: it withdraws and exits 0) once it has had no job for idle_s; if it
    has not ended grace_s later, withdraw (on_forced_exit) and exit without waiting for the rest."""
    import signal
    import threading

    _activity["last"] = time.monotonic()

    def watch() -> None:
        while True:
            time.sleep(min(1.0, idle_s / 4))
            if _activity["running"] == 0 and time.monotonic() - _activity["last"] > idle_s:
                print(f"recast worker: no job for {idle_s:.0f} s, stopping", flush=True)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(grace_s)  # a daemon thread: it ends here with the process when the stop completes
                print(f"recast worker: still stopping after {grace_s:.0f} s, exiting now", flush=True)
                try:
                    if on_forced_exit is not None:
                        on_forced_exit()
                finally:
                    os._exit(0)

    threading.Thread(target=watch, name="recast-worker-idle", daemon=True).start()


def _serve_until_stopped(serve) -> None:
    """Run the worker's loop until TERM or Ctrl-C stops it; anything else that ends it is raised (a worker that
    stops serving must not exit 0 as if it had been asked to)."""
    import asyncio

    from prefect.exceptions import TerminationSignal
    from prefect.task_worker import StopTaskWorker

    # StopTaskWorker: Prefect's handler of TERM stops the worker by raising it (Prefect's own `serve` expects it too)
    stops = (KeyboardInterrupt, SystemExit, TerminationSignal, asyncio.CancelledError, StopTaskWorker)
    try:
        asyncio.run(serve())
    except stops:
        pass
    except BaseExceptionGroup as group:  # a stop that landed inside the task worker's task groups (at its start)
        # The condition sees the groups themselves too: a group, nested or not, is looked into, never matched whole
        unexpected = group.subgroup(lambda exc: not isinstance(exc, (BaseExceptionGroup, *stops)))
        if unexpected is not None:
            raise unexpected


# Jobs whose CPU work (encoding, writing, identity scoring) may still run while the next job is on the GPU. Their
# frames stay in memory until written: a bound, so a burst of clips cannot pile up in RAM.
MAX_FINISHING = 2


def _job_limit() -> int:
    """Jobs a worker holds at once: on the GPU, getting ready for it (worker_take_next: on_gpu), finishing."""
    return (2 if get_settings().worker_take_next == "on_gpu" else 1) + MAX_FINISHING


def _overlapping_worker():
    """Prefect's task worker, taking a task run only when it can start it, and the next one as soon as the current
    one has left the GPU: the card works on job N+1 while job N's CPU work finishes (recast.tasks.lifecycle.on_gpu).

    A stock worker acknowledges each run as it arrives, even while busy: a worker that dies takes the runs it
    acknowledged with it (the server thinks them delivered; they stay Scheduled forever). This one receives a run
    when it can start it and acknowledges it once the run has left the GPU (or ended), so a run whose worker dies
    before that goes back to the server's queue when the connection drops, for the next worker. A worker that dies
    later, while finishing a job, stops beating: its flow submits the job again (nothing is half-recorded, results
    are written last and whole).

    With `worker_take_next: on_gpu` it takes the next run as soon as the current one holds the GPU, so that run's
    delivery, Prefect's task set-up and the job's own work before its model call overlap the current model call;
    that run is acknowledged once it beats (from then on its flow sees a dead worker's beats stop, as above), and
    at most one run waits for the GPU.
    """
    import asyncio

    import orjson
    import websockets.exceptions
    from prefect.client.schemas.objects import TaskRun
    from prefect.client.subscriptions import Subscription
    from prefect.settings import get_current_settings
    from prefect.task_worker import TaskWorker

    from recast.tasks import lifecycle

    class AckWhenStarted(Subscription):
        async def receive(self) -> TaskRun:
            while True:
                try:
                    await self._ensure_connected()
                    return self.model.model_validate_json(await self.websocket.recv())
                except (ConnectionRefusedError, OSError, websockets.exceptions.ConnectionClosedError):
                    self._websocket = None  # the server went away: connect again when it is back
                    await asyncio.sleep(0.5)

        async def ack(self) -> None:
            try:
                await self.websocket.send(orjson.dumps({"type": "ack"}).decode())
            except (RuntimeError, websockets.exceptions.ConnectionClosed):
                self._websocket = None  # the run is on its way either way; the server may send it again

    class OverlappingWorker(TaskWorker):
        def __init__(self, *tasks, limit: int):
            super().__init__(*tasks, limit=limit)
            for copy, original in zip(self.tasks, tasks):  # TaskWorker serves copies: keep the profiles' task keys
                copy.task_key = original.task_key

        def handle_sigterm(self, signum, frame):
            # A worker can be sent TERM twice (to its pid by an operator, then to its process group; its respawning
            # parent passes one on): Prefect's handler raises "not yet started" on the second. Once is enough.
            if self.stopping or not self.started:
                return
            super().handle_sigterm(signum, frame)

        async def _subscribe_to_task_scheduling(self):
            keys = " | ".join(f"{task.name}" for task in self.tasks)
            print(f"Subscribing to runs of task(s): {keys}", flush=True)
            subscription = AckWhenStarted(model=TaskRun, path="/task_runs/subscriptions/scheduled",
                                          keys=self.task_keys, client_id=self.client_id,
                                          base_url=get_current_settings().api.url)
            take_next_on_gpu = get_settings().worker_take_next == "on_gpu"
            held: list[tuple[lifecycle.JobSignals, asyncio.Event]] = []  # jobs started and not ended
            while True:
                # Room for one more (MAX_FINISHING jobs may still be finishing), and no job of ours still before
                # the GPU: at most one waits for it.
                while (self.available_tasks is not None and self.available_tasks < 1) or any(
                        not (signals.on_gpu.is_set() or ended.is_set()) for signals, ended in held):
                    await asyncio.sleep(0.005)
                task_run = await subscription.receive()
                log.info("Received task run: %s - %s", task_run.id, task_run.name)
                if await self._acquire_token(task_run.id):
                    run_id = str(task_run.id)
                    signals = lifecycle.watch_job(run_id)
                    ended = asyncio.Event()
                    held.append((signals, ended))

                    async def run(task_run=task_run, run_id=run_id, ended=ended, signals=signals):
                        _activity["running"] += 1
                        try:
                            await self._safe_submit_scheduled_task_run(task_run)  # returns when the job is done
                        finally:
                            _activity["running"] -= 1
                            _activity["last"] = time.monotonic()
                            ended.set()
                            held.remove((signals, ended))
                            lifecycle.forget_job(run_id)

                    self._runs_task_group.start_soon(run)
                    # Acknowledged (the server's queue forgets it) once it has left the GPU, or with on_gpu once
                    # it beats: from then on, should this worker die, the waiting flow sees the beats stop and
                    # submits the job again; before, the dropped connection puts it back in the queue.
                    acknowledge_when = signals.beating if take_next_on_gpu else signals.left_gpu
                    while not (ended.is_set() or signals.left_gpu.is_set() or acknowledge_when.is_set()):
                        await asyncio.sleep(0.005)
                await subscription.ack()

    return OverlappingWorker


# --------------------------------------------------------------------------------------------------
# A team of processes, one per GPU, for one job at a time (recast.tasks.models.parallel)


def serve_team(kinds: list[str], gpus: list[int], profile_name: str | None, video_profile_name: str | None) -> None:
    """`recast worker edit --gpus 0,1`: this process is rank 0 and serves Prefect; ranks 1.. follow it, each on its
    own GPU, in child processes that die with it (killing the worker frees every GPU)."""
    import socket
    import subprocess
    import sys

    if len(kinds) != 1:
        raise BadInput("kinds", kinds, "a multi-GPU worker serves one stage", "start one worker for edit and one "
                       "for animate")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        master = f"127.0.0.1:{probe.getsockname()[1]}"
    command = [sys.executable, "-m", "recast.flows.workers", kinds[0], ",".join(map(str, gpus)), master,
               profile_name or "", video_profile_name or ""]
    followers = [subprocess.Popen([*command, str(rank)], preexec_fn=respawn.die_with_parent)
                 for rank in range(1, len(gpus))]
    try:
        _team_member(0, kinds[0], gpus, master, profile_name, video_profile_name)
    finally:
        for follower in followers:
            follower.kill()


def _team_member(rank: int, kind: str, gpus: list[int], master: str, profile_name: str | None,
                 video_profile_name: str | None) -> None:
    """Join the team, load and warm the pipeline in step with the others, then lead (rank 0) or follow."""
    from recast.tasks.models import parallel, qwen_edit, wan_video

    settings = get_settings()
    loader_kind = "edit" if kind == "edit" else "video"
    profile = settings.get_profile(profile_name) if kind == "edit" else settings.get_video_profile(video_profile_name)
    device = f"cuda:{gpus[rank]}" if profile.device.startswith("cuda") else profile.device
    profile = profile.model_copy(update={"device": device})
    cfg = (profile.true_cfg_scale or settings.edit.true_cfg_scale) > 1 if kind == "edit" else \
        (profile.guidance_scale or settings.animate.guidance_scale) > 1
    if rank == 0:
        loading.check_available(profile)  # builds a tiny model before the team exists (only rank 0 saves after)
    team = parallel.join(rank, len(gpus), device, cfg=cfg, master=master)
    loading.serve_only({(loader_kind, profile.name)})
    loaded, _ = loading.get_pipeline(loader_kind, profile)  # every rank loads and warms up in step
    team.serving = True
    print(f"recast worker rank {rank}/{len(gpus)}: {loader_kind} {profile.name} ready on {device} (CFG degree "
          f"{team.cfg_degree}, Ulysses degree {team.ulysses_degree})", flush=True)
    if rank > 0:
        def edit(**call):
            call.pop("profile")
            qwen_edit.run_edit(loaded, profile, **call)

        def video(**call):
            call.pop("profile")
            wan_video.run_video(loaded, **call)

        parallel.follow({"edit": edit, "video": video})
        return
    from recast.tasks.animate import animate_task_for
    from recast.tasks.edit import edit_task_for

    # The tasks resolve their profile by name from the settings: this rank's device goes there too.
    section = "PROFILES" if kind == "edit" else "VIDEO_PROFILES"
    os.environ[f"RECAST_{section}__{profile.name.upper().replace('-', '_')}__DEVICE"] = device

    async def serve() -> None:
        routed = edit_task_for(profile.name) if kind == "edit" else animate_task_for(profile.name)
        worker = _overlapping_worker()(routed, limit=_job_limit())
        await worker.astart()

    if settings.worker_idle_s > 0:
        _stop_when_idle(settings.worker_idle_s, on_forced_exit=parallel.dismiss)  # the followers end with this rank
    try:
        _serve_until_stopped(serve)
    finally:
        parallel.dismiss()


if __name__ == "__main__":  # a follower rank, started by serve_team
    import sys

    _kind, _gpus, _master, _profile, _video, _rank = sys.argv[1:7]
    _team_member(int(_rank), _kind, [int(g) for g in _gpus.split(",")], _master, _profile or None, _video or None)
