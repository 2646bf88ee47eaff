"""Errors a user can act on. The CLI turns BadInput into exit 2 and one line on stderr."""

from __future__ import annotations

import re

_CREDENTIALS = re.compile(r"(://)[^/@\s]*@")


def without_credentials(value: object) -> object:
    """A value as it may be shown: any URI's user:password@ part dropped (messages echo what they were given)."""
    return _CREDENTIALS.sub(r"\1", value) if isinstance(value, str) else value


class BadInput(ValueError):
    """Input that cannot run: names the field, the value received and how to fix it."""

    def __init__(self, field: str, value: object, problem: str, fix: str):
        value = without_credentials(value)
        self.field, self.value, self.problem, self.fix = field, value, problem, fix
        shown = repr(value) if not isinstance(value, str) or len(value) < 200 else repr(value[:200] + "...")
        super().__init__(f"{field}={shown}: {problem}; fix: {fix}")


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded here (not cached, hub unreachable): says what to set."""


def first_error(exc) -> tuple[str, object, str, str]:
    """A pydantic ValidationError's first problem as (dotted location, value received, message, error type).

    A missing field has no value: it is reported as '(missing)'."""
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"])
    value = "(missing)" if err["type"] == "missing" else without_credentials(err.get("input"))
    return where, value, err["msg"], err["type"]


class Permanent(Exception):
    """An error another try cannot fix: a bad file, another code version, a profile this worker does not serve."""


def is_transient(exc: BaseException | None) -> bool:
    """Storage and network hiccups are worth another try; bad input, CUDA OOM or a model bug are not."""
    if isinstance(exc, (Permanent, BadInput)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    # OSError covers both flaky network filesystems and plain bugs; errno-less ones come from drivers.
    return isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError))


def retry_only_transient(task, task_run, state) -> bool:
    """A Prefect retry_condition_fn: retry a task run only for a transient error."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return is_transient(exc)
