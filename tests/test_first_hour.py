"""A new user's first hour: what broke or confused when the product was tried from the README and --help alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recast.flows.cli import main
from recast.tasks import prompts, storage
from recast.tasks.errors import BadInput

pytestmark = pytest.mark.usefixtures("prefect_server")
RECAST = str(Path(sys.executable).parent / "recast")


_API: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _shared_server(api_server):
    _API["url"] = api_server  # CLI runs below talk to one server instead of each starting its own


def _run(args, env_extra=None, **kw):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_LOGGING_LEVEL"}  # as a user's shell has it
    env.update(PREFECT_API_URL=_API["url"], **(env_extra or {}))
    return subprocess.run([RECAST, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


def test_animate_at_480p_works_on_the_default_profile(astronaut, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RECAST_HANDOFF__MODE", "none")
    assert main(["edit", str(astronaut), "--prompt", "James Bond 007", "--seed", "4", "--steps", "2",
                 "--storage", str(tmp_path)]) == 0
    handoff = storage.read_json(capsys.readouterr().out.strip().splitlines()[-1])["handoff"]
    code = main(["animate", handoff, "--num-frames", "9", "--fps", "16", "--resolution", "480p", "--json",
                 "--storage", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    clip = json.loads(out)["clips"][0]
    assert clip["width"] * clip["height"] == pytest.approx(832 * 480, rel=0.1), "480p is 832x480's area"


def test_an_unknown_video_profile_is_refused_before_anything_runs(astronaut, tmp_path, capsys):
    code = main(["edit", str(astronaut), "--prompt", "x", "--video-profile", "wan99", "--storage", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "video_profile='wan99'" in err and "wan22-lightning" in err, err
    assert not (tmp_path / "s").exists()


def test_a_missed_identity_target_says_so_exits_3_and_hands_nothing_to_video(astronaut, tmp_path, capsys,
                                                                               monkeypatch):
    # The tiny model's random weights draw no face: every attempt grades Lost.
    code = main(["edit", str(astronaut), "--prompt", "Top Gun flight suit", "--min-identity", "Good",
                 "--max-attempts", "2", "--seed", "1", "--steps", "2", "--storage", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 3, err[-2000:]
    assert "identity target Good not met" in err and "nothing was handed to video" in err
    manifest = storage.read_json(out.strip().splitlines()[-1])
    assert manifest["status"] == "identity_not_met" and manifest["identity_target"]["met"] is False
    assert [e["attempt"] for e in manifest["edits"]] == [1, 2], "each retry is shown with its attempt number"
    assert manifest["handoff"] is None and manifest["animation"] is None, "a Lost frame must not go to video"
    assert "identity target Good: NOT met" in out
    monkeypatch.setenv("RECAST_HANDOFF__MODE", "none")
    code = main(["edit", str(astronaut), "--prompt", "Top Gun flight suit", "--min-identity", "Good",
                 "--handoff-below-target", "--seed", "1", "--steps", "2", "--storage", str(tmp_path)])
    out, _ = capsys.readouterr()
    assert code == 3 and storage.read_json(out.strip().splitlines()[-1])["handoff"], \
        "asked for, the best frame is handed over anyway"


@pytest.mark.parametrize("board,expected", [
    ({"scenes": [{"edit_prompt": "James Bond 007", "motion_promt": "he smiles"}]},
     ["scenes[0] (scene 1)", "unknown key 'motion_promt'", "did you mean 'motion_prompt'"]),
    ({"fsp": 16, "scenes": [{"edit_prompt": "James Bond 007", "motion_prompt": "he smiles"}]},
     ["unknown key 'fsp'", "did you mean 'fps'"]),
])
def test_storyboard_file_errors_name_the_file_the_scene_and_the_key(board, expected, astronaut, tmp_path, capsys):
    path = tmp_path / "board.yaml"
    path.write_text(yaml.safe_dump(board))
    code = main(["storyboard", str(path), "--image", str(astronaut), "--storage", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for needle in [str(path), *expected]:
        assert needle in err, f"{needle!r} missing from {err!r}"


def test_storyboard_help_lists_the_yaml_keys(capsys):
    with pytest.raises(SystemExit):
        main(["storyboard", "--help"])
    out = capsys.readouterr().out
    for key in ("reference:", "scenes:", "edit_prompt:", "motion_prompt:", "num_frames:", "fps:", "max_attempts:"):
        assert key in out, f"storyboard --help does not list {key}"


@pytest.mark.parametrize("where", ["file", "proc"])
def test_an_unwritable_storage_is_bad_input_before_anything_starts(where, astronaut, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    target = str(blocker / "out") if where == "file" else "/proc/recast-out"
    cache = tmp_path / "first-use-cache"  # a new user's machine: the tiny models are not built yet
    proc = _run(["edit", str(astronaut), "--prompt", "x", "--storage", target], {"RECAST_CACHE_DIR": str(cache)})
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "storage=" in proc.stderr and "fix:" in proc.stderr, \
        f"bad input must be one line, before anything starts:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert not cache.exists(), "a refused request must not build the tiny models (nothing is written)"


def test_a_direct_run_is_quiet_and_a_failure_ends_with_its_reason(astronaut, tmp_path):
    ok = _run(["edit", str(astronaut), "--prompt", "James Bond 007, tuxedo, casino, cinematic lighting", "--seed",
               "2", "--steps", "2", "--storage", str(tmp_path)], {"RECAST_HANDOFF__MODE": "none"})
    assert ok.returncode == 0, ok.stderr
    assert " | INFO " not in ok.stderr and " | INFO " not in ok.stdout, "Prefect's INFO lines leak into the terminal"
    from safetensors.torch import save_file
    import torch

    misfit = tmp_path / "misfit.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 999),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(48, 4)}, str(misfit))
    failed = _run(["edit", str(astronaut), "--prompt", "x", "--lora", str(misfit), "--steps", "2", "--storage",
                   str(tmp_path)], {"RECAST_HANDOFF__MODE": "none"})
    assert failed.returncode == 1, failed.stderr
    assert "Nones" not in failed.stdout and "no edit ran" in failed.stdout, failed.stdout
    last = failed.stderr.strip().splitlines()[-1]
    assert "does not fit this model" in last, f"the last line must give the reason, got {last!r}"
    assert "Traceback" not in failed.stderr


def test_the_demo_clip_lives_in_its_run_and_is_reproducible(astronaut, tmp_path, capsys):
    clips = []
    for _ in range(2):
        code = main(["edit", str(astronaut), "--prompt", "James Bond 007, tuxedo, casino, cinematic lighting",
                     "--seed", "42", "--steps", "2", "--storage", str(tmp_path), "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err[-2000:]
        manifest = json.loads(out)
        clip = manifest["animation"]["clips"][0]["output"]
        assert clip.startswith(manifest["folder"] + "/clips/"), "the clip must land in the edit run's own folder"
        clips.append(storage.read_bytes(clip))
    assert clips[0] == clips[1], "two identical runs must give the same clip (the handoff's seed animates)"


def test_the_run_summary_names_the_model_without_none(astronaut, memory_root):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from recast.flows.edit import edit_flow
    from recast.flows.runs import run_flow
    from recast.tasks.schemas.requests import EditRequest

    manifest = run_flow(edit_flow, EditRequest(images=[str(astronaut)], prompts=["x"], seeds=[1], steps=2,
                                     storage_root=memory_root))
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["recast-edit-summary"])))
    summary = next(a for a in found if str(a.flow_run_id) == manifest["prefect"]["flow_run_id"]).data
    assert "@ `None`" not in summary and "(built locally, no revision)" in summary, summary


def test_help_version_and_descriptions(capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    edit_help = capsys.readouterr().out.replace("\n", " ")
    assert "[1..100]" in edit_help and "[0..4294967295]" in edit_help, "edit --help must show the bounds"
    assert "choices: " in edit_help and "tiny" in edit_help
    for command in ("identity", "worker"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert len(capsys.readouterr().out.split("\n\n")[1]) > 40, f"`recast {command} --help` has no description"
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("recast ")


def test_every_missing_template_field_is_named_at_once():
    with pytest.raises(BadInput) as error:
        prompts.fill("character", {"character": "Neo"})
    assert "'costume', 'background'" in str(error.value) and 'background="casino background"' in str(error.value)


def test_a_lora_weight_that_is_not_a_number_says_so(astronaut, tmp_path, capsys):
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"x")
    code = main(["edit", str(astronaut), "--prompt", "x", "--lora", f"{path}@abc", "--storage", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "'abc') is not a number" in err and "does not exist" not in err, err


def test_no_face_is_not_a_confident_score(capsys):
    assert main(["identity", "tests/data/faces/obama.jpg", "tests/data/faces/coffee.jpg", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["grade"] == "Lost" and row["confident"] is False
    assert row["score"] is None, "a picture without a face has no score (not 0.000), as a clip's faceless frames"


def test_the_readme_prompts_pass_the_prompt_check():
    import re

    from test_readme import pages_text

    readme = pages_text()  # the README and the docs pages it sends a user to

    quoted = re.findall(r'--prompt "([^"]+)"', readme)
    assert quoted, "the README shows no --prompt"
    for prompt in quoted:
        if prompt != "...":
            assert prompts.check(prompt) == [], f"the README's own prompt trips the check: {prompt!r}"


def test_storyboard_prompts_are_checked_too(astronaut, tmp_path, capsys, monkeypatch):
    path = tmp_path / "board.yaml"
    path.write_text(yaml.safe_dump({"num_frames": 5, "fps": 8, "scenes": [
        {"edit_prompt": "Stranger Things", "motion_prompt": "he smiles", "seed": 1}]}))
    assert main(["storyboard", str(path), "--image", str(astronaut), "--storage", str(tmp_path / "s")]) == 0
    assert "scene 1 edit_prompt 'Stranger Things'" in capsys.readouterr().err


def test_the_contact_sheet_shows_the_prompt_theme(astronaut, memory_root):
    from PIL import Image

    from recast.tasks.sheets import contact_sheet
    from recast.tasks.schemas.manifests import EditRecord, IdentityRecord

    png = storage.join(memory_root, "e.png")
    storage.write_bytes(png, astronaut.read_bytes())
    record = EditRecord(edit_id="e", status="succeeded", prompt="James Bond 007, tuxedo", negative_prompt=" ", seed=1,
                        steps=2, true_cfg_scale=4, inputs=[], output=png, width=64, height=64, seconds=1.0,
                        identity=IdentityRecord(grade="Good", score=0.6))
    labelled = contact_sheet(astronaut.read_bytes(), [record])
    unlabelled = contact_sheet(astronaut.read_bytes(), [record.model_copy(update=dict(prompt="x"))])
    assert isinstance(labelled, Image.Image) and labelled.tobytes() != unlabelled.tobytes(), \
        "the sheet must label each edit with its prompt's theme"


def test_help_lists_only_real_choices_and_a_misspelt_flag_gets_a_suggestion(astronaut, capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    edit_help = " ".join(capsys.readouterr().out.split())
    assert "choices: --prompt" not in edit_help and "choices: positional" not in edit_help, \
        "--help must not show a field's CLI hints as its choices"
    assert "the CLI may name any folder" in edit_help, "--storage must not read as if only one root were allowed"
    with pytest.raises(SystemExit) as exit_:
        main(["edit", str(astronaut), "--promt", "Neo"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "did you mean --prompt?" in err, err


@pytest.mark.parametrize("command", [["--version"], ["identity", "a.png", "b.png"], ["edit", "a.png", "--prompt", "x"]])
def test_a_misspelt_recast_variable_is_one_line_for_every_command(command):
    proc = _run(command, {"RECAST_STORAGE_ROT": "x"})
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "did you mean RECAST_STORAGE_ROOT" in proc.stderr


def test_progress_is_a_plain_line_per_edit_when_stderr_is_a_file(astronaut, tmp_path):
    proc = _run(["edit", str(astronaut), "--prompt", "Neo, black trench coat, green rain, neon light", "--seed", "1",
                 "--seed", "2", "--steps", "2", "--storage", str(tmp_path)], {"RECAST_HANDOFF__MODE": "none"})
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "edits done" in line]
    assert lines == ["recast: 1/2 edits done", "recast: 2/2 edits done"], proc.stderr


def test_a_skipped_scene_says_why_in_the_summary(astronaut, tmp_path, capsys):
    """The tiny model draws no face, so the README's second scene is not chained from a faceless last frame: the
    summary line says so, not 'None'."""
    path = tmp_path / "board.yaml"
    path.write_text(yaml.safe_dump({"num_frames": 5, "fps": 8, "scenes": [
        {"edit_prompt": "James Bond 007, tuxedo, casino background, cinematic lighting", "motion_prompt": "he smiles",
         "seed": 1}, {"motion_prompt": "he turns"}]}))
    assert main(["storyboard", str(path), "--image", str(astronaut), "--storage", str(tmp_path / "s")]) == 0
    scene_2 = next(line for line in capsys.readouterr().out.splitlines() if "scene 2:" in line)
    assert "skipped" in scene_2 and "None" not in scene_2 and "chained from" in scene_2, scene_2


def test_a_first_run_and_a_rounded_frame_count_say_each_thing_once(astronaut, tmp_path):
    """A new user's first command builds the tiny models (no progress bars for that), and a frame count that is
    rounded is warned about once, not by the CLI and again by the flow."""
    env = {"RECAST_HANDOFF__MODE": "none", "RECAST_CACHE_DIR": str(tmp_path / "fresh-cache")}
    edit = _run(["edit", str(astronaut), "--prompt", "Neo, black trench coat, green rain, neon light", "--seed", "1",
                 "--steps", "2", "--storage", str(tmp_path / "s"), "--json"], env)
    assert edit.returncode == 0, edit.stderr
    assert "Writing model shards" not in edit.stderr and "Loading weights" not in edit.stderr, edit.stderr
    handoff = json.loads(edit.stdout)["handoff"]
    clip = _run(["animate", handoff, "--num-frames", "18", "--storage", str(tmp_path / "v")], env)
    assert clip.returncode == 0, clip.stderr
    assert clip.stderr.count("num_frames") == 1, f"the rounding must be said once:\n{clip.stderr}"
