"""The edit recipe: Qwen-Image-Edit-2511 through diffusers' QwenImageEditPlusPipeline.

    from_source  from_pretrained (the tiny folder or the real model), then `transform_weights`:
              the unused LM head dropped, the Lightning LoRA fused into the bf16 weights, FP8 / INT4 linears
    place     the rest of the recipe: mm_token_type_ids forwarded to Qwen2.5-VL, the scheduler, placement (text
              encoder resident or streamed), LoRA branches for per-request adapters, attention backend,
              real-valued RoPE, the blocks compiled (ahead of time, or regional torch.compile)
    warm_up   a small edit, so compilation happens before the first request
    run_edit  one edit: a fresh seeded generator, the profile's VAE input area, the request's adapters

`benchmarks/gpu_edit.py` calls `prepare`, `warm_up` and `run_edit` on full-size random weights, so what is
measured is what serves.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import types

from recast.tasks.lifecycle import JobCancelled, stop_between_steps
from recast.tasks.models import kernels, lora, parallel, precision
from recast.tasks.models.loading import LoadedPipeline, torch_dtype
from recast.tasks.schemas.settings import ModelProfile

log = logging.getLogger("recast.models")


# Bump when what transform_weights writes changes (prepared weights made by older code are then made again).
PREPARED_VERSION = 1


def from_source(profile: ModelProfile, source: str):
    """The pipeline from the source checkpoint (the tiny folder or the real model), its weights transformed."""
    import diffusers
    import transformers
    from diffusers import QwenImageEditPlusPipeline

    # Per-shard loading bars are noise in a worker log; the load time is logged instead.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    # The same call for the tiny folder and the real hub model (revision is ignored for a folder). Weights land
    # in CPU RAM; the transforms quantize block by block on the GPU, so a card smaller than the bf16 model loads it.
    pipe = QwenImageEditPlusPipeline.from_pretrained(source, revision=profile.revision, dtype=torch_dtype(profile.dtype))
    transform_weights(pipe, profile)
    return pipe


def prepare(pipe, profile: ModelProfile) -> dict:
    """Apply a profile's whole recipe to a loaded pipeline (the benchmarks' random weights); returns the decisions."""
    return {**transform_weights(pipe, profile), **place(pipe, profile)}


def transform_weights(pipe, profile: ModelProfile) -> dict:
    """What the recipe does to the weights (what prepared weights keep):
    1. the unused LM head dropped, 2. the Lightning LoRA fused into the bf16 weights, 3. FP8 / INT4 linears."""
    import torch

    decisions: dict = {}
    # The pipeline reads hidden states only; the 152k-word LM head (1.1 GB in bf16) is never used.
    pipe.text_encoder.lm_head = torch.nn.Identity()
    if profile.lightning is not None:
        decisions["lightning_scale"] = lora.fuse_lora(pipe, profile.lightning, adapter_name="lightning")
    if profile.quantize != "none":
        decisions["quantized_linears"] = precision.quantize_blocks(_quantized_blocks(pipe, profile), profile.quantize,
                                                                   torch.device(profile.device))
    return decisions


def give_structure(pipe, profile: ModelProfile) -> None:
    """transform_weights' module structure on an empty pipeline, for prepared weights to fill."""
    import torch

    pipe.text_encoder.lm_head = torch.nn.Identity()
    if profile.quantize != "none":
        precision.quantize_blocks(_quantized_blocks(pipe, profile), profile.quantize, device=None)


def _quantized_blocks(pipe, profile: ModelProfile) -> list:
    blocks = list(pipe.transformer.transformer_blocks)
    if profile.quantize_text_encoder:
        blocks += list(pipe.text_encoder.model.language_model.layers)
    return blocks


def load_device(profile: ModelProfile, component: str) -> str:
    """Where a component's prepared tensors are read to: its place when serving (place() puts the rest)."""
    if component == "text_encoder" and profile.offload_text_encoder:
        return "cpu"  # streamed from (pinned) RAM
    return profile.device


def place(pipe, profile: ModelProfile) -> dict:
    """Everything of the recipe that is not weights, on a pipeline whose weights are transformed:
    1. correctness: mm_token_type_ids forwarded to Qwen2.5-VL; 2. the profile's scheduler; 3. placement (text
    encoder resident or streamed); 4. LoRA branches for per-request adapters (before compiling, so compiled blocks
    hold them) and a team's split; 5. kernels: attention backend, real-valued RoPE, the blocks compiled."""
    import torch

    from recast.tasks.models.prepared import compiled_blocks_path

    pipe.set_progress_bar_config(disable=True)
    device = torch.device(profile.device)
    decisions: dict = {}
    # 1. Correctness, and the photo's vision windows attended in one call each block (the same attention)
    forward_mm_token_type_ids(pipe.text_encoder)
    kernels.use_one_call_vision_windows(pipe.text_encoder)
    # 2. Scheduler (few-step distillation's)
    if profile.scheduler:
        pipe.scheduler = type(pipe.scheduler).from_config({**pipe.scheduler.config, **profile.scheduler})
    # 3. Placement
    for name in ("transformer", "vae"):
        getattr(pipe, name).to(device)
    if profile.offload_text_encoder and device.type == "cuda":
        language_model = pipe.text_encoder.model.language_model
        # The 1 GB token-embedding table stays in RAM: a lookup of ~1k rows there is cheaper than moving it.
        language_model.embed_tokens = precision.HostEmbedding(language_model.embed_tokens)
        # Two block stacks, streamed a block at a time: at the top level the whole encoder would be one group.
        precision.stream_blocks([language_model, pipe.text_encoder.model.visual], device)
    else:
        pipe.text_encoder.to(device)
    # 4. Per-request LoRA branches; a multi-GPU team's split of the transformer work
    lora.install_branches(pipe.transformer)
    parallel.apply(pipe, [pipe.transformer], "edit")
    # 5. Kernels (the RoPE processors first: the attention backend is set on the processors in place)
    if profile.compile:
        kernels.use_real_rotary(pipe.transformer)
    if profile.attention_backend:
        decisions["attention_backend"] = kernels.use_attention_backend(pipe.transformer, profile.attention_backend,
                                                                       device)
    if profile.compile:
        # The 60 identical blocks compile once (ahead of time, or regionally); dynamic shapes because prompt lengths
        # (and so sequence lengths) differ between cond, uncond and requests.
        decisions["compiled_blocks"] = kernels.compile_blocks(
            pipe.transformer, fullgraph=parallel.fullgraph(), dynamic=True,
            ahead_of_time=profile.compile_ahead_of_time, artifact=compiled_blocks_path("edit", profile),
            autotune=profile.compile_autotune)
        if profile.compile_autotune:
            decisions["compile_autotune"] = True
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # a worker pinned to N cores says so there
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    return decisions


def forward_mm_token_type_ids(text_encoder) -> None:
    """Give Qwen2.5-VL the `mm_token_type_ids` diffusers 0.42.1 does not pass.

    Without them transformers 5.x cannot compute the 3-D (temporal, height, width) rotary positions of the
    image tokens and silently falls back to sequential positions, which changes every edit made with real
    weights (diffusers issue 14194). The ids are derived from input_ids exactly as the processor derives them:
    1 for image tokens, 2 for video tokens, 0 for text. A forward pre-hook on this one module.
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
        types_ = (input_ids == image_id).int() + 2 * (input_ids == video_id).int()
        return args, {**kwargs, "mm_token_type_ids": types_}

    text_encoder.register_forward_pre_hook(add_token_types, with_kwargs=True)
    text_encoder._recast_mm_token_types = True


@functools.lru_cache(maxsize=None)
def _call_with_vae_area(pipeline_class: type, area: int):
    """The pipeline's own __call__ code, run with its module constant VAE_IMAGE_SIZE rebound to `area`.

    diffusers resizes every input to VAE_IMAGE_SIZE pixels for the VAE, a module constant with no parameter.
    Rather than changing the constant for the whole process, this builds a copy of the function whose globals
    differ in that one name: nothing outside the call sees it, and no lock is needed.
    """
    original = inspect.unwrap(pipeline_class.__call__)
    scoped = types.FunctionType(original.__code__, {**original.__globals__, "VAE_IMAGE_SIZE": area},
                                original.__name__, original.__defaults__, original.__closure__)
    scoped.__kwdefaults__ = original.__kwdefaults__
    return scoped


def run_edit(loaded: LoadedPipeline, profile: ModelProfile, images: list, *, prompt: str, negative_prompt: str,
             seed: int, steps: int, true_cfg_scale: float, width: int, height: int, loras: list = (),
             should_stop=None):
    """One edit on the loaded pipeline: a fresh generator seeded per edit, PIL image out. `should_stop` is asked
    between denoising steps; when it says yes, the call ends early and JobCancelled is raised."""
    import torch

    # A multi-GPU team: rank 0 hands the same call to the other ranks (parallel.follow), then all make it.
    parallel.lead("edit", dict(profile=profile.name, images=images, prompt=prompt, negative_prompt=negative_prompt,
                               seed=seed, steps=steps, true_cfg_scale=true_cfg_scale, width=width, height=height,
                               loras=list(loras)))
    parallel.starting_call(cfg=true_cfg_scale > 1, negative_prompt=negative_prompt)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    call = _call_with_vae_area(type(loaded.pipe), profile.vae_image_area)
    with loaded.call_lock, torch.inference_mode():
        lora.use_loras(loaded, list(loras))
        loaded.calls += 1
        result = call(
            loaded.pipe,
            image=images,
            prompt=prompt,
            # CFG needs a negative prompt; diffusers treats " " as one, "" as none.
            negative_prompt=negative_prompt or " ",
            true_cfg_scale=true_cfg_scale,
            num_inference_steps=steps,
            width=width,
            height=height,
            generator=generator,
            callback_on_step_end=stop_between_steps(should_stop),
        )
    if should_stop is not None and loaded.pipe.interrupt:
        raise JobCancelled("the flow gave up on this edit; it was stopped between denoising steps")
    return result.images[0]


def warm_up(loaded: LoadedPipeline, profile: ModelProfile) -> float:
    """Run small edits so compilation and kernel selection happen before the first request."""
    import time

    from PIL import Image

    from recast.tasks.frames import output_size

    if not profile.warmup:
        return 0.0
    started = time.perf_counter()
    # One shape: the blocks compile with dynamic shapes from their first trace, so other sizes and prompt lengths
    # compile nothing (tested); a second shape cost a restart ~1 s on an H200 and warmed nothing more.
    width, height = output_size(None, None, 1.0, profile.output_area)
    run_edit(loaded, profile, [Image.new("RGB", (width, height), (128, 128, 128))], prompt="warm-up",
             negative_prompt=" ", seed=0, steps=2, true_cfg_scale=profile.true_cfg_scale or 4.0, width=width,
             height=height)
    loaded.phases["warm_up_calls"] = [round(time.perf_counter() - started, 2)]  # (cold-start rows show it)
    return time.perf_counter() - started
