"""How a flow runs its GPU tasks: in its own process (`local`) or on long-lived task workers (`workers`).

The flows are the same in both modes; only this step differs. In `workers` mode the task's parameters and result
travel through Prefect's result storage (shared by flow and workers), so only small jobs and URIs cross.

A flow hands over *chains*: generators that yield a job, receive its Outcome, and may yield another (an edit
retried with a new seed until its identity target is met), returning what they made of it. `run_chains` drives
them: one after another in `local` mode (one pipeline in this process), fanned out in `workers` mode, at most
`worker_in_flight` jobs submitted at once, all from the flow's own thread, gathered as they finish.

Guardrails for task workers (README, "Workers"):
- The flow watches each job by polling, not by waiting for an event: the job's result file, its heartbeat and its
  Prefect state (see recast.tasks.lifecycle). A restart of the Prefect server loses nothing: finished work is
  found in storage, and jobs that were still queued (the server keeps its queue in memory) are submitted again
  once it is back.
- A job is given up when its worker stops beating (`worker_heartbeat_timeout_s`: the worker died) or when it has
  *run* longer than its stage's limit (`edit_timeout_s`, `animate_timeout_s`; time spent queued does not count).
  The given-up task run is marked cancelled (a worker still on it stops at its next denoising step) and the job
  is submitted again, up to `worker_resubmits` times. Every submission is recorded in the Outcome.
- Every job carries the flow's code version; a worker running other code refuses it.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from prefect import Task

from recast.tasks import lifecycle, storage
from recast.tasks.settings import get_settings
from recast.tasks.version import code_version

log = logging.getLogger("recast.execution")
# A flow looks for its jobs' result files every POLL_S in a bucket (a finished job shows there first), and asks the
# Prefect server for their states (and reads their heartbeats) only every `worker_poll_s` (2 s): every flow run of a
# stream polls the one shared server. What the server's states tell (a failed, lost or never-taken task run) is the slow
# path; a second more to notice it costs nobody a result.
POLL_S = 0.5
# Where the results are on this machine's disk (recast's default storage), a look is one failed open (~20 us), so a
# flow looks every LOCAL_POLL_S: a job's end is noticed 0.025 s after it on average instead of 0.25 s, and a
# photo-to-clip run through task workers waits on two jobs. Buckets keep POLL_S: there each look is a request.
LOCAL_POLL_S = 0.05
MISSING_POLLS = 3  # server looks in a row (6 s at worker_poll_s 2) not knowing a task run before it counts as gone

Chain = Generator[Any, "Outcome", Any]


@dataclass
class Outcome:
    """What became of one job: its result, or why there is none, and every submission it took."""

    result: Any = None
    message: str | None = None
    submissions: list[dict] = field(default_factory=list)


def single(job: Any) -> Chain:
    """A chain of one job; returns its Outcome."""
    outcome = yield job
    return outcome


def run_task(task: Task, job: Any, stage: str = "edit") -> Outcome:
    """Run one job and wait for it. Never raises for a task's failure: the reason comes back instead."""
    return next(run_chains(task, [single(job)], stage))[1]


def run_chains(task: Task, chains: Iterable[Chain], stage: str = "edit") -> Iterator[tuple[int, Any]]:
    """Drive every chain to its end; yields (index, what the chain returned) as each finishes."""
    settings = get_settings()
    chains = list(chains)
    if settings.execution == "local":
        for index, chain in enumerate(chains):
            yield index, _drive_locally(task, chain)
        return
    limit = settings.edit_timeout_s if stage == "edit" else settings.animate_timeout_s
    queue = list(enumerate(chains))
    active: list[_Watch] = []
    last_look = float("-inf")  # when the server was last asked
    while queue or active:
        while queue and len(active) < settings.worker_in_flight:
            index, chain = queue.pop(0)
            try:
                job = next(chain)
            except StopIteration as done:  # nothing left to run (a resumed run's recorded attempts)
                yield index, done.value
                continue
            active.append(_Watch(task, index, chain, job, limit, settings))
        last_look = _look(active, last_look, settings.worker_poll_s)
        for watch in list(active):
            if watch.outcome is None:
                continue
            try:
                job = watch.chain.send(watch.outcome)
            except StopIteration as done:
                active.remove(watch)
                yield watch.index, done.value
                continue
            active[active.index(watch)] = _Watch(task, watch.index, watch.chain, job, limit, settings)
        if active and all(watch.outcome is None for watch in active):
            time.sleep(_between_looks(active))


def _between_looks(watches: list[_Watch]) -> float:
    """How long a flow waits before it looks at its jobs' result files again: LOCAL_POLL_S when every one is on
    this machine's disk, else POLL_S."""
    controls = [watch.job.control for watch in watches if getattr(watch.job, "control", None)]
    return LOCAL_POLL_S if controls and all(storage.scheme_of(c) == "file" for c in controls) else POLL_S


def _drive_locally(task: Task, chain: Chain) -> Any:
    try:
        job = next(chain)
    except StopIteration as done:
        return done.value
    while True:
        outcome = _finished_before(job) or _adopted(task, job)
        if outcome is None or outcome.result is None and outcome.message is None:
            earlier = outcome.submissions if outcome else []
            state = task(job, return_state=True)
            # _sync: inside an async flow (recast.flows.runs.blocking) Prefect would hand back a coroutine.
            outcome = (Outcome(result=state.result(raise_on_failure=False, _sync=True)) if state.is_completed()
                       else Outcome(message=state.message or state.type.value))
            outcome.submissions = earlier + ([{"submission": len(earlier) + 1, "outcome": "ran in this process"}]
                                             if earlier else [])
        try:
            job = chain.send(outcome)
        except StopIteration as done:
            return done.value


def _finished_before(job: Any) -> Outcome | None:
    """A job whose result is already in storage (it finished after its flow's process died): not run again. The
    result must be this job's (its output where the job writes it); the submission records who made it."""
    found = lifecycle.read_result(job.control) if getattr(job, "control", None) else None
    if found is None:
        return None
    record, made_by = found
    try:
        result = type(job).result_type().model_validate(record)
    except ValueError:
        return None  # not a result recast wrote: the job runs again
    if getattr(result, "output", None) != job.output:
        return None
    return Outcome(result=result, submissions=[{"submission": 1, "outcome": "found finished",
                                                "task_run_id": made_by.get("task_run_id"),
                                                "workers": [made_by["worker"]] if made_by.get("worker") else []}])


def _adopted(task: Task, job: Any) -> Outcome | None:
    """A job the run's earlier process had submitted to a task worker (a run resumed in local mode): wait for that
    task run instead of computing the job a second time here. Its Outcome, or one without result or message when
    it is lost (its worker died, its task run is gone): then it runs here, and its submissions say so."""
    if not getattr(job, "control", None) or lifecycle.read_submission(job.control) is None:
        return None
    settings = get_settings()
    limit = settings.edit_timeout_s if getattr(job, "edit_id", None) else settings.animate_timeout_s
    watch = _Watch(task, 0, None, job, limit, settings, may_submit=False)
    last_look = float("-inf")
    while watch.outcome is None:
        last_look = _look([watch], last_look, settings.worker_poll_s)
        if watch.outcome is None:
            time.sleep(POLL_S)
    return watch.outcome


class _Watch:
    """One job on the task workers: its submissions and what the flow has seen of the current one."""

    def __init__(self, task: Task, index: int, chain: Chain | None, job: Any, run_limit_s: float, settings,
                 may_submit: bool = True):
        self.task, self.index, self.chain, self.run_limit_s = task, index, chain, run_limit_s
        self.heartbeat_timeout_s, self.resubmits = settings.worker_heartbeat_timeout_s, settings.worker_resubmits
        self.wait_limit_s = settings.worker_wait_timeout_s
        # may_submit=False: only watch an adopted task run (a resumed run in local mode runs a lost job itself).
        self.may_submit = may_submit
        self.job = job.model_copy(update={"code_version": code_version()})
        self.result_type = type(job).result_type()
        self.outcome: Outcome | None = None
        self.submissions: list[dict] = []
        self.run_id: str | None = None
        self.submitted = 0.0
        self.server_went_away = False
        self.found_server_away = False  # its submission could not reach the server (_share_server_away)
        self.adopted = False
        self.missing_polls = 0  # polls in a row at which the server did not know the task run
        self.workers: list[str] = []  # the workers seen running the current submission (host:pid)
        self.outcome = _finished_before(self.job)
        if self.outcome is None:
            # A job a dead flow process had submitted is adopted, not submitted twice (a resumed run).
            self.run_id = lifecycle.read_submission(self.job.control)
            if self.run_id is not None:
                self.submitted, self.adopted = time.monotonic(), True
                log.warning("%s: waiting for task run %s, submitted before this run's process died",
                            self._name(), self.run_id)
            elif may_submit:
                self._submit()

    def look_for_result(self) -> None:
        """The cheap look, between two of the server's: has the job's result been written?"""
        if self.outcome is None and self.run_id is not None:
            found = lifecycle.read_result(self.job.control)
            if found is not None:
                self._finish("completed", self.result_type.model_validate(found[0]), found[1])

    def _submit(self) -> None:
        try:
            self.run_id = str(self.task.delay(self.job).task_run_id)
            self.submitted, self.server_went_away = time.monotonic(), False
            lifecycle.record_submission(self.job.control, self.run_id)
        except Exception as exc:  # noqa: BLE001 - the server is away: submit again at the next poll
            log.warning("could not submit %s yet: %s", self._name(), exc)
            self.run_id = None
            self.found_server_away = _unreachable(exc)

    def _served_as(self) -> str:
        profile = getattr(self.job, "profile", None)
        return f"edit profile '{profile}'" if profile else f"video profile '{getattr(self.job, 'video_profile', '?')}'"

    def _name(self) -> str:
        return getattr(self.job, "edit_id", None) or getattr(self.job, "clip_id", "job")

    def observe(self, state, api_ok: bool) -> None:
        """One look at the job: its result file, its heartbeat, its Prefect state (None when unreadable)."""
        if self.run_id is None:
            self._submit()
            return
        self.look_for_result()
        if self.outcome is not None:
            return
        if not api_ok:
            self.server_went_away = True
            return
        if state is not None and state.is_final():
            if state.is_completed():
                found = lifecycle.read_result(self.job.control)
                return self._finish("completed", state.result(raise_on_failure=False, _sync=True) if found is None
                                    else self.result_type.model_validate(found[0]), found and found[1])
            return self._finish("failed", state.message or state.type.value)
        # The server answered but does not know the task run (a worker that could not read its parameters deletes
        # it): nothing will ever finish it. A few polls in a row, so a run the server is still creating is not lost.
        self.missing_polls = self.missing_polls + 1 if state is None else 0
        if self.missing_polls >= MISSING_POLLS:
            return self._lost("its task run no longer exists on the Prefect server")
        beat = lifecycle.read_heartbeat(self.job.control)
        now = time.time()
        if beat is not None and beat.get("task_run_id") == self.run_id:
            worker = f"{beat.get('host')}:{beat.get('pid')}"
            if worker not in self.workers:  # a run whose worker died may be taken up again by another
                self.workers.append(worker)
            if now - beat["at"] > self.heartbeat_timeout_s:
                return self._lost(f"its worker stopped beating {now - beat['at']:.0f}s ago (worker gone)")
            if now - beat["started"] > self.run_limit_s:
                return self._lost(f"it ran longer than {self.run_limit_s:.0f}s")
        elif state is not None and (state.is_running() or state.is_pending()):
            # A worker took it but never beat: it died between taking the run and starting the work.
            taken = state.timestamp.timestamp() if state.timestamp else now
            if now - taken > self.heartbeat_timeout_s:
                return self._lost(f"a worker took it {now - taken:.0f}s ago and never started it (worker gone)")
        elif self.server_went_away and (state is None or state.is_scheduled()):
            return self._lost("the Prefect server restarted before a worker took it (its queue lives in memory)")
        elif state is not None and state.is_scheduled() and time.monotonic() - self.submitted > self.wait_limit_s:
            return self._finish("failed", f"no worker took it in {self.wait_limit_s:.0f}s: no running worker serves "
                                f"{self._served_as()} (start one with that profile against this server)")

    def _finish(self, kind: str, detail: Any, made_by: dict | None = None) -> None:
        worker = (made_by or {}).get("worker")
        if worker and worker not in self.workers:  # a job that finished between two looks still names its worker
            self.workers.append(worker)
        self._note(kind, None if kind == "completed" else detail)
        self.outcome = Outcome(result=detail if kind == "completed" else None,
                               message=None if kind == "completed" else detail, submissions=self.submissions)

    def _note(self, kind: str, detail: str | None) -> None:
        entry = {"submission": len(self.submissions) + 1, "task_run_id": self.run_id, "outcome": kind,
                 "detail": detail, "seconds": round(time.monotonic() - self.submitted, 2),
                 "workers": list(self.workers)}
        if self.adopted:  # submitted by the run's earlier process, which died; this one waited for it
            entry["adopted"], self.adopted = True, False
        self.submissions.append(entry)
        self.workers = []

    def _lost(self, reason: str) -> None:
        self._note("lost", reason)
        lifecycle.cancel(self.job.control, self.run_id)
        _cancel_in_prefect(self.run_id, reason)
        again = self.may_submit and len(self.submissions) <= self.resubmits
        log.warning("task run %s (%s): %s; %s", self.run_id, self._name(), reason,
                    "submitting it again" if again else "giving up" if self.may_submit else "running it here")
        if not self.may_submit:
            lifecycle.forget_submission(self.job.control)
            self.outcome = Outcome(submissions=self.submissions)  # no result, no message: the caller runs it
            return
        if again:
            self._submit()
        else:
            self.outcome = Outcome(message=f"no worker finished it in {len(self.submissions)} submissions (last: "
                                   f"{reason}); is `recast worker` running against this server, with the same code "
                                   "version?", submissions=self.submissions)


def _unreachable(exc: BaseException) -> bool:
    """The server could not be reached at all (not listening: stopped or restarting), as opposed to an error it
    answered."""
    import httpx

    return isinstance(exc, (httpx.ConnectError, httpx.RemoteProtocolError, ConnectionError))


def _share_server_away(watches: list[_Watch]) -> None:
    """A submission that could not reach the server shows it was away then, and its queue (in memory) may be gone:
    every job submitted before is looked at as after a restart (lost if still queued once the server answers). The
    flow's own looks may miss the gap entirely, when it spent it in submissions that failed."""
    if any(watch.found_server_away for watch in watches):
        for watch in watches:
            watch.found_server_away = False
            if watch.outcome is None and watch.run_id is not None:
                watch.server_went_away = True


def _look(watches: list[_Watch], last_look: float, poll_s: float) -> float:
    """Look at every job still running: the server too when poll_s has passed since last_look (when it was last
    asked; returned, updated), else only their result files."""
    _share_server_away(watches)
    if not any(watch.outcome is None for watch in watches):
        return last_look
    if time.monotonic() - last_look >= poll_s:
        _poll_all(watches)
        return time.monotonic()
    for watch in watches:
        watch.look_for_result()
    return last_look


def _poll_all(watches: list[_Watch]) -> None:
    """One round of looks at every job still running, over one API connection."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    pending = [w for w in watches if w.outcome is None]
    try:
        # No client-side retries: a server that went away must show here, or its lost queue goes unnoticed.
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}), get_client(sync_client=True) as client:
            # One request for every job's state, however many are in flight: the server is shared by all runs.
            ids = [w.run_id for w in pending if w.run_id]
            runs = client.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=ids)),
                                         limit=len(ids)) if ids else []
            states = {str(run.id): run.state for run in runs}
        for watch in pending:
            watch.observe(states.get(watch.run_id) if watch.run_id else None, api_ok=True)
    except Exception:  # noqa: BLE001 - the server is away (restarting): look at storage alone
        for watch in pending:
            if watch.outcome is None:
                watch.observe(None, api_ok=False)


def _cancel_in_prefect(task_run_id: str, reason: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    try:
        with get_client(sync_client=True) as client:
            client.set_task_run_state(task_run_id, Cancelled(message=f"given up by its flow: {reason}"), force=True)
    except Exception as exc:  # noqa: BLE001 - best effort; the worker also sees the cancel marker
        log.warning("could not cancel task run %s: %s", task_run_id, exc)


def run_many(work: Callable[[Any], Any], items: Iterable[Any], in_flight: int = 1) -> Iterator[tuple[int, Any]]:
    """work(item) for every item, up to `in_flight` at once (threads: each item waits on task workers, it does not
    compute here); yields (index, result) as each finishes. For flows whose items are whole subflows, e.g. the
    batch's photos. Each thread runs in a copy of the caller's context, so a subflow knows its parent run."""
    items = list(items)
    if in_flight <= 1 or len(items) <= 1:
        for index, item in enumerate(items):
            yield index, work(item)
        return
    with ThreadPoolExecutor(max_workers=min(in_flight, len(items)), thread_name_prefix="recast-item") as pool:
        futures = {pool.submit(contextvars.copy_context().run, work, item): index for index, item in enumerate(items)}
        for future in as_completed(futures):
            yield futures[future], future.result()
