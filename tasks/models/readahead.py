"""A new node's start, its libraries read ahead: the files a worker's start reads, listed once, read back into the
page cache on many threads as the next process begins.

On a new node (an empty page cache) a worker's start read ~1.5 GiB of libraries and modules (torch's and CUDA's
shared libraries, ~7,000 .pyc files) one page fault and one import at a time, and was ~8 s slower than a restart on
the same node for it (docs/PERFORMANCE.md: the `fp8` edit worker on an H100, 33.1 s against 24.7 s). A process that
finished a start (`record`, after `loading.get_pipeline` has loaded and warmed a pipeline) writes what it used into
the model cache: the parts of every mapped file that are in memory (mincore over its own mappings) and every
imported module's bytecode. `start`, the first thing a worker does (before torch is imported), asks the kernel to
read those parts on 16 threads (posix_fadvise WILLNEED: the reads are queued, nothing waits for them), so the
imports that follow find them in memory. `recast prepare` records the list too (it imports what a start imports),
so an image that holds the prepared weights holds it. Measured on another H100 (whose imports were far faster), one
run each: 21.58 s with it against 21.93 s without; the structure's imports and the warm-up gained 0.9 s, torch's own
import lost 1.0 s to the same libraries' readahead.

Best effort throughout: a missing, stale or unreadable list reads nothing, a file that changed size since it was
listed is skipped, and nothing here raises into a start. `start_readahead: false` turns it off.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from pathlib import Path

log = logging.getLogger("recast.readahead")

LIST_NAME = "start-files.json"
FORMAT = 1
THREADS = 16
# Resident pages closer than this are read as one range (the kernel's own readahead reads 128 KiB around a fault).
GAP = 256 * 1024
# Never listed: the weights (the prepared loader reads them its own way) and what is not a file on a disk.
SKIPPED_SUFFIXES = (".safetensors", ".bin", ".pt", ".blocks")
SKIPPED_PREFIXES = ("/dev/", "/proc/", "/sys/", "/memfd:")


def _environment() -> dict:
    """What a list belongs to: another interpreter or environment lists other files."""
    return {"python": sys.version, "prefix": sys.prefix}


def list_path(cache: Path | None = None) -> Path:
    if cache is None:
        from recast.tasks.settings import cache_dir

        cache = cache_dir()
    return Path(cache) / LIST_NAME


# --------------------------------------------------------------------------------------------------
# Recording: after a start


def _resident_ranges() -> dict[str, list[list[int]]]:
    """{file: [[offset, length], ...]} of the file-backed mappings of this process whose pages are in memory."""
    import ctypes
    import mmap
    import re

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    page = mmap.PAGESIZE
    resident = bytes(range(256)).maketrans(bytes(range(256)), bytes(i & 1 for i in range(256)))  # bit 0 only
    found: dict[str, list[list[int]]] = {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith("/") or fields[4] == "0":
            continue
        path = fields[5]
        if path.endswith(" (deleted)") or path.startswith(SKIPPED_PREFIXES) or path.endswith(SKIPPED_SUFFIXES):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        vector = (ctypes.c_ubyte * ((end - start) // page))()
        if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), vector) != 0:
            continue
        offset = int(fields[2], 16)
        found.setdefault(path, []).extend(
            [offset + run.start() * page, (run.end() - run.start()) * page]
            for run in re.finditer(b"\x01+", bytes(vector).translate(resident)))
    return {path: _merged(ranges) for path, ranges in found.items() if ranges}


def _merged(ranges: list[list[int]]) -> list[list[int]]:
    """[offset, length] byte ranges sorted and joined where they overlap or lie closer than GAP."""
    joined: list[list[int]] = []
    for offset, length in sorted(ranges):
        if joined and offset - (joined[-1][0] + joined[-1][1]) <= GAP:
            joined[-1][1] = max(joined[-1][1], offset + length - joined[-1][0])
        else:
            joined.append([offset, length])
    return joined


def _module_files() -> list[str]:
    """Each imported module's bytecode (or its source where it has none), in the order they were imported."""
    files = []
    for module in list(sys.modules.values()):
        for attribute in ("__cached__", "__file__"):
            path = getattr(module, attribute, None)
            if isinstance(path, str) and path.startswith("/") and not path.endswith((".so", ".pyd")) and \
                    os.path.isfile(path):  # (a module whose bytecode was never written has its source read)
                files.append(path)
                break
    return files


def _metadata_files() -> list[str]:
    """The installed distributions' METADATA (diffusers and transformers read dozens of them as they import)."""
    files = []
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        files += [os.path.join(entry, name, "METADATA") for name in names if name.endswith(".dist-info")]
    return files


def record(cache: Path | None = None) -> Path | None:
    """List what this process's start read (see the module's docstring), added to the list already there for this
    environment; written atomically. A list that already names every module imported here is left as it is (a
    restart's page cache holds what earlier processes read too: its resident pages would only widen the list).
    Returns the list's path, or None when nothing was written."""
    try:
        path = list_path(cache)
        listed = _read(path)
        entries = {entry["path"]: entry for entry in listed["files"]} if listed else {}
        modules = _module_files()
        if entries and all(file in entries for file in modules):
            return None
        added = 0
        found = list(_resident_ranges().items()) + [(f, None) for f in modules + _metadata_files()]
        for file, ranges in found:
            if file in entries and (ranges is None or entries[file].get("ranges") is None):
                continue
            try:
                size = os.stat(file).st_size
            except OSError:
                continue
            entry = entries.get(file)
            if entry is not None and entry["size"] == size and ranges is not None:  # union with what was listed
                ranges = _merged(entry["ranges"] + ranges)
            entries[file] = {"path": file, "size": size, "ranges": ranges}
            added += 1
        if not added:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{path.name}.{os.getpid()}.part")
        staging.write_text(json.dumps({"format": FORMAT, **_environment(), "files": list(entries.values())}))
        os.replace(staging, path)
        return path
    except Exception as exc:  # noqa: BLE001 - a list not written costs the next new node its readahead, nothing else
        log.debug("start files not listed: %s", exc)
        return None


# --------------------------------------------------------------------------------------------------
# Reading ahead: at a start


def _read(path: Path) -> dict | None:
    """The list at `path` if it is this environment's; None otherwise."""
    try:
        listed = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(listed, dict) or listed.get("format") != FORMAT or \
            {k: listed.get(k) for k in _environment()} != _environment() or not isinstance(listed.get("files"), list):
        return None
    return listed


class Readahead:
    """The reads asked for at a start (`start`): `done` is set when every listed file was handed to the kernel;
    `files` and `gib` say how much was asked for, `skipped` how many files had changed or gone."""

    def __init__(self, listed: dict | None) -> None:
        self.listed = listed
        self.files = self.skipped = 0
        self.gib = 0.0
        self.done = threading.Event()

    def _one(self, entry: dict) -> int:
        try:
            fd = os.open(entry["path"], os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1
        try:
            if os.fstat(fd).st_size != entry["size"]:
                return -1
            ranges = entry["ranges"] or [[0, entry["size"]]]
            for offset, length in ranges:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
            return sum(length for _, length in ranges)
        except (OSError, KeyError, TypeError, ValueError):
            return -1
        finally:
            os.close(fd)

    def run(self) -> None:
        try:
            files = self.listed["files"] if self.listed else []
            # the largest first: torch's and CUDA's libraries are what the first import waits on
            files = sorted(files, key=lambda e: -sum(r[1] for r in e["ranges"]) if e.get("ranges") else 0)
            # Each thread walks its own share (no pool's queue: the less Python runs here, the less it holds the
            # interpreter from the imports it is ahead of); the kernel reads what they ask for in parallel.
            asked: list[list[int]] = [[] for _ in range(THREADS)]
            threads = [threading.Thread(target=lambda share, out: out.extend(map(self._one, share)),
                                        args=(files[i::THREADS], asked[i]), name=f"recast-readahead-{i}", daemon=True)
                       for i in range(THREADS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            sizes = [size for share in asked for size in share]
            self.skipped = sum(1 for size in sizes if size < 0)
            self.files = len(sizes) - self.skipped
            self.gib = sum(size for size in sizes if size > 0) / 2**30
        except Exception as exc:  # noqa: BLE001 - reading ahead is an optimisation; a start never fails for it
            log.debug("readahead stopped: %s", exc)
        finally:
            self.done.set()


def start(cache: Path | None = None) -> Readahead:
    """Ask the kernel, on a background thread, to read what the last start read (nothing when the list is missing,
    another environment's, or `start_readahead` is off). Call it first, before torch is imported."""
    listed = None
    try:
        from recast.tasks.settings import get_settings

        if get_settings().start_readahead:
            listed = _read(list_path(cache))
    except Exception as exc:  # noqa: BLE001 - the settings' own errors are reported where the worker reads them
        log.debug("no readahead: %s", exc)
    reads = Readahead(listed)
    threading.Thread(target=reads.run, name="recast-readahead", daemon=True).start()
    return reads
