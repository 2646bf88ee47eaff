"""Pydantic models: the one source for the CLI, the Prefect UI form, validation and the files a run writes.

Requests describe what a user asks for (every field has a description and bounds, which the CLI's
--help and Prefect's form both show). Jobs and results are what travels between flow and tasks:
URIs and numbers, never image bytes.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

MAX_SEED = 2**32 - 1
MAX_INPUT_IMAGES = 3

Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
ImageRef = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------------
# Settings (configs/*.yaml + RECAST_* environment)


class LoraSpec(_Strict):
    source: str = Field(description="Hub repo id, local .safetensors file, or fsspec URI of a diffusers-format LoRA.")
    weight_name: str | None = Field(None, description="File inside a hub repo.")
    revision: str | None = Field(None, description="Pinned hub revision of the repo.")
    weight: float = Field(1.0, ge=-4.0, le=4.0, description="Adapter strength.")


class ModelProfile(_Strict):
    name: str = Field(description="Profile name, as used by --profile.")
    description: str = Field("", description="What this profile is for.")
    model_id: str = Field(
        description="Hub id, local folder, or 'tiny' (random weights built locally) of the edit model."
    )
    revision: str | None = Field(None, description="Pinned hub revision (commit hash) of model_id.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(description="torch dtype the pipeline runs in.")
    device: str = Field(description="torch device: cpu, cuda, cuda:1, ...")
    output_area: int = Field(ge=64 * 64, le=4096 * 4096, description="Output pixels when width/height are unset.")
    vae_image_area: int = Field(ge=64 * 64, le=4096 * 4096, description="Pixels each input is resized to for the VAE.")
    handoff_area: int = Field(ge=32 * 32, le=1920 * 1088, description="Pixels of the frame handed to video.")
    usd_per_gpu_hour: float | None = Field(None, ge=0, description="Overrides the global GPU price.")
    # Defaults this profile imposes on requests that leave them unset (e.g. Lightning: 4 steps, CFG off).
    steps: int | None = Field(None, ge=1, le=100, description="Default steps for this profile.")
    true_cfg_scale: float | None = Field(None, ge=1.0, le=20.0, description="Default CFG for this profile.")
    # Speed and memory (see docs/PERFORMANCE.md).
    attention_backend: str | None = Field(None, description="diffusers attention backend, e.g. _native_cudnn.")
    compile: bool = Field(False, description="torch.compile the transformer's repeated blocks.")
    quantize: Literal["none", "fp8", "int4"] = Field("none", description="Transformer block linears precision.")
    quantize_text_encoder: bool = Field(False, description="Apply `quantize` to the text encoder's LLM too.")
    offload_text_encoder: bool = Field(False, description="Keep the text encoder in CPU RAM, stream it per call.")
    lightning: LoraSpec | None = Field(None, description="Few-step distillation LoRA fused at load.")
    scheduler: dict | None = Field(None, description="Scheduler config overrides (the Lightning LoRA needs its own).")
    warmup: bool = Field(False, description="Run (and compile) a few edits at load, before taking work.")


class VideoProfile(_Strict):
    name: str = Field(description="Video profile name, as used by --video-profile.")
    description: str = ""
    model_id: str = Field(description="Hub id, local folder, or tiny-wan22 / tiny-wan21 (built locally).")
    revision: str | None = Field(None, description="Pinned hub revision (commit hash).")
    dtype: Literal["float32", "bfloat16", "float16"]
    device: str
    area: int = Field(ge=16 * 16, le=1920 * 1088, description="Frame pixels when no size is given (480p: 832x480).")
    steps: int | None = Field(None, ge=1, le=100, description="Default steps for this profile.")
    guidance_scale: float | None = Field(None, ge=1.0, le=20.0, description="Default CFG for this profile.")
    max_sequence_length: int = Field(512, ge=16, le=512, description="Text tokens for the UMT5 encoder.")
    usd_per_gpu_hour: float | None = Field(None, ge=0)


class AnimateDefaults(_Strict):
    steps: int = Field(40, ge=1, le=100)
    guidance_scale: float = Field(5.0, ge=1.0, le=20.0)
    negative_prompt: str = ""


class EditDefaults(_Strict):
    steps: int = Field(8, ge=1, le=100)
    true_cfg_scale: float = Field(4.0, ge=1.0, le=20.0)
    negative_prompt: str = " "


class HandoffDefaults(_Strict):
    motion_prompt: str = Field(min_length=1)
    num_frames: int = Field(81, ge=5, le=241)
    fps: int = Field(16, ge=4, le=60)
    mode: Literal["inline", "deployment", "none"] = Field(
        "inline", description="inline: animate in the same process; deployment: trigger the animate "
        "deployment (its own GPU pool); none: stop at handoff.json.")
    deployment: str = Field("recast-animate/animate", description="Deployment run in 'deployment' mode.")
    timeout_s: float = Field(3600, gt=0, description="How long the edit flow waits for a deployment run.")

    @model_validator(mode="after")
    def _frames_4k_plus_1(self) -> HandoffDefaults:
        if (self.num_frames - 1) % 4:
            raise ValueError(f"handoff.num_frames={self.num_frames} must be 4k+1 (e.g. 81)")
        return self


def _pick(field: str, name: str, known: dict):
    from tasks.errors import BadInput

    if name not in known:
        raise BadInput(field, name, "unknown profile", f"use one of: {', '.join(sorted(known))}")
    return known[name]


class Settings(_Strict):
    profile: str
    video_profile: str
    execution: Literal["local", "workers"] = Field(
        "local", description="local: GPU tasks run in the flow's process; workers: on `recast worker` processes.")
    worker_task_timeout_s: float = Field(1800, gt=0, description="How long a flow waits for one task's result.")
    worker_resubmits: int = Field(2, ge=0, le=10, description="Resubmissions of a task run with no result.")
    allowed_input_roots: list[str] = Field(
        default_factory=list, description="Where runs triggered from the UI or a schedule may read inputs "
        "(besides storage_root).")
    storage_root: str
    edit: EditDefaults
    animate: AnimateDefaults
    handoff: HandoffDefaults
    usd_per_gpu_hour: float = Field(ge=0)
    max_input_pixels: int = Field(ge=64 * 64)
    profiles: dict[str, ModelProfile]
    video_profiles: dict[str, VideoProfile]

    @model_validator(mode="after")
    def _known_profile(self) -> Settings:
        if self.profile not in self.profiles:
            raise ValueError(f"profile={self.profile!r} is not defined; known: {sorted(self.profiles)}")
        if self.video_profile not in self.video_profiles:
            raise ValueError(f"video_profile={self.video_profile!r} is not defined; known: {sorted(self.video_profiles)}")
        return self

    def get_video_profile(self, name: str | None) -> VideoProfile:
        return _pick("video_profile", name or self.video_profile, self.video_profiles)


    def get_profile(self, name: str | None) -> ModelProfile:
        return _pick("profile", name or self.profile, self.profiles)


# --------------------------------------------------------------------------------------------------
# The request: what a user sends (CLI, Prefect UI form, API)


class LoraRef(_Strict):
    """A LoRA adapter for one request: a diffusers-format .safetensors file and its strength."""

    source: ImageRef = Field(description="Local path or fsspec URI of a diffusers-format LoRA .safetensors file.")
    weight: float = Field(1.0, ge=-4.0, le=4.0, description="Adapter strength (0 = no effect).")

    @classmethod
    def parse_cli(cls, text: str) -> dict:
        """PATH or PATH@WEIGHT."""
        source, sep, weight = text.rpartition("@")
        if sep and weight.replace(".", "", 1).lstrip("-").isdigit():
            return {"source": source, "weight": float(weight)}
        return {"source": text}


class EditRequest(_Strict):
    """Edit one person's photo with one or more prompts, one or more seeds each."""

    images: list[ImageRef] = Field(
        min_length=1,
        max_length=MAX_INPUT_IMAGES,
        description="1-3 input photos (local path or fsspec URI). The first is the identity reference.",
        json_schema_extra={"cli": "positional", "metavar": "IMAGE"},
    )
    prompts: list[Prompt] = Field(
        default_factory=list,
        max_length=32,
        description="Edit prompts; each runs once per seed. Or use template.",
        json_schema_extra={"cli": "--prompt", "metavar": "TEXT"},
    )
    template: str | None = Field(
        None, description="A prompt template from configs/prompts.yaml (character, professional, cinematic).")
    template_fields: list[str] = Field(
        default_factory=list, max_length=32, description="Template fields as FIELD=VALUE.",
        json_schema_extra={"cli": "--set", "metavar": "FIELD=VALUE"})
    strict: bool = Field(False, description="Refuse to run when the prompt check warns.")
    seeds: list[Seed] | None = Field(
        None,
        max_length=32,
        description="Seeds in 0..2^32-1; each prompt runs once per seed. Unset: one random seed, recorded.",
        json_schema_extra={"cli": "--seed", "metavar": "N"},
    )
    steps: int | None = Field(None, ge=1, le=100, description="Denoising steps (default from config: 8).")
    true_cfg_scale: float | None = Field(
        None,
        ge=1.0,
        le=20.0,
        description="Classifier-free guidance strength; 1 turns CFG off (half the work). Default 4.0.",
    )
    negative_prompt: str | None = Field(
        None, max_length=2000, description="What to steer away from. Default ' ' (needed for CFG)."
    )
    width: int | None = Field(
        None, ge=64, le=4096, description="Output width in px (rounded down to a multiple of 16)."
    )
    height: int | None = Field(
        None, ge=64, le=4096, description="Output height in px (rounded down to a multiple of 16)."
    )
    profile: str | None = Field(None, description="Model profile from configs/profiles.yaml (default: tiny).")
    storage_root: str | None = Field(
        None, description="Where the run is written: a folder or fsspec URI (default ./artifacts).",
        json_schema_extra={"cli": "--storage"},
    )
    identity_notes: str = Field(
        "", max_length=4000, description="Free-text notes on the person's identity, logged with every edit.",
        json_schema_extra={"cli": "--notes"},
    )
    motion_prompt: str | None = Field(
        None, max_length=2000, description="Motion prompt handed to the image-to-video stage."
    )
    video_profile: str | None = Field(
        None, description="Video profile for the image-to-video stage (default: tiny).")
    min_identity: Literal["Drifted", "Good", "Excellent"] | None = Field(
        None, description="Re-run an edit with a new seed until its identity grade reaches this.")
    max_attempts: int = Field(1, ge=1, le=10, description="Tries per edit when min_identity is set.")
    loras: list[LoraRef] = Field(
        default_factory=list, max_length=4, description="LoRA adapters for this request (PATH[@WEIGHT]).",
        json_schema_extra={"cli": "--lora", "metavar": "PATH[@WEIGHT]"})


class AnimateRequest(_Strict):
    """Animate an edited frame: read a handoff.json, write an mp4 and its last frame."""

    handoff: ImageRef = Field(description="URI or path of the edit run's handoff.json.",
                              json_schema_extra={"cli": "positional-one", "metavar": "HANDOFF_URI"})
    motion_prompt: str | None = Field(None, max_length=2000, description="Overrides the handoff's motion prompt.")
    negative_prompt: str | None = Field(None, max_length=2000, description="What to steer away from.")
    num_frames: int | None = Field(None, ge=5, le=241, description="Frames, 4k+1 (others are rounded). Default 81.")
    fps: int | None = Field(None, ge=4, le=60, description="Frames per second written into the mp4. Default 16.")
    steps: int | None = Field(None, ge=1, le=100, description="Denoising steps (default from the video profile).")
    guidance_scale: float | None = Field(None, ge=1.0, le=20.0, description="CFG strength (default 5.0).")
    seed: Seed | None = Field(None, description="Seed in 0..2^32-1; unset: drawn and recorded.")
    resolution: Literal["480p", "720p"] | None = Field(
        None, description="Frame area (832x480 or 1280x720 pixels) at the frame's aspect ratio.")
    width: int | None = Field(None, ge=16, le=1920, description="Frame width (rounded to a multiple of 16).")
    height: int | None = Field(None, ge=16, le=1920, description="Frame height (rounded to a multiple of 16).")
    video_profile: str | None = Field(None, description="Video profile (default: tiny).")
    storage_root: str | None = Field(None, description="Where the run is written (default ./artifacts).",
                                     json_schema_extra={"cli": "--storage"})


class BatchRequest(_Strict):
    """Edit every new photo under a storage prefix with a set of prompts (scheduled)."""

    source_prefix: ImageRef = Field(description="Folder URI to scan for photos (.png, .jpg, .jpeg, .webp).")
    prompts: list[Prompt] = Field(min_length=1, max_length=32, description="Prompts applied to every photo.")
    seeds: list[Seed] = Field(default_factory=lambda: [42], min_length=1, max_length=8,
                              description="Seeds (fixed, so a re-run reproduces the same edits).")
    steps: int | None = Field(None, ge=1, le=100, description="Denoising steps (default 8).")
    true_cfg_scale: float | None = Field(None, ge=1.0, le=20.0, description="CFG strength (default 4.0).")
    profile: str | None = Field(None, description="Edit model profile.")
    storage_root: str | None = Field(None, description="Where runs are written.")
    max_photos: int = Field(100, ge=1, le=10000, description="At most this many new photos per run.")


class StoryboardScene(_Strict):
    edit_prompt: Prompt | None = Field(
        None, description="Edit of the reference photo that starts this scene. Scene 1 needs one; later scenes "
        "without one continue from the previous clip's last frame.")
    motion_prompt: Prompt = Field(description="What happens in this scene's clip.")
    seed: Seed | None = Field(None, description="Seed for this scene (edit and clip); unset: drawn.")


class Storyboard(_Strict):
    """A sequence of scenes over one reference photo, stitched into one video."""

    reference: ImageRef = Field(description="The person's photo (path or fsspec URI).")
    scenes: list[StoryboardScene] = Field(min_length=1, max_length=50, description="The scenes, in order.")
    num_frames: int = Field(81, ge=5, le=241, description="Frames per clip, 4k+1.")
    fps: int = Field(16, ge=4, le=60, description="Frames per second of every clip and the stitched video.")
    max_attempts: int = Field(1, ge=1, le=5, description="Tries per scene (a new seed each) before it fails.")
    profile: str | None = Field(None, description="Edit model profile.")
    video_profile: str | None = Field(None, description="Video model profile.")
    storage_root: str | None = Field(None, description="Where the run is written.")

    @model_validator(mode="after")
    def _first_scene_edits(self) -> Storyboard:
        if self.scenes[0].edit_prompt is None:
            raise ValueError("scenes[0].edit_prompt is required: the first scene starts from an edit")
        if (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames={self.num_frames} must be 4k+1 (e.g. 81)")
        return self


# --------------------------------------------------------------------------------------------------
# Between flow and task


class ResolvedLora(_Strict):
    name: str = Field(description="Adapter name in the pipeline (from the file's hash).")
    source: str = Field(description="Where the user's file is (redacted URI).")
    weight: float
    sha256: str


class EditJob(_Strict):
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


class AnimateJob(_Strict):
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
    code_version: str | None = Field(None, description="The submitting flow's code version (workers check it).")


class ClipResult(_Strict):
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


class EditResult(_Strict):
    edit_id: str
    output: str
    seed: int
    width: int
    height: int
    seconds: float
    cache_hit: bool
    cold_start_s: float
    identity: dict | None = None


# --------------------------------------------------------------------------------------------------
# Files a run writes


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


class Handoff(_Strict):
    """The contract with the Wan image-to-video stage."""

    version: Literal[1] = 1
    run_id: str
    frame: str = Field(description="URI of the chosen edited frame (PNG).")
    edit_id: str
    motion_prompt: str
    width: int = Field(ge=16, multiple_of=16)
    height: int = Field(ge=16, multiple_of=16)
    num_frames: int = Field(ge=5)
    fps: int = Field(ge=1)
    seed: Seed
    manifest: str = Field(description="URI of the edit run's manifest.json.")

    @model_validator(mode="after")
    def _frames_4k_plus_1(self) -> Handoff:
        if (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames={self.num_frames} must be 4k+1")
        return self


class Manifest(BaseModel):
    run_id: str
    folder: str = Field(description="URI of the run folder (manifest.json is inside it).")
    created_at: str
    finished_at: str
    status: Literal["succeeded", "partial", "failed"]
    request: dict
    model: dict
    versions: dict
    device: str
    pipeline: dict
    edits: list[EditRecord]
    cost: dict
    handoff: str | None
    identity_notes: str
    contact_sheet: str | None = None
    animation: dict | None = None
    prefect: dict = Field(default_factory=dict)


class AnimateManifest(BaseModel):
    kind: Literal["animate"] = "animate"
    run_id: str
    folder: str
    created_at: str
    finished_at: str
    status: Literal["succeeded", "failed"]
    request: dict
    handoff: str
    warnings: list[str]
    model: dict
    versions: dict
    device: str
    pipeline: dict
    clips: list[ClipRecord]
    cost: dict
    prefect: dict = Field(default_factory=dict)
