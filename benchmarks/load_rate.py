"""How fast prepared weights reach the card (#22): the loader's shard streaming alone, at full shard size.

A prepared start spent 41-45 s placing 27.7 GiB that lay on tmpfs (H200, docs/PERFORMANCE.md "Cold start"):
0.65 GB/s, while SHA-256 runs at ~1.5 GB/s per thread. This separates the parts: random bf16 shards of the
prepared layout's size (1 GiB, safetensors) are written to `--folder`, then, in one process on one card:

    read+hash-whole  the reader threads alone (read, one SHA-256 per shard: the loader before block hashes)
    read+hash-blocks the same, each shard's 64 MiB blocks hashed on every core as they arrive (the loader now)
    place-pageable   recast.tasks.models.prepared.stream_shards into plain host memory, copied to the card
    place-pinned     the same through its pool of pinned host buffers (the loader's default on a GPU)
    read-verified, place-pinned-verified   the same for shards that verified before on this machine (a restart:
                     prepared.VERIFIED), read and placed without hashing

Each row: GB/s and seconds for the whole set, the process's peak RSS so far, and the most pinned host memory the
row held (torch's allocator rounds each allocation up to a power of two).

    python load_rate.py --folder /dev/shm/rate --gib 8 --results rate.jsonl
    python load_rate.py --folder /tmp/rate --gib 0.05 --shard-mib 8      # the code path on the CPU
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write_shards(folder: Path, gib: float, shard_mib: int) -> dict[str, dict]:
    """Random bf16 shards of ~shard_mib each (tensors of 3072 x 3072, as the edit model's), {name: manifest entry}
    as recast.tasks.models.prepared.write makes it (whole-file and per-block SHA-256)."""
    import torch
    from safetensors.torch import save_file

    from recast.tasks.models import prepared

    folder.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    side = 3072 if shard_mib >= 64 else 256
    per_tensor = side * side * 2
    per_shard = max(1, -(-shard_mib * 2**20 // per_tensor))  # just over the size, as prepared.write closes a shard
    shards = max(1, int(gib * 2**30 // (per_shard * per_tensor)))
    files = {}
    generator = torch.Generator(device=device).manual_seed(0)
    for index in range(shards):
        name = f"weights-{index:05d}.safetensors"
        tensors = {f"block{index}.linear{i}.weight": torch.randn(side, side, generator=generator, device=device,
                                                                  dtype=torch.bfloat16).cpu() for i in range(per_shard)}
        save_file(tensors, str(folder / name))
        digest, blocks = prepared._sha256_file(folder / name)
        files[name] = {"bytes": (folder / name).stat().st_size, "sha256": digest, "blocks": blocks}
    return files


def _pinned_peak_gib() -> float | None:
    """The most pinned host memory torch's allocator has held in this process (its rounded blocks), since the last
    row; None without CUDA."""
    import torch

    if not torch.cuda.is_available() or not hasattr(torch.cuda, "reset_peak_host_memory_stats"):
        return None
    peak = torch.cuda.host_memory_stats().get("allocated_bytes.peak", 0) / 2**30
    torch.cuda.reset_peak_host_memory_stats()
    return round(peak, 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", required=True)
    ap.add_argument("--gib", type=float, default=8.0)
    ap.add_argument("--shard-mib", type=int, default=1024)
    ap.add_argument("--results", default=None)
    ap.add_argument("--threads", default="4", help="reader thread counts to measure, e.g. 4,16")
    args = ap.parse_args()
    import torch

    sys.path.insert(0, str(HERE))
    import common
    from recast.tasks.models import prepared

    folder = Path(args.folder)
    started = time.perf_counter()
    files = write_shards(folder, args.gib, args.shard_mib)
    total = sum((folder / name).stat().st_size for name in files)
    print(f"wrote {len(files)} shards, {total / 2**30:.2f} GiB, in {time.perf_counter() - started:.1f} s", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": common.recorded_command(sys.argv),
           "versions": common.versions()}

    def read_and_hash(whole: bool, verified: bool = False):
        def go() -> None:
            entries = {name: {**{k: v for k, v in entry.items() if not (whole and k == "blocks")},
                              "verified": verified} for name, entry in files.items()}
            with ThreadPoolExecutor(max_workers=prepared.READ_THREADS) as pool:
                list(pool.map(lambda name: prepared._read_shard(folder / name, entries[name]), files))
        return go

    def place(pinned: bool, verified: bool = False):
        def go() -> None:
            kept = []
            entries = {name: dict(entry, verified=verified) for name, entry in files.items()}
            for _, _, tensor in prepared.stream_shards(folder, entries, lambda name: str(device), pinned=pinned):
                kept.append(tensor)
            if device.type == "cuda":
                torch.cuda.synchronize()
            del kept
        return go

    variants = []
    for threads in [int(t) for t in args.threads.split(",")]:
        suffix = "" if threads == 4 else f"@{threads}"
        variants += [(f"read+hash-whole{suffix}", threads, read_and_hash(True)),
                     (f"read+hash-blocks{suffix}", threads, read_and_hash(False)),
                     (f"read-verified{suffix}", threads, read_and_hash(False, verified=True)),
                     (f"place-pageable{suffix}", threads, place(False))]
        if device.type == "cuda":
            variants += [(f"place-pinned{suffix}", threads, place(True)),
                         (f"place-pinned-verified{suffix}", threads, place(True, verified=True))]
    for name, threads, call in variants:
        prepared.READ_THREADS = threads
        began = time.perf_counter()
        call()
        seconds = time.perf_counter() - began
        row = dict(stage="load_rate", profile=name, card=common.card_name(device), gpus=1, gib=round(total / 2**30, 2),
                   shards=len(files), seconds=round(seconds, 2), gb_per_s=round(total / seconds / 1e9, 2),
                   read_threads=prepared.READ_THREADS,
                   host_rss_peak_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                   pinned_gib_peak=_pinned_peak_gib(), run=run)
        common.record(row, args.results, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
