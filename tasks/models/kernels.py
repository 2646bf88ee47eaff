"""Kernel choices shared by the recipes: the attention backend, and a RoPE that torch.compile can fuse.

Both act on one model instance (its attention processors, its position embedder), never on a library module.
"""

from __future__ import annotations

import contextlib
import logging
import types

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


def use_attention_backend(transformer, backend: str, device) -> str:
    """Set the transformer's attention backend: a diffusers name, recast's `sage`, or "auto" (times the SDPA kernels
    on this card first). A backend this machine cannot run (its package missing, or no CUDA card) falls back to bf16
    SDPA ("native") with a one-line warning: a profile that names an optional kernel still runs everywhere."""
    import torch

    if backend == "auto":
        backend = fastest_attention_backend(transformer, device)
    reason = None
    if torch.device(device).type != "cuda" and backend not in CPU_BACKENDS:
        reason = "it needs a CUDA card"
    elif backend == SAGE:
        reason = _sage_missing()
        if reason is None:
            transformer.set_attention_backend("native")  # what anything sage cannot take (masks) runs on
            use_sage(transformer)
    else:
        try:
            transformer.set_attention_backend(backend)
        except RuntimeError as exc:  # diffusers: the backend's package is missing or too old
            reason = " ".join(str(exc).split())  # it names the package and version to install
    if reason:
        log.warning("attention backend %s is not usable here (%s): using native bf16 SDPA", backend, reason)
        backend = "native"
        transformer.set_attention_backend(backend)
    log.info("attention backend: %s", backend)
    return backend


def _sage_missing() -> str | None:
    try:
        import sageattention
    except ImportError:
        return f"the sageattention package is not installed; {SAGE_INSTALL}"
    if not hasattr(sageattention, "sageattn_qk_int8_pv_fp8_cuda"):  # 1.x: Triton only, no FP8 kernels
        return f"sageattention {getattr(sageattention, '__version__', '1.x')} is too old; {SAGE_INSTALL}"
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


def sage_dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                  attention_kwargs=None, *, backend=None, parallel_config=None):
    """diffusers' dispatch_attention_fn, with the calls SageAttention can take sent to recast::sageattn: no mask,
    no dropout or causality, one card, bf16/fp16, head dim 64 or 128. Anything else runs as diffusers would."""
    import torch
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    if (attn_mask is None and not dropout_p and not is_causal and not enable_gqa and parallel_config is None
            and query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] in (64, 128)):
        return sage_attention_op()(query, key, value, scale)
    return dispatch_attention_fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                 attention_kwargs, backend=backend, parallel_config=parallel_config)


def use_sage(transformer) -> int:
    """Route this transformer's attention processors through `sage_dispatch`; returns how many were changed."""
    sage_attention_op()  # registered now: torch.compile cannot trace an op's registration inside a compiled block
    changed = 0
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        call = getattr(type(processor), "__call__", None)
        if processor is not None and "dispatch_attention_fn" in getattr(call, "__globals__", {}):
            processor.__class__ = _rebound(type(processor), "Sage", dispatch_attention_fn=sage_dispatch)
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
        _REBOUND[key] = type(f"{prefix}{base.__name__}", (base,), {"__call__": scoped, "__module__": __name__})
    return _REBOUND[key]


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

    return _rebound(base, "RealRotary", apply_rotary_emb_qwen=rotary_real)


def use_real_rotary(transformer) -> None:
    """Keep complex numbers out of this transformer's compiled blocks (Inductor cannot generate code for them):
    its position embedder hands out real (cos, sin) pairs, its attention processors rotate with them."""
    import torch

    processor = _real_rotary_processor_class()
    transformer.set_attn_processor(processor())

    def as_real_pairs(module, args, output):
        return tuple(torch.view_as_real(f) if torch.is_complex(f) else f for f in output)

    transformer.pos_embed.register_forward_hook(as_real_pairs)


def compile_blocks(model, *, fullgraph: bool, dynamic: bool | None = None) -> None:
    """Regional torch.compile: the model's identical blocks compile once and share the graph.

    Python floats reaching a block are specialized (constants guarded by value) instead of traced as symbols. With
    symbols, the tensorify pass gives up on them after the whole block was traced and dynamo restarts its analysis
    with them specialized anyway: every cold start traced each block twice, and the restarted graph missed
    AOTAutograd's cache (measured on the tiny edit model, CPU: the first warm-up call 8.5 s -> 3.7-4.5 s with
    every graph a cache hit; requests with other steps, CFG, sizes or prompts compiled nothing either way)."""
    import torch

    torch._dynamo.config.specialize_float = True  # process-wide: recast's worker owns the process's compilation
    model.compile_repeated_blocks(fullgraph=fullgraph, dynamic=dynamic)
