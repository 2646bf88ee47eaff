"""The only module that touches storage: fsspec URIs in, bytes out, atomic writes, the run folder layout.

    <root>/runs/<run_id>/inputs/<n>-<name>       copies of the request's photos
    <root>/runs/<run_id>/edits/<edit_id>.png     one PNG per edit
    <root>/runs/<run_id>/handoff.json            the contract with the video stage
    <root>/runs/<run_id>/manifest.json           written last: its presence means the run is complete

No file is ever visible under its final name half-written: local files are written beside their final
name and renamed; object stores (s3, gs) and memory:// publish an object only when its upload completes.

Longer than the other modules on purpose: it is the only one that touches fsspec (bytes, atomic writes, claims,
roots and links, redaction, the run layout, and the bytes of images and videos), so no other module needs to.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import re
import stat
import threading
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from recast.tasks.errors import BadInput
from recast.tasks.schemas.fields import RUN_ID_PATTERN

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
    """A URI recast may use: a supported scheme and no credentials in it; returned normalised."""
    scheme = scheme_of(uri)
    if scheme not in SUPPORTED_SCHEMES:
        raise BadInput(field, uri, f"unsupported URI scheme '{scheme}://'",
                       f"use a local path or one of {', '.join(s + '://' for s in SUPPORTED_SCHEMES)}")
    if redact(uri) != uri:
        raise BadInput(field, redact(uri), "the URI carries credentials (user:password@)",
                       "drop them from the URI: workers read credentials from their environment or config files")
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


def read_chunks(uri: str, max_bytes: int, chunk: int = 8 * 2**20, roots: list[str] | None = None,
                field: str = "file"):
    """The file's bytes in chunks, refusing (OSError) to go past max_bytes; with `roots`, only a file that lies
    under them once opened (open_checked)."""
    read = 0
    with open_checked(field, uri, roots) as f:
        while block := f.read(chunk):
            read += len(block)
            if read > max_bytes:
                raise OSError(f"{redact(uri)} is larger than {max_bytes} bytes")
            yield block


def _opened_path(fd: int, path: str) -> str:
    """The real path of the file open as `fd`: what was opened, not what the name points to now."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc: the name's resolution, if it still names the same file
        real = os.path.realpath(path)
        opened, named = os.fstat(fd), os.stat(real)
        if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
            raise BadInput("file", path, "changed while it was being opened", "try again") from None
        return real


@contextlib.contextmanager
def open_checked(field: str, uri: str, roots: list[str] | None = None, max_bytes: int | None = None,
                 what: str = "a file"):
    """A file opened for reading, after its checks, before any byte is read. With `roots`, a local file must lie
    under one of them *as opened*: links are resolved on the open file itself, so a link swapped in between an
    earlier check and this read leads nowhere outside. It must be a regular file (no folder, FIFO or device) of
    at most `max_bytes`. Every refusal is a BadInput naming `field`."""
    uri = normalize_uri(check_scheme(field, uri))
    outside = BadInput(field, redact(uri), "lies outside the configured storage roots (links resolved)",
                       f"put it under {redact(roots[0]) if roots else 'a storage root'}")
    if scheme_of(uri) != "file":
        if roots is not None and not is_under(uri, roots):
            raise outside
        fs, path = _fs(uri)
        if not fs.exists(path):
            raise BadInput(field, uri, "file does not exist", "check the path or URI")
        if fs.isdir(path):
            raise BadInput(field, uri, f"is a folder, not {what}", f"name {what}")
        if max_bytes is not None and (size_bytes := int(fs.size(path))) > max_bytes:
            raise _too_large(field, uri, size_bytes, max_bytes, what)
        with fs.open(path, "rb") as f:
            yield f
        return
    path = local_path(uri)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; regular files read the same.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BadInput(field, uri, "file does not exist", "check the path or URI") from None
    except PermissionError:
        raise BadInput(field, uri, "cannot be read (permission denied)", "check the file's permissions") from None
    with os.fdopen(fd, "rb") as f:
        if roots is not None and not is_under("file://" + _opened_path(fd, path), roots):
            raise outside
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise BadInput(field, uri, f"is a folder, not {what}", f"name {what}")
        if not stat.S_ISREG(info.st_mode):
            raise BadInput(field, uri, "is not a regular file", f"name {what}")
        if max_bytes is not None and info.st_size > max_bytes:
            raise _too_large(field, uri, info.st_size, max_bytes, what)
        yield f


def _too_large(field: str, uri: str, size_bytes: int, max_bytes: int, what: str) -> BadInput:
    fix = {"a photo": "downscale or recompress it"}.get(what, f"pass {what} of at most {max_bytes / 2**20:.0f} MiB")
    return BadInput(field, uri, f"file is {size_bytes / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB "
                    f"{what} may have", fix)


def read_capped(field: str, uri: str, max_bytes: int, roots: list[str] | None = None, what: str = "a file") -> bytes:
    """All of a file's bytes, at most `max_bytes` of them (checked before reading and while reading: a file that
    grows is refused too), under `roots` when given (open_checked)."""
    with open_checked(field, uri, roots, max_bytes, what) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_large(field, uri, len(data), max_bytes, what)
    return data


MAX_JSON_BYTES = 16 * 2**20  # plan.json, handoff.json, manifests: far above any recast writes


def read_json_capped(field: str, uri: str, roots: list[str] | None = None) -> Any:
    """A small JSON file recast wrote (a plan, a handoff), read as untrusted: capped, under `roots` when given;
    a file that is not JSON is a BadInput naming `field`."""
    data = read_capped(field, uri, MAX_JSON_BYTES, roots, what="a JSON file")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(field, redact(uri), f"not JSON ({exc})", "pass the file recast wrote") from None


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


_CLAIMS = threading.Lock()


def claim(uri: str, record: dict, stale_after_s: float) -> bool:
    """Create `uri` with `record` only if nobody holds it: True if this caller now holds it. A local file is created
    with O_EXCL (atomic across processes); memory:// under a lock; object stores by a check before the write (the
    deployment's concurrency limit keeps scheduled runs from racing there). A claim older than `stale_after_s`
    (its holder died) may be taken over."""
    import time

    data = (json.dumps(dict(record, claimed_at=time.time())) + "\n").encode()
    if scheme_of(uri) == "file":
        path = local_path(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if time.time() - os.path.getmtime(path) < stale_after_s:
                return False
            os.replace(_write_temp(path, data), path)  # a stale claim: taken over
            return True
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    with _CLAIMS:
        if exists(uri):
            try:
                held_at = json.loads(read_bytes(uri)).get("claimed_at", 0)
            except ValueError:
                held_at = 0
            if time.time() - held_at < stale_after_s:
                return False
        write_bytes(uri, data)
        return True


def _write_temp(path: str, data: bytes) -> str:
    tmp = f"{path}.{uuid.uuid4().hex}.part"
    with open(tmp, "wb") as f:
        f.write(data)
    return tmp


def release(uri: str) -> None:
    fs, path = _fs(uri)
    if fs.exists(path):
        fs.rm(path)


def remove_tree(uri: str) -> None:
    """Delete a folder and everything under it (a finished run's job control files)."""
    fs, path = _fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


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


def _resolved(uri: str) -> tuple[str, str]:
    """(scheme, path) with '..' folded and, for local files, every symbolic link resolved."""
    scheme, _, path = normalize_uri(uri).partition("://")
    path = os.path.realpath(path) if scheme == "file" else posixpath.normpath(path)
    return scheme, path


def is_under(uri: str, roots: list[str]) -> bool:
    """Whether `uri` lies inside one of `roots`: same scheme, path prefix after folding '..' and resolving
    links (a link under a root that points elsewhere is elsewhere)."""
    scheme, path = _resolved(uri)
    for root in roots:
        root_scheme, root_path = _resolved(root)
        if scheme == root_scheme and (path == root_path or path.startswith(root_path.rstrip("/") + "/")):
            return True
    return False


def signed_url(uri: str, seconds: int) -> str | None:
    """A short-lived https address of an object in s3/gs (the worker's credentials sign it), for a browser that
    has none; None for other storage or when the store cannot sign."""
    if scheme_of(uri) not in ("s3", "gs", "gcs"):
        return None
    fs, path = _fs(uri)
    try:
        return fs.sign(path, expiration=seconds)
    except (NotImplementedError, OSError, ValueError) as exc:
        warnings.warn(f"could not sign {redact(uri)}: {exc}")
        return None


def run_ids(root: str) -> list[str]:
    """The ids of the runs under a storage root (folders of runs/ named like a run id), newest first."""
    fs, path = _fs(normalize_uri(root))
    base = posixpath.join(path, "runs")
    if not fs.isdir(base):
        return []
    names = (posixpath.basename(entry.rstrip("/")) for entry in fs.ls(base, detail=False))
    return sorted((name for name in names if RUN_ID.fullmatch(name)), reverse=True)


def file_size(field: str, uri: str, roots: list[str]) -> int:
    """The size of a regular file that lies under `roots` as opened (open_checked); BadInput otherwise."""
    with open_checked(field, uri, roots) as f:
        f.seek(0, os.SEEK_END)
        return f.tell()


def read_range(field: str, uri: str, roots: list[str], start: int, end: int, chunk: int = 2**20):
    """Bytes start..end (inclusive) of a file under `roots` (checked as opened), streamed in chunks: a clip is
    served to a browser without ever sitting whole in memory."""
    with open_checked(field, uri, roots) as f:
        f.seek(start)
        left = end - start + 1
        while left > 0 and (block := f.read(min(chunk, left))):
            left -= len(block)
            yield block


def same_location(a: str, b: str) -> bool:
    """Whether two URIs name the same place (after folding '..' and resolving links)."""
    return _resolved(a) == _resolved(b)


def check_writable(field: str, root: str) -> str:
    """Refuse a storage root that cannot be written before anything runs: for a local folder, create it now (the
    run would) and say why when that fails; object stores are checked when the run writes."""
    if scheme_of(root) != "file":
        return root
    path = local_path(root)
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(f"no write permission on {path}")
    except FileExistsError:
        raise BadInput(field, root, "is a file, not a folder", "name a folder for the runs") from None
    except NotADirectoryError:
        raise BadInput(field, root, "a part of this path is a file, not a folder", "name a folder for the runs") from None
    except OSError as exc:
        raise BadInput(field, root, f"cannot be written ({exc.strerror or exc})",
                       "name a folder you can write, e.g. ./artifacts") from None
    return root


def redact_all(value: Any) -> Any:
    """`value` (dicts, lists, strings) with every URI's user:password@ part dropped: applied to whatever
    reaches a manifest, an artifact or a log."""
    if isinstance(value, str):
        return redact(value) if "://" in value else value
    if isinstance(value, dict):
        return {key: redact_all(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_all(item) for item in value]
    return value


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


MAX_IMAGE_BYTES = 64 * 2**20  # far above any photo; read before decoding, so it caps the memory a request takes


def read_image(field: str, uri: str, max_pixels: int, max_bytes: int = MAX_IMAGE_BYTES,
               roots: list[str] | None = None) -> InputImage:
    """Read and fully verify an input photo; every failure is a BadInput naming `field`. With `roots` (runs from
    the UI, the API or a schedule) only a file that lies under them as opened is read (open_checked)."""
    uri = check_scheme(field, uri)
    data = read_capped(field, uri, max_bytes, roots, what="a photo")
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
                if not _decoded.known(data):  # bytes this process decoded or encoded before: no need to try
                    img.load()  # decodes everything: truncated files fail here
                    _decoded.remember(data, img)  # the flow reads it again (the edit, its identity score)
    except BadInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadInput(field, uri, f"image is too large to decode safely ({exc})", "downscale it") from exc
    except Image.UnidentifiedImageError as exc:
        raise BadInput(field, uri, "not an image file Pillow can read", "pass a PNG or JPEG photo") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadInput(field, uri, f"image is damaged or truncated ({exc})", "re-export or re-download it") from exc
    return InputImage(uri=uri, data=data, width=width, height=height, format=fmt)


class _RecentImages:
    """The last few RGB images this process encoded as PNG or checked as input, keyed by a digest of the bytes: the
    chain reads back the pictures it has just written or checked (the edit's frame for the clip and its scoring,
    the photo for identity, the contact sheet), and decoding them again is time on its critical path. Keyed by
    content, never by name: bytes that changed in storage are simply not found, and are decoded."""

    def __init__(self, keep_bytes: int = 64 * 2**20):
        self._keep_bytes = keep_bytes  # the pixels kept, at most: a few photos and edits
        self._images: dict[bytes, Image.Image] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(data: bytes) -> bytes:
        import hashlib

        return hashlib.blake2b(data, digest_size=16).digest()

    def remember(self, data: bytes, image: Image.Image) -> None:
        if image.mode != "RGB" or image.width * image.height * 3 > self._keep_bytes:
            return  # decode_image gives RGB: only then is the image what decoding would give
        with self._lock:
            self._images[self._key(data)] = image.copy()
            while sum(i.width * i.height * 3 for i in self._images.values()) > self._keep_bytes:
                self._images.pop(next(iter(self._images)))

    def known(self, data: bytes) -> bool:
        with self._lock:
            return self._key(data) in self._images

    def get(self, data: bytes) -> Image.Image | None:
        with self._lock:
            image = self._images.get(self._key(data))
            return image.copy() if image is not None else None


_decoded = _RecentImages()


def decode_image(data: bytes) -> Image.Image:
    if (image := _decoded.get(data)) is not None:
        return image
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def load_image(uri: str) -> Image.Image:
    return decode_image(read_bytes(uri))


# zlib level 1, not Pillow's 6: on a 1024x1024 photo 0.09 s instead of 0.40 s (2 cores here) for a file 13% larger,
# and the edit's PNG is written on the photo-to-clip chain's critical path. Lossless either way.
PNG_COMPRESS_LEVEL = 1
# An RGB picture is compressed in this many bands of rows at once (pigz's way: each band its own deflate stream,
# joined into one). A fixed count, not the machine's cores, so a picture gives the same bytes on any machine.
PNG_BANDS = 8


def png_bytes(image: Image.Image) -> bytes:
    # Pillow also writes an ICC profile or a transparent colour the image carries: those go its way (and a small
    # picture whole: its bands would compress worse, for no time worth saving)
    if image.mode == "RGB" and image.height >= 32 * PNG_BANDS and not {"icc_profile", "transparency"} & set(image.info):
        data = _png_rgb_in_bands(image)
    else:
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        data = buf.getvalue()
    _decoded.remember(data, image)
    return data


def _png_rgb_in_bands(image: Image.Image) -> bytes:
    """The PNG Pillow writes at PNG_COMPRESS_LEVEL (the Paeth filter on every row, as Pillow chooses for RGB), with
    its bands of rows filtered and deflated on threads at once (numpy and zlib free the GIL): on one core the
    chain's PNGs (the edit, the clip's last frame) took 0.30 s of its critical path on an H200's host (random
    weights: noise, which does not compress). Same pixels, same filter, a stream split at band boundaries."""
    import struct
    import zlib
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    pixels = np.asarray(image, dtype=np.uint8).reshape(image.height, image.width * 3)
    bounds = [image.height * band // PNG_BANDS for band in range(PNG_BANDS + 1)]

    def band(index: int) -> tuple[bytes, bytes]:
        top, bottom = bounds[index], bounds[index + 1]
        rows = pixels[top:bottom].astype(np.int16)
        above = pixels[top - 1:bottom - 1].astype(np.int16) if top else np.zeros_like(rows)
        if top == 0:
            above[1:] = rows[:-1]
        left = np.zeros_like(rows)
        left[:, 3:] = rows[:, :-3]
        above_left = np.zeros_like(rows)
        above_left[:, 3:] = above[:, :-3]
        # Paeth: the neighbour (left, above, above-left) nearest to left + above - above-left, ties in that order
        to_left, to_above, to_corner = np.abs(above - above_left), np.abs(left - above_left), \
            np.abs(left + above - 2 * above_left)
        predicted = np.where((to_left <= to_above) & (to_left <= to_corner), left,
                             np.where(to_above <= to_corner, above, above_left))
        filtered = np.empty((bottom - top, rows.shape[1] + 1), dtype=np.uint8)
        filtered[:, 0] = 4  # the Paeth filter's type byte, before each row
        filtered[:, 1:] = (rows - predicted) & 0xFF
        raw = filtered.tobytes()
        deflate = zlib.compressobj(PNG_COMPRESS_LEVEL, zlib.DEFLATED, -15)
        last = index == PNG_BANDS - 1
        return raw, deflate.compress(raw) + deflate.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)

    with ThreadPoolExecutor(max_workers=min(PNG_BANDS, os.cpu_count() or 1)) as pool:
        bands = list(pool.map(band, range(PNG_BANDS)))
    checksum = 1
    for raw, _ in bands:
        checksum = zlib.adler32(raw, checksum)
    stream = b"\x78\x01" + b"".join(deflated for _, deflated in bands) + struct.pack(">I", checksum)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", image.width, image.height, 8, 2, 0, 0, 0)  # 8-bit RGB, not interlaced
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------------
# Video (mp4 through imageio-ffmpeg, which ships its own ffmpeg binary)


def mp4_bytes(frames, fps: int) -> bytes:
    """Encode uint8 frames (an array (T, H, W, 3) or any iterable of (H, W, 3) frames, consumed one at a time) as
    H.264 mp4 at exactly `fps` frames per second."""
    import tempfile

    import imageio.v2 as imageio

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        # A fixed thread count, not the machine's: x264 gives the same bytes for the same frames and thread count
        # on any machine. 8 threads: a 480p 81-frame clip encodes in a fraction of the single-threaded time on
        # a GPU host's cores (a noisy clip took 4.9 s on one thread, 2.7 s on two). Preset veryfast: the encode
        # is on the photo-to-clip chain's critical path (2.47 s of 19 s on an H200 with x264's default, medium);
        # on a 480p 81-frame test clip (2 threads, this repository's CPU) medium took 7.8 s, veryfast 1.5 s, for a
        # smaller file (12.3 vs 13.9 MiB) at the same PSNR (33.9 vs 34.0 dB).
        with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=16, pixelformat="yuv420p",
                                # faststart: the index first, so a browser plays (and seeks) while it loads
                                ffmpeg_params=["-threads", "8", "-preset", "veryfast", "-movflags", "+faststart"]
                                ) as writer:
            for frame in frames:
                writer.append_data(frame)
        with open(path, "rb") as f:
            return f.read()


class ChunkConsumer:
    """Work on a clip's frames while the Wan VAE is still decoding it, a few frames at a time (diffusers' decoder:
    1 frame, then 4 at a time), on a thread of its own (`name`): feed(fetch) hands it the next chunk, fetch() giving
    it as (n, H, W, 3) uint8, or None once the rest cannot be fed (a team's split decode); `consume(chunks)` (the
    subclass's) takes the chunks in order on that thread. `_close()` waits for the thread; an error it met is kept
    in `_error` for the subclass to fall back on the whole clip. abandon() ends the work when the clip failed."""

    _END = object()

    def __init__(self, name: str):
        import queue

        self._queue: queue.Queue = queue.Queue()
        self._usable = True
        self._ended = False
        self._error: BaseException | None = None
        self.streamed = False  # after finish(): whether the result came from the chunks fed (not the whole clip)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def feed(self, fetch) -> None:
        if fetch is None:
            self._usable = False
        elif self._usable:
            self._queue.put(fetch)

    def consume(self, chunks) -> None:
        raise NotImplementedError

    def _chunks(self):
        while (fetch := self._queue.get()) is not self._END:
            yield fetch()
        self._ended = True

    def _run(self) -> None:
        try:
            self.consume(self._chunks())
        except BaseException as exc:  # noqa: BLE001 - the subclass falls back on the whole clip, which raises it again
            self._error = exc
            while not self._ended and self._queue.get() is not self._END:  # drain up to the end, so _close() returns
                pass

    def _close(self) -> None:
        self._queue.put(self._END)
        self._thread.join()

    def abandon(self) -> None:
        self._usable = False
        self._close()


class Mp4Stream(ChunkConsumer):
    """mp4_bytes fed while the frames are still being made: x264 encodes each chunk as it arrives, so the clip's
    encode ends about when its decode does.

        stream = Mp4Stream(fps)
        frames = run_video(..., on_frames=stream.feed)   # feed(fetch): fetch() gives a chunk (n, H, W, 3) uint8
        data = stream.finish(frames)                      # the mp4 of exactly `frames`

    finish() checks that what was fed is exactly `frames`, frame for frame; if it is not (a split decode, a chunk
    missed) the streamed encode is thrown away and `frames` are encoded as mp4_bytes would: the bytes are the same
    either way (tested).
    """

    def __init__(self, fps: int):
        self._fps = fps
        self._fed_chunks: list = []
        self._result: bytes | None = None
        super().__init__("recast-overlap-mp4")

    def consume(self, chunks) -> None:
        def frames():
            for chunk in chunks:
                self._fed_chunks.append(chunk)
                yield from chunk

        self._result = mp4_bytes(frames(), self._fps)

    def finish(self, frames) -> bytes:
        self._close()
        streamed = self._usable and self._error is None and self._result is not None and self._fed(frames)
        self._fed_chunks, self.streamed = [], bool(streamed)
        return self._result if streamed else mp4_bytes(frames, self._fps)

    def _fed(self, frames) -> bool:
        """Whether the chunks fed are `frames`, frame for frame. Chunk by chunk, as 8-byte words where the layout
        allows: the whole clip at once (a concatenated copy and an equality mask, 97 MB each for a 480p 81-frame
        clip) took 0.4 s on this repository's CPU, on the photo-to-clip chain's critical path; this takes ~10 ms."""
        import numpy as np

        start = 0
        for chunk in self._fed_chunks:
            part, start = frames[start:start + len(chunk)], start + len(chunk)
            if chunk.shape != part.shape or chunk.dtype != part.dtype:
                return False
            if chunk.flags.c_contiguous and part.flags.c_contiguous and chunk.nbytes % 8 == 0:
                chunk, part = chunk.reshape(-1).view(np.uint64), part.reshape(-1).view(np.uint64)
            if not np.array_equal(chunk, part):
                return False
        return start == len(frames)


def iter_video(uri: str):
    """The frames of an mp4 from storage, one uint8 (H, W, 3) array at a time (a clip never sits whole in RAM)."""
    import tempfile

    import imageio.v2 as imageio

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        with open(path, "wb") as f:
            for chunk in read_chunks(uri, max_bytes=2**40):
                f.write(chunk)
        with imageio.get_reader(path, format="FFMPEG") as reader:
            yield from reader


def video_fps(uri: str) -> float:
    """The frame rate an mp4 in storage plays at."""
    import tempfile

    import imageio.v2 as imageio

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        with open(path, "wb") as f:
            f.write(read_bytes(uri))
        with imageio.get_reader(path, format="FFMPEG") as reader:
            return float(reader.get_meta_data()["fps"])


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


RUN_ID = re.compile(RUN_ID_PATTERN.strip("^$"))


def check_run_id(field: str, value: Any) -> str:
    if not isinstance(value, str) or not RUN_ID.fullmatch(value):
        raise BadInput(field, value, "not a recast run id (YYYYMMDD-HHMMSS-xxxxxx)",
                       "pass the name of a run's folder under runs/")
    return value


@dataclass(frozen=True)
class RunLayout:
    root: str
    run_id: str

    def __post_init__(self) -> None:
        check_run_id("run_id", self.run_id)

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

    def control_uri(self, job_id: str) -> str:
        """Prefix of a job's heartbeat, result and cancel files (recast.tasks.lifecycle)."""
        return join(self.folder, ".jobs", job_id)

    def record_uri(self, job_id: str) -> str:
        """What the flow recorded of a job's attempt: a resumed run reads it back instead of redoing the job."""
        return join(self.folder, ".jobs", f"{job_id}.record.json")

    @property
    def plan_uri(self) -> str:
        return join(self.folder, "plan.json")

    def clip_uri(self, clip_id: str) -> str:
        return join(self.folder, "clips", f"{clip_id}.mp4")

    def last_frame_uri(self, clip_id: str) -> str:
        return join(self.folder, "clips", f"{clip_id}_last.png")

    def identity_strip_uri(self, clip_id: str) -> str:
        return join(self.folder, "clips", f"{clip_id}_identity.png")

    @property
    def stitched_uri(self) -> str:
        return join(self.folder, "storyboard.mp4")

    @property
    def manifest_uri(self) -> str:
        return join(self.folder, "manifest.json")

    @property
    def video_manifest_uri(self) -> str:
        """The animate flow's manifest when its clip went into an edit run's folder (beside that run's own)."""
        return join(self.folder, "video_manifest.json")

    @property
    def handoff_uri(self) -> str:
        return join(self.folder, "handoff.json")
