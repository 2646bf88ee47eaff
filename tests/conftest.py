"""Shared fixtures. Every test runs offline on the real diffusers code path with the tiny profile."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="recast-tests-"))

# Set before Prefect or recast read their settings. The tiny model cache may be shared with `make`
# (RECAST_CACHE_DIR); Prefect always gets a fresh home so tests never touch a user's database.
os.environ.setdefault("RECAST_CACHE_DIR", str(_SESSION_TMP / "cache"))
os.environ["PREFECT_HOME"] = str(_SESSION_TMP / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
for name in [k for k in os.environ if k.startswith("RECAST_") and k not in ("RECAST_CACHE_DIR",)]:
    del os.environ[name]
# Each CLI command in a test gets Prefect's temporary server, as it did before the shared background server: a test
# never leaves a server behind. tests/test_cli_server.py tests the background server (the default) and stops it.
os.environ["RECAST_CLI_SERVER"] = "temporary"
# Nor a background worker keeping a command's model loaded (tests/test_cli_server.py tests it and stops it).
os.environ["RECAST_CLI_WORKER_IDLE_S"] = "0"


@pytest.fixture(scope="session")
def astronaut() -> Path:
    """NASA's public-domain astronaut portrait (as shipped by scikit-image), 512x512."""
    return DATA / "astronaut.png"


@pytest.fixture(scope="session")
def second_photo(tmp_path_factory, astronaut) -> Path:
    """A second, portrait-shaped photo of the same person (a crop), as JPEG."""
    from PIL import Image

    path = tmp_path_factory.mktemp("photos") / "astronaut_crop.jpg"
    with Image.open(astronaut) as img:
        img.crop((96, 0, 416, 480)).convert("RGB").save(path, quality=90)
    return path


@pytest.fixture
def memory_root():
    """A fresh memory:// storage root, removed afterwards."""
    import uuid

    import fsspec

    root = f"memory://recast-test-{uuid.uuid4().hex[:8]}"
    yield root
    fs = fsspec.filesystem("memory")
    path = root.split("://", 1)[1]
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture(scope="session", autouse=True)
def no_background_server_left():
    """Whatever a test did, no background Prefect server of the suite's PREFECT_HOME outlives the session."""
    yield
    from recast.flows import cli_workers, local_server

    cli_workers.stop()
    local_server.stop()


@pytest.fixture(scope="session", autouse=True)
def prefect_server(api_server):
    """Flows run in this process talk to the session's server too: one server for the whole suite, instead of a
    test harness and a temporary server of their own (tens of seconds, and CPU taken from the tests)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_server}):
        yield


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.size


_API_SERVER: dict = {}


def pytest_configure(config):
    """Start the session's `prefect server start` before collection: it migrates its fresh database while the
    test modules are imported (torch, diffusers), instead of after."""
    import socket
    import subprocess
    import sys

    home = _SESSION_TMP / "api-server"
    home.mkdir(exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    # PREFECT_API_URL tells the server's UI where its API is (it would assume the default port otherwise).
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_API_URL=url)
    prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
    proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=open(home / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    _API_SERVER.update(proc=proc, url=url, log=home / "server.log")


def pytest_unconfigure(config):
    if "proc" in _API_SERVER:
        end_process_group(_API_SERVER.pop("proc"))


@pytest.fixture(scope="session")
def api_server():
    """One `prefect server start` for the session: flows in this process and CLI runs in subprocesses talk to it
    instead of each starting a temporary server of their own (seconds per run instead of tens). Its API URL."""
    import time
    import urllib.request

    proc, url = _API_SERVER["proc"], _API_SERVER["url"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return url
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(_API_SERVER["log"].read_text()[-2000:])
            time.sleep(0.25)
    raise AssertionError(f"the session's Prefect server was not up after 300s: {_API_SERVER['log'].read_text()[-2000:]}")


@pytest.fixture
def workers_env(api_server, tmp_path):
    """The environment for task workers and the flows that use them, on the session's server. The flow and its
    workers share a Prefect home of the test's own (its result storage); the server's queue is shared with the
    other tests, which is why every such test waits for its own runs to end."""
    home = tmp_path / "client-home"
    home.mkdir()
    return dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=api_server, RECAST_EXECUTION="workers",
                RECAST_HANDOFF__MODE="none", PREFECT_LOGGING_LEVEL="INFO")


def end_process_group(proc, grace_s: float = 10) -> None:
    """TERM a process group, and KILL it if it is still there after grace_s (a worker busy with a run)."""
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
