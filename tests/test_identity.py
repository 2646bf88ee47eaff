"""Identity scoring on real photos shipped in tests/data (public domain: NASA, US government portraits)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image, ImageOps

from recast.flows.cli import main
from recast.tasks import identity

FACES = "tests/data/faces"


def photo(name: str) -> Image.Image:
    path = "tests/data/astronaut.png" if name == "astronaut" else f"{FACES}/{name}"
    with Image.open(path) as img:
        return img.convert("RGB")


def grade(reference: str, other: Image.Image | str) -> identity.IdentityScore:
    image = photo(other) if isinstance(other, str) else other
    return identity.score_images(photo(reference), [image])[0]


def test_models_are_verified_by_sha256():
    paths = identity._verified_model_paths()
    assert set(paths) == set(identity.MODELS), "both ONNX models must be found and verified"


@pytest.mark.parametrize("other", ["obama2.jpg", "obama3.jpg"])
def test_same_person_in_other_photos_grades_at_least_good(other):
    result = grade("obama.jpg", other)
    assert identity.meets(result.grade, "Good"), f"{other}: {result.grade} ({result.score:.3f})"
    assert result.confident and result.face_px > 100


@pytest.mark.parametrize("reference,other", [("obama.jpg", "biden.jpg"), ("astronaut", "obama.jpg"),
                                             ("biden.jpg", "obama2.jpg"), ("astronaut", "biden.jpg")])
def test_different_people_grade_lost(reference, other):
    result = grade(reference, other)
    assert result.grade == "Lost", f"{reference} vs {other}: {result.grade} ({result.score:.3f})"


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.mark.parametrize("name,change", [
    ("flipped", ImageOps.mirror),
    ("half size", lambda im: im.resize((im.width // 2, im.height // 2))),
    ("jpeg q20", lambda im: _jpeg(im, 20)),
])
def test_a_modified_copy_grades_excellent(name, change):
    for reference in ("obama.jpg", "astronaut"):
        result = grade(reference, change(photo(reference)))
        assert result.grade == "Excellent", f"{reference} {name}: {result.grade} ({result.score:.3f})"


@pytest.mark.parametrize("no_face", ["chelsea_cat.jpg", "coffee.jpg"])
def test_no_face_reference_is_unscorable_and_no_face_output_is_lost(no_face):
    assert grade(no_face, "obama.jpg").grade == "unscorable"
    lost = grade("obama.jpg", no_face)
    assert lost.grade == "Lost" and lost.face_px is None and "no face" in lost.notes


def test_score_is_stable():
    first = [grade("obama.jpg", other).score for other in ("obama2.jpg", "biden.jpg")]
    again = [grade("obama.jpg", other).score for other in ("obama2.jpg", "biden.jpg")]
    assert all(abs(a - b) < 1e-3 for a, b in zip(first, again)), (first, again)


def test_identity_cli_scores_each_image(capsys):
    assert main(["identity", f"{FACES}/obama.jpg", f"{FACES}/obama2.jpg", f"{FACES}/biden.jpg",
                 f"{FACES}/coffee.jpg", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["grade"] for r in rows] == ["Excellent", "Lost", "Lost"]
    assert rows[0]["face_px"] > 100 and rows[2]["face_px"] is None
    assert main(["identity", f"{FACES}/coffee.jpg", f"{FACES}/obama.jpg"]) == 0
    assert "unscorable" in capsys.readouterr().out


def test_grade_bands_follow_the_documented_cutoffs():
    assert [identity.grade_for(s) for s in (0.9, 0.65, 0.6, 0.5, 0.4, 0.363, 0.3)] == [
        "Excellent", "Excellent", "Good", "Good", "Drifted", "Drifted", "Lost"]
    assert identity.meets("Excellent", "Good") and not identity.meets("Drifted", "Good")
    assert not identity.meets("unscorable", "Drifted")


def test_a_reference_photo_is_searched_for_its_face_once_and_each_photo_keeps_its_own(monkeypatch):
    """A worker scores every edit of a run against the same photo, loaded anew by each job: its face is found once
    (a busy worker's CPU), by the photo's content, and another photo never gets that face."""
    searched = []
    find = identity.main_face
    monkeypatch.setattr(identity, "_REFERENCE_FACES", {})  # what earlier tests' edits kept
    monkeypatch.setattr(identity, "main_face", lambda image: searched.append(image.size) or find(image))
    first, again, other = photo("obama.jpg"), photo("obama.jpg"), photo("biden.jpg")
    assert identity.reference_face(first) is identity.reference_face(again), "the same photo's face is kept"
    assert len(searched) == 1, f"the same photo was searched for its face {len(searched)} times"
    theirs = identity.reference_face(other)
    assert len(searched) == 2 and theirs.embedding.tolist() != identity.reference_face(first).embedding.tolist(), \
        "another photo must get its own face"
    scored = identity.compare(identity.reference_face(again), photo("obama2.jpg"))
    assert scored.score == pytest.approx(grade("obama.jpg", "obama2.jpg").score), "kept faces score as found ones"


def test_faces_found_on_many_threads_at_once_are_those_found_one_at_a_time():
    """A worker scores edits and clips on threads of their own, several at once, and OpenCV's face models are not
    thread-safe: the models are shared between threads only one call at a time, so what each thread finds is what
    a single thread finds."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    names = ["obama.jpg", "obama2.jpg", "biden.jpg", "obama3.jpg"] * 3
    photos = [photo(name) for name in names]
    alone = [identity.main_face(photo) for photo in photos]
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(identity.main_face, photos))
    for name, one, many in zip(names, alone, together):
        assert one is not None and many is not None and one.box == many.box and \
            np.allclose(one.embedding, many.embedding), f"{name}: another face found on a busy thread"
