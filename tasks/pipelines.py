"""The only module that loads models: profile -> source -> from_pretrained, cached once per process.

A worker process loads its pipeline once (minutes for the real 57 GB model) and every later task in that
process reuses it. The cache is keyed by (kind, model, revision, profile, dtype, device) and guarded by a
lock, so two tasks arriving together never load twice.

The `tiny` model id means: random weights in the Qwen-Image-Edit-2511 layout (zero_cond_t on, 8x VAE),
built once (seeded, deterministic) into a cache folder, then loaded with the very same
`from_pretrained(source, revision=..., torch_dtype=...)` call as the real model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.errors import ModelUnavailable
from tasks.schemas import ModelProfile
from tasks.settings import cache_dir

log = logging.getLogger("recast.pipelines")

# Bump when a tiny builder changes, so stale cached folders are not reused.
TINY_EDIT_VERSION = "qwen-edit-2511-tiny-v1"
TINY_VIDEO_VERSION = "v1"


@dataclass(frozen=True)
class PipelineKey:
    kind: str
    model_id: str
    revision: str | None
    profile: str
    dtype: str
    device: str


@dataclass
class LoadedPipeline:
    key: PipelineKey
    pipe: Any
    source: str
    cold_start_s: float
    # Pipelines are not thread-safe: one call at a time per loaded pipeline.
    call_lock: threading.Lock = field(default_factory=threading.Lock)
    calls: int = 0
    adapters: set = field(default_factory=set)  # request LoRAs loaded into this pipeline (by name)


_CACHE: dict[PipelineKey, LoadedPipeline] = {}
# What fastest_attention_backend measured on this card (reported by the benchmark).
ATTENTION_TIMINGS_MS: dict[str, float] = {}
_CACHE_LOCK = threading.Lock()


def cached_pipelines() -> list[LoadedPipeline]:
    with _CACHE_LOCK:
        return list(_CACHE.values())


def clear_cache() -> None:
    """Drop every loaded pipeline (tests, or a worker switching profiles)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_device(profile: ModelProfile) -> None:
    import torch

    if profile.device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailable(
            f"profile '{profile.name}' runs on {profile.device}, but torch sees no CUDA GPU here; "
            "use --profile tiny on this machine, or run the job on a GPU worker")


# --------------------------------------------------------------------------------------------------
# Where the weights come from


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout_s)
        return True
    except urllib.error.HTTPError:
        return True  # the hub answered, even if with an error status
    except (OSError, ValueError):
        return False


def resolve_source(profile: ModelProfile) -> str:
    """A folder or hub id that from_pretrained can load; fails in seconds when it cannot."""
    if profile.model_id == "tiny":
        return str(ensure_tiny_edit_model())
    if profile.model_id in ("tiny-wan22", "tiny-wan21"):
        return str(ensure_tiny_video_model(profile.model_id.removeprefix("tiny-")))
    if Path(profile.model_id).expanduser().is_dir():
        return str(Path(profile.model_id).expanduser())
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(profile.model_id, "model_index.json", revision=profile.revision)
    if isinstance(cached, str):
        return profile.model_id
    where = f"{profile.model_id}@{profile.revision or 'main'}"
    if constants.HF_HUB_OFFLINE or not _hub_reachable():
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"the hub ({constants.ENDPOINT}) is unreachable"
        raise ModelUnavailable(
            f"model {where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}. "
            f"Set HF_HOME to a cache that holds it, or point RECAST_PROFILES__{profile.name.upper()}__MODEL_ID "
            "at a local folder with the diffusers layout (model_index.json)")
    return profile.model_id


def check_available(profile: ModelProfile) -> str:
    """Fail fast (seconds, not minutes) if `profile` cannot load here; returns the source to load."""
    check_device(profile)
    return resolve_source(profile)


# --------------------------------------------------------------------------------------------------
# Tiny random-weight components


def build_tiny_edit_components() -> dict[str, Any]:
    """Every component of QwenImageEditPlusPipeline, tiny and seeded (identical bytes on every build)."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tasks.offline_tokenizers import build_qwen2_tokenizer, build_qwen2vl_processor, qwen2_token_ids

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


def _build_once(name: str, build) -> Path:
    """Build a pipeline folder into the cache once; later calls (any process) return it at once."""
    target = cache_dir() / name
    if (target / "model_index.json").exists():
        return target
    log.info("building %s into %s (once)", name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{os.getpid()}.{threading.get_ident()}.part"
    shutil.rmtree(staging, ignore_errors=True)
    build().save_pretrained(staging)
    try:
        os.rename(staging, target)  # atomic: other processes see no folder or a complete one
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first
        if not (target / "model_index.json").exists():
            raise
    return target


def ensure_tiny_edit_model() -> Path:
    from diffusers import QwenImageEditPlusPipeline

    return _build_once(TINY_EDIT_VERSION, lambda: QwenImageEditPlusPipeline(**build_tiny_edit_components()))


def build_tiny_video_components(layout: str) -> dict[str, Any]:
    """WanImageToVideoPipeline components, tiny and seeded. wan22: two experts + boundary ratio (the A14B
    layout, no image encoder); wan21: one transformer + a CLIP image encoder."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from tasks.offline_tokenizers import build_t5_tokenizer

    def transformer(seed: int, image_dim: int | None):
        torch.manual_seed(seed)
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim)

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


def ensure_tiny_video_model(layout: str) -> Path:
    from diffusers import WanImageToVideoPipeline

    return _build_once(f"wan-i2v-{layout}-tiny-{TINY_VIDEO_VERSION}",
                       lambda: WanImageToVideoPipeline(**build_tiny_video_components(layout)))


# --------------------------------------------------------------------------------------------------
# transformers >= 5 with diffusers 0.42.1: 3-D positions for image tokens


def forward_mm_token_type_ids(text_encoder) -> None:
    """Give Qwen2.5-VL the `mm_token_type_ids` diffusers 0.42.1 does not pass.

    Without them transformers 5.x cannot compute the 3-D (temporal, height, width) rotary positions of
    the image tokens and silently falls back to sequential positions, which changes every edit made with
    real weights (diffusers issue 14194). The ids are derived from input_ids exactly as the processor
    derives them: 1 for image tokens, 2 for video tokens, 0 for text.
    """
    if getattr(text_encoder, "_recast_mm_token_types", False):
        return
    config = text_encoder.config
    image_id, video_id = config.image_token_id, config.video_token_id

    def add_token_types(module, args, kwargs):
        input_ids = kwargs.get("input_ids")
        if input_ids is None or kwargs.get("mm_token_type_ids") is not None:
            return None
        if kwargs.get("image_grid_thw") is None and kwargs.get("video_grid_thw") is None:
            return None
        types = (input_ids == image_id).int() + 2 * (input_ids == video_id).int()
        return args, {**kwargs, "mm_token_type_ids": types}

    text_encoder.register_forward_pre_hook(add_token_types, with_kwargs=True)
    text_encoder._recast_mm_token_types = True


# --------------------------------------------------------------------------------------------------
# The cache


def _load_edit(profile: ModelProfile) -> tuple[Any, str]:
    import diffusers
    import transformers
    from diffusers import QwenImageEditPlusPipeline

    # Per-shard loading bars are noise in a worker log; the load time is logged instead.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    source = check_available(profile)
    # The same call for the tiny folder and the real hub model (revision is ignored for a folder).
    # Weights land in CPU RAM; prepare_edit_pipeline places them (quantizing layer by layer on the GPU,
    # so a card smaller than the bf16 model still loads it).
    pipe = QwenImageEditPlusPipeline.from_pretrained(source, revision=profile.revision,
                                                     dtype=_torch_dtype(profile.dtype))
    prepare_edit_pipeline(pipe, profile)
    return pipe, source


def prepare_edit_pipeline(pipe, profile: ModelProfile) -> dict:
    """Apply a profile's recipe to a loaded pipeline: LoRA fusion, precision, placement, attention, compile.

    Also used by benchmarks/gpu_edit.py on random full-size weights, so what is measured is what serves.
    """
    import torch

    from tasks import precision

    pipe.set_progress_bar_config(disable=True)
    forward_mm_token_type_ids(pipe.text_encoder)
    # The pipeline reads hidden states only; the 152k-word LM head (1.1 GB in bf16) is never used.
    pipe.text_encoder.lm_head = torch.nn.Identity()
    device = torch.device(profile.device)
    decisions: dict = {}
    # 1. Few-step distillation: fuse the LoRA into the bf16 weights before any quantization.
    if profile.lightning is not None:
        fuse_lora(pipe, profile.lightning, adapter_name="lightning")
    if profile.scheduler:
        pipe.scheduler = type(pipe.scheduler).from_config({**pipe.scheduler.config, **profile.scheduler})
    # 2. Precision and placement, block by block so the high-precision copy never sits whole on the GPU.
    if profile.quantize != "none":
        def eligible(name, linear):
            return precision.quantizable(linear)

        blocks = list(pipe.transformer.transformer_blocks)
        if profile.quantize_text_encoder:
            blocks += list(pipe.text_encoder.model.language_model.layers)
        decisions["quantized_linears"] = 0
        for block in blocks:
            block.to(device)  # quantize on the GPU (fast), one block of high-precision weights at a time
            decisions["quantized_linears"] += precision.quantize_linears(block, profile.quantize, eligible)
    for name in ("transformer", "vae"):
        getattr(pipe, name).to(device)
    if profile.offload_text_encoder and device.type == "cuda":
        from diffusers.hooks import apply_group_offloading

        # Streamed a decoder/vision block at a time from pinned RAM on a side CUDA stream, overlapped with
        # compute. Applied to the two block stacks: at the top level the whole encoder would be one group.
        pipe.text_encoder.to("cpu")
        language_model = pipe.text_encoder.model.language_model
        # The 1 GB token-embedding table stays in RAM: a lookup of ~1k rows there is cheaper than moving it.
        language_model.embed_tokens = precision.HostEmbedding(language_model.embed_tokens)
        for part in (language_model, pipe.text_encoder.model.visual):
            apply_group_offloading(part, onload_device=device, offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    else:
        pipe.text_encoder.to(device)
    # 3. Kernels.
    if profile.attention_backend:
        backend = profile.attention_backend
        if backend == "auto":
            backend = fastest_attention_backend(pipe.transformer, device)
        pipe.transformer.set_attention_backend(backend)
        decisions["attention_backend"] = backend
        log.info("attention backend: %s", backend)
    if profile.compile:
        _use_real_rotary(pipe.transformer)
        # Regional compilation: the 60 identical blocks compile once; dynamic shapes because prompt
        # lengths (and so sequence lengths) differ between cond, uncond and requests.
        pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    return decisions


def fastest_attention_backend(transformer, device, seq_len: int = 8448) -> str:
    """Time torch's SDPA kernels at this model's head shape on this card; the diffusers name of the fastest."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        return "native"
    heads, dim = transformer.config.num_attention_heads, transformer.config.attention_head_dim
    q, k, v = (torch.randn(1, heads, seq_len, dim, device=device, dtype=torch.bfloat16) for _ in range(3))
    candidates = {"_native_cudnn": SDPBackend.CUDNN_ATTENTION, "_native_flash": SDPBackend.FLASH_ATTENTION,
                  "_native_efficient": SDPBackend.EFFICIENT_ATTENTION}
    timings = {}
    for name, kernel in candidates.items():
        try:
            with sdpa_kernel(kernel):
                for _ in range(2):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(5):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v)
                end.record()
                torch.cuda.synchronize(device)
                timings[name] = start.elapsed_time(end) / 5
        except RuntimeError:  # kernel not available for this card / shape
            continue
    log.info("attention kernels (ms at %d tokens): %s", seq_len, timings)
    ATTENTION_TIMINGS_MS.update(timings)
    return min(timings, key=timings.get) if timings else "native"


def _rotary_real(x, freqs_cis, use_real=True, use_real_unbind_dim=-1):
    """Qwen-Image's complex-number RoPE in real arithmetic (same values), which torch.compile can fuse.

    Accepts diffusers' complex frequencies, or the same as real (..., 2) pairs (see _use_real_rotary).
    """
    import torch

    if use_real:
        return _ORIGINAL_ROTARY[0](x, freqs_cis, use_real, use_real_unbind_dim)
    cos_sin = (torch.view_as_real(freqs_cis) if torch.is_complex(freqs_cis) else freqs_cis).unsqueeze(1)
    cos, sin = cos_sin[..., 0], cos_sin[..., 1]  # [S, 1, D/2]
    real, imag = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(3).type_as(x)


_ORIGINAL_ROTARY: list = []


def _use_real_rotary(transformer) -> None:
    """Keep complex numbers out of the compiled blocks: Inductor cannot generate code for them."""
    import torch
    import diffusers.models.transformers.transformer_qwenimage as qwen

    if not _ORIGINAL_ROTARY:
        _ORIGINAL_ROTARY.append(qwen.apply_rotary_emb_qwen)
        qwen.apply_rotary_emb_qwen = _rotary_real

    def as_real_pairs(module, args, output):
        return tuple(torch.view_as_real(f) if torch.is_complex(f) else f for f in output)

    transformer.pos_embed.register_forward_hook(as_real_pairs)


def fuse_lora(pipe, spec, adapter_name: str) -> None:
    """Load a diffusers-format LoRA, fuse it at spec.weight into the base weights, drop the adapter."""
    pipe.load_lora_weights(spec.source, weight_name=spec.weight_name, revision=spec.revision,
                           adapter_name=adapter_name)
    pipe.fuse_lora(lora_scale=spec.weight, adapter_names=[adapter_name], components=["transformer"])
    pipe.unload_lora_weights()  # keeps the fused weights, frees the adapter matrices


def warm_up(loaded: LoadedPipeline, profile: ModelProfile) -> float:
    """Run small edits so compilation and kernel selection happen before the first request."""
    from PIL import Image

    started = time.perf_counter()
    for aspect in (1.0, 0.75):  # two shapes: the compiled graph becomes shape-generic here, not later
        width, height = output_size(None, None, aspect, profile.output_area)
        image = Image.new("RGB", (width, height), (128, 128, 128))
        run_edit(loaded, profile, [image], prompt="warm-up", negative_prompt=" ", seed=0, steps=2,
                 true_cfg_scale=profile.true_cfg_scale or 4.0, width=width, height=height)
    return time.perf_counter() - started


def _load_video(profile) -> tuple[Any, str]:
    import diffusers
    from diffusers import WanImageToVideoPipeline

    diffusers.utils.logging.disable_progress_bar()
    source = check_available(profile)
    pipe = WanImageToVideoPipeline.from_pretrained(source, revision=profile.revision,
                                                   dtype=_torch_dtype(profile.dtype))
    pipe.to(profile.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, source


_LOADERS = {"edit": _load_edit, "video": _load_video}


def get_pipeline(kind: str, profile: ModelProfile) -> tuple[LoadedPipeline, bool]:
    """The process's pipeline for (kind, profile): loaded on first use, then reused.

    Returns (loaded, cache_hit). The lock is held while loading so concurrent callers wait for the one
    load instead of starting their own.
    """
    key = PipelineKey(kind, profile.model_id, profile.revision, profile.name, profile.dtype, profile.device)
    with _CACHE_LOCK:
        loaded = _CACHE.get(key)
        if loaded is not None:
            return loaded, True
        started = time.perf_counter()
        pipe, source = _LOADERS[kind](profile)
        loaded = LoadedPipeline(key=key, pipe=pipe, source=source, cold_start_s=0.0)
        if kind == "edit" and profile.warmup:
            warm_up(loaded, profile)
        # Cold start = everything a worker does before it can serve: load, place, compile, warm up.
        loaded.cold_start_s = time.perf_counter() - started
        _CACHE[key] = loaded
        log.info("loaded %s pipeline %s@%s (%s) in %.2fs", kind, profile.model_id, profile.revision,
                 profile.name, loaded.cold_start_s)
        return loaded, False


@contextlib.contextmanager
def _vae_image_area(area: int):
    """diffusers reads the VAE input area from a module constant; set it for one call, then restore."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus

    previous = edit_plus.VAE_IMAGE_SIZE
    edit_plus.VAE_IMAGE_SIZE = area
    try:
        yield
    finally:
        edit_plus.VAE_IMAGE_SIZE = previous


# One diffusers call at a time in this process: the VAE area above is process-wide.
_CALL_LOCK = threading.Lock()


class BadLora(ValueError):
    """A LoRA file that cannot be applied to this model; the pipeline is left as it was."""


def lora_file(lora) -> Path:
    """A local copy of a request's LoRA (fetched through storage once, verified by SHA-256)."""
    import hashlib

    from tasks import storage

    if storage.scheme_of(lora.source) == "file":
        local = Path(storage.normalize_uri(lora.source)[len("file://"):])
        if local.exists():
            return local
    target = cache_dir() / "loras" / f"{lora.sha256}.safetensors"
    if not target.exists():
        data = storage.read_bytes(lora.source)
        if hashlib.sha256(data).hexdigest() != lora.sha256:
            raise BadLora(f"LoRA {storage.redact(lora.source)} changed since the request was checked")
        storage.write_bytes(f"file://{target}", data)
    return target


def use_loras(loaded: LoadedPipeline, loras: list) -> None:
    """Make exactly `loras` active (at their weights) on the loaded pipeline, loading new ones once.

    Adapters stay loaded between requests, so switching back and forth costs no reload of anything.
    Called with the pipeline's call lock held.
    """
    pipe = loaded.pipe
    for lora in loras:
        if lora.name in loaded.adapters:
            continue
        try:
            pipe.load_lora_weights(str(lora_file(lora)), adapter_name=lora.name)
        except Exception as exc:  # noqa: BLE001 - any load failure leaves the pipeline as it was
            _drop_adapter(pipe, lora.name)
            raise BadLora(f"LoRA {lora.source} does not fit this model ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300]})") from None
        if lora.name not in pipe.get_list_adapters().get("transformer", []):
            _drop_adapter(pipe, lora.name)
            raise BadLora(f"LoRA {lora.source} has no weights for this model's transformer layers")
        loaded.adapters.add(lora.name)
    if loras:
        pipe.enable_lora()
        pipe.set_adapters([lora.name for lora in loras], adapter_weights=[lora.weight for lora in loras])
    elif loaded.adapters:
        pipe.disable_lora()  # adapters stay loaded, inactive: the base model exactly


def _drop_adapter(pipe, name: str) -> None:
    try:
        if name in pipe.get_list_adapters().get("transformer", []):
            pipe.delete_adapters([name])
    except Exception:  # noqa: BLE001 - best effort: nothing was loaded
        pass


def run_edit(loaded: LoadedPipeline, profile: ModelProfile, images: list, *, prompt: str, negative_prompt: str,
             seed: int, steps: int, true_cfg_scale: float, width: int, height: int, loras: list = ()):
    """One edit on the loaded pipeline: a fresh generator seeded per edit, PIL image out."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    with _CALL_LOCK, loaded.call_lock, _vae_image_area(profile.vae_image_area), torch.inference_mode():
        use_loras(loaded, list(loras))
        loaded.calls += 1
        result = loaded.pipe(
            image=images,
            prompt=prompt,
            # CFG needs a negative prompt; diffusers treats " " as one, "" as none.
            negative_prompt=negative_prompt or " ",
            true_cfg_scale=true_cfg_scale,
            num_inference_steps=steps,
            width=width,
            height=height,
            generator=generator,
        )
    return result.images[0]


def run_video(loaded: LoadedPipeline, image, *, prompt: str, negative_prompt: str, seed: int, steps: int,
              guidance_scale: float, num_frames: int, width: int, height: int, max_sequence_length: int):
    """One clip: uint8 frames of shape (num_frames, height, width, 3)."""
    import numpy as np
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    with _CALL_LOCK, loaded.call_lock, torch.inference_mode():
        loaded.calls += 1
        frames = loaded.pipe(image=image, prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                             num_frames=num_frames, num_inference_steps=steps, guidance_scale=guidance_scale,
                             max_sequence_length=max_sequence_length, generator=generator,
                             output_type="np").frames[0]
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def output_size(width: int | None, height: int | None, aspect: float, area: int) -> tuple[int, int]:
    """The output size: the request's (rounded down to multiples of 16), else `area` at `aspect`."""
    if width and height:
        return max(16, width // 16 * 16), max(16, height // 16 * 16)
    if width:
        height = width / aspect
    elif height:
        width = height * aspect
    else:
        width = (area * aspect) ** 0.5
        height = width / aspect
    return max(16, int(round(width / 16)) * 16), max(16, int(round(height / 16)) * 16)


def describe_device(profile: ModelProfile) -> str:
    import torch

    if profile.device.startswith("cuda") and torch.cuda.is_available():
        return f"{profile.device} ({torch.cuda.get_device_name(torch.device(profile.device))})"
    return profile.device
