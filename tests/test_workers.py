"""Task workers as real processes on loopback: a `prefect server`, a `recast worker edit`, flow runs from the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import end_process_group

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(api_server, tmp_path_factory):
    """The session's `prefect server start` (tests/conftest.py), and a Prefect home for this module's flows and
    workers (their shared result storage); yields the environment to talk to it."""
    home = tmp_path_factory.mktemp("prefect-home")
    return dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                PREFECT_API_URL=api_server, RECAST_EXECUTION="workers", RECAST_HANDOFF__MODE="none",
                PREFECT_LOGGING_LEVEL="INFO")


def start_worker(env, log_path: Path, cwd: Path | None = None) -> subprocess.Popen:
    log = open(log_path, "w")
    proc = subprocess.Popen([str(BIN / "recast"), "worker", "edit"], env=env, cwd=cwd, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    def serving():
        if proc.poll() is not None:
            raise AssertionError(f"the worker exited ({proc.returncode}): {log_path.read_text()[-2000:]}")
        return "Subscribing to runs" in log_path.read_text()

    wait_for(serving, 120, "the edit worker to start serving")
    return proc


def stop(proc: subprocess.Popen) -> None:
    """Stop a worker as an operator does (TERM; KILL if it lingers): it withdraws its advertisement, so the next
    test's runs do not see it."""
    end_process_group(proc, grace_s=15)


def kill(proc: subprocess.Popen) -> None:
    """A worker dying (KILL: it says nothing to anyone)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def edit(env, astronaut, root, seeds) -> dict:
    args = [str(BIN / "recast"), "edit", str(astronaut), "--prompt", "James Bond 007, tuxedo", "--steps", "2",
            "--storage", str(root), "--json"] + [a for s in seeds for a in ("--seed", str(s))]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_one_worker_serves_two_flow_runs_with_one_load(server, astronaut, tmp_path):
    worker = start_worker(server, tmp_path / "worker.log")
    try:
        first = edit(server, astronaut, tmp_path / "a", [1, 2, 3])
        second = edit(server, astronaut, tmp_path / "a", [4, 5, 6])
    finally:
        stop(worker)
    edits = first["edits"] + second["edits"]
    assert [e["status"] for e in edits] == ["succeeded"] * 6
    assert all(Path(e["output"].removeprefix("file://")).exists() for e in edits), "an edit PNG is missing"
    # The worker loaded (and warmed) its pipeline before serving: every edit is a cache hit of that one load.
    assert all(e["cache_hit"] for e in edits), [e["cache_hit"] for e in edits]
    assert first["pipeline"]["cold_start_s"] == second["pipeline"]["cold_start_s"]
    log = (tmp_path / "worker.log").read_text()
    assert log.count("ready on") == 1, "the worker must load its pipeline exactly once"


def test_a_stream_of_runs_on_one_worker_completes_with_each_manifest_right(server, astronaut, tmp_path):
    """Several runs at once on one worker, which overlaps one job's CPU work with the next one's model call: every
    run completes, each with its own edits, once each, in its own folder."""
    worker = start_worker(server, tmp_path / "worker.log")
    runs = []
    try:
        for index in range(3):
            args = [str(BIN / "recast"), "edit", str(astronaut), "--prompt", f"Neo {index}, black trench coat",
                    "--steps", "4", "--storage", str(tmp_path / "s"), "--json", "--seed", str(10 * index + 1),
                    "--seed", str(10 * index + 2)]
            runs.append(subprocess.Popen(args, env=server, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [run.communicate(timeout=600) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
        stop(worker)
    for index, (run, (out, err)) in enumerate(zip(runs, outs)):
        assert run.returncode == 0, err[-2000:]
        manifest = json.loads(out)
        assert [e["seed"] for e in manifest["edits"]] == [10 * index + 1, 10 * index + 2], manifest["edits"]
        for edit in manifest["edits"]:
            assert edit["status"] == "succeeded" and f"Neo {index}" in edit["prompt"], edit
            assert edit["output"].startswith(manifest["folder"]) and Path(edit["output"][7:]).exists(), edit
    assert len(list((tmp_path / "s").glob("runs/*/edits/*.png"))) == 6, "each edit once"


@contextlib.contextmanager
def _worker_in_this_process(*tasks, limit: int):
    """recast's task worker serving `tasks` on a thread of this process (so a test's tasks share its events),
    stopped on leaving."""
    import asyncio
    import contextvars
    import threading

    from recast.flows.workers import _overlapping_worker

    serving: dict = {}

    async def serve():
        serving["loop"] = asyncio.get_running_loop()
        serving["worker"] = _overlapping_worker()(*tasks, limit=limit)
        try:
            await serving["worker"].astart()
        except BaseException:  # noqa: BLE001 - stopped on leaving
            pass

    thread = threading.Thread(target=contextvars.copy_context().run, args=(asyncio.run, serve()), daemon=True)
    thread.start()
    try:
        yield
    finally:
        if "worker" in serving:
            asyncio.run_coroutine_threadsafe(serving["worker"].astop(), serving["loop"])
        thread.join(timeout=30)


def test_a_worker_takes_its_next_job_while_the_last_one_finishes(api_server):
    """The worker's overlap itself: job 1 leaves the GPU, then waits (its 'CPU work') until job 2 has reached the
    GPU. A worker that took one job at a time would never start job 2 while job 1 runs."""
    import threading

    from prefect import task

    from recast.flows.workers import MAX_FINISHING
    from recast.tasks import lifecycle

    first_started, second_on_gpu = threading.Event(), threading.Event()

    @task(name="recast-overlap-probe", persist_result=True)
    def probe(n: int) -> int:
        with lifecycle.on_gpu():
            (first_started if n == 1 else second_on_gpu).set()
        if n == 1 and not second_on_gpu.wait(120):
            raise AssertionError("job 2 never reached the GPU while job 1 was finishing")
        return n

    with _worker_in_this_process(probe, limit=1 + MAX_FINISHING):
        first = probe.delay(1)
        assert first_started.wait(120), "the worker did not take job 1"
        second = probe.delay(2)
        assert first.result(timeout=180) == 1 and second.result(timeout=180) == 2


def test_a_worker_taking_its_next_job_on_the_gpu_gets_it_ready_during_the_model_call(api_server, tmp_path,
                                                                                    monkeypatch):
    """worker_take_next: on_gpu (#23: a stream of edits idled the card ~0.6 s between jobs, outside the model calls).
    Job 1 holds the GPU until job 2's task has begun, so job 2's delivery and set-up overlap the model call; job 2
    then waits for the GPU and reaches it only once job 1 has left. A worker taking jobs after the GPU (the default)
    would not begin job 2 while job 1 holds it."""
    import threading
    from types import SimpleNamespace

    from prefect import task

    from recast.flows.workers import _job_limit
    from recast.tasks import lifecycle

    monkeypatch.setenv("RECAST_WORKER_TAKE_NEXT", "on_gpu")
    first_on_gpu, second_began = threading.Event(), threading.Event()
    order: list[str] = []

    @task(name="recast-take-next-probe", persist_result=True)
    def probe(n: int, control: str) -> int:
        with lifecycle.running(SimpleNamespace(control=control)):  # beats, as an edit does
            if n == 2:
                second_began.set()
            with lifecycle.on_gpu():
                order.append(f"{n} on the GPU")
                if n == 1:
                    first_on_gpu.set()
                    if not second_began.wait(120):
                        raise AssertionError("job 2 did not begin while job 1 held the GPU")
                order.append(f"{n} left the GPU")
        return n

    with _worker_in_this_process(probe, limit=_job_limit()):
        first = probe.delay(1, str(tmp_path / "job-1"))
        assert first_on_gpu.wait(120), "the worker did not take job 1"
        second = probe.delay(2, str(tmp_path / "job-2"))
        assert first.result(timeout=180) == 1 and second.result(timeout=180) == 2
    assert order == ["1 on the GPU", "1 left the GPU", "2 on the GPU", "2 left the GPU"], \
        f"the GPU must still serve one job at a time: {order}"


def test_a_job_reaches_only_workers_of_its_profile_and_says_so_when_none_runs(server, astronaut, tmp_path):
    """A UI user cannot make a worker load a second model, and a job for a profile no running worker serves is not
    failed by the first worker it meets: it is routed by profile, the run says at once that none serves it, and
    the job fails with that reason once worker_wait_timeout_s has passed."""
    worker = start_worker(server, tmp_path / "worker.log")
    env = dict(server, RECAST_WORKER_WAIT_TIMEOUT_S="10")
    try:
        wait_for(lambda: _advertised(server), 60, "the worker to advertise itself")
        proc = subprocess.run([str(BIN / "recast"), "edit", str(astronaut), "--prompt", "x", "--profile", "bf16",
                               "--steps", "2", "--seed", "1", "--storage", str(tmp_path / "s")], env=env,
                              capture_output=True, text=True, timeout=300)
        alive = worker.poll() is None
    finally:
        stop(worker)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "no running worker serves edit profile 'bf16' (running: edit tiny" in proc.stderr, proc.stderr[-2000:]
    assert "no worker took it in 10s" in proc.stderr, proc.stderr[-2000:]
    log = (tmp_path / "worker.log").read_text()
    assert alive and log.count("ready on") == 1 and "Received task run" not in log, \
        "the tiny worker must never be handed the bf16 job (nor load anything else)"


def test_a_flow_whose_workers_cannot_read_its_jobs_is_refused_before_anything_is_written(server, astronaut,
                                                                                        tmp_path):
    """Workers read task parameters from their PREFECT_HOME's storage: a flow with another home would submit jobs
    nobody can read (they hung silently). Refused at once, one line with the fix, no run folder."""
    worker = start_worker(server, tmp_path / "worker.log")
    (tmp_path / "other-home").mkdir()
    other = dict(server, PREFECT_HOME=str(tmp_path / "other-home"))
    try:
        wait_for(lambda: _advertised(server), 60, "the worker to advertise itself")
        proc = subprocess.run([str(BIN / "recast"), "edit", str(astronaut), "--prompt", "x", "--steps", "2", "--seed",
                               "1", "--storage", str(tmp_path / "s")], env=other, capture_output=True, text=True,
                              timeout=300)
    finally:
        stop(worker)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "same PREFECT_HOME" in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists(), "a refused run must write nothing"


def _advertised(env) -> bool:
    code = ("from recast.flows import fleet; import sys; "
            "sys.exit(0 if any(w['serves'].get('edit') == 'tiny' for w in fleet.running_workers()) else 1)")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60).returncode == 0


def test_worker_refuses_the_ephemeral_api(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run([str(BIN / "recast"), "worker", "edit"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "PREFECT_API_URL" in proc.stderr, proc.stderr


@pytest.mark.parametrize("take_next", ["after_gpu", "on_gpu"])
def test_killed_worker_is_replaced_and_the_run_completes_with_each_edit_once(server, astronaut, tmp_path, take_next):
    # on_gpu: the worker also holds the next edit, acknowledged and waiting for the GPU, when it is killed.
    env = dict(server, RECAST_WORKER_HEARTBEAT_TIMEOUT_S="15", RECAST_WORKER_TAKE_NEXT=take_next)
    worker = start_worker(env, tmp_path / "w1.log")
    root = tmp_path / "store"
    args = [str(BIN / "recast"), "edit", str(astronaut), "--prompt", "Neo, black leather trench coat",
            "--steps", "25", "--width", "384", "--height", "384", "--storage", str(root), "--json",
            "--seed", "11", "--seed", "12", "--seed", "13", "--seed", "14"]
    run = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Killed while it works on an edit: a job beating whose result is not written yet.
        wait_for(lambda: list(root.glob("runs/*/edits/*.png")) and _busy_on(root), 180,
                 "the worker to be on its second edit")
        kill(worker)
        replacement = start_worker(env, tmp_path / "w2.log")
        replaced_at = time.monotonic()
        try:
            out, err = run.communicate(timeout=300)
        finally:
            stop(replacement)
    finally:
        if run.poll() is None:
            run.kill()
    finished_after = time.monotonic() - replaced_at
    assert run.returncode == 0, err[-2000:]
    manifest = json.loads(out)
    assert [e["seed"] for e in manifest["edits"]] == [11, 12, 13, 14], "each edit must be recorded exactly once"
    assert all(e["status"] == "succeeded" for e in manifest["edits"]), [e["error"] for e in manifest["edits"]]
    pngs = sorted(p.name for p in root.glob("runs/*/edits/*.png"))
    assert len(pngs) == 4 == len(set(pngs)), pngs
    print(f"the run finished {finished_after:.0f}s after the new worker started")  # a measurement, not a bound
    # The edit the dead worker held is either taken up again by the new worker (the server re-queues a run its
    # worker never acknowledged) or given up and submitted again: the manifest shows which.
    retried = [e for e in manifest["edits"] if len(e["submissions"]) > 1
               or len(e["submissions"][0]["workers"]) > 1]
    assert retried, "the manifest must record the edit the dead worker held: " + json.dumps(
        [e["submissions"] for e in manifest["edits"]])


def test_a_worker_whose_serving_process_dies_starts_it_again_and_the_run_completes(server, astronaut, tmp_path):
    """worker_respawns (#22): the process that serves dies mid-run (a CUDA fault, the OOM killer). The worker's
    parent, which imported the libraries once, starts it again: the run completes with each edit once, on the same
    worker. A second death beyond worker_respawns (1 here) ends the worker with exit 1 and nothing left running."""
    env = dict(server, RECAST_WORKER_HEARTBEAT_TIMEOUT_S="15", RECAST_WORKER_RESPAWNS="1")
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    root = tmp_path / "store"
    args = [str(BIN / "recast"), "edit", str(astronaut), "--prompt", "Neo, black leather trench coat",
            "--steps", "25", "--width", "384", "--height", "384", "--storage", str(root), "--json",
            "--seed", "21", "--seed", "22", "--seed", "23", "--seed", "24"]
    run = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    serving = []
    try:
        serving.append(serving_process(log, 1))
        wait_for(lambda: list(root.glob("runs/*/edits/*.png")) and _busy_on(root), 180,
                 "the worker to be on its second edit")
        os.kill(serving[0], signal.SIGKILL)
        serving.append(wait_for(lambda: serving_process(log, 2, worker), 180, "the serving process to start again"))
        out, err = run.communicate(timeout=300)
        assert worker.poll() is None, f"the worker must live on: {log.read_text()[-2000:]}"
        os.kill(serving[1], signal.SIGKILL)  # a second death: more than worker_respawns
        code = worker.wait(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
        if worker.poll() is None:
            stop(worker)
    text = log.read_text()
    assert run.returncode == 0, err[-2000:]
    manifest = json.loads(out)
    assert [e["seed"] for e in manifest["edits"]] == [21, 22, 23, 24], "each edit must be recorded exactly once"
    assert all(e["status"] == "succeeded" for e in manifest["edits"]), [e["error"] for e in manifest["edits"]]
    assert len(list(root.glob("runs/*/edits/*.png"))) == 4, "each edit once"
    assert f"serving process {serving[0]} died (killed by SIGKILL)" in text and "starting it again" in text, text[-3000:]
    assert text.count("libraries imported") == 1 and text.count("ready on") == 2, \
        f"the libraries are imported once, the pipeline loaded by each serving process: {text[-3000:]}"
    respawned = re.search(r"ready on .* after a ([\d.]+)s cold start \(([\d.]+)s since it was started again", text)
    assert respawned, f"the serving process started again must say so: {text[-3000:]}"
    print(f"the serving process was ready {respawned.group(2)}s after it was started again")  # a measurement
    assert code == 1 and "giving up" in text, f"a death beyond worker_respawns must end the worker ({code}): {text}"
    for pid in serving:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def serving_process(log: Path, nth: int = 1, worker: subprocess.Popen | None = None) -> int | None:
    """The pid of the nth serving process the worker's parent started (None while there is none): the process that
    runs the jobs, which manifests and advertisements name."""
    if worker is not None and worker.poll() is not None:
        raise AssertionError(f"the worker exited ({worker.returncode}): {log.read_text()[-2000:]}")
    started = re.findall(r"serving process (\d+) started", log.read_text())
    return int(started[nth - 1]) if len(started) >= nth else None


def _busy_on(root: Path) -> list[Path]:
    """Jobs a worker is working on right now: beating, without a result yet."""
    return [beat for beat in root.glob("runs/*/.jobs/*.heartbeat")
            if not beat.with_name(beat.name.removesuffix(".heartbeat") + ".result.json").exists()]


def test_a_worker_refuses_jobs_from_other_code(memory_root, astronaut):
    from recast.tasks import storage
    from recast.tasks.edit import edit_image
    from recast.tasks.schemas.jobs import EditJob
    from recast.tasks.version import VersionMismatch

    uri = storage.join(memory_root, "in.png")
    storage.write_bytes(uri, astronaut.read_bytes())
    job = EditJob(edit_id="x", profile="tiny", inputs=[uri], prompt="x", negative_prompt=" ", seed=1, steps=1,
                  true_cfg_scale=1.0, width=64, height=64, output=storage.join(memory_root, "x.png"),
                  code_version="000000000000")
    with pytest.raises(VersionMismatch, match="deploy the same recast version"):
        edit_image(job)
    assert not storage.exists(storage.join(memory_root, "x.png"))


@pytest.fixture(scope="module")
def deployed(server, tmp_path_factory):
    """deployments/prefect.yaml deployed to the server, a process worker for flow runs and an edit task worker."""
    repo = Path(__file__).resolve().parent.parent
    work = tmp_path_factory.mktemp("deployed")
    root = work / "store"
    (root / "uploads").mkdir(parents=True)
    (root / "uploads" / "astronaut.png").write_bytes((repo / "tests" / "data" / "astronaut.png").read_bytes())
    env = dict(server, RECAST_ROOT=str(repo), RECAST_STORAGE_ROOT=str(root), RECAST_INCOMING=f"file://{root}/uploads",
               PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="2")
    prefect = str(BIN / "prefect")
    subprocess.run([prefect, "work-pool", "create", "recast-flows", "--type", "process"], env=env, check=True,
                   capture_output=True, timeout=120)
    deploy = subprocess.run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-2000:]
    pool = subprocess.Popen([prefect, "worker", "start", "--pool", "recast-flows"], env=env,
                            stdout=open(work / "pool.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    worker = start_worker(env, work / "worker.log")
    try:
        yield {"env": env, "root": root, "upload": f"file://{root}/uploads/astronaut.png"}
    finally:
        stop(worker)
        end_process_group(pool, grace_s=2)  # the flow worker has nothing left to finish


def test_deploy_from_prefect_yaml_then_run_from_the_api(deployed, astronaut):
    script = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
with get_client(sync_client=True) as client:
    schema = client.read_deployment_by_name("recast-edit/edit").parameter_openapi_schema
    batch = client.read_deployment_by_name("recast-batch/batch")
    limit = batch.global_concurrency_limit.limit if batch.global_concurrency_limit else batch.concurrency_limit
results = {"schema": schema, "batch_limit": limit}
for name, images in (("ok", [sys.argv[1]]), ("refused", [sys.argv[2]])):
    run = run_deployment("recast-edit/edit", timeout=240, parameters={"request": {
        "images": images, "prompts": ["James Bond 007, tuxedo, casino, cinematic lighting"], "seeds": [7],
        "steps": 2}})
    results[name] = {"state": run.state.type.value, "message": run.state.message}
print(json.dumps(results))
"""
    before = set(deployed["root"].glob("runs/*/manifest.json"))
    proc = subprocess.run([sys.executable, "-c", script, deployed["upload"], str(astronaut)], env=deployed["env"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    definitions = results["schema"].get("definitions") or results["schema"].get("$defs")
    fields = definitions["EditRequest"]["properties"]
    assert "identity reference" in fields["images"]["description"], "the UI form must show field descriptions"
    assert fields["steps"]["anyOf"][0]["maximum"] == 100, "the UI form must carry the bounds"
    for name in ("profile", "video_profile", "template", "storage_root"):
        options = [o for o in fields[name]["anyOf"] if o.get("type") == "string"]
        assert options and options[0].get("enum"), f"the UI form must offer {name} as a list of configured choices"
    assert "tiny" in next(o for o in fields["profile"]["anyOf"] if o.get("type") == "string")["enum"]
    assert results["batch_limit"] == 1, "the scheduled batch deployment must run one at a time"
    assert results["ok"]["state"] == "COMPLETED", results["ok"]
    assert len(set(deployed["root"].glob("runs/*/manifest.json")) - before) == 1, "the run must write its manifest"
    assert results["refused"]["state"] == "FAILED", "a UI run must not read a local path outside the roots"


def test_crafted_plan_and_handoff_files_sent_through_the_api_write_nothing_outside_the_roots(deployed, tmp_path):
    """A UI or API user who can put files under a storage root crafts a plan.json to resume and a handoff.json to
    animate into, whose run ids lead out of the roots (and names a plan.json outside them): each run is refused,
    and nothing is written outside the roots. A request with credentials in a URI is refused when the run is
    created, so the server never stores the secret."""
    root, upload = deployed["root"], deployed["upload"]
    outside = tmp_path / "outside"
    (outside / "evil").mkdir(parents=True)
    escape = os.path.relpath(outside / "escaped", root / "runs")  # ../../.. from <root>/runs to outside/escaped
    request = {"images": [upload], "prompts": ["James Bond 007, tuxedo"], "seeds": [1], "steps": 1}
    plan = {"created_at": "2026-01-01T00:00:00.000+00:00", "request": request, "seeds": [1], "inputs": [upload]}
    crafted_id = "20260101-000000-c0ffee"
    (root / "runs" / crafted_id).mkdir(parents=True)
    (root / "runs" / crafted_id / "plan.json").write_text(json.dumps(dict(plan, run_id=escape)))
    (outside / "evil" / "plan.json").write_text(json.dumps(dict(plan, run_id=escape)))
    handoff = {"frame": upload, "motion_prompt": "he smiles", "width": 96, "height": 64, "num_frames": 5, "fps": 8,
               "seed": 1, "run_id": escape}
    (root / "uploads" / "handoff.json").write_text(json.dumps(handoff))
    before = sorted(p.relative_to(tmp_path) for p in outside.rglob("*"))
    script = """
import json, sys, time
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
request, root, outside = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
runs = {
    "resume id, plan.json leading out": ("recast-edit/edit", {"request": request, "resume": sys.argv[4]}),
    "resume folder outside the roots": ("recast-edit/edit", {"request": request, "resume": outside + "/evil"}),
    "handoff leading out": ("recast-animate/animate", {"request": {"handoff": root + "/uploads/handoff.json",
                                                                   "into_edit_run": True}}),
}
ids = {name: run_deployment(deployment, parameters=parameters, timeout=0).id
       for name, (deployment, parameters) in runs.items()}
results = {}
try:
    run_deployment("recast-edit/edit", timeout=0, parameters={"request": dict(
        request, images=["s3://AKIAEXAMPLE:topsecret@bucket/me.png"])})
    results["credentials"] = "created"
except Exception as exc:
    results["credentials"] = f"refused: {type(exc).__name__}"
deadline = time.monotonic() + 300
with get_client(sync_client=True) as client:
    while time.monotonic() < deadline:
        states = {name: client.read_flow_run(run_id).state for name, run_id in ids.items()}
        if all(state.is_final() for state in states.values()):
            break
        time.sleep(1)
    results.update({name: [state.type.value, state.message] for name, state in states.items()})
    stored = [run.parameters for run in client.read_flow_runs()]
results["secret stored"] = "topsecret" in json.dumps(stored)
print(json.dumps(results))
"""
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(request), str(root), str(outside), crafted_id],
                          env=deployed["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    written = sorted(p.relative_to(tmp_path) for p in outside.rglob("*"))
    assert written == before, f"runs from the API wrote outside the storage roots: {set(written) - set(before)}"
    assert results["resume id, plan.json leading out"][0] == "FAILED", results
    assert "plan.json" in results["resume id, plan.json leading out"][1], results
    assert results["resume folder outside the roots"][0] == "FAILED", results
    assert "by its id" in results["resume folder outside the roots"][1], results
    assert results["handoff leading out"][0] == "FAILED" and "handoff.run_id" in results["handoff leading out"][1], \
        results
    assert results["credentials"].startswith("refused"), "a request with credentials in a URI must not be created"
    assert not results["secret stored"], "the Prefect server stored a request's credentials"


# Every wait in the browser test is for a condition, with room for a machine busy with other work (the test once
# failed under load with shorter waits): a slow machine waits longer, a fast one does not wait at all.
UI_WAIT_S = 180
UI_WAIT_MS = UI_WAIT_S * 1000
SUBMIT_RETRY_S = 90


def _chromium() -> str | None:
    for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if os.path.exists(path):
            return path
    return None


def test_ui_form_starts_a_run_and_shows_its_results_table(deployed, tmp_path):
    """As a user: open the edit deployment's run form, read its fields, start a run, see the results table."""
    browser_path = _chromium()
    if browser_path is None or not _has_playwright():
        if os.environ.get("CI"):
            raise AssertionError("CI must install Debian's chromium and the playwright package (see .ci/run)")
        pytest.skip("needs Debian's chromium and the playwright package")
    from playwright.sync_api import sync_playwright

    api = deployed["env"]["PREFECT_API_URL"]
    ui = api.removesuffix("/api")
    deployment_id = _api(api, "deployments/name/recast-edit/edit")["id"]
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            # 1. The run form renders the request model: field names, descriptions, bounds.
            page.set_default_timeout(UI_WAIT_MS)
            page.goto(f"{ui}/deployments/deployment/{deployment_id}/run", wait_until="networkidle")
            page.get_by_text("Images", exact=True).wait_for(timeout=UI_WAIT_MS)
            page.screenshot(path=str(shots / "1-form.png"), full_page=True)
            body = page.inner_text("body")
            for text in ("1-3 input photos (local path or fsspec URI). The first is the identity reference.",
                         "Denoising steps", "Re-run an edit with a new seed until its identity grade reaches this."):
                assert text in body, f"the run form does not show {text!r}"
            # 2. Fill it in as a user would and submit.
            add = page.get_by_role("button", name="Add item")
            boxes = page.locator("textarea")
            before = boxes.count()  # Identity Notes is a textarea too; list items appear above it, in order
            add.nth(0).click()  # Images
            wait_for(lambda: boxes.count() == before + 1, UI_WAIT_S, "an Images item")
            add.nth(1).click()  # Prompts
            wait_for(lambda: boxes.count() == before + 2, UI_WAIT_S, "a Prompts item")
            prompt = "Tech CEO on stage, wearing a dark blazer, conference backdrop, blue lighting"
            boxes.nth(0).fill(deployed["upload"])
            boxes.nth(1).fill(prompt)
            assert (boxes.nth(0).input_value(), boxes.nth(1).input_value()) == (deployed["upload"], prompt)
            page.screenshot(path=str(shots / "2-filled.png"), full_page=True)
            started = time.time()
            page.keyboard.press("Tab")  # leave the prompt's box before submitting, as a user's pointer would
            submit = page.get_by_role("button", name="Submit")
            submit.click()

            # The UI validates the parameters against the server, creates the run, then leaves the form. Once, in a
            # full suite on a busy 2-core machine, it stayed on the form for 180 s after the click (no screenshot
            # of why): the run having been created counts as submitted too, and a form still showing after
            # SUBMIT_RETRY_S with no run is clicked again, as a user would, with its page kept for the record.
            def submitted():
                return (not page.url.rstrip("/").endswith("/run")
                        or _newest_run(api, deployment_id, started) is not None)

            try:
                wait_for(submitted, SUBMIT_RETRY_S, "the form to submit")
            except AssertionError:
                page.screenshot(path=str(tmp_path / "submit-stuck.png"), full_page=True)
                submit.click()
                try:
                    wait_for(submitted, UI_WAIT_S, "the form to submit")
                except AssertionError:
                    raise AssertionError("the run form did not start a run after two clicks on Submit; the page "
                                         f"shows: {page.inner_text('body')[:1500]!r}") from None
            page.screenshot(path=str(shots / "3-submitted.png"))
            run = wait_for(lambda: _newest_run(api, deployment_id, started), UI_WAIT_S, "the run the form created")
            # 3. The run's page: it completes and its Artifacts tab shows the results table.
            page.goto(f"{ui}/runs/flow-run/{run['id']}", wait_until="networkidle")
            wait_for(lambda: _reload_until(page, "Completed"), 2 * UI_WAIT_S, "the run to show Completed")
            page.screenshot(path=str(shots / "4-completed.png"))
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("recast-edit-results").first.wait_for(timeout=UI_WAIT_MS)
            page.screenshot(path=str(shots / "5-artifacts.png"), full_page=True)
            page.get_by_text("recast-edit-results").first.click()
            page.get_by_text("prompt theme").first.wait_for(timeout=UI_WAIT_MS)
            page.screenshot(path=str(shots / "6-results-table.png"), full_page=True)
            table = page.inner_text("body")
            assert "Tech CEO on stage" in table and "succeeded" in table, "the results table lacks the edit"
        finally:
            browser.close()
    assert len(list(shots.glob("*.png"))) == 6


def _has_playwright() -> bool:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return True


def _api(api: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{api}/{path}", data=data, headers={"content-type": "application/json"},
                                     method="POST" if body is not None else "GET")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _newest_run(api: str, deployment_id: str, since: float):
    runs = _api(api, "flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}},
                                          "sort": "EXPECTED_START_TIME_DESC", "limit": 5})
    from datetime import datetime

    fresh = [r for r in runs if datetime.fromisoformat(r["created"].replace("Z", "+00:00")).timestamp() >= since - 5]
    return fresh[0] if fresh else None


def _reload_until(page, text: str) -> bool:
    page.reload(wait_until="networkidle", timeout=UI_WAIT_MS)
    page.wait_for_timeout(1000)
    header = page.inner_text("body")[:2000]
    if "Failed" in header or "Crashed" in header:
        raise AssertionError(f"the run did not complete: {header[:500]}")
    return text in header


def test_deployment_handoff_runs_the_video_stage_on_its_own_workers(deployed, tmp_path):
    """handoff.mode=deployment: the edit flow triggers the animate deployment (its own pool) and records it."""
    env = dict(deployed["env"], RECAST_HANDOFF__MODE="deployment")
    log = tmp_path / "animate-worker.log"
    animate_worker = subprocess.Popen([str(BIN / "recast"), "worker", "animate"], env=env, stdout=open(log, "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "Subscribing to runs" in log.read_text(), 120, "the animate worker")
        manifest = edit(env, deployed["root"] / "uploads" / "astronaut.png", deployed["root"], [21])
    finally:
        stop(animate_worker)
    animation = manifest["animation"]
    assert animation["mode"] == "deployment" and animation.get("deployment") == "recast-animate/animate", animation
    assert animation["status"] == "completed", animation
    clips = list(deployed["root"].glob("runs/*/clips/clip-01.mp4"))
    assert clips, "the animate deployment run wrote no clip"


SERVE_AFTER_IMPORTS = """
import sys, torch
from recast.flows import respawn
respawn.supervise(lambda: torch._C._cuda_getDeviceCount() if sys.argv[1] == "asks-cuda" else None, respawns=1,
                  uses_cuda=True)
print("serving in", "a forked process" if respawn.forked_at else "the worker's first process", flush=True)
sys.exit(3 if torch.cuda._is_in_bad_fork() else 0)
"""


@pytest.mark.parametrize("imports", ["asks-cuda", "leaves-cuda"])
def test_the_serving_process_can_always_use_the_gpu_whatever_the_imports_touched(imports):
    """On a card the libraries the worker's parent imports ask CUDA for its devices (cudaGetDeviceCount), and torch
    then refuses CUDA in every process forked afterwards ("Cannot re-initialize CUDA in forked subprocess": the first
    respawning worker on an H200 failed so). The worker must notice and serve from its first process; imports that
    leave CUDA alone still give a forked, respawnable serving process."""
    proc = subprocess.run([sys.executable, "-c", SERVE_AFTER_IMPORTS, imports], capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"the serving process could not use CUDA (exit {proc.returncode}): {out[-2000:]}"
    if imports == "asks-cuda":
        assert "serving in the worker's first process" in out and "without a respawning parent" in out, out[-2000:]
    else:
        assert "serving in a forked process" in out and "serving process" in out, out[-2000:]


def test_a_stop_raised_inside_nested_task_groups_ends_the_worker_cleanly_and_a_real_error_still_fails_it():
    """TERM at a task worker's start lands inside its task groups (nested: Prefect's, then asyncio's or anyio's):
    CI once saw `recast worker: failed: ExceptionGroup: unhandled errors in a TaskGroup` and exit 1 for it."""
    import asyncio

    from prefect.task_worker import StopTaskWorker

    from recast.flows.workers import _serve_until_stopped

    def nested(error: BaseException):
        async def serve() -> None:
            async def fail() -> None:
                raise error

            async with asyncio.TaskGroup() as outer:
                async def inner_group() -> None:
                    async with asyncio.TaskGroup() as inner:
                        inner.create_task(fail())
                outer.create_task(inner_group())
        return serve

    _serve_until_stopped(nested(StopTaskWorker()))  # must return: the worker was asked to stop
    with pytest.raises(BaseExceptionGroup) as raised:
        _serve_until_stopped(nested(ValueError("the websocket broke")))
    leaves = []
    stack = [raised.value]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    assert [type(exc) for exc in leaves] == [ValueError], \
        f"a real error inside the task groups must fail the worker with it alone, got {leaves}"


@pytest.mark.parametrize("to", ["the worker", "its process group"])
def test_a_worker_asked_to_stop_ends_cleanly_with_exit_0(server, tmp_path, to):
    """An operator, a container runtime or `recast serve` stops a worker with TERM, to its pid or its whole process
    group: it stops serving and exits 0 without an error (a supervisor reads anything else as a crash and restarts
    it, or reports it failed)."""
    log = tmp_path / "worker.log"
    worker = start_worker(server, log)
    try:
        (os.killpg if to == "its process group" else os.kill)(worker.pid, signal.SIGTERM)
        code = worker.wait(timeout=120)
    finally:
        if worker.poll() is None:
            kill(worker)
    text = log.read_text()
    assert code == 0 and "failed" not in text and "Traceback" not in text, \
        f"TERM to {to} must end the worker cleanly (exit {code}): {text[-3000:]}"
