"""The edit task: one (prompt, seed) on the process's cached Qwen-Image-Edit-2511 pipeline.

Reads its inputs by URI, writes one PNG by URI, returns a small EditResult (never image bytes).
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor

from prefect import task

from recast.tasks import lifecycle, storage
from recast.tasks.errors import retry_only_transient
from recast.tasks.models import loading
from recast.tasks.schemas.jobs import EditJob, EditResult, Timeline
from recast.tasks.settings import get_settings
from recast.tasks.version import check_code_version


def edit_image(job: EditJob) -> EditResult:
    """Run one edit and write its PNG to job.output."""
    task_started = time.time()
    check_code_version(job)
    profile = get_settings().get_profile(job.profile)
    from recast.tasks.models import qwen_edit  # torch and diffusers: imported only where a model runs

    with lifecycle.running(job) as should_stop:
        loaded, cache_hit = loading.get_pipeline("edit", profile)
        images = [storage.load_image(uri) for uri in job.inputs]
        with lifecycle.on_gpu():
            model_started, started = time.time(), time.perf_counter()
            image = qwen_edit.run_edit(
                loaded, profile, images, prompt=job.prompt, negative_prompt=job.negative_prompt, seed=job.seed,
                steps=job.steps, true_cfg_scale=job.true_cfg_scale, width=job.width, height=job.height,
                loras=job.loras, should_stop=should_stop)
            seconds = time.perf_counter() - started
        timeline = Timeline.of(task_started, model_started, model_started + seconds)
        # The CPU work side by side, while a worker's next job may already be on the GPU: the PNG (zlib frees the
        # GIL) and the identity score (OpenCV).
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="recast-edit") as pool:
            written = pool.submit(lambda: storage.write_bytes(job.output, storage.png_bytes(image)))
            identity = score_identity(images[0], image) if job.score_identity else None
            written.result()
        result = EditResult(edit_id=job.edit_id, output=job.output, seed=job.seed, width=image.width,
                            height=image.height, seconds=round(seconds, 4), cache_hit=cache_hit,
                            cold_start_s=round(loaded.cold_start_s, 3), prepared=loaded.prepared,
                            compile_cache=loaded.compile_cache, identity=identity,
                            device=loading.describe_device(profile), timeline=timeline)
        lifecycle.record_result(job, result)
    return result


def score_identity(reference, image) -> dict:
    """Identity of the output against the reference; a scorer problem is noted, never fatal to the edit."""
    from recast.tasks import identity

    try:
        return identity.compare(identity.reference_face(reference), image).as_dict()
    except identity.IdentityUnavailable as exc:
        return {"score": None, "grade": "unscorable", "notes": f"identity scorer unavailable: {exc}"}


edit_task = task(
    edit_image,
    name="edit",
    task_run_name="edit {job.edit_id}",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_only_transient,
)


@functools.cache
def edit_task_for(profile: str):
    """The edit task as submitted for one profile: a task key of its own, so a job reaches only the task workers
    started with that profile (a worker subscribes to its profiles' keys), never one that would have to refuse it."""
    routed = edit_task.with_options(name=f"edit [{profile}]")
    routed.task_key = f"{edit_task.task_key}-{profile}"
    return routed
