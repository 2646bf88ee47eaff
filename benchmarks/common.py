"""What the GPU benchmarks share: random full-size weights, timing, memory, quality, and docs/performance.json.

Quality is PSNR (dB) of a row's output against its reference on the same weights and seed. A bound is only
worth stating if an unrelated output falls outside it, so each benchmark also scores an output of another seed
against the same reference (`unrelated_psnr_db`) and `--check` fails when that one would pass.
"""

from __future__ import annotations

import gc
import json
import platform
import shlex
import time
from pathlib import Path

import numpy as np
import torch

GIB = 2**30
REPO = Path(__file__).resolve().parent.parent


@torch.no_grad()
def materialize_random(model: torch.nn.Module, device, dtype, seed: int, rng_device=None) -> torch.nn.Module:
    """meta parameters -> empty on `device` in `dtype` -> seeded random values; real buffers are kept.

    normal(0, 0.02) for matrices, ones for norm scales, zeros for biases: the same weights for every row.
    With `rng_device` (a GPU) the values are drawn there and copied to `device` (host RAM): the same values as a
    build on that GPU, made in seconds instead of minutes."""
    rng_device = torch.device(rng_device or device)
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers() if not buf.is_meta}
    model.to(dtype=dtype)
    model.to_empty(device=device)
    modules = dict(model.named_modules())
    for name, buf in saved.items():
        owner, _, attr = name.rpartition(".")
        modules[owner]._buffers[attr] = buf.to(device)
    generator = torch.Generator(device=rng_device).manual_seed(seed)
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for pname, param in module.named_parameters(recurse=False):
            if is_norm and pname in ("weight", "gamma", "scale"):
                param.fill_(1.0)
            elif pname.endswith("bias") or param.ndim <= 1:
                param.zero_()
            elif rng_device == param.device:
                param.normal_(0.0, 0.02, generator=generator)
            else:
                drawn = torch.empty(param.shape, dtype=param.dtype, device=rng_device)
                param.copy_(drawn.normal_(0.0, 0.02, generator=generator))
    return model.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call, device: torch.device) -> tuple[object, float]:
    sync(device)
    started = time.perf_counter()
    out = call()
    sync(device)
    return out, time.perf_counter() - started


def reset_peak(device: torch.device) -> float | None:
    """Reset the peak counter; returns what is resident now (GiB)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    return round(torch.cuda.memory_allocated(device) / GIB, 2)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None


def kernel_trace(call, device: torch.device, path: Path, top: int = 15) -> list[dict]:
    """One `call` under torch.profiler: the whole table (kernels by their own time on the card, or on the CPU without
    one) written to `path`, and the `top` kernels returned as {name, ms, calls}: where a pass's time goes, e.g. the
    attention kernel against the casts around it."""
    from torch.profiler import ProfilerActivity, profile

    on_card = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_card else [])
    sync(device)
    with profile(activities=activities) as traced:
        call()
        sync(device)
    events = traced.key_averages()
    sort_by = "self_device_time_total" if on_card else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(events.table(sort_by=sort_by, row_limit=80, max_name_column_width=120))
    timed = [e for e in events if getattr(e, sort_by) > 0]
    # on a card, the kernels themselves (a CPU op's own device time repeats its kernels'), if the events say which
    kernels = [e for e in timed if getattr(getattr(e, "device_type", None), "name", "") == "CUDA"] if on_card else []
    kernels = kernels or timed
    kernels.sort(key=lambda e: -getattr(e, sort_by))
    return [dict(name=e.key[:100], ms=round(getattr(e, sort_by) / 1000, 3), calls=e.count) for e in kernels[:top]]


def free(device: torch.device) -> None:
    from recast.tasks.models import loading

    loading.clear_cache()
    torch._dynamo.reset()  # compiled graphs hold references to the last profile's modules
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def psnr(output, reference) -> float | None:
    """PSNR in dB of uint8 images or frame stacks (255 = peak); inf when identical."""
    if reference is None:
        return None
    a, b = np.asarray(output, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        return None
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else round(10 * np.log10(255.0**2 / mse), 2)


def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'cpu'})"


def versions() -> dict:
    import diffusers
    import transformers

    return dict(torch=torch.__version__, cuda=torch.version.cuda, diffusers=diffusers.__version__,
                transformers=transformers.__version__, python=platform.python_version())


def recorded_command(argv: list[str]) -> str:
    """The command as run (from benchmarks/), for a row's record. Paths outside the repository become `$R/<name>`
    (R: the results folder of that run), so the record says how a row was made, not where the machine kept it."""
    def clean(arg: str) -> str:
        path = Path(arg)
        if path.is_absolute() and not path.resolve().is_relative_to(REPO):
            return f"$R/{path.name}"
        return shlex.quote(arg)

    return "python " + " ".join([Path(argv[0]).name] + [clean(arg) for arg in argv[1:]])


def row_key(row: dict) -> tuple:
    """A row replaces only its own: same table (the scale-out rows of gpu_parallel.py are a table of their own,
    whose 1-GPU rows ran beside other teams), stage, profile, GPU count, card and variant (gpu_parallel's
    `+whole-vae`); a scale row also only its own run's."""
    key = (row.get("table", "main"), row.get("stage", "edit"), row["profile"], row.get("gpus", 1), row.get("card"),
           row.get("variant"))
    # A multi-GPU row means something only beside the 1-GPU row of its own run, so each run's scale rows stay.
    return key + ((row.get("run") or {}).get("date"),) if row.get("table") == "scale" else key


def write_rows(path: Path, rows: list[dict]) -> None:
    """Merge rows into docs/performance.json: a row replaces the one with the same (stage, profile, gpus, card);
    rows measured on other cards stay, each with the run it came from."""
    existing = json.loads(path.read_text()) if path.exists() else []
    fresh = {row_key(row) for row in rows}
    merged = [row for row in existing if row_key(row) not in fresh] + rows
    order = {"edit": 0, "video": 1, "chain": 2}
    merged.sort(key=lambda r: (order.get(r.get("stage", "edit"), 3), r.get("gpus", 1)))
    path.write_text(json.dumps(merged, indent=2) + "\n")


def record(row: dict, results: str | None, out: str | None) -> None:
    """A row as it ends: printed, appended to the run's own results file (JSON lines: it survives a call cut short)
    and merged into docs/performance.json."""
    print(json.dumps(row), flush=True)
    if results:
        with open(results, "a") as lines:
            lines.write(json.dumps(row) + "\n")
    if out:
        write_rows(Path(out), [row])


# `profile@regional`: the profile with its blocks compiled in the process (torch.compile's regional compilation)
# instead of ahead of time, to compare the two in one run.
REGIONAL = "regional"
STATIC = "static"  # a video row with its blocks compiled for one shape (profile@static)
AUTOTUNE = "autotune"  # the profile with inductor's max-autotune for its blocks (profile@autotune: compile_autotune)
FUSED_VAE = "fused-vae"  # a video profile with the VAE's norms as one kernel each (profile@fused-vae: vae_fused_norms)
DIFFUSERS_VAE = "diffusers-vae"  # the same profile with diffusers' own VAE norms (the GPU profiles fuse them)


def with_backend(row_name: str) -> tuple[str, str | None]:
    """A row named `profile@backend` is the profile with another attention backend (e.g. `lightning@sage`), or
    `profile@regional` with its blocks compiled in the process, `video-profile@static` with its blocks compiled for
    one shape (warmed up on a whole clip), `profile@autotune` with inductor's max-autotune (`compile_autotune`),
    `video-profile@fused-vae` with the VAE's norms as one kernel each (`vae_fused_norms`), `@diffusers-vae` without,
    so two kernels are compared in one run on the same
    weights: (profile, backend or None)."""
    profile, _, backend = row_name.partition("@")
    return profile, backend or None


def profile_overrides(backend: str | None) -> dict:
    """The profile fields a `profile@backend` row changes."""
    if backend == REGIONAL:
        return {"compile_ahead_of_time": False}
    if backend == STATIC:
        return {"compile_dynamic": False}
    if backend == AUTOTUNE:
        return {"compile_autotune": True}
    if backend in (FUSED_VAE, DIFFUSERS_VAE):
        return {"vae_fused_norms": backend == FUSED_VAE}
    return {"attention_backend": backend} if backend else {}


def check_quality(name: str, row: dict, bounds: dict[str, float], failures: list[str]) -> None:
    """--check: the row ran, its output is finite, its PSNR meets the bound (a `profile@backend` row: the
    profile's bound), and the bound can fail."""
    bound = bounds.get(with_backend(name)[0])
    if "error" in row or not row.get("finite", False):
        failures.append(f"{name}: did not run or produced non-finite output: {row.get('error')}")
        return
    if bound is None or row.get("psnr_db") is None:
        return
    if row["psnr_db"] < bound:
        failures.append(f"{name}: PSNR {row['psnr_db']} dB below its bound {bound} dB")
    unrelated = row.get("unrelated_psnr_db")
    if unrelated is not None and unrelated >= bound:
        failures.append(f"{name}: an unrelated output scores {unrelated} dB, inside the bound {bound} dB: "
                        "the bound would catch nothing")
