"""LoRA adapters: per-request adapters switched on a loaded pipeline, and distillation LoRAs fused at load.

Per-request adapters work the same on every profile, bf16 or quantized. Each adapted linear layer (nn.Linear,
or recast's FP8 / INT4 layers) computes its own output and then adds a low-rank branch beside it,

    y = base(x) + sum over active adapters of  weight * scale * B (A x)

with A and B kept in the compute dtype and never merged into the weight. So quantized weights stay untouched,
switching adapters between requests reloads nothing, and a request without adapters (or at weight 0) gets the
base output bit for bit. The branch is a forward hook installed on every eligible layer when the pipeline is
prepared, before any compilation, so compiled blocks contain it and recompile when the set of active
adapters changes shape.

Files are checked before a run (header first, size-capped, pinned by SHA-256) and checked again by hash when
used. A file that does not fit the model is refused as a whole: nothing of it is attached.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from recast.tasks import storage
from recast.tasks.errors import BadInput, Permanent
from recast.tasks.schemas.jobs import ResolvedLora
from recast.tasks.schemas.requests import LoraRef
from recast.tasks.settings import cache_dir

log = logging.getLogger("recast.models")

MAX_LORA_BYTES = 2 * 2**30  # larger than any LoRA of a 20 B model; keeps a typo'd checkpoint out of memory


class BadLora(Permanent, ValueError):
    """A LoRA file that cannot be applied to this model; the pipeline is left as it was."""


# --------------------------------------------------------------------------------------------------
# Before the run: check the file


def check_lora_file(field: str, lora: LoraRef, max_bytes: int = MAX_LORA_BYTES,
                    roots: list[str] | None = None) -> ResolvedLora:
    """Check a request's LoRA file (exists, size, safetensors header, LoRA tensors) and pin it by SHA-256. With
    `roots` (a run from the UI, the API or a schedule) the file is read only if it lies under them as opened, and
    what is checked is a copy of those bytes, never the name again."""
    uri = storage.check_scheme(field, lora.source)
    if not storage.exists(uri):
        raise BadInput(field, lora.source, "file does not exist", "pass a diffusers-format LoRA .safetensors file")
    size = storage.size(uri)
    if size > max_bytes:
        raise BadInput(field, lora.source, f"file is {size / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB "
                       "a LoRA may have", "pass a LoRA file, not a full model checkpoint")
    local, sha = _local_copy(uri, max_bytes, roots=roots, field=field)
    try:
        from safetensors import safe_open

        with safe_open(str(local), framework="pt") as f:  # reads the header only
            keys = list(f.keys())
    except Exception as exc:  # noqa: BLE001 - any parse failure means the same thing to the user
        raise BadInput(field, lora.source, f"not a safetensors file ({str(exc).splitlines()[0][:120]})",
                       "pass a diffusers-format LoRA .safetensors file") from None
    if not any("lora" in key.lower() for key in keys):
        raise BadInput(field, lora.source, "holds no LoRA tensors (no lora_A / lora_B keys)",
                       "pass a LoRA file, not a full model checkpoint")
    return ResolvedLora(name=f"lora-{sha[:12]}", source=uri, weight=lora.weight, sha256=sha)


def _local_copy(uri: str, max_bytes: int, roots: list[str] | None = None, field: str = "lora") -> tuple[Path, str]:
    """A local file with the LoRA's bytes (the file itself when local and unrestricted; else a copy in the cache)
    and its SHA-256, read in chunks."""
    digest = hashlib.sha256()
    if storage.scheme_of(uri) == "file" and roots is None:
        local = Path(storage.local_path(uri))
        for chunk in storage.read_chunks(uri, max_bytes):
            digest.update(chunk)
        return local, digest.hexdigest()
    data = b"".join(storage.read_chunks(uri, max_bytes, roots=roots, field=field))
    sha = hashlib.sha256(data).hexdigest()
    target = cache_dir() / "loras" / f"{sha}.safetensors"
    if not target.exists():
        storage.write_bytes(f"file://{target}", data)
    return target, sha


def lora_file(lora: ResolvedLora) -> Path:
    """The local file of a checked LoRA, verified against the SHA-256 it was pinned with."""
    local, sha = _local_copy(lora.source, MAX_LORA_BYTES)
    if sha != lora.sha256:
        raise BadLora(f"LoRA {storage.redact(lora.source)} changed since the request was checked "
                      f"(SHA-256 {sha[:12]}, expected {lora.sha256[:12]})")
    return local


# --------------------------------------------------------------------------------------------------
# On the loaded pipeline: low-rank branches beside the weights


def _linear_like(module) -> bool:
    return hasattr(module, "in_features") and hasattr(module, "out_features")


def install_branches(transformer) -> int:
    """Give every linear layer of the transformer blocks an (empty) LoRA branch; call before compiling."""
    count = 0
    for block_list in _block_lists(transformer):
        for module in block_list.modules():
            if _linear_like(module) and not hasattr(module, "_recast_lora"):
                module._recast_lora = ()
                module.register_forward_hook(_add_lora_branches)
                count += 1
    return count


def _block_lists(transformer):
    for name in ("transformer_blocks", "blocks"):  # Qwen-Image, Wan
        blocks = getattr(transformer, name, None)
        if blocks is not None:
            yield blocks


def _add_lora_branches(module, args, output):
    active = module._recast_lora
    if not active:
        return None  # no adapter: the base output, untouched
    import torch.nn.functional as F

    x = args[0]
    for down, up, scale in active:
        output = output + (scale * F.linear(F.linear(x.to(down.dtype), down), up)).to(output.dtype)
    return output


def read_adapter(pipe, path: Path, source: str, dtype) -> dict[str, tuple]:
    """{module name: (A, B, alpha/rank)} for the transformer, every layer checked before anything is attached."""
    try:
        state, metadata = pipe.lora_state_dict(str(path), return_lora_metadata=True)
    except Exception as exc:  # noqa: BLE001 - any load failure leaves the pipeline as it was
        raise BadLora(f"LoRA {storage.redact(source)} does not fit this model ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:300]})") from None
    alpha = (metadata or {}).get("lora_alpha") if isinstance(metadata, dict) else None
    modules = dict(pipe.transformer.named_modules())
    pairs: dict[str, dict] = {}
    for key, tensor in state.items():
        if not key.startswith("transformer.") or ".lora_" not in key:
            continue
        name, _, part = key.removeprefix("transformer.").rpartition(".lora_")
        pairs.setdefault(name, {})[part.split(".")[0]] = tensor
    if not pairs:
        raise BadLora(f"LoRA {storage.redact(source)} has no weights for this model's transformer layers")
    adapter = {}
    for name, parts in sorted(pairs.items()):
        layer = modules.get(name)
        down, up = parts.get("A"), parts.get("B")
        problem = None
        if layer is None or not hasattr(layer, "_recast_lora"):
            problem = f"the model has no adaptable layer {name}"
        elif down is None or up is None:
            problem = f"{name} lacks lora_A or lora_B"
        elif down.shape[1] != layer.in_features or up.shape[0] != layer.out_features or down.shape[0] != up.shape[1]:
            problem = (f"{name}: A is {tuple(down.shape)}, B is {tuple(up.shape)}, the layer maps "
                       f"{layer.in_features} -> {layer.out_features}")
        if problem:
            raise BadLora(f"LoRA {storage.redact(source)} does not fit this model ({problem})")
        rank = down.shape[0]
        scale = float(alpha) / rank if alpha else 1.0
        device = next(layer.parameters()).device
        adapter[name] = (down.to(device, dtype), up.to(device, dtype), scale)
    return adapter


def use_loras(loaded, loras: list[ResolvedLora]) -> None:
    """Make exactly `loras` active (at their weights) on the loaded pipeline, reading new ones once.

    Adapters stay loaded between requests, so switching back and forth reloads nothing. Called with the
    pipeline's call lock held.
    """
    from recast.tasks.models.loading import torch_dtype

    pipe = loaded.pipe
    for lora in loras:
        if lora.name not in loaded.adapters:
            loaded.adapters[lora.name] = read_adapter(pipe, lora_file(lora), lora.source, torch_dtype(loaded.key.dtype))
    active: dict[str, list] = {}
    for lora in loras:
        if lora.weight == 0:
            continue
        for name, (down, up, scale) in loaded.adapters[lora.name].items():
            active.setdefault(name, []).append((down, up, scale * lora.weight))
    touched = {name for adapter in loaded.adapters.values() for name in adapter}
    modules = dict(pipe.transformer.named_modules())
    for name in touched:
        modules[name]._recast_lora = tuple(active.get(name, ()))


# --------------------------------------------------------------------------------------------------
# At load: distillation LoRAs fused into the weights (before any quantization)


def fuse_lora(pipe, spec, adapter_name: str, component: str = "transformer") -> float:
    """Load a LoRA into `component`, fuse it into the weights, drop the adapter; returns the scale its low-rank
    delta was fused at (spec.weight x alpha / rank).

    A LoRA's strength is alpha / rank. The real Lightning files carry it (`.alpha` keys: rank 64, alpha 8, so
    0.125), and diffusers applies it. A file without alpha (a conversion that dropped the keys) would be fused at
    scale 1, eight times the official strength: the profile's `alpha` gives it then, and without one a warning
    says so."""
    path = _spec_file(spec)
    file_alpha, rank = _alpha_and_rank(path)
    if file_alpha is not None or rank is None:
        lora_scale, fused_at = spec.weight, spec.weight * (file_alpha / rank if file_alpha and rank else 1.0)
    elif spec.alpha is not None:
        lora_scale = fused_at = spec.weight * spec.alpha / rank
    else:
        lora_scale = fused_at = spec.weight
        log.warning("LoRA %s carries no alpha: fused at scale %s (its weight, x 1). If it was trained with an alpha "
                    "(the Lightning files: rank 64, alpha 8, so 0.125), set the profile's alpha, or the delta is "
                    "applied %sx too strong", storage.redact(spec.source), spec.weight, rank)
    extra = {"load_into_transformer_2": True} if component == "transformer_2" else {}
    pipe.load_lora_weights(str(path), adapter_name=adapter_name, **extra)
    pipe.fuse_lora(lora_scale=lora_scale, adapter_names=[adapter_name], components=[component])
    pipe.unload_lora_weights()  # keeps the fused weights, frees the adapter matrices
    return round(fused_at, 6)


def _spec_file(spec) -> Path:
    """The local file of a distillation LoRA: a local .safetensors, a file in a local folder, or the hub's cached
    copy at its pinned revision."""
    local = Path(spec.source).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        return local / (spec.weight_name or "pytorch_lora_weights.safetensors")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(spec.source, spec.weight_name or "pytorch_lora_weights.safetensors",
                                revision=spec.revision))


def _alpha_and_rank(path: Path) -> tuple[float | None, int | None]:
    """(the alpha the file carries, or None; its rank) from a LoRA file: `.alpha` keys (kohya / lightx2v layout)
    or diffusers' adapter metadata (lora_alpha)."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        down = next((k for k in keys if k.endswith(("lora_down.weight", "lora_A.weight"))), None)
        rank = f.get_slice(down).get_shape()[0] if down else None
        alphas = [k for k in keys if k.endswith(".alpha")]
        if alphas:
            return float(f.get_tensor(alphas[0]).float().item()), rank
        metadata = (f.metadata() or {}).get("lora_adapter_metadata")
    try:
        alpha = json.loads(metadata).get("lora_alpha") if metadata else None
    except ValueError:
        alpha = None
    return (float(alpha) if alpha is not None else None), rank
