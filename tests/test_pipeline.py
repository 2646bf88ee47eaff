"""The edit task body on the real tiny QwenImageEditPlusPipeline, loaded through from_pretrained."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from recast.tasks import storage
from recast.tasks.frames import output_size
from recast.tasks.models import loading, tiny
from recast.tasks.edit import edit_image
from recast.tasks.schemas.jobs import EditJob
from recast.tasks.settings import get_settings


def _job(root: str, inputs: list[str], seed: int, name: str, **overrides) -> EditJob:
    values = dict(edit_id=name, profile="tiny", inputs=inputs, prompt="James Bond 007, wearing a tuxedo",
                  negative_prompt=" ", seed=seed, steps=4, true_cfg_scale=4.0, width=96, height=128,
                  output=storage.join(root, f"{name}.png"))
    values.update(overrides)
    return EditJob(**values)


@pytest.fixture
def staged_input(memory_root, astronaut):
    uri = storage.join(memory_root, "inputs", "astronaut.png")
    storage.write_bytes(uri, astronaut.read_bytes())
    return uri


def test_tiny_model_is_loaded_from_a_saved_folder_with_2511_settings():
    profile = get_settings().get_profile("tiny")
    loaded, _ = loading.get_pipeline("edit", profile)
    folder = tiny.ensure("tiny")
    assert (folder / "model_index.json").exists(), "tiny model was not saved as a diffusers folder"
    made_from = loaded.source if not loaded.prepared else \
        json.loads((Path(loaded.source) / "manifest.json").read_text())["source"]
    assert made_from in (str(folder), f"folder {folder.name}"), \
        "tiny pipeline was not loaded from its saved folder (or the weights prepared from it)"
    assert type(loaded.pipe).__name__ == "QwenImageEditPlusPipeline"
    assert loaded.pipe.transformer.config.zero_cond_t is True, "2511's zero_cond_t flag was lost on load"
    assert type(loaded.pipe.processor).__name__ == "Qwen2VLProcessor", "tests must use the production processor"


def test_same_seed_gives_identical_png_bytes_and_another_seed_differs(memory_root, staged_input):
    a = edit_image(_job(memory_root, [staged_input], 7, "a"))
    b = edit_image(_job(memory_root, [staged_input], 7, "b"))
    c = edit_image(_job(memory_root, [staged_input], 8, "c"))
    digest = {r.edit_id: hashlib.sha256(storage.read_bytes(r.output)).hexdigest() for r in (a, b, c)}
    assert digest["a"] == digest["b"], "the same seed must reproduce the same PNG bytes"
    assert digest["a"] != digest["c"], "a different seed must give a different image"


def test_edit_returns_a_small_result_and_writes_the_requested_size(memory_root, staged_input):
    result = edit_image(_job(memory_root, [staged_input], 3, "sized", width=100, height=70))
    assert (result.width, result.height) == (96, 64), "sizes must be rounded down to multiples of 16"
    from conftest import png_size

    assert png_size(storage.read_bytes(result.output)) == (96, 64)
    dumped = result.model_dump_json()
    assert len(dumped) < 1000 and "PNG" not in dumped, "results must carry URIs, never image bytes"
    assert result.seconds > 0 and result.seed == 3


def test_several_reference_images_are_accepted(memory_root, staged_input, second_photo):
    second = storage.join(memory_root, "inputs", "second.jpg")
    storage.write_bytes(second, second_photo.read_bytes())
    one = edit_image(_job(memory_root, [staged_input], 5, "one"))
    two = edit_image(_job(memory_root, [staged_input, second], 5, "two"))
    assert storage.read_bytes(one.output) != storage.read_bytes(two.output), \
        "a second reference image must change the conditioning"


def test_cfg_off_changes_the_output(memory_root, staged_input):
    cfg = edit_image(_job(memory_root, [staged_input], 9, "cfg"))
    plain = edit_image(_job(memory_root, [staged_input], 9, "plain", true_cfg_scale=1.0))
    assert storage.read_bytes(cfg.output) != storage.read_bytes(plain.output), \
        "true_cfg_scale must reach the pipeline"


def test_output_size_keeps_aspect_and_multiples_of_16():
    for aspect, area in [(1.0, 128 * 128), (0.5625, 1024 * 1024), (16 / 9, 399360), (3 / 4, 6144)]:
        w, h = output_size(None, None, aspect, area)
        assert w % 16 == 0 and h % 16 == 0, (aspect, area, w, h)
        assert abs(w / h - aspect) / aspect < 0.12, f"aspect {aspect} became {w}x{h}"
        assert abs(w * h - area) / area < 0.15, f"area {area} became {w}x{h}"
