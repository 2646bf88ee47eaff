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


def serve_worker(kind: str, gpu: int | None = None, profile_name: str | None = None) -> None:
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # before torch initialises CUDA
    if not os.environ.get("PREFECT_API_URL"):
        raise BadInput("PREFECT_API_URL", None, "task workers need a Prefect server, not the ephemeral API",
                       "start one (`make serve` or `prefect server start`) and export "
                       "PREFECT_API_URL=http://127.0.0.1:4200/api")
    from prefect.task_worker import serve

    from recast.tasks.animate import animate_task
    from recast.tasks.edit import edit_task

    settings = get_settings()
    if kind == "edit":
        profile, task, loader_kind = settings.get_profile(profile_name), edit_task, "edit"
    else:
        profile, task, loader_kind = settings.get_video_profile(profile_name), animate_task, "video"
    # Load (and for compiled profiles, compile) before the first task can arrive.
    loading.serve_only({(loader_kind, profile.name)})
    loaded, _ = loading.get_pipeline(loader_kind, profile)
    print(f"recast worker {kind}: {profile.name} ({profile.model_id}) ready on {loading.describe_device(profile)} "
          f"after a {loaded.cold_start_s:.1f}s cold start; serving one task at a time", flush=True)
    serve(task, limit=1)
