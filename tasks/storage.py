"""The only module that touches storage: fsspec URIs in, bytes out, atomic writes, the run folder layout.

    <root>/runs/<run_id>/inputs/<n>-<name>       copies of the request's photos
    <root>/runs/<run_id>/edits/<edit_id>.png     one PNG per edit
    <root>/runs/<run_id>/handoff.json            the contract with the video stage
    <root>/runs/<run_id>/manifest.json           written last: its presence means the run is complete

No file is ever visible under its final name half-written: local files are written beside their final
name and renamed; object stores (s3, gs) and memory:// publish an object only when its upload completes.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from recast.tasks.errors import BadInput

# Schemes a request may name. Anything else (http, ftp, ssh, ...) is refused before any I/O.
SUPPORTED_SCHEMES = ("file", "memory", "s3", "gs", "gcs")
_EXTRAS = {"s3": "s3fs (pip install 'recast[s3]')", "gs": "gcsfs (pip install 'recast[gcs]')"}
_EXTRAS["gcs"] = _EXTRAS["gs"]


def scheme_of(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def normalize_uri(uri: str) -> str:
    """Local paths become absolute file:// URIs; other URIs pass through unchanged."""
    if scheme_of(uri) != "file":
        return uri
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return "file://" + os.path.abspath(os.path.expanduser(path))


def redact(uri: str) -> str:
    """Drop any user:password@ part, so credentials never reach a manifest or a log line."""
    if "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    host, sep, path = rest.partition("/")
    return f"{scheme}://{host.rsplit('@', 1)[-1]}{sep}{path}"


def check_scheme(field: str, uri: str) -> str:
    scheme = scheme_of(uri)
    if scheme not in SUPPORTED_SCHEMES:
        raise BadInput(field, uri, f"unsupported URI scheme '{scheme}://'",
                       f"use a local path or one of {', '.join(s + '://' for s in SUPPORTED_SCHEMES)}")
    return normalize_uri(uri)


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as exc:  # s3fs / gcsfs not installed
        scheme = scheme_of(uri)
        raise BadInput("storage", uri, f"no filesystem driver for {scheme}://",
                       f"install {_EXTRAS.get(scheme, 'the fsspec driver for ' + scheme)}") from exc
    return fs, path


def join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts)


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = _fs(uri)
    return fs.cat_file(path)


def size(uri: str) -> int:
    fs, path = _fs(uri)
    return int(fs.size(path))


def local_path(uri: str) -> str:
    """The filesystem path of a file:// URI (or plain path)."""
    return normalize_uri(uri)[len("file://"):]


def read_chunks(uri: str, max_bytes: int, chunk: int = 8 * 2**20):
    """The file's bytes in chunks, refusing (OSError) to go past max_bytes."""
    fs, path = _fs(uri)
    read = 0
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            read += len(block)
            if read > max_bytes:
                raise OSError(f"{redact(uri)} is larger than {max_bytes} bytes")
            yield block


def write_bytes(uri: str, data: bytes) -> str:
    """Write all of `data` to `uri` so that readers see either nothing or the whole file."""
    fs, path = _fs(uri)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.part")
        with fs.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic on POSIX
    else:
        fs.pipe_file(path, data)
    return uri


def write_json(uri: str, obj: Any) -> str:
    return write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def list_images(prefix: str) -> list[str]:
    """URIs of the image files under a folder URI, sorted."""
    prefix = normalize_uri(prefix)
    return [join(prefix, name) for name in list_files(prefix) if name.lower().endswith(IMAGE_SUFFIXES)
            and not posixpath.basename(name).startswith(".")]


def is_under(uri: str, roots: list[str]) -> bool:
    """Whether `uri` lies inside one of `roots` (same scheme, path prefix, no '..' escapes)."""
    uri = normalize_uri(uri)
    scheme, _, path = uri.partition("://")
    path = posixpath.normpath(path)
    for root in roots:
        root_scheme, _, root_path = normalize_uri(root).partition("://")
        root_path = posixpath.normpath(root_path)
        if scheme == root_scheme and (path == root_path or path.startswith(root_path.rstrip("/") + "/")):
            return True
    return False


def list_files(uri: str) -> list[str]:
    """Every file below `uri` (recursively), as paths relative to it."""
    fs, path = _fs(uri)
    if not fs.exists(path):
        return []
    base = path.rstrip("/") + "/"
    return sorted(p[len(base):] if p.startswith(base) else p for p in fs.find(path))


# --------------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class InputImage:
    uri: str
    data: bytes
    width: int
    height: int
    format: str


def read_image(field: str, uri: str, max_pixels: int) -> InputImage:
    """Read and fully verify an input photo; every failure is a BadInput naming `field`."""
    uri = check_scheme(field, uri)
    fs, path = _fs(uri)
    if not fs.exists(path):
        raise BadInput(field, uri, "file does not exist", "check the path or URI")
    if fs.isdir(path):
        raise BadInput(field, uri, "is a folder, not an image file", "name an image file")
    data = fs.cat_file(path)
    if not data:
        raise BadInput(field, uri, "file is empty (0 bytes)", "pass a PNG or JPEG photo")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height, fmt = img.width, img.height, img.format or "?"
                # Checked before decoding: the header alone tells the size of a decompression bomb.
                if width * height > max_pixels:
                    raise BadInput(field, uri, f"image is {width}x{height} = {width * height} pixels, over the "
                                   f"limit of {max_pixels}", "downscale it, or raise RECAST_MAX_INPUT_PIXELS")
                img.load()  # decodes everything: truncated files fail here
    except BadInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadInput(field, uri, f"image is too large to decode safely ({exc})", "downscale it") from exc
    except Image.UnidentifiedImageError as exc:
        raise BadInput(field, uri, "not an image file Pillow can read", "pass a PNG or JPEG photo") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadInput(field, uri, f"image is damaged or truncated ({exc})", "re-export or re-download it") from exc
    return InputImage(uri=uri, data=data, width=width, height=height, format=fmt)


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def load_image(uri: str) -> Image.Image:
    return decode_image(read_bytes(uri))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Video (mp4 through imageio-ffmpeg, which ships its own ffmpeg binary)


def mp4_bytes(frames, fps: int) -> bytes:
    """Encode uint8 frames (T, H, W, 3) as H.264 mp4 at exactly `fps` frames per second."""
    import tempfile

    import imageio.v2 as imageio

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        # Single-threaded x264: the same frames always encode to the same bytes.
        with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=16,
                                pixelformat="yuv420p", ffmpeg_params=["-threads", "1"]) as writer:
            for frame in frames:
                writer.append_data(frame)
        with open(path, "rb") as f:
            return f.read()


def read_video(uri: str):
    """Decode an mp4 from storage: (uint8 frames (T, H, W, 3), fps)."""
    import tempfile

    import imageio.v2 as imageio
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        with open(path, "wb") as f:
            f.write(read_bytes(uri))
        with imageio.get_reader(path, format="FFMPEG") as reader:
            fps = reader.get_meta_data()["fps"]
            frames = np.stack([frame for frame in reader])
    return frames, fps


# --------------------------------------------------------------------------------------------------
# Run folder layout


@dataclass(frozen=True)
class RunLayout:
    root: str
    run_id: str

    @property
    def folder(self) -> str:
        return join(self.root, "runs", self.run_id)

    def input_uri(self, index: int, source: str, fmt: str) -> str:
        stem = posixpath.splitext(posixpath.basename(source.rstrip("/")))[0] or "image"
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:40]
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(fmt, fmt.lower())
        return join(self.folder, "inputs", f"{index}-{safe}.{ext}")

    def edit_uri(self, edit_id: str) -> str:
        return join(self.folder, "edits", f"{edit_id}.png")

    def clip_uri(self, clip_id: str) -> str:
        return join(self.folder, "clips", f"{clip_id}.mp4")

    def last_frame_uri(self, clip_id: str) -> str:
        return join(self.folder, "clips", f"{clip_id}_last.png")

    @property
    def stitched_uri(self) -> str:
        return join(self.folder, "storyboard.mp4")

    @property
    def manifest_uri(self) -> str:
        return join(self.folder, "manifest.json")

    @property
    def handoff_uri(self) -> str:
        return join(self.folder, "handoff.json")
