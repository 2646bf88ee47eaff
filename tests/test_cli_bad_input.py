"""Bad input through the CLI: exit 2, one line naming the field, the value and the fix, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

from recast.flows.cli import main


@pytest.fixture
def bad_files(tmp_path, astronaut):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(astronaut.read_bytes()[:20000])
    bomb = tmp_path / "bomb.png"
    # 9000 x 9000 = 81 Mpx of one colour: a few hundred kB on disk, over the 40 Mpx limit.
    Image.new("L", (9000, 9000)).save(bomb, optimize=True)
    return dict(empty=empty, text=text, truncated=truncated, bomb=bomb)


def run_cli(args: list[str], storage_root, capsys) -> tuple[int, str, str]:
    code = main(["edit", *args, "--storage", str(storage_root)])
    out, err = capsys.readouterr()
    return code, out, err


CASES = {
    "missing file": (lambda f, a: ["/no/such/photo.png", "--prompt", "x"], ["images[0]", "does not exist"]),
    "zero-byte file": (lambda f, a: [f["empty"], "--prompt", "x"], ["images[0]", "empty"]),
    "not an image": (lambda f, a: [f["text"], "--prompt", "x"], ["images[0]", "not an image"]),
    "truncated image": (lambda f, a: [f["truncated"], "--prompt", "x"], ["images[0]", "truncated"]),
    "decompression bomb": (lambda f, a: [f["bomb"], "--prompt", "x"], ["images[0]", "pixels", "limit"]),
    "more than 3 images": (lambda f, a: [a, a, a, a, "--prompt", "x"], ["IMAGE", "at most 3"]),
    "unsupported scheme": (lambda f, a: ["http://127.0.0.1:9/a.png", "--prompt", "x"], ["images[0]", "http://"]),
    "empty prompt": (lambda f, a: [a, "--prompt", "   "], ["--prompt", "at least 1 character"]),
    "no prompt": (lambda f, a: [a], ["--prompt", "give a non-empty --prompt"]),
    "steps 0": (lambda f, a: [a, "--prompt", "x", "--steps", "0"], ["--steps=0", "from 1 to 100"]),
    "steps 101": (lambda f, a: [a, "--prompt", "x", "--steps", "101"], ["--steps=101", "from 1 to 100"]),
    "seed negative": (lambda f, a: [a, "--prompt", "x", "--seed", "-1"], ["--seed=-1", "4294967295"]),
    "seed too big": (lambda f, a: [a, "--prompt", "x", "--seed", str(2**32)], ["--seed=4294967296", "from 0"]),
    "cfg below 1": (lambda f, a: [a, "--prompt", "x", "--true-cfg-scale", "0.5"],
                    ["--true-cfg-scale=0.5", "from 1.0"]),
    "unknown profile": (lambda f, a: [a, "--prompt", "x", "--profile", "nope"], ["profile='nope'", "tiny"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, bad_files, astronaut, tmp_path, capsys):
    make_args, expected = CASES[case]
    root = tmp_path / "store"
    code, out, err = run_cli([str(x) for x in make_args(bad_files, astronaut)], root, capsys)
    assert code == 2, f"{case}: expected exit 2 (bad input), got {code}; stderr: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"{case}: expected one line on stderr, got: {err!r}"
    for needle in expected:
        assert needle in lines[0], f"{case}: {needle!r} missing from {lines[0]!r}"
    assert "fix:" in lines[0], f"{case}: the message must say how to fix it: {lines[0]!r}"
    assert not root.exists(), f"{case}: something was written under the storage root"


def test_console_script_exit_code_and_clean_stderr(tmp_path):
    """The installed `recast` command, as a user runs it."""
    recast = os.path.join(os.path.dirname(sys.executable), "recast")
    proc = subprocess.run([recast, "edit", "/no/such.png", "--prompt", "x", "--storage", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists()


def test_the_console_script_exits_with_an_executor_nobody_shut_down_after_its_work_is_done(tmp_path):
    """`recast prepare --compile` once never exited: the console script joins the threads that must finish before
    it ends, and inductor's compile thread pool (never shut down) waited on its queue forever. An executor left
    open must not keep the command from exiting, and work still running in it finishes first."""
    done = tmp_path / "done"
    script = f"""
import concurrent.futures, time
from recast.flows import cli
pool = concurrent.futures.ThreadPoolExecutor(2)
pool.submit(lambda: None).result()
pool.submit(lambda: (time.sleep(0.3), open({str(done)!r}, "w").write("written")))
cli.main = lambda: 0
cli.run()
"""
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the console script never exited: it waited on an idle executor's workers")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert done.exists() and done.read_text() == "written", "work still running at exit was cut off"


def test_serve_refuses_a_flow_run_limit_below_one_before_starting_anything(tmp_path, monkeypatch, capsys):
    """`recast serve --flow-runs-at-once 0` would leave every run scheduled forever: one line, exit 2, and no server,
    Prefect home or log folder made."""
    home = tmp_path / "home"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    code = main(["serve", "--flow-runs-at-once", "0"])
    out, err = capsys.readouterr()
    assert code == 2, f"expected exit 2 (bad input), got {code}; stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--flow-runs-at-once=0" in lines[0] and "fix:" in lines[0], \
        f"expected one line naming the option, the value and the fix: {err!r}"
    assert not home.exists(), "serve made its Prefect home before refusing its options"


def test_prepare_compile_refuses_a_gpu_profile_on_a_machine_without_its_gpu_before_making_anything(tmp_path,
                                                                                                  monkeypatch, capsys):
    """Compiled code is for the card it was compiled on: `recast prepare --compile` for a GPU profile where torch
    sees no GPU says so in one line (exit 2), before minutes of preparing weights it could not compile for."""
    monkeypatch.setenv("RECAST_CACHE_DIR", str(tmp_path / "cache"))
    code = main(["prepare", "--profile", "lightning", "--compile"])
    out, err = capsys.readouterr()
    assert code == 2, f"expected exit 2 (bad input), got {code}; stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--compile='lightning'" in lines[0] and "cuda" in lines[0] and "fix:" in lines[0], \
        f"expected one line naming the option, the profile, its device and the fix: {err!r}"
    assert not (tmp_path / "cache").exists(), "prepare wrote into the model cache before refusing --compile"
