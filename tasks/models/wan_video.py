"""The video recipe: Wan image-to-video through diffusers' WanImageToVideoPipeline (Wan 2.2 A14B: two experts).

    from_source  from_pretrained (the tiny folder or the real model), then `transform_weights`: the Lightning
              LoRA pair fused into the bf16 experts, FP8 linears in both experts' blocks and the UMT5 encoder
    place     the scheduler (Lightning: Euler, shift 5, its exact four timesteps), UMT5's 2 GB token table in
              host RAM, placement (resident, or every block streamed from pinned RAM), the VAE's convolutions
              channels-last on a card, the blocks compiled (ahead of time, or regional torch.compile)
    warm_up   a short clip at the profile's size, so compilation happens before the first request
    run_video one clip: uint8 frames (num_frames, height, width, 3)

`benchmarks/gpu_video.py` calls `prepare`, `warm_up` and `run_video` on full-size random weights, so what is
measured is what serves.
"""

from __future__ import annotations

import contextlib
import functools
import logging

from recast.tasks.lifecycle import JobCancelled, stop_between_steps
from recast.tasks.models import fused_norms, kernels, lora, parallel, precision
from recast.tasks.models.loading import LoadedPipeline, torch_dtype
from recast.tasks.schemas.settings import VideoProfile

log = logging.getLogger("recast.models")

EXPERTS = ("transformer", "transformer_2")


# Bump when what transform_weights writes changes (prepared weights made by older code are then made again).
PREPARED_VERSION = 1


def from_source(profile: VideoProfile, source: str):
    import diffusers
    import transformers
    from diffusers import WanImageToVideoPipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipe = WanImageToVideoPipeline.from_pretrained(source, revision=profile.revision, dtype=torch_dtype(profile.dtype))
    transform_weights(pipe, profile)
    return pipe


def experts(pipe) -> list:
    return [getattr(pipe, name) for name in EXPERTS if getattr(pipe, name, None) is not None]


def prepare(pipe, profile: VideoProfile) -> dict:
    """Apply a profile's whole recipe to a loaded pipeline (the benchmarks' random weights); returns the decisions."""
    return {**transform_weights(pipe, profile), **place(pipe, profile)}


def transform_weights(pipe, profile: VideoProfile) -> dict:
    """What the recipe does to the weights (what prepared weights keep): 1. the Lightning LoRA pair fused into the
    bf16 experts (before any quantization: FP8 on top of an unfused LoRA shows artifacts); 2. FP8 linears in both
    experts' blocks and the UMT5 encoder, block by block on the GPU."""
    import torch

    decisions: dict = {}
    for spec, component in ((profile.lightning, "transformer"), (profile.lightning_2, "transformer_2")):
        if spec is not None:
            decisions[f"lightning_scale_{component}"] = lora.fuse_lora(
                pipe, spec, adapter_name=f"lightning-{component}", component=component)
    if profile.quantize != "none":
        device = torch.device(profile.device)
        decisions["quantized_linears"] = sum(precision.quantize_blocks(blocks, profile.quantize, device, skip=skip)
                                             for blocks, skip in _quantized_blocks(pipe, profile))
    return decisions


def give_structure(pipe, profile: VideoProfile) -> None:
    """transform_weights' module structure on an empty pipeline, for prepared weights to fill."""
    if profile.quantize != "none":
        for blocks, skip in _quantized_blocks(pipe, profile):
            precision.quantize_blocks(blocks, profile.quantize, device=None, skip=skip)


def _quantized_blocks(pipe, profile: VideoProfile) -> list[tuple[list, tuple[str, ...]]]:
    groups = [([block for expert in experts(pipe) for block in expert.blocks], ())]
    if profile.quantize_text_encoder:
        # T5's feed-forward output (`wo`) casts its input to the layer's weight dtype and is kept in full
        # precision by transformers for stability: it stays as it is.
        groups.append((list(pipe.text_encoder.encoder.block), ("wo",)))
    return groups


def load_device(profile: VideoProfile, component: str) -> str:
    """Where a component's prepared tensors are read to: its place when serving (place() puts the rest)."""
    if profile.offload == "stream" and component not in ("vae", "image_encoder"):
        return "cpu"  # kept in pinned RAM, streamed block by block
    return profile.device


def place(pipe, profile: VideoProfile) -> dict:
    """Everything of the recipe that is not weights: 1. the scheduler (Lightning: Euler, shift 5, its exact four
    timesteps); 2. UMT5's 2 GB token table kept in host RAM; 3. placement: everything resident, or (`offload:
    stream`) every block kept in pinned RAM and streamed to the card a block at a time on a side stream; 4. a
    team's split; 5. the attention backend, and both experts' 80 identical blocks compiled once (ahead of time,
    or regional torch.compile)."""
    import torch

    from recast.tasks.models.prepared import compiled_blocks_path

    pipe.set_progress_bar_config(disable=True)
    device = torch.device(profile.device)
    # 1. Scheduler
    if profile.scheduler is not None:
        pipe.scheduler = make_scheduler(profile.scheduler, pipe.scheduler)
    # 2. Host-RAM token table
    text_encoder = pipe.text_encoder
    if device.type == "cuda":
        # UMT5's 256k x 4096 token table (2 GiB in bf16) serves one lookup of <= 512 rows per clip.
        table = precision.HostEmbedding(text_encoder.encoder.embed_tokens)
        text_encoder.shared = text_encoder.encoder.embed_tokens = table
    # 3. Placement
    if profile.offload == "stream" and device.type == "cuda":
        precision.stream_blocks([*experts(pipe), text_encoder], device)
        for name in ("vae", "image_encoder"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(device)
    else:
        pipe.to(device)
    # 4. A multi-GPU team's split of the transformer work; 5. kernels
    parallel.apply(pipe, experts(pipe), "video")
    decisions: dict = {}
    if device.type == "cuda":
        # cuDNN runs the VAE's 3-D convolutions faster in NDHWC on Hopper: a 480p clip's encode and decode took
        # 1.15 + 1.82 s -> 1.01 + 1.64 s on an H200 (benchmarks/wan_vae.py, frames within 1.8% relative L2 of the
        # default layout's in bf16); cuDNN's autotuning (cudnn.benchmark) changed nothing there.
        converted = kernels.set_convolution_layout(pipe.vae, torch.channels_last_3d)
        decisions["vae_layout"] = f"channels_last_3d ({converted} convolutions)"
    if profile.vae_fused_norms:
        decisions["vae_norms"] = _fuse_vae_norms(pipe.vae, device)
    if profile.attention_backend:
        chosen = profile.attention_backend
        for expert in experts(pipe):  # the first expert settles it (a fallback is said once), the second follows
            chosen = kernels.use_attention_backend(expert, chosen, device)
        decisions["attention_backend"] = chosen
    if profile.compile:  # both experts' blocks are alike: one compiled function serves the 80
        # Dynamic shapes: one trace serves every frame count and size, so the warm-up can be a short clip and a
        # request for another length compiles nothing.
        decisions["compiled_blocks"] = kernels.compile_blocks(
            *experts(pipe), fullgraph=parallel.fullgraph(), dynamic=profile.compile_dynamic or None,
            ahead_of_time=profile.compile_ahead_of_time, artifact=compiled_blocks_path("video", profile),
            autotune=profile.compile_autotune)
        if profile.compile_autotune:
            decisions["compile_autotune"] = True
    return decisions


def make_scheduler(spec: dict, current):
    """The scheduler a profile names: {type: euler|unipc, shift, sigmas}; explicit sigmas fix the schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    kind, shift, sigmas = spec.get("type", "unipc"), spec.get("shift"), spec.get("sigmas")
    if kind == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift or 1.0)
    else:
        config = dict(current.config, **({"flow_shift": shift} if shift is not None else {}))
        scheduler = UniPCMultistepScheduler.from_config(config)
    if sigmas:
        use_fixed_sigmas(scheduler, sigmas)
    return scheduler


def use_fixed_sigmas(scheduler, sigmas: list[float]) -> None:
    """Make this scheduler always run `sigmas` (before its shift): the pipeline asks it for N steps with no way
    to pass sigmas, and a distilled recipe is only right on the exact timesteps it was trained on."""
    original = scheduler.set_timesteps

    @functools.wraps(original)
    def set_timesteps(num_inference_steps=None, device=None, **kwargs):
        if num_inference_steps not in (None, len(sigmas)):
            raise ValueError(f"this profile runs exactly {len(sigmas)} steps (its distilled schedule), "
                             f"not {num_inference_steps}")
        return original(device=device, sigmas=list(sigmas))

    scheduler.set_timesteps = set_timesteps


def run_video(loaded: LoadedPipeline, image, *, prompt: str, negative_prompt: str, seed: int, steps: int,
              guidance_scale: float, num_frames: int, width: int, height: int, max_sequence_length: int,
              should_stop=None, on_frames=None):
    """One clip: uint8 frames of shape (num_frames, height, width, 3). `should_stop` as in qwen_edit.run_edit.
    `on_frames(fetch)`: called as the VAE decodes each chunk of frames, in order; fetch() gives that chunk as uint8
    (n, height, width, 3), exactly as in the clip returned (storage.Mp4Stream encodes while the rest decodes);
    on_frames(None): the rest of this decode cannot be streamed."""
    import numpy as np
    import torch

    parallel.lead("video", dict(profile=loaded.key.profile, image=image, prompt=prompt, negative_prompt=negative_prompt,
                                seed=seed, steps=steps, guidance_scale=guidance_scale, num_frames=num_frames,
                                width=width, height=height, max_sequence_length=max_sequence_length))
    parallel.starting_call(cfg=guidance_scale > 1)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    streaming = _streaming_decode(loaded.pipe.vae, on_frames, height, width) if on_frames else contextlib.nullcontext()
    with loaded.call_lock, torch.inference_mode(), streaming:
        loaded.calls += 1
        frames = loaded.pipe(image=image, prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                             num_frames=num_frames, num_inference_steps=steps, guidance_scale=guidance_scale,
                             max_sequence_length=max_sequence_length, generator=generator, output_type="pt",
                             callback_on_step_end=stop_between_steps(should_stop)).frames[0]
        if should_stop is not None and loaded.pipe.interrupt:
            raise JobCancelled("the flow gave up on this clip; it was stopped between denoising steps")
        return np.ascontiguousarray(_uint8_frames(frames).cpu().numpy())


def _uint8_frames(frames):
    """(T, 3, H, W) in [0, 1] -> (T, H, W, 3) uint8, where the frames are. On the card: 81 x 480 x 832 x 3 in
    float32 is 390 MB to copy and scale on the host, the uint8 frames a quarter of that. float32 first, as
    diffusers' "np" output did, so the values are the same."""
    import torch

    return (frames.float().clamp(0.0, 1.0) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def _fuse_vae_norms(vae, device) -> str:
    """`vae_fused_norms`: the VAE's norms as one kernel each where they can be (a CUDA card with Triton), said
    otherwise; what was done, for the load's decisions."""
    why_not = None if device.type == "cuda" else f"needs a CUDA device, not {device.type}"
    if why_not is None:
        try:
            import triton  # noqa: F401 - the kernel's compiler (torch's CUDA wheels depend on it)
        except ImportError as exc:
            why_not = f"Triton is not importable ({exc})"
    if why_not:
        log.warning("vae_fused_norms: %s; the VAE's norms run as diffusers' own", why_not)
        return f"diffusers' own ({why_not})"
    fused = fused_norms.fuse_wan_vae(vae)
    return f"fused: {fused['norms']} norms, {fused['with_silu']} with their SiLU"


@contextlib.contextmanager
def _streaming_decode(vae, on_frames, height: int, width: int):
    """Hand each chunk the Wan VAE's decoder makes (diffusers' _decode calls it once per latent frame: 1 frame, then
    4 at a time) to on_frames, converted as the pipeline converts the whole clip: clamp to [-1, 1] (_decode), to
    [0, 1] (the video processor), then _uint8_frames. The copy to the host is queued on the card's stream and waited
    for by whoever fetches, so the decode never waits for the encoder. A chunk that is not whole frames (a team's
    band of the width, a tiled decode) ends the streaming: the consumer then takes the clip as returned."""
    import torch

    whole = [True]

    def hook(module, args, output):
        if not whole[0]:
            return
        if output.shape[0] != 1 or tuple(output.shape[-2:]) != (height, width):
            whole[0] = False
            on_frames(None)
            return
        chunk = _uint8_frames((output.clamp(-1.0, 1.0)[0].permute(1, 0, 2, 3) * 0.5 + 0.5).clamp(0, 1))
        if chunk.is_cuda:
            host = torch.empty(chunk.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(chunk, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            on_frames(lambda: (copied.synchronize(), host.numpy())[1])
        else:
            on_frames(lambda: chunk.numpy())

    handle = vae.decoder.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# The warm-up clip's length: the first frame and one group of four, which the Wan VAE encodes and decodes as the
# whole clip's chunks (1 frame, then 4 at a time): every convolution shape of an 81-frame clip, at 2 of its 21
# latent frames. The blocks take dynamic shapes, so the longer clip compiles nothing more.
WARM_UP_FRAMES = 5


def warm_up(loaded: LoadedPipeline, profile: VideoProfile) -> float:
    """A short clip at the profile's size, every step (both experts run), before the first request: it compiles the
    blocks (or loads their kept code) and selects the VAE's kernels. An 81-frame warm-up was 13.1 s of a
    restart's 23.6 s on an H200 with the blocks' code loaded, nearly all of it the clip itself."""
    import time

    from PIL import Image

    from recast.tasks.frames import output_size

    if not profile.warmup:
        return 0.0
    started = time.perf_counter()
    width, height = output_size(None, None, 832 / 480, profile.area)
    steps = len((profile.scheduler or {}).get("sigmas") or []) or 2
    run_video(loaded, Image.new("RGB", (width, height), (128, 128, 128)), prompt="warm-up", negative_prompt="",
              seed=0, steps=steps, guidance_scale=profile.guidance_scale or 1.0,
              num_frames=WARM_UP_FRAMES if profile.compile_dynamic or not profile.compile else 81,
              width=width, height=height, max_sequence_length=profile.max_sequence_length)
    loaded.phases["warm_up_calls"] = [round(time.perf_counter() - started, 2)]  # (cold-start rows show it)
    return time.perf_counter() - started
