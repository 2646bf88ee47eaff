"""The models a CLI command ran, kept loaded for the next commands (`cli_worker_idle_s`, default 600 s; 0: off).

A local command (`recast edit`, `recast animate`) loads its model, runs, and exits: the next command loaded it again,
~10 s of an 11 s tiny edit on 2 cores. So after a command that ran its models in its own process on the background
server, the CLI leaves `recast worker` for those models running in the background (joined to that server; its log in
`$PREFECT_HOME/recast-workers/`), and the next commands find it serving (recast.flows.cli._use_running_workers): a
tiny edit in ~3.5 s. One such worker at a time, recorded in `$PREFECT_HOME/recast-workers.json`. It stops itself
after `cli_worker_idle_s` without a job, on `recast server stop`, and when a later command needs other models: it is
stopped before that command loads them, so two models never compete for one card's memory.

Like local_server, nothing here imports Prefect: the commands call it before Prefect reads its settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from recast.flows import local_server

REGISTRY = "recast-workers.json"
READY_TIMEOUT_S = 300.0  # a worker still loading its model is waited for this long (a large model on a slow disk)

Models = list[tuple[str, str]]  # (stage, profile name): ("edit", "tiny"), ("video", "tiny")


def _registry_path() -> Path:
    return local_server.prefect_home() / REGISTRY


def registered() -> dict | None:
    """The background worker this PREFECT_HOME's commands left, while its process lives: {pid, models, log}."""
    try:
        entry = json.loads(_registry_path().read_text())
    except (OSError, ValueError):
        return None
    if not local_server._alive(int(entry.get("pid", 0) or 0)):
        with contextlib.suppress(OSError):
            _registry_path().unlink()
        return None
    entry["models"] = [tuple(pair) for pair in entry.get("models", [])]
    return entry


def serves(entry: dict | None, models: Models) -> bool:
    return entry is not None and all(tuple(pair) in entry["models"] for pair in models)


def keep(models: Models, idle_s: float) -> dict | None:
    """Leave a worker for `models` running (none when one already serves them); what was started, or None."""
    if not models or idle_s <= 0:
        return None
    if serves(registered(), models):
        return None
    stop()  # other models: one background worker at a time
    stages = {stage for stage, _ in models}
    command = [sys.executable, "-m", "recast.flows.cli", "worker"]
    command += [kind for stage, kind in (("edit", "edit"), ("video", "animate")) if stage in stages]
    for stage, profile in models:
        command += ["--profile" if stage == "edit" else "--video-profile", profile]
    logs = local_server.prefect_home() / "recast-workers"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"worker-{time.strftime('%Y%m%d-%H%M%S')}.log"
    env = dict(os.environ, RECAST_WORKER_IDLE_S=str(idle_s))
    with open(log, "ab") as out:
        # Its own session: it outlives this command, and a stop reaches its whole process group.
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    entry = {"pid": proc.pid, "models": [list(pair) for pair in models], "log": str(log), "idle_s": idle_s}
    temporary = _registry_path().with_suffix(f".{proc.pid}.tmp")
    temporary.write_text(json.dumps(entry))
    os.replace(temporary, _registry_path())
    return entry


def wait_until_serving(entry: dict, models: Models, is_serving, timeout_s: float = READY_TIMEOUT_S) -> bool:
    """Wait while the background worker loads `models`: True once is_serving() says it serves them, False if its
    process ends first or it takes longer than timeout_s (the command then runs its models itself)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if is_serving():
            return True
        if not local_server._alive(entry["pid"]):
            return False
        time.sleep(0.25)
    return False


def stop() -> dict | None:
    """Stop the background worker (TERM to its process group, KILL after 20 s); what was stopped, or None."""
    entry = registered()
    if entry is None:
        return None
    local_server.end_process_group(entry["pid"])
    with contextlib.suppress(OSError):
        _registry_path().unlink()
    return entry


def describe(models: Models) -> str:
    return ", ".join(f"{stage} profile '{profile}'" for stage, profile in models)
