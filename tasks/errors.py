"""Errors a user can act on. The CLI turns BadInput into exit 2 and one line on stderr."""

from __future__ import annotations


class BadInput(ValueError):
    """Input that cannot run: names the field, the value received and how to fix it."""

    def __init__(self, field: str, value: object, problem: str, fix: str):
        self.field, self.value, self.problem, self.fix = field, value, problem, fix
        shown = repr(value) if not isinstance(value, str) or len(value) < 200 else repr(value[:200] + "...")
        super().__init__(f"{field}={shown}: {problem}; fix: {fix}")


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded here (not cached, hub unreachable): says what to set."""
