"""Faults injected into real processes: the Prefect server killed and restarted mid-run, the flow's own process
killed mid-run and the run resumed. Each with the bar from the issue that found them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_workers import BIN, free_port, healthy, serving_process, start_worker, stop, wait_for


def start_server(home: Path, port: int, log_name: str, **extra_env: str) -> subprocess.Popen:
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra_env)
    log = open(home / log_name, "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: healthy(f"http://127.0.0.1:{port}/api"), 300, "the Prefect server")
    return proc


def wait_while_progressing(proc: subprocess.Popen, progress, stall_s: float, what: str) -> None:
    """Wait for proc to end; fail if progress() (any comparable snapshot) stays the same for stall_s seconds."""
    last, last_change = progress(), time.monotonic()
    while proc.poll() is None:
        time.sleep(1)
        now = progress()
        if now != last:
            last, last_change = now, time.monotonic()
        elif time.monotonic() - last_change > stall_s:
            raise AssertionError(f"{what}: no progress for {stall_s:.0f} s (last: {last})")


@pytest.fixture
def own_server(tmp_path):
    """A server this test may kill: its own home (SQLite database) and port."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", RECAST_EXECUTION="workers",
               RECAST_HANDOFF__MODE="none", PREFECT_LOGGING_LEVEL="INFO", RECAST_WORKER_HEARTBEAT_S="1",
               RECAST_WORKER_HEARTBEAT_TIMEOUT_S="10")
    state = {"proc": start_server(home, port, "server-1.log"), "home": home, "port": port, "env": env}
    yield state
    try:
        os.killpg(state["proc"].pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _edit_args(astronaut, root, seeds, steps=30) -> list[str]:
    return [str(BIN / "recast"), "edit", str(astronaut), "--prompt", "Neo, black leather trench coat", "--steps",
            str(steps), "--width", "320", "--height", "320", "--storage", str(root), "--json",
            *[a for s in seeds for a in ("--seed", str(s))]]


def test_a_run_survives_a_restart_of_the_prefect_server(own_server, astronaut, tmp_path):
    env, root = own_server["env"], tmp_path / "store"
    worker = start_worker(env, tmp_path / "worker.log")
    out_path, err_path = tmp_path / "run.out", tmp_path / "run.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        run = subprocess.Popen(_edit_args(astronaut, root, [1, 2, 3, 4, 5]), env=env, stdout=out, stderr=err)
    try:
        wait_for(lambda: list(root.glob("runs/*/edits/*.png")), 180, "the first edit")
        os.killpg(own_server["proc"].pid, signal.SIGKILL)  # the server dies with its in-memory task queue
        own_server["proc"].wait(timeout=30)
        time.sleep(2)  # the flow polls every 0.5 s: it sees the server gone
        own_server["proc"] = start_server(own_server["home"], own_server["port"], "server-2.log")
        back_at = time.monotonic()
        # On a busy CI machine the recovery can take minutes: wait while the run makes progress (an edit written,
        # a log line), and fail only when it has stalled, not after a fixed time.
        wait_while_progressing(run, lambda: (len(list(root.glob("runs/*/edits/*.png"))), err_path.stat().st_size),
                               stall_s=300, what="the run after the server came back")
        finished_after = time.monotonic() - back_at
    finally:
        if run.poll() is None:
            run.kill()
        stop(worker)
    assert run.returncode == 0, err_path.read_text()[-3000:]
    manifest = json.loads(out_path.read_text())
    assert [e["seed"] for e in manifest["edits"]] == [1, 2, 3, 4, 5], "each edit recorded once, in request order"
    assert all(e["status"] == "succeeded" for e in manifest["edits"]), [e["error"] for e in manifest["edits"]]
    print(f"the run finished {finished_after:.0f}s after the server came back")  # a measurement, not a bound
    assert len(list(root.glob("runs/*/edits/*.png"))) == 5


def test_a_run_whose_process_died_is_resumed_in_its_folder_redoing_nothing(workers_env, astronaut, tmp_path):
    env = dict(workers_env, RECAST_WORKER_HEARTBEAT_S="1", RECAST_WORKER_HEARTBEAT_TIMEOUT_S="10")
    root = tmp_path / "store"
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        run = subprocess.Popen(_edit_args(astronaut, root, [21, 22, 23, 24, 25]), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            wait_for(lambda: len(list(root.glob("runs/*/.jobs/*.record.json"))) >= 2, 180, "two recorded edits")
        finally:
            os.killpg(run.pid, signal.SIGKILL)  # the flow's process dies mid-run
            run.wait(timeout=30)
        (folder,) = root.glob("runs/*")
        assert not (folder / "manifest.json").exists()
        done_before = {p.name: p.stat().st_mtime_ns for p in (folder / "edits").glob("*.png")}
        records_before = {p.name for p in (folder / ".jobs").glob("*.record.json")}
        resumed = subprocess.run([str(BIN / "recast"), "resume", folder.name, "--storage", str(root), "--json"],
                                 env=env, capture_output=True, text=True, timeout=300)
    finally:
        stop(worker)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = json.loads(resumed.stdout)
    assert manifest["run_id"] == folder.name and manifest["resumed"], "the run goes on in its own folder"
    assert [e["seed"] for e in manifest["edits"]] == [21, 22, 23, 24, 25], "every edit once, in request order"
    assert all(e["status"] == "succeeded" for e in manifest["edits"])
    redone = [name for name, mtime in done_before.items()
              if name.removesuffix(".png") + ".record.json" in records_before
              and (folder / "edits" / name).stat().st_mtime_ns != mtime]
    assert not redone, f"edits recorded before the crash were computed again: {redone}"
    assert (folder / "manifest.json").exists() and not (folder / ".jobs").exists()
    again = subprocess.run([str(BIN / "recast"), "resume", folder.name, "--storage", str(root)], env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "complete" in again.stderr, "a finished run is not resumed twice"


def test_a_resume_waits_for_edits_still_on_a_worker_instead_of_doing_them_again(workers_env, astronaut, tmp_path):
    """The flow's process dies while a worker still has its edits; the user resumes from a plain shell (local
    execution): the resume waits for the worker's task runs, computes none of them itself, and records for every
    edit the task run and the worker that made it."""
    env = dict(workers_env, RECAST_WORKER_HEARTBEAT_S="1", RECAST_WORKER_HEARTBEAT_TIMEOUT_S="10")
    root = tmp_path / "store"
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        run = subprocess.Popen(_edit_args(astronaut, root, [31, 32, 33, 34, 35, 36], steps=60), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            wait_for(lambda: len(list(root.glob("runs/*/.jobs/*.submitted"))) == 6
                     and list(root.glob("runs/*/.jobs/*.record.json")), 300, "six submitted edits, one recorded")
        finally:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(timeout=30)
        (folder,) = root.glob("runs/*")
        local = {key: value for key, value in env.items() if key != "RECAST_EXECUTION"}
        resumed = subprocess.run([str(BIN / "recast"), "resume", folder.name, "--storage", str(root), "--json"],
                                 env=local, capture_output=True, text=True, timeout=600)
    finally:
        stop(worker)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = json.loads(resumed.stdout)
    assert [e["seed"] for e in manifest["edits"]] == [31, 32, 33, 34, 35, 36]
    the_worker = f"{socket.gethostname()}:{serving_process(tmp_path / 'worker.log')}"
    for edit in manifest["edits"]:
        made = edit["submissions"][-1] if edit["submissions"] else {}
        assert edit["status"] == "succeeded" and made.get("outcome") in ("completed", "found finished"), \
            f"{edit['edit_id']} was not taken from the worker: {edit['submissions']}"
        assert made.get("task_run_id") and made.get("workers") == [the_worker], \
            f"{edit['edit_id']} does not record the task run and worker that made it: {edit['submissions']}"


def test_a_resume_whose_submitted_task_runs_are_gone_submits_them_again(workers_env, astronaut, tmp_path):
    """The crashed run's task runs no longer exist (a worker that cannot read a run's parameters, here one with
    another Prefect home, deletes the run): the resume notices, submits those edits again and finishes, instead of
    waiting forever on runs nobody will finish."""
    env = dict(workers_env, RECAST_WORKER_HEARTBEAT_S="1", RECAST_WORKER_HEARTBEAT_TIMEOUT_S="10")
    root = tmp_path / "store"
    run = subprocess.Popen(_edit_args(astronaut, root, [41, 42], steps=2), env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:  # no worker yet: the two edits wait in the server's queue
        wait_for(lambda: len(list(root.glob("runs/*/.jobs/*.submitted"))) == 2 or run.poll() is not None, 300,
                 "two submitted edits")
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        _, err = run.communicate(timeout=30)
    assert len(list(root.glob("runs/*/.jobs/*.submitted"))) == 2, f"the run did not submit its edits: {err[-2000:]}"
    gone = [json.loads(path.read_text())["task_run_id"] for path in root.glob("runs/*/.jobs/*.submitted")]
    (tmp_path / "other-home").mkdir()
    other = dict(env, PREFECT_HOME=str(tmp_path / "other-home"))  # its result storage lacks the parameters
    worker = start_worker(other, tmp_path / "worker.log")
    try:
        check = ("import sys; from prefect.client.orchestration import get_client\n"
                 "from prefect.exceptions import ObjectNotFound\n"
                 "with get_client(sync_client=True) as client:\n"
                 "    for run_id in sys.argv[1:]:\n"
                 "        try: client.read_task_run(run_id); print('exists')\n"
                 "        except ObjectNotFound: pass")
        wait_for(lambda: not subprocess.run([sys.executable, "-c", check, *gone], env=env, capture_output=True,
                                            text=True, timeout=120).stdout.strip(), 300,
                 "the worker to delete the task runs whose parameters it cannot read")
        (folder,) = root.glob("runs/*")
        resumed = subprocess.run([str(BIN / "recast"), "resume", folder.name, "--storage", str(root), "--json"],
                                 env=other, capture_output=True, text=True, timeout=300)
    finally:
        stop(worker)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for edit in json.loads(resumed.stdout)["edits"]:
        outcomes = [(s["task_run_id"], s["outcome"]) for s in edit["submissions"]]
        assert edit["status"] == "succeeded" and outcomes[0][0] in gone and outcomes[0][1] == "lost", outcomes
        assert "no longer exists" in edit["submissions"][0]["detail"] and outcomes[-1][1] == "completed", outcomes
    assert not list(folder.glob(".jobs")), "the run is complete"


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT, signal.SIGINT]], ids=["TERM", "INT-twice"])
def test_make_serve_stops_every_process_it_started_with_a_run_in_progress(signals, astronaut, tmp_path):
    """TERM or Ctrl-C (once or twice) on `make serve`'s process group, while a run from the API is on the workers:
    the server, every worker and the flow-run process all stop, and nothing is left listening."""
    repo = Path(__file__).resolve().parent.parent
    serve, env, root = start_serving(["make", "--no-print-directory", "serve"], repo, astronaut, tmp_path)
    port = int(env["RECAST_SERVE_PORT"])
    try:
        wait_for(lambda: "recast is serving" in _read(serve), 600, "make serve to be up")
        start_long_run(env, root)
        # A CLI command with the same PREFECT_HOME uses make serve's server, not a second one on its database.
        status = subprocess.run([str(Path(sys.executable).parent / "recast"), "server", "status"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert f"running at http://127.0.0.1:{port}/api" in status.stdout and "recast serve" in status.stdout, \
            status.stdout + status.stderr[-1000:]
        # The flow-run process (forked by recast.flows.forks' server into a session of its own, for the process
        # worker's client) is working on the run.
        wait_for(lambda: list(root.glob("runs/*/.jobs/*.submitted")), 300, "the run to submit its edits")
        processes = _descendants(serve.pid)
        forks = [pid for pid in processes if "recast.flows.forks serve" in _cmdline(pid)]
        clients = [pid for pid in processes if _cmdline(pid).rstrip().endswith("-m recast.flows.forks")]
        assert len(forks) >= 2 and clients, f"no forked flow run with its client among make serve's processes: " \
            f"{[_cmdline(p) for p in processes]}"
        stopped_at = time.monotonic()
        for sig in signals:
            os.killpg(serve.pid, sig)  # as a terminal does: make and everything in its foreground group
            time.sleep(0.5)
        wait_for(lambda: not [pid for pid in processes if _alive(pid)], 60, "every process of make serve to stop")
        took = time.monotonic() - stopped_at
        serve.wait(timeout=60)
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, "the Prefect server's port is still listening"
        assert not (tmp_path / "home" / "recast-server.json").exists(), "make serve must withdraw its server"
        print(f"every process of make serve gone {took:.1f}s after the signal")
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)


def start_serving(command: list[str], cwd: Path, astronaut: Path, tmp_path: Path):
    """`recast serve` (or `make serve`) on a free port with its own Prefect home and a storage root holding one
    photo; (the process, its environment, the root)."""
    root = tmp_path / "artifacts"
    (root / "uploads").mkdir(parents=True)
    (root / "uploads" / "me.png").write_bytes(astronaut.read_bytes())
    env = dict(os.environ, RECAST_SERVE_PORT=str(free_port()), PREFECT_HOME=str(tmp_path / "home"),
               RECAST_STORAGE_ROOT=str(root))
    env.pop("PREFECT_API_URL", None)
    serve = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    return serve, env, root


def start_long_run(env: dict, root: Path) -> str:
    """A 6-edit run of 100 steps from the API, as the UI starts one, on the served deployment; its flow run's id."""
    api = dict(env, PREFECT_API_URL=f"http://127.0.0.1:{env['RECAST_SERVE_PORT']}/api")
    started = subprocess.run([sys.executable, "-c", (
        "from prefect.deployments import run_deployment; import sys; "
        "print(run_deployment('recast-edit/edit', timeout=0, parameters={'request': {'images': [sys.argv[1]], "
        "'prompts': ['Neo, black leather trench coat'], 'steps': 100, 'seeds': [1, 2, 3, 4, 5, 6]}}).id)"),
        str(root / "uploads" / "me.png")], env=api, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr[-2000:]
    return started.stdout.split()[-1]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


_OUTPUT: dict[int, str] = {}


def _read(proc: subprocess.Popen) -> str:
    import select

    while select.select([proc.stdout], [], [], 0)[0]:
        line = proc.stdout.readline()
        if not line:
            break
        _OUTPUT[proc.pid] = _OUTPUT.get(proc.pid, "") + line
    return _OUTPUT.get(proc.pid, "")


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    pairs = [(int(out[i]), int(out[i + 1])) for i in range(0, len(out), 2)]
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in pairs:
            if ppid == parent:
                found.append(child)
                frontier.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


def test_a_given_up_job_stops_at_its_next_step_and_a_cancelled_one_never_starts(astronaut, memory_root):
    """What a worker does with a task run its flow gave up on (and submitted again): it does not start it, or it
    stops it between denoising steps, so no GPU keeps working for nobody."""
    import threading

    from recast.tasks import lifecycle, storage
    from recast.tasks.edit import edit_image
    from recast.tasks.schemas.jobs import EditJob

    image = storage.join(memory_root, "in.png")
    storage.write_bytes(image, astronaut.read_bytes())

    def job(name, steps):
        return EditJob(edit_id=name, profile="tiny", inputs=[image], prompt="x", negative_prompt=" ", seed=1,
                       steps=steps, true_cfg_scale=4.0, width=256, height=256, output=storage.join(memory_root, f"{name}.png"),
                       control=storage.join(memory_root, ".jobs", name), score_identity=False)

    given_up = job("given-up", 2)
    lifecycle.cancel(given_up.control, "local")  # outside Prefect the task run is "local"
    with pytest.raises(lifecycle.JobCancelled, match="before it started"):
        edit_image(given_up)
    running = job("running", 100)

    def give_up_once_it_runs():  # as the flow does: it sees the job's heartbeat, then gives the run up
        while lifecycle.read_heartbeat(running.control) is None:
            time.sleep(0.002)
        lifecycle.cancel(running.control, "local")

    flow_side = threading.Thread(target=give_up_once_it_runs, daemon=True)
    flow_side.start()
    with pytest.raises(lifecycle.JobCancelled, match="stopped between denoising steps"):
        edit_image(running)
    flow_side.join(timeout=5)
    assert not storage.exists(running.output), "a stopped job writes no output"


@pytest.mark.parametrize("where", ["bucket", "local disk"])
def test_a_waiting_flow_asks_the_server_only_every_worker_poll_s_and_sees_a_result_at_its_next_look(where, memory_root,
                                                                                                     tmp_path,
                                                                                                     monkeypatch):
    """In a stream, every flow run waiting on a task worker polls the one Prefect server: on an H200 host 32 edit
    runs asking it twice a second each cost more CPU than the card's work took. A waiting flow asks the server once
    per `worker_poll_s`, and still sees its job's result (written by the worker) at its next cheap look: POLL_S later
    where each look is a request (a bucket; memory:// stands in for one), LOCAL_POLL_S later where it is a failed
    open on this machine's disk (a photo-to-clip run through task workers waited 0.25 s on average for each of its
    two jobs' results). Run on a clock of its own (each sleep advances it), against the session's real server; no
    worker serves the job's profile, so only the result file can end the wait."""
    import types

    from recast.flows import execution
    from recast.tasks import lifecycle, storage
    from recast.tasks.edit import edit_task_for
    from recast.tasks.schemas.jobs import EditJob, EditResult
    from recast.tasks.settings import get_settings

    monkeypatch.setenv("RECAST_EXECUTION", "workers")  # settings are re-read when a RECAST_* variable changes
    root = memory_root if where == "bucket" else storage.normalize_uri(str(tmp_path))
    job = EditJob(edit_id="e1", profile="nobody-serves-this", inputs=[storage.join(root, "in.png")],
                  prompt="x", negative_prompt=" ", seed=1, steps=1, true_cfg_scale=1.0, width=64, height=64,
                  output=storage.join(root, "e1.png"), control=storage.join(root, ".jobs", "e1"))
    written_at = 30.01  # on the flow's clock: the worker writes the result then (between two looks)
    clock = {"now": 0.0}

    def sleep(seconds: float) -> None:
        before, clock["now"] = clock["now"], clock["now"] + seconds
        if before < written_at <= clock["now"]:
            lifecycle.record_result(job, EditResult(edit_id="e1", output=job.output, seed=1, width=64, height=64,
                                                    seconds=1.0, cache_hit=False, cold_start_s=0.0))

    monkeypatch.setattr(execution, "time", types.SimpleNamespace(monotonic=lambda: clock["now"], sleep=sleep,
                                                                 time=time.time))
    server_looks = []
    real_poll_all = execution._poll_all
    monkeypatch.setattr(execution, "_poll_all", lambda watches: (server_looks.append(clock["now"]),
                                                                 real_poll_all(watches)))
    outcome = execution.run_task(edit_task_for(job.profile), job)
    assert outcome.result is not None and outcome.result.output == job.output, \
        f"the flow did not take the result the worker wrote: {outcome}"
    most = written_at / get_settings().worker_poll_s + 2
    assert len(server_looks) <= most, (f"the flow asked the server {len(server_looks)} times in {written_at:.0f} s "
                                       f"of waiting (at most {most:.0f} expected): at {server_looks}")
    between_looks = execution.POLL_S if where == "bucket" else execution.LOCAL_POLL_S
    assert clock["now"] - written_at <= between_looks + 1e-9, (
        f"the result written at {written_at:.2f} s on the {where} was seen only at {clock['now']:.2f} s: the flow "
        f"should look at the result file every {between_looks} s there")


def test_a_submission_that_cannot_reach_the_server_makes_the_flow_submit_its_queued_jobs_again(memory_root,
                                                                                                 monkeypatch):
    """The Prefect server keeps its task queue in memory: jobs still queued when it restarts are gone, and a flow
    submits them again once it has seen the server away. A flow that spent the whole restart inside submissions
    that could not connect never saw it away at its own looks (the suite once saw such a job wait ten minutes). So a
    submission that cannot reach the server counts as seeing it away: a job submitted before it and still queued
    when the server answers is submitted again. Against the session's real server, with no worker for the profile
    (the jobs stay queued); job 2's first submission stands in for the server being unreachable."""
    import types

    import httpx

    from recast.flows import execution
    from recast.tasks import lifecycle, storage
    from recast.tasks.edit import edit_task_for
    from recast.tasks.schemas.jobs import EditJob, EditResult

    monkeypatch.setenv("RECAST_EXECUTION", "workers")
    jobs = [EditJob(edit_id=name, profile="nobody-serves-this", inputs=[storage.join(memory_root, "in.png")],
                    prompt="x", negative_prompt=" ", seed=1, steps=1, true_cfg_scale=1.0, width=64, height=64,
                    output=storage.join(memory_root, f"{name}.png"), control=storage.join(memory_root, ".jobs", name))
            for name in ("e1", "e2")]
    task = edit_task_for("nobody-serves-this")
    unreachable = []

    class ServerAwayAtJob2sFirstSubmission:
        def delay(self, job):
            if job.edit_id == "e2" and not unreachable:
                unreachable.append(job.edit_id)
                raise httpx.ConnectError("All connection attempts failed")
            return task.delay(job)

    written_at, clock = 30.0, {"now": 0.0}  # on the flow's clock: a worker writes both results then

    def sleep(seconds: float) -> None:
        before, clock["now"] = clock["now"], clock["now"] + seconds
        if before < written_at <= clock["now"]:
            for job in jobs:
                lifecycle.record_result(job, EditResult(edit_id=job.edit_id, output=job.output, seed=1, width=64,
                                                        height=64, seconds=1.0, cache_hit=False, cold_start_s=0.0))

    monkeypatch.setattr(execution, "time", types.SimpleNamespace(monotonic=lambda: clock["now"], sleep=sleep,
                                                                 time=time.time))
    outcomes = dict(execution.run_chains(ServerAwayAtJob2sFirstSubmission(), [execution.single(j) for j in jobs]))
    assert unreachable == ["e2"], "the stand-in for the unreachable server did not run"
    first = outcomes[0].submissions
    assert [s["outcome"] for s in first] == ["lost", "completed"] and "restarted" in first[0]["detail"], \
        f"job 1, queued before the server was seen away, was not submitted again: {first}"
    assert outcomes[1].result is not None, f"job 2 did not complete: {outcomes[1]}"
