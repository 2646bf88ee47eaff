"""Jobs and results: what travels between a flow and its tasks (through Prefect's result storage when task
workers run them). URIs and numbers only, never image bytes."""

from __future__ import annotations

from pydantic import Field

from recast.tasks.schemas.fields import MAX_INPUT_IMAGES, Seed, Strict


class Timeline(Strict):
    """When a job ran on its worker, in epoch seconds of the worker's clock: a stream's idle card time splits by
    these into waiting for the next task to begin and the task's own work before its model call."""

    task_started: float = Field(description="The task function began (after Prefect delivered the run).")
    model_started: float = Field(description="The model call began (the GPU's part).")
    model_ended: float = Field(description="The model call returned.")

    @classmethod
    def of(cls, task_started: float, model_started: float, model_ended: float) -> Timeline:
        return cls(task_started=round(task_started, 3), model_started=round(model_started, 3),
                   model_ended=round(model_ended, 3))


class ResolvedLora(Strict):
    name: str = Field(description="Adapter name in the pipeline (from the file's hash).")
    source: str = Field(description="Where the user's file is (redacted URI).")
    weight: float
    sha256: str


class EditJob(Strict):
    """One (prompt, seed) edit, fully resolved: what the edit task needs and nothing more."""

    edit_id: str
    profile: str
    inputs: list[str] = Field(min_length=1, max_length=MAX_INPUT_IMAGES)
    prompt: str
    negative_prompt: str
    seed: Seed
    steps: int = Field(ge=1, le=100)
    true_cfg_scale: float = Field(ge=1.0)
    width: int = Field(ge=16)
    height: int = Field(ge=16)
    output: str = Field(description="URI the PNG is written to.")
    loras: list[ResolvedLora] = Field(default_factory=list)
    score_identity: bool = True
    code_version: str | None = Field(None, description="The submitting flow's code version (workers check it).")
    control: str | None = Field(None, description="URI prefix of the job's heartbeat, result and cancel files "
                                "(task workers only; see recast.tasks.lifecycle).")

    @staticmethod
    def result_type() -> type:
        return EditResult


class AnimateJob(Strict):
    clip_id: str
    video_profile: str
    frame: str = Field(description="URI of the source frame.")
    prompt: str
    negative_prompt: str
    seed: Seed
    steps: int = Field(ge=1, le=100)
    guidance_scale: float = Field(ge=1.0)
    num_frames: int = Field(ge=5)
    fps: int = Field(ge=1)
    width: int = Field(ge=16, multiple_of=16)
    height: int = Field(ge=16, multiple_of=16)
    output: str = Field(description="URI of the mp4.")
    last_frame: str = Field(description="URI of the PNG of the clip's final frame.")
    identity_reference: str | None = Field(None, description="URI of the photo the clip's frames are scored "
                                           "against (the person's reference); None: not scored.")
    identity_every: int | None = Field(None, ge=1, description="Score every Nth frame (default: one per second).")
    identity_strip: str | None = Field(None, description="URI of the drift strip PNG (sampled frames, scores).")
    code_version: str | None = Field(None, description="The submitting flow's code version (workers check it).")
    control: str | None = Field(None, description="URI prefix of the job's heartbeat, result and cancel files.")

    @staticmethod
    def result_type() -> type:
        return ClipResult


class ClipResult(Strict):
    clip_id: str
    output: str
    last_frame: str
    seed: int
    num_frames: int
    fps: int
    width: int
    height: int
    seconds: float
    cache_hit: bool
    cold_start_s: float
    prepared: bool | None = Field(None, description="The worker's pipeline came from prepared weights.")
    compile_cache: str | None = Field(None, description="hit: its start compiled nothing; miss; null: no compile.")
    identity: dict | None = Field(None, description="The clip scored against the reference (identity.ClipIdentity).")
    device: str | None = Field(None, description="Where the clip ran, as its worker names it.")
    identity_strip: str | None = None
    timeline: Timeline | None = None


class EditResult(Strict):
    edit_id: str
    output: str
    seed: int
    width: int
    height: int
    seconds: float
    cache_hit: bool
    cold_start_s: float
    prepared: bool | None = None
    compile_cache: str | None = None
    identity: dict | None = None
    device: str | None = Field(None, description="Where the edit ran, as its worker names it (cuda:0 (NVIDIA H200)).")
    timeline: Timeline | None = None
