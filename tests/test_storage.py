"""Storage through fsspec: round trips on memory:// and file://, atomic writes, the run layout."""

from __future__ import annotations

import io
import os

import fsspec
import pytest

from recast.tasks import storage
from recast.tasks.errors import BadInput


@pytest.fixture(params=["memory", "file"])
def root(request, memory_root, tmp_path):
    return memory_root if request.param == "memory" else f"file://{tmp_path}/store"


def test_bytes_and_json_round_trip(root):
    uri = storage.join(root, "runs", "r1", "edits", "a.png")
    storage.write_bytes(uri, b"\x89PNG data")
    assert storage.read_bytes(uri) == b"\x89PNG data"
    storage.write_json(storage.join(root, "runs", "r1", "manifest.json"), {"run_id": "r1", "n": [1, 2]})
    assert storage.read_json(storage.join(root, "runs", "r1", "manifest.json")) == {"run_id": "r1", "n": [1, 2]}
    assert storage.list_files(storage.join(root, "runs")) == ["r1/edits/a.png", "r1/manifest.json"]


def test_images_round_trip(root, astronaut):
    uri = storage.join(root, "in", "astronaut.png")
    storage.write_bytes(uri, astronaut.read_bytes())
    image = storage.read_image("images[0]", uri, max_pixels=10**7)
    assert (image.width, image.height, image.format) == (512, 512, "PNG")
    assert storage.load_image(uri).size == (512, 512)


def test_local_write_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "out" / "manifest.json"
    storage.write_bytes(f"file://{target}", b"old")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        storage.write_bytes(f"file://{target}", b"new and longer")
    assert target.read_bytes() == b"old", "a failed write must leave the previous file untouched"
    monkeypatch.undo()
    storage.write_bytes(f"file://{target}", b"new")
    leftovers = [p.name for p in target.parent.iterdir() if p.name != "manifest.json"]
    assert target.read_bytes() == b"new"
    assert len(leftovers) <= 1 and all(name.endswith(".part") for name in leftovers), leftovers


def test_relative_paths_become_file_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize_uri("artifacts") == f"file://{tmp_path}/artifacts"
    assert storage.normalize_uri("memory://x/y") == "memory://x/y"


@pytest.mark.parametrize("uri", ["http://127.0.0.1/a.png", "ftp://host/a.png", "ssh://a/b"])
def test_unsupported_schemes_are_refused_before_any_io(uri):
    with pytest.raises(BadInput, match="unsupported URI scheme"):
        storage.check_scheme("images[0]", uri)


def test_credentials_are_redacted():
    assert storage.redact("s3://AKIA:secret@bucket/runs/x") == "s3://bucket/runs/x"
    assert storage.redact("/plain/path") == "/plain/path"


def test_layout():
    layout = storage.RunLayout("memory://root", "20260101-000000-abcdef")
    assert layout.edit_uri("01-bond-s1") == "memory://root/runs/20260101-000000-abcdef/edits/01-bond-s1.png"
    assert layout.manifest_uri.endswith("/runs/20260101-000000-abcdef/manifest.json")
    assert layout.handoff_uri.endswith("/runs/20260101-000000-abcdef/handoff.json")
    assert layout.input_uri(0, "/x/my photo.JPG", "JPEG").endswith("/inputs/0-my_photo.jpg")
    assert fsspec.utils.infer_storage_options(layout.folder)["protocol"] == "memory"


def test_an_image_read_back_after_writing_is_the_written_image_and_damage_is_still_refused(root, astronaut):
    """The chain reads back the PNGs it has just written without decoding them again (a memo keyed by the bytes):
    the picture must be exactly what decoding gives, a caller may change its copy, and bytes that are not exactly
    the written ones are decoded and checked as ever."""
    from PIL import Image

    with Image.open(astronaut) as img:
        image = img.convert("RGB").resize((96, 64))
    uri = storage.write_bytes(storage.join(root, "edit.png"), storage.png_bytes(image))
    data = storage.read_bytes(uri)
    first = storage.load_image(uri)
    assert first.tobytes() == image.tobytes(), "the picture read back is not the one written"
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.convert("RGB").tobytes() == image.tobytes(), "the PNG is not lossless"
    first.paste((0, 0, 0), (0, 0, 96, 64))
    assert storage.load_image(uri).tobytes() == image.tobytes(), "a caller's change reached the next reader"
    truncated = storage.write_bytes(storage.join(root, "cut.png"), data[: len(data) // 2])
    with pytest.raises(BadInput, match="damaged or truncated"):
        storage.read_image("frame", truncated, max_pixels=10**7)
