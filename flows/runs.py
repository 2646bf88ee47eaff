"""What the flows share: run ids, where a run may read, what a manifest records, and plans made once.

Every flow imports this module; no flow imports another flow's module unless it runs that flow (the edit flow
runs the animate flow inline; the batch flow runs the edit flow).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import re
import secrets
import threading
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata

from recast.tasks import storage
from recast.tasks.errors import BadInput


def first_set(*values):
    """Request value, else profile default, else global default."""
    return next(v for v in values if v is not None)


def slug(text: str, length: int = 32) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length].rstrip("-") or "edit"


def theme(prompt: str) -> str:
    """The first clause of a prompt: 'James Bond 007' for the origin's results table."""
    return prompt.split(",")[0].strip()[:40]


def now() -> datetime:
    return datetime.now(timezone.utc)


def timestamp(moment: datetime | None = None) -> str:
    return (moment or now()).isoformat(timespec="milliseconds")


def new_run_id(moment: datetime) -> str:
    return f"{moment:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


# Whether the flow body running in this context was started from a deployment: set by `blocking` for each flow
# body, inherited by the subflows it runs in this process (the edit flow's video stage).
_STARTED_REMOTELY: contextvars.ContextVar[bool | None] = contextvars.ContextVar("recast_started_remotely",
                                                                                default=None)


def started_remotely() -> bool:
    """A run started from a deployment (the UI, a schedule, the API), not by a local user's CLI; a subflow it runs
    in this process is one too."""
    known = _STARTED_REMOTELY.get()
    if known is not None:
        return known
    from prefect.context import FlowRunContext
    from prefect.runtime import deployment

    run = getattr(FlowRunContext.get(), "flow_run", None)
    if run is not None and run.deployment_id is None and run.parent_task_run_id is None:
        # A top-level run that no deployment started (the CLI's, a test's). Prefect's runtime would read the run
        # back from the API to say so, with a new client each time (~40 ms on the photo-to-clip chain's path).
        return False
    return deployment.id is not None


def check_inputs_allowed(uris: list[str], roots: list[str], field: str = "images") -> None:
    """UI and scheduled runs read only under the configured roots: no arbitrary local files, no other hosts."""
    for index, uri in enumerate(uris):
        name = f"{field}[{index}]" if len(uris) > 1 or field == "images" else field
        storage.check_scheme(name, uri)
        if not storage.is_under(uri, roots):
            raise BadInput(name, uri, "runs started from the UI or a schedule may only read "
                           "under the configured storage roots",
                           f"upload it under {storage.redact(roots[0])}, or add its root to allowed_input_roots")


def check_storage_root(requested: str | None, settings, remote: bool) -> str:
    """The run's storage root. A run from the UI, the API or a schedule may pick one of the configured storage
    roots, never name another (it would read and write outside them); the CLI writes where its user says."""
    root = storage.check_scheme("storage", requested or settings.storage_root)
    if remote and requested and not any(storage.is_under(root, [configured]) and storage.is_under(configured, [root])
                                        for configured in settings.storage_roots):
        raise BadInput("storage_root", requested, "runs started from the UI, the API or a schedule may only write "
                       "to a configured storage root", f"pick one of: {', '.join(settings.storage_roots)}, or leave "
                       "it empty")
    return root


@lru_cache(maxsize=1)
def _installed_versions() -> tuple[tuple[str, str], ...]:
    # Read once per process: each lookup scans every folder on sys.path for its metadata, and every manifest asks
    # (ten lookups per inline chain). On the GPU it did not change the chain's time (20.13 -> 20.11 s): the
    # 1.6 s per lookup a cProfile listing suggested was its misattribution of waits in other threads.
    found = []
    for name in ("recast", "diffusers", "transformers", "torch", "prefect"):
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            found.append((name, "unknown"))
    return tuple(found)


def versions() -> dict[str, str]:
    return dict(_installed_versions())


def flow_run_info() -> dict:
    from prefect.runtime import flow_run

    return {"flow_run_id": str(flow_run.id) if flow_run.id else None, "flow_run_name": flow_run.name}


# A plan (inputs read and verified, LoRAs hashed, seeds drawn) made by the CLI before Prefect starts, kept so the
# flow that runs it in this process does not read and decode everything a second time.
_PLANS: dict[tuple[str, str], object] = {}


def remember_plan(kind: str, request, plan) -> None:
    _PLANS[(kind, request.model_dump_json())] = plan


def take_plan(kind: str, request):
    """The plan remembered for this exact request in this process, once; None when there is none."""
    return _PLANS.pop((kind, request.model_dump_json()), None)


# --------------------------------------------------------------------------------------------------
# Async flows around blocking bodies
#
# Prefect's sync flow engine ends every flow run by joining its heartbeat thread, which sleeps in one-second steps:
# each sync flow run ends up to a second late (1.5 s of the photo-to-clip chain's 19 s on an H200; 2.1 s against
# 0.3 s for a parent and a child flow here). The async engine does not wait for it. So the chain's flows are async
# and run their plain, blocking bodies in a thread of their own, with the flow run's context.


async def blocking(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a daemon thread carrying this context (the flow run's), awaited. A daemon thread: a
    Ctrl-C in the CLI ends the process instead of waiting for the body to finish."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    context = contextvars.copy_context()

    def settle(result, error) -> None:
        if not done.cancelled():
            done.set_exception(error) if error is not None else done.set_result(result)

    def body() -> None:
        try:
            result = context.run(_in_flow_body, fn, *args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting flow, whatever it is
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=body, name=f"recast-{getattr(fn, '__name__', 'flow')}", daemon=True).start()
    return await done


def _in_flow_body(fn, *args, **kwargs):
    _STARTED_REMOTELY.set(started_remotely())  # asked once per run, kept for its body and its subflows
    return fn(*args, **kwargs)


def one_client():
    """A context in which Prefect's calls share one API client (a run's closing artifacts): each call would make
    its own, which loads its CA bundle into a new SSL context and asks for a CSRF token first (~25 ms a call with
    certifi's bundle). Only around calls made back to back: a kept connection must not outlive a server restart
    that the run's job submissions and polls recover from."""
    from prefect.context import SyncClientContext

    return SyncClientContext.get_or_create()


def run_flow(flow_fn, *args, **kwargs):
    """Call a flow from blocking code (the CLI, a parent flow's body, a test) and return what it returns, whether
    the flow is sync or async."""
    result = flow_fn(*args, **kwargs)
    return asyncio.run(result) if inspect.isawaitable(result) else result
