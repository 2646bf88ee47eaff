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
from prefect.states import Completed, Failed
from prefect.artifacts import create_table_artifact

from recast.flows.execution import run_task
from recast.flows.runs import (check_inputs_allowed, check_storage_root, first_set, flow_run_info, new_run_id, now,
                               slug, started_remotely, take_plan, timestamp, versions)
from recast.tasks import identity, storage
from recast.tasks import prompts as prompt_checks
from recast.tasks.animate import animate_task_for
from recast.tasks.edit import edit_task_for
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
    prompt_warnings: list[str]


def check_storyboard(board: Storyboard) -> StoryboardPlan:
    """Refuse what cannot run before anything is written."""
    settings = get_settings()
    profile, video = settings.get_profile(board.profile), settings.get_video_profile(board.video_profile)
    remote = started_remotely()
    root = check_storage_root(board.storage_root, settings, remote)
    if remote:
        check_inputs_allowed([board.reference], settings.input_roots, field="reference")
    image = storage.read_image("reference", board.reference, settings.max_input_pixels)
    # The same prompt check as the edit flow's: what the origin saw lose identity, per scene.
    warnings = [f"scene {index} edit_prompt '{scene.edit_prompt.split(',')[0]}': {warning}"
                for index, scene in enumerate(board.scenes, start=1) if scene.edit_prompt
                for warning in prompt_checks.check(scene.edit_prompt)]
    if settings.execution == "local":
        loading.check_available(profile, build=False)
        loading.check_available(video, build=False)
    else:  # refused now if the workers could never read this run's jobs; said now if none serves them yet
        from recast.flows import fleet

        warnings += [note for note in (fleet.check_served("edit", profile.name),
                                       fleet.check_served("video", video.name)) if note]
    storage.check_writable("storage", root)
    return StoryboardPlan(settings=settings, profile=profile, video=video, reference=image, root=root,
                          prompt_warnings=warnings)


def stitch(clip_uris: list[str], fps: int) -> tuple[bytes, int]:
    """Concatenate clips into one mp4, streaming: each frame is decoded, resized to the first clip's size if it
    differs, and handed to the encoder before the next is read, so a long storyboard never sits whole in RAM."""
    count, size = 0, None

    def frames():
        nonlocal count, size
        for uri in clip_uris:
            for frame in storage.iter_video(uri):
                if size is None:
                    size = frame.shape[1], frame.shape[0]
                elif (frame.shape[1], frame.shape[0]) != size:
                    frame = np.asarray(Image.fromarray(frame).resize(size))
                count += 1
                yield frame

    data = storage.mp4_bytes(frames(), fps)
    return data, count


@flow(name="recast-storyboard", log_prints=True)
def storyboard_flow(storyboard: Storyboard):
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
    no_chain_reason = "the previous scene has no clip to continue from"
    for index, scene in enumerate(storyboard.scenes, start=1):
        entry = SceneRecord(scene=index, edit_prompt=scene.edit_prompt, motion_prompt=scene.motion_prompt,
                            source="edit" if scene.edit_prompt else "previous_last_frame")
        scenes.append(entry)
        if scene.edit_prompt is None and previous_last_frame is None:
            entry.status, entry.reason = "skipped", no_chain_reason
            continue
        for attempt in range(1, storyboard.max_attempts + 1):
            seed = scene.seed if (scene.seed is not None and attempt == 1) else secrets.randbelow(MAX_SEED + 1)
            record = SceneAttempt(attempt=attempt, seed=seed, started_at=timestamp())
            entry.attempts.append(record)
            source = previous_last_frame
            if scene.edit_prompt:
                width, height = output_size(None, None, reference.width / reference.height, profile.output_area)
                edit_id = f"s{index:02d}-{slug(scene.edit_prompt, 24)}-s{seed}"
                outcome = run_task(edit_task_for(profile.name), EditJob(
                    edit_id=edit_id, profile=profile.name, inputs=[reference_uri], prompt=scene.edit_prompt,
                    negative_prompt=settings.edit.negative_prompt, seed=seed,
                    steps=first_set(profile.steps, settings.edit.steps),
                    true_cfg_scale=first_set(profile.true_cfg_scale, settings.edit.true_cfg_scale),
                    width=width, height=height, output=layout.edit_uri(edit_id),
                    control=layout.control_uri(edit_id)), stage="edit")
                edited = outcome.result
                if not isinstance(edited, EditResult):
                    record.status, record.stage, record.error = "failed", "edit", outcome.message
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
                output=layout.clip_uri(clip_id), last_frame=layout.last_frame_uri(clip_id),
                identity_reference=reference_uri, identity_strip=layout.identity_strip_uri(clip_id),
                control=layout.control_uri(clip_id))
            outcome = run_task(animate_task_for(video.name), job, stage="animate")
            result = outcome.result if isinstance(outcome.result, ClipResult) else None
            record.clip = ClipRecord.of(job, result, outcome.message, storage.redact)
            record.clip.submissions = outcome.submissions
            record.source_frame, record.stage = storage.redact(source), "animate"
            record.status = "succeeded" if result else "failed"
            if result is None:
                continue
            gpu_seconds += result.seconds
            grade = (result.identity or {}).get("grade")
            record.identity_grade = grade
            if storyboard.min_identity and not identity.meets(grade, storyboard.min_identity):
                record.status, record.stage = "failed", "identity"
                record.error = f"the clip graded {grade}, below min_identity {storyboard.min_identity}"
                logger.info("scene %d attempt %d: %s", index, attempt, record.error)
                continue
            clip_uris.append(result.output)
            entry.status, entry.source_frame = "succeeded", storage.redact(source)
            entry.clip, entry.last_frame = storage.redact(result.output), storage.redact(result.last_frame)
            last = identity.last_frame_grade(identity.ClipIdentity(**result.identity)) if result.identity else None
            if last in ("Lost", "no face") and not storyboard.chain_from_lost:
                # Continuing from a frame that lost the person would carry someone else into the next scene.
                previous_last_frame = None
                no_chain_reason = f"scene {index}'s last frame graded {last}: not chained from (chain_from_lost)"
            else:
                previous_last_frame = result.last_frame
            logger.info("scene %d: %s from %s (identity %s)", index, entry.clip, entry.source, grade)
            break
        else:
            entry.status = "failed"
            if storyboard.min_identity and entry.attempts and entry.attempts[-1].stage == "identity":
                entry.reason = f"no attempt reached min_identity {storyboard.min_identity}"
            previous_last_frame = None  # a continuing scene must not jump back to an older clip
            no_chain_reason = f"scene {index} has no clip to continue from"

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
    dump = storage.redact_all(manifest.model_dump())
    storage.write_json(layout.manifest_uri, dump)
    create_table_artifact(key="recast-storyboard", table=[
        {"scene": s.scene, "source": s.source, "status": s.status, "attempts": len(s.attempts),
         "identity": next((a.identity_grade for a in reversed(s.attempts) if a.identity_grade), None),
         "clip": s.clip, "reason": s.reason} for s in scenes])
    if not ok:
        return Failed(message=f"no scene produced a clip; see {storage.redact(layout.manifest_uri)}", data=dump)
    return Completed(message=f"{ok}/{len(scenes)} scenes", data=dump)
