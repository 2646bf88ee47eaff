"""Requests: what a user sends (CLI, Prefect UI form, API). Every field has a description and bounds, which the
CLI's --help and Prefect's form both show."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from recast.tasks.schemas.fields import MAX_INPUT_IMAGES, FrameCount, ImageRef, Prompt, Seed, Strict


class ConfiguredChoices:
    """The JSON-schema hook of a field whose values come from the configuration (profiles, video profiles,
    templates, storage roots): the Prefect UI form offers them as a list. Validation happens when the run is
    planned, against the configuration the run sees."""

    def __init__(self, kind: str, **cli):
        self.kind, self.cli = kind, cli  # cli: hints for the argparse bridge (flag name, metavar)

    def values(self) -> list[str]:
        from recast.tasks import prompts, storage
        from recast.tasks.settings import get_settings

        settings = get_settings()
        return {"profile": lambda: sorted(settings.profiles), "video_profile": lambda: sorted(settings.video_profiles),
                "template": lambda: sorted(prompts.templates()),
                # As flows pass them on (absolute file:// URIs), so a value a flow forwards is one of the choices.
                "storage_root": lambda: [storage.normalize_uri(root) for root in settings.storage_roots],
                }[self.kind]()

    def __call__(self, schema: dict) -> None:
        values = self.values()
        for option in schema.get("anyOf", [schema]):
            if option.get("type") == "string":
                option["enum"] = values


class LoraRef(Strict):
    """A LoRA adapter for one request: a diffusers-format .safetensors file and its strength."""

    source: ImageRef = Field(description="Local path or fsspec URI of a diffusers-format LoRA .safetensors file.")
    weight: float = Field(1.0, ge=-4.0, le=4.0, description="Adapter strength (0 = no effect).")

    @classmethod
    def parse_cli(cls, text: str) -> dict:
        """PATH or PATH@WEIGHT."""
        from recast.tasks.errors import BadInput

        source, sep, weight = text.rpartition("@")
        if not sep or "/" in weight:  # no weight given ('@' may belong to the path)
            return {"source": text}
        try:
            return {"source": source, "weight": float(weight)}
        except ValueError:
            raise BadInput("--lora", text, f"the weight after '@' ({weight!r}) is not a number",
                           "write PATH@WEIGHT, e.g. style.safetensors@0.8, or PATH alone for weight 1") from None


class EditRequest(Strict):
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
        None, description="A prompt template from configs/prompts.yaml (character, professional, cinematic).",
        json_schema_extra=ConfiguredChoices("template"))
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
    profile: str | None = Field(None, description="Model profile from configs/profiles.yaml (default: tiny).",
                                json_schema_extra=ConfiguredChoices("profile"))
    storage_root: str | None = Field(
        None, description="Where the run is written: a folder or fsspec URI (default ./artifacts). Runs from the UI "
        "or a schedule pick among the configured storage roots.",
        json_schema_extra=ConfiguredChoices("storage_root", cli="--storage"),
    )
    identity_notes: str = Field(
        "", max_length=4000, description="Free-text notes on the person's identity, logged with every edit.",
        json_schema_extra={"cli": "--notes"},
    )
    motion_prompt: str | None = Field(
        None, max_length=2000, description="Motion prompt handed to the image-to-video stage."
    )
    video_profile: str | None = Field(
        None, description="Video profile for the image-to-video stage (default: tiny).",
        json_schema_extra=ConfiguredChoices("video_profile"))
    min_identity: Literal["Drifted", "Good", "Excellent"] | None = Field(
        None, description="Re-run an edit with a new seed until its identity grade reaches this.")
    max_attempts: int = Field(1, ge=1, le=10, description="Tries per edit when min_identity is set.")
    handoff_below_target: bool = Field(
        False, description="Hand the best frame to video even when no edit reached min_identity (default: hand "
        "nothing, and the run ends with status identity_not_met).")
    loras: list[LoraRef] = Field(
        default_factory=list, max_length=4, description="LoRA adapters for this request (PATH[@WEIGHT]).",
        json_schema_extra={"cli": "--lora", "metavar": "PATH[@WEIGHT]"})


class AnimateRequest(Strict):
    """Animate an edited frame: read a handoff.json, write an mp4 and its last frame."""

    handoff: ImageRef = Field(description="URI or path of the edit run's handoff.json.",
                              json_schema_extra={"cli": "positional-one", "metavar": "HANDOFF_URI"})
    motion_prompt: str | None = Field(None, max_length=2000, description="Overrides the handoff's motion prompt.")
    negative_prompt: str | None = Field(None, max_length=2000, description="What to steer away from.")
    num_frames: int | None = Field(None, ge=5, le=241, description="Frames, 4k+1 (others are rounded). Default 81.")
    fps: int | None = Field(None, ge=4, le=60, description="Frames per second written into the mp4. Default 16.")
    steps: int | None = Field(None, ge=1, le=100, description="Denoising steps (default from the video profile).")
    guidance_scale: float | None = Field(None, ge=1.0, le=20.0, description="CFG strength (default 5.0).")
    seed: Seed | None = Field(None, description="Seed in 0..2^32-1; unset: the handoff's seed (the edit's), so the "
                              "same edit run gives the same clip.")
    resolution: Literal["480p", "720p"] | None = Field(
        None, description="Frame area (832x480 or 1280x720 pixels) at the frame's aspect ratio.")
    width: int | None = Field(None, ge=16, le=1920, description="Frame width (rounded to a multiple of 16).")
    height: int | None = Field(None, ge=16, le=1920, description="Frame height (rounded to a multiple of 16).")
    video_profile: str | None = Field(None, description="Video profile (default: tiny).",
                                      json_schema_extra=ConfiguredChoices("video_profile"))
    storage_root: str | None = Field(None, description="Where the run is written (default ./artifacts).",
                                     json_schema_extra=ConfiguredChoices("storage_root", cli="--storage"))
    identity_reference: ImageRef | None = Field(
        None, description="Photo the clip's frames are scored against (default: the edit run's reference photo).")
    identity_every: int | None = Field(None, ge=1, le=240, description="Score every Nth frame of the clip "
                                       "(default: one frame per second of video, the first and last always).")
    into_edit_run: bool = Field(False, description="Write the clip into the edit run's own folder (clips/), as "
                                "the edit flow's video stage does, instead of a run of its own.")


class BatchRequest(Strict):
    """Edit every new photo under a storage prefix with a set of prompts (scheduled)."""

    source_prefix: ImageRef = Field(description="Folder URI to scan for photos (.png, .jpg, .jpeg, .webp).")
    prompts: list[Prompt] = Field(min_length=1, max_length=32, description="Prompts applied to every photo.")
    seeds: list[Seed] = Field(default_factory=lambda: [42], min_length=1, max_length=8,
                              description="Seeds (fixed, so a re-run reproduces the same edits).")
    steps: int | None = Field(None, ge=1, le=100, description="Denoising steps (default 8).")
    true_cfg_scale: float | None = Field(None, ge=1.0, le=20.0, description="CFG strength (default 4.0).")
    profile: str | None = Field(None, description="Edit model profile.", json_schema_extra=ConfiguredChoices("profile"))
    storage_root: str | None = Field(None, description="Where runs are written.",
                                     json_schema_extra=ConfiguredChoices("storage_root"))
    max_photos: int = Field(100, ge=1, le=10000, description="At most this many new photos per run.")


class StoryboardScene(Strict):
    edit_prompt: Prompt | None = Field(
        None, description="Edit of the reference photo that starts this scene. Scene 1 needs one; later scenes "
        "without one continue from the previous clip's last frame.")
    motion_prompt: Prompt = Field(description="What happens in this scene's clip.")
    seed: Seed | None = Field(None, description="Seed for this scene (edit and clip); unset: drawn.")


class Storyboard(Strict):
    """A sequence of scenes over one reference photo, stitched into one video."""

    reference: ImageRef = Field(description="The person's photo (path or fsspec URI).")
    scenes: list[StoryboardScene] = Field(min_length=1, max_length=50, description="The scenes, in order.")
    num_frames: FrameCount = Field(81, description="Frames per clip, 4k+1.")
    fps: int = Field(16, ge=4, le=60, description="Frames per second of every clip and the stitched video.")
    max_attempts: int = Field(1, ge=1, le=5, description="Tries per scene (a new seed each) before it fails.")
    min_identity: Literal["Drifted", "Good", "Excellent"] | None = Field(
        None, description="Try a scene again (new seed) while its clip grades below this against the reference.")
    chain_from_lost: bool = Field(False, description="Continue from a last frame whose face graded Lost (or shows "
                                  "none); by default such a scene is not chained from.")
    profile: str | None = Field(None, description="Edit model profile.", json_schema_extra=ConfiguredChoices("profile"))
    video_profile: str | None = Field(None, description="Video model profile.",
                                      json_schema_extra=ConfiguredChoices("video_profile"))
    storage_root: str | None = Field(None, description="Where the run is written.",
                                     json_schema_extra=ConfiguredChoices("storage_root"))

    @model_validator(mode="after")
    def _first_scene_edits(self) -> Storyboard:
        if self.scenes[0].edit_prompt is None:
            raise ValueError("scenes[0].edit_prompt is required: the first scene starts from an edit")
        return self
