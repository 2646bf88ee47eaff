"""Flow runs forked from a process that has imported Prefect and the flows (recast.flows.forks, `recast serve`'s
default): to Prefect's process worker each is an ordinary process (its output, its exit code, TERM and KILL), and
without a fork server a run still starts, in a process of its own. The whole path (`recast serve`, runs from the API,
their environment) is run by tests/test_benchmarks_cpu.py's stream and tests/test_faults.py's stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import end_process_group

from recast.flows import forks
from test_workers import wait_for

BAD_RUN_ID = "not-a-flow-run-id"


@pytest.fixture
def fork_server(tmp_path):
    """`python -m recast.flows.forks serve` under its own name, ready; stopped afterwards."""
    env = dict(os.environ, **{forks.ADDRESS_ENV: forks.name(uuid.uuid4().hex)})
    log = tmp_path / "forks.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "recast.flows.forks", "serve"], env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: forks.READY in log.read_text() or server.poll() is not None, 300, "the fork server")
        assert server.poll() is None, f"the fork server ended: {log.read_text()[-2000:]}"
        yield server, env
    finally:
        server.terminate()
        server.wait(timeout=60)


def _client(env: dict, *argv: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "recast.flows.forks", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != b"Z":
                found.append(int(entry.name))
    return found


def test_a_forked_run_prints_to_its_clients_output_and_exits_with_prefects_engines_code(fork_server):
    server, env = fork_server
    client = _client(env, BAD_RUN_ID)
    out, err = client.communicate(timeout=300)
    assert "no flow-run fork" not in err, f"the client did not get a fork: {err[-1500:]}"
    # Prefect's engine, run in the fork, refuses the id on the client's stderr and exits 1, which the client relays.
    assert "Invalid flow run id" in out + err and BAD_RUN_ID in out + err, \
        f"the fork's output did not reach the client's: {(out + err)[-1500:]}"
    assert client.returncode == 1, f"the engine's exit code 1 was not relayed: {client.returncode}"
    # As in `python -m prefect.engine`: nothing in a run's log that a new process would not print.
    assert "RuntimeWarning" not in err, f"the fork printed a warning a new process does not: {err[-1500:]}"
    assert server.poll() is None, "one run's end must not end the fork server"


def test_without_a_fork_server_the_run_starts_in_a_process_of_its_own(tmp_path):
    env = dict(os.environ, **{forks.ADDRESS_ENV: forks.name("nobody-listens-" + uuid.uuid4().hex)})
    client = _client(env, BAD_RUN_ID)
    out, err = client.communicate(timeout=300)
    assert "no flow-run fork" in err and "starting Prefect's engine in a new process" in err, err[-1500:]
    assert "Invalid flow run id" in out + err and client.returncode == 1, \
        f"Prefect's engine did not run in the client's place: {client.returncode}: {(out + err)[-1500:]}"


@pytest.mark.parametrize("how", ["TERM", "KILL"])
def test_a_forked_run_ends_with_its_client_however_the_worker_stops_it(fork_server, how):
    """Prefect cancels a run by TERM, then KILL, to the process it started: the client. TERM is relayed to the fork
    (the client then ends as the fork did); a killed client cannot relay anything, so the server kills its fork."""
    server, env = fork_server
    with socket.socket() as silent_api:  # accepts connections, never answers: the run waits on its first request
        silent_api.bind(("127.0.0.1", 0))
        silent_api.listen(8)
        env = dict(env, PREFECT_API_URL=f"http://127.0.0.1:{silent_api.getsockname()[1]}/api",
                   PREFECT__FLOW_RUN_ID=str(uuid.uuid4()))
        client = _client(env)
        wait_for(lambda: _children(server.pid) or client.poll() is not None, 300, "the run's fork")
        assert client.poll() is None, f"the client ended early: {client.communicate()}"
        (fork,) = _children(server.pid)
        client.send_signal(signal.SIGTERM if how == "TERM" else signal.SIGKILL)
        client.wait(timeout=120)
        wait_for(lambda: fork not in _children(server.pid), 120, f"the fork to end after its client's {how}")
    if how == "TERM":
        assert client.returncode == -signal.SIGTERM, \
            f"the fork, ended by the relayed TERM, was not reported as such: {client.returncode}"
    assert server.poll() is None, "the fork server must outlive a run that was stopped"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root, to ask as another user")
def test_another_user_cannot_have_a_run_forked(fork_server, tmp_path):
    """Any local user can reach an abstract socket; a fork runs, as the server's user, whatever flow the request's
    environment leads Prefect to. So the server forks only for its own user; another one's request is closed
    unanswered (its client then runs Prefect's engine itself, as that user)."""
    server, env = fork_server
    pid = os.fork()
    if pid == 0:  # as the nobody user, this client's request, as forks.client sends it
        code = 3
        try:
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
                conn.connect("\0" + env[forks.ADDRESS_ENV])
                request = {"argv": [BAD_RUN_ID], "cwd": "/", "env": {"PREFECT__FLOW_RUN_ID": str(uuid.uuid4())}}
                try:
                    socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
                    code = 0 if conn.recv(forks.MAX_REQUEST) == b"" else 1
                except (BrokenPipeError, ConnectionResetError):  # closed before or after the request was sent
                    code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    log = (tmp_path / "forks.log").read_text()
    assert os.waitstatus_to_exitcode(status) == 0, f"another user's request was answered (a fork started): {log}"
    assert "refused a request from uid 65534" in log, f"the server did not say it refused another user: {log[-1500:]}"
    assert not _children(server.pid), "the server forked a run for another user"


def test_a_forked_run_cancelled_from_the_ui_ends_cancelled_and_the_next_run_takes_its_place(astronaut, tmp_path):
    """`recast serve` forks its flow runs; cancelling one (the UI's Cancel: the run's state set to Cancelling) must
    still end it as Cancelled, its fork gone, as with Prefect's own flow-run processes. With `--flow-runs-at-once
    1` a second run waits, scheduled, while the first runs, and starts once the first has ended."""
    from test_faults import _alive, _cmdline, _descendants, _read, start_long_run, start_serving
    from test_workers import BIN

    serve, env, root = start_serving([str(BIN / "recast"), "serve", "--flow-runs-at-once", "1"], tmp_path, astronaut,
                                     tmp_path)
    api = dict(env, PREFECT_API_URL=f"http://127.0.0.1:{env['RECAST_SERVE_PORT']}/api")
    try:
        wait_for(lambda: "recast is serving" in _read(serve) or serve.poll() is not None, 600, "recast serve")
        assert serve.poll() is None, _read(serve)[-3000:]
        run_id = start_long_run(env, root)
        wait_for(lambda: list(root.glob("runs/*/.jobs/*.submitted")), 300, "the run to submit its edits")
        fork_server = next(pid for pid in _descendants(serve.pid) if "recast.flows.forks serve" in _cmdline(pid))
        forks = _children(fork_server)
        assert len(forks) == 1, f"one forked run expected: {forks}"
        waiting_id = start_long_run(env, root)
        _prefect(api, run_id, "from prefect.states import Cancelling; "
                               "print(client.set_flow_run_state(run_id, Cancelling(), force=True).status)")
        wait_for(lambda: _prefect(api, run_id, "print(client.read_flow_run(run_id).state.type.value)") == "CANCELLED",
                 300, "the run to be cancelled")
        wait_for(lambda: not _alive(forks[0]), 120, "the cancelled run's fork to end")
        assert serve.poll() is None, "cancelling a run must not stop recast serve"
        wait_for(lambda: _prefect(api, waiting_id, "print(client.read_flow_run(run_id).state.type.value)")
                 == "RUNNING", 300, "the waiting run to start once the first ended")
        first_end, second_start = (_prefect(api, flow_run, f"print(client.read_flow_run(run_id).{field}.timestamp())")
                                   for flow_run, field in ((run_id, "end_time"), (waiting_id, "start_time")))
        assert float(second_start) >= float(first_end), \
            f"--flow-runs-at-once 1: the second run started at {second_start}, before the first ended ({first_end})"
    finally:
        end_process_group(serve, grace_s=120)  # recast serve stops everything it started, flow runs included


def _prefect(env: dict, run_id: str, code: str) -> str:
    """`code` with a Prefect client (`client`) and the flow run's id (`run_id`), in a process of its own (Prefect reads
    PREFECT_API_URL once, at import); its output's last line."""
    done = subprocess.run([sys.executable, "-c", "import sys, uuid; from prefect import get_client; "
                           "run_id = uuid.UUID(sys.argv[1])\nwith get_client(sync_client=True) as client:\n    "
                           + code, run_id], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def test_the_fork_server_imports_every_deployed_flow_ahead():
    """A deployment whose flow module the server has not imported still runs, but each fork then imports it (and
    what it imports) again: the cost forking saves. deployments/prefect.yaml and forks.PRELOAD must agree."""
    import yaml

    deployments = yaml.safe_load((Path(__file__).resolve().parent.parent / "deployments" / "prefect.yaml").read_text())
    modules = {deployment["entrypoint"].split(":")[0] for deployment in deployments["deployments"]}
    missing = modules - set(forks.PRELOAD)
    assert not missing, f"flows deployed but not imported by the fork server: {missing}"


def test_the_clients_of_recasts_own_servers_ask_them_nothing_they_know(tmp_path):
    """The processes `recast serve` starts, and a CLI command on the background server, talk to a server recast
    started from this same install: their Prefect clients skip the version handshake (a request to the one API
    process at each client's start, which a burst of runs queues behind) and the CSRF token the server does not ask
    for (a request before each client's first change: 6 of a CLI chain's 28)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from recast.flows import local_server

    paths: list[str] = []

    class Recording(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: bytes):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 - http.server's name
            paths.append(self.path)
            if "/csrf-token" in self.path:  # as Prefect's server answers when CSRF protection is off
                self._answer(422, b'{"detail": "CSRF protection is disabled."}')
            else:
                self._answer(200, b'"3.9.1"' if self.path.endswith("/admin/version") else b'"hello"')

        def do_POST(self):  # noqa: N802
            paths.append(self.path)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._answer(200, json.dumps({"id": str(uuid.uuid4()), "name": "f"}).encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recording)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api = f"http://127.0.0.1:{server.server_address[1]}/api"
    # As Prefect's engine opens its clients in a flow run (a client context checks the version once a process), then
    # a change (a POST: CSRF tokens are asked for changes only)
    client = ("from prefect.context import SyncClientContext\n"
              "with SyncClientContext.get_or_create() as context:\n"
              "    context.client.hello()\n    context.client.create_flow_from_name('f')\n")
    # A CLI command on the background server it finds recorded in its Prefect home (here: the recording server)
    home = tmp_path / "cli-home"
    home.mkdir()
    (home / local_server.STATE).write_text(json.dumps({"pid": os.getpid(), "api": api, "started": 0}))
    cli = "from recast.flows.cli import _prefect_server\n_prefect_server()\n" + client
    base = dict(os.environ, PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "prefect"))
    cli_env = {key: value for key, value in base.items() if key != "PREFECT_API_URL"}
    try:
        seen = {}
        for name, script, env in (("plain", client, base),
                                  ("serve", client, dict(base, **local_server.own_server_clients(base, tmp_path))),
                                  ("cli", cli, dict(cli_env, PREFECT_HOME=str(home), RECAST_CLI_SERVER="background"))):
            paths.clear()
            done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode == 0, f"{name}: a Prefect client could not talk to the server: {done.stderr[-2000:]}"
            seen[name] = list(paths)
    finally:
        server.shutdown()
        server.server_close()
    assert {"/api/admin/version", "/api/csrf-token"} <= {p.split("?")[0] for p in seen["plain"]}, \
        f"a plain client should ask the version and a CSRF token (the control): {seen['plain']}"
    for name in ("serve", "cli"):
        assert "/api/hello" in seen[name] and "/api/flows/" in seen[name], \
            f"{name}: the client never reached the server: {seen[name]}"
        assert not [p for p in seen[name] if p.split("?")[0].endswith(("/admin/version", "/csrf-token"))], \
            f"{name}: the clients of recast's own server still ask it what they know: {seen[name]}"
