"""The task workers a Prefect server has, as flows see them before they submit work.

Every `recast worker` advertises itself on the server it serves: a Prefect variable `recast-worker-<host>-<pid>`
holding what it serves (stage -> profile), where it reads task parameters from, and when it last said so
(refreshed every ADVERTISE_S, removed when it stops). Jobs are routed by profile (each (stage, profile) has a
task key of its own, recast.tasks.edit.edit_task_for), so a worker only ever receives jobs it can run. A flow reads
the advertisements before it submits anything:

- no running worker serves the profile: it says so (the CLI and the run's log in the UI), and the job waits for
  one; a job still not taken after `worker_wait_timeout_s` fails with that reason (recast.flows.execution);
- the workers that serve it read task parameters from another result storage (another PREFECT_HOME, say) than
  this process writes them to: refused before anything is submitted or written, with the fix, because those
  workers could never read the run's jobs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path

from recast.tasks.errors import BadInput

log = logging.getLogger("recast.execution")

ADVERTISE_S = 5.0
# A worker killed without a word is forgotten after this long. Six intervals, not fewer: on one H200, with 32 runs
# started at once, the server took long enough over the advertisements' writes that a busy worker serving every job
# looked gone at three, and 14 of the 32 runs said that no worker served them.
FORGOTTEN_AFTER_S = 6 * ADVERTISE_S
PREFIX = "recast-worker-"


def parameter_storage() -> str:
    """Where this process's task runs keep their parameters, which the worker that runs them must read."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    block = settings.tasks.scheduling.default_storage_block
    if block:
        return f"block {block}"
    return str(Path(settings.results.local_storage_path).expanduser().resolve())


def _name() -> str:
    return PREFIX + re.sub(r"[^a-z0-9-]+", "-", f"{socket.gethostname()}-{os.getpid()}".lower())


def advertise(serves: dict[str, str]):
    """Say on the server, every ADVERTISE_S, that this process serves `serves` ({"edit": profile, "video":
    profile}); returns a function that stops saying it and removes the advertisement (waiting for that)."""
    from prefect.variables import Variable

    stop = threading.Event()
    record = {"host": socket.gethostname(), "pid": os.getpid(), "serves": serves, "storage": parameter_storage()}

    def loop() -> None:
        while True:
            try:
                Variable.set(_name(), json.dumps(dict(record, at=time.time())), overwrite=True, _sync=True)
            except Exception as exc:  # noqa: BLE001 - the server is away: say it again when it is back
                log.debug("could not advertise this worker: %s", exc)
            if stop.wait(ADVERTISE_S):
                break
        try:
            Variable.unset(_name(), _sync=True)
        except Exception:  # noqa: BLE001 - the server may be gone already; the advertisement just goes stale
            pass

    thread = threading.Thread(target=loop, name="recast-advertise", daemon=True)
    thread.start()

    def withdraw() -> None:
        stop.set()
        thread.join(timeout=5)

    return withdraw


def running_workers() -> list[dict]:
    """The workers that advertised themselves within the last FORGOTTEN_AFTER_S, on the server Prefect is set to use,
    else on this PREFECT_HOME's background server (a CLI command plans before it joins that server); none when
    there is neither: Prefect would start a throwaway server of its own (~10 s) where no worker can be."""
    from prefect.settings import PREFECT_API_URL

    from recast.flows import local_server

    query = {"variables": {"name": {"like_": PREFIX}}, "limit": 200}  # the filter endpoint: only these travel
    if PREFECT_API_URL.value():
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            found = client.request("POST", "/variables/filter", json=query).json()
    elif background := local_server.running():
        import httpx

        found = httpx.post(f"{background['api']}/variables/filter", json=query, timeout=30).raise_for_status().json()
    else:
        return []
    workers = []
    for variable in found:
        value = variable.get("value")
        try:
            record = json.loads(value) if isinstance(value, str) else value
        except ValueError:
            continue
        if isinstance(record, dict) and time.time() - record.get("at", 0) < FORGOTTEN_AFTER_S:
            workers.append(record)
    return workers


def serve_all(needs: list[tuple[str, str]]) -> bool:
    """Whether running workers that read this process's task parameters serve every (stage, profile) of `needs`;
    False when the server cannot be asked (the command then runs its models itself)."""
    try:
        workers = running_workers()
    except Exception as exc:  # noqa: BLE001 - no answer: nothing is assumed to serve
        log.debug("could not read the workers' advertisements: %s", exc)
        return False
    mine = parameter_storage()
    return bool(needs) and all(any(w.get("storage") == mine for w in _serving(workers, stage, profile))
                               for stage, profile in needs)


def _serving(workers: list[dict], stage: str, profile: str) -> list[dict]:
    """The advertised workers that serve (stage, profile)."""
    return [w for w in workers if (w.get("serves") or {}).get(stage) == profile]


def check_served(stage: str, profile: str) -> str | None:
    """Before a run submits jobs for (stage, profile): BadInput when the workers serving it cannot read this
    process's task parameters; a note (also logged) when none serves it; None when all is well."""
    mine = parameter_storage()
    try:
        workers = running_workers()
    except Exception as exc:  # noqa: BLE001 - the server is away: the run's own waits report that
        log.debug("could not read the workers' advertisements: %s", exc)
        return None
    serving = _serving(workers, stage, profile)
    if serving and all(w.get("storage") != mine for w in serving):
        theirs = sorted({w.get("storage") for w in serving})[0]
        raise BadInput("PREFECT_HOME", mine, f"the running workers for {stage} profile '{profile}' read task "
                       f"parameters from {theirs}, this process writes them to {mine}, so they could never run "
                       "this run's jobs", "run flows and workers with the same PREFECT_HOME (or "
                       "PREFECT_LOCAL_STORAGE_PATH, or a shared PREFECT_TASKS_SCHEDULING_DEFAULT_STORAGE_BLOCK)")
    if not serving:
        others = ", ".join(sorted({f"{s} {p}" for w in workers for s, p in (w.get("serves") or {}).items()})) \
            or "none"
        note = (f"no running worker serves {stage} profile '{profile}' (running: {others}); its jobs wait for one: "
                f"start `recast worker {'edit' if stage == 'edit' else 'animate'} "
                f"--{'profile' if stage == 'edit' else 'video-profile'} {profile}`")
        return note  # the CLI prints it, the flow logs it (in the UI)
    return None
