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
    from prefect.task_worker import serve

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
    serve(*[task for _, _, task in served], limit=1)
