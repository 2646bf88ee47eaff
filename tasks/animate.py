"""The animate task: one clip from one frame on the process's cached Wan image-to-video pipeline.

Reads the frame by URI, writes the mp4 (at the requested fps) and its last frame by URI, returns a small
ClipResult (never video bytes).
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor

from PIL import Image
from prefect import task

from recast.tasks import lifecycle, storage
from recast.tasks.errors import retry_only_transient
from recast.tasks.models import loading
from recast.tasks.schemas.jobs import AnimateJob, ClipResult, Timeline
from recast.tasks.settings import get_settings
from recast.tasks.version import check_code_version


def animate_clip(job: AnimateJob) -> ClipResult:
    """Generate job.num_frames frames from job.frame and write the clip and its last frame."""
    task_started = time.time()
    check_code_version(job)
    profile = get_settings().get_video_profile(job.video_profile)
    from recast.tasks.models import wan_video  # torch and diffusers: imported only where a model runs

    with lifecycle.running(job) as should_stop:
        loaded, cache_hit = loading.get_pipeline("video", profile)
        # Wan stretches the image to height x width; the flow chose a size with the frame's aspect ratio.
        frame = storage.load_image(job.frame).resize((job.width, job.height), Image.Resampling.LANCZOS)
        # The mp4 is encoded and the clip's identity scored while the VAE decodes it, off the clip's critical path
        # (storage.Mp4Stream, identity.ClipScoring)
        encoding = storage.Mp4Stream(job.fps)
        scoring = _clip_scoring(job)
        feeds = [encoding.feed] + ([scoring.feed] if scoring is not None else [])
        with lifecycle.on_gpu():
            model_started, started = time.time(), time.perf_counter()
            try:
                frames = wan_video.run_video(
                    loaded, frame, prompt=job.prompt, negative_prompt=job.negative_prompt, seed=job.seed,
                    steps=job.steps, guidance_scale=job.guidance_scale, num_frames=job.num_frames, width=job.width,
                    height=job.height, max_sequence_length=profile.max_sequence_length, should_stop=should_stop,
                    on_frames=lambda fetch: [feed(fetch) for feed in feeds])
            except BaseException:
                encoding.abandon()
                if scoring is not None:
                    scoring.abandon()
                raise
            seconds = time.perf_counter() - started
        result = ClipResult(clip_id=job.clip_id, output=job.output, last_frame=job.last_frame, seed=job.seed,
                            num_frames=len(frames), fps=job.fps, width=frames.shape[2], height=frames.shape[1],
                            seconds=round(seconds, 4), cache_hit=cache_hit, cold_start_s=round(loaded.cold_start_s, 3),
                            prepared=loaded.prepared, compile_cache=loaded.compile_cache,
                            device=loading.describe_device(profile),
                            timeline=Timeline.of(task_started, model_started, model_started + seconds))
        # The CPU work, side by side (x264 runs in its own process, PNG and OpenCV free the GIL): the mp4's last
        # chunk, the last frame (written losslessly: the next scene's starting image) and the clip's identity (one
        # frame per second by default; all but the last sampled frame scored during the decode).
        with ThreadPoolExecutor(max_workers=3, thread_name_prefix="recast-clip") as pool:
            writes = [pool.submit(lambda: storage.write_bytes(job.output, encoding.finish(frames))),
                      pool.submit(lambda: storage.write_bytes(job.last_frame,
                                                              storage.png_bytes(Image.fromarray(frames[-1]))))]
            scored = pool.submit(score_clip_identity, job, frames, scoring) if job.identity_reference else None
            for write in writes:
                write.result()
            if scored is not None:
                result.identity, result.identity_strip = scored.result()
        lifecycle.record_result(job, result)
    return result


def _clip_scoring(job: AnimateJob):
    """The clip's identity scoring, fed as the clip decodes; None when the job scores no identity."""
    if not job.identity_reference:
        return None
    from recast.tasks import identity

    return identity.ClipScoring(storage.load_image(job.identity_reference), job.num_frames, job.fps,
                                job.identity_every)


def score_clip_identity(job: AnimateJob, frames, scoring) -> tuple[dict, str | None]:
    """The clip's frames scored against the reference photo (`scoring`, fed during the decode), and its drift
    strip; a scorer problem is noted."""
    from recast.tasks import identity

    try:
        scored, picked = scoring.finish(frames)
    except identity.IdentityUnavailable as exc:
        return {"grade": "unscorable", "notes": f"identity scorer unavailable: {exc}", "frames": []}, None
    strip = None
    if job.identity_strip:
        strip = storage.write_bytes(job.identity_strip, storage.png_bytes(identity.drift_strip(picked, scored)))
    return scored.as_dict(), strip


animate_task = task(
    animate_clip,
    name="animate",
    task_run_name="animate {job.clip_id}",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_only_transient,
)


@functools.cache
def animate_task_for(video_profile: str):
    """The animate task as submitted for one video profile: its own task key (see recast.tasks.edit.edit_task_for)."""
    routed = animate_task.with_options(name=f"animate [{video_profile}]")
    routed.task_key = f"{animate_task.task_key}-{video_profile}"
    return routed
