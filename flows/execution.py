"""How a flow runs its GPU tasks: in its own process (`local`) or on long-lived task workers (`workers`).

The flows are the same in both modes; only this submission step differs. In `workers` mode the task's
parameters and result travel through Prefect's result storage (shared by flow and workers), so only small
jobs and URIs cross, never images.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import Task

from tasks.settings import get_settings

log = logging.getLogger("recast.execution")


def run_task(task: Task, job: Any) -> tuple[Any, str | None]:
    """Run `task(job)` and wait for it; returns (result, None) or (None, reason). Never raises for task failure."""
    settings = get_settings()
    if settings.execution == "local":
        state = task(job, return_state=True)
    else:
        future = task.delay(job)
        future.wait(timeout=settings.worker_timeout_s)
        state = future.state
        if not state.is_final():
            _cancel(future.task_run_id, settings.worker_timeout_s)
            return None, (f"no worker finished it within {settings.worker_timeout_s:.0f}s "
                          f"(is `recast worker` running against this server?); the task run was cancelled")
    if state.is_completed():
        return state.result(raise_on_failure=False), None
    return None, state.message or state.type.value


def _cancel(task_run_id, waited: float) -> None:
    """Give up on a task run so no worker spends GPU time on a result nobody waits for."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    try:
        with get_client(sync_client=True) as client:
            client.set_task_run_state(task_run_id, Cancelled(message=f"flow stopped waiting after {waited:.0f}s"),
                                      force=True)
    except Exception as exc:  # noqa: BLE001 - best effort; the flow reports the timeout either way
        log.warning("could not cancel task run %s: %s", task_run_id, exc)
