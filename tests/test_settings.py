"""Configuration: YAML defaults and profiles, RECAST_* overrides, and failing fast on the real model."""

from __future__ import annotations

import os
import subprocess
import sys

from recast.tasks.settings import load_settings


def test_defaults_pin_the_real_model_and_the_origin_recipe():
    settings = load_settings({})
    real = settings.profiles["bf16"]
    assert real.model_id == "Qwen/Qwen-Image-Edit-2511"
    assert real.revision and len(real.revision) == 40, "the real model must be pinned to a commit"
    assert real.dtype == "bfloat16" and real.device == "cuda"
    assert (settings.edit.steps, settings.edit.true_cfg_scale, settings.edit.negative_prompt) == (8, 4.0, " ")
    assert settings.profile == "tiny" and settings.storage_root == "./artifacts"


def test_environment_overrides_yaml():
    settings = load_settings({"RECAST_EDIT__STEPS": "3", "RECAST_PROFILE": "bf16",
                              "RECAST_PROFILES__BF16__MODEL_ID": "/models/qwen", "RECAST_STORAGE_ROOT": "s3://b/r"})
    assert settings.edit.steps == 3 and settings.profile == "bf16"
    assert settings.profiles["bf16"].model_id == "/models/qwen" and settings.storage_root == "s3://b/r"


def test_bad_override_names_the_field():
    try:
        load_settings({"RECAST_EDIT__STEPS": "0"})
    except ValueError as exc:
        assert "edit.steps=0" in str(exc) and "RECAST_EDIT__STEPS" in str(exc), str(exc)
    else:
        raise AssertionError("steps=0 from the environment must be refused")


def test_real_model_without_cache_or_hub_fails_fast_with_what_to_set(tmp_path, astronaut):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9",
               RECAST_PROFILES__BF16__DEVICE="cpu")
    env.pop("HF_HUB_OFFLINE", None)
    recast = os.path.join(os.path.dirname(sys.executable), "recast")
    # Failing fast is the process ending on its own (a download attempt would retry and wait); how fast is not
    # bounded here: a cold torch import on a busy machine takes what it takes.
    proc = subprocess.run([recast, "edit", str(astronaut), "--prompt", "x", "--profile", "bf16",
                           "--storage", str(tmp_path / "s")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "HF_HOME" in proc.stderr and "Qwen/Qwen-Image-Edit-2511" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "s").exists(), "nothing may be written when the model is unavailable"


def test_gpu_profile_on_a_cpu_machine_says_so(tmp_path, astronaut, capsys):
    import torch

    if torch.cuda.is_available():
        return
    from recast.flows.cli import main

    code = main(["edit", str(astronaut), "--prompt", "x", "--profile", "bf16", "--storage", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 1 and "no CUDA GPU" in err and "--profile tiny" in err, err
