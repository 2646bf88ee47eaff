"""The GPU profiles' building blocks, checked on CPU: quantized linears, real-valued RoPE, profile recipes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recast.tasks.models import kernels, precision
from recast.tasks.settings import load_settings


@pytest.mark.parametrize("scheme,bound", [("fp8", 0.06), ("int4", 0.12)])
def test_quantized_linear_stays_close_to_the_original(scheme, bound):
    torch.manual_seed(0)
    layer = nn.Linear(256, 96)
    x = torch.randn(3, 11, 256)
    quantized = precision.QUANTIZERS[scheme](layer)
    error = ((quantized(x) - layer(x)).norm() / layer(x).norm()).item()
    assert 0 < error < bound, f"{scheme} relative error {error:.4f} outside (0, {bound})"


def test_fp8_activation_quantization_gives_the_plain_formulas_values_in_few_kernels():
    """An FP8 linear quantizes its input at every call; where it runs eagerly (the text encoder's ~200 linears per
    edit) each operation is a kernel launch, and the text encoder is launch-bound on a card (~0.14 s for ~4 GFLOP).
    The quantization must give exactly the plain formula's e4m3 values and scales (rows of zeros, of huge and of
    tiny values included) in at most five kernels (the plain form launched nine)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Kernels(TorchDispatchMode):
        views = {"view", "reshape", "_reshape_alias", "t", "transpose", "expand", "unsqueeze", "squeeze", "detach"}

        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in self.views:
                self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x = torch.randn(7, 160, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x[1] = 0
    x[2] *= 1e30
    x[3] *= 1e-30
    plain_scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / precision.FP8_MAX
    plain = (x.float() / plain_scale).clamp(-precision.FP8_MAX, precision.FP8_MAX).to(torch.float8_e4m3fn)
    with Kernels() as counted:
        values, scale = precision._rowwise_fp8(x)
    assert torch.equal(scale, plain_scale), "the row scales differ from the plain formula's"
    assert torch.equal(values.view(torch.uint8), plain.view(torch.uint8)), \
        "the e4m3 values differ from the plain formula's"
    assert len(counted.ops) <= 5, f"the quantization launches {len(counted.ops)} kernels: {counted.ops}"


def test_quantize_linears_replaces_only_eligible_layers():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    count = precision.quantize_linears(model, "int4", lambda name, layer: precision.quantizable(layer))
    assert count == 1, "only layers with dimensions in multiples of 16 may be quantized"
    assert isinstance(model[0], precision.Int4Linear) and isinstance(model[2], nn.Linear)
    assert model[0].weight_packed.dtype == torch.uint8 and model[0].weight_packed.shape == (32, 32)


def test_real_rotary_matches_diffusers_complex_rotary():
    import diffusers.models.transformers.transformer_qwenimage as qwen

    original = qwen.apply_rotary_emb_qwen  # diffusers' own: recast never replaces it
    torch.manual_seed(0)
    x = torch.randn(2, 40, 3, 16, dtype=torch.bfloat16)
    freqs = torch.polar(torch.ones(40, 8), torch.randn(40, 8))
    expected = original(x, freqs, use_real=False)
    got = kernels.rotary_real(x, freqs, use_real=False)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.allclose(got.float(), expected.float(), atol=1e-2, rtol=0), "real RoPE differs from diffusers'"


def test_gpu_profiles_declare_their_recipe():
    profiles = load_settings({}).profiles
    assert profiles["bf16-fast"].compile and profiles["bf16-fast"].warmup, "bf16-fast must compile before work"
    assert profiles["bf16-fast"].quantize == "none", "bf16-fast keeps bf16 numerics"
    assert profiles["fp8"].quantize == "fp8" and profiles["fp8-offload"].offload_text_encoder
    assert profiles["int4"].quantize == "int4"
    lightning = profiles["lightning"]
    assert lightning.lightning is not None and lightning.lightning.revision, "Lightning LoRA must be pinned"
    assert (lightning.steps, lightning.true_cfg_scale) == (4, 1.0), "Lightning runs 4 steps with CFG off"
    assert lightning.scheduler["shift_terminal"] is None, "Lightning needs its own scheduler settings"


def test_real_rotary_accepts_real_pairs_from_the_pos_embed_hook():
    torch.manual_seed(1)
    x = torch.randn(1, 24, 2, 16)
    freqs = torch.polar(torch.ones(24, 8), torch.randn(24, 8))
    from_complex = kernels.rotary_real(x, freqs, use_real=False)
    from_pairs = kernels.rotary_real(x, torch.view_as_real(freqs), use_real=False)
    assert torch.equal(from_complex, from_pairs), "complex and real-pair frequencies must give the same RoPE"


def test_host_embedding_gives_the_same_rows_and_holds_no_parameters():
    embedding = nn.Embedding(50, 8, padding_idx=0)
    host = precision.HostEmbedding(embedding)
    ids = torch.tensor([[0, 3, 49]])
    assert torch.equal(host(ids), embedding(ids))
    assert list(host.parameters()) == [], "the table must stay out of .to() and offloading hooks"
