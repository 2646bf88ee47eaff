"""Kernel choices shared by the recipes: the attention backend, and a RoPE that torch.compile can fuse.

Both act on one model instance (its attention processors, its position embedder), never on a library module.
"""

from __future__ import annotations

import logging
import types

log = logging.getLogger("recast.models")

# What fastest_attention_backend measured on this card (reported by the benchmarks).
ATTENTION_TIMINGS_MS: dict[str, float] = {}


# Backends that run on the CPU too; any other (SageAttention, FlashAttention, cuDNN, ...) needs a CUDA card.
CPU_BACKENDS = ("native", "_native_math")


def use_attention_backend(transformer, backend: str, device) -> str:
    """Set the transformer's diffusers attention backend; "auto" times the SDPA kernels on this card first. A
    backend this machine cannot run (its package missing, or no CUDA card) falls back to bf16 SDPA ("native") with
    a one-line warning: a profile that names an optional kernel still runs everywhere."""
    import torch

    if backend == "auto":
        backend = fastest_attention_backend(transformer, device)
    reason = None
    if torch.device(device).type != "cuda" and backend not in CPU_BACKENDS:
        reason = "it needs a CUDA card"
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

    call = base.__call__
    scoped = types.FunctionType(call.__code__, {**call.__globals__, "apply_rotary_emb_qwen": rotary_real},
                                call.__name__, call.__defaults__, call.__closure__)
    scoped.__kwdefaults__ = call.__kwdefaults__
    return type("RealRotaryQwenAttnProcessor", (base,), {"__call__": scoped, "__module__": __name__})


def use_real_rotary(transformer) -> None:
    """Keep complex numbers out of this transformer's compiled blocks (Inductor cannot generate code for them):
    its position embedder hands out real (cos, sin) pairs, its attention processors rotate with them."""
    import torch

    processor = _real_rotary_processor_class()
    transformer.set_attn_processor(processor())

    def as_real_pairs(module, args, output):
        return tuple(torch.view_as_real(f) if torch.is_complex(f) else f for f in output)

    transformer.pos_embed.register_forward_hook(as_real_pairs)
