"""Field types every schema shares: seeds, prompts, URIs, frame counts, and the strict base model."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from recast.tasks.frames import MAX_FRAMES, MIN_FRAMES, check_frame_count

MAX_SEED = 2**32 - 1
# What recast.flows.runs.new_run_id makes. A run id is the one part of a run's folder that comes from a request or a
# file (resume, plan.json, handoff.json), so it must never be anything else: no '/', no '..'.
RUN_ID_PATTERN = r"^\d{8}-\d{6}-[0-9a-f]{6}$"
MAX_INPUT_IMAGES = 3

Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]

# A URI with credentials in it (scheme://user:password@host/...) is refused by the request schema itself: the Prefect
# server checks a deployment run's parameters against this pattern when the run is created, so such a request is
# turned away before the server stores its parameters (and the secret with them) in its database.
_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/]*@")
NO_CREDENTIALS_PATTERN = rf"^(?!{_CREDENTIALS.pattern})"


def _no_credentials(uri: str) -> str:
    if _CREDENTIALS.match(uri):
        raise ValueError("the URI carries credentials (user:password@): drop them; workers read credentials from "
                         "their environment or config files")
    return uri


ImageRef = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1), AfterValidator(_no_credentials),
                     Field(json_schema_extra={"pattern": NO_CREDENTIALS_PATTERN})]
FrameCount = Annotated[int, Field(ge=MIN_FRAMES, le=MAX_FRAMES), AfterValidator(check_frame_count)]


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a request or a config is reported, never ignored."""

    model_config = ConfigDict(extra="forbid")
