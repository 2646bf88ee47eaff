"""`recast serve` (`make serve`): everything a team needs on one machine, started together and stopped together.

    1. a Prefect server on 127.0.0.1 (SQLite under PREFECT_HOME, or PostgreSQL), once it answers
    2. the deployments of deployments/prefect.yaml and their process pool
    3. a process worker for flow runs, an edit and an animate task worker (tiny profiles)
    4. "recast is serving", with the addresses, once every worker is ready to take work
    5. stop: on INT or TERM (once or twice), or when any of them exits, everything it started stops within
       seconds: flow-run processes included, nothing left listening

Flow-run processes are started by the process worker in sessions of their own, where no group signal reaches
them, and outlive a worker that is killed. So every process this command starts carries RECAST_SERVE_SESSION in
its environment, which they pass on to everything they start (the process worker hands its environment to each
flow run): stopping finds every one of them by that mark, asks them to end, and kills what is left after
STOP_GRACE_S.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from recast.flows import forks, local_server
from recast.tasks.errors import BadInput

MARK = "RECAST_SERVE_SESSION"
STOP_GRACE_S = 6.0  # TERM, then KILL: Prefect's process worker turns TERM into INT and may keep going
READY_TIMEOUT_S = 600.0  # a busy machine: the server migrates its database, the workers build the tiny models


@dataclass
class Service:
    name: str
    command: list[str]
    ready_text: str | None = None  # a line in its log that says it is ready; None: ready once started
    proc: subprocess.Popen | None = None
    log: Path | None = None


@dataclass
class Supervisor:
    repo: Path
    env: dict[str, str]
    logs: Path
    services: list[Service] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    stop_reason: str = ""

    # ----------------------------------------------------------------------------------------------
    # Starting

    def start(self, service: Service) -> Service:
        service.log = self.logs / f"{service.name}.log"
        with open(service.log, "w") as log:
            # A session of its own: a Ctrl-C at the terminal reaches this supervisor, which stops it in order.
            service.proc = subprocess.Popen(service.command, cwd=self.repo, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.services.append(service)
        return service

    def run_once(self, name: str, command: list[str]) -> subprocess.CompletedProcess:
        """A short command (create the pool, deploy), marked like the rest so a stop meanwhile ends it too."""
        with open(self.logs / f"{name}.log", "w") as log:
            proc = subprocess.Popen(command, cwd=self.repo, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            while proc.poll() is None:
                if self.stopping.wait(0.2):
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait()
        return subprocess.CompletedProcess(command, proc.returncode)

    def wait_until(self, what: str, check, timeout_s: float = READY_TIMEOUT_S) -> bool:
        """Wait for check() while nothing asked to stop and every service is alive; False when that ended it."""
        deadline = time.monotonic() + timeout_s
        while not self.stopping.is_set():
            if self.exited():
                return False
            if check():
                return True
            if time.monotonic() > deadline:
                self.stop_reason = f"{what} was not ready after {timeout_s:.0f}s"
                return False
            self.stopping.wait(0.5)
        return False

    def ready(self, service: Service) -> bool:
        return service.ready_text is None or service.ready_text in service.log.read_text(errors="replace")

    def exited(self) -> Service | None:
        """The first service that ended on its own (then everything stops: a half-served team helps nobody)."""
        for service in self.services:
            if service.proc.poll() is not None:
                self.stop_reason = self.stop_reason or (f"{service.name} exited with code {service.proc.returncode}"
                                                        f" (see {service.log})")
                return service
        return None

    # ----------------------------------------------------------------------------------------------
    # Stopping

    def stop(self) -> list[int]:
        """TERM everything marked as this session's (and each service's group), KILL what is left after
        STOP_GRACE_S; returns the pids that had to be killed."""
        self.stopping.set()
        for service in self.services:
            _signal_group(service.proc.pid, signal.SIGTERM)
        for pid in marked_processes(self.env[MARK]):
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and (self._alive_services() or marked_processes(self.env[MARK])):
            time.sleep(0.2)
        killed = marked_processes(self.env[MARK])
        for service in self._alive_services():
            _signal_group(service.proc.pid, signal.SIGKILL)
        for pid in killed:
            _signal(pid, signal.SIGKILL)
        for service in self.services:
            try:
                service.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        return killed

    def _alive_services(self) -> list[Service]:
        return [s for s in self.services if s.proc.poll() is None]


def marked_processes(session: str) -> list[int]:
    """Every live process (zombies aside) whose environment carries this session's mark, this one excepted."""
    needle = f"{MARK}={session}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
        except OSError:  # gone meanwhile, or not ours to read
            continue
        found.append(int(entry.name))
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _repo() -> Path:
    """The checkout whose deployments/prefect.yaml is served (the flows run from it: RECAST_ROOT)."""
    for candidate in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (candidate / "deployments" / "prefect.yaml").is_file():
            return candidate
    raise BadInput("cwd", str(Path.cwd()), "no deployments/prefect.yaml here", "run `recast serve` (or `make serve`) "
                   "in a recast checkout")


def serve(port: int | None = None, profile: str | None = None, video_profile: str | None = None,
          one_worker: bool = False, flow_run_start: str = "fork", flow_runs_at_once: int | None = None) -> int:
    """Start, announce, wait for a stop, stop everything; the exit code (0 when stopped by a signal). `profile`
    and `video_profile` choose what the task workers load; `one_worker`: one process serves both stages (one card);
    `flow_run_start`: "fork" (each flow run forked from a process that has imported Prefect and the flows,
    recast.flows.forks) or "process" (Prefect's own: a new Python process per run); `flow_runs_at_once`: how many
    flow runs the flow worker starts and keeps running at once (None: no limit, Prefect's default); the others wait
    as scheduled runs and start as runs end."""
    if flow_run_start not in forks.FLOW_RUN_STARTS:
        raise BadInput("--flow-run-start", flow_run_start, "is not a way to start flow runs",
                       f"use one of {', '.join(forks.FLOW_RUN_STARTS)}")
    if flow_runs_at_once is not None and flow_runs_at_once < 1:
        raise BadInput("--flow-runs-at-once", flow_runs_at_once, "must be at least 1",
                       "give the number of flow runs to run at once, or leave it out for no limit")
    repo = _repo()
    port = port or int(os.environ.get("RECAST_SERVE_PORT", "4200"))
    home = Path(os.environ.get("PREFECT_HOME") or repo / ".prefect-server")
    logs = repo / "logs"
    for folder in (home, logs, repo / "artifacts" / "incoming"):
        folder.mkdir(parents=True, exist_ok=True)
    api = f"http://127.0.0.1:{port}/api"
    gallery_port = int(os.environ.get("RECAST_SERVE_GALLERY_PORT", str(port + 100)))
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               # A run created from the UI or the API starts at the flow worker's next look: within 1 s (Prefect's
               # default is 10 s, and 2 s here before: the first of a burst of runs waited 1 s for it on average).
               PREFECT_WORKER_QUERY_SECONDS=os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "1"),
               # Flow and task runs log at INFO, so the UI shows each run's logs.
               PREFECT_LOGGING_LEVEL=os.environ.get("RECAST_SERVE_LOG_LEVEL", "INFO"),
               RECAST_EXECUTION="workers", RECAST_ROOT=str(repo),
               RECAST_GALLERY_URL=f"http://127.0.0.1:{gallery_port}",  # each run's summary links to its page
               RECAST_INCOMING=os.environ.get("RECAST_INCOMING", f"file://{repo}/artifacts/incoming"))
    env.update(local_server.own_server_clients(env, home))
    env[MARK] = uuid.uuid4().hex
    if flow_run_start == "fork":
        env[forks.ADDRESS_ENV] = forks.name(env[MARK])
    supervisor = Supervisor(repo=repo, env=env, logs=logs)

    def on_signal(signum, _frame):
        if supervisor.stopping.is_set():
            print(f"recast serve: {signal.Signals(signum).name} again: already stopping", file=sys.stderr, flush=True)
            return
        supervisor.stop_reason = supervisor.stop_reason or f"stopped by {signal.Signals(signum).name}"
        supervisor.stopping.set()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)

    postgres_stop = None
    try:
        database = os.environ.get("RECAST_SERVE_DATABASE", "")
        if database == "postgres":
            url, postgres_stop = _start_postgres(repo, home / "postgres")
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = url
        elif database:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = database
        if not database:
            local_server.seed_database(home)  # a new home: the migrated template, not every migration
        # `python -m`: the same interpreter and packages as this process, console scripts or not.
        prefect = [sys.executable, "-m", "prefect"]
        supervisor.start(Service("server", [*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)]))
        if supervisor.wait_until("the Prefect server", lambda: local_server.healthy(api)):
            # CLI commands with this PREFECT_HOME use this server, not a second one on the same database
            local_server.announce(home, api, owner="recast serve")
            template = _pool_template(home, flow_run_start)
            supervisor.run_once("work-pool", [*prefect, "work-pool", "create", "recast-flows", "--type", "process",
                                              "--base-job-template", str(template), "--overwrite"])
            deployed = supervisor.run_once("deploy", [*prefect, "--no-prompt", "deploy", "--all", "--prefect-file",
                                                      "deployments/prefect.yaml"])
            if deployed.returncode != 0 and not supervisor.stopping.is_set():
                supervisor.stop_reason = f"deploying failed: see {logs / 'deploy.log'}"
                supervisor.stopping.set()
        if not supervisor.stopping.is_set() and not supervisor.exited():
            recast = [sys.executable, "-m", "recast.flows.cli"]
            chosen = [*(["--profile", profile] if profile else []),
                      *(["--video-profile", video_profile] if video_profile else [])]
            task_workers = [("worker", ["edit", "animate"])] if one_worker else [("edit-worker", ["edit"]),
                                                                                 ("animate-worker", ["animate"])]
            workers = []
            if flow_run_start == "fork":  # before the flow worker: its first run's client connects to it
                workers.append(supervisor.start(Service("flow-run-forks", [sys.executable, "-m", "recast.flows.forks",
                                                                           "serve"], ready_text=forks.READY)))
            limit = ["--limit", str(flow_runs_at_once)] if flow_runs_at_once else []
            workers.append(supervisor.start(Service("flow-worker", [*prefect, "worker", "start", "--pool",
                                                                    "recast-flows", *limit], ready_text="started")))
            workers += [supervisor.start(Service(name, [*recast, "worker", *kinds, *chosen],
                                                 ready_text="Subscribing to runs")) for name, kinds in task_workers]
            workers.append(supervisor.start(Service("gallery", [*recast, "gallery", "--port", str(gallery_port)],
                                                    ready_text="recast gallery: http")))
            if supervisor.wait_until("the workers", lambda: all(supervisor.ready(w) for w in workers)):
                print(f"recast is serving:\n"
                      f"  Prefect UI   http://127.0.0.1:{port}   (Deployments -> recast-edit/edit -> Run -> "
                      f"Custom run)\n"
                      f"  gallery      http://127.0.0.1:{gallery_port}   (every run's pictures and clips)\n"
                      f"  photos       upload under {repo / 'artifacts'} (runs from the UI read only under the "
                      f"storage root)\n"
                      f"  logs         {logs}/*.log\n"
                      f"Ctrl-C stops the server, the workers and their flow runs.", flush=True)
                supervisor.wait_until("a stop", lambda: False, timeout_s=float("inf"))
    finally:
        local_server.withdraw(home)
        reason = supervisor.stop_reason or "stopping"
        print(f"recast serve: {reason}; stopping everything it started", file=sys.stderr, flush=True)
        killed = supervisor.stop()
        if postgres_stop:
            postgres_stop()
        print(f"recast serve: stopped{f' ({len(killed)} killed after {STOP_GRACE_S:.0f}s)' if killed else ''}",
              file=sys.stderr, flush=True)
    return 0 if supervisor.stop_reason.startswith("stopped by") else 1


def _pool_template(home: Path, flow_run_start: str) -> Path:
    """The process pool's job template: Prefect's default, with the flow-run command recast.flows.forks' client
    when runs are forked (it starts Prefect's engine itself where no fork server answers)."""
    import json

    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    if flow_run_start == "fork":
        command = template["variables"]["properties"]["command"]
        command["default"] = shlex.join([sys.executable, "-m", "recast.flows.forks"])
    path = home / "recast-flows-pool.json"
    path.write_text(json.dumps(template, indent=2))
    return path


def _start_postgres(repo: Path, folder: Path):
    """deployments/postgres.sh start: a local PostgreSQL for the server; (its URL, a function that stops it)."""
    script = repo / "deployments" / "postgres.sh"
    out = subprocess.run(["bash", str(script), "start", str(folder)], capture_output=True, text=True, check=True)
    values = dict(line.removeprefix("export ").split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    url = values["PREFECT_API_DATABASE_CONNECTION_URL"].strip("'\"")
    return url, lambda: subprocess.run(["bash", str(script), "stop", str(folder)], capture_output=True, timeout=60)
