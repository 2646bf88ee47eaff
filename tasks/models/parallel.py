"""More GPUs for one edit or one clip: a team of processes, one per GPU, under torch.distributed.

Every rank holds the whole pipeline. Rank 0 takes the job (a Prefect task run) and hands the call to the others
(`lead`), every rank makes the same pipeline call (`follow` on the others), and the transformer's work is split:

- CFG-parallel. The pipelines call the transformer twice per step, in diffusers' `cache_context("cond")` and
  then `cache_context("uncond")`. At the conditional call half of the team computes the conditional branch and
  the other half the unconditional one (the negative prompt's encoding, recorded when the pipeline encoded it,
  swapped in; for the edit, whose text encoder reads the image too, each half encodes only its own prompt); one
  all-gather gives every rank both, and the unconditional call returns its half without
  computing. Every rank then takes the same scheduler step, so the latents stay identical on every rank, and
  equal to the one-GPU path's: same weights, same seed, same kernels (rank 0's attention choice is broadcast).
- Ulysses sequence parallelism (diffusers' ContextParallelConfig) over the ranks within each half, when the team
  is larger than 2, or when the recipe has no CFG (the Lightning profiles): heads are exchanged all-to-all, so
  the degree must divide them (Qwen-Image 24, Wan 40).
- The clip's VAE encode and decode over the whole team (`VaeSplit`): each rank takes a band of the frame's width
  with the halo its convolutions reach, its mid-block attention sees every band's keys, and one all-gather joins
  the bands: the whole-frame result, split. diffusers' Wan VAE has no parallel path, and at 480x832 its encode and
  decode are 3.35 s of a 13.2 s 4-step clip on one H100 (1.23 s saved on 4 H100s, docs/PERFORMANCE.md).

A team of one is no team: the single-GPU path is unchanged.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("recast.parallel")


@dataclass
class Team:
    rank: int
    world: int
    cfg_degree: int  # 2: the two CFG branches on two halves of the team; 1: no CFG split
    ulysses_degree: int  # ranks sharing one branch's sequence
    device: str
    pair: Any = None  # this rank's CFG process group (itself and its counterpart in the other half)
    mesh: Any = None
    wrappers: list = field(default_factory=list)
    serving: bool = False  # set once every rank has loaded and warmed up in step: from then on rank 0 leads

    @property
    def leads(self) -> bool:
        return self.rank == 0

    @property
    def uncond_half(self) -> bool:
        return self.cfg_degree == 2 and self.rank >= self.world // 2


_TEAM: Team | None = None
SPLIT_VAE = True  # False: every rank runs the whole VAE (the benchmark's "+whole-vae" rows, for comparison)


def team() -> Team | None:
    return _TEAM


def join(rank: int, world: int, device: str, cfg: bool, master: str = "127.0.0.1:29511") -> Team:
    """Join the team (every rank, at start): the process group, the CFG pairs and the sequence mesh."""
    global _TEAM
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    # The address given, not MASTER_ADDR/MASTER_PORT from the environment: a process that leaves one team and
    # joins another (the benchmark, one team per row) must meet the others at the new address.
    dist.init_process_group(backend, init_method=f"tcp://{master}", rank=rank, world_size=world)
    cfg_degree = 2 if cfg and world % 2 == 0 else 1
    ulysses = world // cfg_degree
    pair = None
    if cfg_degree == 2:
        for first in range(world // 2):  # every rank creates every group, in the same order
            group = dist.new_group([first, first + world // 2])
            if rank in (first, first + world // 2):
                pair = group
    mesh = None
    if ulysses > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cuda" if backend == "nccl" else "cpu", (cfg_degree, 1, ulysses),
                                mesh_dim_names=("cfg", "ring", "ulysses"))
    _TEAM = Team(rank=rank, world=world, cfg_degree=cfg_degree, ulysses_degree=ulysses, device=device, pair=pair,
                 mesh=mesh)
    log.info("rank %d of %d: CFG degree %d, Ulysses degree %d on %s", rank, world, cfg_degree, ulysses, device)
    return _TEAM


def leave() -> None:
    global _TEAM
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _TEAM = None


# --------------------------------------------------------------------------------------------------
# Splitting the work on a loaded pipeline


def apply(pipe, transformers: list, kind: str) -> None:
    """Make this team's ranks share the pipeline's transformer work (call after loading, before compiling)."""
    current = team()
    if current is None or current.world == 1:
        return
    if current.ulysses_degree > 1:
        from diffusers import ContextParallelConfig

        for transformer in transformers:
            heads = transformer.config.num_attention_heads
            if heads % current.ulysses_degree:
                raise ValueError(f"{heads} attention heads do not split over a Ulysses degree of "
                                 f"{current.ulysses_degree}: use a team size whose half divides {heads}")
            # ulysses_anything: Qwen's text tokens (the prompt's length) rarely divide by the degree; diffusers
            # then exchanges uneven shares (each rank's size is sent first) instead of refusing.
            transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=current.ulysses_degree,
                                                                        mesh=current.mesh, ulysses_anything=True))
    if current.cfg_degree == 2:
        current.wrappers.append(CfgSplit(pipe, transformers, kind, current))
    if kind == "video" and SPLIT_VAE and getattr(pipe, "vae", None) is not None and reach(pipe.vae.config) is not None:
        VaeSplit(pipe.vae, current)


class CfgSplit:
    """The conditional and unconditional transformer calls of each step, computed at once on two halves."""

    def __init__(self, pipe, transformers: list, kind: str, current: Team):
        self.team, self.kind = current, kind
        self.encodings: list = []
        self.active = False
        self.pending = None
        self.branch: str | None = None
        self.negative_prompt: str | None = None
        encode = pipe.encode_prompt

        def recording_encode(*args, **kwargs):
            if self.active and kind == "edit" and self.negative_prompt is not None and "prompt" in kwargs:
                # Qwen encodes the prompt, then the negative prompt, each with the image. A half computes one
                # branch, so it encodes one: the conditional half the prompt, the unconditional half the negative
                # prompt (at the first call). The other call returns the same tensors, which reach only the
                # transformer call that split_forward skips or swaps.
                if self.encodings:
                    out = self.encodings[0]
                else:
                    mine = dict(kwargs, prompt=self.negative_prompt) if current.uncond_half else kwargs
                    out = encode(*args, **mine)
            else:
                out = encode(*args, **kwargs)
            self.encodings.append(out)
            return out

        pipe.encode_prompt = recording_encode
        for transformer in transformers:
            self._wrap(transformer)

    def start(self, cfg: bool, negative_prompt: str | None = None) -> None:
        """Before each pipeline call: whether this call runs CFG (it must be the same on every rank), and the
        negative prompt the unconditional half encodes in place of the prompt."""
        self.active, self.encodings, self.pending = cfg, [], None
        self.negative_prompt = negative_prompt

    def _negative(self, kwargs: dict) -> dict:
        """The unconditional branch's arguments, from what the pipeline encoded."""
        if self.kind == "edit":  # Qwen: encode_prompt ran for the prompt, then the negative prompt
            embeds, mask = self.encodings[1]
            return dict(kwargs, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask)
        _, negative = self.encodings[0]  # Wan: one call returns (prompt, negative) embeddings
        dtype = kwargs["encoder_hidden_states"].dtype
        return dict(kwargs, encoder_hidden_states=negative.to(dtype))

    def _wrap(self, transformer) -> None:
        import torch
        import torch.distributed as dist

        forward, cache_context = transformer.forward, transformer.cache_context
        split = self

        class _Branch:
            def __init__(self, name):
                self.name, self.inner = name, cache_context(name)

            def __enter__(self):
                split.branch = self.name
                return self.inner.__enter__()

            def __exit__(self, *exc):
                split.branch = None
                return self.inner.__exit__(*exc)

        def split_forward(*args, **kwargs):
            if not split.active or split.branch not in ("cond", "uncond"):
                return forward(*args, **kwargs)
            if split.branch == "uncond":
                pending, split.pending = split.pending, None
                return (pending,)
            mine = forward(*args, **(split._negative(kwargs) if split.team.uncond_half else kwargs))[0]
            mine = mine.contiguous()
            rows = mine.shape[0]
            both = torch.empty((2 * rows, *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
            dist.all_gather_into_tensor(both, mine, group=split.team.pair)  # [conditional; unconditional]
            split.pending = both[rows:].clone()
            return (both[:rows].clone(),)

        transformer.forward = split_forward
        transformer.cache_context = _Branch


class VaeSplit:
    """The Wan VAE's encode (the conditioning video) and decode (the clip), each rank a band of the frame's width,
    equal to the whole-frame result (up to the order of float sums).

    Two things make a band exact. A halo: the band computes `halo` latent columns beyond each edge and drops
    them, as many as the VAE's 3-wide convolutions reach in all (`reach`), so near a seam they see what the whole
    frame shows them. And the mid-block attention, the one layer that sees the whole frame: each rank's queries
    attend to the keys and values of every rank's band, gathered. The attention has no positions, so the order
    in which the bands' keys arrive does not matter.

    Wraps the VAE's `_encode` / `_decode`, which diffusers calls once per clip from `encode` / `decode` with the
    whole (1, C, frames, H, W) tensor; every rank calls them in step, on the same input."""

    def __init__(self, vae, current: Team):
        self.team = current
        self.core: tuple[int, int] | None = None  # this rank's band inside the columns it computes, while it runs
        self.width = 0  # the columns it computes
        self.sizes: list[int] = []  # every rank's band width, in columns
        ratio = vae.spatial_compression_ratio  # pixels per latent column
        encode, decode = vae._encode, vae._decode
        encode_halo, decode_halo = reach(vae.config)

        def split_encode(x):
            return self.banded(encode, x, in_scale=ratio, out_scale=1, halo=encode_halo)

        def split_decode(z, return_dict: bool = True):
            from diffusers.models.autoencoders.vae import DecoderOutput

            frames = self.banded(lambda band: decode(band, return_dict=True).sample, z, in_scale=1, out_scale=ratio,
                                 halo=decode_halo)
            return DecoderOutput(sample=frames) if return_dict else (frames,)

        vae._encode, vae._decode = split_encode, split_decode
        for coder in (vae.encoder, vae.decoder):
            for block in coder.mid_block.attentions:
                block.forward = functools.partial(self.attention, block)

    def bands(self, columns: int) -> list[tuple[int, int]]:
        """Each rank's share of `columns` latent columns, as even as they divide."""
        world = self.team.world
        edges = [columns * rank // world for rank in range(world + 1)]
        return list(zip(edges[:-1], edges[1:]))

    def banded(self, fn, x, in_scale: int, out_scale: int, halo: int):
        """fn over this rank's band of x's last axis (plus halo), the bands of every rank joined in order."""
        import torch

        columns = x.shape[-1] // in_scale
        bands = self.bands(columns)
        spans = [(max(0, start - halo), min(columns, stop + halo)) for start, stop in bands]
        if x.shape[-1] % in_scale or all(span == (0, columns) for span in spans):  # too narrow to share
            return fn(x)
        (start, stop), (low, high) = bands[self.team.rank], spans[self.team.rank]
        self.core, self.width, self.sizes = (start - low, stop - low), high - low, [b - a for a, b in bands]
        try:
            out = fn(x[..., low * in_scale:high * in_scale])
        finally:
            self.core = None
        mine = out[..., (start - low) * out_scale:(stop - low) * out_scale]
        parts = _gather_uneven(mine, [size * out_scale for size in self.sizes], dim=-1)
        return torch.cat(parts, dim=-1)

    def attention(self, block, x):
        """WanAttentionBlock.forward (one head over a frame's positions, per frame), with the keys and values of
        every rank's band."""
        import torch
        import torch.nn.functional as F

        if self.core is None:
            return type(block).forward(block, x)
        identity = x
        batch, channels, time, height, width = x.shape
        if width != self.width:  # the mid block runs at latent scale; anything else is a VAE this does not know
            raise RuntimeError(f"VAE attention over {width} columns, expected the band's {self.width}")
        x = block.norm(x.permute(0, 2, 1, 3, 4).reshape(batch * time, channels, height, width))
        q, k, v = block.to_qkv(x).chunk(3, dim=1)  # (frames, C, H, W) each
        first, last = self.core
        keys = [part.flatten(2) for part in _gather_uneven(k[..., first:last].contiguous(), self.sizes, dim=-1)]
        values = [part.flatten(2) for part in _gather_uneven(v[..., first:last].contiguous(), self.sizes, dim=-1)]
        as_tokens = lambda t: t.transpose(1, 2).unsqueeze(1)  # (frames, C, N) -> (frames, 1, N, C)
        out = F.scaled_dot_product_attention(as_tokens(q.flatten(2)), as_tokens(torch.cat(keys, dim=2)),
                                             as_tokens(torch.cat(values, dim=2)))
        out = block.proj(out.squeeze(1).transpose(1, 2).reshape(batch * time, channels, height, width))
        return out.view(batch, time, channels, height, width).permute(0, 2, 1, 3, 4) + identity


def reach(config) -> tuple[int, int] | None:
    """Latent columns the Wan VAE's convolutions reach across, in all, for the encoder and the decoder: the halo a
    band needs to be exact. Every 3-wide convolution reaches one column at its own scale (a stride-2 downsample,
    padded on one side, two); rounded up. On the full-size Wan 2.1 VAE (Wan 2.2 A14B's) with its attention made
    local, a change to one column reaches 17.25 columns through the decoder and 14 through the encoder: 18 and 15
    here. None for the VAE with residual blocks between scales and patches (Wan 2.2's 5B), which is not counted
    here and runs whole on every rank."""
    if getattr(config, "is_residual", False) or getattr(config, "patch_size", None):
        return None
    stages, blocks = len(config.dim_mult), config.num_res_blocks
    # Encoder: conv_in, then per scale `blocks` residual blocks (two convolutions each) and a downsample, in pixels
    # of its own scale; then, at latent scale, the mid block's two residual blocks and the output convolution.
    pixels = 1 + sum(2 * blocks * 2**i for i in range(stages)) + sum(2 * 2**i for i in range(stages - 1))
    encoder = pixels / 2 ** (stages - 1) + 4 + 1
    # Decoder: conv_in and the mid block at latent scale, then per scale `blocks + 1` residual blocks and an
    # upsample (its convolution at the next scale), and the output convolution at pixel scale.
    decoder = (1 + 4 + sum(2 * (blocks + 1) / 2**i for i in range(stages))
               + sum(1 / 2 ** (i + 1) for i in range(stages - 1)) + 1 / 2 ** (stages - 1))
    return math.ceil(encoder), math.ceil(decoder)


def _gather_uneven(tensor, sizes: list[int], dim: int) -> list:
    """Every rank's `tensor`, whose length along `dim` is sizes[rank], from every rank (padded for all_gather)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    dim = dim % tensor.dim()
    padding = [0, 0] * (tensor.dim() - 1 - dim) + [0, max(sizes) - tensor.shape[dim]]
    padded = F.pad(tensor, padding).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [part.narrow(dim, 0, size) for part, size in zip(parts, sizes)]


def fullgraph() -> bool:
    """Whether regional compilation may demand whole graphs: not under Ulysses, whose attention hooks dynamo cannot
    trace (on an H100 team: "Unsupported: Unexpected type in sourceless builder"); there the blocks compile with
    a graph break around the exchange."""
    current = team()
    return current is None or current.ulysses_degree == 1


def starting_call(cfg: bool, negative_prompt: str | None = None) -> None:
    """Every rank, before a pipeline call."""
    current = team()
    if current is not None:
        for wrapper in current.wrappers:
            wrapper.start(cfg, negative_prompt)


# --------------------------------------------------------------------------------------------------
# The lead rank hands each call to the others


def lead(name: str, payload: dict) -> None:
    """Rank 0, before a pipeline call: tell the followers to make the same call."""
    current = team()
    if current is None or current.world == 1 or not current.leads or not current.serving:
        return
    import torch.distributed as dist

    dist.broadcast_object_list([(name, payload)], src=0)


def follow(handlers: dict) -> None:
    """The other ranks, forever: receive each call from rank 0 and make it; ("stop", {}) ends the loop."""
    import torch.distributed as dist

    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        name, payload = message[0]
        if name == "stop":
            return
        handlers[name](**payload)


def dismiss() -> None:
    """Rank 0, when it stops: release the followers."""
    lead("stop", {})
