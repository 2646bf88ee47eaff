"""Attention kernels side by side at the models' real shapes (#26), through diffusers' `dispatch_attention_fn`:
the very call the Qwen and Wan transformers make, with the backend names a profile's `attention_backend` takes.

Shapes (batch 1, tokens x heads x head dim, no mask: recast's requests are batch 1, so diffusers drops the mask):

    qwen-edit   8,448 x 24 x 128   a 1024x1024 edit with one reference image (4,096 + 4,096 image tokens + text)
    wan-480p   32,760 x 40 x 128   an 832x480, 81-frame clip (21 latent frames x 30 x 52)

Each row: the median time of the kernel (triton.testing.do_bench, inputs rotated so the L2 cache does not hold
them), its TFLOP/s (4 x S^2 x H x D per call), and its error: the relative L2 distance of its output from a float32
computation on the same inputs. `unrelated_rel_l2` is the distance of another input's output from the same
reference: an error bound (`ERROR_BOUNDS`) must lie below it, or it could not fail. A backend whose package or
card is missing is reported with diffusers' own reason instead of a time.

    python benchmarks/attention.py --out docs/performance.json     # on a CUDA card
    python benchmarks/attention.py --tiny --device cpu              # the code path, in seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import common

SHAPES = {"qwen-edit": (8448, 24, 128), "wan-480p": (32760, 40, 128)}
TINY_SHAPES = {"qwen-edit": (96, 3, 16), "wan-480p": (160, 2, 16)}
# bf16 kernels, then SageAttention's (INT8 Q.K, FP8 or FP16 P.V): diffusers' names.
# `recast-sage` is recast's own `sage` (tasks/models/kernels.py: sageattn as one custom op, which torch.compile keeps
# whole); `compiles` says whether a block compiled with fullgraph=True can hold the backend.
# `fa3-fp8` is recast's `fa3-fp8` backend, FlashAttention-3's FP8 forward (benchmarks/device/fa3.sh builds it): q, k
# and v cast to e4m3 with one scale per head (K and V smoothed first), the cast timed with the kernel, eager;
# `fa3-fp8-kernel` the kernel alone on inputs cast beforehand (the ceiling, were the cast free); `fa3-fp8-compiled`
# the same as `fa3-fp8` under torch.compile (the cast's passes fused, as in a compiled block), last: it compiles for
# each shape, and a call cut short still brings back the rows before it.
BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "recast-sage", "sage",
            "_sage_qk_int8_pv_fp8_cuda_sm90", "_sage_qk_int8_pv_fp8_cuda", "_sage_qk_int8_pv_fp16_cuda",
            "_sage_qk_int8_pv_fp16_triton", "_flash_3", "fa3-fp8", "fa3-fp8-kernel", "fa3-fp8-compiled")
# Largest relative L2 error from float32 each family may have: bf16 rounding is ~4e-3; SageAttention's INT8/FP8
# is published at a cosine similarity of >= 0.999 (relative L2 ~0.045), and FP8 attention is held to the same.
# Another input's output sits near 1.4.
ERROR_BOUNDS = {"bf16": 0.02, "sage": 0.1, "fp8": 0.1}


def family(backend: str) -> str:
    return "sage" if "sage" in backend else "fp8" if "fp8" in backend else "bf16"


def fa3_fp8_call(backend: str):
    """(q, k, v) -> output through FlashAttention-3's FP8 forward as a profile's `fa3-fp8` runs it (recast's op and
    per-head cast, tasks/models/kernels.py): eager (`fa3-fp8`), compiled (`fa3-fp8-compiled`), or the kernel alone
    on inputs cast once beforehand (`fa3-fp8-kernel`). Raises where it cannot run."""
    from recast.tasks.models import kernels

    missing = kernels._fa3_missing(torch.device("cuda"))
    if missing:
        raise RuntimeError(missing)
    if backend == "fa3-fp8":
        return kernels.fa3_fp8_attention
    if backend == "fa3-fp8-compiled":
        kernels.fa3_fp8_op()  # registered before tracing
        return torch.compile(kernels.fa3_fp8_attention, fullgraph=True)
    op, cast = kernels.fa3_fp8_op(), {}

    def kernel_only(q, k, v):
        key = (q.data_ptr(), k.data_ptr(), v.data_ptr())
        if key not in cast:  # once per input set, outside the timed calls after the first
            (q8, dq), (k8, dk), (v8, dv) = kernels.to_e4m3(q), kernels.to_e4m3(k), kernels.to_e4m3(v)
            cast[key] = (q8, k8, v8, dq, dk, dv)
        return op(*cast[key], None)
    return kernel_only


def inputs(shape, device, seed: int, sets: int):
    """`sets` independent (q, k, v) in the transformers' layout (batch, tokens, heads, head dim), bf16 normal."""
    tokens, heads, dim = shape
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return [tuple(torch.randn(1, tokens, heads, dim, device=device, dtype=dtype, generator=generator)
                  for _ in range(3)) for _ in range(sets)]


def reference(q, k, v):
    """float32 attention on the same (bf16) values: the error's yardstick."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)


def rel_l2(out, ref) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def time_ms(call, device, sets) -> float:
    """Median ms of one call, cycling through the input sets."""
    counter = iter(range(10**9))

    def one():
        return call(*sets[next(counter) % len(sets)])

    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(one, warmup=100, rep=500, return_mode="median"))
    times = []
    for _ in range(5):
        started = time.perf_counter()
        one()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def attention_call(backend: str):
    """(q, k, v) -> output through the backend, as a transformer's processor calls it; raises if unusable here."""
    from diffusers.models.attention_dispatch import (AttentionBackendName, _check_attention_backend_requirements,
                                                     dispatch_attention_fn)

    from recast.tasks.models import kernels

    if backend.startswith("fa3-fp8"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"{backend} needs a CUDA card (Hopper)")
        return fa3_fp8_call(backend)
    if backend == "recast-sage":
        missing = kernels._sage_missing()
        if missing:
            raise RuntimeError(missing)
        op = kernels.sage_attention_op()
        return lambda q, k, v: op(q, k, v, None)
    _check_attention_backend_requirements(AttentionBackendName(backend))  # its package, as a profile checks
    return lambda q, k, v: dispatch_attention_fn(q, k, v, backend=backend)


def compiles(call, q, k, v) -> bool | str:
    """Whether torch.compile(fullgraph=True) holds the call in one graph (what a compiled block needs)."""
    torch._dynamo.reset()
    try:
        torch.compile(call, fullgraph=True)(q, k, v)
        return True
    except Exception as exc:  # noqa: BLE001 - the reason is the finding
        # the reason, without dynamo's "from user code" trace (the machine's file paths)
        return " ".join(f"{type(exc).__name__}: {exc}".split()).split(" from user code:")[0][:200]


def measure(backend: str, shape_name: str, shape, device, sets, ref, unrelated, compile_check: bool) -> dict:
    tokens, heads, dim = shape
    row = dict(stage="attention", profile=f"{shape_name}:{backend}", backend=backend, shape=shape_name,
               tokens=tokens, heads=heads, head_dim=dim, card=common.card_name(device), gpus=1)
    try:
        call = attention_call(backend)
        out = call(*sets[0])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - an unusable backend is a finding, not a failure of the run
        row["error"] = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        return row
    ms = time_ms(call, device, sets)
    error = rel_l2(out, ref)
    bound = ERROR_BOUNDS[family(backend)]
    row.update(ms=round(ms, 3), tflops=round(4 * tokens * tokens * heads * dim / (ms / 1000) / 1e12, 1),
               rel_l2=round(error, 5), unrelated_rel_l2=round(rel_l2(unrelated, ref), 4), error_bound=bound,
               finite=bool(torch.isfinite(out).all()))
    if compile_check:
        row["compiles_fullgraph"] = compiles(call, *sets[0])
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU check of the code path")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--check", action="store_true", help="fail when a measured backend exceeds its error bound, "
                    "or a bound would pass an unrelated output")
    ap.add_argument("--out", default=None, help="merge the rows into this docs/performance.json")
    ap.add_argument("--results", default=None, help="also append each row here as it ends (JSON lines)")
    args = ap.parse_args()
    device = torch.device(args.device)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), versions=common.versions(),
                command=common.recorded_command(sys.argv))
    print(json.dumps(meta), flush=True)
    rows, failures = [], []
    for index, shape_name in enumerate(args.shapes.split(",")):
        shape = shapes[shape_name]
        sets = inputs(shape, device, seed=0, sets=1 if args.tiny else 4)
        ref = reference(*sets[0])
        # Another query set against the same keys and values: what an unrelated output scores.
        unrelated = reference(inputs(shape, device, seed=1, sets=1)[0][0], *sets[0][1:])
        for backend in args.backends.split(","):
            row = measure(backend, shape_name, shape, device, sets, ref, unrelated, compile_check=index == 0)
            row["run"] = meta
            rows.append(row)
            common.record(row, args.results, args.out)
            if "error" not in row:
                if row["rel_l2"] > row["error_bound"] or not row["finite"]:
                    failures.append(f"{row['profile']}: error {row['rel_l2']} over its bound {row['error_bound']}")
                if row["unrelated_rel_l2"] <= row["error_bound"]:
                    failures.append(f"{row['profile']}: an unrelated output scores {row['unrelated_rel_l2']}, inside "
                                    f"the bound {row['error_bound']}: the bound would catch nothing")
        del sets, ref, unrelated
        common.free(device)
    print(f"\n{'shape:backend':44} {'ms':>8} {'TFLOP/s':>8} {'rel L2':>8}  compiles")
    for r in rows:
        if "error" in r:
            print(f"{r['profile']:44} unusable: {r['error'][:90]}")
        else:
            print(f"{r['profile']:44} {r['ms']:8.3f} {r['tflops']:8.1f} {r['rel_l2']:8.5f}  "
                  f"{str(r.get('compiles_fullgraph', ''))[:60]}")
    if args.check:
        print("\nchecks:", "all passed" if not failures else "\n  " + "\n  ".join(failures))
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
