"""transformers 5.x + diffusers 0.42.1: image tokens must get 3-D rotary positions, not sequential ones."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from recast.tasks.models import loading
from recast.tasks.settings import get_settings


@pytest.fixture
def pipe():
    loaded, _ = loading.get_pipeline("edit", get_settings().get_profile("tiny"))
    return loaded.pipe


def _encode_and_capture(pipe):
    """Run the pipeline's own prompt encoding and capture what Qwen2.5-VL computed for positions."""
    captured = {}
    model = pipe.text_encoder.model
    original = model.compute_3d_position_ids

    def spy(*args, **kwargs):
        captured["position_ids"] = original(*args, **kwargs)
        return captured["position_ids"]

    model.compute_3d_position_ids = spy
    try:
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (384, 256, 3), dtype=np.uint8))
        pipe.encode_prompt(prompt="wearing a tuxedo", image=[image], device="cpu")
    finally:
        del model.compute_3d_position_ids
    return captured["position_ids"]


def test_image_tokens_get_3d_positions(pipe):
    position_ids = _encode_and_capture(pipe)
    assert position_ids is not None, (
        "Qwen2.5-VL fell back to sequential positions: mm_token_type_ids did not reach the text encoder")
    temporal, height, width = position_ids[:, 0]
    assert not (height == width).all(), "height and width positions are identical: no 2-D grid for image tokens"
    assert position_ids.max() + 1 < position_ids.shape[-1], "positions grow one per token: that is sequential"


def test_without_the_fix_positions_would_be_sequential(pipe):
    """Guards the test above: with the forwarded field removed, the same check must fail."""
    hooks = dict(pipe.text_encoder._forward_pre_hooks)
    pipe.text_encoder._forward_pre_hooks.clear()
    try:
        assert _encode_and_capture(pipe) is None, "diffusers now passes mm_token_type_ids itself: drop the hook"
    finally:
        pipe.text_encoder._forward_pre_hooks.update(hooks)
