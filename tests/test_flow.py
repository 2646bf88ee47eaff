"""The edit flow under a real (temporary) Prefect API: manifest, handoff, cache across runs, failures."""

from __future__ import annotations

import json

import pytest

from recast.flows.cli import main
from recast.flows.edit import edit_flow
from recast.flows.runs import run_flow
from recast.tasks import storage
from recast.tasks.models import loading, qwen_edit
from recast.tasks.schemas.requests import EditRequest

pytestmark = pytest.mark.usefixtures("prefect_server")

MANIFEST_KEYS = {"run_id", "created_at", "status", "request", "model", "versions", "device", "pipeline", "edits",
                 "cost", "handoff"}
EDIT_KEYS = {"edit_id", "status", "prompt", "negative_prompt", "seed", "steps", "true_cfg_scale", "inputs",
             "output", "width", "height", "seconds", "identity"}


def _request(images, root, **kw) -> EditRequest:
    return EditRequest(images=[str(i) for i in images], storage_root=root, **kw)


def test_two_runs_load_the_pipeline_once_and_write_complete_manifests(astronaut, memory_root):
    loading.clear_cache()
    first = run_flow(edit_flow, _request([astronaut], memory_root, prompts=["James Bond 007, tuxedo", "Neo, leather coat"],
                               seeds=[1, 2], identity_notes="short dark hair"))
    second = run_flow(edit_flow, _request([astronaut], memory_root, prompts=["Top Gun flight suit"], seeds=[5]))

    assert first["pipeline"]["cache_hit"] is False, "the first run in a fresh process must load the pipeline"
    assert second["pipeline"]["cache_hit"] is True, "the second run must reuse the loaded pipeline"
    assert second["pipeline"]["cold_start_s"] == first["pipeline"]["cold_start_s"]
    assert [e["cache_hit"] for e in first["edits"]] == [False, True, True, True]
    assert [p.key.kind for p in loading.cached_pipelines()].count("edit") == 1, "one edit pipeline per process"

    # every (prompt, seed) pair ran, in order
    assert [(e["prompt"], e["seed"]) for e in first["edits"]] == [
        ("James Bond 007, tuxedo", 1), ("James Bond 007, tuxedo", 2), ("Neo, leather coat", 1),
        ("Neo, leather coat", 2)]

    manifest = storage.read_json(storage.join(first["folder"], "manifest.json"))
    assert MANIFEST_KEYS <= manifest.keys(), MANIFEST_KEYS - manifest.keys()
    assert manifest["status"] == "succeeded"
    assert manifest["model"] == {"id": "tiny", "revision": None, "profile": "tiny", "dtype": "float32"}
    assert set(manifest["versions"]) == {"recast", "diffusers", "transformers", "torch", "prefect"}
    assert manifest["versions"]["diffusers"] == "0.42.1"
    assert manifest["cost"]["gpu_seconds"] > 0 and "usd" in manifest["cost"]
    for edit in manifest["edits"]:
        assert EDIT_KEYS <= edit.keys(), EDIT_KEYS - edit.keys()
        assert edit["identity"]["notes"] == "short dark hair", "identity notes must be logged per edit"
        assert (edit["steps"], edit["true_cfg_scale"], edit["negative_prompt"]) == (8, 4.0, " "), "config defaults"
        assert storage.exists(edit["output"]), f"missing edit PNG {edit['output']}"
        assert edit["inputs"][0].startswith(first["folder"] + "/inputs/"), "inputs must be copied into the run"
    files = storage.list_files(first["folder"])
    assert files == sorted(["contact_sheet.png", "handoff.json", "inputs/0-astronaut.png", "manifest.json", "plan.json",
                            "clips/clip-01.mp4", "clips/clip-01_last.png", "clips/clip-01_identity.png",
                            "video_manifest.json"]
                           + [f"edits/{e['edit_id']}.png" for e in manifest["edits"]]), \
        "the run folder holds its inputs, plan, edits, handoff, its clip with its last frame and identity drift strip (inline video stage) and manifests, no more"


def test_handoff_is_the_contract_for_the_video_stage(second_photo, memory_root):
    manifest = run_flow(edit_flow, _request([second_photo], memory_root, prompts=["Indiana Jones, fedora"], seeds=[11],
                                  motion_prompt="he tips his hat"))
    handoff = storage.read_json(manifest["handoff"])
    edit = manifest["edits"][0]
    assert handoff["frame"] == edit["output"] and storage.exists(handoff["frame"])
    assert handoff["manifest"] == storage.join(manifest["folder"], "manifest.json")
    assert handoff["motion_prompt"] == "he tips his hat"
    assert (handoff["num_frames"], handoff["fps"], handoff["seed"]) == (81, 16, 11)
    assert (handoff["num_frames"] - 1) % 4 == 0
    assert handoff["width"] % 16 == 0 and handoff["height"] % 16 == 0
    # portrait frame -> portrait video at the profile's handoff area
    assert edit["height"] > edit["width"] and handoff["height"] > handoff["width"]
    assert abs(handoff["width"] * handoff["height"] - 6144) / 6144 < 0.2


def test_unset_seed_is_drawn_and_recorded(astronaut, memory_root):
    manifest = run_flow(edit_flow, _request([astronaut], memory_root, prompts=["Peaky Blinders flat cap"]))
    seed = manifest["edits"][0]["seed"]
    assert 0 <= seed <= 2**32 - 1 and manifest["request"]["seeds"] == [seed]


def test_a_failing_edit_is_recorded_and_the_others_land(astronaut, memory_root, monkeypatch):
    real_run_edit = qwen_edit.run_edit

    def fail_on_seed_13(loaded, profile, images, **kw):
        if kw["seed"] == 13:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_run_edit(loaded, profile, images, **kw)

    monkeypatch.setattr(qwen_edit, "run_edit", fail_on_seed_13)
    manifest = run_flow(edit_flow, _request([astronaut], memory_root, prompts=["John Wick, neon"], seeds=[12, 13, 14]))
    statuses = {e["seed"]: e["status"] for e in manifest["edits"]}
    assert statuses == {12: "succeeded", 13: "failed", 14: "succeeded"}
    assert manifest["status"] == "partial"
    failed = next(e for e in manifest["edits"] if e["seed"] == 13)
    assert "illegal memory access" in failed["error"] and failed["output"] is None
    assert storage.read_json(manifest["handoff"])["seed"] == 12


def test_results_table_artifact_is_published(astronaut, memory_root):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    manifest = run_flow(edit_flow, _request([astronaut], memory_root, prompts=["Forrest Gump running"], seeds=[21]))
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["recast-edit-results"])))
    tables = [a for a in artifacts if a.type == "table" and str(a.flow_run_id) == manifest["prefect"]["flow_run_id"]]
    assert tables, "no results table artifact for the flow run"
    data = tables[0].data if isinstance(tables[0].data, list) else json.loads(tables[0].data)
    assert data[0]["prompt theme"] == "Forrest Gump running" and data[0]["seed"] == 21
    assert {"identity", "score", "seconds", "output"} <= data[0].keys(), data[0]


def test_cli_edit_prints_summary_and_manifest_uri_last(astronaut, tmp_path, capsys):
    root = tmp_path / "artifacts"
    code = main(["edit", "--image", str(astronaut), "--prompt", "James Bond 007", "--seed", "42", "--steps", "2",
                 "--storage", str(root), "--notes", "no glasses"])
    out, err = capsys.readouterr()
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("file://") and last.endswith("/manifest.json"), last
    manifest = json.loads((root / last.split(str(root), 1)[1].lstrip("/")).read_text())
    assert manifest["edits"][0]["steps"] == 2 and manifest["edits"][0]["seed"] == 42
    assert manifest["edits"][0]["identity"]["notes"] == "no glasses"

    code = main(["edit", str(astronaut), "--prompt", "James Bond 007", "--seed", "42", "--steps", "2",
                 "--storage", str(root), "--json"])
    out, _ = capsys.readouterr()
    assert code == 0
    as_json = json.loads(out)
    assert as_json["edits"][0]["seed"] == 42 and as_json["run_id"] != manifest["run_id"]
    same = (root / "runs" / as_json["run_id"] / "edits" / f"{as_json['edits'][0]['edit_id']}.png").read_bytes()
    first = (root / "runs" / manifest["run_id"] / "edits" / f"{manifest['edits'][0]['edit_id']}.png").read_bytes()
    assert same == first, "the same request and seed must reproduce the same PNG across runs"


def test_batch_edits_new_photos_once(astronaut, second_photo, memory_root, monkeypatch):
    from recast.flows.batch import batch_flow
    from recast.tasks.schemas.requests import BatchRequest

    monkeypatch.setenv("RECAST_HANDOFF__MODE", "none")
    incoming = storage.join(memory_root, "incoming")
    storage.write_bytes(storage.join(incoming, "a.png"), astronaut.read_bytes())
    request = BatchRequest(source_prefix=incoming, prompts=["Top Gun, flight suit, airfield, golden hour"],
                           seeds=[3], steps=2, storage_root=storage.join(memory_root, "out"))
    first = batch_flow(request)
    assert len(first["edited"]) == 1 and not first["skipped"]
    storage.write_bytes(storage.join(incoming, "b.jpg"), second_photo.read_bytes())
    second = batch_flow(request)
    assert [e["source"].rsplit("/", 1)[-1] for e in second["edited"]] == ["b.jpg"], "only the new photo is edited"
    assert [s.rsplit("/", 1)[-1] for s in second["skipped"]] == ["a.png"], "a done photo must be skipped"
    changed = batch_flow(request.model_copy(update={"seeds": [4]}))
    assert len(changed["edited"]) == 2, "other settings are other work: both photos are edited again"
    limited = request.model_copy(update={"seeds": [5], "max_photos": 1})
    first_half, second_half = batch_flow(limited), batch_flow(limited)
    assert [len(first_half["edited"]), len(second_half["edited"])] == [1, 1], "max_photos caps each run"
    assert first_half["edited"][0]["source"] != second_half["edited"][0]["source"], \
        "the next run takes the photo the capped run left"


def test_remote_runs_read_only_under_the_configured_roots(astronaut, memory_root, monkeypatch):
    from recast.flows import edit as edit_module
    from recast.tasks.errors import BadInput

    monkeypatch.setattr(edit_module, "started_remotely", lambda: True)
    monkeypatch.setenv("RECAST_STORAGE_ROOT", memory_root)
    inside = storage.join(memory_root, "uploads", "me.png")
    storage.write_bytes(inside, astronaut.read_bytes())
    assert edit_module.plan_run(EditRequest(images=[inside], prompts=["x"])).images[0].uri == inside
    for outside in (str(astronaut), "memory://elsewhere/me.png", f"{memory_root}/../escape.png"):
        with pytest.raises(BadInput, match="configured storage roots"):
            edit_module.plan_run(EditRequest(images=[outside], prompts=["x"]))
    with pytest.raises(BadInput, match="unsupported URI scheme"):
        edit_module.plan_run(EditRequest(images=["http://169.254.169.254/x.png"], prompts=["x"]))


def test_a_remote_request_cannot_add_its_own_root(astronaut, memory_root, tmp_path, monkeypatch):
    """A UI user naming the photo's own folder as storage_root must neither read the photo nor write there."""
    from recast.flows import edit as edit_module
    from recast.tasks.errors import BadInput

    monkeypatch.setattr(edit_module, "started_remotely", lambda: True)
    monkeypatch.setenv("RECAST_STORAGE_ROOT", memory_root)
    photo_folder = tmp_path / "private"
    photo_folder.mkdir()
    (photo_folder / "me.png").write_bytes(astronaut.read_bytes())
    with pytest.raises(BadInput, match="storage_root.*configured storage root"):
        edit_module.plan_run(EditRequest(images=[str(photo_folder / "me.png")], prompts=["x"],
                                         storage_root=str(photo_folder)))
    assert sorted(p.name for p in photo_folder.iterdir()) == ["me.png"], "nothing may be written there"


def test_a_link_under_a_root_that_points_outside_is_outside(astronaut, tmp_path, monkeypatch):
    from recast.flows import edit as edit_module
    from recast.tasks.errors import BadInput

    root, secret = tmp_path / "root", tmp_path / "secret"
    root.mkdir(), secret.mkdir()
    (secret / "me.png").write_bytes(astronaut.read_bytes())
    (root / "uploads").symlink_to(secret)
    monkeypatch.setattr(edit_module, "started_remotely", lambda: True)
    monkeypatch.setenv("RECAST_STORAGE_ROOT", str(root))
    with pytest.raises(BadInput, match="configured storage roots"):
        edit_module.plan_run(EditRequest(images=[str(root / "uploads" / "me.png")], prompts=["x"]))


def test_a_run_from_a_deployment_and_the_subflow_it_runs_are_remote_and_a_local_run_is_not():
    """Where a run may read and write (the configured roots) depends on who started it: a deployment (the UI, the
    API, a schedule) or a local user. A run created from a deployment knows it, and so does the video stage it runs
    inline as a subflow; a run the CLI starts knows it is local (without asking the server)."""
    import asyncio

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow as run_flow_run

    from recast.flows import runs

    seen = {}

    @flow(name="recast-test-stage")
    async def stage(label: str):
        await runs.blocking(lambda: seen.__setitem__(f"{label}: subflow", runs.started_remotely()))

    @flow(name="recast-test-run")
    async def started(label: str):
        def body():
            seen[label] = runs.started_remotely()
            run_flow(stage, label)

        await runs.blocking(body)

    run_flow(started, "local")

    async def from_deployment():
        async with get_client() as client:
            deployment = await client.create_deployment(flow_id=await client.create_flow(started),
                                                        name="started-remotely")
            return await client.create_flow_run_from_deployment(deployment, parameters={"label": "deployed"})

    # As a worker runs a deployment's flow run: the run created from the deployment, its flow run here
    flow_run = asyncio.run(from_deployment())
    asyncio.run(run_flow_run(started, flow_run=flow_run, parameters={"label": "deployed"}))
    assert seen == {"local": False, "local: subflow": False, "deployed": True, "deployed: subflow": True}, \
        f"who started each run, as the runs saw it: {seen}"
