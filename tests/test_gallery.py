"""`recast gallery` in a real browser (Debian's Chromium): after runs made by the test, on local and s3:// storage
(a moto server standing in for S3), the runs page lists them, every picture loads, the clip plays at its length,
seeking gets byte ranges, nothing outside a run folder is served (nor read), and the pages log no errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from test_workers import _chromium, _has_playwright, free_port, wait_for

BIN = Path(sys.executable).parent
SHOTS = Path(os.environ.get("TEST_SCREENSHOTS", "")) if os.environ.get("TEST_SCREENSHOTS") else None


def _get(url: str, headers: dict | None = None, timeout: float = 30) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def _runs(root: str, env: dict, astronaut) -> list[dict]:
    """Two runs as a user makes them: an edit whose clip is made inline, and a storyboard."""
    edit = subprocess.run([str(BIN / "recast"), "edit", str(astronaut), "--prompt",
                           "James Bond 007, tuxedo with bow tie, casino background, cinematic lighting", "--seed", "5",
                           "--steps", "2", "--storage", root, "--json"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert edit.returncode == 0, edit.stderr[-2000:]
    return [json.loads(edit.stdout)]


@pytest.fixture
def gallery(tmp_path):
    procs = []

    def start(roots: list[str], env: dict) -> str:
        port = free_port()
        log = open(tmp_path / f"gallery-{port}.log", "w")
        proc = subprocess.Popen([str(BIN / "recast"), "gallery", "--port", str(port),
                                 *[a for root in roots for a in ("--storage", root)]], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"

        def up():
            if proc.poll() is not None:
                raise AssertionError((tmp_path / f"gallery-{port}.log").read_text()[-2000:])
            try:
                return _get(url + "/", timeout=5)[0] == 200
            except OSError:
                return False

        wait_for(up, 120, "the gallery to answer")
        return url

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


def _check_in_browser(url: str, manifest: dict, shots: Path) -> None:
    browser_path = _chromium()
    if browser_path is None or not _has_playwright():
        if os.environ.get("CI"):
            raise AssertionError("CI must install Debian's chromium and the playwright package (see .ci/run)")
        pytest.skip("needs Debian's chromium and the playwright package")
    from playwright.sync_api import sync_playwright

    clip = manifest["animation"]["clips"][0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--autoplay-policy=no-user-gesture-required"])
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        problems = []
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        try:
            page.set_default_timeout(120_000)
            page.goto(url + "/", wait_until="networkidle")
            assert manifest["run_id"] in page.inner_text("body"), "the runs page must list the run"
            page.screenshot(path=str(shots / "gallery-runs.png"), full_page=True)
            page.click(f"text={manifest['run_id']}")
            page.wait_for_load_state("networkidle")
            page.wait_for_function("Array.from(document.images).every(i => i.complete)")
            images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.naturalWidth])")
            assert len(images) >= 4 and all(width > 0 for _, width in images), f"pictures that did not load: {images}"
            page.evaluate("() => { const v = document.querySelector('video'); v.muted = true; v.play(); }")
            page.wait_for_function("document.querySelector('video').readyState >= 2")
            duration = page.evaluate("document.querySelector('video').duration")
            assert abs(duration - clip["num_frames"] / clip["fps"]) < 0.1, \
                f"the clip plays {duration}s, it has {clip['num_frames']} frames at {clip['fps']} fps"
            page.evaluate("() => { const v = document.querySelector('video'); v.pause(); v.currentTime = 0.5 * "
                          "v.duration; }")
            page.wait_for_function("document.querySelector('video').readyState >= 2")
            page.screenshot(path=str(shots / "gallery-run.png"))  # what a person sees first (docs/gallery-run.png)
            page.evaluate("document.querySelector('details').open = true")
            page.screenshot(path=str(shots / "gallery-run-full.png"), full_page=True)
        finally:
            browser.close()
    assert not problems, f"the gallery's pages logged errors: {problems}"


def _check_files(url: str, manifest: dict) -> None:
    run_id = manifest["run_id"]
    clip = f"{url}/files/0/{run_id}/clips/clip-01.mp4"
    status, body, headers = _get(clip, {"Range": "bytes=100-199"})
    assert status == 206 and len(body) == 100 and headers.get("content-range", "").startswith("bytes 100-199/"), \
        (status, headers)
    for path in (f"/files/0/{run_id}/../../../etc/passwd", f"/files/0/{run_id}/%2e%2e/%2e%2e/x",
                 f"/files/0/{run_id}/.jobs/x", f"/files/0/../x", "/files/7/{run_id}/plan.json", "/runs/0/..%2f..",
                 f"/files/0/{run_id}/inputs"):
        assert _get(url + path)[0] == 404, f"{path} must be a 404"


def test_the_gallery_shows_runs_on_local_storage_and_serves_nothing_else(astronaut, tmp_path, gallery, api_server):
    root = tmp_path / "store"
    env = dict(os.environ, RECAST_HANDOFF__MODE="inline", PREFECT_API_URL=api_server)
    (manifest,) = _runs(str(root), env, astronaut)
    # A link inside the run folder to a FIFO outside it: served, it would hang; refused, nothing is read.
    os.mkfifo(tmp_path / "outside.png")
    (root / "runs" / manifest["run_id"] / "edits" / "peek.png").symlink_to(tmp_path / "outside.png")
    url = gallery([str(root)], env)
    _check_files(url, manifest)
    assert _get(f"{url}/files/0/{manifest['run_id']}/edits/peek.png", timeout=20)[0] == 404
    shots = SHOTS or tmp_path / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    _check_in_browser(url, manifest, shots)
    assert (shots / "gallery-run.png").exists()


@pytest.fixture
def s3_server(tmp_path):
    pytest.importorskip("moto", reason="moto is a test dependency (pyproject's test extra)")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"

    def up():
        try:
            return _get(endpoint, timeout=2)[0] in (200, 404)
        except OSError:
            return False

    wait_for(up, 120, "the moto S3 server")
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL=endpoint, FSSPEC_S3_ENDPOINT_URL=endpoint)
    created = subprocess.run([sys.executable, "-c", "import s3fs; s3fs.S3FileSystem().mkdir('recast-test')"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stderr[-2000:]
    yield env
    proc.terminate()
    proc.wait(timeout=30)


def test_the_gallery_shows_runs_on_s3(astronaut, tmp_path, gallery, s3_server, api_server):
    env = dict(s3_server, RECAST_HANDOFF__MODE="inline", PREFECT_API_URL=api_server, RECAST_SIGNED_THUMBNAILS_S="600")
    (manifest,) = _runs("s3://recast-test/recast", env, astronaut)
    # The run's summary in the Prefect UI shows its picture through a short-lived signed address: a browser
    # without credentials gets the PNG.
    artifacts = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{api_server}/artifacts/filter", data=json.dumps({"artifacts": {"flow_run_id": {
            "any_": [manifest["prefect"]["flow_run_id"]]}}}).encode(),
        headers={"content-type": "application/json"}), timeout=30).read())
    summary = next(a["data"] for a in artifacts if a.get("key") == "recast-edit-summary")
    signed = re.findall(r"!\[[^\]]*\]\((http[^)]+)\)", summary)
    assert signed and "Signature" in signed[0], summary
    status, body, _ = _get(signed[0])
    assert status == 200 and body.startswith(b"\x89PNG"), "the signed address must give the edit's PNG"
    url = gallery(["s3://recast-test/recast"], env)
    _check_files(url, manifest)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    _check_in_browser(url, manifest, shots)
