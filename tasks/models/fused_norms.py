"""The Wan VAE's RMS norms, and the SiLU after them, as one Triton kernel each (#26: `vae_fused_norms`).

diffusers' `WanRMS_norm` runs as six memory-bound passes over a 480p clip's activations (the bf16 input to fp32,
the normalization's reduction and division, back to bf16, times the scale, times gamma, plus a bias of 0.0), and the
SiLU after it is a seventh; at full resolution one such norm moves ~1.5 GB per frame. The VAE's convolutions run in
channels-last 3-D (NDHWC, kernels.set_convolution_layout), so each position's channels lie next to each other and
one kernel can read a position's channels once, normalize them in fp32, scale them, apply the SiLU and write bf16
once: the same function, one rounding instead of several.

Only tensors laid out that way on a CUDA device take the kernel; any other input (the CPU, a default-layout tensor)
runs diffusers' own forward, so the module's results are the same in both cases up to bf16 rounding. Triton is
imported only when a kernel is about to be launched. Under `TRITON_INTERPRET=1` (Triton's CPU interpreter, for the
tests) CPU tensors take the kernel too.
"""

from __future__ import annotations

import functools
import os
import types

EPS = 1e-12  # F.normalize's: x / max(||x||, eps)


def fuse_wan_vae(vae) -> dict:
    """Give every RMS norm of a diffusers AutoencoderKLWan the one-kernel forward, with the SiLU that follows it
    folded in where the module's own code applies it right after the norm (residual blocks, the encoder's and the
    decoder's last norm). Returns {"norms": n, "with_silu": m}. The weights and their names are unchanged."""
    import torch
    from diffusers.models.autoencoders.autoencoder_kl_wan import (WanDecoder3d, WanEncoder3d, WanResidualBlock,
                                                                  WanRMS_norm)

    if hasattr(vae, "_recast_fused_norms"):  # already fused: the SiLUs are folded in once
        return vae._recast_fused_norms
    with_silu: set[int] = set()
    for module in vae.modules():
        # Where diffusers' forward calls `self.nonlinearity` right after these norms, and nowhere else
        followed = ("norm1", "norm2") if isinstance(module, WanResidualBlock) else \
            ("norm_out",) if isinstance(module, (WanEncoder3d, WanDecoder3d)) else ()
        if followed and isinstance(getattr(module, "nonlinearity", None), torch.nn.SiLU):
            for name in followed:
                with_silu.add(id(getattr(module, name)))
            module.nonlinearity = torch.nn.Identity()  # the norms before it apply it now
    norms = 0
    for module in vae.modules():
        if isinstance(module, WanRMS_norm) and module.channel_first:
            module._recast_silu = id(module) in with_silu
            module._recast_eager = type(module).forward.__get__(module)  # diffusers' own, for other inputs
            module.forward = types.MethodType(_fused_forward, module)
            norms += 1
    vae._recast_fused_norms = {"norms": norms, "with_silu": len(with_silu)}
    return vae._recast_fused_norms


def fused_calls() -> int:
    """How many times the kernel ran in this process (the tests' proof that it did)."""
    return _CALLS[0]


_CALLS = [0]


def _takes_kernel(x) -> bool:
    import torch

    if x.dim() not in (4, 5) or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    layout = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    return x.is_contiguous(memory_format=layout) and x.numel() > 0


def _fused_forward(self, x):
    import torch.nn.functional as F

    if not _takes_kernel(x):
        out = self._recast_eager(x)
        return F.silu(out) if self._recast_silu else out
    return rms_norm_channels_last(x, self.gamma, self.bias, self.scale, silu=self._recast_silu)


def rms_norm_channels_last(x, gamma, bias, scale: float, silu: bool):
    """F.normalize(x, dim=1) * scale * gamma + bias (then SiLU) for a channels-last x, in one pass."""
    import torch
    import triton

    channels = x.shape[1]
    rows = x.numel() // channels
    out = torch.empty_like(x)  # the same channels-last strides
    block_c = triton.next_power_of_2(channels)
    block_rows = max(1, min(64, 8192 // block_c))
    has_bias = isinstance(bias, torch.Tensor)
    _kernel()[(triton.cdiv(rows, block_rows),)](
        x, gamma.reshape(-1), bias.reshape(-1) if has_bias else gamma, out, rows, channels, float(scale), EPS,
        HAS_BIAS=has_bias, SILU=silu, BLOCK_C=block_c, BLOCK_ROWS=block_rows, num_warps=4 if block_c <= 256 else 8)
    _CALLS[0] += 1
    return out


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_rows(x_ptr, gamma_ptr, bias_ptr, out_ptr, rows, channels, scale, eps,
                      HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_ROWS: tl.constexpr):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
        channel = tl.arange(0, BLOCK_C)[None, :]
        inside = (row < rows) & (channel < channels)
        offsets = row.to(tl.int64) * channels + channel
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(x * x, axis=1))[:, None]
        gamma = tl.load(gamma_ptr + channel, mask=channel < channels, other=0.0).to(tl.float32)
        y = x / tl.maximum(norm, eps) * scale * gamma
        if HAS_BIAS:
            y += tl.load(bias_ptr + channel, mask=channel < channels, other=0.0).to(tl.float32)
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=inside)

    return rms_norm_rows
