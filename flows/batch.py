"""The batch flow (scheduled): edit every new photo under a storage prefix with a set of prompts.

Idempotent: each photo is keyed by the SHA-256 of its bytes and of the settings it is edited with; a key that
already has a marker under <storage_root>/batch/ is skipped, so a schedule can run as often as it likes. Before a
photo is edited it is claimed (<key>.claim, created atomically), so two overlapping runs never edit the same
photo; a failed edit releases its claim for the next run, a claim whose run died expires after
CLAIM_STALE_S. The deployment also runs one batch at a time (deployments/prefect.yaml).
"""

from __future__ import annotations

import hashlib
import json

from prefect import flow, get_run_logger

from recast.flows.edit import edit_flow  # the batch flow is built on it (one subflow per photo)
from recast.flows.runs import check_inputs_allowed, check_storage_root, started_remotely
from recast.tasks import storage
from recast.tasks.schemas.requests import BatchRequest, EditRequest
from recast.tasks.settings import get_settings


CLAIM_STALE_S = 6 * 3600  # longer than any batch photo's edits take


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
    done, skipped, failed = [], [], []
    for uri in storage.list_images(request.source_prefix):
        if len(done) >= request.max_photos:
            break
        key = batch_key(storage.read_bytes(uri), request)
        marker = storage.join(root, "batch", f"{key}.json")
        claim = storage.join(root, "batch", f"{key}.claim")
        if storage.exists(marker) or not storage.claim(claim, {"source": storage.redact(uri)}, CLAIM_STALE_S):
            skipped.append(uri)  # done before, or being edited right now by an overlapping run
            continue
        try:
            state = edit_flow(EditRequest(images=[uri], prompts=request.prompts, seeds=request.seeds,
                                          steps=request.steps, true_cfg_scale=request.true_cfg_scale,
                                          profile=request.profile, storage_root=root), return_state=True)
            manifest = state.result(raise_on_failure=False)
            if not state.is_completed():
                raise RuntimeError(state.message)
        except Exception as exc:  # noqa: BLE001 - one bad photo must not stop the batch
            logger.error("%s failed: %s", storage.redact(uri), exc)
            failed.append({"source": storage.redact(uri), "error": str(exc)})
            storage.release(claim)  # the next run tries it again
            continue
        manifest_uri = storage.join(manifest["folder"], "manifest.json")
        storage.write_json(marker, {"source": storage.redact(uri), "key": key, "manifest": manifest_uri})
        storage.release(claim)
        done.append({"source": storage.redact(uri), "manifest": manifest_uri})
    logger.info("batch: %d edited, %d already done, %d failed", len(done), len(skipped), len(failed))
    return {"edited": done, "skipped": [storage.redact(u) for u in skipped], "failed": failed}
