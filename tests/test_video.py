"""The Wan image-to-video stage on real tiny WanImageToVideoPipelines: clips, handoff, storyboard, inline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from recast.flows.cli import main
from recast.tasks import storage
from recast.tasks.animate import animate_clip
from recast.tasks.schemas.jobs import AnimateJob

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def frame_uri(memory_root, astronaut):
    uri = storage.join(memory_root, "frames", "edited.png")
    with Image.open(astronaut) as img:
        storage.write_bytes(uri, storage.png_bytes(img.convert("RGB").resize((96, 128))))
    return uri


def _job(root, frame, clip_id, seed=1, **kw) -> AnimateJob:
    values = dict(clip_id=clip_id, video_profile="tiny", frame=frame, prompt="he smiles", negative_prompt="blurry",
                  seed=seed, steps=3, guidance_scale=5.0, num_frames=13, fps=12, width=48, height=64,
                  output=storage.join(root, "clips", f"{clip_id}.mp4"),
                  last_frame=storage.join(root, "clips", f"{clip_id}_last.png"))
    values.update(kw)
    return AnimateJob(**values)


def test_mp4_has_the_requested_frames_size_and_fps(memory_root, frame_uri):
    result = animate_clip(_job(memory_root, frame_uri, "a", num_frames=17, fps=12))
    frames, fps = storage.read_video(result.output)
    assert frames.shape == (17, 64, 48, 3), f"decoded {frames.shape}, expected 17 frames of 48x64"
    assert fps == pytest.approx(12), f"the mp4 plays at {fps} fps, not the requested 12"
    assert (result.num_frames, result.width, result.height, result.fps) == (17, 48, 64, 12)


def test_same_seed_same_frames_other_seed_differs(memory_root, frame_uri):
    a = storage.read_video(animate_clip(_job(memory_root, frame_uri, "a", seed=7)).output)[0]
    b = storage.read_video(animate_clip(_job(memory_root, frame_uri, "b", seed=7)).output)[0]
    c = storage.read_video(animate_clip(_job(memory_root, frame_uri, "c", seed=8)).output)[0]
    assert np.array_equal(a, b), "the same seed must reproduce the same frames"
    assert not np.array_equal(a, c), "another seed must give other frames"


def test_last_frame_png_is_the_clips_final_frame(memory_root, frame_uri):
    result = animate_clip(_job(memory_root, frame_uri, "last", num_frames=9))
    frames, _ = storage.read_video(result.output)
    last = np.asarray(storage.load_image(result.last_frame), dtype=np.float64)
    final, first = frames[-1].astype(np.float64), frames[0].astype(np.float64)
    error = np.abs(last - final).mean()
    assert last.shape == final.shape
    assert error < 6.0, f"last-frame PNG differs from the mp4's final frame by {error:.1f}/255 on average"
    assert error < np.abs(last - first).mean(), "the PNG is closer to the first frame than to the last"


def test_wan21_layout_with_clip_image_encoder_runs(memory_root, frame_uri, monkeypatch):
    result = animate_clip(_job(memory_root, frame_uri, "w21", video_profile="tiny-wan21", num_frames=5))
    assert storage.read_video(result.output)[0].shape[0] == 5


def _edit_run_handoff(astronaut, root, capsys, monkeypatch, extra=()) -> dict:
    monkeypatch.setenv("RECAST_HANDOFF__MODE", "none")
    assert main(["edit", str(astronaut), "--prompt", "James Bond 007", "--seed", "4", "--steps", "2",
                 "--storage", str(root), *extra]) == 0
    manifest_uri = capsys.readouterr().out.strip().splitlines()[-1]
    return storage.read_json(storage.read_json(manifest_uri)["handoff"])


def test_animate_cli_consumes_a_handoff(astronaut, tmp_path, capsys, monkeypatch):
    handoff = _edit_run_handoff(astronaut, tmp_path / "a", capsys, monkeypatch)
    handoff_uri = handoff["manifest"].replace("manifest.json", "handoff.json")
    assert main(["animate", handoff_uri, "--num-frames", "10", "--fps", "8", "--seed", "3", "--storage",
                 str(tmp_path / "v"), "--json"]) == 0
    out, err = capsys.readouterr()
    manifest = json.loads(out)
    clip = manifest["clips"][0]
    assert "num_frames=10 rounded to 9" in err, "a safely rounded frame count must be announced"
    assert clip["source_frame"] == handoff["frame"] and clip["num_frames"] == 9 and clip["fps"] == 8
    for key in ("clip_id", "prompt", "seed", "steps", "width", "height", "seconds", "output", "last_frame"):
        assert clip[key] is not None, key
    assert clip["prompt"] == handoff["motion_prompt"] and clip["seed"] == 3
    assert manifest["model"]["id"] == "tiny-wan22" and manifest["versions"]["diffusers"] == "0.42.1"
    frames, fps = storage.read_video(clip["output"])
    assert frames.shape[0] == 9 and fps == pytest.approx(8)


def _write(path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@pytest.mark.parametrize("case", ["missing", "not json", "missing field", "frame missing", "too many frames",
                                  "tiny size"])
def test_bad_handoff_exits_2_and_writes_nothing(case, astronaut, tmp_path, capsys, monkeypatch):
    handoff = _edit_run_handoff(astronaut, tmp_path / "edit", capsys, monkeypatch)
    path = tmp_path / "h.json"
    bad = {
        "missing": lambda: (str(tmp_path / "nope.json"), "does not exist"),
        "not json": lambda: (_write(path, "{not json"), "not JSON"),
        "missing field": lambda: (_write(path, {k: v for k, v in handoff.items() if k != "fps"}), "handoff.fps"),
        "frame missing": lambda: (_write(path, dict(handoff, frame=str(tmp_path / "gone.png"))), "handoff.frame"),
        "too many frames": lambda: (_write(path, dict(handoff, num_frames=999)), "handoff.num_frames=999"),
        "tiny size": lambda: (_write(path, dict(handoff, width=8)), "handoff.width=8"),
    }[case]()
    root = tmp_path / "video"
    code = main(["animate", bad[0], "--storage", str(root)])
    err = capsys.readouterr().err
    assert code == 2, f"{case}: expected exit 2, got {code}: {err}"
    assert bad[1] in err and "fix:" in err and len(err.strip().splitlines()) == 1, err
    assert not root.exists(), f"{case}: something was written"


def test_inline_mode_edits_and_animates_in_one_call(astronaut, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RECAST_HANDOFF__MODE", "inline")
    assert main(["edit", str(astronaut), "--prompt", "Top Gun flight suit", "--seed", "6", "--steps", "2",
                 "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    manifest = storage.read_json(out.strip().splitlines()[-1])
    animation = manifest["animation"]
    assert animation["mode"] == "inline" and animation["status"] == "succeeded", animation
    clip = animation["clips"][0]
    assert storage.exists(clip["output"]) and storage.exists(clip["last_frame"])
    video_manifest = storage.read_json(animation["manifest"])
    assert video_manifest["clips"][0]["source_frame"] == manifest["edits"][0]["output"]
    assert "video (inline): succeeded" in out


def test_storyboard_chains_last_frames_and_stitches(astronaut, tmp_path, capsys):
    board = tmp_path / "board.yaml"
    # The tiny model draws no face: chaining from its last frames must be asked for.
    board.write_text(yaml.safe_dump({"num_frames": 9, "fps": 8, "chain_from_lost": True, "scenes": [
        {"edit_prompt": "James Bond 007, tuxedo, casino", "motion_prompt": "he raises a glass", "seed": 1},
        {"motion_prompt": "he walks to the camera", "seed": 2},
        {"edit_prompt": "Neo, black trench coat", "motion_prompt": "he dodges", "seed": 3}]}))
    assert main(["storyboard", str(board), "--image", str(astronaut), "--storage", str(tmp_path / "s"),
                 "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    first, second, third = manifest["scenes"]
    assert [s["status"] for s in manifest["scenes"]] == ["succeeded"] * 3
    assert second["source"] == "previous_last_frame" and second["source_frame"] == first["last_frame"], \
        "scene 2 must start from scene 1's last frame"
    assert third["source"] == "edit" and third["source_frame"] != second["last_frame"]
    assert all(len(s["attempts"]) == 1 and s["attempts"][0]["seed"] is not None for s in manifest["scenes"])
    frames, fps = storage.read_video(manifest["stitched"]["output"])
    assert frames.shape[0] == 27 == manifest["stitched"]["num_frames"], "stitched video = sum of the clips"
    assert fps == pytest.approx(8)


def test_storyboard_without_a_first_edit_is_refused(astronaut, tmp_path, capsys):
    board = tmp_path / "board.yaml"
    board.write_text(yaml.safe_dump({"scenes": [{"motion_prompt": "he walks"}]}))
    assert main(["storyboard", str(board), "--image", str(astronaut), "--storage", str(tmp_path / "s")]) == 2
    assert "edit_prompt" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_mp4_encoded_while_the_vae_decodes_is_the_mp4_of_the_clip(memory_root, frame_uri):
    """The chain's mp4 is encoded chunk by chunk as the VAE decodes (off the critical path): the bytes must be those
    of encoding the finished clip, and the streamed path must really have been taken."""
    from recast.tasks.models import loading, wan_video
    from recast.tasks.settings import get_settings

    profile = get_settings().get_video_profile("tiny")
    loaded, _ = loading.get_pipeline("video", profile)
    frame = storage.load_image(frame_uri).resize((48, 64))
    stream, fed_before_return = storage.Mp4Stream(12), []
    frames = wan_video.run_video(
        loaded, frame, prompt="he smiles", negative_prompt="", seed=4, steps=2, guidance_scale=1.0, num_frames=13,
        width=48, height=64, max_sequence_length=16,
        on_frames=lambda fetch: (fed_before_return.append(fetch), stream.feed(fetch)))
    assert len(fed_before_return) == 4, \
        f"13 frames decode in 4 chunks (1 + 3 x 4); the encoder was handed {len(fed_before_return)} during the decode"
    assert sum(len(fetch()) for fetch in fed_before_return) == len(frames)
    streamed = stream.finish(frames)
    assert stream.streamed, "finish() fell back to encoding the whole clip: the streamed frames were not the clip's"
    assert streamed == storage.mp4_bytes(frames, 12), "the mp4 encoded while decoding differs from the clip's mp4"


def test_a_stream_fed_other_frames_falls_back_to_the_clips_own_mp4():
    clip = np.random.default_rng(0).integers(0, 256, (9, 32, 48, 3), dtype=np.uint8)
    wrong = clip.copy()
    wrong[5, 0, 0, 0] ^= 1
    stream = storage.Mp4Stream(8)
    stream.feed(lambda: wrong[:1])
    stream.feed(lambda: wrong[1:])
    assert stream.finish(clip) == storage.mp4_bytes(clip, 8), "a stream fed other frames gave an mp4 of them"
    assert not stream.streamed
    cut_short = storage.Mp4Stream(8)
    cut_short.feed(lambda: clip[:1])
    cut_short.feed(None)  # e.g. a team's split decode: the rest is not streamed
    cut_short.feed(lambda: clip[1:])
    assert cut_short.finish(clip) == storage.mp4_bytes(clip, 8) and not cut_short.streamed
    for fed in (clip[:-1], np.concatenate([clip, clip[-1:]])):  # a frame missing, a frame too many
        stream = storage.Mp4Stream(8)
        stream.feed(lambda fed=fed: fed[:1])
        stream.feed(lambda fed=fed: fed[1:])
        assert stream.finish(clip) == storage.mp4_bytes(clip, 8) and not stream.streamed, \
            f"a stream fed {len(fed)} frames was taken for the clip's {len(clip)}"
