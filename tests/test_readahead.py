"""A new node's start reads ahead what the last start read (#22; recast.tasks.models.readahead): the list a start
writes into the model cache, the next process's reads asked for before it imports torch, and what is skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from recast.tasks.models import readahead

FIRST_START = """
from recast.tasks.models import loading
from recast.tasks.settings import get_settings

loading.get_pipeline("edit", get_settings().get_profile("tiny"))
"""

NEXT_START = """
import json, sys
from recast.tasks.models import readahead

reads = readahead.start()
torch_imported_first = "torch" in sys.modules
assert reads.done.wait(120), "the readahead did not finish"
print(json.dumps({"files": reads.files, "gib": reads.gib, "skipped": reads.skipped,
                  "torch_imported_first": torch_imported_first}))
"""


def _run(code: str, cache: Path, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, RECAST_CACHE_DIR=str(cache), **env),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_a_start_lists_what_it_read_and_the_next_process_asks_for_it_before_importing_torch(tmp_path):
    cache = tmp_path / "cache"
    _run(FIRST_START, cache)
    path = cache / readahead.LIST_NAME
    assert path.is_file(), "a worker's start (loading.get_pipeline) wrote no list of what it read"
    listed = json.loads(path.read_text())
    files = {entry["path"]: entry for entry in listed["files"]}
    torch_libraries = [f for f in files if "/torch/lib/" in f and ".so" in f]
    assert torch_libraries, "torch's shared libraries, which every start maps, are not listed"
    for file in torch_libraries:
        ranges, size = files[file]["ranges"], files[file]["size"]
        assert ranges and all(0 <= offset and offset + length <= size + 4096 for offset, length in ranges), \
            f"{file}: its resident ranges {ranges[:3]} are not within its {size} bytes"
    assert any("diffusers" in f and "qwenimage" in f and f.endswith(".pyc") for f in files), \
        "the bytecode of the edit pipeline's modules is not listed"
    assert not [f for f in files if f.endswith(".safetensors") or str(cache) in f], \
        "the model's weights are listed: the prepared loader reads those itself, they must not be read twice"

    ahead = json.loads(_run(NEXT_START, cache).strip().splitlines()[-1])
    assert not ahead["torch_imported_first"], "reading ahead imported torch before asking for its libraries"
    assert ahead["files"] >= 0.95 * len(files) and ahead["skipped"] <= 0.05 * len(files), \
        f"the next start asked for {ahead['files']} of the {len(files)} listed files ({ahead['skipped']} skipped)"
    assert ahead["gib"] > 0.05, f"the next start asked for only {ahead['gib']:.3f} GiB"

    off = json.loads(_run(NEXT_START, cache, RECAST_START_READAHEAD="false").strip().splitlines()[-1])
    assert off["files"] == 0, "start_readahead: false still read ahead"


def test_a_changed_or_missing_file_is_skipped_and_a_foreign_or_broken_list_reads_nothing(tmp_path):
    same, grown = tmp_path / "same.bin.txt", tmp_path / "grown.txt"
    same.write_bytes(b"x" * 10_000)
    grown.write_bytes(b"y" * 10_000)
    listed = {"format": readahead.FORMAT, **readahead._environment(), "files": [
        {"path": str(same), "size": 10_000, "ranges": [[0, 8192]]},
        {"path": str(grown), "size": 5_000, "ranges": None},  # it changed since it was listed
        {"path": str(tmp_path / "gone.pyc"), "size": 10, "ranges": None}]}
    path = tmp_path / readahead.LIST_NAME

    def ahead() -> readahead.Readahead:
        reads = readahead.start(tmp_path)
        assert reads.done.wait(60), "the readahead did not finish"
        return reads

    path.write_text(json.dumps(listed))
    reads = ahead()
    assert (reads.files, reads.skipped) == (1, 2), \
        f"asked for {reads.files} files and skipped {reads.skipped}: a changed or missing file must be skipped"
    for foreign in ({**listed, "prefix": "/another/environment"}, {**listed, "format": 0}):
        path.write_text(json.dumps(foreign))
        assert ahead().files == 0, f"a list of another environment or format was read: {foreign['prefix']}"
    path.write_text('{"format": 1, "files": [')
    assert ahead().files == 0, "a broken list was read"


def test_a_list_naming_every_module_is_kept_and_one_missing_a_module_is_completed(tmp_path):
    written = readahead.record(tmp_path)
    assert written == tmp_path / readahead.LIST_NAME, "the first record wrote no list"
    first = json.loads(written.read_text())
    assert readahead.record(tmp_path) is None, "a list that names every imported module was written again"
    module = next(f for f in readahead._module_files() if f.endswith(".pyc"))
    trimmed = {**first, "files": [entry for entry in first["files"] if entry["path"] != module]}
    written.write_text(json.dumps(trimmed))
    assert readahead.record(tmp_path) == written, "a list missing an imported module was not completed"
    again = {entry["path"] for entry in json.loads(written.read_text())["files"]}
    assert module in again and {entry["path"] for entry in trimmed["files"]} <= again, \
        "completing the list lost entries or did not add the missing module"
