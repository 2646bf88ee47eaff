"""The Wan VAE's two calls in a 480p clip (#26), under the convolution settings that could make them faster.

The VAE takes ~3.4 s of an 11-13 s `wan22-lightning` clip on an H200 (encode of the conditioning video 1.3 s, decode
of 21 latent frames 2.1 s). Its work is 3-D causal convolutions in bf16, run by cuDNN with its default (heuristic)
algorithm choice. Each variant below times both calls on full-size random weights (median of `--runs`, after one
untimed call that also lets cuDNN autotune) and scores its decoded frames against the default's (relative L2):

    default         what recast runs today
    benchmark       torch.backends.cudnn.benchmark: cuDNN times its algorithms per shape once, keeps the fastest
    channels-last   weights and inputs in channels_last_3d (NDHWC), the layout Hopper's conv kernels prefer
    both            the two together
    fused-norms     channels-last, and each RMS norm with the SiLU after it as one Triton kernel (the profiles'
                    `vae_fused_norms`; on the CPU diffusers' norms run, and the row's `kernel_calls` says 0)

    python wan_vae.py --runs 3 --out ../docs/performance.json      # one card
    python wan_vae.py --tiny                                       # the code path on the CPU

`--photo-dependence HxW` answers another question: which latent frames of the conditioning video (the photo, then 80
zero frames) depend on the photo? Only those would need encoding per clip, the rest could be kept from one encode.
It encodes the video for two different photos with the full-size VAE (random weights) at HxW and prints, per latent
frame, the largest difference between the two encodes relative to the largest latent value; a frame whose difference
is 0 does not depend on the photo. Runs on the CPU at small sizes (`--photo-dependence 32x32`: ~15 s on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from recast.tasks.models import fused_norms, kernels  # noqa: E402

VARIANTS = ("default", "benchmark", "channels-last", "both", "fused-norms")


def build(tiny: bool, device, dtype):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan

    with init_empty_weights(include_buffers=False):
        vae = AutoencoderKLWan(base_dim=8) if tiny else AutoencoderKLWan()
    return common.materialize_random(vae, device, dtype, seed=5).eval().requires_grad_(False)


def timed(call, runs: int, device) -> tuple[float, object]:
    call()  # untimed: kernels loaded, cuDNN's autotuning (benchmark) done
    seconds = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        out = call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a tiny VAE on the CPU: the code path, not the numbers")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None, help="merge the rows into this docs/performance.json")
    ap.add_argument("--results", default=None, help="also write each row here as it ends (JSON lines)")
    ap.add_argument("--photo-dependence", metavar="HxW", default=None,
                    help="which conditioning latents depend on the photo (module docstring), at this frame size")
    args = ap.parse_args()
    if args.photo_dependence:
        return photo_dependence(args.photo_dependence)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    frames, height, width = (5, 32, 48) if args.tiny else (81, 480, 832)
    vae = build(args.tiny, device, dtype)
    generator = torch.Generator(device="cpu").manual_seed(0)
    # The I2V conditioning video: the photo, then zero frames; and a clip's latents to decode.
    video = torch.zeros(1, 3, frames, height, width, dtype=dtype)
    video[:, :, 0] = torch.rand(1, 3, height, width, generator=generator, dtype=torch.float32).to(dtype) * 2 - 1
    latents = torch.randn(1, vae.config.z_dim, (frames - 1) // 4 + 1, height // 8, width // 8, generator=generator,
                          dtype=torch.float32).to(dtype)
    video, latents = video.to(device), latents.to(device)
    run = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": common.recorded_command(sys.argv), "versions": common.versions()}
    reference = None
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        torch.backends.cudnn.benchmark = variant in ("benchmark", "both")
        layout = torch.channels_last_3d if variant in ("channels-last", "both", "fused-norms") \
            else torch.contiguous_format
        kernels.set_convolution_layout(vae, layout)  # what the video recipe does on a card (channels-last)
        model = vae
        if variant == "fused-norms":  # on a copy: the other variants keep diffusers' norms
            model = copy.deepcopy(vae)
            fused_norms.fuse_wan_vae(model)
        calls = fused_norms.fused_calls()
        inputs, codes = video.contiguous(memory_format=layout), latents.contiguous(memory_format=layout)
        with torch.inference_mode():
            encode_s, _ = timed(lambda: model.encode(inputs).latent_dist.mode(), args.runs, device)
            decode_s, frames_out = timed(lambda: model.decode(codes).sample, args.runs, device)
        del model
        frames_out = frames_out.float()
        if reference is None:
            reference = frames_out
        error = float((frames_out - reference).norm() / reference.norm().clamp_min(1e-12))
        row = dict(stage="vae", profile="wan22-vae", variant=variant, card=common.card_name(device), gpus=1,
                   encode_s=round(encode_s, 3), decode_s=round(decode_s, 3), seconds=round(encode_s + decode_s, 3),
                   rel_l2_vs_default=round(error, 5), shape=f"{frames}x{height}x{width}", dtype=str(dtype),
                   kernel_calls=fused_norms.fused_calls() - calls, run=run)
        common.record(row, args.results, args.out)
    torch.backends.cudnn.benchmark = False
    return 0


def photo_dependence(size: str) -> int:
    """Per latent frame of the I2V conditioning encode: how much two photos' encodes differ (module docstring)."""
    height, width = (int(side) for side in size.lower().split("x"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = build(False, device, torch.float32)
    generator = torch.Generator(device="cpu").manual_seed(0)

    def encode() -> torch.Tensor:
        video = torch.zeros(1, 3, 81, height, width)
        video[:, :, 0] = torch.rand(3, height, width, generator=generator) * 2 - 1
        with torch.inference_mode():
            return vae.encode(video.to(device)).latent_dist.mode().float().cpu()

    first, second = encode(), encode()
    scale = float(first.abs().max())
    relative = [float((first[:, :, t] - second[:, :, t]).abs().max()) / scale for t in range(first.shape[2])]
    print(f"conditioning latents {tuple(first.shape)} ({height}x{width}, 81 frames, float32, "
          f"{common.card_name(device)}); per latent frame, the largest difference between two photos' encodes "
          "over the largest latent value:")
    print("  " + "  ".join(f"{t}: {value:.2g}" for t, value in enumerate(relative)))
    independent = [t for t, value in enumerate(relative) if value == 0]
    print(f"latent frames that do not depend on the photo: {independent or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
