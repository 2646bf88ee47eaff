"""The embedded default: tiny random-weight models in the real layouts, built once, loaded like the real ones.

`make demo`, the tests and a freshly installed wheel run these. Each is built once (seeded, so the bytes are
the same on every machine) into the cache folder as a diffusers pipeline folder, then loaded with the very same
`from_pretrained(source, revision=..., dtype=...)` call as the real model. Nothing is downloaded.

    tiny        QwenImageEditPlusPipeline in the Qwen-Image-Edit-2511 layout (zero_cond_t on, 8x VAE)
    tiny-wan22  WanImageToVideoPipeline in the Wan 2.2 A14B layout (two experts, boundary ratio 0.9)
    tiny-wan21  WanImageToVideoPipeline in the Wan 2.1 layout (one transformer + a CLIP image encoder)
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from recast.tasks.settings import cache_dir

log = logging.getLogger("recast.models")

# Bump a version when its builder changes, so stale cached folders are not reused.
TINY_EDIT_VERSION = "qwen-edit-2511-tiny-v1"
TINY_VIDEO_VERSION = "v3"


def build_edit_components() -> dict[str, Any]:
    """Every component of QwenImageEditPlusPipeline, tiny and seeded (identical bytes on every build)."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from recast.tasks.models.offline_tokenizers import build_qwen2_tokenizer, build_qwen2vl_processor, qwen2_token_ids

    z_dim, text_dim = 4, 16
    tokenizer = build_qwen2_tokenizer()
    processor = build_qwen2vl_processor(tokenizer)
    ids = qwen2_token_ids(tokenizer)

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=z_dim * 4, out_channels=z_dim, num_layers=2, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=text_dim, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
        zero_cond_t=True,  # the Qwen-Image-Edit-2511 flag
    )
    torch.manual_seed(1)
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True],  # 8x spatial, like the real VAE
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    )
    # The real Qwen-Image scheduler_config.json values.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )
    torch.manual_seed(2)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": text_dim, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "rope_theta": 1000000.0, "vocab_size": ids["vocab_size"],
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "bos_token_id": ids["bos_token_id"], "eos_token_id": ids["eos_token_id"],
            "pad_token_id": ids["pad_token_id"],
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": text_dim},
        image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    return dict(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                tokenizer=tokenizer, processor=processor)


def build_video_components(layout: str) -> dict[str, Any]:
    """WanImageToVideoPipeline components, tiny and seeded. wan22: two experts + boundary ratio (the A14B
    layout, no image encoder); wan21: one transformer + a CLIP image encoder."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from recast.tasks.models.offline_tokenizers import build_t5_tokenizer

    def transformer(seed: int, image_dim: int | None):
        torch.manual_seed(seed)
        return WanTransformer3DModel(
            # Widths in multiples of 16, so the FP8 recipe has layers to quantize on the tiny model too.
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=36, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2, cross_attn_norm=True,
            # The real models' RoPE length: 480p and 720p frames give more than 32 patches per side.
            qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, image_dim=image_dim)

    tokenizer = build_t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    # Wan's own scheduler: UniPC on flow sigmas.
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    components = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler)
    if layout == "wan22":
        components.update(transformer=transformer(0, None), transformer_2=transformer(1, None), boundary_ratio=0.9,
                          image_encoder=None, image_processor=None)
    elif layout == "wan21":
        torch.manual_seed(0)
        image_encoder = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=8, projection_dim=8, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            intermediate_size=16, patch_size=4)).eval()
        components.update(transformer=transformer(0, 8), image_encoder=image_encoder,
                          image_processor=CLIPImageProcessor(crop_size=32, size=32))
    else:
        raise ValueError(f"unknown Wan layout {layout!r}")
    return components


def _edit_pipeline():
    from diffusers import QwenImageEditPlusPipeline

    return QwenImageEditPlusPipeline(**build_edit_components())


def _video_pipeline(layout: str):
    from diffusers import WanImageToVideoPipeline

    return WanImageToVideoPipeline(**build_video_components(layout))


# model_id in a profile -> (cache folder name, builder)
BUILDERS = {
    "tiny": (TINY_EDIT_VERSION, _edit_pipeline),
    "tiny-wan22": (f"wan-i2v-wan22-tiny-{TINY_VIDEO_VERSION}", lambda: _video_pipeline("wan22")),
    "tiny-wan21": (f"wan-i2v-wan21-tiny-{TINY_VIDEO_VERSION}", lambda: _video_pipeline("wan21")),
}


def folder(model_id: str) -> Path:
    """Where the tiny model's pipeline folder is (or will be, once built)."""
    return cache_dir() / BUILDERS[model_id][0]


def ensure(model_id: str) -> Path:
    """The tiny model's pipeline folder, built into the cache once; later calls (any process) return at once."""
    name, build = BUILDERS[model_id]
    target = folder(model_id)
    if (target / "model_index.json").exists():
        return target
    log.info("building %s into %s (once)", name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{os.getpid()}.{threading.get_ident()}.part"
    shutil.rmtree(staging, ignore_errors=True)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" bars are noise in a first run
    build().save_pretrained(staging)
    # transformers writes weights only on rank 0 once torch.distributed is up: build before joining a team.
    empty = [p.name for p in staging.iterdir() if p.is_dir() and not any(p.iterdir())]
    if empty:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"building {name} left {', '.join(empty)} empty (saved from a rank other than 0?)")
    try:
        os.rename(staging, target)  # atomic: other processes see no folder or a complete one
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first
        if not (target / "model_index.json").exists():
            raise
    return target
