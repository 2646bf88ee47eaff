"""Sizes and frame counts the models accept, in one place.

Both models work in multiples of 16 pixels (VAE 8x, patches 2x2); Wan's causal VAE compresses time 4x after the
first frame, so a clip has 4k+1 frames. A size or count that can be fixed safely is rounded (with a warning the
caller shows); one that cannot is refused naming the field, the value and the fix.
"""

from __future__ import annotations

from recast.tasks.errors import BadInput

MIN_FRAMES, MAX_FRAMES = 5, 241
MIN_SIDE, MAX_SIDE = 16, 1920


def is_frame_count(value: int) -> bool:
    """Wan's rule: 4k+1 frames."""
    return (value - 1) % 4 == 0


def check_frame_count(value: int) -> int:
    """A pydantic validator: refuse a frame count that is not 4k+1."""
    if not is_frame_count(value):
        raise ValueError(f"{value} frames is not 4k+1 (Wan needs e.g. 81, or {nearest_frame_count(value)})")
    return value


def nearest_frame_count(value: int) -> int:
    return max(MIN_FRAMES, min(MAX_FRAMES, 4 * round((value - 1) / 4) + 1))


def snap_frames(field: str, value: int, warnings: list[str]) -> int:
    """num_frames must be 4k+1: round (with a warning) to the nearest such count within 5..241."""
    if value < MIN_FRAMES or value > MAX_FRAMES:
        raise BadInput(field, value, f"clips must have {MIN_FRAMES}..{MAX_FRAMES} frames", "use 4k+1 frames, e.g. 81")
    snapped = nearest_frame_count(value)
    if snapped != value:
        warnings.append(f"{field}={value} rounded to {snapped} (Wan needs 4k+1 frames)")
    return snapped


def snap16(field: str, value: int, warnings: list[str]) -> int:
    """Frame sizes must be multiples of 16: round (with a warning) where that is safe, refuse where it is not."""
    if value < MIN_SIDE or value > MAX_SIDE:
        raise BadInput(field, value, f"frame sizes must be {MIN_SIDE}..{MAX_SIDE} pixels", "use e.g. 832x480 or 480x832")
    snapped = max(16, int(round(value / 16)) * 16)
    if snapped != value:
        warnings.append(f"{field}={value} rounded to {snapped} (the models need multiples of 16)")
    return snapped


def output_size(width: int | None, height: int | None, aspect: float, area: int) -> tuple[int, int]:
    """The output size: the request's (rounded down to multiples of 16), else `area` at `aspect`."""
    if width and height:
        return max(16, width // 16 * 16), max(16, height // 16 * 16)
    if width:
        height = width / aspect
    elif height:
        width = height * aspect
    else:
        width = (area * aspect) ** 0.5
        height = width / aspect
    return max(16, int(round(width / 16)) * 16), max(16, int(round(height / 16)) * 16)
