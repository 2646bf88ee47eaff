"""recast as users install it: a built wheel, installed (not editable) into a fresh venv, run from another folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _source_copy(target: Path) -> Path:
    """What the build reads (pyproject, README, the three package folders), away from the checkout's own
    build leftovers and caches."""
    for name in ("pyproject.toml", "README.md"):
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target / name)
    for folder in ("flows", "tasks", "configs"):
        shutil.copytree(REPO / folder, target / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def test_wheel_installs_into_a_fresh_venv_and_runs_the_embedded_default_from_any_folder(tmp_path, astronaut, api_server):
    source = _source_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = dist.glob("recast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("recast/flows/cli.py", "recast/tasks/models/tiny.py", "recast/configs/defaults.yaml",
                     "recast/configs/profiles.yaml", "recast/configs/video_profiles.yaml", "recast/configs/prompts.yaml"):
        assert expected in names, f"the wheel lacks {expected}"
    assert not any(n.startswith(("flows/", "tasks/", "configs/")) for n in names), \
        "the wheel must install one import name, recast, not the generic flows/tasks packages"

    # A fresh venv with only the wheel installed; its dependencies come from this venv's site-packages as a
    # plain path (not as a site dir: this venv's editable-install hook is not loaded there).
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    fresh_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    Path(fresh_site, "recast-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECAST_") or k == "RECAST_CACHE_DIR"}
    env["PREFECT_API_URL"] = api_server  # the session's server: a temporary one costs seconds (README demo runs one)
    where = subprocess.run([str(python), "-c", "import recast.tasks, recast.configs; print(recast.tasks.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(fresh_site), f"recast was imported from {where}, not from the installed wheel"

    run = subprocess.run([str(venv / "bin" / "recast"), "edit", str(astronaut), "--prompt",
                          "James Bond 007, wearing a tuxedo with bow tie, casino background, cinematic lighting",
                          "--seed", "1", "--steps", "2", "--storage", "out", "--json"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads(run.stdout)
    assert manifest["status"] == "succeeded" and manifest["model"]["id"] == "tiny", manifest["status"]
    assert manifest["folder"].startswith(f"file://{elsewhere}/out/runs/"), "relative storage resolves from the cwd"
    assert manifest["animation"]["status"] == "succeeded", \
        f"the installed package runs the video stage too: {json.dumps(manifest['animation'])[:1500]}"
    assert (elsewhere / "out" / "runs" / manifest["run_id"] / "manifest.json").exists()


def test_the_worker_image_runs_the_cuda_the_pinned_torch_is_built_for():
    """The Dockerfile's CUDA base must match the pinned torch wheel's CUDA (a CUDA 12 base under a CUDA 13 torch
    fails on the first kernel), and its bake step must name the profiles it is given."""
    import re

    import torch

    dockerfile = (Path(__file__).resolve().parent.parent / "deployments" / "Dockerfile").read_text()
    bases = re.findall(r"^FROM nvidia/cuda:(\d+)\.", dockerfile, flags=re.M)
    assert bases and torch.version.cuda, "the worker image must start from an NVIDIA CUDA base"
    assert all(base == torch.version.cuda.split(".")[0] for base in bases), \
        f"CUDA base {bases} under torch built for CUDA {torch.version.cuda}"
    for stage in ("worker", "flow-runner"):
        assert re.search(rf"^FROM \S+ AS {stage}$", dockerfile, flags=re.M), f"no {stage} image"
    assert "BAKE_PROFILES" in dockerfile and "hf_hub_download(spec.source" in dockerfile, \
        "baking must fetch each profile's model and its LoRA files"
