"""Prepared weights (#22): `recast prepare`, a worker start from them, what is refused and rebuilt, the key, two
preparers at once, and the distillation LoRA's scale. On the tiny models, through the real loader and pipelines."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recast.tasks.models import loading, lora, prepared, qwen_edit, wan_video
from recast.tasks.schemas.settings import LoraSpec
from recast.tasks.settings import get_settings

BIN = Path(sys.executable).parent


def _env(cache: Path, **extra: str) -> dict:
    return dict(os.environ, RECAST_CACHE_DIR=str(cache), RECAST_HANDOFF__MODE="none", **extra)


def _edit(env: dict, astronaut, root: Path) -> dict:
    proc = subprocess.run([str(BIN / "recast"), "edit", str(astronaut), "--prompt", "Neo, black trench coat", "--seed",
                           "5", "--steps", "2", "--storage", str(root), "--json"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _png_sha(manifest: dict) -> str:
    return hashlib.sha256(Path(manifest["edits"][0]["output"].removeprefix("file://")).read_bytes()).hexdigest()


def test_prepare_then_an_edit_starts_from_the_prepared_weights_and_gives_the_same_image(astronaut, tmp_path):
    env = _env(tmp_path / "cache")
    made = subprocess.run([str(BIN / "recast"), "prepare", "--profile", "tiny"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert made.returncode == 0 and "edit tiny: made" in made.stdout, made.stdout + made.stderr[-2000:]
    (folder,) = (tmp_path / "cache" / "prepared").glob("edit-tiny-*")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["files"] and all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    assert manifest["recipe"]["model_id"] == "tiny" and manifest["recipe"]["libraries"]["diffusers"]
    assert (tmp_path / "cache" / "start-files.json").is_file(), \
        "recast prepare left no list of what a start reads: a new node from its image reads nothing ahead"
    from_prepared = _edit(env, astronaut, tmp_path / "a")
    assert from_prepared["pipeline"]["prepared"] is True, from_prepared["pipeline"]
    from_source = _edit(_env(tmp_path / "cache", RECAST_PROFILES__TINY__PREPARE="false"), astronaut, tmp_path / "b")
    assert from_source["pipeline"]["prepared"] is False, from_source["pipeline"]
    assert _png_sha(from_prepared) == _png_sha(from_source), "prepared weights must give the source's image"
    again = subprocess.run([str(BIN / "recast"), "prepare", "--profile", "tiny"], env=env, capture_output=True,
                           text=True, timeout=600)
    assert "edit tiny: verified" in again.stdout, again.stdout + again.stderr[-2000:]


def test_prepare_compile_keeps_the_compiled_blocks_so_a_new_process_compiles_nothing(tmp_path):
    """At image build (on the workers' kind of GPU) `recast prepare --compile` leaves the compiled blocks and the
    compile cache beside the weights: a new node's first start loads them instead of compiling (24-29 s of a new
    node's start on an H100/H200). Here the tiny profile compiled on the CPU, then a second process."""
    env = _env(tmp_path / "cache", RECAST_PROFILES__TINY__COMPILE="true", RECAST_PROFILES__TINY__WARMUP="true")
    command = [str(BIN / "recast"), "prepare", "--profile", "tiny", "--compile"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0 and "compiled at the first call" in first.stdout, first.stdout + first.stderr[-2000:]
    (folder,) = (tmp_path / "cache" / "prepared").glob("edit-tiny-*")
    assert list((folder / "compile").glob("*.blocks")), f"no compiled blocks kept in {folder}: {first.stdout}"
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "ahead of time (loaded" in again.stdout and "compile cache hit" in again.stdout, \
        "a new process compiled again instead of loading what --compile kept: " + again.stdout + again.stderr[-2000:]


@pytest.mark.parametrize("damage", ["corrupt", "corrupt-block", "truncated", "partial"])
def test_a_damaged_prepared_folder_is_refused_with_its_reason_and_made_again(damage, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RECAST_CACHE_DIR", str(tmp_path / "cache"))
    if damage == "corrupt-block":  # shards of many blocks, verified block by block as a full-size start does
        monkeypatch.setattr(prepared, "BLOCK_BYTES", 4096)
    profile = get_settings().get_profile("tiny")
    folder, made, _ = loading.prepare_weights("edit", profile)
    assert made
    shard = sorted((folder / "weights").glob("transformer-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    if damage == "corrupt-block":
        entry = json.loads((folder / "manifest.json").read_text())["files"][f"weights/{shard.name}"]
        assert len(entry["blocks"]) == -(-len(data) // 4096), "each block of a shard has its SHA-256"
        data[len(data) // 2] ^= 0x01  # one bit of a block in the middle
        shard.write_bytes(bytes(data))
        reason = "does not match its SHA-256"
    elif damage == "corrupt":
        data[-100] ^= 0xFF  # same size, other bytes
        shard.write_bytes(bytes(data))
        reason = "does not match its SHA-256"
    elif damage == "truncated":
        shard.write_bytes(bytes(data[:-100]))
        reason = "truncated"
    else:
        (folder / "manifest.json").unlink()  # a preparer that died before finishing
        reason = "partial folder"
    source = loading.check_available(profile)
    with caplog.at_level("WARNING", logger="recast.models"):
        obtained = prepared.obtain("edit", profile, lambda: source, qwen_edit)
    assert not obtained.prepared, "a damaged folder must never be used"
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and reason in refusals[0], refusals
    assert prepared.obtain("edit", profile, lambda: source, qwen_edit).prepared, "the folder is made again, whole"


def test_a_recipe_change_gives_another_key_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RECAST_CACHE_DIR", str(tmp_path / "cache"))
    profile = get_settings().get_profile("tiny")
    keys = {prepared.key_of("edit", p) for p in (
        profile, profile.model_copy(update={"quantize": "fp8"}), profile.model_copy(update={"revision": "abc"}),
        profile.model_copy(update={"lightning": LoraSpec(source="x.safetensors", weight=0.5)}))}
    assert len(keys) == 4, "model, revision, precision and LoRA each change what is prepared"
    same = profile.model_copy(update={"steps": 3, "warmup": True, "device": "cpu", "compile": True})
    assert prepared.key_of("edit", same) == prepared.key_of("edit", profile), "settings that are not weights share"
    loading.prepare_weights("edit", profile)
    fp8 = profile.model_copy(update={"quantize": "fp8"})
    assert not prepared.available("edit", fp8), "another recipe must not find this one's weights"


def test_two_preparers_at_once_leave_one_complete_folder(tmp_path):
    env = _env(tmp_path / "cache")
    loading_env = dict(env)
    procs = [subprocess.Popen([str(BIN / "recast"), "prepare", "--video-profile", "tiny"], env=loading_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [proc.communicate(timeout=600) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-1500:] for _, err in outs]
    said = sorted(out.split(": ")[2].split()[0] for out, _ in outs)
    assert said == ["made", "verified"], f"one makes them, the other waits and verifies: {outs}"
    entries = list((tmp_path / "cache" / "prepared").iterdir())
    folders = [p for p in entries if p.is_dir()]
    assert len(folders) == 1 and not [p for p in entries if p.name.endswith(".part")], entries
    assert (folders[0] / "manifest.json").exists()


def test_fp8_weights_load_prepared_bit_for_bit(tmp_path, monkeypatch, astronaut):
    """A quantized recipe's structure is rebuilt on empty modules and filled with its FP8 tensors and scales."""
    from PIL import Image

    monkeypatch.setenv("RECAST_CACHE_DIR", str(tmp_path / "cache"))
    profile = get_settings().get_profile("tiny").model_copy(update={"name": "tiny-fp8", "quantize": "fp8",
                                                                    "quantize_text_encoder": True})
    source = loading.check_available(profile)
    images = []
    for expected in (False, True):
        obtained = prepared.obtain("edit", profile, lambda: source, qwen_edit)
        assert obtained.prepared is expected
        qwen_edit.place(obtained.pipe, profile)
        loaded = loading.LoadedPipeline(key=loading.PipelineKey.of("edit", profile), pipe=obtained.pipe,
                                        source="test", cold_start_s=0.0)
        with Image.open(astronaut) as photo:
            images.append(qwen_edit.run_edit(loaded, profile, [photo.convert("RGB")], prompt="Neo", negative_prompt=" ",
                                             seed=2, steps=2, true_cfg_scale=4.0, width=64, height=64).tobytes())
    assert images[0] == images[1], "the prepared FP8 pipeline must give the image the transformed source gives"


def _qwen_lora_file(pipe, path: Path, with_alpha: float | None) -> Path:
    """A LoRA in the lightx2v layout (lora_down / lora_up, optional .alpha) for the tiny transformer's to_q."""
    from safetensors.torch import save_file

    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    rank = 4
    tensors = {"diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight": torch.randn(rank, layer.in_features),
               "diffusion_model.transformer_blocks.0.attn.to_q.lora_up.weight": torch.randn(layer.out_features, rank)}
    if with_alpha is not None:
        tensors["diffusion_model.transformer_blocks.0.attn.to_q.alpha"] = torch.tensor(with_alpha)
    save_file(tensors, str(path))
    return path


def test_a_distillation_lora_is_fused_at_alpha_over_rank(tmp_path, caplog):
    """The real Lightning files carry .alpha (scale alpha/rank); a file without it is fused at the profile's alpha,
    and with neither a warning says the scale is 1."""
    from diffusers import QwenImageEditPlusPipeline

    source = loading.check_available(get_settings().get_profile("tiny"))

    def fused_delta(spec):
        pipe = QwenImageEditPlusPipeline.from_pretrained(source, dtype=torch.float32)
        before = pipe.transformer.transformer_blocks[0].attn.to_q.weight.detach().clone()
        scale = lora.fuse_lora(pipe, spec, adapter_name="lightning")
        return scale, pipe.transformer.transformer_blocks[0].attn.to_q.weight.detach() - before

    pipe = QwenImageEditPlusPipeline.from_pretrained(source, dtype=torch.float32)
    torch.manual_seed(0)
    with_alpha = _qwen_lora_file(pipe, tmp_path / "with-alpha.safetensors", with_alpha=2.0)
    torch.manual_seed(0)
    without = _qwen_lora_file(pipe, tmp_path / "without.safetensors", with_alpha=None)
    scale_file, delta_file = fused_delta(LoraSpec(source=str(with_alpha)))
    scale_spec, delta_spec = fused_delta(LoraSpec(source=str(without), alpha=2.0))
    assert scale_file == scale_spec == 0.5, (scale_file, scale_spec)
    assert torch.allclose(delta_file, delta_spec, atol=1e-6), "alpha from the profile must equal alpha from the file"
    with caplog.at_level("WARNING", logger="recast.models"):
        scale_none, delta_none = fused_delta(LoraSpec(source=str(without)))
    assert scale_none == 1.0 and torch.allclose(delta_none, 2 * delta_spec, atol=1e-5)
    assert any("carries no alpha" in r.getMessage() for r in caplog.records), "a file without alpha must be said"


def test_the_loaders_pinned_read_buffers_stay_within_their_budget_whatever_the_largest_shard():
    """A start's host RAM: pinned buffers sized to the largest shard (a text encoder's 2 GiB token table) took 8 GiB
    on an H200 host and pushed a worker to 10.2 GiB RSS. The pool takes the typical shard's size, within its budget,
    and the largest shard is read into plain memory instead."""
    from recast.tasks.models import prepared

    gib = 2**30
    edit_model = [gib] * 26 + [int(2.1 * gib)]  # the prepared `lightning` folder's shape: ~1 GiB shards, one larger
    buffer_bytes, count = prepared.pinned_pool(edit_model)
    assert buffer_bytes * count <= prepared.PINNED_POOL_BYTES, f"{count} pinned buffers of {buffer_bytes} bytes"
    assert count >= 2, "fewer than two buffers: reading and copying to the card could no longer overlap"
    assert buffer_bytes < max(edit_model), "the largest shard sized every buffer"
    assert prepared.pinned_pool([5 * gib])[1] == 0, "one shard over the budget was given a pinned buffer anyway"
    # Shards close just over their size, each by another amount: every one of the usual size must fit a buffer
    # (the median's size left half of them to pageable memory: 1.9 GB/s instead of 9.7 on an H200 host).
    varied = [gib + k * 2**21 for k in range(26)] + [int(2.1 * gib)]
    buffer_bytes, count = prepared.pinned_pool(varied)
    assert all(size <= buffer_bytes for size in varied[:-1]) and count >= 2, \
        f"buffers of {buffer_bytes} bytes leave shards of the usual size (up to {max(varied[:-1])}) to plain memory"
    # The Wan folder: shards just over 1 GiB and UMT5's token table alone in one of 1.96 GiB. Sized to it, only two
    # buffers fitted the budget (a `wan22-lightning` start read 36.5 GiB at 3.3 GB/s on an H100 host).
    wan = [gib + k * 2**22 for k in range(28)] + [int(1.96 * gib)]
    buffer_bytes, count = prepared.pinned_pool(wan)
    assert buffer_bytes < int(1.96 * gib) and count >= 3, \
        f"the token table sized the pinned buffers: {count} of {buffer_bytes} bytes for shards of ~1 GiB"



def test_the_pinned_pool_is_one_allocation_whatever_torch_rounds_it_to(tmp_path, monkeypatch):
    """torch's pinned-memory allocator rounds every allocation up to a power of two, and prepared shards are just
    over 1 GiB: one buffer per reader took 2 GiB each, 6 GiB pinned for a 4 GiB pool (11.3 GiB RSS at start on an
    H200 host). Here at 1/1024 scale through the real loader: what it pins, rounded as torch rounds, stays within
    the budget, and every tensor still arrives intact."""
    from safetensors.torch import save_file

    from recast.tasks.models import prepared

    mib = 2**20
    monkeypatch.setattr(prepared, "PINNED_POOL_BYTES", 4 * mib)
    monkeypatch.setattr(prepared, "BLOCK_BYTES", mib // 4)
    files, expected = {}, {}
    for index in range(6):  # shards just over the shard size, as prepared.write closes them
        tensors = {f"b{index}.w{i}": torch.full((33, 1024), float(index * 10 + i), dtype=torch.bfloat16)
                   for i in range(16)}
        name = f"weights-{index:05d}.safetensors"
        save_file(tensors, str(tmp_path / name))
        digest, blocks = prepared._sha256_file(tmp_path / name)
        files[name] = {"sha256": digest, "blocks": blocks}
        expected.update(tensors)
    assert all(mib < (tmp_path / n).stat().st_size < 2 * mib for n in files), "the shards are not just over 1 MiB"
    pinned_sizes, empty = [], torch.empty

    def recording_empty(*size, pin_memory=False, **kwargs):  # no CUDA here: record what would be pinned
        if pin_memory:
            pinned_sizes.append(int(torch.Size(size[0] if len(size) == 1 and not isinstance(size[0], int)
                                               else size).numel()))
        return empty(*size, **kwargs)

    monkeypatch.setattr(torch, "empty", recording_empty)
    got = {tensor_name: tensor for _, tensor_name, tensor in prepared.stream_shards(tmp_path, files, lambda _: "cpu",
                                                                                  pinned=True, host_in_place=False)}
    monkeypatch.setattr(torch, "empty", empty)
    reserved = sum(1 << (size - 1).bit_length() for size in pinned_sizes)  # as torch's host allocator rounds
    assert pinned_sizes and reserved <= prepared.PINNED_POOL_BYTES, (
        f"pinned allocations {pinned_sizes} reserve {reserved / mib:.0f} MiB once rounded to powers of two, over the "
        f"{prepared.PINNED_POOL_BYTES / mib:.0f} MiB budget")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected), \
        "a tensor read through the pinned pool came back different"

def test_a_shard_no_pinned_buffer_takes_is_read_a_block_at_a_time_not_whole_into_host_memory(tmp_path, monkeypatch):
    """The token tables (2-3 GiB shards) are over the pinned buffers' size: read whole into plain memory, each added
    its size to a start's host RSS beside the pinned pool (a `wan22-lightning` start peaked at 9.0 GiB on an H100
    host; a worker may use 8). Here at 1/1024 scale through the real loader: the outsized shard reaches its place
    intact while Python's allocations stay far below its size, and a corrupt block of it is still refused."""
    import tracemalloc

    from safetensors.torch import save_file

    mib = 2**20
    monkeypatch.setattr(prepared, "PINNED_POOL_BYTES", 4 * mib)
    monkeypatch.setattr(prepared, "BLOCK_BYTES", mib // 4)
    files, expected = {}, {}
    for index, rows in enumerate([33, 33, 33, 33, 33, 300]):  # ~1 MiB shards and one token table of ~9.4 MiB
        tensors = {f"c{index}.w{i}": torch.full((rows, 1024), float(index * 10 + i), dtype=torch.bfloat16)
                   for i in range(16)}
        name = f"weights/text_encoder-{index:05d}.safetensors"
        (tmp_path / "weights").mkdir(exist_ok=True)
        save_file(tensors, str(tmp_path / name))
        digest, blocks = prepared._sha256_file(tmp_path / name)
        files[name] = {"sha256": digest, "blocks": blocks}
        expected.update(tensors)
    outsized = (tmp_path / name).stat().st_size
    assert outsized > 2 * prepared.pinned_pool([(tmp_path / n).stat().st_size for n in files])[0], "not outsized"
    empty = torch.empty  # pinned=True as on a card; no CUDA here, so the pool is allocated unpinned
    monkeypatch.setattr(torch, "empty", lambda *size, pin_memory=False, **kwargs: empty(*size, **kwargs))
    tracemalloc.start()
    try:
        got = {tensor_name: tensor.clone() for _, tensor_name, tensor in
               prepared.stream_shards(tmp_path, files, lambda _: "cpu", pinned=True, host_in_place=False)}
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < outsized / 2, (f"reading took {peak / mib:.1f} MiB of Python memory at its peak for a "
                                 f"{outsized / mib:.1f} MiB shard: the outsized shard was read whole into host memory")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected), \
        "a tensor of the shard read a block at a time came back different"
    data = bytearray((tmp_path / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / name).write_bytes(bytes(data))
    with pytest.raises(prepared.NotPrepared, match="does not match its SHA-256"):
        list(prepared.stream_shards(tmp_path, files, lambda _: "cpu", pinned=True, host_in_place=False))
    data[len(data) // 2] ^= 0x01
    data[7] = 0x7F  # the header's length, read before any hash: 2**63 bytes, refused rather than allocated
    (tmp_path / name).write_bytes(bytes(data))
    with pytest.raises(prepared.NotPrepared, match="no safetensors header"):
        list(prepared.stream_shards(tmp_path, files, lambda _: "cpu", pinned=True, host_in_place=False))


def test_block_reads_pin_one_gib_in_all_and_bring_every_tensor_intact(tmp_path, monkeypatch):
    """`prepared_reads: blocks` (the pinned pool of whole shards is 4 GiB of a start's host RSS; a `wan22-lightning`
    start peaked at 9.0 GiB, over the 8 a worker may use): every shard goes through rings of pinned blocks, one
    allocation of READ_THREADS x BLOCK_BUFFERS blocks, nothing read whole into plain memory, and a corrupt block is
    still refused. At 1/256 scale through the real loader (no CUDA here: the blocks are allocated unpinned and the
    copies are plain ones; the DMA and its events run only on a card)."""
    import tracemalloc

    from safetensors.torch import save_file

    mib = 2**20
    monkeypatch.setattr(prepared, "BLOCK_BYTES", mib // 4)
    files, expected = {}, {}
    (tmp_path / "weights").mkdir()
    for index, rows in enumerate([33, 33, 33, 300, 33, 1]):  # ~1 MiB shards, a token table, a small last one
        tensors = {f"c{index}.w{i}": torch.full((rows, 1024), float(index * 10 + i), dtype=torch.bfloat16)
                   for i in range(16)}
        name = f"weights/transformer-{index:05d}.safetensors"
        save_file(tensors, str(tmp_path / name))
        digest, blocks = prepared._sha256_file(tmp_path / name)
        files[name] = {"sha256": digest, **({"blocks": blocks} if len(blocks) > 1 else {})}
        expected.update(tensors)
    pinned_sizes, empty = [], torch.empty

    def recording_empty(*size, pin_memory=False, **kwargs):
        if pin_memory:
            pinned_sizes.append(int(torch.Size(size).numel()))
        return empty(*size, **kwargs)

    monkeypatch.setattr(torch, "empty", recording_empty)
    tracemalloc.start()
    try:
        got = {tensor_name: tensor.clone() for _, tensor_name, tensor in
               prepared.stream_shards(tmp_path, files, lambda _: "cpu", pinned=True, reads="blocks",
                                      host_in_place=False)}
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    ring_bytes = prepared.READ_THREADS * prepared.BLOCK_BUFFERS * prepared.BLOCK_BYTES
    assert pinned_sizes == [ring_bytes], f"pinned allocations {pinned_sizes}: not one of {ring_bytes} bytes"
    assert peak < mib, f"block reads took {peak / mib:.1f} MiB of plain memory: a shard was read whole"
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected), \
        "a tensor read through the pinned blocks came back different"
    data = bytearray((tmp_path / "weights/transformer-00003.safetensors").read_bytes())
    data[len(data) // 3] ^= 0x01
    (tmp_path / "weights/transformer-00003.safetensors").write_bytes(bytes(data))
    with pytest.raises(prepared.NotPrepared, match="does not match its SHA-256"):
        list(prepared.stream_shards(tmp_path, files, lambda _: "cpu", pinned=True, reads="blocks",
                                    host_in_place=False))


def test_weights_kept_in_host_ram_are_read_once_into_memory_of_their_own_and_never_copied(tmp_path, monkeypatch):
    """A profile that streams blocks from host RAM (`wan22-offload`, `offload_text_encoder`) keeps those shards on the
    host: each is read straight into one buffer of its own (pinned in place where a card is), every tensor a view of
    it. Before, each tensor was cloned out of a read buffer and group offloading pinned another copy: a
    `wan22-offload` start held its 36.5 GiB of weights twice (66.3 GiB host RSS peak on an H100, #22 asks <= 48).
    No CUDA here, so nothing is pinned: the test checks the one copy, the bytes and the checks."""
    from safetensors.torch import save_file

    monkeypatch.setattr(prepared, "BLOCK_BYTES", 4096)
    files, expected, shard_of = {}, {}, {}
    (tmp_path / "weights").mkdir()
    # (rows, dtype, tensors): shards of many blocks; one whose header spans several blocks; one of a single block
    for index, (rows, dtype, count) in enumerate([(33, torch.bfloat16, 4), (300, torch.float32, 4),
                                                  (3, torch.float16, 4), (1, torch.bfloat16, 200), (1, torch.int8, 1)]):
        tensors = {f"c{index}.w{i}": torch.full((rows, 8 if count > 4 else 1024), float(index * 10 + i), dtype=dtype)
                   for i in range(count)}
        tensors[f"c{index}.scale"] = torch.arange(7.0).to(torch.float8_e4m3fn)  # an odd byte count among others
        name = f"weights/transformer-{index:05d}.safetensors"
        save_file(tensors, str(tmp_path / name))
        digest, blocks = prepared._sha256_file(tmp_path / name)
        files[name] = {"sha256": digest, **({"blocks": blocks} if len(blocks) > 1 else {})}
        expected.update(tensors)
        shard_of.update(dict.fromkeys(tensors, name))
    assert any("blocks" in entry for entry in files.values()) and any("blocks" not in e for e in files.values())
    with open(tmp_path / "weights/transformer-00003.safetensors", "rb") as f:
        assert int.from_bytes(f.read(8), "little") > 2 * 4096, "no shard's header spans several blocks"
    got = {tensor_name: tensor for _, tensor_name, tensor in
           prepared.stream_shards(tmp_path, files, lambda _: "cpu", pinned=False, host_in_place=True)}
    assert got.keys() == expected.keys() and all(
        got[k].dtype == expected[k].dtype and torch.equal(got[k].float(), expected[k].float()) for k in expected), \
        "a tensor of a shard kept in host RAM came back different"
    for name in files:
        storages = {got[k].untyped_storage().data_ptr() for k in got if shard_of[k] == name}
        assert len(storages) == 1, f"{name}'s tensors lie in {len(storages)} allocations: they were copied"
        size = next(got[k] for k in got if shard_of[k] == name).untyped_storage().nbytes()
        assert size <= (tmp_path / name).stat().st_size, f"{name} took {size} bytes for a smaller file"
    data = bytearray((tmp_path / "weights/transformer-00001.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "weights/transformer-00001.safetensors").write_bytes(bytes(data))
    with pytest.raises(prepared.NotPrepared, match="transformer-00001.safetensors does not match its SHA-256"):
        list(prepared.stream_shards(tmp_path, files, lambda _: "cpu", pinned=False, host_in_place=True))
    data = bytearray((tmp_path / "weights/transformer-00002.safetensors").read_bytes())
    data[20] ^= 0x01  # in the header: the first block's hash covers it, though it is not read into the buffer
    (tmp_path / "weights/transformer-00002.safetensors").write_bytes(bytes(data))
    files.pop("weights/transformer-00001.safetensors")
    with pytest.raises(prepared.NotPrepared, match="no safetensors header|does not match its SHA-256"):
        list(prepared.stream_shards(tmp_path, files, lambda _: "cpu", pinned=False, host_in_place=True))


def test_host_kept_weights_are_unpinned_then_freed_when_the_last_tensor_goes(tmp_path, monkeypatch):
    """Pinned host memory must not outlive the pipeline (a worker that drops a profile would keep its GiB pinned), and
    must be unpinned before it is unmapped (freeing registered memory leaves the driver holding its pages). No CUDA
    here: the driver's two calls are recorded instead of made; the mapping's life is the real one."""
    import gc
    import weakref

    from safetensors.torch import save_file

    (tmp_path / "weights").mkdir()
    name = "weights/text_encoder-00000.safetensors"
    save_file({"w": torch.ones(64, 64), "b": torch.zeros(64)}, str(tmp_path / name))
    digest, _ = prepared._sha256_file(tmp_path / name)
    calls, mappings = [], []

    class Runtime:
        @staticmethod
        def cudaHostUnregister(address):
            calls.append(("unregister", address, mappings[0]() is not None))  # still mapped when unpinned?
            return 0

    def pin(mapping, address):
        mappings.append(weakref.ref(mapping))
        mapping.registered = address  # what a successful cudaHostRegister leaves
        calls.append(("register", address))
        return True

    monkeypatch.setattr(prepared, "_pin_in_place", pin)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: Runtime)
    tensors = dict((k, t) for _, k, t in prepared.stream_shards(tmp_path, {name: {"sha256": digest}}, lambda _: "cpu",
                                                                   pinned=False, host_in_place=True))
    gc.collect()
    assert [c[0] for c in calls] == ["register"] and mappings[0]() is not None, \
        f"the host memory was released while its tensors live: {calls}"
    assert torch.equal(tensors["w"], torch.ones(64, 64)), "a host-kept tensor came back different"
    address = calls[0][1]
    del tensors
    gc.collect()
    assert calls[1:] == [("unregister", address, True)], f"not unpinned once, before it was unmapped: {calls}"
    assert mappings[0]() is None, "the host memory outlived every tensor of its shard"


def test_a_compiled_edit_worker_traces_its_blocks_once_at_start_and_not_again_for_a_request(tmp_path, monkeypatch,
                                                                                           astronaut):
    """Cold start: dynamo's analysis of the compiled blocks is most of a restart's warm-up, so it must not run twice
    (a restart of the analysis also misses AOTAutograd's cache), and a request after ready compiles nothing."""
    from PIL import Image
    from torch._dynamo.utils import clear_compilation_metrics, get_compilation_metrics

    monkeypatch.setenv("RECAST_CACHE_DIR", str(tmp_path / "cache"))
    # Restored by hand: undone, pytest's monkeypatch left torch's config without the entry (later compiles failed).
    specialize_float = torch._dynamo.config.specialize_float
    profile = get_settings().get_profile("tiny").model_copy(update={"warmup": True, "compile": True, "device": "cpu"})
    loading.clear_cache()
    clear_compilation_metrics()
    try:
        loaded, _ = loading.get_pipeline("edit", profile)
        restarts = [(m.co_name, m.restart_reasons) for m in get_compilation_metrics() if m.restart_reasons]
        assert not restarts, f"dynamo traced a compiled region twice at start: {restarts}"
        graphs = prepared.compiled_graphs()
        qwen_edit.run_edit(loaded, profile, [Image.open(astronaut).convert("RGB")], prompt="a longer prompt than the "
                           "warm-up's, so the sequence is another length", negative_prompt=" ", seed=3, steps=3,
                           true_cfg_scale=2.5, width=96, height=80)
        assert prepared.compiled_graphs() == graphs, "a request after the warm-up compiled again"
    finally:
        loading.clear_cache()
        torch._dynamo.config.specialize_float = specialize_float


def test_a_restart_reads_verified_shards_without_hashing_them_and_a_changed_shard_is_hashed_and_refused(
        tmp_path, monkeypatch, caplog):
    """A shard that verified on this machine is not hashed again while it is the same file (the restart's read
    time); a shard written since (same size, other bytes) is hashed again and refused."""
    monkeypatch.setenv("RECAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(prepared, "BLOCK_BYTES", 4096)  # shards of many blocks, hashed on the pool (counted)
    profile = get_settings().get_profile("tiny")
    folder, _, _ = loading.prepare_weights("edit", profile)
    source = loading.check_available(profile)
    shards = sorted((folder / "weights").glob("*.safetensors"))
    time.sleep(1.1)  # files changed within the last second are never taken as verified (the kernel's clock tick)
    hashed = []
    real_sha = prepared._sha256_of
    monkeypatch.setattr(prepared, "_sha256_of", lambda *data: hashed.append(1) or real_sha(*data))
    first = prepared.obtain("edit", profile, lambda: source, qwen_edit)
    assert first.prepared and hashed, "the first load of fresh files verifies every shard"
    hashed.clear()
    again = prepared.obtain("edit", profile, lambda: source, qwen_edit)
    assert again.prepared and not hashed and again.parts["hashed_gib"] == 0, \
        f"a restart hashed {len(hashed)} blocks of shards that verified before and did not change"
    data = bytearray(shards[0].read_bytes())
    data[-100] ^= 0xFF
    shards[0].write_bytes(bytes(data))  # same size, other bytes, the same inode
    with caplog.at_level("WARNING", logger="recast.models"):
        damaged = prepared.obtain("edit", profile, lambda: source, qwen_edit)
    assert not damaged.prepared and hashed, "a shard written after it verified must be hashed again and refused"
    assert any("does not match its SHA-256" in r.getMessage() for r in caplog.records), caplog.text


def test_a_start_reads_the_shards_while_it_builds_the_modules(tmp_path, monkeypatch):
    """The reads (and the copies to the card) need only the manifest: they must not wait for the structure (imports,
    configs, empty modules), which took 4-10 s of an H200 host's restart before a byte was read."""
    import threading

    monkeypatch.setenv("RECAST_CACHE_DIR", str(tmp_path / "cache"))
    profile = get_settings().get_profile("tiny")
    loading.prepare_weights("edit", profile)
    a_shard_read = threading.Event()
    real_read, real_skeleton = prepared._read_shard_to_host, prepared.skeleton  # the host's reader (no card here)

    def reading(*args, **kwargs):
        result = real_read(*args, **kwargs)
        a_shard_read.set()
        return result

    def skeleton_after_a_read(*args, **kwargs):
        # Generous: it is set at once when the reads run beside the structure; never when they wait for it.
        assert a_shard_read.wait(120), "no shard was read while the pipeline's structure was being built"
        return real_skeleton(*args, **kwargs)

    monkeypatch.setattr(prepared, "_read_shard_to_host", reading)
    monkeypatch.setattr(prepared, "skeleton", skeleton_after_a_read)
    obtained = prepared.obtain("edit", profile, lambda: pytest.fail("the source was asked for"), qwen_edit)
    assert obtained.prepared and obtained.parts["read"] >= 0, obtained.parts


def test_a_shards_bytes_copied_as_one_block_cut_into_tensors_equal_the_files(tmp_path):
    """On a card a shard goes over in one copy and its tensors are cut from those bytes: every dtype, odd sizes and
    offsets included, must come out as safetensors reads them (each in an allocation of its own)."""
    from safetensors.torch import load_file, save_file

    tensors = {"scale": torch.tensor(0.37, dtype=torch.float32), "odd": torch.randn(7, 3).to(torch.bfloat16),
               "fp8": torch.randn(5, 9).to(torch.float8_e4m3fn), "ids": torch.arange(11, dtype=torch.int64),
               "mask": torch.rand(13) > 0.5, "empty": torch.empty(0, 4), "w": torch.randn(33, 17)}
    path = tmp_path / "weights" / "transformer-00000.safetensors"
    path.parent.mkdir()
    save_file(tensors, str(path))
    digest, blocks = prepared._sha256_file(path)
    header, data, offset = prepared._read_shard(path, {"sha256": digest, "blocks": blocks})
    placed = torch.frombuffer(bytearray(data), dtype=torch.uint8)[offset:]  # as it lands on the card
    got = dict(prepared._shard_tensors(header, placed))
    expected = load_file(str(path))
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, f"{name}: {got[name]!r}"
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), \
            f"{name} came back different"
        assert got[name].untyped_storage().data_ptr() != placed.untyped_storage().data_ptr(), \
            f"{name} still points into the shard's buffer (kept alive, and maybe misaligned)"


def test_a_prepared_folders_key_is_found_without_importing_diffusers_or_transformers():
    """A start finds its prepared folder before anything heavy is imported, so its reads begin seconds earlier."""
    code = ("import sys; from recast.tasks.models import prepared; from recast.tasks.settings import get_settings; "
            "prepared.folder_of('edit', get_settings().get_profile('tiny')); "
            "prepared.folder_of('video', get_settings().get_video_profile('tiny')); "
            "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", f"finding the key imported {proc.stdout.strip()}"


_AOT_START = """
import json, sys
import numpy as np
import torch._dynamo.config
torch._dynamo.config.enable_aot_compile = False  # as torch 2.11 (the cards' torch) ships it; 2.14 turns it on
from PIL import Image
from recast.tasks.models import loading, prepared, qwen_edit
from recast.tasks.settings import get_settings

profile = get_settings().get_profile("tiny").model_copy(
    update={"warmup": True, "compile": True, "device": "cpu", "compile_ahead_of_time": True})
loaded, _ = loading.get_pipeline("edit", profile)
at_ready = prepared.compiled_graphs()
image = qwen_edit.run_edit(loaded, profile, [Image.open(sys.argv[1]).convert("RGB")], prompt="a longer prompt than "
                           "the warm-up's, so the sequence is another length", negative_prompt=" ", seed=3, steps=3,
                           true_cfg_scale=2.5, width=96, height=80)
np.save(sys.argv[2], np.asarray(image))
blocks = loaded.pipe.transformer.transformer_blocks
print(json.dumps({"graphs_at_ready": at_ready, "graphs_in_request": prepared.compiled_graphs() - at_ready,
                  "calls": blocks[0]._recast_ahead_of_time.calls,
                  "compiled_blocks": loaded.phases["load_parts"]["compiled_blocks"]}))
"""


def _starts(script: str, tmp_path, starts: dict[str, list[str]]) -> list[dict]:
    """`script` in fresh processes, one after the other, sharing one model cache: for each start (its name, its
    arguments) what it printed last, as JSON."""
    env = _env(tmp_path / "cache")
    results = []
    for start, args in starts.items():
        proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, f"the {start} start failed: {proc.stderr[-3000:]}"
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def _first_start_and_restart(script: str, astronaut, tmp_path) -> tuple[dict, dict]:
    """`script` in two fresh processes sharing one model cache (a first start, then a restart): what each printed
    last, as JSON; each saves its output to tmp_path/<first|restart>.npy."""
    first, restart = _starts(script, tmp_path, {start: [str(astronaut), str(tmp_path / f"{start}.npy")]
                                                for start in ("first", "restart")})
    return first, restart


def test_a_restart_loads_the_blocks_compiled_ahead_of_time_traces_nothing_and_makes_the_same_edit(tmp_path, astronaut):
    """Cold start (#22): dynamo's trace of the compiled block was ~6 s of a restart's warm-up on an H200. The first
    start compiles the blocks ahead of time and keeps the code beside the prepared weights; the next process loads it
    and traces nothing, at start or for a request of another size, and its edit is the eager pipeline's."""
    import numpy as np

    first, restart = _first_start_and_restart(_AOT_START, astronaut, tmp_path)
    assert list((tmp_path / "cache" / "prepared").glob("edit-*/compile/*.blocks")), \
        "the first start kept no compiled blocks beside its prepared weights"
    assert restart["graphs_at_ready"] == 0 and restart["graphs_in_request"] == 0, \
        f"a restart traced graphs although the compiled blocks were kept: {restart}"
    assert restart["calls"]["in_process"] == 0 and restart["calls"]["ahead_of_time"] > 0, \
        f"the restart's block calls did not run the code compiled ahead of time: {restart['calls']}"
    # The code is read on a thread while the weights are (a respawn on an H200 waited 2.6 s for its reads, then
    # 4 s for the code): the restart says where its code came from.
    assert restart["compiled_blocks"] == "ahead of time (loaded while the weights were read)", \
        f"the restart did not read its compiled blocks beside the weights: {restart['compiled_blocks']}"
    eager_profile = get_settings().get_profile("tiny").model_copy(update={"device": "cpu"})
    loading.clear_cache()
    try:
        from PIL import Image

        loaded, _ = loading.get_pipeline("edit", eager_profile)
        eager = np.asarray(qwen_edit.run_edit(
            loaded, eager_profile, [Image.open(astronaut).convert("RGB")], prompt="a longer prompt than the "
            "warm-up's, so the sequence is another length", negative_prompt=" ", seed=3, steps=3, true_cfg_scale=2.5,
            width=96, height=80)).astype(int)
    finally:
        loading.clear_cache()
    for start in ("first", "restart"):
        got = np.load(tmp_path / f"{start}.npy").astype(int)
        assert np.abs(got - eager).max() <= 1, \
            f"the {start} start's edit differs from the eager pipeline's by {np.abs(got - eager).max()}/255"


def test_a_failed_early_read_of_the_compiled_blocks_is_said_and_the_placement_is_not_left_waiting(
        tmp_path, monkeypatch, caplog):
    """The blocks' code is read on a thread while the weights load (prepared.CompiledEarly). If that thread fails
    before it has read the code (here: the compile cache's load raises), the placement, which waits for what it read,
    must get a "not read" at once and read the code itself, and the cache counts as not loaded: said, never a hang."""
    import logging

    from recast.tasks.models import kernels

    artifact = tmp_path / "cpu-torch-x.blocks"
    artifact.write_bytes(b"{}\n")

    def cache_that_breaks(kind, profile):
        raise RuntimeError("the compile cache's file could not be read")

    monkeypatch.setattr(prepared, "compiled_blocks_path", lambda kind, profile: artifact)
    monkeypatch.setattr(prepared, "load_compile_cache", cache_that_breaks)
    profile = get_settings().get_profile("tiny").model_copy(
        update={"compile": True, "compile_ahead_of_time": True, "device": "cpu"})
    early = prepared.CompiledEarly("edit", profile)
    with caplog.at_level(logging.INFO, logger="recast.models"):
        early.start()
        read = kernels._EARLY.get(artifact)
        assert read is not None, "the early read did not register the artifact it reads"
        # (a bound only so that a regression fails instead of hanging the suite)
        assert read.exception(timeout=300) is not None, "the failed thread left the blocks' read unresolved"
        assert kernels.taken_early(artifact) is None, "a failed early read was handed to the placement"
        assert early.cache_loaded() is False, "a compile cache that failed to load counted as loaded"
    said = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(said) == 2 and all("\n" not in line for line in said), \
        f"the failure was not said in one line each (blocks, cache): {said}"


_AOT_SETTINGS_START = """
import json, sys
import torch._dynamo.config
torch._dynamo.config.enable_aot_compile = False  # as torch 2.11 (the cards' torch) ships it; 2.14 turns it on
from recast.tasks.models import loading
from recast.tasks.settings import get_settings

profile = get_settings().get_profile("tiny").model_copy(update={
    "warmup": True, "compile": True, "device": "cpu", "compile_ahead_of_time": True, **json.loads(sys.argv[1])})
loaded, _ = loading.get_pipeline("edit", profile)
print(json.dumps({"compiled_blocks": loaded.phases["load_parts"]["compiled_blocks"]}))
"""


def test_blocks_compiled_for_another_attention_backend_are_compiled_again_not_loaded(tmp_path):
    """Compiled code keeps the attention it was traced with. A worker whose attention backend changed (SageAttention
    installed after the first start, or missing on this machine, or the profile's setting changed) must not load
    blocks compiled for the old one and run its attention: it compiles its own, which the next start loads."""
    native, math = json.dumps({"attention_backend": "native"}), json.dumps({"attention_backend": "_native_math"})
    starts = {"first (native)": [native], "second (_native_math)": [math], "third (_native_math)": [math]}
    states = [result["compiled_blocks"] for result in _starts(_AOT_SETTINGS_START, tmp_path, starts)]
    assert states[1] == "ahead of time (compiled at the first call)", \
        f"a start with another attention backend used the blocks compiled for the first one: {states}"
    assert states[2] == "ahead of time (loaded while the weights were read)", f"the blocks compiled for the new backend were not kept: {states}"


def test_blocks_compiled_without_autotuning_are_compiled_again_when_a_profile_turns_it_on(tmp_path):
    """`compile_autotune` (#26: inductor's max-autotune, FP8 GEMM templates with fused epilogues) changes the
    compiled code: a start that turns it on must compile its own blocks, autotuned, not load those compiled without;
    the next start with it on loads them."""
    plain, tuned = json.dumps({"compile_autotune": False}), json.dumps({"compile_autotune": True})
    starts = {"first (plain)": [plain], "second (autotune)": [tuned], "third (autotune)": [tuned]}
    states = [result["compiled_blocks"] for result in _starts(_AOT_SETTINGS_START, tmp_path, starts)]
    assert states[1] == "ahead of time (compiled at the first call)", \
        f"a start with compile_autotune on loaded the blocks compiled without it: {states}"
    assert states[2] == "ahead of time (loaded while the weights were read)", f"the autotuned blocks were not kept: {states}"


def test_blocks_compiled_ahead_of_time_serve_a_per_request_lora_as_the_eager_pipeline_does(tmp_path, monkeypatch,
                                                                                          astronaut):
    """A per-request adapter is state the compiled code cannot see (a LoRA branch's tensors): a call with one active
    runs compiled in the process, so the adapter changes the edit exactly as it does eagerly, and without it the
    ahead-of-time code serves again."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from recast.tasks.schemas.requests import LoraRef

    monkeypatch.setenv("RECAST_CACHE_DIR", str(tmp_path / "cache"))
    specialize_float = torch._dynamo.config.specialize_float
    image = Image.open(astronaut).convert("RGB").resize((64, 64))
    outputs = {}
    try:
        for mode, update in (("eager", {}), ("ahead_of_time", {"compile": True, "compile_ahead_of_time": True})):
            profile = get_settings().get_profile("tiny").model_copy(update=dict(update, device="cpu"))
            loading.clear_cache()
            loaded, _ = loading.get_pipeline("edit", profile)
            if mode == "eager":
                generator, state = torch.Generator().manual_seed(0), {}
                for name, module in loaded.pipe.transformer.named_modules():
                    if name.endswith(("attn.to_q", "attn.to_v")):
                        state[f"transformer.{name}.lora_A.weight"] = torch.randn(4, module.in_features,
                                                                                 generator=generator)
                        state[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, 4,
                                                                                 generator=generator)
                save_file(state, str(tmp_path / "adapter.safetensors"))
                adapter = lora.check_lora_file("loras[0].source",
                                               LoraRef(source=str(tmp_path / "adapter.safetensors")))

            def edit(loras=()):
                return np.asarray(qwen_edit.run_edit(loaded, profile, [image], prompt="a tuxedo", negative_prompt=" ",
                                                     seed=1, steps=2, true_cfg_scale=4.0, width=64, height=64,
                                                     loras=loras)).astype(int)

            outputs[mode] = (edit(), edit([adapter]), edit())
            if mode == "ahead_of_time":
                calls = loaded.pipe.transformer.transformer_blocks[0]._recast_ahead_of_time.calls
    finally:
        loading.clear_cache()
        torch._dynamo.config.specialize_float = specialize_float
    (base, with_lora, again), (aot_base, aot_lora, aot_again) = outputs["eager"], outputs["ahead_of_time"]
    assert np.abs(with_lora - base).max() > 8, "the adapter should change the eager edit"
    for what, got, expected in (("without an adapter", aot_base, base), ("with the adapter", aot_lora, with_lora),
                                ("without it again", aot_again, again)):
        assert np.abs(got - expected).max() <= 1, \
            f"{what}, the blocks compiled ahead of time gave another edit ({np.abs(got - expected).max()}/255)"
    assert calls["ahead_of_time"] and calls["in_process"], f"both paths should have served: {calls}"


def test_blocks_that_differ_in_more_than_their_weights_do_not_share_code_compiled_ahead_of_time():
    """One compiled function serves every block only if they differ in weights alone; else each would silently run
    with block 0's settings."""
    from recast.tasks.models import kernels

    profile = get_settings().get_profile("tiny").model_copy(update={"device": "cpu"})
    loading.clear_cache()
    try:
        blocks = kernels.repeated_blocks(loading.get_pipeline("edit", profile)[0].pipe.transformer)
        assert len(blocks) >= 2 and kernels.unshareable(blocks) is None, "the tiny model's blocks should share"
        blocks[1].attn.heads += 1
        reason = kernels.unshareable(blocks)
        blocks[1].attn.heads -= 1
        assert reason and "block 1" in reason, f"a block with another head count was not refused: {reason}"
    finally:
        loading.clear_cache()


_VIDEO_AOT_START = """
import json, sys
import numpy as np
import torch._dynamo.config
torch._dynamo.config.enable_aot_compile = False  # as torch 2.11 (the cards' torch) ships it
from PIL import Image
from recast.tasks.models import loading, prepared, wan_video
from recast.tasks.settings import get_settings

profile = get_settings().get_video_profile("tiny").model_copy(
    update={"warmup": True, "compile": True, "device": "cpu", "compile_ahead_of_time": True})
loaded, _ = loading.get_pipeline("video", profile)
at_ready = prepared.compiled_graphs()
frames = wan_video.run_video(loaded, Image.open(sys.argv[1]).convert("RGB"), prompt="he smiles", negative_prompt="",
                             seed=3, steps=4, guidance_scale=1.0, num_frames=13, width=96, height=64,
                             max_sequence_length=64)
np.save(sys.argv[2], frames)
block = loaded.pipe.transformer.blocks[0]
print(json.dumps({"graphs_at_ready": at_ready, "graphs_in_request": prepared.compiled_graphs() - at_ready,
                  "calls": block._recast_ahead_of_time.calls}))
"""


def test_a_video_worker_warmed_up_on_a_short_clip_compiles_nothing_for_a_longer_one_then_or_after_a_restart(
        tmp_path, astronaut):
    """Cold start (#22): the video warm-up rendered a whole 81-frame clip (13 s of a restart's 24 s on an H200) because
    Wan's blocks were compiled for the clip's exact shape. They now take dynamic shapes and warm up on a short clip:
    a longer request must then compile nothing, at the first start or after a restart that loads the kept code, and
    its clip is the eager pipeline's."""
    import numpy as np

    first, restart = _first_start_and_restart(_VIDEO_AOT_START, astronaut, tmp_path)
    assert first["graphs_in_request"] == 0 and first["calls"]["in_process"] == 0, \
        f"a clip longer than the warm-up's compiled again at the first start: {first}"
    assert restart["graphs_at_ready"] == 0 and restart["graphs_in_request"] == 0 \
        and restart["calls"]["in_process"] == 0 and restart["calls"]["ahead_of_time"] > 0, \
        f"a restart traced graphs or ran its blocks outside the kept code: {restart}"
    eager_profile = get_settings().get_video_profile("tiny").model_copy(update={"device": "cpu"})
    loading.clear_cache()
    try:
        from PIL import Image

        loaded, _ = loading.get_pipeline("video", eager_profile)
        eager = wan_video.run_video(loaded, Image.open(astronaut).convert("RGB"), prompt="he smiles",
                                    negative_prompt="", seed=3, steps=4, guidance_scale=1.0, num_frames=13, width=96,
                                    height=64, max_sequence_length=64).astype(int)
    finally:
        loading.clear_cache()
    for start in ("first", "restart"):
        got = np.load(tmp_path / f"{start}.npy").astype(int)
        assert got.shape == eager.shape and np.abs(got - eager).max() <= 1, \
            f"the {start} start's clip differs from the eager pipeline's by {np.abs(got - eager).max()}/255"
