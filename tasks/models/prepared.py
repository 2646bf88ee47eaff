"""Prepared weights: a profile's ready-to-serve tensors, made once and loaded in seconds by every later start.

A worker born cold used to redo the same work at every start: read the whole bf16 checkpoint, fuse the Lightning
LoRA, quantize ~1,000 linears to FP8. `obtain` does that once per (kind, model, revision, recipe, code) and writes
the result; later starts build the pipeline's modules empty (no weights) from the saved configs, give them the
recipe's structure (FP8 layers where the recipe puts them) and fill them straight from the prepared files, which a
thread has been reading to the card meanwhile.

    <cache>/prepared/<kind>-<profile>-<key>/
        manifest.json        the key, the recipe, the versions; every file with its size and SHA-256
        config/              the source's small files: model_index.json, configs, tokenizer, processor, scheduler
        weights/*.safetensors  shards of ~1 GiB: each component's tensors as the recipe left them (FP8 and scales)
        compile/<card>.bin   torch.compile's cache for this card and torch (written after the first warm-up)

The folder is used only when its key matches and every file is there at its size; each shard is checked against its
SHA-256 as it is read (in threads, beside the copies to the card), unless it verified before on this machine and is
still the same file: verified.json records each verified shard's identity (device, inode, size, modification and
change times; any write changes the change time, which no user can set back), and a restart then only reads. A
partial, corrupt or mismatched folder is refused with a one-line reason, removed and made again, never used. It is
written into a staging folder and renamed into place under a lock: two processes preparing the same key end with one
complete folder, and the second uses the first's. Loading goes shard by shard: host RAM never holds a whole model.

Each recipe (qwen_edit, wan_video) provides: `from_source(profile, source)` (from_pretrained and the weight
transforms), `give_structure(pipe, profile)` (the same transforms' module structure, on empty modules), and its
`PREPARED_VERSION`, bumped whenever what its transforms write changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import logging
import mmap
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recast.tasks.settings import cache_dir

log = logging.getLogger("recast.models")

FORMAT = 1  # the folder layout below; bump when it changes
SHARD_BYTES = 2**30  # small shards: a start holds a few in RAM at once, never a whole model
READ_THREADS = 4
# Pinned host memory the loader's read buffers may take. Measured on an H200 host (docs/PERFORMANCE.md): one pinned
# buffer per reader, each the size of the largest shard (the text encoder's 2 GiB token table), made a start's host
# RSS 10.2 GiB, over the 8 GiB a worker may use; buffers of the typical shard's size, within this budget, keep it
# below while most shards still go to the card by DMA (a larger one is read into plain memory).
PINNED_POOL_BYTES = 4 * 2**30
# Each shard's SHA-256 per block as well as whole, so a start verifies the blocks on every core at once: one thread's
# SHA-256 of a whole shard ran at ~0.3-0.5 GB/s on an H200 host's CPU, slower than the rest of the load.
BLOCK_BYTES = 64 * 2**20
# A shard that no pinned buffer takes (a token table: the edit folder's 2.1-GiB shard) is read a block at a time
# straight into its place, through this many block buffers (hashed while the next blocks are read): read whole into
# plain memory, it added its size to a start's host RSS beside the pinned pool (#22: a worker may use 8 GiB).
BLOCK_BUFFERS = 4
OUTSIZED_OVER_MEDIAN = 1.25  # a shard this much over the median size takes no pinned buffer (pinned_pool)
# What of a profile decides the tensors (placement, kernels, sizes and defaults do not).
RECIPE_FIELDS = ("model_id", "revision", "dtype", "quantize", "quantize_text_encoder", "lightning", "lightning_2")
_CODE = ("precision.py", "lora.py", "prepared.py")  # the code that makes or reads the tensors


class NotPrepared(Exception):
    """The prepared folder cannot be used: missing, partial, corrupt or made for another recipe (the reason)."""


@dataclass
class Obtained:
    pipe: Any
    prepared: bool  # loaded from prepared weights (False: made from the source now)
    folder: Path | None
    seconds: float
    source: str | None = None  # the source it was made from (None: loaded from prepared weights)
    parts: dict = field(default_factory=dict)  # seconds of a prepared load's parts (cold-start rows show them)


# --------------------------------------------------------------------------------------------------
# Where, and for what


def _code_hash(names=_CODE) -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0" + (here / name).read_bytes())
    return digest.hexdigest()[:16]


def _library_version(name: str) -> str:
    """An installed library's version from its metadata: importing diffusers and transformers to ask them took ~6 s
    of an H200 host's restart, before any weight could be read (the modules are imported later, while it reads)."""
    from importlib import metadata

    return metadata.version(name)


def recipe_of(kind: str, profile) -> dict:
    import torch

    from recast.tasks.models import tiny

    if kind == "edit":
        from recast.tasks.models import qwen_edit as recipe_module
    else:
        from recast.tasks.models import wan_video as recipe_module
    fields = {name: getattr(profile, name) for name in RECIPE_FIELDS if hasattr(profile, name)}
    fields = {name: value.model_dump() if hasattr(value, "model_dump") else value for name, value in fields.items()}
    if profile.model_id in tiny.BUILDERS:  # a tiny model's bytes are its builder's version
        fields["tiny_build"] = tiny.BUILDERS[profile.model_id][0]
    return {"format": FORMAT, "kind": kind, **fields, "recipe_version": recipe_module.PREPARED_VERSION,
            "code": _code_hash(),
            # Module layouts can change between releases of the libraries that define them.
            "libraries": {"torch": ".".join(torch.__version__.split(".")[:2]),
                          "diffusers": _library_version("diffusers"), "transformers": _library_version("transformers")}}


def key_of(kind: str, profile) -> str:
    return hashlib.sha256(json.dumps(recipe_of(kind, profile), sort_keys=True).encode()).hexdigest()[:16]


def folder_of(kind: str, profile) -> Path:
    return cache_dir() / "prepared" / f"{kind}-{profile.name}-{key_of(kind, profile)}"


def available(kind: str, profile) -> bool:
    """A prepared folder for this recipe is there and complete by its manifest (the cheap check; shards are
    verified as they are read)."""
    try:
        _check_manifest(folder_of(kind, profile), key_of(kind, profile))
        return True
    except NotPrepared:
        return False


# --------------------------------------------------------------------------------------------------
# Obtaining a pipeline: prepared weights, or made from the source (and prepared for next time)


def obtain(kind: str, profile, source_of, recipe, prepare: bool = True, beside=None) -> Obtained:
    """The pipeline with the recipe's weights, not yet placed: from prepared weights when they are there and
    verify, else made from the source (source_of() gives it) and written for the next start; with `prepare`
    False, from the source and nothing else. `beside()` is called once a prepared load's structure is built,
    while its weights are still being read."""
    started = time.perf_counter()
    if not prepare:  # the profile says: the source every time
        source = source_of()
        return Obtained(recipe.from_source(profile, source), False, None, time.perf_counter() - started, source)
    folder = folder_of(kind, profile)
    key = key_of(kind, profile)
    # The key's recipe imports diffusers, transformers and both recipes: in a fresh process most of this is imports
    parts: dict = {"key": round(time.perf_counter() - started, 2)}
    try:
        return Obtained(load(folder, key, profile, recipe, parts, beside), True, folder,
                        time.perf_counter() - started, parts=parts)
    except NotPrepared as why:
        if folder.exists():
            log.warning("prepared weights %s refused: %s; making them again", folder.name, why)
    with _lock(folder):
        try:  # another process may have finished them while this one waited
            return Obtained(load(folder, key, profile, recipe, parts, beside), True, folder,
                            time.perf_counter() - started, parts=parts)
        except NotPrepared:
            shutil.rmtree(folder, ignore_errors=True)
        source = source_of()
        pipe = recipe.from_source(profile, source)
        write(folder, kind, profile, pipe, source)
    return Obtained(pipe, False, folder, time.perf_counter() - started, source)


def ensure(kind: str, profile, source_of, recipe) -> tuple[Path, bool]:
    """`recast prepare`: the prepared folder for this recipe, verified file by file (SHA-256), or made from the
    source when it is missing or does not verify; (folder, whether it was made now). Nothing is placed on a card
    beyond what the recipe's transforms need."""
    folder, key = folder_of(kind, profile), key_of(kind, profile)
    with _lock(folder):
        try:
            manifest = _check_manifest(folder, key)
            with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="recast-prepared") as pool:
                names = list(manifest["files"])
                identities = _identities(folder, names)
                for name, (digest, _) in zip(names, pool.map(lambda n: _sha256_file(folder / n), names)):
                    if digest != manifest["files"][name]["sha256"]:
                        raise NotPrepared(f"{name} does not match its SHA-256 (corrupt)")
            _record_verified(folder, identities)
            return folder, False
        except NotPrepared as why:
            if folder.exists():
                log.warning("prepared weights %s refused: %s; making them again", folder.name, why)
            shutil.rmtree(folder, ignore_errors=True)
        source = source_of()
        write(folder, kind, profile, recipe.from_source(profile, source), source)
    return folder, True


@contextlib.contextmanager
def _lock(folder: Path):
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the kernel if this process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# Writing


def _tensors_of(module) -> list[tuple[str, Any]]:
    """Every parameter and buffer of a module, persistent or not, tied names included (the recipe's exact
    tensors: a non-persistent buffer such as a rotary table is kept in the dtype the source load left it)."""
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


def write(folder: Path, kind: str, profile, pipe, source: str) -> None:
    """Write the prepared folder for `pipe` (its recipe applied) atomically: staged, then renamed into place."""
    from safetensors.torch import save_file

    staging = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.part"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "weights").mkdir(parents=True)
    _save_configs(staging / "config", pipe)
    files, aliases = {}, {}
    import torch

    for component, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        shard, shard_bytes, index = {}, 0, 0
        seen: dict[int, str] = {}

        def flush():
            nonlocal shard, shard_bytes, index
            if shard:
                name = f"weights/{component}-{index:05d}.safetensors"
                save_file(shard, str(staging / name), metadata={"component": component})
                files[name] = None
                shard, shard_bytes, index = {}, 0, index + 1

        for name, tensor in _tensors_of(module):
            if tensor.device.type == "meta":
                raise RuntimeError(f"{component}.{name} has no data (meta): the recipe left it unloaded")
            if id(tensor) in seen:  # tied weights (one tensor, two names): stored once
                aliases[f"{component}.{name}"] = f"{component}.{seen[id(tensor)]}"
                continue
            seen[id(tensor)] = name
            shard[name] = tensor.detach().contiguous()
            shard_bytes += tensor.numel() * tensor.element_size()
            if shard_bytes >= SHARD_BYTES:
                flush()
        flush()
    paths = sorted(p for p in staging.rglob("*") if p.is_file())
    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="recast-prepared") as pool:
        digests = list(pool.map(_sha256_file, paths))  # also on disk (fsync) before the folder is renamed in
    entries = {path.relative_to(staging).as_posix(): {"bytes": path.stat().st_size, "sha256": digest,
                                                      **({"blocks": blocks} if len(blocks) > 1 else {})}
               for path, (digest, blocks) in zip(paths, digests)}
    manifest = {"key": key_of(kind, profile), "recipe": recipe_of(kind, profile), "profile": profile.name,
                "source": source if not Path(source).is_dir() else f"folder {Path(source).name}",
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": entries,
                "aliases": aliases, "weights_bytes": sum(e["bytes"] for n, e in entries.items()
                                                         if n.startswith("weights/"))}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    try:
        os.rename(staging, folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process put a folder there first
        if not (folder / "manifest.json").exists():
            raise
    else:  # hashed above from the files on disk: the next start need not hash them again
        _record_verified(folder, _identities(folder, entries))
    log.info("prepared %s %s: %.2f GiB in %s", kind, profile.name, manifest["weights_bytes"] / 2**30, folder)


def _save_configs(target: Path, pipe) -> None:
    """The source's small files (everything but weights), so a prepared folder loads without its source: written
    by the pipeline itself (save_pretrained of the non-module parts and every module's config)."""
    import torch

    target.mkdir(parents=True)
    pipe.save_config(target)  # model_index.json
    for name, component in pipe.components.items():
        if component is None:
            continue
        sub = target / name
        if isinstance(component, torch.nn.Module):
            sub.mkdir()
            config = getattr(component, "config", None)
            if hasattr(component, "save_config"):  # diffusers model
                component.save_config(sub)
            elif config is not None and hasattr(config, "save_pretrained"):  # transformers model
                config.save_pretrained(sub)
            if getattr(component, "generation_config", None) is not None:
                component.generation_config.save_pretrained(sub)
        elif hasattr(component, "save_pretrained"):  # tokenizer, processor, scheduler
            component.save_pretrained(sub)


def _sha256_file(path: Path) -> tuple[str, list[str]]:
    """The file's SHA-256 and its BLOCK_BYTES blocks' (one pass), once it is on disk (fsync): the folder is renamed
    into place only after that."""
    digest, blocks = hashlib.sha256(), []
    with open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            digest.update(block)
            blocks.append(hashlib.sha256(block).hexdigest())
        os.fsync(f.fileno())
    return digest.hexdigest(), blocks


# --------------------------------------------------------------------------------------------------
# Loading


def _check_manifest(folder: Path, key: str) -> dict:
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise NotPrepared("no prepared folder" if not folder.exists() else "no manifest.json (partial folder)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        raise NotPrepared("manifest.json is not JSON") from None
    if manifest.get("key") != key:
        raise NotPrepared(f"made for another recipe (key {manifest.get('key')}, this one {key})")
    for name, entry in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise NotPrepared(f"{name} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise NotPrepared(f"{name} is {path.stat().st_size} bytes, the manifest says {entry['bytes']} "
                              "(truncated or changed)")
    return manifest


_DTYPES = {"F8_E4M3": "float8_e4m3fn", "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
           "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool"}


_HASHERS: ThreadPoolExecutor | None = None


def _hashers() -> ThreadPoolExecutor:
    global _HASHERS
    if _HASHERS is None:
        _HASHERS = ThreadPoolExecutor(max_workers=os.cpu_count() or 4, thread_name_prefix="recast-sha256")
    return _HASHERS


def _sha256_of(data, head: bytes = b"") -> str:
    digest = hashlib.sha256(head)  # head: the header's bytes, when a block's tensor bytes were read apart from them
    digest.update(data)
    return digest.hexdigest()


VERIFIED = "verified.json"


def _identity(path: Path) -> list[int]:
    """What says a file is still the one that verified: a write to it changes its change time."""
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _identities(folder: Path, names) -> dict[str, list[int]]:
    """The weight shards' identities among `names` (paths in the folder)."""
    return {name: _identity(folder / name) for name in names if name.startswith("weights/")}


def _verified(folder: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((folder / VERIFIED).read_text())
    return {}


def _record_verified(folder: Path, identities: dict[str, list[int]]) -> None:
    """Remember that these files verified, as they were when read (best effort: a read-only folder verifies again).
    Not a file changed in the last second: the kernel stamps change times from a clock that ticks every few ms, so
    a write in the same tick as the one before would leave the identity as it was; a second later it cannot."""
    settled = time.time_ns() - 10**9
    identities = {name: identity for name, identity in identities.items() if identity[4] < settled}
    if not identities:
        return
    try:
        recorded = {**_verified(folder), **identities}
        temporary = folder / f".{VERIFIED}.{uuid.uuid4().hex[:8]}"
        temporary.write_text(json.dumps(recorded))
        os.replace(temporary, folder / VERIFIED)
    except OSError as exc:
        log.debug("could not record the verified shards in %s: %s", folder, exc)


def _hashes_to_take(entry: dict) -> tuple[list | None, Any]:
    """(the manifest's block hashes to compare, or None; a whole-file SHA-256 to fill as the bytes are read, or None)
    for a shard: neither for one that verified before on this machine (`verified`), its blocks' where the manifest
    has them, else the whole file's."""
    if entry.get("verified"):
        return None, None
    blocks = entry.get("blocks")
    return blocks, None if blocks else hashlib.sha256()


def _refuse_unless_matching(path: Path, entry: dict, blocks: list | None, digests: list, whole) -> None:
    """NotPrepared when the bytes read are not the ones the manifest recorded (the hashes `_hashes_to_take` chose)."""
    if (blocks and digests != blocks) or (whole is not None and whole.hexdigest() != entry["sha256"]):
        raise NotPrepared(f"{path.parent.name}/{path.name} does not match its SHA-256 (corrupt)")


def _read_shard(path: Path, entry: dict, buffer=None):
    """(header, bytes, offset of the first tensor) of a safetensors file, checked against its manifest entry on the
    bytes read: block by block on every core as the blocks arrive (hashlib frees the GIL), or whole for a folder
    written without block hashes; not at all for an entry marked `verified` (the same file verified before).
    Read into `buffer` (a host tensor of at least the file's size) when given."""
    size = path.stat().st_size
    data = bytearray(size) if buffer is None else buffer.numpy()
    view = memoryview(data)[:size]
    blocks, whole = _hashes_to_take(entry)
    checks = []
    with open(path, "rb", buffering=0) as f:
        for start in range(0, size, BLOCK_BYTES):
            end = min(size, start + BLOCK_BYTES)
            _read_into(f, view[start:end], path)
            if blocks:
                checks.append(_hashers().submit(_sha256_of, view[start:end]))
    if whole is not None:
        whole.update(view)
    _refuse_unless_matching(path, entry, blocks, [future.result() for future in checks], whole)
    header_size = int.from_bytes(view[:8], "little")
    header = json.loads(bytes(view[8:8 + header_size]))
    header.pop("__metadata__", None)
    return header, data, 8 + header_size


def host_rss_peak_gib() -> float | None:
    """This process's peak resident memory so far (Linux reports it in KiB), None where it cannot be read."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def _read_into(f, view: memoryview, path: Path) -> None:
    """Fill `view` from the open file (a read may return less than asked)."""
    read = 0
    while read < len(view):
        got = f.readinto(view[read:])
        if not got:
            raise NotPrepared(f"{path.name} ended early")
        read += got


def _read_header(f, path: Path, size: int) -> tuple[dict, int]:
    """(header, offset of the first tensor) of an open safetensors file of `size` bytes, read on its own (a few
    KiB; before the file is hashed, so a corrupt length is refused rather than read)."""
    head = f.read(8)
    header_size = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 <= header_size <= size - 8:
        raise NotPrepared(f"{path.parent.name}/{path.name} has no safetensors header (corrupt or truncated)")
    raw = f.read(header_size)
    if len(raw) != header_size:
        raise NotPrepared(f"{path.name} ended early")
    try:
        header = json.loads(raw)
    except ValueError:
        raise NotPrepared(f"{path.parent.name}/{path.name} has no safetensors header (corrupt)") from None
    header.pop("__metadata__", None)
    return header, 8 + header_size


def _read_shard_to(path: Path, entry: dict, device, staging: list | None = None):
    """(header, the bytes after the header as one uint8 tensor on `device`) of a shard read block by block into
    that tensor: host memory holds BLOCK_BUFFERS blocks of it, never the whole shard. Checked against its manifest
    entry as `_read_shard` checks (each block hashed on the pool while the next ones are read). `staging`: pinned
    host tensors of BLOCK_BYTES to read the blocks into, so that each block goes to the card by DMA while the next
    one is read; without, blocks of plain memory, each copied before the next is read."""
    import torch

    size = path.stat().st_size
    blocks, whole = _hashes_to_take(entry)
    count = -(-size // BLOCK_BYTES)
    buffers = staging or [torch.frombuffer(bytearray(min(BLOCK_BYTES, size)), dtype=torch.uint8)
                          for _ in range(min(BLOCK_BUFFERS, count))]
    dma = staging is not None and torch.device(device).type == "cuda"
    hashing: dict[int, Any] = {}  # block index -> its SHA-256 being computed (its buffer is not reused before)
    copying: dict[int, Any] = {}  # block index -> the event of its copy to the card (the same)
    digests = []
    try:
        with open(path, "rb", buffering=0) as f:
            header, offset = _read_header(f, path, size)
            placed = torch.empty(size - offset, dtype=torch.uint8, device=device)
            f.seek(0)
            for index in range(count):
                start, end = index * BLOCK_BYTES, min(size, (index + 1) * BLOCK_BYTES)
                if index - len(buffers) in hashing:
                    digests.append(hashing.pop(index - len(buffers)).result())
                if index - len(buffers) in copying:
                    copying.pop(index - len(buffers)).synchronize()
                buffer = buffers[index % len(buffers)][:end - start]
                view = memoryview(buffer.numpy())
                _read_into(f, view, path)
                if blocks:
                    hashing[index] = _hashers().submit(_sha256_of, view)
                elif whole is not None:
                    whole.update(view)
                if end > offset:  # the header's own bytes stay in the file
                    first = max(start, offset)
                    # from plain memory the copy is done on return; from a pinned block it is DMA, waited for (its
                    # event) before the block is read into again
                    placed[first - offset:end - offset].copy_(buffer[first - start:], non_blocking=dma)
                    if dma:
                        copying[index] = torch.cuda.Event()
                        copying[index].record(torch.cuda.current_stream(device))
        digests += [hashing.pop(index).result() for index in sorted(hashing)]
    finally:  # (also when the read fails) nothing may still read a block when its ring goes to the next shard
        for future in hashing.values():
            future.exception()
        for event in copying.values():
            event.synchronize()
    _refuse_unless_matching(path, entry, blocks, digests, whole)
    return header, placed


class _HostWeights(mmap.mmap):
    """Host memory of its own for a shard whose device is the host: a private anonymous mapping of exactly the shard's
    size (page-aligned; torch's pinned allocator would round it up to a power of two), pinned in place
    (cudaHostRegister) where a card is, and unpinned before it is unmapped."""

    registered: int | None = None  # its address while pinned

    def __del__(self):
        if self.registered is not None:
            with contextlib.suppress(Exception):  # at interpreter exit, torch may be gone before it
                import torch

                torch.cuda.cudart().cudaHostUnregister(self.registered)
            self.registered = None


_CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every device's context, not only the calling thread's current one
_PIN_REFUSED = False  # the driver refused once (said once)


def _pin_in_place(mapping: _HostWeights, address: int) -> bool:
    """Pin `mapping` in place where a card is (False where none is, or the driver refused: said once)."""
    import torch

    if not torch.cuda.is_available():
        return False
    error = int(torch.cuda.cudart().cudaHostRegister(address, len(mapping), _CUDA_HOST_REGISTER_PORTABLE))
    if error:
        global _PIN_REFUSED
        if not _PIN_REFUSED:
            _PIN_REFUSED = True
            log.warning("could not pin host-kept weights in place (cudaHostRegister error %d): streaming copies them "
                        "to pinned memory instead, which takes that much host RAM again", error)
        return False
    mapping.registered = address
    return True


def _read_shard_to_host(path: Path, entry: dict):
    """(header, {tensor name: tensor}) of a shard whose device is the host (weights a card streams, `offload`; a CPU
    profile's): read straight into one mapping of its own (`_HostWeights`: no staging copy, no second copy), pinned
    there where a card is, each tensor a view of it. Streaming then finds every tensor pinned already; before, each
    was read into plain memory and group offloading pinned a copy of it: two copies of the weights at once (a
    `wan22-offload` start peaked at 66.3 GiB of host RSS for 36.5 GiB of weights, #22 asks <= 48), and 31 s of its
    73-s start spent copying. Checked against its manifest entry as `_read_shard_to` checks (each block hashed on the
    pool while the next is read)."""
    import torch

    size = path.stat().st_size
    blocks, whole = _hashes_to_take(entry)
    hashing = []
    with open(path, "rb", buffering=0) as f:
        header, offset = _read_header(f, path, size)
        f.seek(0)
        head = f.read(offset)
        if whole is not None:
            whole.update(head)
        mapping = _HostWeights(-1, max(size - offset, 1), flags=mmap.MAP_PRIVATE)
        if hasattr(mmap, "MADV_HUGEPAGE"):  # fewer page faults for GiBs read in, fewer pages to pin
            mapping.madvise(mmap.MADV_HUGEPAGE)
        body = torch.frombuffer(mapping, dtype=torch.uint8)[:size - offset]  # keeps the mapping alive
        view = memoryview(body.numpy())
        for index in range(-(-size // BLOCK_BYTES)):
            start, end = index * BLOCK_BYTES, min(size, (index + 1) * BLOCK_BYTES)
            part = view[max(start, offset) - offset:max(end, offset) - offset]  # the block's bytes past the header
            _read_into(f, part, path)
            if blocks:  # a block's hash covers the header's bytes in it too
                hashing.append(_hashers().submit(_sha256_of, part, head[start:end] if start < offset else b""))
            elif whole is not None:
                whole.update(part)
        del view
    _refuse_unless_matching(path, entry, blocks, [future.result() for future in hashing], whole)
    _pin_in_place(mapping, body.data_ptr())
    return header, dict(_tensor_views(header, body))


def _tensor_views(header: dict, body, copy: bool = False):
    """(name, tensor) of a shard's bytes (a uint8 tensor, the header left out), each a view of them (safetensors lays
    every tensor out at an offset its element size divides; a copy where one does not), or with `copy` each copied
    into an allocation of its own."""
    import torch

    for name, spec in header.items():
        begin, end = spec["data_offsets"]
        dtype = getattr(torch, _DTYPES[spec["dtype"]])
        data = body[begin:end].clone() if copy else body[begin:end]
        try:
            yield name, data.view(dtype).reshape(spec["shape"])
        except RuntimeError:  # misaligned for its dtype
            yield name, data.clone().view(dtype).reshape(spec["shape"])


def _shard_tensors(header: dict, placed):
    """(name, tensor) of a shard as `placed_shards` gave it: the host tensors, or cut from the shard's bytes on its
    device, each copied into an allocation of its own (aligned; the shard's buffer is freed or reused once they
    are)."""
    if isinstance(placed, dict):
        yield from placed.items()
        return
    yield from _tensor_views(header, placed, copy=True)


def pinned_pool(shard_sizes: list[int]) -> tuple[int, int]:
    """(bytes per pinned read buffer, how many) for shards of these sizes: buffers that take every shard but the
    outsized ones (over 1.25 times the median: a token table; those are read a block at a time), one per reader,
    all of them within PINNED_POOL_BYTES (none when one buffer alone exceeds it). Not the median itself: prepared
    shards close just over SHARD_BYTES, so half of them were a little larger than the median and went through
    pageable memory (an H200 start placed 27.7 GiB at 1.9 GB/s where pinned reads ran at 9.7). Not twice it: the
    Wan folder's UMT5 token table (1.96 GiB, alone in its shard) then sized the buffers, and only two fitted the
    budget, where shards of ~1.05 GiB take three (a `wan22-lightning` start read at 3.3 GB/s, the edit's at 4.7)."""
    median = sorted(shard_sizes)[len(shard_sizes) // 2]
    buffer_bytes = max(size for size in shard_sizes if size <= OUTSIZED_OVER_MEDIAN * median)
    return buffer_bytes, min(READ_THREADS, len(shard_sizes), PINNED_POOL_BYTES // max(buffer_bytes, 1))


def _pinned_buffers(buffer_bytes: int, count: int) -> list:
    """The pool's read buffers as views of ONE pinned allocation. torch's pinned-memory allocator rounds every
    allocation up to a power of two: a buffer per reader for shards just over 1 GiB (as prepared shards are) took
    2 GiB each, 6 GiB pinned for a 4 GiB pool (a start's host RSS peak 11.3 GiB, measured on an H200 host). One
    allocation of count x buffer_bytes <= PINNED_POOL_BYTES rounds up to at most that power of two."""
    import torch

    if not count:
        return []
    pool = torch.empty(count * buffer_bytes, dtype=torch.uint8, pin_memory=True)
    return [pool[i * buffer_bytes:(i + 1) * buffer_bytes] for i in range(count)]


def _release_pinned() -> None:
    """Give the pool's pinned pages back to the system once a load is done: torch keeps freed pinned blocks cached
    for reuse, which would hold the pool's GiB resident for the worker's whole life."""
    import torch

    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None and torch.cuda.is_available():
        empty()


def _staging_rings(count: int) -> list[list]:
    """`count` rings of BLOCK_BUFFERS pinned blocks (BLOCK_BYTES each) for block reads, as views of ONE pinned
    allocation (a power of two at the defaults: 4 x 4 x 64 MiB = 1 GiB, which torch's rounding leaves as it is)."""
    import torch

    pool = torch.empty(count * BLOCK_BUFFERS * BLOCK_BYTES, dtype=torch.uint8, pin_memory=True)
    blocks = [pool[i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES] for i in range(count * BLOCK_BUFFERS)]
    return [blocks[i * BLOCK_BUFFERS:(i + 1) * BLOCK_BUFFERS] for i in range(count)]


def placed_shards(folder: Path, files: dict[str, dict], device_of, pinned: bool | None = None,
                  reads: str | None = None, host_in_place: bool = True):
    """Every shard of `files` ({name: manifest entry}, in order) on its device (`device_of(shard name)`), as (shard,
    header, placed): for a card, the shard's tensor bytes there in ONE copy (a uint8 tensor; `_shard_tensors` cuts
    the tensors from it), for the host, its tensors (or its bytes as one uint8 tensor, for a shard read a block at a
    time). At most READ_THREADS shards are read ahead of the one being placed, so host RAM holds a few GiB, never a
    model. With `pinned` (the default when any shard goes to a GPU) the shards are read into a fixed pool of pinned
    host buffers: the copy to the card is then DMA at the bus's rate instead of a pageable copy through the driver's
    bounce buffer, and the pages are faulted in once, not once per shard; a shard that no buffer takes is read a
    block at a time straight into its place. `reads` (default: the `prepared_reads` setting): "blocks" reads every
    shard that way, through rings of pinned blocks (1 GiB pinned in all, against the pool's 4), each
    block's copy overlapping the next block's read. A shard whose device is the host (weights a card streams, or a
    CPU profile's) is read straight into memory of its own, its tensors views of it, pinned in place where a card is
    (`_read_shard_to_host`); `host_in_place=False` treats the host as a card's stand-in (tests of the card's reads
    on a machine without one)."""
    import queue

    import torch

    names = list(files)
    if pinned is None:
        pinned = torch.cuda.is_available() and any(torch.device(device_of(n)).type == "cuda" for n in names)
    if reads is None:
        from recast.tasks.settings import get_settings

        reads = get_settings().prepared_reads
    sizes = {n: (folder / n).stat().st_size for n in names}
    free, buffer, buffer_bytes, reads_ahead, rings = None, None, 0, {}, None
    if pinned and names and reads == "blocks":
        rings = queue.SimpleQueue()
        for ring in _staging_rings(READ_THREADS):
            rings.put(ring)
    elif pinned and names:
        buffer_bytes, count = pinned_pool(list(sizes.values()))
        free = _pinned_buffers(buffer_bytes, count) or None

    def through_a_ring(path: Path, entry: dict, device):
        ring = rings.get()  # one ring per reader thread: never waited for
        try:
            return _read_shard_to(path, entry, device, ring)
        finally:
            rings.put(ring)

    try:
        with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="recast-prepared") as pool:
            for index, name in enumerate(names):
                for ahead in names[index:index + READ_THREADS]:
                    fits = free is not None and sizes[ahead] <= buffer_bytes
                    kept_on_host = host_in_place and torch.device(device_of(ahead)).type == "cpu"
                    if ahead in reads_ahead or (fits and not free and not kept_on_host):
                        continue
                    if kept_on_host:
                        reads_ahead[ahead] = (pool.submit(_read_shard_to_host, folder / ahead, files[ahead]), None)
                    elif rings is not None:
                        reads_ahead[ahead] = (pool.submit(through_a_ring, folder / ahead, files[ahead],
                                                          torch.device(device_of(ahead))), None)
                    elif fits:
                        buffer = free.pop()
                        reads_ahead[ahead] = (pool.submit(_read_shard, folder / ahead, files[ahead], buffer), buffer)
                    else:  # no pinned buffer takes it (or there are none): a block at a time into its place
                        reads_ahead[ahead] = (pool.submit(_read_shard_to, folder / ahead, files[ahead],
                                                          torch.device(device_of(ahead))), None)
                future, buffer = reads_ahead.pop(name)
                result = future.result()  # raises NotPrepared for a corrupt shard
                if buffer is None:  # read into its place already
                    header, placed = result
                    yield name, header, placed
                    continue
                header, _, offset = result  # in a pinned buffer, which the next shards reuse
                host, device = buffer[offset:sizes[name]], torch.device(device_of(name))
                if device.type == "cuda":
                    placed = host.to(device, non_blocking=True)
                    torch.cuda.current_stream(device).synchronize()  # the copy out of it is done
                else:
                    placed = dict(_shard_tensors(header, host))  # each tensor copied out of it
                free.append(buffer)
                yield name, header, placed
    finally:
        if free is not None or rings is not None:
            free = buffer = reads_ahead = rings = None  # the pinned pools' views dropped, so that their block is free
            _release_pinned()


def stream_shards(folder: Path, files: dict[str, dict], device_of, pinned: bool | None = None,
                  reads: str | None = None, host_in_place: bool = True):
    """Every tensor of these shards on its device, as (shard, tensor name, tensor): `placed_shards`, tensor by
    tensor."""
    for name, header, placed in placed_shards(folder, files, device_of, pinned, reads, host_in_place):
        for tensor_name, tensor in _shard_tensors(header, placed):
            yield name, tensor_name, tensor
        del placed


class _Reader:
    """`placed_shards` on a thread of its own, started before the pipeline's modules exist: the reads and the
    copies to the card need only the manifest, so they run while the structure is built (imports, configs, empty
    modules: CPU work that held them back by 4-10 s of an H200 host's restart). What it placed waits in a queue;
    the GPU memory it holds is the model's own (its shards), never more."""

    _DONE = object()

    def __init__(self, folder: Path, files: dict[str, dict], device_of):
        import queue
        import threading

        self.seconds = 0.0
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(folder, files, device_of), daemon=True,
                                        name="recast-prepared-reader")
        self._thread.start()

    def _run(self, folder, files, device_of) -> None:
        started = time.perf_counter()
        shards = placed_shards(folder, files, device_of)
        try:
            for item in shards:
                if self._stop.is_set():
                    break
                self._queue.put(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self._queue.put(exc)
        finally:
            shards.close()  # the pinned pool given back
            self.seconds = time.perf_counter() - started
            self._queue.put(self._DONE)

    def __iter__(self):
        while (item := self._queue.get()) is not self._DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop reading (the load failed or ended) and drop what was placed but not taken."""
        self._stop.set()
        self._thread.join()
        while not self._queue.empty():
            self._queue.get_nowait()


def skeleton(config: Path, dtype, parts: dict | None = None):
    """The pipeline of the prepared folder's configs: tokenizer, processor and scheduler loaded, every torch
    module built empty (meta parameters; real buffers, as their constructors compute them). `parts` receives the
    seconds of its steps: the imports of the classes the configs name, the empty modules, the pipeline's own
    loading (tokenizer, processor, scheduler)."""
    parts = {} if parts is None else parts
    started = time.perf_counter()
    import torch
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights

    import diffusers

    diffusers.utils.logging.disable_progress_bar()  # per-component bars are noise in a worker's log
    index = json.loads((config / "model_index.json").read_text())
    pipeline_class = getattr(importlib.import_module("diffusers"), index["_class_name"])
    classes = {name: getattr(importlib.import_module(spec[0]), spec[1]) for name, spec in index.items()
               if not name.startswith("_") and isinstance(spec, list) and spec[0] is not None}
    # Timed apart: in a new process most of the structure's time is these imports (a process forked from one that
    # has them, recast.flows.respawn, skips them)
    parts["structure_imports"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    modules = {}
    for name, cls in classes.items():
        library = index[name][0]
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            continue
        # No initialization either: on meta tensors torch runs its init functions as Python decompositions (~0.6 s
        # here for the edit model's ~2,400 layers, several times that on an H200 host's slower cores), for values
        # the prepared tensors replace.
        with init_empty_weights(include_buffers=False), no_init_weights():
            if library == "diffusers":
                module = cls.from_config(cls.load_config(config / name))
            else:
                from transformers import AutoConfig

                module = cls._from_config(AutoConfig.from_pretrained(config / name), dtype=dtype)
        # No cast: the parameters are meta until the prepared tensors (in the recipe's dtypes) replace them, and the
        # buffers are replaced by the saved ones too.
        modules[name] = module.eval().requires_grad_(False)
    parts["structure_modules"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    pipe = pipeline_class.from_pretrained(config, dtype=dtype, **modules)
    parts["structure_pipeline"] = round(time.perf_counter() - started, 2)
    return pipe


def load(folder: Path, key: str, profile, recipe, parts: dict | None = None, beside=None):
    """The pipeline from a prepared folder: its structure from the configs and the recipe, its tensors from the
    shards (checked by SHA-256 as they are read, a few in flight at once); raises NotPrepared when it cannot.
    The shards are read, verified and copied to their devices on a thread while the structure is built. `parts`
    receives the seconds of each step: structure (with the imports it needs), read (the reader's own time, beside
    the structure), weights (after the structure: waiting for the reads, cutting the tensors), checks. `beside()`
    is called when the structure is built, before waiting for the reads."""
    import torch

    parts = {} if parts is None else parts
    started = time.perf_counter()

    from recast.tasks.models.loading import torch_dtype

    manifest = _check_manifest(folder, key)
    shards = sorted(name for name in manifest["files"] if name.startswith("weights/"))

    def component_of(shard: str) -> str:
        return shard.removeprefix("weights/").rsplit("-", 1)[0]

    # Taken before reading: a file that changes while it is read is not recorded as the one that verified
    identities, verified = _identities(folder, shards), _verified(folder)
    files = {name: dict(manifest["files"][name], verified=verified.get(name) == identities[name]) for name in shards}
    reader = _Reader(folder, files, lambda shard: recipe.load_device(profile, component_of(shard)))
    try:
        pipe = skeleton(folder / "config", torch_dtype(profile.dtype), parts)
        recipe_started = time.perf_counter()
        recipe.give_structure(pipe, profile)
        parts["structure_recipe"] = round(time.perf_counter() - recipe_started, 2)
        components = {name: module for name, module in pipe.components.items()
                      if isinstance(module, torch.nn.Module)}
        for shard in shards:
            if component_of(shard) not in components:
                raise NotPrepared(f"{shard} belongs to no component of this pipeline")
        parts["structure"] = round(time.perf_counter() - started, 2)
        parts["host_rss_peak_gib"] = {"structure": host_rss_peak_gib()}  # which phase sets a start's peak
        started = time.perf_counter()
        if beside is not None:
            beside()
        for name, header, placed in reader:
            component = component_of(name)
            for tensor_name, tensor in _shard_tensors(header, placed):
                try:
                    _set_tensor(components[component], tensor_name, tensor)
                except AttributeError:
                    raise NotPrepared(f"{name} holds {tensor_name}, which this recipe's {component} does not have") \
                        from None
            del placed
    finally:
        reader.close()
    parts["read"] = round(reader.seconds, 2)  # the reader's own time, most of it beside the structure's
    parts["weights"] = round(time.perf_counter() - started, 2)
    parts["host_rss_peak_gib"]["weights"] = host_rss_peak_gib()
    hashed = [name for name, entry in files.items() if not entry["verified"]]
    parts["hashed_gib"] = round(sum(files[name]["bytes"] for name in hashed) / 2**30, 3)
    if hashed:
        _record_verified(folder, {name: identities[name] for name in hashed})
    started = time.perf_counter()
    for alias, original in manifest.get("aliases", {}).items():
        alias_component, _, alias_name = alias.partition(".")
        _, _, original_name = original.partition(".")
        module = components[alias_component]
        _set_tensor(module, alias_name, _get_tensor(module, original_name))
    for component, module in components.items():
        empty = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()]
                 if tensor.device.type == "meta"]
        if empty:
            raise NotPrepared(f"{component} has no prepared tensor for {empty[0]} (and {len(empty) - 1} more)")
    parts["checks"] = round(time.perf_counter() - started, 2)
    log.info("loaded prepared %s (%.2f GiB)", folder.name, manifest["weights_bytes"] / 2**30)
    return pipe


def _get_tensor(module, name: str):
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


def _set_tensor(module, name: str, tensor) -> None:
    """Put `tensor` where `name` is in `module`: a parameter stays a parameter, a buffer a buffer (AttributeError
    when the module has no such tensor)."""
    import torch

    owner, _, attr = name.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    if attr not in target._parameters and attr not in target._buffers:
        raise AttributeError(name)
    if attr in target._parameters:
        target._parameters[attr] = tensor if isinstance(tensor, torch.nn.Parameter) else \
            torch.nn.Parameter(tensor, requires_grad=False)
    else:
        target._buffers[attr] = tensor


# --------------------------------------------------------------------------------------------------
# torch.compile's cache, beside the weights


def compile_cache_path(kind: str, profile) -> Path:
    import torch

    card = torch.cuda.get_device_name(torch.device(profile.device)) if profile.device.startswith("cuda") \
        and torch.cuda.is_available() else "cpu"
    safe = "".join(c if c.isalnum() else "-" for c in card)
    return folder_of(kind, profile) / "compile" / f"{safe}-torch{torch.__version__.split('+')[0]}.bin"


# recast's code that a compiled block runs (attention processors and dispatch, RoPE, LoRA branches, FP8 linears):
# compiled code keeps what that code did when it was traced, so a change to it must not load older code.
_BLOCK_CODE = {"edit": ("kernels.py", "lora.py", "precision.py", "qwen_edit.py"),
               "video": ("kernels.py", "lora.py", "precision.py", "wan_video.py")}


def compiled_blocks_path(kind: str, profile) -> Path | None:
    """Where the blocks compiled ahead of time for this recipe, card, torch and recast's block code are kept
    (kernels.BlocksAheadOfTime): beside the compile cache, in a prepared folder that is complete; None when there
    is none to keep them in. Older ones (other code) are removed when a new one is written."""
    if not (folder_of(kind, profile) / "manifest.json").is_file():
        return None
    cache = compile_cache_path(kind, profile)
    return cache.with_name(f"{cache.stem}-{_code_hash(_BLOCK_CODE[kind])}.blocks")


def load_compile_cache(kind: str, profile) -> bool:
    """Load torch.compile's saved artifacts for this recipe and card (before anything compiles); True if found."""
    import torch

    path = compile_cache_path(kind, profile)
    if not path.is_file():
        return False
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
        return True
    except Exception as exc:  # noqa: BLE001 - a stale cache costs a compile, never a failure
        log.warning("compile cache %s not loaded (%s): compiling", path.name, exc)
        return False


def save_compile_cache(kind: str, profile) -> Path | None:
    """After a warm-up that compiled: keep torch.compile's artifacts beside the prepared weights (atomically)."""
    import torch

    folder = folder_of(kind, profile)
    if not (folder / "manifest.json").is_file():
        return None
    try:
        saved = torch.compiler.save_cache_artifacts()
    except Exception as exc:  # noqa: BLE001 - a cache not kept costs the next start a compile, nothing more
        log.warning("torch.compile's cache not kept: %s", exc)
        return None
    if not saved:
        return None
    path = compile_cache_path(kind, profile)
    path.parent.mkdir(exist_ok=True)
    staging = path.with_suffix(f".{uuid.uuid4().hex[:8]}.part")
    staging.write_bytes(saved[0])
    os.replace(staging, path)
    return path


class CompiledEarly:
    """torch.compile's cache and the blocks' code compiled ahead of time, loaded on a thread while a prepared load
    waits for its weights (`start`, given to obtain as `beside`): in a respawn on an H200 the reads outlasted the
    structure by 2.6 s, and the code then took 4 s to load after them. Nothing compiles before `cache_loaded()`
    returns; kernels.BlocksAheadOfTime takes the code read here. Not started (no prepared folder yet, compile off):
    the cache is loaded in turn, as before."""

    def __init__(self, kind: str, profile):
        self.kind, self.profile = kind, profile
        self.future = self.artifact = None
        self.misses = 0  # inductor's cache misses while the thread read the blocks' code

    def start(self) -> None:
        import threading
        from concurrent.futures import Future

        from recast.tasks.models import kernels

        if self.future is not None or not self.profile.compile:
            return
        artifact = compiled_blocks_path(self.kind, self.profile) if self.profile.compile_ahead_of_time else None
        blocks = None
        if artifact is not None and artifact.is_file():
            self.artifact, blocks = artifact, Future()
            kernels.read_early(artifact, blocks)
        self.future = Future()
        # A thread of its own: the shared pool may be busy hashing the very shards the main thread waits for.
        threading.Thread(target=self._run, args=(blocks,), name="recast-compiled-early", daemon=True).start()

    def _run(self, blocks) -> None:
        try:
            self.future.set_result(self._load(self.artifact, blocks))
        except BaseException as exc:  # noqa: BLE001 - given to whoever waits (the placement waits on both)
            if blocks is not None and not blocks.done():
                blocks.set_exception(exc)
            self.future.set_exception(exc)

    def _load(self, artifact, blocks) -> bool:
        import torch

        from recast.tasks.models import kernels

        device = torch.device(self.profile.device)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            loaded = load_compile_cache(self.kind, self.profile)  # first: the blocks' code finds its kernels there
            if blocks is not None:
                misses = inductor_cache_counts()[1]
                try:
                    blocks.set_result(kernels.read_compiled_blocks(artifact))
                except BaseException as exc:  # noqa: BLE001 - BlocksAheadOfTime reads it again itself
                    blocks.set_exception(exc)
                # kernels the cache lacked, rebuilt while reading the code: the cache is to be saved again
                self.misses = inductor_cache_counts()[1] - misses
        return loaded

    def cache_loaded(self) -> bool:
        """Whether torch.compile's cache was found and loaded (waiting for the thread, or loading it now)."""
        if self.future is None:
            return bool(self.profile.compile) and load_compile_cache(self.kind, self.profile)
        try:
            return self.future.result()
        except Exception as exc:  # noqa: BLE001 - as load_compile_cache: a cache not loaded costs a compile
            log.warning("compile cache not loaded (%s): compiling", exc)
            return False

    def forget(self) -> None:
        """After the placement: code read here that no blocks took (they compiled in the process) is let go."""
        from recast.tasks.models import kernels

        if self.artifact is not None:
            kernels.taken_early(self.artifact, wait=False)


def inductor_cache_counts() -> tuple[int, int]:
    """(FX-graph cache hits, misses) of inductor in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_hit"]), int(counters["inductor"]["fxgraph_cache_miss"])


def compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process so far (a request after ready should add none)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
