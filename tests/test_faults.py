"""Faults injected into real processes: the Prefect server killed and restarted mid-run, the flow's own process
killed mid-run and the run resumed. Each with the bar from the issue that found them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_workers import BIN, free_port, healthy, start_worker, stop, wait_for


def start_server(home: Path, port: int, log_name: str, **extra_env: str) -> subprocess.Popen:
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra_env)
    log = open(home / log_name, "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: healthy(f"http://127.0.0.1:{port}/api"), 300, "the Prefect server")
    return proc


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
    run = subprocess.Popen(_edit_args(astronaut, root, [1, 2, 3, 4, 5]), env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: list(root.glob("runs/*/edits/*.png")), 180, "the first edit")
        os.killpg(own_server["proc"].pid, signal.SIGKILL)  # the server dies with its in-memory task queue
        own_server["proc"].wait(timeout=30)
        time.sleep(2)  # the flow polls every 0.5 s: it sees the server gone
        own_server["proc"] = start_server(own_server["home"], own_server["port"], "server-2.log")
        back_at = time.monotonic()
        out, err = run.communicate(timeout=300)
        finished_after = time.monotonic() - back_at
    finally:
        if run.poll() is None:
            run.kill()
        stop(worker)
    assert run.returncode == 0, err[-3000:]
    manifest = json.loads(out)
    assert [e["seed"] for e in manifest["edits"]] == [1, 2, 3, 4, 5], "each edit recorded once, in request order"
    assert all(e["status"] == "succeeded" for e in manifest["edits"]), [e["error"] for e in manifest["edits"]]
    assert finished_after < 60, f"the run needed {finished_after:.0f}s after the server came back (bar: 60s)"
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


def test_make_serve_stops_every_process_on_term(tmp_path):
    """Ctrl-C or TERM on `make serve` stops the server, the flow worker and both task workers, and returns."""
    repo = Path(__file__).resolve().parent.parent
    port = free_port()
    env = dict(os.environ, RECAST_SERVE_PORT=str(port), PREFECT_HOME=str(tmp_path / "home"),
               RECAST_STORAGE_ROOT=str(tmp_path / "artifacts"))
    env.pop("PREFECT_API_URL", None)
    serve = subprocess.Popen(["bash", "deployments/serve.sh"], cwd=repo, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: "recast is serving" in _read(serve), 400, "make serve to be up")
        children = _descendants(serve.pid)
        assert len(children) >= 4, f"expected the server and three workers, found {children}"
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
        wait_for(lambda: not [pid for pid in children if _alive(pid)], 60, "every process of make serve to stop")
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)


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
