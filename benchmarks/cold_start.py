"""Cold start (#22): how long a worker takes from process start to ready, and to its first result.

Every row starts a fresh process (`cold_start.py start ...`) that loads the profile(s) through recast's own loader,
exactly as `recast worker` does, then makes one full-size request (an edit at 1024x1024, a 480p 81-frame clip),
and reports, from the moment its parent started it:

    ready_s              process start -> every pipeline loaded, placed and warmed up (what a worker waits for)
    first_result_s       process start -> the first request's result
    first_request_s      the first request alone; compiled_in_first_request: graphs dynamo compiled in it (0 = warm)
    host_rss_peak_gib    the process's peak resident memory; gpu_peak_gib: torch's peak on the card
    bytes_read_gib       what the process read from storage (/proc/self/io read_bytes: 0 when from the page cache)
    imports_top_s        the packages whose imports took longest, cumulative seconds each (python -X importtime:
                         what a new process's start spends before the weights matter)
    weights_gib          the size of the weight files it loaded (checkpoint or prepared folder)

Scenarios (`variant` in docs/performance.json), in this order, on the same card:

    hub               the hub-layout checkpoint (save_pretrained of full-size random weights), nothing prepared,
                      empty compile caches: a first start on a new node, preparing included
    prepared          prepared weights, empty compile caches (no torch.compile artifacts, fresh inductor folder)
    prepared+compile  prepared weights with torch.compile's artifacts beside them, a fresh inductor folder: a new
                      node whose image holds both
    restart           the same again on the same node: page cache and inductor folder warm, and the shards the
                      last start verified not hashed again (prepared.VERIFIED; `parts.hashed_gib` says what was)
    respawn           a restart as `recast worker` makes one after its serving process died (recast.flows.respawn):
                      forked from a parent that imported the libraries; timed from the fork (`imports_s` ~0)

`scenario@shards` (e.g. `restart@shards`) is the scenario with `prepared_reads: shards`: every shard read to the card
whole through a 4-GiB pool of pinned buffers instead of in 64-MiB blocks through 1 GiB (`@blocks`: the default).
`scenario@no-readahead` starts without reading ahead what the last start read (`start_readahead: false`;
recast.tasks.models.readahead): a new node's scenarios with and without it show what the readahead pays.

Before hub, prepared and prepared+compile every weight file is evicted from the page cache (posix_fadvise
DONTNEED; /proc/sys/vm/drop_caches is tried too); `bytes_read_gib` shows whether the eviction took. A file on a
tmpfs cannot be evicted (tmpfs is memory): the row says where its weights lay (`weights_at`).

    python cold_start.py --rows lightning,fp8 --hub /dev/shm/hub --work /root/work --out ../docs/performance.json
    python cold_start.py --tiny --rows tiny --work /tmp/cs     # the code path on the CPU, in seconds

Video rows start from prepared weights made from random full-size weights (`make-prepared`): the Wan 2.2 hub
layout (68 GB) does not fit the disk beside the edit model's; `both` is the worker that serves both stages.
`wan22-offload` has `wan22-lightning`'s key (placement is not part of the recipe) but a folder of its own (each
profile's folder keeps its own compile caches: another 36.5 GiB) and keeps its blocks in pinned host RAM: its
`host_rss_peak_gib` is what the host must hold (#22: at most 48 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

T0 = time.time()  # as early as possible: `start` measures from its parent's launch time (--t0)
HERE = Path(__file__).resolve().parent
ROWS = {"lightning": ("edit",), "fp8": ("edit",), "wan22-lightning": ("video",), "wan22-offload": ("video",),
        "both": ("edit", "video"), "tiny": ("edit", "video")}
PROFILES = {"lightning": ("lightning", None), "fp8": ("fp8", None), "wan22-lightning": (None, "wan22-lightning"),
            "wan22-offload": (None, "wan22-offload"), "both": ("lightning", "wan22-lightning"),
            "tiny": ("tiny", "tiny")}
GIB = 2**30
SCENARIOS = ("hub", "prepared", "prepared+compile", "restart", "respawn")


# --------------------------------------------------------------------------------------------------
# Random weights: a hub-layout checkpoint, stand-in LoRA files, prepared weights made from them


EDIT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     "img_mlp.net.2", "txt_mlp.net.2")
WAN_LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                    "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def random_lora(transformer, targets: tuple[str, ...], path: Path, seed: int, rank: int = 16) -> None:
    """A random diffusers-format LoRA over every block of a (meta) transformer, as large as a real distillation
    LoRA of that model: lora_A (rank, in) and lora_B (out, rank) for each target layer."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(targets) and (".blocks." in f".{name}"
                                                                               or "transformer_blocks." in name):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator,
                                                                       dtype=torch.bfloat16) * 0.02
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator,
                                                                       dtype=torch.bfloat16) * 0.02
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def lora_env(work: Path, tiny: bool) -> dict[str, str]:
    """Stand-in Lightning LoRA files (the hub is unreachable) for the full-size models, made once under `work`,
    named through RECAST_* so the profiles' keys and the workers' settings agree; the environment that names them."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel, WanTransformer3DModel

    sys.path.insert(0, str(HERE))
    import gpu_edit
    import gpu_video

    edit_lora = work / "loras" / "edit" / "pytorch_lora_weights.safetensors"
    high, low = (work / "loras" / name / "pytorch_lora_weights.safetensors" for name in ("high", "low"))
    with init_empty_weights():
        if not edit_lora.exists():
            config = gpu_edit.TINY["transformer"] if tiny else gpu_edit.FULL_TRANSFORMER
            random_lora(QwenImageTransformer2DModel(**config), EDIT_LORA_TARGETS, edit_lora, seed=4)
        for seed, path in enumerate((high, low), start=7):
            if not path.exists():
                random_lora(WanTransformer3DModel(**(gpu_video.TINY_WAN if tiny else gpu_video.WAN)),
                            WAN_LORA_TARGETS, path, seed=seed)
    env = {}
    for name, path in (("PROFILES__LIGHTNING__LIGHTNING", edit_lora),
                       ("VIDEO_PROFILES__WAN22_LIGHTNING__LIGHTNING", high),
                       ("VIDEO_PROFILES__WAN22_LIGHTNING__LIGHTNING_2", low)):
        env.update({f"RECAST_{name}__SOURCE": str(path), f"RECAST_{name}__WEIGHT_NAME": "null",
                    f"RECAST_{name}__REVISION": "null"})
    return env


def write_hub(kind: str, folder: Path, tiny: bool) -> float:
    """Full-size random weights of the edit model saved in the hub layout (save_pretrained); GiB written."""
    import torch

    sys.path.insert(0, str(HERE))
    import gpu_edit

    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    if kind != "edit":
        raise ValueError("only the edit model is written in the hub layout (see the module's docstring)")
    pipe = gpu_edit.build_pipeline(tiny, device, torch.bfloat16 if not tiny else torch.float32, None)
    shutil.rmtree(folder, ignore_errors=True)
    pipe.save_pretrained(folder, safe_serialization=True, max_shard_size="5GB")
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / GIB, 2)


def make_prepared(kind: str, profile_name: str, tiny: bool) -> dict:
    """Prepared weights for a profile from full-size random weights (no hub layout), through the recipe's own
    transform_weights and prepared.ensure: what `recast prepare` writes from a real checkpoint."""
    import torch

    sys.path.insert(0, str(HERE))
    from recast.tasks.models import prepared, qwen_edit, wan_video
    from recast.tasks.settings import get_settings

    settings = get_settings()
    profile = settings.get_profile(profile_name) if kind == "edit" else settings.get_video_profile(profile_name)
    recipe = qwen_edit if kind == "edit" else wan_video
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")

    class RandomSource:  # the recipe, with random full-size weights standing in for from_pretrained
        @staticmethod
        def from_source(profile, source):
            import gpu_edit
            import gpu_video

            if kind == "edit":  # built in host RAM, as from_pretrained loads it; quantized block by block on the card
                pipe = gpu_edit.build_pipeline(tiny, torch.device("cpu"), torch.bfloat16 if not tiny else torch.float32,
                                               None, rng_device=device)
            else:
                pipe = gpu_video.Bench(argparse.Namespace(tiny=tiny, smoke=False, weights="random", device=str(device),
                                                          references=None)).build()
            recipe.transform_weights(pipe, profile)
            return pipe

    started = time.perf_counter()
    folder, made = prepared.ensure(kind, profile, lambda: "random full-size weights", RandomSource)
    return {"kind": kind, "profile": profile_name, "folder": str(folder), "made": made,
            "seconds": round(time.perf_counter() - started, 1),
            "gib": round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / GIB, 2)}


# --------------------------------------------------------------------------------------------------
# One fresh process: load, serve one request


def start(args) -> None:
    """The measured process: recast's loader for each stage, then one request per stage."""
    from recast.flows import respawn
    from recast.tasks.models import readahead

    reads = readahead.start()  # as `recast worker`, first
    if args.respawn:
        respawn.keep_cuda_forkable()  # as `recast worker`, before the imports below
    import torch

    from recast.tasks.models import loading, prepared, qwen_edit, wan_video
    from recast.tasks.settings import get_settings

    t0 = args.t0 or T0
    settings = get_settings()
    kinds = args.kinds.split(",")
    if args.respawn:  # `recast worker`'s parent and serving process (recast.flows.respawn): the first one dies as
        # soon as it serves, and the row is the one started again, timed from its fork
        pairs = [(kind, settings.get_profile(args.profile) if kind == "edit" else
                  settings.get_video_profile(args.video_profile)) for kind in kinds]
        respawn.supervise(lambda: loading.import_ahead(pairs), respawns=1,
                          uses_cuda=any(profile.device.startswith("cuda") for _, profile in pairs))
        if respawn.forked_at is None:
            raise SystemExit("the worker's parent did not fork (its line above says why)")
        if respawn.generation == 0:
            respawn.serving()
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = respawn.forked_at
    imported = time.time()
    loaded = {}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if "edit" in kinds:
        loaded["edit"] = loading.get_pipeline("edit", settings.get_profile(args.profile))[0]
    if "video" in kinds:
        loaded["video"] = loading.get_pipeline("video", settings.get_video_profile(args.video_profile))[0]
    ready = time.time() - t0
    graphs = prepared.compiled_graphs()
    request_started = time.time()
    if "edit" in loaded:
        from PIL import Image

        profile = settings.get_profile(args.profile)
        side = 64 if args.tiny else 1024
        qwen_edit.run_edit(loaded["edit"], profile, [Image.new("RGB", (side, side), (120, 110, 100))],
                           prompt="James Bond 007, wearing a tuxedo", negative_prompt=" ", seed=1,
                           steps=profile.steps or 8, true_cfg_scale=profile.true_cfg_scale or 4.0, width=side,
                           height=side)
    if "video" in loaded:
        from PIL import Image

        profile = settings.get_video_profile(args.video_profile)
        width, height, frames = (48, 32, 5) if args.tiny else (832, 480, 81)
        wan_video.run_video(loaded["video"], Image.new("RGB", (width, height), (120, 90, 60)), prompt="he smiles",
                            negative_prompt="", seed=3, steps=profile.steps or 4, guidance_scale=profile.guidance_scale
                            or 1.0, num_frames=frames, width=width, height=height,
                            max_sequence_length=profile.max_sequence_length)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    done = time.time()
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines()) \
        if Path("/proc/self/io").exists() else {}
    print("RESULT " + json.dumps({
        "ready_s": round(ready, 2), "first_result_s": round(done - t0, 2),
        "first_request_s": round(done - request_started, 3),
        "compiled_in_first_request": prepared.compiled_graphs() - graphs,
        "cold_start_s": {k: round(v.cold_start_s, 2) for k, v in loaded.items()},
        "phases": {k: v.phases for k, v in loaded.items()},
        "imports_s": round(imported - t0, 2), "prepared_reads": settings.prepared_reads,
        "readahead": {"files": reads.files, "gib": round(reads.gib, 2), "skipped": reads.skipped,
                      "done": reads.done.is_set()},
        "prepared": {k: v.prepared for k, v in loaded.items()},
        "compile_cache": {k: v.compile_cache for k, v in loaded.items()},
        "sources": {k: v.source for k, v in loaded.items()},
        "host_rss_peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if torch.cuda.is_available() else None,
        "bytes_read_gib": round(int(io.get("read_bytes", 0)) / GIB, 2),
        "compile_time_s": compile_time_split()}), flush=True)


def compile_time_split() -> dict:
    """Where torch.compile's time in this process went (dynamo's own per-phase totals, seconds >= 0.1): which part
    of a warm-up a cache did not spare."""
    from torch._dynamo.utils import compilation_time_metrics

    totals = {name: round(sum(times), 2) for name, times in compilation_time_metrics.items()}
    return {name: total for name, total in sorted(totals.items(), key=lambda kv: -kv[1]) if total >= 0.1}


# --------------------------------------------------------------------------------------------------
# The parent: scenarios, eviction, rows


def evict(paths: list[Path]) -> str:
    """Drop these files from the page cache; what was done."""
    done = []
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        done.append("drop_caches")
    except OSError:
        pass
    count = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            count += 1
        except OSError:
            pass
    return "+".join(done + [f"fadvise({count} files)"])


def filesystem_of(path: Path) -> str:
    """tmpfs or disk: where a folder's files lie (the longest mount point that holds it)."""
    best, kind = "", "disk"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype = line.split()[:3]
        if str(path.resolve()).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
            best, kind = mount, "tmpfs" if fstype == "tmpfs" else "disk"
    return kind


def run_start(env: dict, kinds: tuple[str, ...], row: str, tiny: bool, log: Path, timeout: float,
              respawn: bool = False) -> dict:
    edit_profile, video_profile = PROFILES[row]
    command = [sys.executable, str(HERE / "cold_start.py"), "start", "--kinds", ",".join(kinds)]
    command += ["--profile", edit_profile] if "edit" in kinds else []
    command += ["--video-profile", video_profile] if "video" in kinds else []
    command += ["--tiny"] if tiny else []
    command += ["--respawn"] if respawn else []
    with tempfile.TemporaryFile("w+") as errors:
        try:
            proc = subprocess.run(command + ["--t0", str(time.time())], env=dict(env, PYTHONPROFILEIMPORTTIME="1"),
                                  stdout=subprocess.PIPE, stderr=errors, text=True, timeout=timeout)
        finally:
            errors.seek(0)
            imports, others = _import_times(errors)
            with open(log, "a") as out:
                out.writelines(others)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{row}: the start failed ({proc.returncode}); see {log}")
    # a respawned process imports nothing: what it would list is its parent's
    return dict(json.loads(line.removeprefix("RESULT ")), imports_top_s={} if respawn else imports)


def _import_times(lines, top: int = 8) -> tuple[dict[str, float], list[str]]:
    """({package: cumulative seconds} of the `top` slowest, the lines that are not -X importtime's) of a process's
    stderr: each import made outside another import (the first level) counted under its top package."""
    seconds: dict[str, float] = {}
    others = []
    for line in lines:
        if not line.startswith("import time:"):
            others.append(line)
            continue
        fields = line.split("|")
        if len(fields) != 3 or not fields[1].strip().isdigit():
            continue  # the header line
        name = fields[2].rstrip("\n")
        if name.startswith(" ") and not name.startswith("  "):  # the first level
            package = name.strip().split(".")[0]
            seconds[package] = seconds.get(package, 0.0) + int(fields[1]) / 1e6
    slowest = sorted(seconds.items(), key=lambda item: -item[1])[:top]
    return {package: round(s, 2) for package, s in slowest}, others


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode")
    one = sub.add_parser("start", help="(internal) one measured process")
    one.add_argument("--kinds", required=True)
    one.add_argument("--profile")
    one.add_argument("--video-profile", dest="video_profile")
    one.add_argument("--t0", type=float, default=None)
    one.add_argument("--tiny", action="store_true")
    one.add_argument("--respawn", action="store_true")
    prep = sub.add_parser("make-prepared", help="prepared weights from random full-size weights")
    prep.add_argument("--kind", required=True, choices=["edit", "video"])
    prep.add_argument("--profile", required=True)
    prep.add_argument("--work", required=True)
    prep.add_argument("--tiny", action="store_true")
    ap.add_argument("--rows", default="lightning,fp8")
    ap.add_argument("--scenarios", default="hub,prepared,prepared+compile,restart")
    ap.add_argument("--hub", default=None, help="folder for the edit model's hub-layout checkpoint")
    ap.add_argument("--work", required=False, help="model cache, inductor folders, logs")
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU: the code path, not the numbers")
    ap.add_argument("--out", default=None, help="merge the rows into this docs/performance.json")
    ap.add_argument("--results", default=None, help="also write each row here as it ends (JSON lines)")
    ap.add_argument("--timeout", type=float, default=420.0, help="seconds a start may take")
    ap.add_argument("--drop-after", action="store_true", help="remove each row's prepared weights once its "
                    "scenarios are measured (a disk too small for two profiles' weights)")
    args = ap.parse_args()
    from typing import get_args

    from recast.tasks.schemas.settings import Settings

    read_modes = get_args(Settings.model_fields["prepared_reads"].annotation)  # the setting's own choices
    for variant in (args.scenarios or "").split(",") if args.mode is None else []:
        scenario, _, option = variant.partition("@")
        if scenario not in SCENARIOS or option not in ("", *read_modes, "no-readahead"):
            ap.error(f"--scenarios: {variant!r} is not a scenario: use {', '.join(SCENARIOS)}, each optionally "
                     f"@{' or @'.join(read_modes)} or @no-readahead")
    if args.mode == "start":
        start(args)
        return 0
    if args.mode == "make-prepared":
        os.environ.update(lora_env(Path(args.work), args.tiny))
        print("PREPARED " + json.dumps(make_prepared(args.kind, args.profile, args.tiny)), flush=True)
        return 0
    return parent(args)


def parent(args) -> int:
    import torch

    sys.path.insert(0, str(HERE))
    import common

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    log = work / "cold_start.log"
    env = dict(os.environ, RECAST_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1", **lora_env(work, args.tiny))
    if args.tiny:
        env.update(RECAST_VIDEO_PROFILE="tiny")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    card = common.card_name(device)
    rows = []
    run = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": common.recorded_command(sys.argv), "versions": common.versions()}
    for row in args.rows.split(","):
        kinds = ROWS[row]
        row_env = dict(env)
        hub = None
        if "edit" in kinds and args.hub and row not in ("both",):
            hub = Path(args.hub)
            if not (hub / "model_index.json").exists():
                written = write_hub("edit", hub, args.tiny)
                print(f"hub layout: {written} GiB in {hub} ({filesystem_of(hub)})", flush=True)
            edit_name = PROFILES[row][0]
            row_env[f"RECAST_PROFILES__{edit_name.upper().replace('-', '_')}__MODEL_ID"] = str(hub)
        for variant in args.scenarios.split(","):
            # `restart@shards`: with prepared_reads: shards; `prepared+compile@no-readahead`: start_readahead off
            scenario, _, option = variant.partition("@")
            reads = "" if option == "no-readahead" else option
            if scenario == "hub" and hub is None:
                continue  # the video model is prepared from random weights (module docstring)
            started = time.perf_counter()
            folders = _prepared_folders(row_env, kinds, row, args.tiny)
            if scenario == "hub":
                for folder in folders:
                    shutil.rmtree(folder, ignore_errors=True)
            elif not all(Path(f, "manifest.json").exists() for f in folders):
                for kind, (edit_name, video_name) in zip(kinds, [PROFILES[row]] * len(kinds)):
                    _make_prepared_process(row_env, kind, edit_name if kind == "edit" else video_name, work,
                                           args.tiny, log)
            if scenario in ("hub", "prepared"):
                for folder in folders:
                    shutil.rmtree(Path(folder) / "compile", ignore_errors=True)
            restart = scenario in ("restart", "respawn")
            if not restart:  # a new node has verified nothing: every shard is hashed as it is read
                for folder in folders:
                    Path(folder, "verified.json").unlink(missing_ok=True)
            if not restart:  # a fresh node: nothing compiled yet in its inductor and triton folders
                inductor = work / f"inductor-{row}-{scenario}"
                shutil.rmtree(inductor, ignore_errors=True)
                row_env.update(TORCHINDUCTOR_CACHE_DIR=str(inductor), TRITON_CACHE_DIR=str(inductor / "triton"))
            weights = [p for folder in folders for p in Path(folder).rglob("*.safetensors")] if scenario != "hub" \
                else list(hub.rglob("*.safetensors"))
            evicted = evict(weights) if not restart else "none (a restart: page cache warm)"
            start_env = dict(row_env, RECAST_PREPARED_READS=reads) if reads else dict(row_env)
            if option == "no-readahead":
                start_env["RECAST_START_READAHEAD"] = "false"
            result = run_start(start_env, kinds, row, args.tiny, log, args.timeout, respawn=scenario == "respawn")
            place = filesystem_of(hub if scenario == "hub" else cache)
            measured = dict(
                stage="cold_start", profile=row, variant=variant, card=card, gpus=1, **result,
                weights_gib=round(sum(p.stat().st_size for p in weights) / GIB, 2), weights_at=place,
                page_cache=evicted, seconds=result["ready_s"], run=run,
                wall_s=round(time.perf_counter() - started, 1))
            rows.append(measured)
            common.record(measured, args.results, args.out)
        if args.drop_after:
            for folder in _prepared_folders(row_env, kinds, row, args.tiny):
                shutil.rmtree(folder, ignore_errors=True)
    return 0


def _prepared_folders(env: dict, kinds, row: str, tiny: bool) -> list[str]:
    """The prepared folders this row's profiles use, as the child's settings see them."""
    code = ("import json, sys; from recast.tasks.models import prepared; from recast.tasks.settings import "
            "get_settings; s = get_settings(); kinds, e, v = sys.argv[1].split(','), sys.argv[2], sys.argv[3]; "
            "print(json.dumps([str(prepared.folder_of(k, s.get_profile(e) if k == 'edit' else "
            "s.get_video_profile(v))) for k in kinds]))")
    edit_name, video_name = PROFILES[row]
    out = subprocess.run([sys.executable, "-c", code, ",".join(kinds), edit_name or "", video_name or ""], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _make_prepared_process(env: dict, kind: str, profile: str, work: Path, tiny: bool, log: Path) -> None:
    command = [sys.executable, str(HERE / "cold_start.py"), "make-prepared", "--kind", kind, "--profile", profile,
               "--work", str(work)] + (["--tiny"] if tiny else [])
    with open(log, "a") as out:
        proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=out, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"make-prepared {kind} {profile} failed; see {log}")
    print(proc.stdout.strip(), flush=True)


if __name__ == "__main__":
    sys.exit(main())
