"""What a CLI command costs around its work (#24, item 1), on this machine, the median of --runs runs each:

    help           recast --help
    identity       recast identity on 2 photos (the reference against itself and a crop)
    edit-cold      recast edit on tiny, one prompt, no server running: the command starts the background server
                   (a fresh PREFECT_HOME each run: the database is created too), which is stopped after the run
    edit-warm      the same with the background server already up (the next commands of a session), as they run by
                   default: on the background worker an earlier command left with the model loaded
    edit-warm-local the same with the model loaded by the command itself (RECAST_CLI_WORKER_IDLE_S=0, and
                   RECAST_EXECUTION=local: not on the worker)
    edit-temporary the same with RECAST_CLI_SERVER=temporary: Prefect's temporary server, started and stopped by
                   the command (what every command paid before the background server)
    edit-worker    the same with RECAST_EXECUTION=workers, served by `recast worker edit --profile tiny` running
                   beside it on the background server (the model loaded once, in the worker; measured last, after
                   the other rows, so the idle worker does not share their CPU)

    python cli_overhead.py --runs 3 --out ../docs/performance.json
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
PHOTO = REPO / "tests" / "data" / "astronaut.png"


def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {proc.stderr[-1500:]}")
    return seconds


def with_worker(recast: str, edit: list[str], env: dict, runs: int) -> list[float]:
    """`edit` with RECAST_EXECUTION=workers, `runs` times, while a tiny edit worker serves on the same server."""
    import signal

    worker = subprocess.Popen([recast, "worker", "edit", "--profile", "tiny"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for line in worker.stdout:
            if "Subscribing to runs" in line:
                break
        if worker.poll() is not None:
            raise RuntimeError("the worker exited before it served")
        import threading  # its log is drained from now on: a full pipe would stall it

        threading.Thread(target=worker.stdout.read, daemon=True).start()
        timed(edit, dict(env, RECAST_EXECUTION="workers"))  # the worker's own first job (its shapes), not a sample
        return [timed(edit, dict(env, RECAST_EXECUTION="workers")) for _ in range(runs)]
    finally:
        os.killpg(worker.pid, signal.SIGINT)
        worker.wait(timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from PIL import Image

    import common

    work = Path(tempfile.mkdtemp(prefix="recast-cli-"))
    crop = work / "crop.jpg"
    with Image.open(PHOTO) as image:
        image.crop((96, 0, 416, 480)).convert("RGB").save(crop)
    recast = str(BIN / "recast")
    edit = [recast, "edit", str(PHOTO), "--prompt", "James Bond 007, wearing a tuxedo", "--seed", "1", "--storage",
            str(work / "store")]
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    base.update(RECAST_HANDOFF__MODE="none", RECAST_CLI_SERVER="background")
    timed(edit, dict(base, PREFECT_HOME=str(work / "warmup")))  # the tiny model is built once, not in a row
    subprocess.run([recast, "server", "stop"], env=dict(base, PREFECT_HOME=str(work / "warmup")), capture_output=True)
    samples: dict[str, list[float]] = {name: [] for name in ("help", "identity", "edit-cold", "edit-warm",
                                                             "edit-warm-local", "edit-temporary", "edit-worker")}
    local = dict(RECAST_CLI_WORKER_IDLE_S="0", RECAST_EXECUTION="local")
    warm_home = work / "warm"
    try:
        for index in range(args.runs):
            samples["help"].append(timed([recast, "--help"], base))
            samples["identity"].append(timed([recast, "identity", str(PHOTO), str(PHOTO), str(crop)], base))
            cold_home = work / f"cold-{index}"
            samples["edit-cold"].append(timed(edit, dict(base, PREFECT_HOME=str(cold_home))))
            subprocess.run([recast, "server", "stop"], env=dict(base, PREFECT_HOME=str(cold_home)),
                           capture_output=True)
            if index == 0:  # the warm server and the worker the first command leaves: started before the samples
                timed(edit, dict(base, PREFECT_HOME=str(warm_home)))
                timed(edit, dict(base, PREFECT_HOME=str(warm_home)))  # waits for that worker to load: not a sample
            samples["edit-warm"].append(timed(edit, dict(base, PREFECT_HOME=str(warm_home))))
            samples["edit-warm-local"].append(timed(edit, dict(base, PREFECT_HOME=str(warm_home), **local)))
            samples["edit-temporary"].append(timed(edit, dict(base, PREFECT_HOME=str(warm_home), **local,
                                                              RECAST_CLI_SERVER="temporary")))
        subprocess.run([recast, "server", "stop"], env=dict(base, PREFECT_HOME=str(warm_home)), capture_output=True)
        samples["edit-worker"] = with_worker(recast, edit, dict(base, PREFECT_HOME=str(warm_home), **local),
                                             args.runs)
    finally:
        subprocess.run([recast, "server", "stop"], env=dict(base, PREFECT_HOME=str(warm_home)), capture_output=True)
    run = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": common.recorded_command(sys.argv), "versions": common.versions()}
    for name, values in samples.items():
        row = dict(stage="cli", profile=name, card=f"cpu ({platform.processor() or 'cpu'}, {os.cpu_count()} cores)",
                   gpus=0, seconds=round(statistics.median(values), 2), samples=[round(v, 2) for v in values], run=run)
        common.record(row, args.results, args.out)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
