"""The storyboard flow: scenes over one reference photo -> edits and clips chained by last frames -> one video.

    1. Plan: check the storyboard and the reference photo (nothing written yet)
    2. For each scene: make its start frame (a fresh edit of the reference, or the previous clip's last
       frame), animate it, retrying with new seeds up to max_attempts; every attempt goes in the ledger
    3. Stitch the clips into one mp4
    4. Write the manifest, last
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
from PIL import Image
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from recast.flows.execution import run_task
from recast.flows.runs import (check_inputs_allowed, first_set, flow_run_info, new_run_id, now, slug,
                               started_remotely, take_plan, timestamp, versions)
from recast.tasks import storage
from recast.tasks.animate import animate_task
from recast.tasks.edit import edit_task
from recast.tasks.frames import output_size
from recast.tasks.models import loading
from recast.tasks.schemas.fields import MAX_SEED
from recast.tasks.schemas.jobs import AnimateJob, ClipResult, EditJob, EditResult
from recast.tasks.schemas.manifests import (ClipRecord, Cost, ModelInfo, SceneAttempt, SceneRecord, Stitched,
                                            StoryboardManifest)
from recast.tasks.schemas.requests import Storyboard
from recast.tasks.schemas.settings import ModelProfile, Settings, VideoProfile
from recast.tasks.settings import get_settings
from recast.tasks.storage import InputImage


@dataclass
class StoryboardPlan:
    settings: Settings
    profile: ModelProfile
    video: VideoProfile
    reference: InputImage
    root: str


def check_storyboard(board: Storyboard) -> StoryboardPlan:
    """Refuse what cannot run before anything is written."""
    settings = get_settings()
    profile, video = settings.get_profile(board.profile), settings.get_video_profile(board.video_profile)
    root = storage.check_scheme("storage", board.storage_root or settings.storage_root)
    if started_remotely():
        check_inputs_allowed([board.reference], [root, *settings.allowed_input_roots], field="reference")
    image = storage.read_image("reference", board.reference, settings.max_input_pixels)
    if settings.execution == "local":
        loading.check_available(profile)
        loading.check_available(video)
    return StoryboardPlan(settings=settings, profile=profile, video=video, reference=image, root=root)


def stitch(clip_uris: list[str], fps: int) -> tuple[bytes, int]:
    """Concatenate clips (decoded from storage) into one mp4; frames are resized to the first clip's size."""
    parts = []
    for uri in clip_uris:
        frames, _ = storage.read_video(uri)
        if parts and frames.shape[1:3] != parts[0].shape[1:3]:
            height, width = parts[0].shape[1:3]
            frames = np.stack([np.asarray(Image.fromarray(f).resize((width, height))) for f in frames])
        parts.append(frames)
    frames = np.concatenate(parts)
    return storage.mp4_bytes(frames, fps), len(frames)


@flow(name="recast-storyboard", log_prints=True)
def storyboard_flow(storyboard: Storyboard) -> dict:
    """Edit and animate every scene, chaining clips by their last frames, and stitch one video."""
    logger = get_run_logger()
    # 1. Plan (the CLI may have planned it already)
    plan = take_plan("storyboard", storyboard) or check_storyboard(storyboard)
    settings, profile, video, reference = plan.settings, plan.profile, plan.video, plan.reference
    started = now()
    layout = storage.RunLayout(plan.root, new_run_id(started))
    reference_uri = storage.write_bytes(layout.input_uri(0, reference.uri, reference.format), reference.data)

    # 2. Scenes
    scenes: list[SceneRecord] = []
    clip_uris, previous_last_frame, gpu_seconds = [], None, 0.0
    for index, scene in enumerate(storyboard.scenes, start=1):
        entry = SceneRecord(scene=index, edit_prompt=scene.edit_prompt, motion_prompt=scene.motion_prompt,
                            source="edit" if scene.edit_prompt else "previous_last_frame")
        scenes.append(entry)
        if scene.edit_prompt is None and previous_last_frame is None:
            entry.status, entry.reason = "skipped", "the previous scene has no clip to continue from"
            continue
        for attempt in range(1, storyboard.max_attempts + 1):
            seed = scene.seed if (scene.seed is not None and attempt == 1) else secrets.randbelow(MAX_SEED + 1)
            record = SceneAttempt(attempt=attempt, seed=seed, started_at=timestamp())
            entry.attempts.append(record)
            source = previous_last_frame
            if scene.edit_prompt:
                width, height = output_size(None, None, reference.width / reference.height, profile.output_area)
                edit_id = f"s{index:02d}-{slug(scene.edit_prompt, 24)}-s{seed}"
                edited, message = run_task(edit_task, EditJob(
                    edit_id=edit_id, profile=profile.name, inputs=[reference_uri], prompt=scene.edit_prompt,
                    negative_prompt=settings.edit.negative_prompt, seed=seed,
                    steps=first_set(profile.steps, settings.edit.steps),
                    true_cfg_scale=first_set(profile.true_cfg_scale, settings.edit.true_cfg_scale),
                    width=width, height=height, output=layout.edit_uri(edit_id)))
                if not isinstance(edited, EditResult):
                    record.status, record.stage, record.error = "failed", "edit", message
                    continue
                record.edit, record.edit_seconds = storage.redact(edited.output), edited.seconds
                gpu_seconds += edited.seconds
                source = edited.output
            frame = storage.read_image("scene frame", source, settings.max_input_pixels)
            width, height = output_size(None, None, frame.width / frame.height, video.area)
            clip_id = f"s{index:02d}-a{attempt}"
            job = AnimateJob(
                clip_id=clip_id, video_profile=video.name, frame=source, prompt=scene.motion_prompt,
                negative_prompt=settings.animate.negative_prompt, seed=seed,
                steps=first_set(video.steps, settings.animate.steps),
                guidance_scale=first_set(video.guidance_scale, settings.animate.guidance_scale),
                num_frames=storyboard.num_frames, fps=storyboard.fps, width=width, height=height,
                output=layout.clip_uri(clip_id), last_frame=layout.last_frame_uri(clip_id))
            result, message = run_task(animate_task, job)
            result = result if isinstance(result, ClipResult) else None
            record.clip = ClipRecord.of(job, result, message, storage.redact)
            record.source_frame, record.stage = storage.redact(source), "animate"
            record.status = "succeeded" if result else "failed"
            if result:
                gpu_seconds += result.seconds
                clip_uris.append(result.output)
                previous_last_frame = result.last_frame
                entry.status, entry.source_frame = "succeeded", storage.redact(source)
                entry.clip, entry.last_frame = storage.redact(result.output), storage.redact(result.last_frame)
                logger.info("scene %d: %s from %s", index, entry.clip, entry.source)
                break
        else:
            entry.status = "failed"
            previous_last_frame = None  # a continuing scene must not jump back to an older clip

    # 3. Stitch
    stitched, total_frames = None, 0
    if clip_uris:
        data, total_frames = stitch(clip_uris, storyboard.fps)
        stitched = storage.write_bytes(layout.stitched_uri, data)

    # 4. Manifest (last)
    ok = sum(s.status == "succeeded" for s in scenes)
    manifest = StoryboardManifest(
        run_id=layout.run_id, folder=storage.redact(layout.folder), created_at=timestamp(started),
        finished_at=timestamp(), status="succeeded" if ok == len(scenes) else ("partial" if ok else "failed"),
        storyboard=storyboard.model_dump(), reference=storage.redact(reference_uri), model=ModelInfo.of(profile),
        video_model=ModelInfo.of(video), versions=versions(), device=loading.describe_device(video),
        scenes=scenes, stitched=Stitched(output=storage.redact(stitched) if stitched else None,
                                         num_frames=total_frames, fps=storyboard.fps),
        cost=Cost.of(gpu_seconds, video, settings), prefect=flow_run_info())
    storage.write_json(layout.manifest_uri, manifest.model_dump())
    create_table_artifact(key="recast-storyboard", table=[
        {"scene": s.scene, "source": s.source, "status": s.status, "attempts": len(s.attempts), "clip": s.clip}
        for s in scenes])
    if not ok:
        raise RuntimeError(f"no scene produced a clip; see {storage.redact(layout.manifest_uri)}")
    return manifest.model_dump()
