"""How a flow runs its GPU tasks: in its own process (`local`) or on long-lived task workers (`workers`).

The flows are the same in both modes; only this submission step differs. In `workers` mode the task's
parameters and result travel through Prefect's result storage (shared by flow and workers), so only small
jobs and URIs cross, never images.

Guardrails for task workers (see README, "Workers"):
- A task run with no result after `worker_task_timeout_s` is cancelled (no GPU works on a result nobody waits
  for) and submitted again, up to `worker_resubmits` times. This recovers runs stranded by a server restart
  (Prefect keeps its task queue in memory: they stay Scheduled forever) and runs lost with a killed worker
  (they stay Running). Outputs go to fixed URIs, atomically, so a re-run never duplicates an edit.
- Every job carries the flow's code version; a worker running other code refuses it with a clear message.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import Task

from recast.tasks.settings import get_settings
from recast.tasks.version import code_version

log = logging.getLogger("recast.execution")


def run_task(task: Task, job: Any) -> tuple[Any, str | None]:
    """Run `task(job)` and wait for it; returns (result, None) or (None, reason). Never raises for task failure."""
    settings = get_settings()
    if settings.execution == "local":
        state = task(job, return_state=True)
    else:
        job = job.model_copy(update={"code_version": code_version()})
        for submission in range(1 + settings.worker_resubmits):
            future = task.delay(job)
            future.wait(timeout=settings.worker_task_timeout_s)
            state = future.state
            if state.is_final():
                break
            _cancel(future.task_run_id, settings.worker_task_timeout_s)
            log.warning("task run %s (%s) had no result after %.0fs (worker gone, or server restarted): %s",
                        future.task_run_id, state.type.value, settings.worker_task_timeout_s,
                        "submitting it again" if submission < settings.worker_resubmits else "giving up")
        else:
            return None, (f"no worker finished it in {1 + settings.worker_resubmits} tries of "
                          f"{settings.worker_task_timeout_s:.0f}s (is `recast worker` running against this server, "
                          "with the same code version?); the task runs were cancelled")
    if state.is_completed():
        return state.result(raise_on_failure=False), None
    return None, state.message or state.type.value


def _cancel(task_run_id, waited: float) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    try:
        with get_client(sync_client=True) as client:
            client.set_task_run_state(task_run_id, Cancelled(message=f"flow stopped waiting after {waited:.0f}s"),
                                      force=True)
    except Exception as exc:  # noqa: BLE001 - best effort; the flow reports the timeout either way
        log.warning("could not cancel task run %s: %s", task_run_id, exc)
