"""Task workers: one long-lived process per GPU that loads its pipeline once and serves every task run.

`recast worker edit --gpu 0` pins the process to one GPU, loads and warms the pipeline before taking work
(so no request pays the cold start), then serves edit task runs one at a time until stopped. Any number of
workers, on any number of machines pointed at one Prefect server, share the queue.
"""

from __future__ import annotations

import logging
import os

from recast.tasks.errors import BadInput
from recast.tasks.models import loading
from recast.tasks.settings import get_settings

log = logging.getLogger("recast.worker")


def serve_worker(kinds: list[str], gpu: int | None = None, profile_name: str | None = None,
                 video_profile_name: str | None = None) -> None:
    """Load (and warm) the pipelines of `kinds` ("edit", "animate"), then serve their task runs one at a time.

    The worker serves exactly the profiles it loaded: a job for another profile is refused (ProfileNotServed),
    so nobody can make it load a second model. With both kinds, the memory policy keeps both pipelines resident
    when they fit the card and otherwise swaps them as jobs arrive."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # before torch initialises CUDA
    if not os.environ.get("PREFECT_API_URL"):
        raise BadInput("PREFECT_API_URL", None, "task workers need a Prefect server, not the ephemeral API",
                       "start one (`make serve` or `prefect server start`) and export "
                       "PREFECT_API_URL=http://127.0.0.1:4200/api")
    from recast.tasks.animate import animate_task
    from recast.tasks.edit import edit_task

    settings = get_settings()
    served = []  # (loader kind, profile, task)
    if "edit" in kinds:
        served.append(("edit", settings.get_profile(profile_name), edit_task))
    if "animate" in kinds:
        served.append(("video", settings.get_video_profile(video_profile_name), animate_task))
    loading.serve_only({(kind, profile.name) for kind, profile, _ in served})
    # Load (and for compiled profiles, compile) before the first task can arrive.
    for kind, profile, _ in served:
        loaded, _ = loading.get_pipeline(kind, profile)
        print(f"recast worker: {kind} {profile.name} ({profile.model_id}) ready on {loading.describe_device(profile)} "
              f"after a {loaded.cold_start_s:.1f}s cold start", flush=True)
    print(f"recast worker {' '.join(kinds)}: serving one task at a time", flush=True)
    import asyncio

    async def serve() -> None:
        worker = _one_at_a_time_worker()(*[task for _, _, task in served], limit=1)  # inside the event loop
        await worker.astart()

    try:
        asyncio.run(serve())
    except (KeyboardInterrupt, SystemExit, BaseExceptionGroup):  # stopped (TERM, Ctrl-C)
        pass


def _one_at_a_time_worker():
    """Prefect's task worker, asking the server for its next task run only once it is free.

    A stock worker acknowledges the next task run while still busy with one (it then waits for a free slot), so a
    worker that dies takes that queued run with it: the server thinks it delivered, and it stays Scheduled forever.
    This one receives a run only when it can start it; a run the server sent but nobody acknowledged goes back to
    the queue when the worker's connection drops.
    """
    import anyio
    from prefect.client.schemas.objects import TaskRun
    from prefect.client.subscriptions import Subscription
    from prefect.settings import get_current_settings
    from prefect.task_worker import TaskWorker

    class OneAtATimeWorker(TaskWorker):
        async def _subscribe_to_task_scheduling(self):
            keys = " | ".join(key.split(".")[-1].split("-")[0] for key in sorted(self.task_keys))
            log.info("Subscribing to runs of task(s): %s", keys)
            print(f"Subscribing to runs of task(s): {keys}", flush=True)
            subscription = Subscription(model=TaskRun, path="/task_runs/subscriptions/scheduled",
                                        keys=self.task_keys, client_id=self.client_id,
                                        base_url=get_current_settings().api.url)
            while True:
                while self._limiter is not None and self._limiter.available_tokens < 1:
                    await anyio.sleep(0.05)
                task_run = await subscription.__anext__()
                log.info("Received task run: %s - %s", task_run.id, task_run.name)
                if await self._acquire_token(task_run.id):
                    self._runs_task_group.start_soon(self._safe_submit_scheduled_task_run, task_run)

    return OneAtATimeWorker
