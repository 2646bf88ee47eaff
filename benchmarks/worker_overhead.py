"""Orchestration overhead per edit in `workers` mode: submission, result storage, manifest, beyond the pipeline.

Starts a `prefect server` on 127.0.0.1 (temporary PREFECT_HOME) and one `recast worker edit` on the tiny
profile, then runs one flow of N edits from the CLI, twice (the first pays the CLI's own start-up caches).
Overhead per edit = (wall time of the edit loop - sum of pipeline seconds) / N, where the loop's wall time is
taken from the flow's own log timestamps of its first and last edit, so the flow process's start-up and
Prefect's temporary-client set-up are not counted.

    .venv/bin/python benchmarks/worker_overhead.py [--edits 20]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

BIN = Path(sys.executable).parent
ASTRONAUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "astronaut.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError


def healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edits", type=int, default=20)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="recast-overhead-"))
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp / "home"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", RECAST_EXECUTION="workers", RECAST_HANDOFF__MODE="none",
               PREFECT_LOGGING_LEVEL="WARNING")
    (tmp / "home").mkdir()
    procs = [subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=open(tmp / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)]
    try:
        wait(lambda: healthy(env["PREFECT_API_URL"]), 120)
        log = tmp / "worker.log"
        procs.append(subprocess.Popen([str(BIN / "recast"), "worker", "edit"], env=env, stdout=open(log, "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
        wait(lambda: "ready on" in log.read_text(), 120)
        time.sleep(3)  # the subscription follows the ready line
        rows = []
        for attempt in (1, 2):
            seeds = [a for s in range(1, args.edits + 1) for a in ("--seed", str(s))]
            started = time.perf_counter()
            proc = subprocess.run([str(BIN / "recast"), "edit", str(ASTRONAUT), "--prompt", "James Bond 007, tuxedo",
                                   "--steps", "2", "--storage", str(tmp / "store"), "--json", *seeds],
                                  env=env, capture_output=True, text=True, timeout=900)
            wall = time.perf_counter() - started
            manifest = json.loads(proc.stdout)
            created = datetime.fromisoformat(manifest["created_at"])
            finished = datetime.fromisoformat(manifest["finished_at"])
            loop = (finished - created).total_seconds()
            pipeline = sum(e["seconds"] for e in manifest["edits"])
            rows.append(dict(attempt=attempt, edits=len(manifest["edits"]), cli_wall_s=round(wall, 2),
                             flow_body_s=loop, pipeline_s=round(pipeline, 2),
                             overhead_ms_per_edit=round(1000 * (loop - pipeline) / len(manifest["edits"]), 1)))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
