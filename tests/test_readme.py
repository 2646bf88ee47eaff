"""The README and the docs pages it sends a user to are executable: every command in their bash blocks that runs on
the tiny profile is run here, as a user would type it, in a folder holding the files it names. A command may say
`# exits N` when N is what it should end with; the rest must exit 0. What is not run says why (SKIPPED)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
# Commands that do not end by themselves or need what this machine has not, and where they are tested instead.
SKIPPED = {
    "recast worker": "a long-running worker: tests/test_workers.py runs workers as real processes",
    "make serve": "long-running: tests/test_faults.py starts and stops it",
    "recast gallery": "long-running: tests/test_gallery.py serves runs to a real browser",
    "make test": "the suite itself",
    "s3://": "needs a bucket",
    "gs://": "needs a bucket",
    "'.[sage]'": "builds a CUDA extension from GitHub: needs nvcc; built and measured on an H200 (docs/PERFORMANCE.md)",
    "'.[fa3]'": "builds FlashAttention-3's Hopper extension from GitHub: needs nvcc; built and measured on an H100 "
                "(docs/PERFORMANCE.md)",
}


PAGES = ["README.md", "docs/USING.md", "docs/OPERATING.md", "docs/PROFILES.md"]


def pages_text() -> str:
    return "\n".join((REPO / page).read_text() for page in PAGES)


def readme_commands() -> list[tuple[str, int]]:
    """(command, expected exit code) for every command line in the bash blocks of the README and its docs pages."""
    text = pages_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            expected = re.search(r"#.*\bexits (\d+)", line)
            commands.append((line, int(expected.group(1)) if expected else 0))
    return commands


def _skip_reason(command: str) -> str | None:
    return next((why for needle, why in SKIPPED.items() if needle in command), None)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, astronaut):
    """A user's folder with the files the README's commands name."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("readme")
    faces = REPO / "tests" / "data" / "faces"
    with Image.open(astronaut) as img:
        img.convert("RGB").save(folder / "photo.jpg", quality=92)
    shutil.copy(faces / "obama.jpg", folder / "me.jpg")
    for name, source in (("edit1.png", "obama2.jpg"), ("edit2.png", "biden.jpg")):
        with Image.open(faces / source) as img:
            img.save(folder / name)
    text = pages_text()
    board = next(b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "scenes:" in b)
    yaml.safe_load(board)  # the README's storyboard is valid YAML
    (folder / "storyboard.yaml").write_text(board)
    from test_lora import make_lora

    (folder / "style").mkdir()
    shutil.copy(make_lora(folder / "style", seed=3), folder / "style.safetensors")
    return folder


def test_every_readme_command_runs_as_shown(workspace, prefect_server, monkeypatch, capsys):
    """`recast ...` lines run through the CLI's own main() in this process (the same argv, the folder as cwd; a
    new process per line would cost seconds each), `make demo` as a process."""
    from recast.flows.cli import main

    # RECAST_CLI_SERVER stays (temporary, conftest): `make demo` leaves no background server behind in the suite
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RECAST_") or k in ("RECAST_CACHE_DIR", "RECAST_CLI_SERVER")}
    env.update(RECAST_STORAGE_ROOT=str(workspace / "artifacts"))
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("RECAST_STORAGE_ROOT", str(workspace / "artifacts"))
    ran, skipped = [], []
    for command, expected in readme_commands():
        reason = _skip_reason(command)
        if reason:
            skipped.append((command, reason))
            continue
        if "<run_id>" in command:
            runs = sorted((workspace / "artifacts" / "runs").glob("*/handoff.json"), key=lambda p: p.stat().st_mtime)
            assert runs, f"{command!r} needs an edit run before it"
            command = command.replace("<run_id>", runs[-1].parent.name)
        args = shlex.split(command, comments=True)
        if args[0] == ".venv/bin/recast":
            try:
                code = main(args[1:])
            except SystemExit as exit_:  # --help
                code = exit_.code
            out, err = capsys.readouterr()
        elif args[:2] == ["make", "demo"]:
            proc = subprocess.run(["make", "-C", str(REPO), "demo"], cwd=workspace, env=env, capture_output=True,
                                  text=True, timeout=600)
            code, err = proc.returncode, proc.stderr
        else:
            raise AssertionError(f"the README shows a command this test does not know how to run: {command!r}")
        assert code == expected, f"`{command}` exited {code}, the README promises {expected}:\n{err[-2000:]}"
        assert "Traceback" not in err, f"`{command}` printed a traceback:\n{err[-2000:]}"
        ran.append(command)
    assert len(ran) >= 10, f"only {len(ran)} README commands ran: {ran}"
    assert all(reason for _, reason in skipped)
