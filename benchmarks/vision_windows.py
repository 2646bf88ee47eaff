"""Is the edit's text encoder the same with its vision windows attended in one call (#26)? How far bf16 alone moves it.

recast runs the photo's vision windows of Qwen2.5-VL's vision tower as one SDPA call a block with a block-diagonal
mask (`kernels.vision_windows_attention`) instead of transformers' SDPA call per window. On an H100 the two ways'
prompt embeddings were 0.283 apart (relative L2, `gpu_edit.py`'s `text_encoder_ms`) on random full-size weights. This
script separates a difference in what is computed from bf16's rounding: the full-size vision tower (32 blocks, 1280
wide, 16 windows of a 384-px photo) with the benchmarks' seeded random weights, each way in float32 and in bf16, on
this machine's CPU (~30 s on 2 cores, ~3 GiB):

    python benchmarks/vision_windows.py            # prints the distances; exits 1 if one call differs in float32

The same computation shows as float32's rounding between the two ways (~1e-6); bf16's own error is the distance
between bf16 and float32 through transformers' path (on this CPU it differs between processes, 0.02-0.13: its bf16
kernels are chosen per process; the same way twice in one process is 0 apart); a real difference would stand out.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from PIL import Image
from transformers import AttentionInterface, Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from common import materialize_random
from gpu_edit import FULL_TEXT, FULL_VISION
from recast.tasks.models import kernels
from recast.tasks.models.offline_tokenizers import build_qwen2_tokenizer, build_qwen2vl_processor

WAYS = {"per_window": "sdpa", "one_call": kernels.VISION_WINDOWS}
SAME_IN_FLOAT32 = 1e-4  # float32's rounding between the two ways is ~1e-6; a real difference is orders above


def embeddings(visual, pixels, grid, dtype, way: str) -> torch.Tensor:
    visual.to(dtype)
    visual.config._attn_implementation = WAYS[way]
    with torch.inference_mode():
        out = visual(pixels.to(dtype), grid_thw=grid)
    return (out if torch.is_tensor(out) else out.pooler_output).float()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=384, help="the photo's side (the pipeline's condition size: 384)")
    args = ap.parse_args()
    config = Qwen2_5_VLConfig(vision_config=FULL_VISION, text_config=FULL_TEXT).vision_config
    with torch.device("meta"):
        visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config)
    materialize_random(visual, "cpu", torch.float32, seed=0)
    AttentionInterface.register(kernels.VISION_WINDOWS, kernels.vision_windows_attention)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.side, args.side, 3), dtype=np.uint8))
    inputs = build_qwen2vl_processor(build_qwen2_tokenizer()).image_processor(images=[photo], return_tensors="pt")
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    out = {(dtype, way): embeddings(visual, pixels, grid, dtype, way)
           for dtype in (torch.float32, torch.bfloat16) for way in WAYS}
    out[torch.bfloat16, "per_window again"] = embeddings(visual, pixels, grid, torch.bfloat16, "per_window")

    def distance(a, b) -> float:
        return round(float((out[a] - out[b]).norm() / out[b].norm()), 7)

    f32, bf16 = torch.float32, torch.bfloat16
    result = {
        "grid_thw": grid.tolist(),
        "float32_one_call_vs_per_window": distance((f32, "one_call"), (f32, "per_window")),
        "bf16_one_call_vs_per_window": distance((bf16, "one_call"), (bf16, "per_window")),
        "bf16_vs_float32_per_window": distance((bf16, "per_window"), (f32, "per_window")),
        "bf16_one_call_vs_float32_per_window": distance((bf16, "one_call"), (f32, "per_window")),
        # the same way twice in this process (0 here: bf16's spread on this CPU is between processes)
        "bf16_per_window_twice": distance((bf16, "per_window again"), (bf16, "per_window")),
    }
    print(json.dumps(result, indent=1))
    if result["float32_one_call_vs_per_window"] > SAME_IN_FLOAT32:
        print(f"one call a block computes something else: {result['float32_one_call_vs_per_window']} apart in float32",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
