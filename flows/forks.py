"""Flow-run processes forked from one that has already imported Prefect and recast's flows (`recast serve`).

Prefect's process worker starts every flow run as a new `python -m prefect.engine`, which imports Prefect, the flow's
module and what it imports before the run's first step: ~3 CPU-s a run, ~6.5 s each when a burst of 32 runs starts
on a 16-core host, so the card waited 13.7 s for the first of 32 edits (docs/PERFORMANCE.md). Here one long-lived
process (`python -m recast.flows.forks serve`) imports all that once; the pool's flow-run command is this module's
client, which asks it for a fork that runs Prefect's own engine (`prefect.engine` as `__main__`, unchanged) with the
client's environment, working folder, stdin/stdout/stderr and arguments. The worker sees an ordinary process:

    exit code   the fork's, relayed (killed by a signal: the client ends by the same signal)
    TERM, INT   relayed to the fork (Prefect's cancellation and `recast serve`'s stop)
    KILL        the client's connection closes, and the server kills the fork

Only the server's own user is served (checked by the connection's credentials: an abstract socket has no file
permissions). Where no server answers (not started, stopped, another machine, another user), the client runs
`python -m prefect.engine` itself, with a line saying so: a run is never lost to this shortcut. The forks run the
code imported when the server started: restart `recast serve` after changing recast's flows (its task workers need
that anyway).

The client imports nothing beyond the standard library, so that starting it costs ~0.05 s.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

# How `recast serve` starts flow runs: forked from this module's server, or as Prefect's process worker does itself.
FLOW_RUN_STARTS = ("fork", "process")
ADDRESS_ENV = "RECAST_FLOW_RUN_FORKS"  # the server's name (an abstract unix socket's); unset: no server
READY = "recast flow-run forks: ready"
# What a fork needs that a new process would import: Prefect's engine and recast's deployed flows.
# (`prefect.engine` itself is left out: it runs as `__main__` in each fork, as `python -m prefect.engine` runs it.)
PRELOAD = ("prefect.flow_engine", "prefect.client.orchestration", "recast.flows.edit",
           "recast.flows.animate", "recast.flows.batch", "recast.flows.storyboard")
# What a run imports only when it first needs it, else again in every fork (~190 modules, 0.13 CPU-s a run on a 2-core
# CPU, two to three times that on a card's host, 32 times over in a burst). Some are Prefect's private modules (of
# the pinned release): one that is gone is said in the server's log and skipped, never a reason not to serve.
PRELOAD_LAZY = ("prefect.task_worker",  # a job's `.delay()` (FastAPI and uvicorn with it)
                "prefect.runner", "prefect.deployments.steps",  # the flow loaded from its deployment
                "prefect.utilities.visualization", "prefect._flow_run_suspension",  # the engine's run set-up
                "anyio._backends._asyncio",  # anyio's event-loop backend, loaded at its first use
                "recast.flows.fleet", "recast.flows.local_server", "PIL.ImageDraw", "PIL.ImageFont")
# More modules than this imported by a run itself is said in its log (a new Prefect or flow importing lazily).
LATE_IMPORTS_ALLOWED = 20
MAX_REQUEST = 1 << 20  # the environment and arguments of one run (a few KiB)


def name(session: str) -> str:
    """The server's name; `session` keeps two serves on one machine apart."""
    return f"recast-flow-run-forks-{session}"


def _address(name: str) -> str:
    """An abstract unix socket (Linux): no file to leave behind, no path-length limit (the NUL stays out of the
    environment, which cannot carry one)."""
    return "\0" + name


# ----------------------------------------------------------------------------------------------------------------
# The client: the flow-run command of the pool `recast serve` creates


def client(argv: list[str]) -> int:
    where = os.environ.get(ADDRESS_ENV)
    conn = None
    if where:
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            conn.connect(_address(where))
            request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
            socket.send_fds(conn, [request], [0, 1, 2])
            pid = int(json.loads(conn.recv(MAX_REQUEST))["pid"])
        except (OSError, ValueError, KeyError) as exc:
            print(f"recast: no flow-run fork ({exc}); starting Prefect's engine in a new process", file=sys.stderr,
                  flush=True)
            conn = None
    if conn is None:
        os.execv(sys.executable, [sys.executable, "-m", "prefect.engine", *argv])

    def relay(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, relay)
    reply = conn.recv(MAX_REQUEST)  # retried across the relayed signals (PEP 475)
    if not reply:
        print("recast: the flow-run fork server ended before this run's process did", file=sys.stderr, flush=True)
        return 1
    code = int(json.loads(reply)["exit"])
    if code < 0:  # killed by a signal: end the same way, so the worker reports what happened
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


# ----------------------------------------------------------------------------------------------------------------
# The server: imports once, forks a process per run


def serve(where: str) -> int:
    import importlib
    import selectors
    import threading

    for module in PRELOAD:
        importlib.import_module(module)
    for module in PRELOAD_LAZY:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            print(f"recast flow-run forks: not imported ahead: {module} ({exc})", file=sys.stderr, flush=True)
    from PIL import Image

    Image.preinit()  # the common image formats' plugins, which the first Image.open of each run would load
    "localhost".encode("idna")  # the codec httpx loads for its first host name
    # A fork copies only the thread that forks: a lock another thread held stays locked forever in the child.
    if threading.active_count() != 1:
        raise RuntimeError(f"the imports started threads ({threading.enumerate()}): forking would be unsafe")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(_address(where))
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    runs: dict[int, tuple[socket.socket, int]] = {}  # pidfd -> (the client's connection, the fork's pid)
    stopping = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, _frame: stopping.append(signum))
    print(READY, flush=True)
    while not stopping:
        for key, _ in selector.select(timeout=0.5):
            if key.data == "accept":
                try:
                    conn, _ = listener.accept()
                    pid = _fork_run(conn, listener, selector)
                except OSError as exc:
                    print(f"recast flow-run forks: a request failed: {exc}", file=sys.stderr, flush=True)
                    continue
                if pid is not None:
                    pidfd = os.pidfd_open(pid)
                    runs[pidfd] = (conn, pid)
                    selector.register(pidfd, selectors.EVENT_READ, "exited")
                    selector.register(conn, selectors.EVENT_READ, ("client", pidfd))
            elif key.data == "exited":
                conn, pid = runs.pop(key.fd)
                _, status = os.waitpid(pid, 0)
                _forget(selector, key.fd, conn)
                try:
                    conn.send(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode())
                except OSError:
                    pass
                conn.close()
            else:  # the client's connection closed (killed): its run must not outlive it
                pidfd = key.data[1]
                if pidfd in runs:
                    try:
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    except ProcessLookupError:  # it ended meanwhile: reaped with the next event
                        pass
                    selector.unregister(key.fileobj)  # its exit, reaped above, is then reported to nobody
    for conn, _pid in runs.values():  # stopping: `recast serve` ends the runs themselves
        conn.close()
    return 0


def _fork_run(conn: socket.socket, listener: socket.socket, selector) -> int | None:
    # An abstract socket has no file permissions: any local user can connect. A fork runs whatever flow the
    # request's environment leads Prefect's engine to, as this server's user, so only that user may ask.
    credentials = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    if uid != os.getuid():
        print(f"recast flow-run forks: refused a request from uid {uid} (only uid {os.getuid()} may start runs)",
              file=sys.stderr, flush=True)
        conn.close()
        return None
    message, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 3)
    if len(fds) != 3 or not message:
        for fd in fds:
            os.close(fd)
        conn.close()
        return None
    request = json.loads(message)
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        conn.send(json.dumps({"pid": pid}).encode())
        return pid
    # The fork: from here on this is the run's process; it never returns into the server's loop.
    code = 1
    try:
        listener.close()
        for key in list(selector.get_map().values()):
            if key.fileobj is not listener:
                os.close(key.fd) if isinstance(key.fileobj, int) else key.fileobj.close()
        conn.close()
        selector.close()
        code = _run_engine(request, fds)
    except BaseException:
        import traceback

        traceback.print_exc()  # on the run's stderr once its descriptors are in place, else in the server's log
    finally:
        os._exit(code)


def _run_engine(request: dict, fds: list[int]) -> int:
    import atexit
    import runpy

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)  # the engine installs its own once it runs
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.setsid()  # a group of its own, as the process worker gives each run
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()  # Prefect read its settings from the server's environment at import
    sys.argv = ["prefect.engine", *request["argv"]]
    # As in a new `python -m prefect.engine`: the module runs as `__main__`, not as an imported `prefect.engine`
    # (runpy warns of "unpredictable behaviour" when both exist).
    sys.modules.pop("prefect.engine", None)
    preloaded = set(sys.modules)
    code = 0
    try:
        runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what an interpreter's exit runs (Prefect flushes its API log handler there)
    late = sorted(set(sys.modules) - preloaded)
    if len(late) > LATE_IMPORTS_ALLOWED:  # each run pays for these again: the fork's saving shrinks
        print(f"recast flow-run forks: this run imported {len(late)} modules the fork server had not "
              f"({', '.join(late[:8])}, ...): add what imports them to recast.flows.forks.PRELOAD_LAZY",
              file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code


def _forget(selector, pidfd: int, conn: socket.socket) -> None:
    for fileobj in (pidfd, conn):
        try:
            selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass
    os.close(pidfd)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        sys.exit(serve(os.environ[ADDRESS_ENV]))
    sys.exit(client(sys.argv[1:]))
