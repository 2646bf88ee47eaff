"""The code version a flow and its task workers must share (Prefect pairs them by task source alone)."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from recast.tasks.errors import Permanent

PACKAGES = ("recast.tasks", "recast.flows", "recast.configs")


@lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of recast's code and configs, wherever installed: flow and worker must agree on it."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        root = Path(str(resources.files(package)))
        for path in sorted([*root.rglob("*.py"), *root.rglob("*.yaml")]):
            digest.update(f"{package}/{path.relative_to(root).as_posix()}".encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def check_code_version(job: Any) -> None:
    """Called by the task body: refuse a job submitted by a flow running other code."""
    wanted = getattr(job, "code_version", None)
    if wanted and wanted != code_version():
        raise VersionMismatch(f"this job comes from recast code {wanted}, but this worker runs {code_version()}: "
                              "deploy the same recast version to flows and workers")


class VersionMismatch(Permanent, RuntimeError):
    """A job from a flow that runs other recast code than this worker."""
