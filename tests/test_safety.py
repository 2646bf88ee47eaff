"""Safe to expose: what a request from the UI, the API or a schedule may touch, credentials, memory caps, batches
that overlap, and settings from the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from recast.flows.cli import main
from recast.tasks import storage
from recast.tasks.errors import BadInput
from recast.tasks.schemas.requests import EditRequest, LoraRef
from recast.tasks.settings import ConfigError, load_settings


def test_a_remote_run_may_not_load_a_lora_from_outside_the_roots(astronaut, tmp_path, monkeypatch):
    from recast.flows import edit as edit_module

    root = tmp_path / "root"
    (root / "uploads").mkdir(parents=True)
    (root / "uploads" / "me.png").write_bytes(astronaut.read_bytes())
    monkeypatch.setattr(edit_module, "started_remotely", lambda: True)
    monkeypatch.setenv("RECAST_STORAGE_ROOT", str(root))
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"anything the worker can read")
    with pytest.raises(BadInput, match=r"loras\[0\]\.source.*configured storage roots"):
        edit_module.plan_run(EditRequest(images=[str(root / "uploads" / "me.png")], prompts=["x"],
                                         loras=[LoraRef(source=str(outside))]))


def test_a_lora_is_size_capped_read_header_first_and_rehashed_when_used(tmp_path):
    from safetensors.torch import save_file
    import torch

    from recast.tasks.models import lora

    path = tmp_path / "adapter.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 4), "transformer.x.lora_B.weight": torch.zeros(4, 2)},
              str(path))
    with pytest.raises(BadInput, match="over the 0 MiB a LoRA may have"):
        lora.check_lora_file("loras[0].source", LoraRef(source=str(path)), max_bytes=100)
    checked = lora.check_lora_file("loras[0].source", LoraRef(source=str(path)))
    save_file({"transformer.x.lora_A.weight": torch.ones(2, 4), "transformer.x.lora_B.weight": torch.ones(4, 2)},
              str(path))
    with pytest.raises(lora.BadLora, match="changed since the request was checked"):
        lora.lora_file(checked)


def test_credentials_in_a_uri_are_refused_and_never_echoed(astronaut, tmp_path, capsys):
    code = main(["edit", "s3://AKIAEXAMPLE:topsecret@bucket/me.png", "--prompt", "x", "--storage",
                 str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "credentials" in err, err
    assert "topsecret" not in err and "AKIAEXAMPLE" not in err, "a secret reached the terminal"
    code = main(["edit", str(astronaut), "--prompt", "x", "--storage", "s3://key:topsecret@bucket/runs"])
    err = capsys.readouterr().err
    assert code == 2 and "topsecret" not in err and not (tmp_path / "s").exists(), err


def test_every_uri_written_to_a_manifest_is_redacted():
    nested = {"a": "s3://k:s@b/x", "b": ["gs://u:p@bucket/y", 3], "c": {"d": "file:///plain"}}
    assert storage.redact_all(nested) == {"a": "s3://b/x", "b": ["gs://bucket/y", 3], "c": {"d": "file:///plain"}}


def test_image_bytes_are_capped_before_decoding(astronaut, tmp_path):
    with pytest.raises(BadInput, match="over the 0 MiB a photo may have"):
        storage.read_image("images[0]", str(astronaut), max_pixels=10**8, max_bytes=1000)


def test_a_clip_is_bounded_by_area_however_its_size_is_given(astronaut, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RECAST_HANDOFF__MODE", "none")
    assert main(["edit", str(astronaut), "--prompt", "x", "--seed", "1", "--steps", "2", "--storage",
                 str(tmp_path)]) == 0
    manifest = storage.read_json(capsys.readouterr().out.strip().splitlines()[-1])
    video = tmp_path / "video"
    code = main(["animate", manifest["handoff"], "--width", "1920", "--height", "1920", "--storage", str(video)])
    err = capsys.readouterr().err
    assert code == 2 and "over the limit" in err and "1920x1920" in err, err
    assert not video.exists()


def test_stitching_streams_frames_instead_of_holding_every_clip(tmp_path):
    from recast.flows.storyboard import stitch

    frames = np.random.default_rng(0).integers(0, 255, (32, 240, 320, 3), dtype=np.uint8)
    clips = [storage.write_bytes(f"file://{tmp_path}/c{i}.mp4", storage.mp4_bytes(frames, 8)) for i in range(4)]
    all_frames = 4 * frames.nbytes
    tracemalloc.start()
    data, count = stitch(clips, 8)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 128 and storage.read_video(storage.write_bytes(f"file://{tmp_path}/s.mp4", data))[0].shape[0] == 128
    assert peak < all_frames / 2, f"stitching held {peak / 2**20:.1f} MiB; all frames are {all_frames / 2**20:.1f} MiB"


def test_overlapping_batch_runs_edit_each_photo_once(astronaut, second_photo, tmp_path, api_server):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "a.png").write_bytes(astronaut.read_bytes())
    (incoming / "b.jpg").write_bytes(second_photo.read_bytes())
    script = textwrap.dedent(f"""
        import json
        from recast.flows.batch import batch_flow
        from recast.tasks.schemas.requests import BatchRequest
        result = batch_flow(BatchRequest(source_prefix={str(incoming)!r}, prompts=["Top Gun, flight suit"],
                                         seeds=[3], steps=1, storage_root={str(tmp_path / 'out')!r}))
        print(json.dumps(result))
    """)
    runs = []
    for index in range(2):  # two scheduled runs that overlap, as two processes
        env = dict(os.environ, PREFECT_API_URL=api_server, RECAST_HANDOFF__MODE="none")
        runs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True))
    results = []
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    edited = [e["source"].rsplit("/", 1)[-1] for r in results for e in r["edited"]]
    assert sorted(edited) == ["a.png", "b.jpg"], f"each photo must be edited exactly once across both runs: {edited}"
    assert len(list((tmp_path / "out" / "runs").iterdir())) == 2
    assert not list((tmp_path / "out" / "batch").glob("*.claim")), "claims are released when the photo is done"


def test_documented_recast_variables_are_allowed_and_a_misspelt_setting_is_named():
    settings = load_settings({"RECAST_SERVE_PORT": "4300", "RECAST_INCOMING": "file:///x"})
    assert settings.storage_root == "./artifacts"
    with pytest.raises(ConfigError, match="RECAST_STORAGE_ROT is not a recast setting; did you mean "
                                          "RECAST_STORAGE_ROOT"):
        load_settings({"RECAST_STORAGE_ROT": "s3://bucket"})


def test_the_ui_form_offers_configured_choices():
    schema = EditRequest.model_json_schema()["properties"]
    settings = load_settings({})

    def choices(name):
        return next(option["enum"] for option in schema[name]["anyOf"] if option.get("type") == "string")

    assert choices("profile") == sorted(settings.profiles)
    assert choices("video_profile") == sorted(settings.video_profiles)
    assert "character" in choices("template")
    assert choices("storage_root") == [storage.normalize_uri(r) for r in settings.storage_roots]


def test_make_serve_documented_port_no_longer_breaks_runs(astronaut, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RECAST_SERVE_PORT", "4300")
    monkeypatch.setenv("RECAST_HANDOFF__MODE", "none")
    assert main(["edit", str(astronaut), "--prompt", "x", "--steps", "2", "--storage", str(tmp_path)]) == 0, \
        capsys.readouterr().err


def test_a_file_is_checked_as_opened_so_a_link_swapped_after_the_check_is_not_followed(tmp_path, monkeypatch):
    """Runs from the UI read only under the roots. The name is checked first (a clear error), but a link can be
    swapped between that check and the read: the check that counts is made on the file as opened."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "photo.png").write_bytes(b"inside")
    (outside / "secret.png").write_bytes(b"outside")
    link = root / "link.png"
    link.symlink_to(root / "photo.png")
    roots = [str(root)]
    assert storage.is_under(str(link), roots), "checked by name, the link points inside"
    assert storage.read_capped("images[0]", str(link), 100, roots) == b"inside"
    real_open = os.open

    def swap_then_open(path, *args, **kwargs):  # the attacker's move, after the name was checked
        if str(path) == str(link):
            link.unlink()
            link.symlink_to(outside / "secret.png")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", swap_then_open)
    with pytest.raises(BadInput, match="outside the configured storage roots"):
        storage.read_capped("images[0]", str(link), 100, roots)


def test_a_scheduled_batch_refuses_links_out_and_fifos_without_reading_them(astronaut, tmp_path, monkeypatch):
    """A batch from a schedule hashes each photo it finds: a link to a file outside the roots, or a FIFO (whose
    read would never end), is refused before a byte is read, and the batch goes on with the rest."""
    from recast.flows import batch as batch_module
    from recast.tasks.schemas.requests import BatchRequest

    root = tmp_path / "root"
    incoming = root / "incoming"
    incoming.mkdir(parents=True)
    (tmp_path / "big.png").write_bytes(b"\0" * 2**20)  # outside every root
    (incoming / "link.png").symlink_to(tmp_path / "big.png")
    os.mkfifo(incoming / "pipe.png")
    monkeypatch.setenv("RECAST_STORAGE_ROOT", str(root))
    monkeypatch.setenv("RECAST_HANDOFF__MODE", "none")
    monkeypatch.setattr(batch_module, "started_remotely", lambda: True)
    read = []
    real_read_bytes = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri: read.append(uri) or real_read_bytes(uri))
    result = batch_module.batch_flow(BatchRequest(source_prefix=str(incoming), prompts=["x"], steps=1))
    refused = {entry["source"].rsplit("/", 1)[-1]: entry["error"] for entry in result["refused"]}
    assert set(refused) == {"link.png", "pipe.png"}, result
    assert "outside the configured storage roots" in refused["link.png"], refused
    assert "not a regular file" in refused["pipe.png"], refused
    assert not result["edited"] and not result["failed"], result
    assert not [uri for uri in read if "link.png" in uri or "pipe.png" in uri], f"read before refusing: {read}"
