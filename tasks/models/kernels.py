"""Kernel choices shared by the recipes: the attention backend, and a RoPE that torch.compile can fuse.

Both act on one model instance (its attention processors, its position embedder), never on a library module.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import types
import uuid
from pathlib import Path

log = logging.getLogger("recast.models")

# What fastest_attention_backend measured on this card (reported by the benchmarks).
ATTENTION_TIMINGS_MS: dict[str, float] = {}


# Backends that run on the CPU too; any other (SageAttention, FlashAttention, cuDNN, ...) needs a CUDA card.
CPU_BACKENDS = ("native", "_native_math")
# recast's own backend: SageAttention 2 (INT8 Q.K; FP8 P.V on Hopper) behind one opaque torch op. diffusers' own
# `sage` backends call the package's C++ quantization functions directly, which torch.compile cannot trace: a
# compiled block would break its graph at every attention (an error under fullgraph). The other `_sage_*` names
# still reach diffusers' backends (eager).
SAGE = "sage"
SAGE_INSTALL = "build SageAttention 2 from source: pip install --no-build-isolation 'recast[sage]' (pyproject.toml)"
# recast's FP8 attention: FlashAttention-3's FP8 forward (Hopper), q, k and v cast to e4m3 with one scale per head in
# the traced code (so torch.compile fuses the cast into the norm and RoPE before it) and the kernel behind one opaque
# op. No wheel on PyPI: its `hopper/` package is built from source (benchmarks/device/fa3.sh builds only what recast
# uses: the forward, head dim 128, bf16 and e4m3).
FA3_FP8 = "fa3-fp8"
FA3_INSTALL = ("build FlashAttention-3's hopper/ package: pip install --no-build-isolation 'flash_attn_3 @ "
               "git+https://github.com/Dao-AILab/flash-attention@0251105a#subdirectory=hopper' (needs nvcc; "
               "benchmarks/device/fa3.sh builds the head-dim-128 forward alone)")
E4M3_MAX = 448.0
# diffusers' own FlashAttention-3 backends (bf16), from the same hopper/ package.
FA3_BF16 = ("_flash_3", "_flash_varlen_3")


def use_attention_backend(transformer, backend: str, device) -> str:
    """Set the transformer's attention backend and return the one set: a diffusers name, recast's `sage` or
    `fa3-fp8`, "auto" (times the SDPA kernels on this card first), or a preference list ("fa3-fp8,sage": the first
    this machine can run). Where none can run (a package missing, no CUDA card, another architecture) it falls back
    to bf16 SDPA ("native") with a one-line warning: a profile that names an optional kernel still runs everywhere."""
    choices = [name.strip() for name in backend.split(",") if name.strip()] or ["native"]
    skipped = []
    for choice in choices:
        choice, reason = _try_attention_backend(transformer, choice, device)
        if reason is None:
            break
        skipped.append(f"{choice} is not usable here ({reason})")
    else:
        choice = "native"
        transformer.set_attention_backend(choice)
    if skipped:
        log.warning("attention backend %s: using %s", "; ".join(skipped),
                    "native bf16 SDPA" if choice == "native" else choice)
    log.info("attention backend: %s", choice)
    return choice


def _try_attention_backend(transformer, backend: str, device) -> tuple[str, str | None]:
    """Set one backend on the transformer: its name ("auto" resolved) and None when it is set, else why this machine
    cannot run it."""
    import torch

    if backend == "auto":
        backend = fastest_attention_backend(transformer, device)
    if torch.device(device).type != "cuda" and backend not in CPU_BACKENDS:
        return backend, "it needs a CUDA card"
    if backend == SAGE:
        reason = _sage_missing()
        if reason is None:
            transformer.set_attention_backend("native")  # what anything sage cannot take (masks) runs on
            use_sage(transformer)
        return backend, reason
    if backend == FA3_FP8:
        reason = _fa3_missing(device)
        if reason is None:
            transformer.set_attention_backend("native")  # what the FP8 kernel cannot take runs on
            use_fa3_fp8(transformer)
        return backend, reason
    if backend in FA3_BF16:
        # diffusers checks only that the package imports; the hopper/ build then fails at the first call on any
        # other card, so the card is checked here, before a worker warms up on it.
        reason = _fa3_missing(device)
        if reason is not None:
            return backend, reason
    if _splits_sequence(transformer) and not _supports_sequence_split(backend):
        # diffusers refuses such a backend with an error once a team's Ulysses split is on (sage and fa3-fp8 above
        # send those calls to native SDPA themselves)
        return backend, "it cannot split attention across a team's GPUs (Ulysses context parallelism)"
    try:
        transformer.set_attention_backend(backend)
    except RuntimeError as exc:  # diffusers: the backend's package is missing or too old
        return backend, " ".join(str(exc).split())  # it names the package and version to install
    return backend, None


def _splits_sequence(transformer) -> bool:
    """Whether a multi-GPU team's Ulysses split (diffusers' context parallelism) is on for this transformer."""
    return any(getattr(getattr(module, "processor", None), "_parallel_config", None) is not None
               for module in transformer.modules())


def _supports_sequence_split(backend: str) -> bool:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    try:
        return _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(backend))
    except ValueError:  # not a diffusers name: set_attention_backend says so, with the names it takes
        return True


def _sage_missing() -> str | None:
    try:
        import sageattention
    except ImportError:
        return f"the sageattention package is not installed; {SAGE_INSTALL}"
    if not hasattr(sageattention, "sageattn_qk_int8_pv_fp8_cuda"):  # 1.x: Triton only, no FP8 kernels
        return f"sageattention {getattr(sageattention, '__version__', '1.x')} is too old; {SAGE_INSTALL}"
    return None


def _fa3_missing(device) -> str | None:
    import torch

    try:
        import flash_attn_interface
    except ImportError:
        return f"the flash_attn_3 package is not installed; {FA3_INSTALL}"
    if not hasattr(flash_attn_interface, "flash_attn_func"):
        return f"flash_attn_interface has no flash_attn_func (not FlashAttention-3's hopper/ package); {FA3_INSTALL}"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"FlashAttention-3 runs on Hopper (sm90), this card is sm{major}{minor}"
    return None


_SAGE_OP = None


def sage_attention_op():
    """`recast::sageattn(query, key, value, scale)`: sageattention.sageattn on (batch, tokens, heads, dim) tensors as
    one custom op (registered once), so torch.compile keeps it whole inside a compiled block."""
    global _SAGE_OP
    if _SAGE_OP is None:
        import torch
        from sageattention import sageattn

        # The schema is written out: this module's annotations are strings, which infer_schema cannot resolve here.
        @torch.library.custom_op("recast::sageattn", mutates_args=(), device_types="cuda",
                                 schema="(Tensor query, Tensor key, Tensor value, float? scale) -> Tensor")
        def op(query, key, value, scale):
            # sageattn picks its kernel by card: INT8 Q.K with FP8 P.V (Hopper, Ada) or FP16 P.V (Ampere).
            return sageattn(query, key, value, tensor_layout="NHD", is_causal=False, sm_scale=scale).contiguous()

        @op.register_fake
        def _(query, key, value, scale):
            return query.new_empty(*query.shape[:-1], value.shape[-1])

        _SAGE_OP = op
    return _SAGE_OP


_FA3_FP8_OP = None


def fa3_fp8_op():
    """`recast::fa3_fp8(query, key, value, query_descale, key_descale, value_descale, scale)`: FlashAttention-3's FP8
    forward on e4m3 (batch, tokens, heads, dim) tensors and their (batch, heads) float32 descale factors, bf16 out, as
    one custom op (registered once), so torch.compile keeps it whole inside a compiled block."""
    global _FA3_FP8_OP
    if _FA3_FP8_OP is None:
        import torch
        from flash_attn_interface import flash_attn_func

        @torch.library.custom_op("recast::fa3_fp8", mutates_args=(), device_types="cuda",
                                 schema="(Tensor query, Tensor key, Tensor value, Tensor query_descale, "
                                        "Tensor key_descale, Tensor value_descale, float? scale) -> Tensor")
        def op(query, key, value, query_descale, key_descale, value_descale, scale):
            out = flash_attn_func(query, key, value, softmax_scale=scale, q_descale=query_descale,
                                  k_descale=key_descale, v_descale=value_descale)
            return (out[0] if isinstance(out, tuple) else out).contiguous()

        @op.register_fake
        def _(query, key, value, query_descale, key_descale, value_descale, scale):
            return query.new_empty(*query.shape[:-1], value.shape[-1], dtype=torch.bfloat16)

        _FA3_FP8_OP = op
    return _FA3_FP8_OP


def to_e4m3(t):
    """(batch, tokens, heads, dim) -> e4m3 scaled so that each (batch, head)'s largest magnitude is e4m3's largest
    (448), and the (batch, heads) float32 factors that undo it (FlashAttention-3's descale). Per head, not per tensor:
    heads differ by orders of magnitude, and one scale would leave the small ones a few of e4m3's 3 mantissa bits."""
    import torch

    amax = t.abs().amax(dim=(1, 3)).float().clamp_min(1e-12)
    scale = E4M3_MAX / amax
    return (t.float() * scale[:, None, :, None]).to(torch.float8_e4m3fn), (1.0 / scale).contiguous()


def fa3_fp8_attention(query, key, value, scale=None):
    """Attention of (batch, tokens, heads, 128) bf16/fp16 tensors through FlashAttention-3's FP8 forward, in the
    query's dtype. The casts are plain torch here, outside the op, so a compiled block fuses them with what made
    q, k and v.

    K and V are smoothed first, as SageAttention does: their mean over the tokens (per head and channel) taken out,
    which changes nothing exactly. K's mean moves all of one query's scores by the same amount, which the softmax
    cancels; V's comes back as it is, added to the output, as each query's weights sum to 1. A mean much larger
    than the differences between tokens would otherwise take e4m3's 3 mantissa bits, and the differences are what
    the attention computes."""
    key, value = key.float(), value.float()  # once each: the means and the smoothing both read them
    value_mean = value.mean(dim=1, keepdim=True)
    (q8, q_descale), (k8, k_descale), (v8, v_descale) = (to_e4m3(query), to_e4m3(key - key.mean(dim=1, keepdim=True)),
                                                         to_e4m3(value - value_mean))
    out = fa3_fp8_op()(q8, k8, v8, q_descale, k_descale, v_descale, scale)
    return (out.float() + value_mean).to(query.dtype)


def _plain_attention(query, attn_mask, dropout_p, is_causal, enable_gqa, parallel_config, head_dims) -> bool:
    """An attention the quantized kernels take: no mask, dropout, causality or grouped heads, one card, bf16/fp16."""
    import torch

    return (attn_mask is None and not dropout_p and not is_causal and not enable_gqa and parallel_config is None
            and query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] in head_dims)


def sage_dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                  attention_kwargs=None, *, backend=None, parallel_config=None):
    """diffusers' dispatch_attention_fn, with the calls SageAttention can take sent to recast::sageattn: no mask,
    no dropout or causality, one card, bf16/fp16, head dim 64 or 128. Anything else runs as diffusers would."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    if _plain_attention(query, attn_mask, dropout_p, is_causal, enable_gqa, parallel_config, (64, 128)):
        return sage_attention_op()(query, key, value, scale)
    return dispatch_attention_fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                 attention_kwargs, backend=backend, parallel_config=parallel_config)


def fa3_fp8_dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
    """diffusers' dispatch_attention_fn, with the calls FlashAttention-3's FP8 forward can take sent to it: as
    `sage_dispatch`, head dim 128 only (the one recast builds). Anything else runs as diffusers would."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    if _plain_attention(query, attn_mask, dropout_p, is_causal, enable_gqa, parallel_config, (128,)):
        return fa3_fp8_attention(query, key, value, scale)
    return dispatch_attention_fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                 attention_kwargs, backend=backend, parallel_config=parallel_config)


def use_sage(transformer) -> int:
    """Route this transformer's attention processors through `sage_dispatch`; returns how many were changed."""
    return _route_attention(transformer, "Sage")


def use_fa3_fp8(transformer) -> int:
    """Route this transformer's attention processors through `fa3_fp8_dispatch`; returns how many were changed."""
    return _route_attention(transformer, "Fa3Fp8")


def _route_attention(transformer, prefix: str) -> int:
    names = _rebinding(prefix)  # its op registered now: torch.compile cannot trace a registration inside a block
    changed = 0
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        call = getattr(type(processor), "__call__", None)
        if processor is not None and "dispatch_attention_fn" in getattr(call, "__globals__", {}):
            processor.__class__ = _rebound(type(processor), prefix, **names)
            changed += 1
    return changed


_REBOUND: dict = {}


def _rebound(base, prefix: str, **names):
    """A subclass of an attention processor class whose __call__ runs the same code with some of its module's
    names replaced (one class per base and replacement, so every block shares one code path for torch.compile)."""
    key = (base, prefix, tuple(sorted((k, id(v)) for k, v in names.items())))
    if key not in _REBOUND:
        call = base.__call__
        scoped = types.FunctionType(call.__code__, {**call.__globals__, **names}, call.__name__, call.__defaults__,
                                    call.__closure__)
        scoped.__kwdefaults__ = call.__kwdefaults__
        name = f"{prefix}{base.__name__}"
        _REBOUND[key] = type(name, (base,), {"__call__": scoped, "__module__": __name__, "__qualname__": name})
        # Found by name in this module (pickle looks it up there): the compiled blocks' saved guards refer to it.
        globals()[name] = _REBOUND[key]
    return _REBOUND[key]


REBOUND_PREFIXES = ("Sage", "Fa3Fp8", "RealRotary")  # the processor classes recast rebinds, by their names' prefix


def _rebinding(prefix: str) -> dict:
    """The names the attention processors' code runs with in place of diffusers' own, for each rebound class: the
    placement's and __getattr__'s one source."""
    if prefix == "Sage":
        sage_attention_op()  # registered before any code that calls it is traced or loaded
        return {"dispatch_attention_fn": sage_dispatch}
    if prefix == "Fa3Fp8":
        fa3_fp8_op()
        return {"dispatch_attention_fn": fa3_fp8_dispatch}
    if prefix == "RealRotary":
        return {"apply_rotary_emb_qwen": rotary_real}
    raise ValueError(f"no rebound processor class has the prefix {prefix!r}")


def __getattr__(name: str):
    """A rebound attention-processor class by its name (e.g. SageRealRotaryQwenDoubleStreamAttnProcessor2_0), made
    as the placement makes it: compiled blocks read while the weights load (prepared.CompiledEarly) are unpickled
    before the placement has made their processors' classes, and pickle finds classes by name in this module."""
    for prefix in REBOUND_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            rest = name[len(prefix):]
            base = globals().get(rest) or _diffusers_processor(rest)
            if base is None:
                try:
                    base = __getattr__(rest)
                except AttributeError:
                    break
            return _rebound(base, prefix, **_rebinding(prefix))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _diffusers_processor(name: str):
    """An attention processor class of the transformers recast compiles, by name; None if neither has it."""
    import importlib

    for module in ("transformer_qwenimage", "transformer_wan"):
        found = getattr(importlib.import_module(f"diffusers.models.transformers.{module}"), name, None)
        if isinstance(found, type):
            return found
    return None


def fastest_attention_backend(transformer, device, seq_len: int = 8448) -> str:
    """Time torch's SDPA kernels at this model's head shape on this card; the diffusers name of the fastest."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        return "native"
    heads, dim = transformer.config.num_attention_heads, transformer.config.attention_head_dim
    q, k, v = (torch.randn(1, heads, seq_len, dim, device=device, dtype=torch.bfloat16) for _ in range(3))
    # "native" is torch's own pick among them: at the edit's 8.4k tokens on an H200 it was 12% faster than cuDNN
    # forced (benchmarks/attention.py), so it is timed too.
    candidates = {"native": None, "_native_cudnn": SDPBackend.CUDNN_ATTENTION,
                  "_native_flash": SDPBackend.FLASH_ATTENTION, "_native_efficient": SDPBackend.EFFICIENT_ATTENTION}
    timings = {}
    for name, kernel in candidates.items():
        try:
            with contextlib.nullcontext() if kernel is None else sdpa_kernel(kernel):
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
    fastest = min(timings, key=timings.get) if timings else "native"
    return _agreed(fastest)


def _agreed(choice: str) -> str:
    """Under torch.distributed every rank must run the same kernel: rank 0's timing decides for all."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return choice
    decision = [choice]
    dist.broadcast_object_list(decision, src=0)
    return decision[0]


def set_convolution_layout(module, memory_format) -> int:
    """Keep a module's 3-D convolution weights in `memory_format` (torch.channels_last_3d: NDHWC, in which cuDNN then
    runs those convolutions and hands their outputs on). Returns how many weights were converted
    (module.to(memory_format=...) refuses a module whose other weights are not 5-D)."""
    converted = 0
    for param in module.parameters():
        if param.dim() == 5 and not param.is_contiguous(memory_format=memory_format):
            param.data = param.data.contiguous(memory_format=memory_format)
            converted += 1
    return converted


def rotary_real(x, freqs_cis, use_real=True, use_real_unbind_dim=-1):
    """Qwen-Image's complex-number RoPE in real arithmetic (same values), which Inductor can generate code for.

    Accepts diffusers' complex frequencies, or the same as real (..., 2) pairs (see use_real_rotary).
    """
    import torch
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    if use_real:
        return apply_rotary_emb_qwen(x, freqs_cis, use_real, use_real_unbind_dim)
    cos_sin = (torch.view_as_real(freqs_cis) if torch.is_complex(freqs_cis) else freqs_cis).unsqueeze(1)
    cos, sin = cos_sin[..., 0], cos_sin[..., 1]  # [S, 1, D/2]
    real, imag = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(3).type_as(x)


def _real_rotary_processor_class():
    """diffusers' Qwen attention processor, its code run with `rotary_real` in place of the complex RoPE."""
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0 as base

    return _rebound(base, "RealRotary", **_rebinding("RealRotary"))


def use_real_rotary(transformer) -> None:
    """Keep complex numbers out of this transformer's compiled blocks (Inductor cannot generate code for them):
    its position embedder hands out real (cos, sin) pairs, its attention processors rotate with them."""
    import torch

    processor = _real_rotary_processor_class()
    transformer.set_attn_processor(processor())

    def as_real_pairs(module, args, output):
        return tuple(torch.view_as_real(f) if torch.is_complex(f) else f for f in output)

    transformer.pos_embed.register_forward_hook(as_real_pairs)


# Qwen2.5-VL's vision tower (the edit's text encoder reads the photo through it) attends within windows of 8x8
# patches in 28 of its 32 blocks. With an SDPA or eager implementation transformers computes each window by itself:
# the block asks the card for the windows' lengths (a device-to-host sync), splits q, k and v, calls SDPA once per
# window and concatenates, ~100 kernel launches a block for 16 windows of a 384-px photo. Such an encoder runs eagerly
# and is bound by its launches (~0.14 s for ~4 TFLOP on an H200), so recast computes the windows in one SDPA call
# with a block-diagonal mask instead: the same attention, one launch. An implementation whose name has "flash" in it is
# the one transformers hands the windows' bounds (`cu_seq_lens_q`) instead of calling it per window.
VISION_WINDOWS = "recast_flash_style_vision_windows"


def vision_windows_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                             cu_seq_lens_q=None, is_causal=False, **kwargs):
    """Attention within the windows `cu_seq_lens_q` bounds (cumulative token counts) of (1, heads, tokens, dim) q, k
    and v, as one SDPA call; (1, tokens, heads, dim) out, as transformers' flash implementations return it."""
    import torch

    if cu_seq_lens_q is None or attention_mask is not None or is_causal or dropout:
        # a transformers that calls it otherwise than recast was written for: never attend across the windows
        raise RuntimeError(f"{VISION_WINDOWS} takes the vision tower's windows (cu_seq_lens_q) and nothing else")
    mask = None
    if cu_seq_lens_q.numel() > 2:  # more than one window (two bounds: one window, every token with every other)
        positions = torch.arange(query.shape[2], device=query.device, dtype=cu_seq_lens_q.dtype)
        window = torch.searchsorted(cu_seq_lens_q[1:], positions, right=True)
        mask = window[:, None] == window[None, :]
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2), None


def use_one_call_vision_windows(text_encoder) -> bool:
    """Run a Qwen2.5-VL text encoder's vision windows through `vision_windows_attention`; False when it has no
    vision tower of that kind (then nothing changes)."""
    from transformers import AttentionInterface

    visual = getattr(getattr(text_encoder, "model", None), "visual", None)
    if visual is None or not hasattr(visual, "fullatt_block_indexes"):
        return False
    AttentionInterface.register(VISION_WINDOWS, vision_windows_attention)
    visual.config._attn_implementation = VISION_WINDOWS
    return True


# inductor's settings for `compile_autotune` (torch's "max-autotune-no-cudagraphs" mode, as options: a mode cannot
# be given beside the options the compiled blocks need). CUDA graphs stay off: a pass is long enough that launching
# its kernels costs little, and graphs would pin the memory of every shape served.
AUTOTUNE = {"max_autotune": True, "coordinate_descent_tuning": True}


def compile_blocks(*models, fullgraph: bool, dynamic: bool | None = None, ahead_of_time: bool = False,
                   artifact: Path | None = None, autotune: bool = False) -> str:
    """The models' identical blocks compile once and share the compiled code. Returns how: "ahead of time (loaded)"
    (or "(loaded while the weights were read)"), "ahead of time (compiled at the first call)" or "regional"
    (torch.compile's regional compilation).

    ahead_of_time: one function, compiled from the first block call with the block as an argument
    (`BlocksAheadOfTime`), serves every block; kept in `artifact` once made, it is loaded by the next process
    without dynamo tracing anything (a restart's trace of the block was ~6 s of its warm-up on an H200). Blocks that
    cannot share one compiled function, a GPU team or a graph that may break compile regionally, said in the log.

    Python floats reaching a block are specialized (constants guarded by value) instead of traced as symbols. With
    symbols, the tensorify pass gives up on them after the whole block was traced and dynamo restarts its analysis
    with them specialized anyway: every cold start traced each block twice, and the restarted graph missed
    AOTAutograd's cache (measured on the tiny edit model, CPU: the first warm-up call 8.5 s -> 3.7-4.5 s with
    every graph a cache hit; requests with other steps, CFG, sizes or prompts compiled nothing either way).

    autotune: inductor's max-autotune (`AUTOTUNE`), wherever the blocks compile."""
    import torch

    torch._dynamo.config.specialize_float = True  # process-wide: recast's worker owns the process's compilation
    options = dict(AUTOTUNE) if autotune else {}
    if ahead_of_time:
        for model in models:  # a served model is never trained: its tensors' guards then match whatever loaded it
            model.requires_grad_(False)
        blocks = [block for model in models for block in repeated_blocks(model)]
        reason = "a graph may break (a GPU team's exchange)" if not fullgraph else unshareable(blocks)
        if reason is None:
            return BlocksAheadOfTime(blocks, artifact, dynamic=dynamic, options=options).install()
        log.info("blocks compiled in this process, not ahead of time: %s", reason)
    for model in models:
        model.compile_repeated_blocks(fullgraph=fullgraph, dynamic=dynamic, options=dict(options) or None)
    return "regional"


def repeated_blocks(model) -> list:
    """The model's repeated blocks, as diffusers' compile_repeated_blocks finds them (by class name)."""
    names = set(getattr(model, "_repeated_blocks", ()) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


# Per-request state that a compiled block must not bake in: a LoRA branch's adapters (lora.install_branches).
_PER_CALL_ATTRIBUTES = ("_recast_lora",)
_SIMPLE = (bool, int, float, str, type(None))


def unshareable(blocks) -> str | None:
    """Why these blocks cannot run one function compiled from the first (None: they can). One compiled function
    serves every block only if they differ in their parameters' values alone: same modules, hooks, attention
    processors, settings, and every tensor a registered parameter or buffer (the function takes those as inputs;
    anything else would be the first block's, silently)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return "a GPU team (each rank holds part of the work)"
    if not blocks:
        return "no repeated blocks"
    first = _block_signature(blocks[0])
    if isinstance(first, str):
        return first
    for index, block in enumerate(blocks[1:], start=1):
        if _block_signature(block) != first:
            return f"block {index} differs from block 0 in more than its weights"
    return None


def _block_signature(block):
    import torch

    signature = []
    for name, module in block.named_modules():
        simple = {}
        for attr, value in vars(module).items():
            if attr in _PER_CALL_ATTRIBUTES or attr in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(value, torch.Tensor):
                return f"{name or 'the block'}.{attr} is a tensor the block does not register"
            if isinstance(value, _SIMPLE) or (isinstance(value, tuple) and all(isinstance(v, _SIMPLE) for v in value)):
                simple[attr] = value
            elif isinstance(value, dict) and "hooks" in attr:
                simple[attr] = tuple(getattr(hook, "__qualname__", type(hook).__name__) for hook in value.values())
        processor = getattr(module, "processor", None)
        if processor is not None:  # its settings too: the attention backend diffusers dispatches to is one of them
            simple["processor"] = {attr: value for attr, value in vars(processor).items() if isinstance(value, _SIMPLE)}
        signature.append((name, type(module), type(processor) if processor is not None else None, simple,
                          [(n, tuple(t.shape), t.dtype, t.device) for n, t in module.named_parameters(recurse=False)],
                          [(n, tuple(t.shape), t.dtype, t.device) for n, t in module.named_buffers(recurse=False)]))
    return signature


def _signature_digest(block) -> str:
    """A digest of what `_block_signature` compares, stable across processes: kept with the compiled blocks, so a
    process whose blocks differ (another attention backend, recast's sage installed or gone, other processors)
    compiles its own instead of running code traced from other blocks."""
    import hashlib
    import re

    text = re.sub(r" at 0x[0-9a-f]+", "", repr(_block_signature(block)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _call_shape(value):
    """What of a block call a compiled function is specialized on beyond its tensors' guards: which arguments are
    tensors, None, containers, and the values of plain ones."""
    import torch

    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_call_shape(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _call_shape(v)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))))
    text = repr(value)
    return type(value).__qualname__ if " at 0x" in text else text  # an address differs in the next process


def _one_line(exc: Exception) -> str:
    """An exception as one log line (torch's messages span many)."""
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _block_call(block, *args, **kwargs):
    """What is compiled ahead of time: a call of the block passed in (its parameters are the graph's inputs, read
    from the module given, so one compiled function serves every block of the same structure)."""
    return block._call_impl(*args, **kwargs)


class BlocksAheadOfTime:
    """The repeated blocks run one function compiled ahead of time (torch.compile(...).aot_compile) from the first
    block call, with the block as an argument: each block's own parameters are its inputs. The compiled code
    (guards on tensors, shapes and global state only) is saved to `artifact` when made and loaded from it at the
    next start: dynamo traces nothing.

    Kept correct by what the compiled function cannot see: `unshareable` refuses blocks that differ in more than
    their weights; a call whose non-tensor arguments differ from the compiled call's, whose tensors fail the
    guards, or with a per-request LoRA adapter active runs through torch.compile in the process instead (it traces
    once per new case, as before)."""

    def __init__(self, blocks, artifact: Path | None, *, dynamic: bool | None, options: dict | None = None):
        self.blocks, self.artifact, self.dynamic = blocks, artifact, dynamic
        self.options = dict(options or {})  # inductor's, e.g. AUTOTUNE
        self.compiled = None
        self.call_shape: str | None = None
        self.failed: str | None = None  # why compiling ahead of time failed: every call compiles in the process
        self.per_call = [[m for m in block.modules() if hasattr(m, "_recast_lora")] for block in blocks]
        self.in_process: dict[int, object] = {}
        self.calls = {"ahead_of_time": 0, "in_process": 0}
        self._lock = threading.Lock()

    def install(self) -> str:
        state = "compiled at the first call"
        if self.artifact is not None and self.artifact.is_file():
            try:
                state = "loaded while the weights were read" if self._load() else "loaded"
            except Exception as exc:  # noqa: BLE001 - a stale artifact costs a compile, never a failure
                log.warning("compiled blocks %s not loaded (%s): compiling them again", self.artifact.name,
                            _one_line(exc))
        for index, block in enumerate(self.blocks):
            block._compiled_call_impl = functools.partial(self._call, index)
            block._recast_ahead_of_time = self
        return f"ahead of time ({state})"

    def _call(self, index: int, *args, **kwargs):
        if any(module._recast_lora for module in self.per_call[index]):
            return self._in_process(index, args, kwargs)
        shape = repr(_call_shape((args, kwargs)))
        if self.compiled is None and not self.failed:
            with self._lock:
                if self.compiled is None and not self.failed:
                    try:
                        self._compile(args, kwargs, shape)
                    except Exception as exc:  # noqa: BLE001 - the blocks still compile, in the process
                        self.failed = _one_line(exc)
                        log.warning("the blocks could not be compiled ahead of time (%s): compiling them in the "
                                    "process", self.failed)
        if self.failed or shape != self.call_shape:
            return self._in_process(index, args, kwargs)
        block = self.blocks[index]
        # The guards checked here, once (the compiled function's own check is off: it raised, with a verbose
        # reason built at every call, where a call of another shape should just compile in the process).
        if not self.compiled.guard_check(block, *args, **kwargs):
            if not self.calls["in_process"]:
                log.info("a block call the ahead-of-time code does not cover (another shape?): compiled in the "
                         "process")
            return self._in_process(index, args, kwargs)
        self.calls["ahead_of_time"] += 1
        return self.compiled(block, *args, **kwargs)

    def _in_process(self, index: int, args, kwargs):
        import torch

        block = self.blocks[index]
        if index not in self.in_process:
            self.in_process[index] = torch.compile(block._call_impl, dynamic=self.dynamic,
                                                   options=dict(self.options) or None)
        self.calls["in_process"] += 1
        return self.in_process[index](*args, **kwargs)

    def _compile(self, args, kwargs, shape: str) -> None:
        import torch

        # torch 2.11 (the cards' torch) has `aot_compile` behind this switch, off by default; torch 2.14 has it on.
        with torch._dynamo.config.patch(enable_aot_compile=True):
            compiled = torch.compile(_block_call, fullgraph=True, dynamic=self.dynamic, options={
                # Only tensor, shape and global-state guards: the rest would pin block 0 itself (its identity, its
                # attributes), which no other block or process matches; `unshareable` and _call check what they
                # leave.
                "guard_filter_fn": torch.compiler.keep_portable_guards_unsafe, **self.options,
            }).aot_compile(((self.blocks[0], *args), kwargs))
        compiled.disable_guard_check()  # _call checks them
        self.compiled, self.call_shape = compiled, shape
        if self.artifact is not None:
            self._save(compiled, shape)

    def _save(self, compiled, shape: str) -> None:
        try:
            data = type(compiled).serialize(compiled).serialized_data
        except Exception as exc:  # noqa: BLE001 - not kept: the next start compiles again, nothing more
            log.warning("compiled blocks not kept: %s", _one_line(exc))
            return
        self.artifact.parent.mkdir(parents=True, exist_ok=True)
        staging = self.artifact.with_name(f".{self.artifact.name}.{uuid.uuid4().hex[:8]}.part")
        header = {"call_shape": shape, "blocks": _signature_digest(self.blocks[0]), "options": self.options}
        staging.write_bytes(json.dumps(header).encode() + b"\n" + data)
        os.replace(staging, self.artifact)
        for older in self.artifact.parent.glob("*.blocks"):  # made by other code: never loaded again
            if older != self.artifact and older.name.rsplit("-", 1)[0] == self.artifact.name.rsplit("-", 1)[0]:
                older.unlink(missing_ok=True)

    def _load(self) -> bool:
        """The kept code, checked against these blocks; True when a thread had read it beside the weights."""
        early = taken_early(self.artifact)
        kept, compiled = early or read_compiled_blocks(self.artifact, check=self._check)
        self._check(kept)
        compiled.disable_guard_check()  # _call checks them
        self.compiled, self.call_shape = compiled, kept["call_shape"]
        return early is not None

    def _check(self, kept: dict) -> None:
        """Raises unless the kept code's header says it was compiled for blocks and options like these."""
        if kept.get("blocks") != _signature_digest(self.blocks[0]):
            raise ValueError("compiled for blocks unlike these (another attention backend or attention processors)")
        if kept.get("options", {}) != self.options:
            raise ValueError(f"compiled with other inductor options ({kept.get('options', {})}, not {self.options})")


def read_compiled_blocks(artifact: Path, check=None) -> tuple[dict, object]:
    """A kept BlocksAheadOfTime artifact: (its header, the compiled function); `check(header)` first, when given
    (it raises to refuse). Loading is most of the time: inductor's output modules and their kernels (~4 s for
    Qwen's block on an H200)."""
    import torch
    from torch._dynamo.aot_compile import AOTCompiledFunction

    header, _, data = artifact.read_bytes().partition(b"\n")
    kept = json.loads(header)
    if check is not None:
        check(kept)
    # Loading rebuilds the tensor guards in the current autograd mode: outside inference mode, torch 2.11's
    # guards then expect tensors that carry ADInplaceOrView, and every call (all run in inference mode, as
    # the compile did) failed them and compiled in the process. torch 2.14's do not depend on it.
    with torch.inference_mode():
        compiled = AOTCompiledFunction.deserialize(data, f_globals=_block_call.__globals__)
    return kept, compiled


# Artifacts being read on a thread while the weights load (prepared.CompiledEarly), by path: BlocksAheadOfTime
# takes the result instead of reading the file again.
_EARLY: dict[Path, object] = {}


def read_early(artifact: Path, future) -> None:
    """`future` gives read_compiled_blocks(artifact): the next BlocksAheadOfTime for that artifact takes it."""
    _EARLY[artifact] = future


def taken_early(artifact: Path, wait: bool = True) -> tuple[dict, object] | None:
    """What a thread read of `artifact` (waiting for it), once; None when none did or it failed (said, and the
    caller reads the file itself: a failure there costs the time, never a compile). wait=False: let it go."""
    future = _EARLY.pop(artifact, None)
    if future is None or not wait:
        return None
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - read again where it is needed
        log.info("compiled blocks read beside the weights failed (%s): reading them again", _one_line(exc))
        return None
