"""A worker that comes back in seconds after its serving process dies (#22: a crashed worker's replacement).

A CUDA fault (an illegal address poisons the process's context), the OOM killer or a bug ends a worker's process;
whatever restarts it then pays the whole cold start again, and most of a restart from prepared weights is Python
importing torch, diffusers and transformers (on one H200, 3.8 s of imports and most of the 12.9 s of module
structure of a 23-s edit worker restart). So `recast worker` on one GPU is two processes: this parent imports what
loading its profiles will import (recast.tasks.models.loading.import_ahead, never touching CUDA), then forks the
serving process, which loads the weights, warms up and serves; when that process dies after it began serving, the
parent forks it again from the imported libraries. Page cache, prepared weights and compile caches are as warm as
for any restart; what is saved is the imports.

- The parent never returns: it exits with the serving process's code once that ends for good. The serving process
  returns from `supervise` and runs the worker as if it had been started alone (the CLI's errors and exit codes
  are its own).
- A serving process that ends before it began serving (bad configuration, a model it cannot load) is not started
  again: the parent exits with its code. Neither is one that exits 0 (stopped when idle) nor one the parent was
  asked to stop (TERM, INT or HUP to the parent are passed on to it, once: it runs in a process group of its own).
- More than `worker_respawns` deaths within RESPAWN_WINDOW_S: the parent gives up and exits 1, for whatever
  supervises it (a container runtime) to see.
- The serving process dies with the parent (PR_SET_PDEATHSIG): killing the worker frees the GPU.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

RESPAWN_WINDOW_S = 600.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# In a serving process: how many times its parent had started it before (0: the first), when it was forked
# (time.time()), and the pipe that tells the parent it began serving.
generation = 0
forked_at: float | None = None
_serving_pipe: int | None = None


def supervise(import_ahead, respawns: int, uses_cuda: bool = True) -> None:
    """Import ahead, then fork the serving process (which returns from here) and start it again each time it dies
    after it began serving, up to `respawns` times in RESPAWN_WINDOW_S. With respawns 0, on a system without fork,
    or where the serving process will use CUDA (`uses_cuda`) and the imports touched it (torch then refuses CUDA in
    a forked process), returns at once in this process."""
    global generation, forked_at, _serving_pipe
    if respawns <= 0 or not hasattr(os, "fork") or not sys.platform.startswith("linux"):
        return
    started = time.perf_counter()
    keep_cuda_forkable()
    import_ahead()
    if uses_cuda and not _cuda_survives_fork():
        print("recast worker: the libraries touched CUDA while importing, so a forked process could not use the GPU; "
              "serving without a respawning parent", flush=True)
        return
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if others:  # a thread that is not a daemon would be missing in the child, its locks perhaps held
        print(f"recast worker: threads running ({', '.join(others)}); serving without a respawning parent", flush=True)
        return
    print(f"recast worker: libraries imported in {time.perf_counter() - started:.1f}s; serving from a child process "
          f"this one starts again if it dies (worker_respawns: {respawns} in {RESPAWN_WINDOW_S / 60:.0f} min)",
          flush=True)

    child = {"pid": 0, "stop": None}

    def pass_on(signum, _frame):
        child["stop"] = signum
        if child["pid"]:
            try:
                os.kill(child["pid"], signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, pass_on) for sig in STOP_SIGNALS}
    deaths: list[float] = []
    count = 0
    while True:
        ready_read, ready_write = os.pipe()
        forked = time.time()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the serving process
            os.close(ready_read)
            os.setpgid(0, 0)  # signals to the worker's group reach the parent, which passes them on once
            die_with_parent()
            if os.getppid() != parent:  # the parent died before the line above
                os._exit(1)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            generation, forked_at, _serving_pipe = count, forked, ready_write
            return
        os.close(ready_write)
        child["pid"] = pid
        print(f"recast worker: serving process {pid} started", flush=True)
        if child["stop"] is not None:  # asked to stop while forking
            pass_on(child["stop"], None)
        status = _wait(pid)
        began_serving = os.read(ready_read, 1) == b"s"
        os.close(ready_read)
        code = os.waitstatus_to_exitcode(status)
        child["pid"] = 0
        exit_code = code if code >= 0 else 128 - code
        if child["stop"] is not None or code == 0 or not began_serving:
            raise SystemExit(exit_code)
        now = time.monotonic()
        deaths = [t for t in deaths if now - t < RESPAWN_WINDOW_S] + [now]
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        if len(deaths) > respawns:
            print(f"recast worker: the serving process {pid} died ({how}), {len(deaths)} deaths in "
                  f"{RESPAWN_WINDOW_S / 60:.0f} min (worker_respawns: {respawns}); giving up", flush=True)
            raise SystemExit(1)
        count += 1
        print(f"recast worker: the serving process {pid} died ({how}) after {time.time() - forked:.0f}s; starting it "
              f"again ({len(deaths)} of {respawns} in {RESPAWN_WINDOW_S / 60:.0f} min)", flush=True)


def keep_cuda_forkable() -> None:
    """torch.cuda.is_available() asks the CUDA runtime by default (cudaGetDeviceCount), after which torch refuses
    CUDA in every process forked from this one ("Cannot re-initialize CUDA in forked subprocess"), and diffusers
    calls it as it is imported. Asked through NVML instead it leaves CUDA alone (torch's documented switch, read at
    each call); where NVML is missing torch falls back to the runtime, which _cuda_survives_fork then notices."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


def _cuda_survives_fork() -> bool:
    """Whether a process forked from this one can still use CUDA: torch marks forks of a process whose CUDA was
    touched (initialised, or only asked for its devices) as unable to, which the parent itself cannot see, so a probe
    child reports it."""
    import torch

    if not torch.cuda.is_initialized():
        pid = os.fork()
        if pid == 0:
            os._exit(1 if torch.cuda._is_in_bad_fork() else 0)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) == 0
    return False


def serving() -> None:
    """Called by the serving process once it serves: from now on, its death is one to start it again after."""
    global _serving_pipe
    if _serving_pipe is not None:
        os.write(_serving_pipe, b"s")
        os.close(_serving_pipe)
        _serving_pipe = None


def _wait(pid: int) -> int:
    """The serving process's wait status, once it ends. Any other child that ends meanwhile is reaped too: as a
    container's first process this parent inherits what a dead serving process left (ffmpeg, compile workers)."""
    while True:
        try:
            ended, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        if ended == pid:
            return status


def die_with_parent() -> None:
    """This process is killed when the one that started it ends (Linux), however that ends."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
