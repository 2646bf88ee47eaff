"""More GPUs for one edit: the team code on the CPU (gloo), two ranks sharing the machine as the issue allows for
a functional test. CFG-parallel must give the one-process image, byte for byte; a multi-rank worker serves
Prefect jobs from rank 0 and dies whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from test_workers import BIN, free_port, stop, wait_for

SCRIPT = textwrap.dedent("""
    import hashlib, os, sys
    from PIL import Image
    from recast.tasks.models import loading, parallel, qwen_edit
    from recast.tasks.settings import get_settings

    rank, world, port, cfg = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    if rank == 0:
        loading.check_available(get_settings().get_profile("tiny"))  # the tiny model, built before the team
    if world > 1:
        parallel.join(rank, world, "cpu", cfg=cfg > 1, master=f"127.0.0.1:{port}")
    profile = get_settings().get_profile("tiny")
    loaded, _ = loading.get_pipeline("edit", profile)
    image = Image.open(sys.argv[5]).convert("RGB").resize((96, 96))
    encoder, encodes = loaded.pipe.text_encoder, []
    encoder.register_forward_hook(lambda *_: encodes.append(1))
    out = qwen_edit.run_edit(loaded, profile, [image], prompt="James Bond 007, tuxedo", negative_prompt=" ",
                             seed=11, steps=3, true_cfg_scale=cfg, width=96, height=96)
    print(hashlib.sha256(out.tobytes()).hexdigest(), len(encodes))
    parallel.leave()
    sys.stdout.flush()
    os._exit(0)  # skips the interpreter's teardown, where torch's gloo threads aborted once under a full test load
""")


def _ranks(script: str, world: int, *args) -> list[str]:
    """Run `script` as a team of `world` CPU processes (argv: rank, world, port, *args); each rank's last line."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(rank), str(world), str(port), *map(str, args)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(world)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    return [out.strip().splitlines()[-1] for out, _ in outs]


def _run_team(world: int, cfg: float, astronaut) -> list[tuple[str, int]]:
    """Each rank's image digest and how many times it ran the text encoder."""
    lines = [line.split() for line in _ranks(SCRIPT, world, cfg, astronaut)]
    return [(digest, int(encodes)) for digest, encodes in lines]


def test_cfg_parallel_on_two_ranks_gives_the_one_process_image(astronaut):
    (one, one_encodes), = _run_team(1, 4.0, astronaut)
    two = _run_team(2, 4.0, astronaut)
    assert [digest for digest, _ in two] == [one, one], \
        "CFG-parallel must give the one-GPU image, byte for byte, on every rank (same weights, seed, kernels)"
    # The text encoder reads the image as well as the prompt: one process encodes the prompt and the negative
    # prompt; each rank of a CFG pair encodes only its own branch's.
    assert one_encodes == 2 and [encodes for _, encodes in two] == [1, 1], (one_encodes, two)


def test_a_multi_rank_worker_serves_jobs_and_dies_whole(workers_env, tmp_path, astronaut):
    env = dict(workers_env, OMP_NUM_THREADS="1")
    log = tmp_path / "team.log"
    worker = subprocess.Popen([str(BIN / "recast"), "worker", "edit", "--gpus", "0,1"], env=env, stdout=open(log, "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "Subscribing to runs" in log.read_text() or worker.poll() is not None, 240, "the team")
        assert worker.poll() is None, log.read_text()[-3000:]
        followers = _children(worker.pid)
        assert followers, "rank 1 must run in a process of its own"
        args = [str(BIN / "recast"), "edit", str(astronaut), "--prompt", "James Bond 007, tuxedo", "--seed", "5",
                "--steps", "3", "--width", "96", "--height", "96", "--storage", str(tmp_path / "s"), "--json"]
        team_run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert team_run.returncode == 0, team_run.stderr[-3000:]
    finally:
        os.kill(worker.pid, signal.SIGKILL)  # the lead rank dies: every rank must go with it
        worker.wait(timeout=30)
    wait_for(lambda: not [pid for pid in followers if _alive(pid)], 30, "the followers to exit with the lead")
    local = subprocess.run(args[:-3] + ["--storage", str(tmp_path / "local"), "--json"],
                           env=dict(env, RECAST_EXECUTION="local"), capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-2000:]
    from recast.tasks import storage

    team_png = storage.read_bytes(json.loads(team_run.stdout)["edits"][0]["output"])
    local_png = storage.read_bytes(json.loads(local.stdout)["edits"][0]["output"])
    assert team_png == local_png, "the two-rank worker must give the one-process image"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    return [int(out[i]) for i in range(0, len(out), 2) if int(out[i + 1]) == pid]


def _alive(pid: int) -> bool:
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


VAE_SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    import numpy as np, torch
    from recast.tasks.models import loading, parallel
    from recast.tasks.settings import get_settings

    from diffusers import AutoencoderKLWan

    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    profile = get_settings().get_video_profile("tiny")
    if rank == 0:
        loading.check_available(profile)
    parallel.join(rank, world, "cpu", cfg=True, master=f"127.0.0.1:{port}")
    vae = loading.get_pipeline("video", profile)[0].pipe.vae  # a team's pipeline: its VAE is split
    alone = AutoencoderKLWan.from_pretrained(loading.resolve_source(profile), subfolder="vae")  # the same, whole
    torch.manual_seed(0)
    video = torch.rand(1, 3, 9, 64, 512) * 2 - 1  # 9 frames of 64 x 512: 8 x 64 latent columns
    latents = torch.randn(1, vae.config.z_dim, 3, 8, 64)
    other = torch.randn(1, vae.config.z_dim, 3, 8, 64)
    widths = []
    vae.decoder.register_forward_pre_hook(lambda m, a, *_: widths.append(a[0].shape[-1]))
    with torch.inference_mode():
        whole = (alone.encode(video).latent_dist.mode(), alone.decode(latents).sample, alone.decode(other).sample)
        split = (vae.encode(video).latent_dist.mode(), vae.decode(latents).sample)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # relative L2 error
    print(json.dumps(dict(
        digest=hashlib.sha256(split[1].numpy().tobytes()).hexdigest(), widths=sorted(set(widths)),
        shapes=[list(t.shape) for t in split] == [list(t.shape) for t in whole[:2]],
        encode_error=rel(split[0], whole[0]), decode_error=rel(split[1], whole[1]),
        unrelated_error=rel(whole[2], whole[1]))))
    parallel.leave()
    sys.stdout.flush()
    os._exit(0)  # skips the interpreter's teardown, where torch's gloo threads aborted once under a full test load
""")


def test_vae_split_over_two_ranks_decodes_bands_that_join_into_the_whole_frame():
    # Each rank runs the VAE on a band of the frame's width (32 of 64 latent columns, plus the halo its
    # convolutions reach: 14 for the tiny decoder), and the joined clip and latents must be the one-process
    # ones, up to the order of float sums; the bound must reject a clip of other latents.
    ranks = [json.loads(line) for line in _ranks(VAE_SCRIPT, 2)]
    assert ranks[0]["digest"] == ranks[1]["digest"], "the ranks hold different clips after the join"
    assert all(r["shapes"] for r in ranks), "the split encode/decode changed the output's shape"
    assert ranks[0]["widths"] == [46], f"each rank must decode its band plus halo (46 of 64 columns): {ranks[0]}"
    bound = 1e-4  # relative L2 error against the whole-frame VAE
    assert ranks[0]["decode_error"] < bound and ranks[0]["encode_error"] < bound, \
        f"the joined bands stray from the whole-frame VAE: {ranks[0]}"
    assert ranks[0]["unrelated_error"] > bound, f"the bound would not catch a wrong clip: {ranks[0]}"


CLIP_SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    import numpy as np
    from PIL import Image
    from recast.tasks.models import loading, parallel, wan_video
    from recast.tasks.settings import get_settings

    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    profile = get_settings().get_video_profile("tiny")
    if rank == 0:
        loading.check_available(profile)
    if world > 1:
        parallel.join(rank, world, "cpu", cfg=True, master=f"127.0.0.1:{port}")
    loaded, _ = loading.get_pipeline("video", profile)
    widths = []
    loaded.pipe.vae.decoder.register_forward_pre_hook(lambda m, a, *_: widths.append(a[0].shape[-1]))
    image = Image.open(sys.argv[4]).convert("RGB").resize((256, 64))
    frames = wan_video.run_video(loaded, image, prompt="James Bond 007, tuxedo", negative_prompt="", seed=5, steps=2,
                                 guidance_scale=3.0, num_frames=9, width=256, height=64,
                                 max_sequence_length=profile.max_sequence_length)
    np.save(f"{sys.argv[5]}/clip-{world}-{rank}.npy", frames)
    print(json.dumps(dict(widths=sorted(set(widths)))))
    if world > 1:
        parallel.leave()
    sys.stdout.flush()
    os._exit(0)  # skips the interpreter's teardown, where torch's gloo threads aborted once under a full test load
""")


def test_a_two_rank_clip_splits_its_vae_and_matches_the_one_process_clip(astronaut, tmp_path):
    # The whole pipeline on a team (CFG-parallel, the VAE split by bands): the i2v pipeline's own encode of the
    # conditioning video and decode of the clip go through the split, and the clip is the one-process clip.
    one, two = ([json.loads(line) for line in _ranks(CLIP_SCRIPT, world, astronaut, tmp_path)] for world in (1, 2))
    assert one[0]["widths"] == [32] and two[0]["widths"] == [30], \
        f"the team's ranks must decode bands of the clip's 32 latent columns (16 + a halo of 14): {one} {two}"
    alone = np.load(tmp_path / "clip-1-0.npy").astype(np.float64)
    ranks = [np.load(tmp_path / f"clip-2-{rank}.npy") for rank in range(2)]
    assert np.array_equal(ranks[0], ranks[1]), "the two ranks hold different clips"
    error = np.abs(ranks[0].astype(np.float64) - alone)
    assert ranks[0].shape == alone.shape and error.max() <= 1, \
        f"the team's clip differs from the one-process clip by up to {error.max()} levels of 255"
