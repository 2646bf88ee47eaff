"""The local Prefect server CLI commands share (`cli_server: background`, the default).

Without PREFECT_API_URL, Prefect starts a temporary server for every command and stops it at the end: on a 2-core
machine ~5.5 s to start and ~3 s to stop, around an edit of under a second. Instead the first command that runs a
flow starts one server in the background (127.0.0.1, a free port, the same PREFECT_HOME and database), records it in
`$PREFECT_HOME/recast-server.json`, and the next commands use it. It stops on `recast server stop`, or by itself
once no command has used it for `cli_server_idle_s`. A command keeps it in use while it runs (a long storyboard is
not cut off by the idle stop).

Everything here runs before Prefect is imported: Prefect reads PREFECT_API_URL once, at import.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

STATE = "recast-server.json"
START_TIMEOUT_S = 120.0  # a busy 2-core machine: the first start migrates the database
TOUCH_S = 30.0  # how often a running command says it is still using the server


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def stop_command() -> str:
    """The command that stops this home's background server, as the user's own shell must type it: with
    PREFECT_HOME where it is set (`make demo` sets it to the checkout's `.prefect`, which a shell of the user's own
    does not have: there a plain `recast server stop` looks in ~/.prefect and finds nothing), and the program as it
    was called where `recast` on the PATH is not it (`make demo` calls `.venv/bin/recast`, in no activated venv)."""
    program = "recast"
    called, found = Path(sys.argv[0]), shutil.which("recast")
    if called.name == "recast" and (found is None or Path(found).resolve() != called.resolve()):
        program = shlex.quote(sys.argv[0])
    home = f"PREFECT_HOME={shlex.quote(str(prefect_home()))} " if os.environ.get("PREFECT_HOME") else ""
    return f"{home}{program} server stop"


def _state_path(home: Path | None = None) -> Path:
    return (home or prefect_home()) / STATE


def own_server_clients(env: dict, home: Path) -> dict[str, str]:
    """Prefect client settings for processes whose server recast started from this same install (`recast serve`'s,
    the CLI's background server), less those `env` already sets (its own win). Each saves requests: to the one API
    process that a burst of flow runs queues behind (a forked flow run made 25, traced on this repository's CPU), and
    in a CLI command's chain (6 CSRF-token requests of its 28, on this repository's CPU)."""
    settings = {
        # Prefect's client contexts ask the server's version (GET /admin/version, twice in a forked flow run); the
        # server is this install's own Prefect, so the answer is known.
        "PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED": "false",
        "PREFECT_API_SSL_CERT_FILE": str(loopback_ca_bundle(home)),
    }
    if env.get("PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED", "").lower() not in ("1", "true"):
        # The server asks for no CSRF token: without this every new client (each flow-run process, each status
        # poll) first asks for one and is answered 422, 307 of ~500 requests in a burst of 24 runs.
        settings["PREFECT_CLIENT_CSRF_SUPPORT_ENABLED"] = "false"
    return {key: value for key, value in settings.items() if key not in env}


def loopback_ca_bundle(home: Path) -> Path:
    """A CA bundle of one certificate (certifi's first), for PREFECT_API_SSL_CERT_FILE where the API is recast's own
    plain-HTTP server on the loopback (`recast serve`, the CLI's background server). Every Prefect client loads its
    bundle into an SSL context of its own, even for plain HTTP: certifi's 117 certificates take ~16 ms, and a forked
    flow run makes ~8 clients (flow-run CPU of 8 runs at once on this repository's CPU: 7.2 -> 5.2 s). No
    certificate is ever checked here; were TLS ever used, one certificate would fail the connection, never accept
    another server."""
    import certifi

    bundle = home / "loopback-ca.pem"
    if not bundle.is_file():
        text = Path(certifi.where()).read_text()
        begin = text.index("-----BEGIN CERTIFICATE-----")
        end = text.index("-----END CERTIFICATE-----", begin) + len("-----END CERTIFICATE-----")
        home.mkdir(parents=True, exist_ok=True)
        staging = bundle.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text(text[begin:end] + "\n")
        staging.replace(bundle)
    return bundle


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a child that exited and was not reaped yet (a zombie) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def running() -> dict | None:
    """The background server of this PREFECT_HOME when it is up and answering; None otherwise."""
    try:
        state = json.loads(_state_path().read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not _alive(int(state.get("pid", 0) or 0)) or not healthy(state.get("api", "")):
        return None
    return state


def touch() -> None:
    """Say the server is in use now (its idle clock restarts)."""
    with contextlib.suppress(OSError):
        os.utime(_state_path())


@contextlib.contextmanager
def _lock():
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "recast-server.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ensure(idle_s: float) -> tuple[dict, bool]:
    """The background server, started now if none is up (two commands at once start one); (state, started now)."""
    state = running()
    if state:
        touch()
        return state, False
    with _lock():
        state = running()  # another command may have started it while this one waited
        if state:
            touch()
            return state, False
        home = prefect_home()
        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        log = home / "recast-server.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "recast.flows.local_server", "--port", str(port), "--idle-s", str(idle_s)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env=dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false"))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not healthy(api, timeout=1.0):
            if process.poll() is not None or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                raise RuntimeError(f"the background Prefect server did not start (see {log}): {tail.strip()[-300:]}")
            time.sleep(0.2)
        state = {"pid": process.pid, "api": api, "port": port, "started": time.time(), "idle_s": idle_s}
        _state_path().write_text(json.dumps(state) + "\n")
        return state, True


def announce(home: Path, api: str, owner: str) -> None:
    """`recast serve` says its server is this PREFECT_HOME's: commands run with that home use it (instead of
    starting a second server on the same database)."""
    state = {"pid": os.getpid(), "api": api, "started": time.time(), "owner": owner}
    _state_path(home).write_text(json.dumps(state) + "\n")


def withdraw(home: Path) -> None:
    """Remove this process's announcement (a state file another process wrote stays)."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(_state_path(home).read_text()).get("pid") == os.getpid():
            _state_path(home).unlink()


def stop() -> dict | None:
    """Stop the background server of this PREFECT_HOME; what was stopped (None: none was running). A server that
    `recast serve` announced is not this command's to stop: its state comes back with "owner" and it runs on."""
    with _lock():
        try:
            state = json.loads(_state_path().read_text())
        except (OSError, ValueError):
            return None
        if state.get("owner") and _alive(int(state.get("pid", 0) or 0)):
            return state
        pid = int(state.get("pid", 0) or 0)
        if pid and _alive(pid):
            end_process_group(pid)
        with contextlib.suppress(OSError):
            _state_path().unlink()
        return state


def end_process_group(pid: int, grace_s: float = 20.0) -> None:
    """TERM to the process group a background process leads (it was started in a session of its own), KILL to
    what is left of it after grace_s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def in_use():
    """While a command runs: touch the state now and then, so the idle stop never takes the server from under it."""
    stopped = threading.Event()

    def keep() -> None:
        while not stopped.wait(TOUCH_S):
            touch()

    thread = threading.Thread(target=keep, name="recast-server-in-use", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopped.set()
        touch()


# --------------------------------------------------------------------------------------------------
# A new PREFECT_HOME's database, from a migrated template instead of every migration


def database_template() -> Path:
    """Where the empty, migrated Prefect database for this Prefect version is kept (recast's cache)."""
    from importlib.metadata import version

    from recast.tasks.settings import cache_dir

    return cache_dir() / "prefect-db" / f"prefect-{version('prefect')}.db"


def make_database_template() -> Path:
    """An empty Prefect database migrated to this version's schema, made once per Prefect version (Prefect's own
    `server database upgrade`, in a scratch home; two at once: each whole, the last kept)."""
    template = database_template()
    if template.exists():
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=template.parent, prefix=".making-") as scratch:
        env = {k: v for k, v in os.environ.items() if "DATABASE" not in k}  # the scratch home's own SQLite file
        subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], check=True,
                       env=dict(env, PREFECT_HOME=scratch), stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=START_TIMEOUT_S)
        os.replace(Path(scratch) / "prefect.db", template)
    return template


def seed_database(home: Path) -> bool:
    """Give a PREFECT_HOME without a database a copy of the migrated template before its server first starts: on 2
    cores a new home's first start took 21.7 s, 14 s of it migrating an empty SQLite database; from the template,
    9.4 s. Nothing is done for a home with a database, or when the server is told to use another database (a URL
    in the environment or in the home's Prefect profiles). True when the copy was made."""
    target = home / "prefect.db"
    profiles = home / "profiles.toml"
    if target.exists() or any("DATABASE_CONNECTION_URL" in key for key in os.environ) or (
            profiles.exists() and "DATABASE_CONNECTION_URL" in profiles.read_text(errors="replace")):
        return False
    try:
        template = make_database_template()
    except (OSError, subprocess.SubprocessError) as exc:  # Prefect then migrates the new database itself
        print(f"recast server: no database template ({exc}); the server creates its database", flush=True)
        return False
    home.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.copyfile(template, partial)
    os.replace(partial, target)
    return True


# --------------------------------------------------------------------------------------------------
# The background process: the server as its child, stopped when idle or told to


def _supervise(port: int, idle_s: float) -> int:
    seed_database(prefect_home())
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], stdin=subprocess.DEVNULL)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stopping.set())
    state = _state_path()
    while not stopping.wait(5.0) and server.poll() is None:
        try:
            last_use = state.stat().st_mtime
        except OSError:
            continue  # not written yet (the command that started it waits for health), or being replaced
        if time.time() - last_use > idle_s:
            print(f"recast server: idle for {idle_s:.0f}s, stopping", flush=True)
            break
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    with contextlib.suppress(OSError, ValueError):
        if json.loads(state.read_text()).get("pid") == os.getpid():
            state.unlink()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="(internal) the background Prefect server of `recast` commands")
    parser.add_argument("--port", type=int)
    parser.add_argument("--idle-s", type=float)
    parser.add_argument("--database-template", action="store_true", help="only make the migrated database template "
                        "(once per Prefect version; `make install` does)")
    options = parser.parse_args()
    if options.database_template:
        print(f"recast: Prefect database template at {make_database_template()}")
        sys.exit(0)
    if options.port is None or options.idle_s is None:
        parser.error("--port and --idle-s are required")
    sys.exit(_supervise(options.port, options.idle_s))
