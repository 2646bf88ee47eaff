"""The animate flow: handoff.json -> one clip (mp4 at the requested fps + its last frame) -> manifest.

    1. Plan: read and check the handoff, the frame and the sizes (nothing written yet)
    2. Animate the frame on the process's cached Wan pipeline
    3. Write the manifest, last
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field, ValidationError

from recast.flows.execution import run_task
from recast.flows.runs import (blocking, check_inputs_allowed, check_storage_root, first_set, flow_run_info,
                               new_run_id, now, one_client, started_remotely, take_plan, timestamp, versions)
from recast.tasks import storage
from recast.tasks.animate import animate_task_for
from recast.tasks.errors import BadInput, first_error
from recast.tasks.frames import output_size, snap16, snap_frames
from recast.tasks.models import loading
from recast.tasks.schemas.fields import MAX_SEED, RUN_ID_PATTERN
from recast.tasks.schemas.jobs import AnimateJob, ClipResult
from recast.tasks.schemas.manifests import AnimateManifest, ClipRecord, Cost, ModelInfo, PipelineInfo
from recast.tasks.schemas.requests import AnimateRequest
from recast.tasks.schemas.settings import Settings, VideoProfile
from recast.tasks.settings import get_settings

RESOLUTION_AREA = {"480p": 832 * 480, "720p": 1280 * 720}


class HandoffIn(BaseModel):
    """A handoff as read from storage: checked field by field, sizes normalised afterwards (see plan)."""

    frame: str = Field(min_length=1)
    motion_prompt: str = Field(min_length=1)
    width: int
    height: int
    num_frames: int
    fps: int = Field(ge=1, le=120)
    seed: int = Field(ge=0, le=MAX_SEED)
    run_id: str | None = Field(None, pattern=RUN_ID_PATTERN)  # becomes a folder name with into_edit_run
    edit_id: str | None = None
    manifest: str | None = None
    reference: str | None = None


@dataclass
class AnimatePlan:
    run_id: str
    created_at: str
    request: AnimateRequest
    settings: Settings
    profile: VideoProfile
    layout: storage.RunLayout
    handoff_uri: str
    handoff: HandoffIn
    job: AnimateJob
    warnings: list[str] = field(default_factory=list)


def read_handoff(uri: str, roots: list[str] | None = None) -> HandoffIn:
    """A handoff.json, read as untrusted (capped; under `roots` as opened, when given) and checked field by field."""
    uri = storage.check_scheme("handoff", uri)
    if not storage.exists(uri):
        raise BadInput("handoff", uri, "file does not exist", "pass the handoff.json of an edit run")
    data = storage.read_json_capped("handoff", uri, roots)
    if not isinstance(data, dict):
        raise BadInput("handoff", uri, "not a JSON object", "pass the handoff.json an edit run wrote")
    try:
        return HandoffIn.model_validate(data)
    except ValidationError as exc:
        where, value, message, _ = first_error(exc)
        raise BadInput(f"handoff.{where}", value, message, "re-run the edit flow, or fix the field") from None


def plan_animation(request: AnimateRequest, settings: Settings | None = None) -> AnimatePlan:
    """Everything that can be refused is refused here, before anything is written."""
    settings = settings or get_settings()
    profile = settings.get_video_profile(request.video_profile)
    handoff_uri = storage.check_scheme("handoff", request.handoff)
    remote = started_remotely()
    root = check_storage_root(request.storage_root, settings, remote)
    # Remote runs read only under the roots: by name first (a clear error), then each file as it is opened.
    read_roots = settings.input_roots if remote else None
    if remote:
        check_inputs_allowed([handoff_uri], settings.input_roots, field="handoff")
    handoff = read_handoff(handoff_uri, read_roots)
    frame_uri = storage.check_scheme("handoff.frame", handoff.frame)
    if remote:
        check_inputs_allowed([frame_uri], settings.input_roots, field="handoff.frame")
    if not storage.exists(frame_uri):
        raise BadInput("handoff.frame", handoff.frame, "frame does not exist", "re-run the edit flow")
    frame = storage.read_image("handoff.frame", frame_uri, settings.max_input_pixels, roots=read_roots)
    reference = request.identity_reference or handoff.reference
    if reference:
        field = "identity_reference" if request.identity_reference else "handoff.reference"
        reference = storage.check_scheme(field, reference)
        if remote:
            check_inputs_allowed([reference], settings.input_roots, field=field)
        # a readable photo, or bad input now
        storage.read_image(field, reference, settings.max_input_pixels, roots=read_roots)

    warnings: list[str] = []
    if request.width or request.height or request.resolution:
        area = RESOLUTION_AREA.get(request.resolution or "", profile.area)
        width, height = output_size(request.width, request.height, frame.width / frame.height, area)
        width, height = snap16("width", width, warnings), snap16("height", height, warnings)
    else:
        width = snap16("handoff.width", handoff.width, warnings)
        height = snap16("handoff.height", handoff.height, warnings)
    if width * height > settings.max_clip_pixels:
        raise BadInput("width x height", f"{width}x{height}", f"{width * height} pixels per frame is over the "
                       f"limit of {settings.max_clip_pixels}", "use --resolution 480p or 720p, or a smaller size")
    if request.num_frames is not None:
        num_frames = snap_frames("num_frames", request.num_frames, warnings)
    else:
        num_frames = snap_frames("handoff.num_frames", handoff.num_frames, warnings)
    if settings.execution == "local":
        loading.check_available(profile, build=False)
    else:  # refused now if the workers could never read this run's job; said now if none serves it yet
        from recast.flows import fleet

        if note := fleet.check_served("video", profile.name):
            warnings.append(note)

    moment = now()
    # Into the edit run's own folder (the edit flow's video stage), or a run of its own. Into a run's folder only
    # from that run's own handoff.json: a handoff elsewhere cannot name a folder to write into.
    if request.into_edit_run:
        if not handoff.run_id:
            raise BadInput("handoff.run_id", None, "into_edit_run needs the edit run's handoff (it names the run)",
                           "pass the handoff.json of an edit run, or leave into_edit_run off")
        layout = storage.RunLayout(root, handoff.run_id)
        if not storage.same_location(handoff_uri, layout.handoff_uri):
            raise BadInput("handoff", handoff_uri, f"into_edit_run writes into run {handoff.run_id}, but this is not "
                           "that run's handoff.json under the storage root", "pass the run's own handoff.json "
                           f"({storage.redact(layout.handoff_uri)}), or leave into_edit_run off")
    else:
        layout = storage.RunLayout(root, new_run_id(moment))
    clip_id = "clip-01"
    # The handoff's seed by default: the same edit run always gives the same clip.
    seed = first_set(request.seed, handoff.seed)
    storage.check_writable("storage", root)
    job = AnimateJob(
        clip_id=clip_id, video_profile=profile.name, frame=frame_uri,
        prompt=request.motion_prompt or handoff.motion_prompt,
        negative_prompt=request.negative_prompt if request.negative_prompt is not None
        else settings.animate.negative_prompt,
        seed=seed, steps=first_set(request.steps, profile.steps, settings.animate.steps),
        guidance_scale=first_set(request.guidance_scale, profile.guidance_scale, settings.animate.guidance_scale),
        num_frames=num_frames, fps=request.fps or handoff.fps, width=width, height=height,
        output=layout.clip_uri(clip_id), last_frame=layout.last_frame_uri(clip_id),
        identity_reference=reference, identity_every=request.identity_every,
        identity_strip=layout.identity_strip_uri(clip_id), control=layout.control_uri(clip_id))
    return AnimatePlan(run_id=layout.run_id, created_at=timestamp(moment), request=request,
                       settings=settings, profile=profile, layout=layout, handoff_uri=handoff_uri, handoff=handoff,
                       job=job, warnings=warnings)


@flow(name="recast-animate", log_prints=True)
async def animate_flow(request: AnimateRequest):
    """Animate the chosen frame of an edit run (its handoff.json); returns the manifest."""
    # Async, so the run ends when its work does (recast.flows.runs.blocking says why); the body blocks, in a thread.
    return await blocking(_animate_run, request)


def _animate_run(request: AnimateRequest):
    logger = get_run_logger()
    # 1. Plan (the CLI may have planned it already)
    planned_by_cli = take_plan("animate", request)
    plan = planned_by_cli or plan_animation(request)
    if planned_by_cli is None:  # the CLI printed them already; a run from the UI shows them in its log
        for warning in plan.warnings:
            logger.warning(warning)
    job = plan.job
    logger.info("run %s: %d frames %dx%d at %d fps on %s", plan.run_id, job.num_frames, job.width, job.height,
                job.fps, plan.profile.name)
    # 2. Clip
    outcome = run_task(animate_task_for(plan.profile.name), job, stage="animate")
    result = outcome.result if isinstance(outcome.result, ClipResult) else None
    message = None if result else (outcome.message or "failed")
    record = ClipRecord.of(job, result, message, storage.redact)
    record.submissions = outcome.submissions
    # 3. Manifest (last); beside an edit run's own manifest when the clip went into that run
    seconds = (result.seconds + (0.0 if result.cache_hit else result.cold_start_s)) if result else 0.0
    request_dump = request.model_dump()
    request_dump["seed"] = job.seed
    manifest = AnimateManifest(
        run_id=plan.run_id, folder=plan.layout.folder, created_at=plan.created_at,
        finished_at=timestamp(), status="succeeded" if result else "failed", request=request_dump,
        handoff=plan.handoff_uri, warnings=plan.warnings, model=ModelInfo.of(plan.profile),
        versions=versions(), device=result.device if result is not None and result.device else plan.profile.device,
        pipeline=PipelineInfo.of(result),
        clips=[record], cost=Cost.of(seconds, plan.profile, plan.settings), prefect=flow_run_info())
    manifest_uri = plan.layout.video_manifest_uri if request.into_edit_run else plan.layout.manifest_uri
    dump = dict(storage.redact_all(manifest.model_dump()), manifest=storage.redact(manifest_uri))
    storage.write_json(manifest_uri, dump)
    with one_client():
        _publish(plan, manifest, record, job)
    if not result:
        return Failed(message=f"the clip failed: {message}; see {storage.redact(manifest_uri)}", data=dump)
    return Completed(message="the clip is written", data=dump)


def _publish(plan: AnimatePlan, manifest: AnimateManifest, record: ClipRecord, job: AnimateJob) -> None:
    """The run's results table and summary in the Prefect UI."""
    create_table_artifact(key="recast-animate-clips", table=[
        {"clip": r.clip_id, "prompt": r.prompt, "identity": (r.identity or {}).get("grade"),
         "drift from frame": (r.identity or {}).get("drift_from"), "seed": r.seed, "frames": r.num_frames,
         "fps": r.fps, "size": f"{r.width}x{r.height}", "seconds": r.seconds, "output": r.output}
        for r in manifest.clips], _sync=True)  # the flow is async, its body is not (recast.flows.runs.blocking)
    create_markdown_artifact(key="recast-animate-summary", markdown=(
        f"# recast animate `{plan.run_id}`: {manifest.status}\n- from `{storage.redact(job.frame)}`\n"
        f"- clip `{record.output}` ({job.num_frames} frames, {job.fps} fps)\n"
        + "".join(f"- warning: {w}\n" for w in plan.warnings)), _sync=True)
