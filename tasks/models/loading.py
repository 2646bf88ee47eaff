"""The only code that loads models: profile -> source -> from_pretrained, one cache per process, one memory policy.

A worker process loads its pipeline once (minutes for the real models) and every later task in that process
reuses it. The cache is keyed by (kind, profile, model, revision, dtype, device) and guarded by a lock, so two
tasks arriving together never load twice. What a profile does to the loaded weights (precision, placement,
compilation, warm-up) is its recipe's business: `qwen_edit` for edits, `wan_video` for clips.

GPU memory policy, for a process that serves both stages (the inline photo-to-clip chain, or one worker for
both): before a pipeline is loaded onto a device, its expected need (the profile's measured `memory_gib`) is
compared with what the device has free. When it fits, every loaded pipeline stays resident (FP8 edit + FP8 Wan
share an 80 GB card). When it does not, the idle pipelines on that device are released for real (references
dropped, compiled graphs reset, gc, the CUDA cache emptied) before the new one loads, so two profiles never
both sit on the card by accident.

A worker serves only the profiles it was started with (`serve_only`): a job for another profile is refused
with a clear error instead of loading a second model behind its operator's back.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from recast.tasks.errors import ModelUnavailable, Permanent
from recast.tasks.schemas.settings import ModelProfile, VideoProfile

log = logging.getLogger("recast.models")

Kind = Literal["edit", "video"]
GIB = 2**30


@dataclass(frozen=True)
class PipelineKey:
    kind: str
    profile: str
    model_id: str
    revision: str | None
    dtype: str
    device: str
    recipe: str  # a hash of the whole profile: the same name with other settings is another pipeline

    @classmethod
    def of(cls, kind: str, profile: ModelProfile | VideoProfile) -> PipelineKey:
        recipe = hashlib.sha256(profile.model_dump_json().encode()).hexdigest()[:12]
        return cls(kind, profile.name, profile.model_id, profile.revision, profile.dtype, profile.device, recipe)


@dataclass
class LoadedPipeline:
    key: PipelineKey
    pipe: Any
    source: str
    cold_start_s: float
    # Pipelines are not thread-safe: one call at a time per loaded pipeline.
    call_lock: threading.Lock = field(default_factory=threading.Lock)
    calls: int = 0
    adapters: dict = field(default_factory=dict)  # request LoRAs loaded into this pipeline (lora.use_loras)
    resident_gib: float = 0.0  # device memory the loaded pipeline holds (measured after loading)
    compiled: bool = False
    prepared: bool | None = None  # loaded from prepared weights (None: not through the loader, e.g. a benchmark)
    compile_cache: str | None = None  # "hit" (nothing compiled at start), "miss", None: the profile compiles nothing
    # Where the cold start went (seconds): load (weights read, transformed, placed), compile_cache (artifacts
    # loaded), warm_up (the warm-up calls, compiling when the cache missed)
    phases: dict = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)
    preloaded: bool = False  # loaded ahead of its first job (preload): that job still reports the load as its own


class ProfileNotServed(Permanent, RuntimeError):
    """A job asked a worker for a profile it was not started with."""


_CACHE: dict[PipelineKey, LoadedPipeline] = {}
_CACHE_LOCK = threading.RLock()
_SERVED: set[tuple[str, str]] | None = None  # None: any profile (CLI, tests); else (kind, profile name) pairs


def serve_only(pairs: set[tuple[str, str]] | None) -> None:
    """Restrict this process to these (kind, profile) pairs (a worker's start); None lifts the restriction."""
    global _SERVED
    _SERVED = None if pairs is None else set(pairs)


def cached_pipelines() -> list[LoadedPipeline]:
    with _CACHE_LOCK:
        return list(_CACHE.values())


def clear_cache() -> None:
    """Release every loaded pipeline (tests, benchmarks between rows)."""
    with _CACHE_LOCK:
        for loaded in list(_CACHE.values()):
            _release(loaded)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_device(profile: ModelProfile | VideoProfile) -> None:
    import torch

    if profile.device.startswith("cuda") and not torch.cuda.is_available():
        option = "--profile" if isinstance(profile, ModelProfile) else "--video-profile"
        raise ModelUnavailable(
            f"profile '{profile.name}' runs on {profile.device}, but torch sees no CUDA GPU here; "
            f"use {option} tiny on this machine, or run the job on a GPU worker")


def describe_device(profile: ModelProfile | VideoProfile) -> str:
    import torch

    if profile.device.startswith("cuda") and torch.cuda.is_available():
        return f"{profile.device} ({torch.cuda.get_device_name(torch.device(profile.device))})"
    return profile.device


# --------------------------------------------------------------------------------------------------
# Where the weights come from


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout_s)
        return True
    except urllib.error.HTTPError:
        return True  # the hub answered, even if with an error status
    except (OSError, ValueError):
        return False


def resolve_source(profile: ModelProfile | VideoProfile, build: bool = True) -> str:
    """A folder or hub id that from_pretrained can load; fails in seconds when it cannot. A tiny model is built
    into the cache unless `build` is False (it can always be built: its folder is returned as it will be)."""
    from recast.tasks.models import tiny

    if profile.model_id in tiny.BUILDERS:
        return str(tiny.ensure(profile.model_id) if build else tiny.folder(profile.model_id))
    if Path(profile.model_id).expanduser().is_dir():
        return str(Path(profile.model_id).expanduser())
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(profile.model_id, "model_index.json", revision=profile.revision)
    if isinstance(cached, str):
        return profile.model_id
    where = f"{profile.model_id}@{profile.revision or 'main'}"
    if constants.HF_HUB_OFFLINE or not _hub_reachable():
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"the hub ({constants.ENDPOINT}) is unreachable"
        section = "PROFILES" if isinstance(profile, ModelProfile) else "VIDEO_PROFILES"
        raise ModelUnavailable(
            f"model {where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}. "
            f"Set HF_HOME to a cache that holds it, or point RECAST_{section}__"
            f"{profile.name.upper().replace('-', '_')}__MODEL_ID at a local folder with the diffusers layout "
            "(model_index.json)")
    return profile.model_id


def check_available(profile: ModelProfile | VideoProfile, build: bool = True) -> str:
    """Fail fast (seconds, not minutes) if `profile` cannot load here; returns the source to load. Planning passes
    build=False: a request is checked before anything is written, the tiny models' cache included."""
    check_device(profile)
    loaded = next((p for p in cached_pipelines() if (p.key.profile, p.key.model_id, p.key.revision, p.key.device)
                   == (profile.name, profile.model_id, profile.revision, profile.device)), None)
    if loaded is not None and not loaded.prepared:
        return loaded.source  # already in this process (from its source: a prepared folder is no source)
    try:
        return resolve_source(profile, build=build)
    except ModelUnavailable:
        from recast.tasks.models import prepared

        kind = "edit" if isinstance(profile, ModelProfile) else "video"
        if prepared.available(kind, profile):  # the source is not needed: its prepared weights are here
            return str(prepared.folder_of(kind, profile))
        raise


# --------------------------------------------------------------------------------------------------
# Memory policy


def _device_of(loaded: LoadedPipeline) -> str:
    return loaded.key.device


def _module_gib(pipe) -> float:
    """Bytes of every parameter and buffer the pipeline's torch modules hold on their devices."""
    import torch

    total, seen = 0, set()
    for component in getattr(pipe, "components", {}).values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in [*component.parameters(), *component.buffers()]:
            if id(tensor) not in seen and tensor.device.type != "meta":
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total / GIB


def free_gib(device: str, capacity_gib: float | None = None) -> float:
    """What `device` can still take: the configured capacity minus what recast holds there, or, on a CUDA
    card, the driver's free memory plus what torch holds cached but unused, whichever is smaller."""
    import torch

    held = sum(p.resident_gib for p in cached_pipelines() if _device_of(p) == device)
    free = float("inf") if capacity_gib is None else capacity_gib - held
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        driver_free, _ = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        free = min(free, (driver_free + cached) / GIB)
    return free


def make_room(kind: str, profile: ModelProfile | VideoProfile) -> list[str]:
    """Release idle pipelines on the profile's device until its expected need fits; returns what was released."""
    from recast.tasks.settings import get_settings

    need = profile.memory_gib or 0.0
    capacity = get_settings().device_memory_gib.get(profile.device)
    released = []
    candidates = sorted((p for p in cached_pipelines() if _device_of(p) == profile.device), key=lambda p: p.last_used)
    for loaded in candidates:
        if need <= free_gib(profile.device, capacity):
            break
        if loaded.call_lock.locked():
            continue  # busy: another task is running on it right now
        log.info("memory policy: releasing %s (%s, %.1f GiB) to make room for %s %s (%.1f GiB) on %s",
                 loaded.key.profile, loaded.key.kind, loaded.resident_gib, kind, profile.name, need, profile.device)
        with _CACHE_LOCK:
            _release(loaded)
        released.append(f"{loaded.key.kind}:{loaded.key.profile}")
    if need > free_gib(profile.device, capacity):
        log.warning("memory policy: %s %s expects %.1f GiB, %s has %.1f GiB free after releasing what was idle",
                    kind, profile.name, need, profile.device, free_gib(profile.device, capacity))
    return released


def _release(loaded: LoadedPipeline) -> None:
    """Drop a pipeline for real: its cache entry, its modules, compiled graphs that may pin them, cached memory."""
    import torch

    _CACHE.pop(loaded.key, None)
    loaded.pipe = None
    loaded.adapters.clear()
    if loaded.compiled and not any(p.compiled for p in _CACHE.values()):
        torch._dynamo.reset()  # compiled graphs may reference the released modules; none other needs them
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# The cache


def get_pipeline(kind: Kind, profile: ModelProfile | VideoProfile, *,
                 preloading: bool = False) -> tuple[LoadedPipeline, bool]:
    """The process's pipeline for (kind, profile): loaded on first use, then reused.

    Returns (loaded, cache_hit). The lock is held while loading so concurrent callers wait for the one load
    instead of starting their own.
    """
    if _SERVED is not None and (kind, profile.name) not in _SERVED:
        served = ", ".join(f"{k} {p}" for k, p in sorted(_SERVED))
        raise ProfileNotServed(f"this worker serves {served}, not {kind} profile '{profile.name}': send the job to "
                               f"a worker started with that profile (`recast worker ... --profile {profile.name}`)")
    key = PipelineKey.of(kind, profile)
    with _CACHE_LOCK:
        loaded = _CACHE.get(key)
        if loaded is not None:
            loaded.last_used = time.monotonic()
            hit, loaded.preloaded = not loaded.preloaded, False
            return loaded, hit
        from recast.tasks.models import prepared

        recipe = _recipe(kind)
        make_room(kind, profile)
        started = time.perf_counter()
        check_device(profile)
        before = _allocated_gib(profile.device)
        # Cold start = everything a worker does before it can serve: load, place, compile, warm up. torch.compile's
        # cache kept beside the prepared weights is loaded before the recipe places and compiles: it spares the
        # warm-up its compiling, and blocks compiled ahead of time find their kernels in it (without it, a new
        # node's start rebuilt every kernel of the block while loading them: 15 s of the tiny model's on a CPU).
        # Both are loaded on a thread while the prepared weights are still being read.
        early = prepared.CompiledEarly(kind, profile)
        # Prepared weights when they are there; else the source, resolved only then (and prepared for next time).
        obtained = prepared.obtain(kind, profile, lambda: check_available(profile), recipe, prepare=profile.prepare,
                                   beside=early.start)
        phase = time.perf_counter()
        cache_loaded = early.cache_loaded()  # (the time waited for it, when it was loaded beside the weights)
        compile_cache_s = round(time.perf_counter() - phase, 2)
        compiles, graphs = prepared.inductor_cache_counts(), prepared.compiled_graphs()
        phase = time.perf_counter()
        try:
            decisions = recipe.place(obtained.pipe, profile)
        finally:
            early.forget()
        obtained.parts["place"] = round(time.perf_counter() - phase, 2)
        compiled_blocks = decisions.get("compiled_blocks")
        if compiled_blocks:  # how: regional, or ahead of time (loaded, or compiled at the first call)
            obtained.parts["compiled_blocks"] = compiled_blocks
        loaded = install(kind, profile, obtained.pipe, str(obtained.folder) if obtained.prepared else obtained.source,
                         before_gib=before)
        loaded.prepared = obtained.prepared
        loaded.phases["load"] = round(time.perf_counter() - started, 2)
        # The process's host RSS peak so far, after each phase: which of them sets a worker's peak (#22: <= 8 GiB)
        rss_peaks = dict(obtained.parts.pop("host_rss_peak_gib", {}), loaded=prepared.host_rss_peak_gib())
        loaded.phases["load_parts"] = dict(obtained.parts, obtain=round(obtained.seconds, 2))
        loaded.phases["compile_cache"] = compile_cache_s
        loaded.phases["host_rss_peak_gib"] = rss_peaks
        phase = time.perf_counter()
        recipe.warm_up(loaded, profile)
        loaded.phases["warm_up"] = round(time.perf_counter() - phase, 2)
        loaded.phases["host_rss_peak_gib"]["warmed_up"] = prepared.host_rss_peak_gib()
        if profile.compile:
            hits, misses = (after - before for after, before in zip(prepared.inductor_cache_counts(), compiles))
            misses += early.misses
            traced = prepared.compiled_graphs() > graphs  # none: the blocks' code was loaded, compiled ahead of time
            loaded.compile_cache = "hit" if (cache_loaded or not traced) and not misses else "miss"
            if misses and obtained.folder is not None:
                prepared.save_compile_cache(kind, profile)
        loaded.cold_start_s = time.perf_counter() - started
        log.info("loaded %s pipeline %s@%s (%s) in %.2fs (%s, compile cache %s), %.2f GiB on %s", kind,
                 profile.model_id, profile.revision, profile.name, loaded.cold_start_s,
                 "prepared weights" if loaded.prepared else "from the source", loaded.compile_cache,
                 loaded.resident_gib, profile.device)
        loaded.preloaded = preloading  # under the lock: the job waiting on it must see the mark
        # What this start read, for the next new node's readahead (once a node: a list naming every module is kept)
        from recast.tasks.models import readahead

        readahead.record()
        return loaded, False


# The pipeline class of each kind: what a source's loading imports when no prepared folder names its classes.
PIPELINE_CLASSES = {"edit": "QwenImageEditPlusPipeline", "video": "WanImageToVideoPipeline"}


def import_ahead(pairs: list[tuple[Kind, ModelProfile | VideoProfile]]) -> list[str]:
    """Import what loading these profiles imports (torch, the recipes, their pipelines' classes as the prepared
    folders' configs name them, torch.compile's machinery for compiled profiles) without reading a weight or
    touching a device: the modules a worker's supervising parent holds, so a serving process it starts again
    (recast.flows.respawn) skips seconds of imports. Returns the classes imported."""
    import importlib
    import json

    import torch  # noqa: F401

    from recast.tasks.models import prepared

    imported = []
    for kind, profile in pairs:
        _recipe(kind)
        try:
            index = json.loads((prepared.folder_of(kind, profile) / "config" / "model_index.json").read_text())
        except (OSError, ValueError):  # not prepared yet: the source's pipeline imports the same classes
            index = {"_class_name": PIPELINE_CLASSES[kind]}
        specs = [("diffusers", index["_class_name"])] + [tuple(spec) for name, spec in index.items() if not
                                                         name.startswith("_") and isinstance(spec, list) and spec[0]]
        for library, class_name in specs:
            getattr(importlib.import_module(library), class_name)
            imported.append(f"{library}.{class_name}")
        if profile.compile:
            import torch._dynamo  # noqa: F401 - loading kept code and compiling need both
            import torch._inductor.codecache  # noqa: F401
    return imported


def preload(pairs: list[tuple[Kind, ModelProfile | VideoProfile]]) -> threading.Thread:
    """Load these pipelines on a background thread while the caller does something else (a CLI command: while its
    Prefect server starts and its flow run begins); the job that then asks for one waits for that load instead of
    starting its own, and reports it as its own (cache_hit False). A failure is left for the job to meet and
    report."""
    def load_all() -> None:
        for kind, profile in pairs:
            try:
                get_pipeline(kind, profile, preloading=True)
            except Exception as exc:  # noqa: BLE001 - the job's own get_pipeline raises it again, with its context
                log.debug("preloading %s %s failed: %s", kind, profile.name, exc)
                return

    thread = threading.Thread(target=load_all, name="recast-preload", daemon=True)
    thread.start()
    return thread


def prepare_weights(kind: Kind, profile: ModelProfile | VideoProfile) -> tuple[Path, bool, float]:
    """`recast prepare`: the profile's prepared weights in the model cache, verified or made now from the source;
    (folder, made now, seconds)."""
    from recast.tasks.models import prepared

    check_device(profile)
    started = time.perf_counter()
    folder, made = prepared.ensure(kind, profile, lambda: check_available(profile), _recipe(kind))
    return folder, made, time.perf_counter() - started


def install(kind: Kind, profile: ModelProfile | VideoProfile, pipe, source: str,
            before_gib: float | None = None) -> LoadedPipeline:
    """Put an already prepared pipeline into the cache (the loader, and benchmarks that build random weights)."""
    key = PipelineKey.of(kind, profile)
    after = _allocated_gib(profile.device)
    resident = after - before_gib if before_gib is not None and after is not None else _module_gib(pipe)
    loaded = LoadedPipeline(key=key, pipe=pipe, source=source, cold_start_s=0.0, resident_gib=round(resident, 3),
                            compiled=bool(getattr(profile, "compile", False)))
    with _CACHE_LOCK:
        _CACHE[key] = loaded
    return loaded


def _allocated_gib(device: str) -> float | None:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.memory_allocated(torch.device(device)) / GIB
    return None


def _recipe(kind: str):
    if kind == "edit":
        from recast.tasks.models import qwen_edit

        return qwen_edit
    from recast.tasks.models import wan_video

    return wan_video
