"""A stream of requests on one card (#23): how many clips (and edits) an hour one GPU gives, and how busy it is.

`recast serve` starts a real Prefect server, the deployments, a process worker for flow runs and ONE task worker
that serves both stages on the card (`--one-worker`: lightning + wan22-lightning, from prepared weights). Then,
through the deployment/API path as UI users would:

    clips   --clips photo-to-clip runs submitted at once (edit, then the clip, inline handoff)
    edits   --edits edit-only runs submitted at once (one lightning edit each, no video)

Each row: requests per hour (completed / wall, from the first submission to the last end), `busy_fraction`
(the model calls' seconds, from the manifests, over that wall time), `idle_s` (the rest of the wall time: before
the first model call, between calls waiting for the next task to begin or in that task before its model call,
after the last), p50/p95 end-to-end latency (each flow run's creation to its end, from the API), the card's peak
memory (nvidia-smi, sampled every second), the worker's cold start, and `cpu_s`: the CPU seconds the stream cost
the Prefect server, the process worker, the flow-run processes, the task worker and the whole host (where a
stream waits when the card does not). Rows go into docs/performance.json with stage "stream".

    python gpu_stream.py --work /dev/shm/stream --clips 8 --edits 32 --out ../docs/performance.json
    python gpu_stream.py --tiny --work /tmp/stream --clips 2 --edits 3      # the code path on the CPU

Each serve's logs (the server's, the workers', the flow runs') are kept in WORK/logs/DATABASE-TAKE_NEXT-START
(with -N-at-once where flow runs are limited).

`--edits-only` serves `lightning` beside the tiny video profile (on the CPU: no Wan weights to prepare) and runs
no clips; `--compare-poll S` runs the edit stream a second time with the flows asking the server every S seconds
(`worker_poll_s`), so the two rows compare within one run:

    python gpu_stream.py --work /dev/shm/stream --edits-only --edits 32 --compare-poll 0.5

`--databases postgres,sqlite` serves and streams once per database, in that order (the Prefect server on
PostgreSQL through deployments/postgres.sh, then on SQLite as `recast serve` runs by default): under a burst of
run starts SQLite answers colliding writes with 503, which Prefect's client retries after 2..32 s.
`--take-next after_gpu,on_gpu` does the same for the task worker's `worker_take_next` (rows
`postgres+take-next-on_gpu`), and `--flow-run-starts fork,process` for how flow runs start (`recast serve
--flow-run-start`: forked from a process that has imported Prefect and the flows, rows `...+forked-runs`, or a new
Python process per run as Prefect's process worker does by default), and `--flow-runs-at-once 0,8` for how many
flow runs the flow worker runs at once (`recast serve --flow-runs-at-once`; 0: no limit; rows `...+8-at-once`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROMPTS = ["James Bond 007, wearing a tuxedo with bow tie, casino background, cinematic lighting",
           "Neo from The Matrix, wearing a long black leather trench coat, green digital rain backdrop, neon lighting",
           "Top Gun pilot, wearing a flight suit and aviator sunglasses, airfield, golden hour lighting",
           "Tech CEO on stage, wearing a dark blazer, conference backdrop, blue lighting"]


class GpuMemory(threading.Thread):
    """The card's used memory, sampled every second (nvidia-smi): the whole card, every process on it."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mib, self.stopped = 0, threading.Event()

    def run(self):
        while not self.stopped.wait(1.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                self.peak_mib = max(self.peak_mib, max(int(v) for v in out.split()))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return


def cpu_seconds(root_pid: int) -> dict:
    """CPU seconds (user + system) so far of each service `recast serve` started, by role, and of the whole host.

    Flow-run processes are children of Prefect's process worker (`--flow-run-start process`) or of the fork server
    (`fork`; the worker's children are then the forks' small clients): once reaped, their time is in their parent's
    children's times; while they still run (a run reported done is often still exiting), in their own. `flow_runs`
    adds both, so a run is counted once at every reading. The difference of two readings is what a stream cost
    each role.
    """
    import psutil

    roles = {"server": "server start", "flow_worker": "worker start", "flow_run_forks": "recast.flows.forks serve",
             "task_worker": "recast.flows.cli worker", "gallery": "recast.flows.cli gallery"}
    seconds = dict.fromkeys([*roles, "flow_runs"], 0.0)
    try:
        services = psutil.Process(root_pid).children()  # each started by `recast serve` itself
    except psutil.NoSuchProcess:
        services = []
    for service in services:
        try:
            command, times, descendants = " ".join(service.cmdline()), service.cpu_times(), \
                service.children(recursive=True)
        except psutil.Error:
            continue
        role = next((name for name, text in roles.items() if text in command), None)
        if not role:
            continue
        seconds[role] += times.user + times.system
        # Its descendants: flow runs under the flow worker and the fork server, the serving process under a
        # task worker; those reaped, then those still running.
        below = "flow_runs" if role in ("flow_worker", "flow_run_forks") else role
        seconds[below] += times.children_user + times.children_system
        for process in descendants:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue  # it exited between the readings: its time is in its parent's children's now
            seconds[below] += times.user + times.system
    host = psutil.cpu_times()
    seconds["host"] = host.user + host.system
    return seconds


def retryable_errors() -> int:
    """How many requests the Prefect server has answered 503 so far (a database busy: SQLite's "database is
    locked"), which Prefect's client retries after 2, 4, 8, 16, 32 s; logged with
    PREFECT_SERVER_LOG_RETRYABLE_ERRORS."""
    log = REPO / "logs" / "server.log"
    return log.read_text(errors="replace").count("Encountered retryable exception in request") if log.is_file() else 0


def submit_and_wait(requests: list[dict], job_env: dict | None, timeout: float) -> list:
    """Create every run at once through the edit deployment, then wait for all; their final flow runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    ids = asyncio.run(create_runs(requests, {"env": job_env} if job_env else None))
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            # One request a second for all of them: reading each run every second (as this benchmark first did)
            # was itself 32 requests a second to the server the stream is waiting on.
            found = {run.id: run for run in client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=len(ids))}
            runs = [found[run_id] for run_id in ids if run_id in found]
            if len(runs) == len(ids) and all(run.state and run.state.is_final() for run in runs) \
                    or time.monotonic() > deadline:
                return runs
            time.sleep(1.0)


async def create_runs(requests: list[dict], job_variables: dict | None) -> list:
    """The edit deployment's runs, created together (as many users of the UI or the API would): one after another
    through run_deployment took 12 s for 32 on an H200's host, beside the first run's start."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deployment = await client.read_deployment_by_name("recast-edit/edit")
        runs = await asyncio.gather(*(client.create_flow_run_from_deployment(
            deployment.id, parameters={"request": request}, job_variables=job_variables) for request in requests))
    return [run.id for run in runs]


def manifests(store: Path, runs) -> list[dict]:
    """The manifest of each run (by the flow run id the manifest records)."""
    by_id = {}
    for path in store.glob("runs/*/manifest.json"):
        manifest = json.loads(path.read_text())
        by_id[(manifest.get("prefect") or {}).get("flow_run_id")] = manifest
    return [by_id.get(str(run.id)) for run in runs]


def idle_split(runs, found: list[dict]) -> dict | None:
    """Where the card's idle time in a stream went, from each job's timeline (epoch seconds on the worker: its task
    began, its model call began and ended) and the runs' creation and end: before the first model call, between
    calls (split into waiting for the next task to begin, and that task's own work before its model call), and
    after the last one. The parts add up to the wall time less the model calls'. None when a job has no timeline."""
    jobs = [job.get("timeline") for manifest in found if manifest
            for job in [*manifest["edits"], *(manifest.get("animation") or {}).get("clips", [])]
            if job.get("status", "succeeded") == "succeeded" and not job.get("error")]
    if not jobs or not all(jobs):
        return None
    jobs.sort(key=lambda job: job["model_started"])
    before_task = task_to_model = 0.0
    for done, following in zip(jobs, jobs[1:]):
        gap = max(0.0, following["model_started"] - done["model_ended"])
        waited = min(gap, max(0.0, following["task_started"] - done["model_ended"]))
        before_task += waited
        task_to_model += gap - waited
    first_created = min(run.created.timestamp() for run in runs)
    last_end = max(run.end_time.timestamp() for run in runs if run.end_time)
    return {"before_first_model": round(jobs[0]["model_started"] - first_created, 2),
            "between_models_waiting_for_task": round(before_task, 2),
            "between_models_in_task_before_model": round(task_to_model, 2),
            "after_last_model": round(last_end - jobs[-1]["model_ended"], 2),
            "jobs": len(jobs)}


def stream_row(name: str, runs, found: list[dict], peak_mib: int, card: str, extra: dict) -> dict:
    completed = [run for run in runs if run.state and run.state.is_completed()]
    starts = [run.created.timestamp() for run in runs]
    ends = [run.end_time.timestamp() for run in runs if run.end_time]
    wall = max(ends) - min(starts) if ends else None
    latencies = sorted(run.end_time.timestamp() - run.created.timestamp() for run in completed if run.end_time)
    model_s = 0.0
    for manifest in (m for m in found if m):
        model_s += sum(e["seconds"] or 0.0 for e in manifest["edits"] if e["status"] == "succeeded")
        model_s += sum(c.get("seconds") or 0.0 for c in (manifest.get("animation") or {}).get("clips", []))
    per_hour = round(len(completed) / wall * 3600, 1) if wall else None
    extra = dict(extra, created_span_s=round(max(starts) - min(starts), 2),  # how long submitting them all took
                 idle_s=idle_split(runs, found))
    failed = [f"{run.name}: {run.state.type.value}: {run.state.message or ''}" if run.state else f"{run.name}: no state"
              for run in runs if run not in completed]
    if failed:
        extra["not_completed"] = failed[:8]
    return dict(stage="stream", profile=name, card=card, gpus=1, requests=len(runs), completed=len(completed),
                wall_s=round(wall, 2) if wall else None, per_hour=per_hour, model_seconds=round(model_s, 2),
                busy_fraction=round(model_s / wall, 3) if wall else None,
                latency_p50_s=round(statistics.median(latencies), 2) if latencies else None,
                latency_p95_s=round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2)
                if latencies else None,
                gpu_peak_gib=round(peak_mib / 1024, 2) if peak_mib else None, seconds=wall, **extra)


def serve_and_stream(args, database: str, take_next: str, flow_run_start: str, at_once: int, env: dict, work: Path,
                     photo: Path, memory: GpuMemory, card: str, run: dict, prepared: list, edit_profile: str,
                     video_profile: str) -> list[dict]:
    """`recast serve` with the Prefect server on `database` (its own Prefect home), the task worker taking its
    next job `take_next` (worker_take_next), flow runs started by `flow_run_start`, at most `at_once` of them at
    once (0: no limit), the streams, then stop it."""
    import common
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from recast.flows.local_server import free_port

    port = free_port()
    env = dict(env, PREFECT_HOME=str(work / f"prefect-{database}"), RECAST_SERVE_PORT=str(port),
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               RECAST_SERVE_DATABASE="postgres" if database == "postgres" else "", RECAST_WORKER_TAKE_NEXT=take_next,
               PREFECT_SERVER_LOG_RETRYABLE_ERRORS="true")  # each 503 it answers, in logs/server.log
    store = Path(env["RECAST_STORAGE_ROOT"])
    serve_started = time.monotonic()
    serve = subprocess.Popen([sys.executable, "-m", "recast.flows.cli", "serve", "--profile", edit_profile,
                              "--video-profile", video_profile, "--one-worker", "--flow-run-start", flow_run_start,
                              *(["--flow-runs-at-once", str(at_once)] if at_once else [])],
                             cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    rows = []
    stack = contextlib.ExitStack()
    try:
        banner = ""
        while "recast is serving" not in banner:
            line = serve.stdout.readline()
            if not line:
                raise RuntimeError(f"recast serve ended before serving: {banner[-2000:]}")
            banner += line
        ready_s = round(time.monotonic() - serve_started, 1)
        worker_log = (REPO / "logs" / "worker.log").read_text()
        cold = {kind: float(seconds) for kind, seconds in
                re.findall(r"recast worker: (edit|video) \S+ .*? after a ([\d.]+)s cold start", worker_log)}
        os.environ.update({k: v for k, v in env.items() if k.startswith(("PREFECT_", "RECAST_"))})
        # Prefect reads its settings once per process: this serve's API is another than the last one's.
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}))
        common_extra = dict(run=run, serve_ready_s=ready_s, worker_cold_start_s=cold, prepared=prepared,
                            edit_profile=edit_profile, video_profile=video_profile, database=database)
        no_clip = {"RECAST_HANDOFF__MODE": "none"}
        streams = [("stream-clips", args.clips, None), ("stream-edits", args.edits, no_clip)]
        if args.compare_poll:
            streams.append((f"stream-edits-poll-{args.compare_poll:g}s", args.edits,
                            dict(no_clip, RECAST_WORKER_POLL_S=str(args.compare_poll))))
        for name, count, job_env in streams:
            if not count:
                continue
            requests = [{"images": [str(photo)], "prompts": [PROMPTS[i % len(PROMPTS)]], "seeds": [100 + i],
                         "profile": edit_profile, "video_profile": video_profile} for i in range(count)]
            memory.peak_mib = 0
            cpu_before, busy_before = cpu_seconds(serve.pid), retryable_errors()
            runs = submit_and_wait(requests, job_env, args.timeout)
            cpu_after = cpu_seconds(serve.pid)
            cpu = {role: round(cpu_after[role] - cpu_before[role], 1) for role in cpu_before}
            poll_s = (job_env or {}).get("RECAST_WORKER_POLL_S", "default")
            # Named as before forked runs existed (process starts, after_gpu: no suffix), so rows compare.
            variant = database + ("" if take_next == "after_gpu" else f"+take-next-{take_next}") + \
                ("+forked-runs" if flow_run_start == "fork" else "") + (f"+{at_once}-at-once" if at_once else "")
            row = stream_row(name, runs, manifests(store, runs), memory.peak_mib, card,
                             dict(common_extra, cpu_s=cpu, host_cpus=os.cpu_count(), worker_poll_s=poll_s,
                                  variant=variant, worker_take_next=take_next, flow_run_start=flow_run_start,
                                  flow_runs_at_once=at_once or None,
                                  server_503s=retryable_errors() - busy_before))
            rows.append(row)
            common.record(row, args.results, args.out)
    finally:
        stack.close()
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
        # The next serve writes the same logs/: keep this one's beside the work (where the card waited, per run).
        kept = work / "logs" / (f"{database}-{take_next}-{flow_run_start}" + (f"-{at_once}-at-once" if at_once else ""))
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(REPO / "logs", kept, dirs_exist_ok=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="model cache, storage root, Prefect home, logs")
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--edits", type=int, default=32)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--edits-only", action="store_true", help="no clips; the worker's video stage is the tiny profile")
    ap.add_argument("--compare-poll", type=float, default=None,
                    help="run the edit stream again with worker_poll_s set to this (seconds)")
    ap.add_argument("--databases", default="sqlite",
                    help="the Prefect server's database, one whole serve-and-stream per entry, in this order: "
                         "sqlite (recast serve's default), postgres (deployments/postgres.sh), e.g. postgres,sqlite")
    ap.add_argument("--take-next", default="after_gpu",
                    help="when the task worker takes its next job (worker_take_next), one serve-and-stream per entry "
                         "after each database's: after_gpu (the default), on_gpu, e.g. after_gpu,on_gpu")
    ap.add_argument("--flow-run-starts", default="fork",
                    help="how `recast serve` starts flow runs (--flow-run-start), one serve-and-stream per entry "
                         "inside each take-next's: fork (the default), process, e.g. fork,process")
    ap.add_argument("--flow-runs-at-once", default="0",
                    help="the most flow runs `recast serve` runs at once (--flow-runs-at-once; 0: no limit), one "
                         "serve-and-stream per entry inside each flow-run start's, e.g. 0,8")
    ap.add_argument("--out", default=None)
    ap.add_argument("--results", default=None, help="also write each row here as it ends (JSON lines)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds a stream may take")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import common
    import cold_start
    import gpu_video
    import torch

    work = Path(args.work)
    store = work / "store"
    (store / "uploads").mkdir(parents=True, exist_ok=True)
    databases = args.databases.split(",")
    unknown = sorted(set(databases) - {"sqlite", "postgres"})
    if unknown:
        ap.error(f"--databases {args.databases!r}: {', '.join(unknown)} is not a database this benchmark starts; "
                 f"use sqlite, postgres or both, comma-separated")
    take_nexts = args.take_next.split(",")
    if set(take_nexts) - {"after_gpu", "on_gpu"}:
        ap.error(f"--take-next {args.take_next!r}: use after_gpu, on_gpu or both, comma-separated")
    from recast.flows.forks import FLOW_RUN_STARTS

    flow_run_starts = args.flow_run_starts.split(",")
    if set(flow_run_starts) - set(FLOW_RUN_STARTS):
        ap.error(f"--flow-run-starts {args.flow_run_starts!r}: use fork, process or both, comma-separated")
    try:
        at_onces = [int(entry) for entry in args.flow_runs_at_once.split(",")]
    except ValueError:
        at_onces = [-1]
    if min(at_onces) < 0:
        ap.error(f"--flow-runs-at-once {args.flow_runs_at_once!r}: use whole numbers, 0 for no limit, comma-separated")
    edit_profile, video_profile = ("tiny", "tiny") if args.tiny else ("lightning", "wan22-lightning")
    if args.edits_only:
        video_profile, args.clips = "tiny", 0
    env = dict(os.environ, RECAST_CACHE_DIR=str(work / "cache"), RECAST_STORAGE_ROOT=str(store),
               PYTHONUNBUFFERED="1", **cold_start.lora_env(work, args.tiny))
    log = work / "stream.log"
    prepared = []
    if not args.tiny:  # the worker starts from prepared weights (made from random full-size weights, once)
        for kind, profile in (("edit", edit_profile), ("video", video_profile)):
            if profile == "tiny":
                continue
            started = time.perf_counter()
            cold_start._make_prepared_process(env, kind, profile, work, args.tiny, log)
            prepared.append({"kind": kind, "profile": profile, "seconds": round(time.perf_counter() - started, 1)})
    photo = store / "uploads" / "photo.png"
    gpu_video._photo(1248, 720).save(photo)
    card = common.card_name(torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    run = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": common.recorded_command(sys.argv), "versions": common.versions()}
    memory = GpuMemory()
    if not args.tiny:
        memory.start()
    rows = []
    try:
        for database in databases:
            for take_next in take_nexts:
                for flow_run_start in flow_run_starts:
                    for at_once in at_onces:
                        rows += serve_and_stream(args, database, take_next, flow_run_start, at_once, env, work, photo,
                                                 memory, card, run, prepared, edit_profile, video_profile)
    finally:
        memory.stopped.set()
    return 0 if all(row["completed"] == row["requests"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
