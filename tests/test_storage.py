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


@pytest.mark.parametrize("size", [(1024, 1024), (833, 481), (1, 600), (31, 1023)])
def test_an_rgb_png_compressed_in_bands_is_lossless_valid_and_as_small_as_pillows(size, astronaut):
    """png_bytes deflates an RGB picture's bands of rows at once (the edit's PNG is on the chain's critical path):
    every decoder must read the very pixels back (Pillow; libpng through OpenCV, which checks every chunk's CRC and
    the stream's checksum), the bytes must not depend on the run, and the file must stay the size Pillow's is."""
    import cv2
    import numpy as np
    from PIL import Image

    width, height = size
    noise = Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8))
    with Image.open(astronaut) as img:
        photo = img.convert("RGB").resize(size)
    photo.info.clear()
    for image in (noise, photo):
        data = storage.png_bytes(image)
        with Image.open(io.BytesIO(data)) as back:
            assert back.mode == "RGB" and np.array_equal(np.asarray(back), np.asarray(image)), "Pillow reads other pixels"
        by_libpng = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert by_libpng is not None and np.array_equal(by_libpng[:, :, ::-1], np.asarray(image)), \
            "libpng refused the PNG or read other pixels"
        assert storage.png_bytes(image) == data, "the same picture gave other bytes"
        by_pillow = io.BytesIO()
        image.save(by_pillow, format="PNG", compress_level=storage.PNG_COMPRESS_LEVEL)
        assert len(data) <= 1.02 * len(by_pillow.getvalue()) + 64 * storage.PNG_BANDS, \
            f"{size}: {len(data)} bytes against Pillow's {len(by_pillow.getvalue())}: the rows are not filtered as well"


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
