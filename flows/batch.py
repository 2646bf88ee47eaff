"""The batch flow (scheduled): edit every new photo under a storage prefix with a set of prompts.

Idempotent: each photo is keyed by the SHA-256 of its bytes and of the settings it is edited with; a key that
already has a marker under <storage_root>/batch/ is skipped, so a schedule can run as often as it likes. A photo is
claimed (<key>.claim, created atomically) when the run takes it, so two overlapping runs never edit the same photo;
a failed edit releases its claim for the next run, a claim whose run died expires after CLAIM_STALE_S. The
deployment also runs one batch at a time (deployments/prefect.yaml).

With task workers the photos fan out like a run's edits: up to `batch_in_flight` photos' edit subflows at once,
each submitting its own edits, so every worker stays busy; in local mode (one pipeline in this process) one photo
after another. The result lists photos in the order they were found, whatever order they finished in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from prefect import flow, get_run_logger

from recast.flows.edit import edit_flow  # the batch flow is built on it (one subflow per photo)
from recast.flows.execution import run_many
from recast.flows.runs import check_inputs_allowed, check_storage_root, run_flow, started_remotely
from recast.tasks import storage
from recast.tasks.errors import BadInput
from recast.tasks.schemas.requests import BatchRequest, EditRequest
from recast.tasks.settings import get_settings


CLAIM_STALE_S = 6 * 3600  # longer than any batch photo's edits take


@dataclass
class ClaimedPhoto:
    uri: str
    key: str
    marker: str
    claim: str


def batch_key(image: bytes, request: BatchRequest) -> str:
    settings = request.model_dump(exclude={"source_prefix", "storage_root", "max_photos"})
    return hashlib.sha256(image + json.dumps(settings, sort_keys=True).encode()).hexdigest()


@flow(name="recast-batch", log_prints=True)
def batch_flow(request: BatchRequest) -> dict:
    """Edit the photos under request.source_prefix that were not edited with these settings before."""
    logger = get_run_logger()
    settings = get_settings()
    remote = started_remotely()
    root = check_storage_root(request.storage_root, settings, remote)
    if remote:
        check_inputs_allowed([request.source_prefix], settings.input_roots, field="source_prefix")
    photos, skipped, refused = [], [], []
    # A remote run reads a photo only if it lies under the roots as opened (a link to elsewhere is refused before
    # a byte of it is read), and never more than a photo may have.
    read_roots = settings.input_roots if remote else None
    for uri in storage.list_images(request.source_prefix):
        if len(photos) >= request.max_photos:
            break
        try:
            data = storage.read_capped("source_prefix", uri, storage.MAX_IMAGE_BYTES, read_roots, what="a photo")
        except BadInput as exc:
            logger.warning("batch: not editing %s: %s", storage.redact(uri), exc.problem)
            refused.append({"source": storage.redact(uri), "error": exc.problem})
            continue
        key = batch_key(data, request)
        photo = ClaimedPhoto(uri, key, storage.join(root, "batch", f"{key}.json"),
                             storage.join(root, "batch", f"{key}.claim"))
        if storage.exists(photo.marker) or not storage.claim(photo.claim, {"source": storage.redact(uri)},
                                                             CLAIM_STALE_S):
            skipped.append(storage.redact(uri))  # done before, or being edited right now by an overlapping run
            continue
        photos.append(photo)
    in_flight = settings.batch_in_flight if settings.execution == "workers" else 1
    logger.info("batch: %d new photo(s), %d at once", len(photos), min(in_flight, max(len(photos), 1)))
    # In the order the photos were found, whatever order they finished in.
    outcomes = [outcome for _, outcome in sorted(run_many(lambda photo: _edit_photo(photo, request, root), photos,
                                                          in_flight), key=lambda pair: pair[0])]
    done = [outcome for outcome in outcomes if "manifest" in outcome]
    failed = [outcome for outcome in outcomes if "error" in outcome]
    logger.info("batch: %d edited, %d already done, %d failed, %d refused", len(done), len(skipped), len(failed),
                len(refused))
    return {"edited": done, "skipped": skipped, "failed": failed, "refused": refused}


def _edit_photo(photo: ClaimedPhoto, request: BatchRequest, root: str) -> dict:
    """One photo's edit subflow; its marker when it succeeded, its error when not. Never raises: one bad photo must
    not stop the batch."""
    source = storage.redact(photo.uri)
    try:
        state = run_flow(edit_flow, EditRequest(images=[photo.uri], prompts=request.prompts, seeds=request.seeds,
                                                steps=request.steps, true_cfg_scale=request.true_cfg_scale,
                                                profile=request.profile, storage_root=root), return_state=True)
        manifest = state.result(raise_on_failure=False, _sync=True)
        if not state.is_completed():
            raise RuntimeError(state.message)
    except Exception as exc:  # noqa: BLE001 - reported in the batch's result, and the photo is tried next time
        get_run_logger().error("%s failed: %s", source, exc)
        storage.release(photo.claim)
        return {"source": source, "error": str(exc)}
    manifest_uri = storage.join(manifest["folder"], "manifest.json")
    storage.write_json(photo.marker, {"source": source, "key": photo.key, "manifest": manifest_uri})
    storage.release(photo.claim)
    return {"source": source, "manifest": manifest_uri}
