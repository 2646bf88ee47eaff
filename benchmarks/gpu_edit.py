"""GPU benchmark: plain diffusers against recast's profiles, on the FULL-SIZE Qwen-Image-Edit-2511 architecture.

No weights are downloaded. Every module is built on the meta device, materialised directly on the GPU and
filled with seeded random values (normal(0, 0.02) for matrices, ones for norm scales, zeros for biases),
so each profile starts from the same weights. Rows, all in one run on one card:

    diffusers-baseline  QwenImageEditPlusPipeline called as the origin did (1024x1024, 8 steps,
                        true_cfg_scale 4.0, negative_prompt " "), plus only recast's mm_token_type_ids fix
                        (a correctness fix that costs nothing; without it image tokens get wrong positions)
    <profile>           the same weights through recast's own code: tasks.qwen_edit.prepare
                        (the loader's recipe step), warm_up, and run_edit

Each row: median s/image over --runs timed calls after warm-up, ratio to the baseline, peak GPU memory
during the timed calls, and the relative L2 error of the output image against the baseline's (for
`lightning`, against a bf16 run of the same 4-step recipe on the same fused weights).

    python benchmarks/gpu_edit.py --out docs/performance.json           # the full table
    python benchmarks/gpu_edit.py --check                               # GPU tests: runs, finite, bounded error
    python benchmarks/gpu_edit.py --tiny --device cpu                   # code-path check without a GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from recast.tasks.models import kernels, loading, qwen_edit
from recast.tasks.models.offline_tokenizers import build_qwen2_tokenizer, build_qwen2vl_processor, qwen2_token_ids
from recast.tasks.settings import load_settings

# Qwen-Image-Edit-2511 transformer/config.json (the Qwen-Image MMDiT plus zero_cond_t).
FULL_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                        axes_dims_rope=(16, 56, 56), zero_cond_t=True)
FULL_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True], dropout=0.0,
                latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
                latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160])
# text_encoder/config.json: Qwen2.5-VL-7B-Instruct.
FULL_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=128000, rope_theta=1000000.0,
                 vocab_size=152064, hidden_act="silu",
                 rope_scaling={"type": "default", "rope_type": "default", "mrope_section": [16, 24, 24]})
FULL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                   out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                   window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")
FULL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                      base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                      time_shift_type="exponential")
TINY = dict(
    transformer=dict(FULL_TRANSFORMER, num_layers=2, attention_head_dim=16, num_attention_heads=3,
                     joint_attention_dim=16, axes_dims_rope=(8, 4, 4), in_channels=16, out_channels=4),
    vae=dict(FULL_VAE, base_dim=8, z_dim=4, num_res_blocks=1, latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
    text=dict(FULL_TEXT, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, rope_scaling={"type": "default", "rope_type": "default",
                                                   "mrope_section": [1, 1, 2]}),
    vision=dict(FULL_VISION, depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                fullatt_block_indexes=[1]),
)
PROMPT = "James Bond 007, wearing a tuxedo with bow tie, casino background, cinematic lighting"
# The error each profile may show against bf16 on the same weights (GPU tests, --check).
ERROR_BOUNDS = {"bf16": 1e-3, "bf16-fast": 0.05, "fp8": 0.20, "fp8-offload": 0.20, "int4": 0.30, "lightning": 0.20}
DEFAULT_PROFILES = "diffusers-baseline,bf16,bf16-fast,fp8,fp8-offload,int4,lightning"


@torch.no_grad()
def materialize_random(model: torch.nn.Module, device, dtype, seed: int) -> torch.nn.Module:
    """meta parameters -> empty on `device` in `dtype` -> seeded random values; real buffers are kept."""
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers() if not buf.is_meta}
    model.to(dtype=dtype)
    model.to_empty(device=device)
    modules = dict(model.named_modules())
    for name, buf in saved.items():
        owner, _, attr = name.rpartition(".")
        modules[owner]._buffers[attr] = buf.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for pname, param in module.named_parameters(recurse=False):
            if is_norm and pname in ("weight", "gamma", "scale"):
                param.fill_(1.0)
            elif pname.endswith("bias") or param.ndim <= 1:
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return model.eval().requires_grad_(False)


def build_pipeline(tiny: bool, device: torch.device, dtype: torch.dtype, layers: int | None):
    """QwenImageEditPlusPipeline with the 2511 architecture and seeded random weights, built on `device`."""
    from accelerate import init_empty_weights
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = TINY if tiny else dict(transformer=FULL_TRANSFORMER, vae=FULL_VAE, text=FULL_TEXT, vision=FULL_VISION)
    transformer_cfg = dict(cfg["transformer"], **({"num_layers": layers} if layers else {}))
    tokenizer = build_qwen2_tokenizer()
    processor = build_qwen2vl_processor(tokenizer)
    ids = qwen2_token_ids(tokenizer)
    text = dict(cfg["text"], vocab_size=max(cfg["text"]["vocab_size"], ids["vocab_size"]) if not tiny
                else ids["vocab_size"], bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"])
    te_config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(cfg["vision"]), tie_word_embeddings=False,
                                 image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
                                 vision_start_token_id=ids["vision_start_token_id"],
                                 vision_end_token_id=ids["vision_end_token_id"])
    with init_empty_weights(include_buffers=False):
        transformer = QwenImageTransformer2DModel(**transformer_cfg)
        vae = AutoencoderKLQwenImage(**cfg["vae"])
        text_encoder = Qwen2_5_VLForConditionalGeneration(te_config)
    materialize_random(transformer, device, dtype, seed=1)
    materialize_random(vae, device, dtype, seed=2)
    materialize_random(text_encoder, device, dtype, seed=3)
    return QwenImageEditPlusPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FULL_SCHEDULER), vae=vae,
                                     text_encoder=text_encoder, tokenizer=tokenizer, processor=processor,
                                     transformer=transformer)


def make_random_lora(pipe, folder: Path, rank: int = 16) -> Path:
    """A random diffusers-format LoRA with the shapes of a Qwen-Image LoRA (stands in for Lightning's file)."""
    from diffusers import QwenImageEditPlusPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                        "add_v_proj", "to_add_out", "img_mlp.net.2", "txt_mlp.net.2"])
    torch.manual_seed(4)
    pipe.transformer.add_adapter(config, adapter_name="bench")
    for name, param in pipe.transformer.named_parameters():
        if "lora_B" in name:  # gaussian init leaves B at zero: make the LoRA actually change the weights
            param.data.normal_(0.0, 0.02)
    state = get_peft_model_state_dict(pipe.transformer, adapter_name="bench")
    QwenImageEditPlusPipeline.save_lora_weights(str(folder), transformer_lora_layers=state, safe_serialization=True)
    pipe.transformer.delete_adapters("bench")
    return folder / "pytorch_lora_weights.safetensors"


def component_split(pipe, call, device) -> dict:
    """One extra call with each component timed (synchronising, so not part of the timed runs)."""
    timings: dict[str, float] = {}
    originals = []
    for owner, attr, label in [(pipe.text_encoder, "forward", "text_encoder"), (pipe.transformer, "forward",
                               "transformer"), (pipe.vae, "encode", "vae_encode"), (pipe.vae, "decode", "vae_decode")]:
        original = getattr(owner, attr)
        originals.append((owner, attr, original))

        def timed(*a, _original=original, _label=label, **k):
            sync(device)
            started = time.perf_counter()
            out = _original(*a, **k)
            sync(device)
            timings[_label] = timings.get(_label, 0.0) + time.perf_counter() - started
            timings[_label + "_calls"] = timings.get(_label + "_calls", 0) + 1
            return out

        setattr(owner, attr, timed)
    try:
        sync(device)
        started = time.perf_counter()
        call()
        sync(device)
        timings["total"] = time.perf_counter() - started
    finally:
        for owner, attr, original in originals:
            setattr(owner, attr, original)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in timings.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_error(image, reference) -> float | None:
    if reference is None:
        return None
    a, b = np.asarray(image, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def free(device: torch.device) -> None:
    loading.clear_cache()
    torch._dynamo.reset()  # compiled graphs hold references to the last profile's modules
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_profile(name, args, settings, device, dtype, image, references, lora_dir):
    """Build fresh weights, apply the profile through recast's code, warm up, time. Returns a result row."""
    baseline = name == "diffusers-baseline"
    profile = settings.profiles["bf16" if baseline else name]
    overrides = dict(device=str(device), dtype=args.dtype, output_area=args.res * args.res,
                     vae_image_area=args.res * args.res)
    if args.tiny:  # CPU code-path check: no CUDA kernels, no compilation
        overrides.update(compile=False, attention_backend=None, warmup=False)
    build_started = time.perf_counter()
    pipe = build_pipeline(args.tiny, device, dtype, args.layers)
    if profile.lightning is not None:
        lora = make_random_lora(pipe, lora_dir)
        overrides["lightning"] = profile.lightning.model_copy(update=dict(source=str(lora), weight_name=None,
                                                                          revision=None))
    profile = profile.model_copy(update=overrides)
    steps = profile.steps or 8
    cfg = profile.true_cfg_scale if profile.true_cfg_scale is not None else 4.0
    recipe = "lightning" if profile.lightning else "cfg8"

    decisions: dict = {}
    if baseline:
        pipe.set_progress_bar_config(disable=True)
        qwen_edit.forward_mm_token_type_ids(pipe.text_encoder)

        def call():
            return pipe(image=[image], prompt=PROMPT, negative_prompt=" ", num_inference_steps=8,
                        true_cfg_scale=4.0, guidance_scale=1.0, generator=torch.Generator().manual_seed(42),
                        width=args.res, height=args.res).images[0]
        warm = time.perf_counter()
        call()
        warm_s = time.perf_counter() - warm
    else:
        if recipe == "lightning" and recipe not in references:
            # Reference for the few-step recipe: the same fused weights in bf16, eager.
            eager = profile.model_copy(update=dict(quantize="none", quantize_text_encoder=False, compile=False,
                                                   warmup=False, attention_backend=None,
                                                   offload_text_encoder=False))
            qwen_edit.prepare(pipe, eager)
            ref_loaded = loading.install("edit", eager, pipe, "random")
            references[recipe] = qwen_edit.run_edit(ref_loaded, eager, [image], prompt=PROMPT,
                                                    negative_prompt=" ", seed=42, steps=steps, true_cfg_scale=cfg,
                                                    width=args.res, height=args.res)
            del pipe, ref_loaded
            free(device)
            pipe = build_pipeline(args.tiny, device, dtype, args.layers)
        decisions = qwen_edit.prepare(pipe, profile)
        loaded = loading.install("edit", profile, pipe, "random")
        warm = time.perf_counter()
        if profile.warmup:
            qwen_edit.warm_up(loaded, profile)

        def call():
            return qwen_edit.run_edit(loaded, profile, [image], prompt=PROMPT, negative_prompt=" ", seed=42,
                                      steps=steps, true_cfg_scale=cfg, width=args.res, height=args.res)
        call()  # one more at the benchmark's own size
        warm_s = time.perf_counter() - warm
    ready_s = time.perf_counter() - build_started

    sync(device)
    resident = None
    if device.type == "cuda":
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
        resident = round(torch.cuda.memory_allocated(device) / 2**30, 2)
    times, out = [], None
    for _ in range(args.runs):
        sync(device)
        started = time.perf_counter()
        out = call()
        sync(device)
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    split = component_split(pipe, call, device)
    if baseline:
        references["cfg8"] = out
    arr = np.asarray(out, dtype=np.float32)
    row = dict(profile=name, card=card_name(device), seconds_per_image=round(statistics.median(times), 4),
               runs=[round(t, 4) for t in times], peak_gib=None if peak is None else round(peak, 2),
               rel_error=None if baseline else rel_error(out, references.get(recipe)),
               steps=steps, true_cfg_scale=cfg, width=out.width, height=out.height,
               warmup_s=round(warm_s, 1), ready_s=round(ready_s, 1), finite=bool(np.isfinite(arr).all()),
               output_mean=round(float(arr.mean()), 2), output_std=round(float(arr.std()), 2),
               resident_gib=resident, split_s=split, **decisions)
    if row["rel_error"] is not None:
        row["rel_error"] = round(row["rel_error"], 5)
    call = pipe = None  # drop the last references before free()
    if not baseline:
        del loaded
    free(device)
    return row


def write_rows(path: Path, meta: dict, rows: list[dict]) -> None:
    """docs/performance.json: a list of rows, each carrying the run it came from."""
    run = {k: meta[k] for k in ("date", "versions", "command", "layers", "attention_ms")}
    path.write_text(json.dumps([dict(row, run=run) for row in rows], indent=2) + "\n")


def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'cpu'})"


def versions() -> dict:
    import diffusers
    import transformers

    return dict(torch=torch.__version__, cuda=torch.version.cuda, diffusers=diffusers.__version__,
                transformers=transformers.__version__, python=platform.python_version())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default=DEFAULT_PROFILES)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per profile (median reported)")
    ap.add_argument("--res", type=int, default=1024, help="input and output side")
    ap.add_argument("--layers", type=int, default=None, help="transformer blocks (default: 60; fewer = smoke test)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU check of the code path")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--check", action="store_true", help="GPU tests: every profile finite, error within bounds")
    ap.add_argument("--out", default=None, help="write the rows as JSON here (appended as each profile ends)")
    args = ap.parse_args()
    device = torch.device(args.device)
    args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    if args.tiny:
        args.res = min(args.res, 128)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    settings = load_settings({})
    names = [n.strip() for n in args.profiles.split(",") if n.strip()]
    if names and names[0] != "diffusers-baseline":
        names.insert(0, "diffusers-baseline")  # every table has its baseline, from the same run

    meta = dict(attention_ms=None, date=datetime.now(timezone.utc).isoformat(timespec="seconds"), card=card_name(device),
                versions=versions(), command="python " + " ".join(sys.argv), res=args.res, layers=args.layers or 60,
                prompt=PROMPT)
    print(json.dumps(meta), flush=True)
    rng = np.random.default_rng(0)
    from PIL import Image

    image = Image.fromarray(rng.integers(0, 256, (args.res, args.res, 3), dtype=np.uint8), "RGB")
    references: dict = {}
    rows: list[dict] = []
    failures = []
    with tempfile.TemporaryDirectory() as lora_dir:
        for name in names:
            try:
                row = bench_profile(name, args, settings, device, dtype, image, references, Path(lora_dir))
            except Exception as exc:  # noqa: BLE001 - one profile's failure must not lose the others
                import traceback

                traceback.print_exc()
                row = dict(profile=name, card=card_name(device), error=f"{type(exc).__name__}: {exc}"[:500])
            free(device)  # again, outside the profile's frame: nothing of it may count in the next row
            if rows and "seconds_per_image" in row and "seconds_per_image" in rows[0]:
                row["ratio_to_baseline"] = round(row["seconds_per_image"] / rows[0]["seconds_per_image"], 3)
            elif name == "diffusers-baseline" and "seconds_per_image" in row:
                row["ratio_to_baseline"] = 1.0
            rows.append(row)
            meta["attention_ms"] = dict(kernels.ATTENTION_TIMINGS_MS) or None
            print(json.dumps(row), flush=True)
            if args.out:
                write_rows(Path(args.out), meta, rows)
            if args.check:
                bound = ERROR_BOUNDS.get(name)
                if "error" in row or not row.get("finite", False):
                    failures.append(f"{name}: did not run or produced non-finite output: {row.get('error')}")
                elif bound is not None and row["rel_error"] is not None and row["rel_error"] > bound:
                    failures.append(f"{name}: relative error {row['rel_error']:.4f} above its bound {bound}")

    print(f"\n{'profile':20} {'s/image':>8} {'x base':>7} {'peak GiB':>9} {'rel err':>9}  steps cfg  size")
    for r in rows:
        if "error" in r:
            print(f"{r['profile']:20} ERROR {r['error'][:80]}")
            continue
        print(f"{r['profile']:20} {r['seconds_per_image']:8.3f} {r.get('ratio_to_baseline', 0):7.3f} "
              f"{(r['peak_gib'] or 0):9.2f} {(r['rel_error'] if r['rel_error'] is not None else 0):9.5f}  "
              f"{r['steps']:5} {r['true_cfg_scale']:3} {r['width']}x{r['height']}")
    if args.check:
        print("\nGPU checks:", "all passed" if not failures else "\n  " + "\n  ".join(failures))
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
