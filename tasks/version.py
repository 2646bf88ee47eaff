"""The code version a flow and its task workers must share (Prefect pairs them by task source alone)."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of recast's code and configs: flow and worker must agree on it."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("tasks/*.py"), *root.glob("flows/*.py"), *root.glob("configs/*.yaml")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def check_code_version(job: Any) -> None:
    """Called by the task body: refuse a job submitted by a flow running other code."""
    wanted = getattr(job, "code_version", None)
    if wanted and wanted != code_version():
        raise VersionMismatch(f"this job comes from recast code {wanted}, but this worker runs {code_version()}: "
                              "deploy the same recast version to flows and workers")


class VersionMismatch(RuntimeError):
    pass
