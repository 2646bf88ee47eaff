"""Scale out with real processes, in the multi-machine set-up the README describes (a Prefect server on
PostgreSQL, workers with their own caches and folders sharing only the server, the result storage and the storage
root): a run fans its edits over every task worker, a batch its photos."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from test_faults import start_server
from test_workers import BIN, free_port, start_worker, stop

REPO = Path(__file__).resolve().parent.parent


def _served(log: Path) -> int:
    return log.read_text().count("Submitting task run")


def _edit(env: dict, astronaut, root: Path, seeds, cwd: Path | None = None, steps: int = 30) -> dict:
    args = [str(BIN / "recast"), "edit", str(astronaut), "--prompt", "Neo, black leather trench coat", "--steps",
            str(steps), "--width", "320", "--height", "320", "--storage", str(root), "--json",
            *[a for s in seeds for a in ("--seed", str(s))]]
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _wall(manifest: dict) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(manifest["finished_at"]) - datetime.fromisoformat(manifest["created_at"])
            ).total_seconds()


def _batch(env: dict, incoming: Path, root: Path, cwd: Path) -> dict:
    """The batch flow (as its schedule runs it) over every photo in `incoming`."""
    code = ("import json, sys; from recast.flows.batch import batch_flow; "
            "from recast.tasks.schemas.requests import BatchRequest; "
            "print(json.dumps(batch_flow(BatchRequest.model_validate_json(sys.argv[1]))))")
    request = json.dumps({"source_prefix": str(incoming), "prompts": ["Top Gun, flight suit, airfield"],
                          "seeds": [7, 8, 9, 10], "steps": 60, "storage_root": str(root)})
    proc = subprocess.run([sys.executable, "-c", code, request], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/usr/lib/postgresql").exists(), reason="needs Debian's postgresql (.ci/run installs it)")
def test_two_machines_on_postgresql_share_a_run_and_a_batch(tmp_path, astronaut, second_photo):
    """As the README's scale-out section: PostgreSQL, one server, workers with their own caches and folders
    ("machines"), sharing only the server, the result storage and the storage root. One machine's worker first,
    then both: the same run on two has its edits done at once, and a batch fans its photos out too."""
    shared = tmp_path / "shared"  # stands for the bucket every machine reaches
    (shared / "results").mkdir(parents=True)
    # The database runs as the postgres user, which cannot enter pytest's private temporary folders.
    pg = Path(tempfile.mkdtemp(prefix="recast-pg-"))
    pg.chmod(0o755)
    lines = subprocess.run(["bash", str(REPO / "deployments" / "postgres.sh"), "start", str(pg / "cluster")],
                           capture_output=True, text=True, check=True, timeout=120).stdout
    database = next(l.split("=", 1)[1] for l in lines.splitlines() if "PREFECT_API_DATABASE_CONNECTION_URL" in l)
    server_home = tmp_path / "server"
    server_home.mkdir()
    port = free_port()
    server = start_server(server_home, port, "server.log", PREFECT_API_DATABASE_CONNECTION_URL=database)
    # One core per worker, as one GPU per worker: two workers have twice the hardware of one.
    common = dict(PREFECT_API_URL=f"http://127.0.0.1:{port}/api", PREFECT_LOCAL_STORAGE_PATH=str(shared / "results"),
                  RECAST_EXECUTION="workers", RECAST_HANDOFF__MODE="none", PREFECT_LOGGING_LEVEL="INFO",
                  RECAST_STORAGE_ROOT=str(shared / "artifacts"), OMP_NUM_THREADS="1")
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    flows_env = dict(os.environ, PREFECT_HOME=str(laptop / "prefect"), **common)
    incoming = shared / "incoming"
    incoming.mkdir()
    shutil.copy(astronaut, incoming / "a.png")
    shutil.copy(second_photo, incoming / "b.jpg")
    workers, logs = [], []

    def start_machine(name: str) -> None:
        machine = tmp_path / name
        machine.mkdir()
        env = dict(os.environ, PREFECT_HOME=str(machine / "prefect"), RECAST_CACHE_DIR=str(machine / "cache"),
                   **common)
        logs.append(machine / "worker.log")
        workers.append(start_worker(env, logs[-1], cwd=machine))

    def served() -> list[int]:
        return [_served(log) for log in logs]

    try:
        start_machine("gpu-box-1")
        one = _edit(flows_env, astronaut, shared / "artifacts", range(1, 9), cwd=laptop, steps=60)
        start_machine("gpu-box-2")
        before = served()
        two = _edit(flows_env, astronaut, shared / "artifacts", range(1, 9), cwd=laptop, steps=60)
        by_two = [after - earlier for after, earlier in zip(served(), before)]
        before = served()
        batch = _batch(flows_env, incoming, shared / "artifacts", cwd=laptop)
        by_batch = [after - earlier for after, earlier in zip(served(), before)]
        pg_port = database.rsplit(":", 1)[1].split("/")[0]
        rows = subprocess.run(["psql", "-h", "127.0.0.1", "-p", pg_port, "-U", "postgres", "-d", "prefect", "-tAc",
                               "select count(*) from task_run"], capture_output=True, text=True, timeout=60)
    finally:
        for proc in workers:
            stop(proc)
        os.killpg(server.pid, signal.SIGKILL)
        subprocess.run(["bash", str(REPO / "deployments" / "postgres.sh"), "stop", str(pg / "cluster")], timeout=60)
        shutil.rmtree(pg, ignore_errors=True)
    assert [e["seed"] for e in two["edits"]] == list(range(1, 9)), "the manifest keeps request order"
    assert all(e["status"] == "succeeded" for e in one["edits"] + two["edits"]), \
        [e["error"] for e in one["edits"] + two["edits"]]
    assert min(by_two) >= 1, f"one run must be fanned over both machines' workers (they ran {by_two} edits)"
    # Two machines work at once: the edits' own seconds add up to more than the run's wall time, which one worker
    # (one edit at a time) can never do, however busy the machine is. The speed-up itself is measured by
    # benchmarks/worker_overhead.py, not bounded here.
    busy = sum(e["seconds"] for e in two["edits"])
    assert busy > 1.2 * _wall(two), (f"the run's edits took {busy:.1f}s of work in {_wall(two):.1f}s: they did not "
                                     f"run at once on both machines (one machine alone: {_wall(one):.1f}s)")
    assert sum(e["seconds"] for e in one["edits"]) < _wall(one), "one worker runs one edit at a time"

    assert [e["source"].rsplit("/", 1)[-1] for e in batch["edited"]] == ["a.png", "b.jpg"], batch
    runs = [json.loads(Path(e["manifest"].removeprefix("file://")).read_text()) for e in batch["edited"]]
    first_run, second_run = sorted(runs, key=lambda m: m["created_at"])
    assert second_run["created_at"] < first_run["finished_at"], \
        "the batch must edit its photos at once on task workers, not one photo after the other"
    assert min(by_batch) >= 1, f"both workers must serve the batch (they ran {by_batch} edits)"

    for name in ("gpu-box-1", "gpu-box-2"):
        assert list((tmp_path / name / "cache").iterdir()), f"{name} built its own model cache"
    assert rows.returncode == 0 and int(rows.stdout.strip()) >= 8 + 8 + 8, \
        f"the server kept its runs elsewhere: {rows}"
