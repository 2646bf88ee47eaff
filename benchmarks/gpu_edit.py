"""GPU benchmark: plain diffusers against recast's profiles, on the FULL-SIZE Qwen-Image-Edit-2511 architecture.

No weights are downloaded. Every module is built on the meta device, materialised directly on the GPU and
filled with seeded random values (normal(0, 0.02) for matrices, ones for norm scales, zeros for biases),
so each profile starts from the same weights. Rows, all in one run on one card:

    diffusers-baseline  QwenImageEditPlusPipeline called as the origin did (1024x1024, 8 steps,
                        true_cfg_scale 4.0, negative_prompt " "), plus only recast's mm_token_type_ids fix
                        (a correctness fix that costs nothing; without it image tokens get wrong positions)
    <profile>           the same weights through recast's own code: tasks.qwen_edit.prepare
                        (the loader's recipe step), warm_up, and run_edit
    <profile>@<backend> the same with another attention backend (e.g. lightning@sage): kernels side by side;
                        <profile>@regional: its blocks compiled in the process instead of ahead of time;
                        <profile>@autotune: with inductor's max-autotune (compile_autotune)

Each row: median s/image over --runs timed calls after warm-up, ratio to the baseline, peak GPU memory
during the timed calls, and the PSNR of the output image against the baseline's on the same weights and seed
(for `lightning`, against a bf16 run of the same 4-step recipe on the same fused weights). The baseline's
image of another seed is scored against the same reference (`unrelated_psnr_db`), so a bound is seen to fail.
With --check, each quantized profile also serves a per-request LoRA without reloading: the output must change
with it and come back bit for bit without it.

With `--weights real` the pipeline is loaded from the Hugging Face cache (the pinned revision) instead of
random weights, so a user with the weights reproduces the table on real images.

    python benchmarks/gpu_edit.py --check --out docs/performance.json   # the table, GPU tests included
    python benchmarks/gpu_edit.py --tiny --device cpu                   # code-path check without a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import common
from common import materialize_random, sync
from recast.tasks.models import kernels, loading, lora, qwen_edit
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
# Minimum PSNR (dB) against the reference on the same weights and seed that --check enforces.
PSNR_BOUNDS = {"bf16": 60.0, "bf16-fast": 35.0, "fp8": 28.0, "fp8-offload": 28.0, "int4": 26.0, "lightning": 28.0}
LORA_CHECKED = ("fp8", "int4", "lightning")  # quantized profiles whose per-request LoRA --check exercises
DEFAULT_PROFILES = "diffusers-baseline,bf16,bf16-fast,fp8,fp8-offload,int4,lightning"


def build_pipeline(tiny: bool, device: torch.device, dtype: torch.dtype, layers: int | None, rng_device=None):
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
    materialize_random(transformer, device, dtype, seed=1, rng_device=rng_device)
    materialize_random(vae, device, dtype, seed=2, rng_device=rng_device)
    materialize_random(text_encoder, device, dtype, seed=3, rng_device=rng_device)
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


def vision_windows_ab(pipe, image, device, runs: int = 10) -> dict:
    """The text encoder's prompt encoding with the photo's vision windows attended in one call a block (recast's
    `kernels.vision_windows_attention`, what the profiles run) against transformers' own SDPA a window, interleaved
    on the same weights: median ms each, and how far apart their prompt embeddings are (the same attention)."""
    visual = pipe.text_encoder.model.visual
    ours = kernels.VISION_WINDOWS
    kept = visual.config._attn_implementation
    condition = image.resize((384, 384))
    timings: dict[str, list[float]] = {"one_call": [], "per_window": []}
    embeds = {}
    try:
        for index in range(2 * runs + 2):
            way = "one_call" if index % 2 == 0 else "per_window"
            visual.config._attn_implementation = ours if way == "one_call" else "sdpa"
            sync(device)
            started = time.perf_counter()
            with torch.inference_mode():
                embeds[way] = pipe.encode_prompt(prompt=PROMPT, image=[condition], device=device)[0]
            sync(device)
            if index >= 2:  # one warm-up call each
                timings[way].append((time.perf_counter() - started) * 1000)
    finally:
        visual.config._attn_implementation = kept
    one_call, per_window = embeds["one_call"].float(), embeds["per_window"].float()
    difference = (one_call - per_window).norm() / per_window.norm()
    return {way: round(statistics.median(times), 2) for way, times in timings.items()} | {
        "rel_l2": round(float(difference), 5)}


def bench_profile(name, args, settings, device, dtype, image, references, lora_dir) -> dict:
    """Build fresh weights, apply the profile through recast's code, warm up, time. Returns a result row."""
    baseline = name == "diffusers-baseline"
    base, backend = common.with_backend(name)
    profile = settings.profiles["bf16" if baseline else base]
    overrides = dict(device=str(device), dtype=args.dtype, output_area=args.res * args.res,
                     vae_image_area=args.res * args.res)
    overrides.update(common.profile_overrides(backend))
    if args.tiny:  # CPU code-path check: no CUDA kernels, no compilation
        overrides.update(compile=False, attention_backend=None, warmup=False)
    build_started = time.perf_counter()
    pipe = build(args, device, dtype)
    if profile.lightning is not None and args.weights == "random":
        fused = make_random_lora(pipe, lora_dir)
        overrides["lightning"] = profile.lightning.model_copy(update=dict(source=str(fused), weight_name=None,
                                                                          revision=None))
    profile = profile.model_copy(update=overrides)
    steps = profile.steps or 8
    cfg = profile.true_cfg_scale if profile.true_cfg_scale is not None else 4.0
    recipe = "lightning" if profile.lightning else "cfg8"

    decisions: dict = {}
    if baseline:
        pipe.set_progress_bar_config(disable=True)
        qwen_edit.forward_mm_token_type_ids(pipe.text_encoder)

        def call(seed=42):
            return pipe(image=[image], prompt=PROMPT, negative_prompt=" ", num_inference_steps=8,
                        true_cfg_scale=4.0, guidance_scale=1.0, generator=torch.Generator().manual_seed(seed),
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
            references[recipe] = qwen_edit.run_edit(ref_loaded, eager, [image], prompt=PROMPT, negative_prompt=" ",
                                                    seed=42, steps=steps, true_cfg_scale=cfg, width=args.res,
                                                    height=args.res)
            del pipe, ref_loaded
            common.free(device)
            pipe = build(args, device, dtype)
        decisions = qwen_edit.prepare(pipe, profile)
        loaded = loading.install("edit", profile, pipe, "random")
        warm = time.perf_counter()
        qwen_edit.warm_up(loaded, profile)

        def call(seed=42, loras=()):
            return qwen_edit.run_edit(loaded, profile, [image], prompt=PROMPT, negative_prompt=" ", seed=seed,
                                      steps=steps, true_cfg_scale=cfg, width=args.res, height=args.res, loras=loras)
        call()  # one more at the benchmark's own size
        warm_s = time.perf_counter() - warm
    ready_s = time.perf_counter() - build_started

    resident = common.reset_peak(device)
    times, out = [], None
    for _ in range(args.runs):
        out, seconds = common.timed(call, device)
        times.append(seconds)
    peak = common.peak_gib(device)
    split = component_split(pipe, call, device)
    extra: dict = {}
    if baseline:
        references["cfg8"] = out
        extra["unrelated_psnr_db"] = common.psnr(call(seed=43), out)  # another seed: must fail every bound
    elif args.check and base in LORA_CHECKED:
        extra.update(lora_check(call, out, pipe.transformer, lora_dir, device))
    if not baseline:
        extra["text_encoder_ms"] = vision_windows_ab(pipe, image, device)
    if args.trace:
        # `@` in a file name does not survive every transfer (the device tool leaves such files out)
        extra["trace_top"] = common.kernel_trace(call, device, Path(args.trace) / f"{name.replace('@', '-with-')}.txt")
    arr = np.asarray(out, dtype=np.float32)
    seconds = round(statistics.median(times), 4)
    row = dict(stage="edit", profile=name, card=common.card_name(device), gpus=1, seconds=seconds,
               seconds_per_image=seconds, runs=[round(t, 4) for t in times], peak_gib=peak,
               psnr_db=None if baseline else common.psnr(out, references.get(recipe)),
               steps=steps, true_cfg_scale=cfg, width=out.width, height=out.height, num_frames=None,
               warmup_s=round(warm_s, 1), ready_s=round(ready_s, 1), finite=bool(np.isfinite(arr).all()),
               output_mean=round(float(arr.mean()), 2), output_std=round(float(arr.std()), 2),
               resident_gib=resident, split_s=split, **decisions, **extra)
    call = pipe = None  # drop the last references before free()
    if not baseline:
        del loaded
    common.free(device)
    return row


def lora_check(call, base_out, transformer, lora_dir: Path, device) -> dict:
    """A per-request LoRA on the loaded (quantized, compiled) pipeline: it changes the output, and the next
    request without it gets the base output back bit for bit. Nothing is reloaded."""
    from recast.tasks.schemas.requests import LoraRef

    from PIL import ImageChops

    folder = lora_dir / "request"
    if not (folder / "pytorch_lora_weights.safetensors").exists():
        make_request_lora(folder, transformer)
    resolved = lora.check_lora_file("loras[0].source", LoraRef(source=str(folder / "pytorch_lora_weights.safetensors")))
    with_lora, first_s = common.timed(lambda: call(loras=[resolved]), device)
    _, switch_s = common.timed(lambda: call(loras=[resolved]), device)
    without = call()
    return dict(lora_changes_output=ImageChops.difference(with_lora, base_out).getbbox() is not None,
                lora_restores_base=ImageChops.difference(without, base_out).getbbox() is None,
                lora_first_call_s=round(first_s, 2), lora_call_s=round(switch_s, 2))


def make_request_lora(folder: Path, transformer, rank: int = 8) -> None:
    """A random rank-8 LoRA on the attention projections of the loaded transformer (a user's adapter), written in
    the diffusers format straight from the layers' shapes (quantized layers keep in/out_features)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(9)
    state = {}
    for name, module in transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")):
            # Scaled so the branch moves each layer's output by about half its input's size: a visible adapter.
            down = torch.randn(rank, module.in_features, generator=generator) / module.in_features ** 0.5
            state[f"transformer.{name}.lora_A.weight"] = down
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.5 / rank ** 0.5
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()},
              str(folder / "pytorch_lora_weights.safetensors"))


def build(args, device, dtype):
    """Random full-size (or tiny) weights, or the real checkpoint from the Hugging Face cache (--weights real)."""
    if args.weights == "real":
        from diffusers import QwenImageEditPlusPipeline

        profile = load_settings({}).profiles["bf16"]
        return QwenImageEditPlusPipeline.from_pretrained(profile.model_id, revision=profile.revision, dtype=dtype)
    return build_pipeline(args.tiny, device, dtype, args.layers)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default=DEFAULT_PROFILES)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per profile (median reported)")
    ap.add_argument("--res", type=int, default=1024, help="input and output side")
    ap.add_argument("--layers", type=int, default=None, help="transformer blocks (default: 60; fewer = smoke test)")
    ap.add_argument("--weights", choices=["random", "real"], default="random")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU check of the code path")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--check", action="store_true", help="GPU tests: every profile finite, PSNR within bounds, "
                    "per-request LoRAs on the quantized profiles")
    ap.add_argument("--out", default=None, help="merge the rows into this JSON file as each profile ends")
    ap.add_argument("--trace", default=None, help="one more call of each row under torch.profiler: its kernel table "
                    "in this folder (<row>.txt, `@` written `-with-`), its top kernels in the row (`trace_top`)")
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

    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), versions=common.versions(),
                command=common.recorded_command(sys.argv), res=args.res, layers=args.layers or 60, weights=args.weights,
                prompt=PROMPT, attention_ms=None)
    print(json.dumps(meta), flush=True)
    rng = np.random.default_rng(0)
    from PIL import Image

    image = Image.fromarray(rng.integers(0, 256, (args.res, args.res, 3), dtype=np.uint8), "RGB")
    references: dict = {}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as lora_dir:
        for name in names:
            try:
                row = bench_profile(name, args, settings, device, dtype, image, references, Path(lora_dir))
            except Exception as exc:  # noqa: BLE001 - one profile's failure must not lose the others
                import traceback

                traceback.print_exc()
                row = dict(stage="edit", profile=name, gpus=1, card=common.card_name(device),
                           error=f"{type(exc).__name__}: {exc}"[:500])
            common.free(device)  # again, outside the profile's frame: nothing of it may count in the next row
            if rows and "seconds" in row and "seconds" in rows[0]:
                row["ratio_to_baseline"] = round(row["seconds"] / rows[0]["seconds"], 3)
            elif name == "diffusers-baseline" and "seconds" in row:
                row["ratio_to_baseline"] = 1.0
            meta["attention_ms"] = dict(kernels.ATTENTION_TIMINGS_MS) or None
            row["run"] = dict(meta)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                common.write_rows(Path(args.out), [row])

    failures: list[str] = []
    unrelated = rows[0].get("unrelated_psnr_db") if rows else None
    for row in rows:
        if args.check:
            common.check_quality(row["profile"], dict(row, unrelated_psnr_db=unrelated), PSNR_BOUNDS, failures)
            if common.with_backend(row["profile"])[0] in LORA_CHECKED and "error" not in row:
                if not row.get("lora_changes_output") or not row.get("lora_restores_base"):
                    failures.append(f"{row['profile']}: per-request LoRA changes={row.get('lora_changes_output')}, "
                                    f"restores base={row.get('lora_restores_base')}")
    print(f"\n{'profile':20} {'s/image':>8} {'x base':>7} {'peak GiB':>9} {'PSNR dB':>8}  steps cfg  size")
    for r in rows:
        if "error" in r:
            print(f"{r['profile']:20} ERROR {r['error'][:80]}")
            continue
        print(f"{r['profile']:20} {r['seconds']:8.3f} {r.get('ratio_to_baseline', 0):7.3f} "
              f"{(r['peak_gib'] or 0):9.2f} {(r['psnr_db'] or 0):8.2f}  "
              f"{r['steps']:5} {r['true_cfg_scale']:3} {r['width']}x{r['height']}")
    if args.check:
        print("\nGPU checks:", "all passed" if not failures else "\n  " + "\n  ".join(failures))
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
