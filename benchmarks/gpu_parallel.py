"""Multi-GPU benchmark: one edit or one clip on 1, 2, 4... GPUs of one host, through recast's own team code.

Every rank of a team is a process of its own on its own GPU (`recast.tasks.models.parallel`, as `recast worker
... --gpus` starts them). Each builds the same FULL-SIZE random weights (same seeds), joins the team, applies the
profile's recipe with `qwen_edit.prepare` / `wan_video.prepare` (which install the team's split: CFG-parallel over
two halves, Ulysses within a half or across all ranks when the recipe has no CFG), warms up and times the same
calls in step. Rank 0 records the row and its output; at the end each multi-GPU row gets its speed-up over the
1-GPU row of the same profile from the same run, and the PSNR of its output against that row's output (same
weights, seed; CFG-parallel alone must be identical).

A plan says which teams run, on which GPUs, and which rows each runs in order:

    --plan "0:wan22-fp8;1:fp8,lightning,wan22-lightning;2,3:fp8,lightning,wan22-lightning,wan22-fp8|0,1,2,3:fp8,wan22-lightning,wan22-fp8"

Teams separated by ";" run at the same time on their own GPUs; phases separated by "|" run one after another
(a 4-GPU team needs the whole host). A profile on 1 GPU twice in a run ("0:fp8;1:fp8") measures how far two
processes differ with no parallelism (`repeat_psnr_db`), the floor for the multi-GPU rows' PSNR. A video row
`<profile>+whole-vae` runs the VAE whole on every rank (no `VaeSplit`), to measure what the split saves. Rows are
profile names of configs/profiles.yaml (edit) and configs/video_profiles.yaml (video). Recipes as in gpu_edit.py (1024x1024, 8 steps, true CFG 4; `lightning` 4
steps, no CFG) and gpu_video.py (480x832, 81 frames, 40 steps, guidance 3.5; `wan22-lightning` 4 steps).

    python benchmarks/gpu_parallel.py --plan "..." --out docs/performance.json
    python benchmarks/gpu_parallel.py --tiny --device cpu --plan "0:bf16;0,1:bf16"   # the code path, gloo
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def parse_plan(plan: str) -> list[list[tuple[list[int], list[str]]]]:
    """'0:a,b;1,2:c|0,1,2,3:d' -> phases of teams (gpus, rows)."""
    phases = []
    for phase in plan.split("|"):
        teams = []
        for team in phase.split(";"):
            gpus, _, rows = team.partition(":")
            teams.append(([int(g) for g in gpus.split(",")], [r.strip() for r in rows.split(",") if r.strip()]))
        for _, rows in teams:
            for row in rows:
                if row.partition("+")[2] not in ("", "whole-vae"):
                    raise SystemExit(f"--plan: row {row!r}: the one variant a row takes is '+whole-vae'")
        used = [g for gpus, _ in teams for g in gpus]
        if len(used) != len(set(used)):
            raise SystemExit(f"--plan: teams of one phase share a GPU: {phase}")
        phases.append(teams)
    return phases


# --------------------------------------------------------------------------------------------------
# One rank of one team


def member(args) -> int:
    import torch

    import common
    from recast.tasks.models import loading, parallel
    from recast.tasks.settings import get_settings

    gpus = [int(g) for g in args.gpus.split(",")]
    rank, world = args.rank, len(gpus)
    device = f"cuda:{gpus[rank]}" if args.device == "cuda" else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    results = Path(args.results)
    settings = get_settings()
    for index, spec in enumerate(args.rows.split(",")):
        name, _, variant = spec.partition("+")
        kind = "edit" if name in settings.profiles else "video"
        started = time.perf_counter()
        row: dict = dict(stage=kind, profile=name, gpus=world, card=common.card_name(torch.device(device)),
                         run=json.loads(os.environ.get("BENCHMARK_RUN_RECORD", "null")))
        if variant:
            row["variant"] = variant
        parallel.SPLIT_VAE = variant != "whole-vae"
        try:
            profile = (settings.get_profile(name) if kind == "edit" else settings.get_video_profile(name))
            profile = profile.model_copy(update=_overrides(args, kind, device))
            cfg = (profile.true_cfg_scale or settings.edit.true_cfg_scale) > 1 if kind == "edit" else \
                (profile.guidance_scale or settings.animate.guidance_scale) > 1
            team = parallel.join(rank, world, device, cfg=cfg, master=f"127.0.0.1:{args.port + index}") \
                if world > 1 else None
            call, loaded, decisions = _prepare(kind, profile, args, torch.device(device), rank)
            ready_s = time.perf_counter() - started
            resident = common.reset_peak(torch.device(device))
            times, out = [], None
            for _ in range(1 if kind == "video" and (profile.steps or 0) > 8 else args.runs):
                if team is not None:
                    torch.distributed.barrier()  # every rank starts the call together
                out, seconds = common.timed(call, torch.device(device))
                times.append(seconds)
            row.update(seconds=round(statistics.median(times), 3),
                       runs=[round(t, 3) for t in times], peak_gib=common.peak_gib(torch.device(device)),
                       resident_gib=resident, ready_s=round(ready_s, 1),
                       cfg_degree=team.cfg_degree if team else 1, ulysses_degree=team.ulysses_degree if team else 1,
                       **decisions)
            if rank == 0:
                arr = np.asarray(out)
                row["output_file"] = _save_output(results, f"{spec.replace('+', '-')}-{world}", arr)
                row.update(width=int(arr.shape[-2]), height=int(arr.shape[-3]),
                           num_frames=int(arr.shape[0]) if arr.ndim == 4 else None,
                           finite=bool(np.isfinite(arr.astype(np.float32)).all()))
            del call, loaded
        except Exception as exc:  # noqa: BLE001 - one row's failure must not lose the others
            import traceback

            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        finally:
            common.free(torch.device(device))
            if world > 1:
                parallel.leave()
        if rank == 0:
            with open(results / "rows.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    return 0


def _overrides(args, kind: str, device: str) -> dict:
    update: dict = {"device": device}
    if args.device == "cpu":  # the code path on tiny shapes: no CUDA kernels, no compilation
        update.update(dtype="float32", compile=False, warmup=False, quantize="none")
        if kind == "edit":
            update.update(attention_backend=None, quantize_text_encoder=False, offload_text_encoder=False,
                          output_area=args.res * args.res, vae_image_area=args.res * args.res)
        else:
            update.update(quantize_text_encoder=False)
    elif kind == "edit":
        update.update(output_area=args.res * args.res, vae_image_area=args.res * args.res)
    return update


def _prepare(kind: str, profile, args, device, rank: int):
    """The row's pipeline on this rank: same random weights on every rank, the recipe, warm-up; returns a call."""
    import torch

    from recast.tasks.models import loading

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lora_dir = Path(tempfile.mkdtemp(prefix=f"recast-parallel-{rank}-"))
    if kind == "edit":
        import gpu_edit
        from PIL import Image

        from recast.tasks.models import qwen_edit

        pipe = gpu_edit.build_pipeline(args.tiny, device, dtype, None)
        if profile.lightning is not None:
            fused = gpu_edit.make_random_lora(pipe, lora_dir)
            profile = profile.model_copy(update=dict(lightning=profile.lightning.model_copy(update=dict(
                source=str(fused), weight_name=None, revision=None))))
        decisions = qwen_edit.prepare(pipe, profile)
        loaded = loading.install("edit", profile, pipe, "random")
        qwen_edit.warm_up(loaded, profile)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.res, args.res, 3), dtype=np.uint8))
        steps, cfg = profile.steps or 8, profile.true_cfg_scale if profile.true_cfg_scale is not None else 4.0

        def call():
            return np.asarray(qwen_edit.run_edit(loaded, profile, [image], prompt=gpu_edit.PROMPT, negative_prompt=" ",
                                                 seed=42, steps=steps, true_cfg_scale=cfg, width=args.res,
                                                 height=args.res))
        call()  # at the benchmark's own size
        return call, loaded, decisions

    import gpu_video

    from recast.tasks.models import wan_video
    from recast.tasks.schemas.settings import LoraSpec

    bench = gpu_video.Bench(argparse.Namespace(tiny=args.tiny, smoke=False, device=str(device), weights="random",
                                               steps=40, runs=args.runs))
    pipe = bench.build()
    if profile.lightning is not None:
        high = gpu_video._random_lora(pipe.transformer, lora_dir / "high", 7)
        low = gpu_video._random_lora(pipe.transformer_2, lora_dir / "low", 8)
        profile = profile.model_copy(update=dict(lightning=LoraSpec(source=high.source),
                                                 lightning_2=LoraSpec(source=low.source)))
    decisions = wan_video.prepare(pipe, profile)
    loaded = loading.install("video", profile, pipe, "random")
    if bench.frames == 81 and profile.warmup:
        wan_video.warm_up(loaded, profile)
    fixed = bool((profile.scheduler or {}).get("sigmas"))  # a distilled schedule runs its own steps, no other
    steps = bench.steps(profile) if fixed else (profile.steps or 40)
    if args.tiny and not fixed:
        steps = min(steps, 2)

    def call():
        return bench.call(loaded, profile, steps=steps)
    if not (bench.frames == 81 and profile.warmup):
        call()
    return call, loaded, decisions


# --------------------------------------------------------------------------------------------------
# The launcher


def launch(args) -> int:
    import common

    phases = parse_plan(args.plan)  # a bad plan stops here, before anything is written
    results = Path(args.results or tempfile.mkdtemp(prefix="recast-parallel-"))
    results.mkdir(parents=True, exist_ok=True)
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), versions=common.versions(),
                command=common.recorded_command(sys.argv), weights="random", plan=args.plan)
    print(json.dumps(meta), flush=True)
    # Each row records the call that measured it: a later call on the same --results folder re-reads the earlier
    # rows (for its speed-ups) but must not claim them.
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", BENCHMARK_RUN_RECORD=json.dumps(meta))
    # NVLink multicast stays off on shared hosts (a program that uses it can take the host's GPUs out of service).
    for key, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                       ("NVSHMEM_DISABLE_NVLS", "1")):
        env.setdefault(key, value)
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    rows_file = results / "rows.jsonl"
    rows_before = len(rows_file.read_text().splitlines()) if rows_file.exists() else 0
    for number, phase in enumerate(phases, start=1):
        print(f"[{datetime.now(timezone.utc):%H:%M:%S}] phase {number}: "
              + "; ".join(f"GPUs {gpus}: {', '.join(rows)}" for gpus, rows in phase), flush=True)
        procs = []
        for gpus, rows in phase:
            port = _free_port_block(len(rows))
            for rank in range(len(gpus)):
                command = [sys.executable, str(HERE / "gpu_parallel.py"), "--member", "--gpus",
                           ",".join(map(str, gpus)), "--rank", str(rank), "--rows", ",".join(rows), "--port",
                           str(port), "--results", str(results), "--runs", str(args.runs), "--res", str(args.res),
                           "--device", args.device] + (["--tiny"] if args.tiny else [])
                log = open(results / f"phase{number}-gpus{'_'.join(map(str, gpus))}-rank{rank}.log", "w")
                procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=HERE))
        deadline = time.monotonic() + args.phase_timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                print(f"a rank ran past --phase-timeout ({args.phase_timeout} s) and was killed", flush=True)
        rows = _finish(results, meta, common)  # after every phase: a later phase cut short loses only itself
        if args.out:
            common.write_rows(Path(args.out), rows)
    print(f"\n{'row':18} {'GPUs':>4} {'split':>10} {'seconds':>8} {'speed-up':>8} {'PSNR dB':>8} {'peak GiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['profile']:18} {r['gpus']:4} ERROR {r['error'][:90]}")
            continue
        split = f"cfg{r.get('cfg_degree', 1)}xu{r.get('ulysses_degree', 1)}"
        print(f"{r['profile']:18} {r['gpus']:4} {split:>10} {r['seconds']:8.2f} {r.get('speedup') or 0:8.2f} "
              f"{r.get('psnr_db') if r.get('psnr_db') is not None else '-':>8} {r.get('peak_gib') or 0:8.2f}")
    planned = sum(len(rows) for phase in phases for _, rows in phase)
    written = (len(rows_file.read_text().splitlines()) if rows_file.exists() else 0) - rows_before
    if written < planned:  # a rank that dies before its first row writes nothing: say so, do not pass
        print(f"{planned - written} of the {planned} planned rows wrote nothing: a rank died or was killed "
              f"(see its log in {results})", flush=True)
        return 1
    return 1 if any("error" in r for r in rows) else 0


def _save_output(results: Path, stem: str, arr) -> str:
    """Rank 0's output as <stem>.npy; a second team of the same profile and size (a repeat, e.g. "0:fp8;1:fp8")
    gets <stem>-repeat.npy, so the two processes' outputs can be compared."""
    for name in (f"{stem}.npy", f"{stem}-repeat.npy"):
        try:
            with open(results / name, "xb") as f:  # exclusive: two teams finishing together do not overwrite
                np.save(f, arr)
            return name
        except FileExistsError:
            continue
    raise RuntimeError(f"{stem} ran more than twice in this run; a repeat is compared once")


def _finish(results: Path, meta: dict, common) -> list[dict]:
    """Speed-up over, and PSNR against, the 1-GPU row of the same profile from this run. A repeated 1-GPU row (the
    same profile in another process) is folded into the first as `repeat_seconds` and `repeat_psnr_db`: how far
    two processes on the same weights and seed differ with no parallelism at all, the floor for the multi-GPU
    rows' PSNR."""
    rows = [json.loads(line) for line in (results / "rows.jsonl").read_text().splitlines()] \
        if (results / "rows.jsonl").exists() else []
    repeats = [r for r in rows if str(r.get("output_file", "")).endswith("-repeat.npy")]
    rows = [r for r in rows if r not in repeats]
    for repeat in repeats:
        first = next((r for r in rows if (r["profile"], r["gpus"], r.get("variant")) ==
                      (repeat["profile"], repeat["gpus"], repeat.get("variant"))), None)
        if first is not None and "seconds" in repeat:
            first["repeat_seconds"] = repeat["seconds"]
            first["repeat_psnr_db"] = common.psnr(np.load(results / repeat["output_file"]),
                                                  np.load(results / first["output_file"]))
    one = {r["profile"]: r for r in rows if r["gpus"] == 1 and "seconds" in r and not r.get("variant")}
    for row in rows:
        row["run"] = row.get("run") or meta
        row["table"] = "scale"
        row["parallel"] = f"cfg {row.get('cfg_degree', 1)} x ulysses {row.get('ulysses_degree', 1)}"
        row["label"] = _label(row)
        if row["gpus"] == 1 or "seconds" not in row:
            continue
        base = one.get(row["profile"])
        if base is not None:
            row["one_gpu_seconds"] = base["seconds"]
            row["speedup"] = round(base["seconds"] / row["seconds"], 3)
            ref, out = results / base["output_file"], results / row["output_file"]
            if ref.exists() and out.exists():
                row["psnr_db"] = common.psnr(np.load(out), np.load(ref))
    return rows


def _label(row: dict) -> str:
    """fp8 on 2 GPUs split by CFG reads `fp8-cfg-parallel`; Ulysses adds `-ulysses<N>`."""
    label = row["profile"]
    if row.get("cfg_degree", 1) > 1:
        label += "-cfg-parallel"
    if row.get("ulysses_degree", 1) > 1:
        label += f"-ulysses{row['ulysses_degree']}"
    if row.get("variant"):
        label += f"-{row['variant']}"
    return label


def _free_port_block(count: int) -> int:
    """A base port with `count` free ports above it (one per row: each row's team is a new process group)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count < 65535:
            return base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default="0:fp8,lightning,wan22-lightning,wan22-fp8|0,1:fp8,lightning,wan22-lightning,"
                    "wan22-fp8")
    ap.add_argument("--runs", type=int, default=3, help="timed calls per row (1 for the 40-step video rows)")
    ap.add_argument("--res", type=int, default=1024, help="edit input and output side")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU check of the code path")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default=None, help="merge the rows into this JSON file")
    ap.add_argument("--results", default=None, help="folder for the ranks' logs, rows and outputs")
    ap.add_argument("--phase-timeout", type=float, default=1800.0)
    ap.add_argument("--member", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gpus", default="0", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--rows", default="", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=29600, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        args.res = min(args.res, 128)
    return member(args) if args.member else launch(args)


if __name__ == "__main__":
    sys.exit(main())
