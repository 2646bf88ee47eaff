"""The background Prefect server CLI commands share (#24, item 1): the first command that runs a flow starts it,
the next reuse it, `recast server stop` stops it, it stops itself when unused, and bad input starts nothing.
Real commands, a real Prefect server; every test stops what it started."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from recast.flows.local_server import _alive  # the state file's pid: alive or gone

BIN = Path(sys.executable).parent


def _env(home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return dict(env, PREFECT_HOME=str(home), RECAST_CLI_SERVER="background", RECAST_HANDOFF__MODE="none", **extra)


def _recast(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "recast"), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "prefect"
    yield home
    _recast(_env(home), "server", "stop", timeout=120)  # whatever the test left, stopped


def _flow_runs(api: str) -> list[dict]:
    request = urllib.request.Request(f"{api}/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_the_first_command_starts_a_server_the_next_reuse_and_server_stop_stops_it(home, astronaut, tmp_path):
    env = _env(home)
    first = _recast(env, "edit", str(astronaut), "--prompt", "Neo, black trench coat", "--seed", "1", "--steps", "2",
                    "--storage", str(tmp_path / "store"))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "started a Prefect server in the background" in first.stderr, first.stderr[-2000:]
    state = json.loads((home / "recast-server.json").read_text())
    assert _alive(state["pid"]), "the server must outlive the command that started it"
    second = _recast(env, "edit", str(astronaut), "--prompt", "Neo, black trench coat", "--seed", "2", "--steps",
                     "2", "--storage", str(tmp_path / "store"))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "started a Prefect server" not in second.stderr, "the second command must reuse the running server"
    assert json.loads((home / "recast-server.json").read_text())["pid"] == state["pid"]
    # Each command loads its model while the server starts and the run begins, and the manifest still says the
    # command paid that load (a fresh process: nothing was loaded before it).
    manifest = json.loads(Path(second.stdout.strip().splitlines()[-1].removeprefix("file://")).read_text())
    assert manifest["pipeline"]["cache_hit"] is False and manifest["pipeline"]["cold_start_s"] > 0, \
        f"the command's own model load was reported as already loaded: {manifest['pipeline']}"
    assert manifest["edits"][0]["cache_hit"] is False, manifest["edits"][0]
    runs = _flow_runs(state["api"])
    assert len([r for r in runs if r["state_type"] == "COMPLETED"]) == 2, \
        f"both commands' flow runs must be on the shared server: {[r['name'] for r in runs]}"
    status = _recast(env, "server", "status")
    assert f"running at {state['api']}" in status.stdout, status.stdout
    # The command the first one named, typed as it says in the user's own shell: one without the PREFECT_HOME that
    # `make demo` exports (where a plain `recast server stop` looked in ~/.prefect and found nothing), and without
    # recast's venv on its PATH (`make demo` calls .venv/bin/recast)
    hint = re.search(r"`([^`]*recast server stop)` stops it", first.stderr)
    assert hint, f"the first command must say how to stop its server: {first.stderr[-1000:]}"
    shell = {k: v for k, v in env.items() if k != "PREFECT_HOME"}
    shell.update(HOME=str(tmp_path / "user"), PATH=os.pathsep.join(["/usr/bin", "/bin"]))
    stopped = subprocess.run(["bash", "-c", hint.group(1)], env=shell, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0 and "stopped the background server" in stopped.stdout, \
        f"`{hint.group(1)}`, typed in a shell without PREFECT_HOME, did not stop it: {stopped.stdout}{stopped.stderr}"
    assert not _alive(state["pid"]), "`recast server stop` must stop the server's process"
    assert not (home / "recast-server.json").exists()
    assert "no background server" in _recast(env, "server", "status").stdout


def test_an_unused_server_stops_by_itself(home):
    env = _env(home, RECAST_CLI_SERVER_IDLE_S="2")
    started = _recast(env, "server", "start")
    assert started.returncode == 0 and "started at" in started.stdout, started.stdout + started.stderr[-2000:]
    pid = json.loads((home / "recast-server.json").read_text())["pid"]
    deadline = time.monotonic() + 300  # an event (the process ends), with room for a busy machine
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(pid), "a server nobody used for cli_server_idle_s must stop by itself"
    assert not (home / "recast-server.json").exists(), "and say so (its state file gone)"



def test_a_new_homes_first_server_starts_from_the_migrated_database_template(home, tmp_path):
    """Migrating a new PREFECT_HOME's empty database was 14 s of the first command's 22 s server start (2 cores):
    the background server's first start copies the template made once per Prefect version instead."""
    import sqlite3

    from recast.flows import local_server

    env = _env(home, RECAST_CACHE_DIR=str(tmp_path / "cache"))
    made = subprocess.run([sys.executable, "-m", "recast.flows.local_server", "--database-template"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    template = Path(made.stdout.strip().rsplit(" ", 1)[-1])
    with contextlib.closing(sqlite3.connect(template)) as db:  # a mark that only a copy of this file carries
        db.execute("PRAGMA user_version = 4242")
        db.commit()
    started = _recast(env, "server", "start")
    assert started.returncode == 0, started.stderr[-2000:]
    with contextlib.closing(sqlite3.connect(home / "prefect.db")) as db:
        mark = db.execute("PRAGMA user_version").fetchone()[0]
    assert mark == 4242, "the new home's database was migrated from scratch, not copied from the template"
    assert local_server.healthy(json.loads((home / "recast-server.json").read_text())["api"]), \
        "the server on the copied database is not answering"

def test_bad_input_starts_no_server(home, tmp_path):
    proc = _recast(_env(home), "edit", str(tmp_path / "missing.png"), "--prompt", "Neo", "--storage",
                   str(tmp_path / "store"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not (home / "recast-server.json").exists(), "a refused command must not start a server"


def test_a_worker_joins_the_background_server_and_the_next_commands_run_on_it(home, astronaut, tmp_path):
    """`recast worker edit` with no server named uses (here: starts) the CLI's background server, so a command with
    RECAST_EXECUTION=workers is served by that warm worker: no model load in the command, and the manifest names
    the device the worker ran on. A command that does not choose (RECAST_EXECUTION unset) runs on that worker too,
    since it serves the command's profile; RECAST_EXECUTION=local keeps the model in the command."""
    import signal

    env = _env(home)
    worker = subprocess.Popen([str(BIN / "recast"), "worker", "edit", "--profile", "tiny"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen = []
    try:
        for line in worker.stdout:  # its own lines, until it subscribes (or it exits: the loop ends)
            seen.append(line)
            if "Subscribing to runs" in line:
                break
        assert worker.poll() is None, "the worker exited instead of serving:\n" + "".join(seen[-20:])
        threading.Thread(target=worker.stdout.read, daemon=True).start()  # drained: a full pipe would stall it
        assert (home / "recast-server.json").exists(), "the worker did not start the background server"
        edit = _recast(dict(env, RECAST_EXECUTION="workers"), "edit", str(astronaut), "--prompt",
                       "Neo, black trench coat", "--seed", "1", "--steps", "2", "--storage", str(tmp_path / "store"))
        assert edit.returncode == 0, edit.stderr[-2000:]
        assert "started a Prefect server" not in edit.stderr, "the command started a second server"
        assert "no running worker serves" not in edit.stderr, "the command looked for workers on another server"
        manifest = json.loads(Path(edit.stdout.strip().splitlines()[-1].removeprefix("file://")).read_text())
        record = manifest["edits"][0]
        assert record["status"] == "succeeded" and record["submissions"], "the edit did not go to the worker"
        assert record["cache_hit"] is True, "the worker had loaded its model at start: the job must find it loaded"
        assert record["device"] == manifest["device"] == "cpu", (record.get("device"), manifest["device"])

        def edit_with(**extra: str) -> tuple[dict, str]:
            run_env = {k: v for k, v in env.items() if k != "RECAST_EXECUTION"}
            done = _recast(dict(run_env, **extra), "edit", str(astronaut), "--prompt", "Neo, black trench coat",
                           "--seed", "2", "--steps", "2", "--storage", str(tmp_path / "store"))
            assert done.returncode == 0, done.stderr[-2000:]
            path = Path(done.stdout.strip().splitlines()[-1].removeprefix("file://"))
            return json.loads(path.read_text())["edits"][0], done.stderr

        chosen, said = edit_with()
        assert chosen["submissions"] and chosen["cache_hit"] is True, \
            f"with a worker serving its profile, a command that did not choose ran the model itself: {chosen}"
        assert "running on the workers already serving edit profile 'tiny'" in said, said[-2000:]
        kept, said = edit_with(RECAST_EXECUTION="local")
        assert not kept["submissions"] and "already serving" not in said, "RECAST_EXECUTION=local went to the worker"
    finally:
        os.killpg(worker.pid, signal.SIGINT)
        try:
            worker.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def test_looking_for_workers_with_no_server_anywhere_starts_none(monkeypatch, tmp_path):
    """Before a command joins its server it plans, and looks for workers: with no server named and no background
    server up there are none, and Prefect's throwaway in-process server (~10 s on 2 cores) must not be started to
    find that out."""
    from prefect.server.api import server as prefect_server
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from recast.flows import fleet

    def refuse(self, *args, **kwargs):
        raise AssertionError("Prefect's throwaway server was started to look for workers")

    monkeypatch.setattr(prefect_server.SubprocessASGIServer, "start", refuse)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # no background server there
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert not PREFECT_API_URL.value(), "the test needs a process with no server named"
        assert fleet.running_workers() == []


def test_a_command_leaves_its_model_loaded_and_the_next_command_runs_on_it(home, astronaut, tmp_path):
    """#24: a local command loaded its model and threw it away at exit, so every `recast edit` paid the load (~10 s
    of 11 s on 2 cores). After a command that ran its model itself, a background worker keeps it loaded: the next
    command runs on it with nothing to load, and `recast server stop` stops the worker with the server."""
    env = _env(home, RECAST_CLI_WORKER_IDLE_S="600")
    edit = ("edit", str(astronaut), "--prompt", "Neo, black trench coat", "--steps", "2", "--storage",
            str(tmp_path / "store"))
    first = _recast(env, *edit, "--seed", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "a background worker keeps edit profile 'tiny' loaded" in first.stderr, first.stderr[-2000:]
    worker = json.loads((home / "recast-workers.json").read_text())
    assert _alive(worker["pid"]), "the worker must outlive the command that left it"
    second = _recast(env, *edit, "--seed", "2")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "running on the workers already serving edit profile 'tiny'" in second.stderr, second.stderr[-2000:]
    assert "a background worker keeps" not in second.stderr, "a second worker was left for the same model"
    record = json.loads(Path(second.stdout.strip().splitlines()[-1].removeprefix("file://")).read_text())["edits"][0]
    assert record["submissions"] and record["cache_hit"] is True, \
        f"the second command did not run on the worker that kept the model loaded: {record}"
    stopped = _recast(env, "server", "stop", timeout=120)
    assert "stopped the background worker (edit profile 'tiny')" in stopped.stdout, stopped.stdout + stopped.stderr
    assert not _alive(worker["pid"]) and not (home / "recast-workers.json").exists(), "the worker outlived the stop"


def test_the_background_worker_stops_by_itself_when_unused(home, astronaut, tmp_path):
    env = _env(home, RECAST_CLI_WORKER_IDLE_S="3")
    first = _recast(env, "edit", str(astronaut), "--prompt", "Neo, black trench coat", "--steps", "2", "--seed", "1",
                    "--storage", str(tmp_path / "store"))
    assert first.returncode == 0, first.stderr[-2000:]
    worker = json.loads((home / "recast-workers.json").read_text())
    deadline = time.monotonic() + 300  # it loads the model, serves nothing for 3 s, then ends
    while _alive(worker["pid"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    log = Path(worker["log"]).read_text()
    assert not _alive(worker["pid"]), f"the unused worker still runs after 300 s:\n{log[-2000:]}"
    assert "no job for 3 s, stopping" in log, log[-2000:]


def test_an_idle_worker_whose_stop_hangs_withdraws_and_exits_anyway(tmp_path):
    """A full suite on a busy 2-core machine once left an idle worker alive after it logged its stop (its event loop
    waited on a thread that never returned): after a grace period the worker withdraws and exits by itself."""
    script = ("import signal, time\n"
              "signal.signal(signal.SIGINT, signal.SIG_IGN)  # an orderly stop that never completes\n"
              "from recast.flows import workers\n"
              "workers._stop_when_idle(0.5, on_forced_exit=lambda: print('withdrawn', flush=True), grace_s=1.0)\n"
              "time.sleep(600)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the worker did not exit by itself: {proc.returncode} {proc.stderr[-2000:]}"
    assert "withdrawn" in proc.stdout and "exiting now" in proc.stdout, proc.stdout


def test_a_command_for_other_models_stops_the_background_worker_before_loading_its_own(home, astronaut, tmp_path):
    """One background worker at a time: a command whose models it does not serve stops it before loading its own
    (on a GPU, two models would compete for the card's memory), then leaves a worker for its own models."""
    env = _env(home, RECAST_CLI_WORKER_IDLE_S="600")
    edit = _recast(env, "edit", str(astronaut), "--prompt", "Neo, black trench coat", "--steps", "2", "--seed", "1",
                   "--storage", str(tmp_path / "store"))
    assert edit.returncode == 0, edit.stderr[-2000:]
    edit_worker = json.loads((home / "recast-workers.json").read_text())
    handoff = Path(edit.stdout.strip().splitlines()[-1].removeprefix("file://")).parent / "handoff.json"
    animate = _recast(env, "animate", str(handoff), "--num-frames", "5", "--storage", str(tmp_path / "store"))
    assert animate.returncode == 0, animate.stderr[-2000:]
    assert "stopped the background worker that kept edit profile 'tiny' loaded" in animate.stderr, \
        animate.stderr[-2000:]
    assert not _alive(edit_worker["pid"]), "the edit model's worker still runs beside the command's own model"
    video_worker = json.loads((home / "recast-workers.json").read_text())
    assert video_worker["models"] == [["video", "tiny"]] and _alive(video_worker["pid"]), video_worker
