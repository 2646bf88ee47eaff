"""A job's life on a task worker, as the flow that waits for it sees it: through small files beside its outputs.

    <control>.submitted             written by the flow when it submits: which task run (a resumed flow adopts it)
    <control>.heartbeat             rewritten every few seconds while the job runs: which task run, since when
    <control>.result.json           the job's result, written atomically when it is done
    <control>.cancelled.<task run>  written by a flow that gave up on that task run: a worker that finds it does
                                    not start the job, or stops it at the next denoising step

Files rather than Prefect events because they survive a restart of the Prefect server and tell a job that is
running from one whose worker died: the flow reads them through the same storage both sides share. Jobs run in the
flow's own process (execution: local) have no control files.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

from recast.tasks import storage
from recast.tasks.errors import Permanent



class JobCancelled(Permanent, RuntimeError):
    """The flow gave up on this task run (and submitted the job again): its work is not wanted."""


def submitted_uri(control: str) -> str:
    return f"{control}.submitted"


def record_submission(control: str, task_run_id: str) -> None:
    storage.write_json(submitted_uri(control), {"task_run_id": task_run_id, "at": time.time()})


def read_submission(control: str) -> str | None:
    try:
        return json.loads(storage.read_bytes(submitted_uri(control)))["task_run_id"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


def heartbeat_uri(control: str) -> str:
    return f"{control}.heartbeat"


def result_uri(control: str) -> str:
    return f"{control}.result.json"


def cancelled_uri(control: str, task_run_id: str) -> str:
    return f"{control}.cancelled.{task_run_id}"


def _task_run_id() -> str:
    from prefect.runtime import task_run

    return str(task_run.id) if task_run.id else "local"


# The running job's heartbeat writer (set by `running`), for on_gpu to say the job's phase.
_BEAT: contextvars.ContextVar[Callable[..., None] | None] = contextvars.ContextVar("recast_beat", default=None)


@contextlib.contextmanager
def running(job) -> Iterator[Callable[[], bool]]:
    """Around a job's work on a worker: refuse a cancelled task run, beat while working; yields `should_stop`,
    which the pipeline checks between denoising steps."""
    control = getattr(job, "control", None)
    if control is None:
        yield lambda: False
        return
    run_id = _task_run_id()
    cancelled = cancelled_uri(control, run_id)
    if storage.exists(cancelled):
        raise JobCancelled(f"task run {run_id} was given up by its flow before it started")
    started = time.time()
    beat = {"task_run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started": started,
            "phase": "starting"}
    stop = threading.Event()

    def write(phase: str | None = None, write: bool = True) -> None:
        if phase:
            beat["phase"] = phase
        if write:
            storage.write_json(heartbeat_uri(control), dict(beat, at=time.time()))

    from recast.tasks.settings import get_settings

    every = get_settings().worker_heartbeat_s

    def beat_loop() -> None:
        while not stop.wait(every):
            with contextlib.suppress(Exception):  # a missed beat is a late beat, not a failure
                write()

    write()
    _signal("beating")  # from here a worker that dies is seen by the waiting flow (its beats stop)
    thread = threading.Thread(target=beat_loop, name="recast-heartbeat", daemon=True)
    thread.start()
    token = _BEAT.set(write)
    try:
        yield lambda: storage.exists(cancelled)
    finally:
        _BEAT.reset(token)
        stop.set()
        thread.join(timeout=5)


# One model call at a time per process (the edit and the video stage of a worker share the card), and the signals a
# task worker waits on before it takes its next job: the job has left the GPU, so its CPU work (PNG and mp4
# encoding, identity scoring, writes) goes on beside the next job's model call; or, with `worker_take_next:
# on_gpu`, the job holds the GPU, so the next one's delivery and setup go on beside its model call.
_GPU = threading.Lock()


@dataclasses.dataclass
class JobSignals:
    """What a task worker waits on for one of its jobs (set by the job's own thread)."""

    beating: threading.Event = dataclasses.field(default_factory=threading.Event)  # its first heartbeat is written
    on_gpu: threading.Event = dataclasses.field(default_factory=threading.Event)  # it holds the GPU
    left_gpu: threading.Event = dataclasses.field(default_factory=threading.Event)  # its model call is over


_SIGNALS: dict[str, JobSignals] = {}


def watch_job(task_run_id: str) -> JobSignals:
    """The signals of this task run's job (a worker, before it starts the run)."""
    return _SIGNALS.setdefault(task_run_id, JobSignals())


def forget_job(task_run_id: str) -> None:
    _SIGNALS.pop(task_run_id, None)


def _signal(name: str) -> None:
    signals = _SIGNALS.get(_task_run_id())
    if signals is not None:
        getattr(signals, name).set()


@contextlib.contextmanager
def on_gpu():
    """Around a job's model call: one at a time in this process; on leaving, the worker may take its next job. The
    job's heartbeat says which phase it is in (the next beat carries waiting / on the GPU; finishing is written at
    once, after the worker has been told)."""
    beat = _BEAT.get()
    try:
        if beat:
            beat("waiting for the GPU", write=False)
        with _GPU:
            _signal("on_gpu")
            if beat:
                beat("on the GPU", write=False)
            yield
    finally:
        _signal("left_gpu")
        if beat:
            with contextlib.suppress(Exception):  # a missed beat is a late beat
                beat("finishing")


def record_result(job, result) -> None:
    """The result, where the waiting flow finds it even if Prefect never tells it (server restarted, or the flow's
    process died and a resumed run finds it), with the task run and worker that made it."""
    control = getattr(job, "control", None)
    if control is not None:
        made_by = {"task_run_id": _task_run_id(), "worker": f"{socket.gethostname()}:{os.getpid()}"}
        storage.write_json(result_uri(control), dict(result.model_dump(), made_by=made_by))


def read_heartbeat(control: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(heartbeat_uri(control)))
    except (FileNotFoundError, ValueError):
        return None


def read_result(control: str) -> tuple[dict, dict] | None:
    """(the result's fields, who made it: {task_run_id, worker}), or None while there is no result."""
    try:
        record = json.loads(storage.read_bytes(result_uri(control)))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    made_by = record.pop("made_by", None)
    return record, made_by if isinstance(made_by, dict) else {}


def forget_submission(control: str) -> None:
    """A submission that is lost for good (its task run is gone): a later resume must not adopt it again."""
    storage.release(submitted_uri(control))


def cancel(control: str, task_run_id: str) -> None:
    storage.write_json(cancelled_uri(control, task_run_id), {"at": time.time()})


def stop_between_steps(should_stop):
    """A diffusers step callback that interrupts the denoising loop once `should_stop()` says so."""
    if should_stop is None:
        return None

    def callback(pipe, step, timestep, callback_kwargs):
        if should_stop():
            pipe._interrupt = True  # diffusers' own flag: the remaining steps are skipped
        return callback_kwargs

    return callback
