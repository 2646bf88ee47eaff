"""What a run writes: the handoff to the video stage, and one manifest per run (edit, animate, storyboard).

Manifests are written last: a run folder with a manifest.json is complete. Every URI in them is redacted.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from recast.tasks.schemas.fields import RUN_ID_PATTERN, FrameCount, Seed, Strict
from recast.tasks.schemas.jobs import AnimateJob, ClipResult, ResolvedLora, Timeline


class SavedPlan(Strict):
    """plan.json, written before a run's first edit: what a run whose process died is resumed from. Read back as
    untrusted input (anyone who can write under a storage root can craft one): its run id is checked against the
    one pattern run ids have, and its inputs are checked like a request's."""

    run_id: str = Field(pattern=RUN_ID_PATTERN)
    created_at: str
    request: dict
    seeds: list[Seed] = Field(min_length=1, max_length=32)
    inputs: list[str] = Field(min_length=1, max_length=3)


class ModelInfo(BaseModel):
    """The model block of a manifest: what ran, pinned."""

    id: str
    revision: str | None
    profile: str
    dtype: str

    @classmethod
    def of(cls, profile) -> ModelInfo:
        return cls(id=profile.model_id, revision=profile.revision, profile=profile.name, dtype=profile.dtype)


class Cost(BaseModel):
    gpu_seconds: float
    usd_per_gpu_hour: float
    usd: float

    @classmethod
    def of(cls, seconds: float, profile, settings) -> Cost:
        price = profile.usd_per_gpu_hour if profile.usd_per_gpu_hour is not None else settings.usd_per_gpu_hour
        return cls(gpu_seconds=round(seconds, 3), usd_per_gpu_hour=price, usd=round(seconds / 3600 * price, 6))


class PipelineInfo(BaseModel):
    """How the run's pipeline came to be: its cold start, whether it was already loaded, whether it was loaded from
    prepared weights, and whether torch.compile's cache spared its warm-up any compiling."""

    cold_start_s: float | None = None
    cache_hit: bool | None = None
    prepared: bool | None = Field(None, description="Loaded from prepared weights (recast prepare).")
    compile_cache: str | None = Field(None, description="hit: nothing compiled at start; miss; null: not compiled.")

    @classmethod
    def of(cls, made) -> PipelineInfo:
        """From the result (or the record) of the run's first job; empty when there is none."""
        if made is None:
            return cls()
        return cls(cold_start_s=made.cold_start_s, cache_hit=made.cache_hit, prepared=made.prepared,
                   compile_cache=made.compile_cache)


class IdentityRecord(BaseModel):
    notes: str = Field("", description="The request's free-text identity notes.")
    score: float | None = None
    grade: str | None = None
    scorer_notes: str = ""
    reference_face_px: int | None = None
    face_px: int | None = None
    confident: bool | None = None


class EditRecord(BaseModel):
    edit_id: str
    status: Literal["succeeded", "failed"]
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    true_cfg_scale: float
    inputs: list[str]
    output: str | None
    width: int
    height: int
    seconds: float | None
    cache_hit: bool | None = None
    error: str | None = None
    identity: IdentityRecord
    attempt: int = 1
    loras: list[ResolvedLora] = Field(default_factory=list)
    prompt_warnings: list[str] = Field(default_factory=list)
    cold_start_s: float | None = None
    prepared: bool | None = None
    compile_cache: str | None = None
    device: str | None = None  # where it ran, as its worker named it
    submissions: list[dict] = Field(default_factory=list, description="Every submission to a task worker: its "
                                    "task run, how it ended (completed, failed, lost) and after how long.")
    next_seed: int | None = Field(None, description="The seed of the next attempt, when this one missed the target.")
    timeline: Timeline | None = Field(None, description="When it ran on its worker (epoch seconds): task_started, "
                                      "model_started, model_ended.")


class IdentityTarget(BaseModel):
    """The request's min_identity and whether the run reached it (every edit's last attempt at or above it)."""

    grade: str
    met: bool
    missed: list[str] = Field(default_factory=list, description="Edits whose last attempt stayed below the grade.")
    best_grade: str | None = None

    def met_by(self, record: EditRecord) -> bool:
        from recast.tasks.identity import meets

        return meets(record.identity.grade, self.grade)


class ClipRecord(BaseModel):
    clip_id: str
    status: Literal["succeeded", "failed"]
    source_frame: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    num_frames: int
    fps: int
    width: int
    height: int
    seconds: float | None
    output: str | None
    last_frame: str | None
    cache_hit: bool | None = None
    error: str | None = None
    submissions: list[dict] = Field(default_factory=list)
    identity: dict | None = Field(None, description="Sampled frames {index, score, grade}, the clip's grade (its "
                                  "worst frame), drift_from, no_face_frames, the seconds scoring took.")
    identity_strip: str | None = None
    timeline: Timeline | None = Field(None, description="When it ran on its worker (epoch seconds).")

    @classmethod
    def of(cls, job: AnimateJob, result: ClipResult | None, message: str | None, redact) -> ClipRecord:
        return cls(
            identity=result.identity if result else None,
            identity_strip=redact(result.identity_strip) if result and result.identity_strip else None,
            clip_id=job.clip_id, status="succeeded" if result else "failed", source_frame=redact(job.frame),
            prompt=job.prompt, negative_prompt=job.negative_prompt, seed=job.seed, steps=job.steps,
            guidance_scale=job.guidance_scale, num_frames=result.num_frames if result else job.num_frames,
            fps=job.fps, width=job.width, height=job.height, seconds=result.seconds if result else None,
            output=redact(result.output) if result else None,
            last_frame=redact(result.last_frame) if result else None,
            cache_hit=result.cache_hit if result else None, error=None if result else (message or "failed"),
            timeline=result.timeline if result else None)


class Handoff(Strict):
    """The contract with the Wan image-to-video stage."""

    version: Literal[1] = 1
    run_id: str
    frame: str = Field(description="URI of the chosen edited frame (PNG).")
    edit_id: str
    motion_prompt: str
    width: int = Field(ge=16, multiple_of=16)
    height: int = Field(ge=16, multiple_of=16)
    num_frames: FrameCount
    fps: int = Field(ge=1)
    seed: Seed
    manifest: str = Field(description="URI of the edit run's manifest.json.")
    reference: str | None = Field(None, description="URI of the identity reference photo (the run's first input): "
                                  "the clip is scored against it.")


class RunManifest(BaseModel):
    """What every manifest starts with."""

    run_id: str
    folder: str = Field(description="URI of the run folder (manifest.json is inside it).")
    created_at: str
    finished_at: str
    versions: dict
    device: str
    cost: Cost
    prefect: dict = Field(default_factory=dict)


class Manifest(RunManifest):
    """An edit run. status: succeeded; partial (some edits failed); identity_not_met (min_identity was not
    reached); failed (no edit succeeded)."""

    status: Literal["succeeded", "partial", "identity_not_met", "failed"]
    request: dict
    model: ModelInfo
    pipeline: PipelineInfo
    edits: list[EditRecord]
    handoff: str | None
    identity_notes: str
    identity_target: IdentityTarget | None = None
    resumed: bool = False
    contact_sheet: str | None = None
    animation: dict | None = None


class AnimateManifest(RunManifest):
    kind: Literal["animate"] = "animate"
    status: Literal["succeeded", "failed"]
    request: dict
    handoff: str
    warnings: list[str]
    model: ModelInfo
    pipeline: PipelineInfo
    clips: list[ClipRecord]


class SceneAttempt(BaseModel):
    attempt: int
    seed: int
    started_at: str
    status: Literal["succeeded", "failed"] | None = None
    stage: Literal["edit", "animate"] | None = None
    error: str | None = None
    edit: str | None = None
    edit_seconds: float | None = None
    source_frame: str | None = None
    clip: ClipRecord | None = None
    identity_grade: str | None = Field(None, description="The clip's identity grade (its worst sampled frame).")


class SceneRecord(BaseModel):
    scene: int
    edit_prompt: str | None
    motion_prompt: str
    source: Literal["edit", "previous_last_frame"]
    attempts: list[SceneAttempt] = Field(default_factory=list)
    status: Literal["succeeded", "failed", "skipped"] | None = None
    reason: str | None = None
    source_frame: str | None = None
    clip: str | None = None
    last_frame: str | None = None


class Stitched(BaseModel):
    output: str | None
    num_frames: int
    fps: int


class StoryboardManifest(RunManifest):
    kind: Literal["storyboard"] = "storyboard"
    status: Literal["succeeded", "partial", "failed"]
    storyboard: dict
    reference: str
    model: ModelInfo
    video_model: ModelInfo
    scenes: list[SceneRecord]
    stitched: Stitched
