"""Settings: configs/*.yaml, then RECAST_* environment variables on top, validated by pydantic.

Environment variables name a key path joined by "__" (RECAST_PROFILES__BF16__MODEL_ID) and their values
are parsed as YAML, so RECAST_EDIT__STEPS=4 is the integer 4.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from recast.tasks.errors import first_error
from recast.tasks.schemas.settings import Settings


class ConfigError(ValueError):
    """The YAML or RECAST_* environment does not validate."""


ENV_PREFIX = "RECAST_"
# Variables that are not settings keys (read elsewhere) and must not be merged into the YAML tree.
# The rule for RECAST_* variables: each names a setting (its first part is a key of configs/defaults.yaml, e.g.
# RECAST_EDIT__STEPS), or is one of these, which recast documents and reads elsewhere. Any other RECAST_* name is
# refused with the closest setting's name, so a typo never silently does nothing.
NOT_SETTINGS = {
    "RECAST_CONFIG_DIR": "a folder of YAML to use instead of the shipped configs",
    "RECAST_CACHE_DIR": "where the tiny models are built (default ~/.cache/recast)",
    "RECAST_ROOT": "the checkout deployments run from (deployments/prefect.yaml)",
    "RECAST_INCOMING": "the folder the scheduled batch deployment scans",
    "RECAST_SERVE_PORT": "the port `make serve` starts the Prefect server on",
    "RECAST_SERVE_DATABASE": "`make serve` on PostgreSQL: postgres, or a connection URL",
    "RECAST_POSTGRES_BIN": "the PostgreSQL bin folder deployments/postgres.sh runs (default: Debian's)",
    "RECAST_SERVE_LOG_LEVEL": "the log level of `make serve`'s workers and runs (default INFO)",
    "RECAST_SERVE_GALLERY_PORT": "the port `make serve` starts the gallery on (default: the server's + 100)",
    "RECAST_SERVE_SESSION": "set by `make serve` on everything it starts, so that stopping it finds them all",
    "RECAST_FLOW_RUN_FORKS": "set by `make serve`: the server its flow runs are forked from (recast.flows.forks)",
}


def config_dir() -> Path:
    """RECAST_CONFIG_DIR, else the YAML shipped inside the package (recast.configs), wherever it is installed."""
    if "RECAST_CONFIG_DIR" in os.environ:
        return Path(os.environ["RECAST_CONFIG_DIR"])
    return Path(str(resources.files("recast.configs")))


def _read_yaml(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _existing_key(tree: dict[str, Any], key: str) -> str:
    """The tree's own spelling of `key`: environment names cannot hold '-', so WAN22_LIGHTNING is wan22-lightning."""
    return next((k for k in tree if k.replace("-", "_").lower() == key), key)


def _set_path(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        key = _existing_key(tree, key)
        node = tree.get(key)
        if not isinstance(node, dict):
            node = tree[key] = {}
        tree = node
    tree[_existing_key(tree, keys[-1])] = value


def _env_overrides(environ: dict[str, str]) -> list[tuple[list[str], Any]]:
    import difflib

    overrides = []
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX):].split("__") if k]
        if not keys:
            continue
        if keys[0] not in Settings.model_fields:
            known = [f"{ENV_PREFIX}{field.upper()}" for field in Settings.model_fields] + list(NOT_SETTINGS)
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"environment variable {name} is not a recast setting; {hint}settings are the keys of "
                              f"configs/defaults.yaml (RECAST_<KEY>, nested keys joined by __), other RECAST_* "
                              f"variables recast reads: {', '.join(sorted(NOT_SETTINGS))}")
        overrides.append((keys, yaml.safe_load(raw) if raw.strip() else raw))
    return overrides


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Read defaults.yaml, profiles.yaml and video_profiles.yaml, apply RECAST_* variables, validate."""
    folder = config_dir()
    tree = _read_yaml(folder / "defaults.yaml")
    profiles = _read_yaml(folder / "profiles.yaml")
    for name, profile in profiles.items():
        profile.setdefault("name", name)
    tree["profiles"] = profiles
    video_profiles = _read_yaml(folder / "video_profiles.yaml")
    for name, profile in video_profiles.items():
        profile.setdefault("name", name)
    tree["video_profiles"] = video_profiles
    for keys, value in _env_overrides(dict(os.environ if environ is None else environ)):
        _set_path(tree, keys, value)
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        where, value, message, _ = first_error(exc)
        raise ConfigError(f"configuration {where}={value!r}: {message}; fix configs/*.yaml or the "
                          f"RECAST_{where.upper().replace('.', '__')} environment variable") from None


@lru_cache(maxsize=1)
def _cached(env_key: tuple[tuple[str, str], ...]) -> Settings:
    return load_settings(dict(env_key))


def get_settings() -> Settings:
    """Settings for the current environment (re-read when a RECAST_* variable changes)."""
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIX)))
    return _cached(key)


def cache_dir() -> Path:
    """Where locally built (tiny) models live: RECAST_CACHE_DIR, else XDG_CACHE_HOME/recast."""
    if "RECAST_CACHE_DIR" in os.environ:
        return Path(os.environ["RECAST_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "recast"
