"""Precision and placement for the GPU profiles: lower-precision linears, host-RAM embeddings, streamed blocks.

Lower-precision linear layers: FP8 (weights and activations) and INT4 (weights only).

Both replace `nn.Linear` modules in place, one layer at a time on the layer's own device, so a model never
needs a second full copy in memory. They are plain torch (no extra package): FP8 runs on Hopper's FP8
tensor cores through `torch._scaled_mm` with row-wise scales; INT4 stores two 4-bit weights per byte with
one scale per group of 64 and dequantizes on the fly (under torch.compile the dequantization fuses into
one kernel per layer), trading some speed for a 4x smaller transformer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

FP8_MAX = 448.0  # largest float8_e4m3fn value
INT4_GROUP = 64


def _rowwise_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / scale) in float8_e4m3fn with one float32 scale per row.

    Five kernels where run eagerly (the text encoder's 196 linears run so: four launches saved are ~800 an edit),
    with the values of the plain form `x.abs().amax(-1).float().clamp(min=1e-12) / 448`, then `(x.float() / scale)
    .clamp(-448, 448)`: the infinity norm is that amax taken in float32, x / scale promotes to float32 as x.float()
    did, and no clamp is needed, as |x / scale| <= 448 up to float32 rounding, which the cast rounds to 448."""
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scale = amax.clamp_min(1e-12) / FP8_MAX
    return (x / scale).to(torch.float8_e4m3fn), scale


class Float8Linear(nn.Module):
    """y = x W^T + b with x and W in FP8 (row-wise scales), accumulated and returned in x's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if linear.weight.is_meta:  # structure only, for prepared weights to fill: the math on meta tensors took
            # 7.1 s of a start for the edit model's ~1,000 linears (torch's meta kernels run in Python)
            weight = torch.empty(linear.weight.shape, dtype=torch.float8_e4m3fn, device="meta")
            scale = torch.empty(self.out_features, 1, dtype=torch.float32, device="meta")
        else:
            weight, scale = _rowwise_fp8(linear.weight.detach())
        self.weight = nn.Parameter(weight, requires_grad=False)  # (out, in), row-major
        self.register_buffer("weight_scale", scale.reshape(1, -1))  # (1, out)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_fp8, x_scale = _rowwise_fp8(x.reshape(-1, shape[-1]))
        y = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                             bias=self.bias, out_dtype=x.dtype, use_fast_accum=True)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3 rowwise"


class Int4Linear(nn.Module):
    """Weight-only INT4 (symmetric, one scale per 64 inputs), dequantized to x's dtype at each call."""

    def __init__(self, linear: nn.Linear, group: int | None = None):
        super().__init__()
        group = group or next(g for g in (INT4_GROUP, 32, 16) if linear.in_features % g == 0)
        self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, group
        if linear.weight.is_meta:  # structure only (see Float8Linear)
            packed = torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8, device="meta")
            scale = torch.empty(self.out_features, self.in_features // group, 1, dtype=torch.float32, device="meta")
        else:
            w = linear.weight.detach().float().reshape(self.out_features, -1, group)
            scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 7.0
            q = (torch.round(w / scale).clamp(-8, 7) + 8).to(torch.uint8).reshape(self.out_features, -1)
            packed = q[:, 0::2] << 4 | q[:, 1::2]
        self.weight_packed = nn.Parameter(packed, requires_grad=False)  # (out, in/2)
        self.weight_scale = nn.Parameter(scale.to(linear.weight.dtype), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        packed = self.weight_packed
        q = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(self.out_features, -1, self.group)
        return ((q.to(dtype) - 8) * self.weight_scale.to(dtype)).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group}"


QUANTIZERS: dict[str, Callable[[nn.Linear], nn.Module]] = {"fp8": Float8Linear, "int4": Int4Linear}


def quantize_linears(root: nn.Module, scheme: str, include: Callable[[str, nn.Linear], bool]) -> int:
    """Replace every nn.Linear under `root` for which include(name, layer) holds; returns how many."""
    make = QUANTIZERS[scheme]
    targets = [(name, module) for name, module in root.named_modules()
               if isinstance(module, nn.Linear) and include(name, module)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, make(linear))
        del linear  # free the high-precision weight before the next layer
    return len(targets)


def quantizable(layer: nn.Linear) -> bool:
    """FP8 GEMMs need both dimensions to be multiples of 16 (so do INT4's groups of 16-64 inputs)."""
    return layer.in_features % 16 == 0 and layer.out_features % 16 == 0


def quantize_blocks(blocks: list[nn.Module], scheme: str, device: torch.device | None,
                    skip: tuple[str, ...] = ()) -> int:
    """Move each block to `device` and quantize its eligible linears there (except names ending in `skip`), one
    block at a time, so the high-precision copy of a model never sits whole on the GPU. Returns the count.
    With device None the blocks stay where they are: on empty (meta) blocks this gives prepared weights their
    structure without computing anything."""
    count = 0
    for block in blocks:
        if device is not None:
            block.to(device)
        count += quantize_linears(block, scheme, lambda name, linear: quantizable(linear) and not name.endswith(skip))
    return count


def stream_blocks(parts: list[nn.Module], device: torch.device) -> None:
    """Keep `parts` in (pinned) CPU RAM and stream them to `device` a block at a time on a side CUDA stream,
    overlapped with compute (diffusers group offloading)."""
    from diffusers.hooks import apply_group_offloading

    for part in parts:
        part.to("cpu")
        apply_group_offloading(part, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1, use_stream=True)


class HostEmbedding(nn.Module):
    """An embedding whose table lives in CPU RAM (pinned when CUDA is there), invisible to .to() and to
    offloading hooks: looking up ~1k rows on the host is cheaper than moving a 1 GB table to the GPU."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        table = embedding.weight.detach().cpu()
        self.__dict__["table"] = table.pin_memory() if torch.cuda.is_available() else table
        self.padding_idx = embedding.padding_idx

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(input_ids.cpu(), self.table, self.padding_idx)
        if input_ids.device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(input_ids.device, non_blocking=True)
