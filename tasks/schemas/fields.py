"""Field types every schema shares: seeds, prompts, URIs, frame counts, and the strict base model."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from recast.tasks.frames import MAX_FRAMES, MIN_FRAMES, check_frame_count

MAX_SEED = 2**32 - 1
MAX_INPUT_IMAGES = 3

Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
ImageRef = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
FrameCount = Annotated[int, Field(ge=MIN_FRAMES, le=MAX_FRAMES), AfterValidator(check_frame_count)]


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a request or a config is reported, never ignored."""

    model_config = ConfigDict(extra="forbid")
