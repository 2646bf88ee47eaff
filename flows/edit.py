"""The edit flow: request -> verified inputs -> every (prompt, seed) edit -> handoff -> video -> manifest.

    1. Plan: settings, profiles, inputs verified, seeds drawn, storage checked (nothing written yet)
    2. Copy the inputs into the run folder, with the plan (plan.json), from which a crashed run is resumed
    3. Run every (prompt, seed) edit: fanned out to task workers, or in turn in this process; an edit below
       min_identity is tried again with a new seed; every attempt is recorded (.jobs/), a failure is not fatal
    4. Handoff: the best identity among the edits that met the target (any edit, without a target)
    5. Video stage: the animate flow inline (its clip in this run's folder), a deployment run, or none
    6. Manifest, last: its presence means the run is complete
    7. The Prefect UI: results table and summary

The product's main story, kept in one file to read top to bottom (its helpers are the steps above).
"""

from __future__ import annotations

import posixpath
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prefect import flow, get_run_logger
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.states import Completed, Failed
from pydantic import ValidationError

from recast.flows.execution import Outcome, run_chains
from recast.flows.runs import (blocking, check_inputs_allowed, check_storage_root, first_set, flow_run_info,
                               new_run_id, now, one_client, run_flow, slug, started_remotely, take_plan, theme,
                               timestamp, versions)
from recast.tasks import identity, storage
from recast.tasks import prompts as prompt_checks
from recast.tasks.edit import edit_task_for
from recast.tasks.errors import BadInput, first_error
from recast.tasks.frames import output_size
from recast.tasks.models import loading
from recast.tasks.models.lora import check_lora_file
from recast.tasks.schemas.fields import MAX_SEED
from recast.tasks.schemas.jobs import EditJob, EditResult, ResolvedLora
from recast.tasks.schemas.manifests import (Cost, EditRecord, Handoff, IdentityRecord, IdentityTarget, Manifest,
                                            ModelInfo, PipelineInfo, SavedPlan)
from recast.tasks.schemas.requests import AnimateRequest, EditRequest
from recast.tasks.schemas.settings import ModelProfile, Settings, VideoProfile
from recast.tasks.settings import get_settings
from recast.tasks.sheets import contact_sheet

# Called with (edits done, edits total) as the run advances; the CLI hangs its progress bar here.
ProgressListener = Callable[[int, int], None]
progress_listeners: list[ProgressListener] = []


@dataclass
class RunPlan:
    run_id: str
    created_at: str
    request: EditRequest
    settings: Settings
    profile: ModelProfile
    video_profile: VideoProfile | None
    layout: storage.RunLayout
    images: list[storage.InputImage]
    seeds: list[int]
    prompts: list[str]
    prompt_warnings: dict[str, list[str]]
    loras: list[ResolvedLora]
    notices: list[str] = field(default_factory=list)  # what the user should know before it runs (no worker yet)

    def jobs(self, input_uris: list[str]) -> list[EditJob]:
        req, defaults = self.request, self.settings.edit
        reference = self.images[0]
        width, height = output_size(req.width, req.height, reference.width / reference.height,
                                    self.profile.output_area)
        jobs = []
        for p_index, prompt in enumerate(self.prompts, start=1):
            for seed in self.seeds:
                edit_id = f"{p_index:02d}-{slug(prompt)}-s{seed}"
                jobs.append(EditJob(
                    loras=self.loras, edit_id=edit_id, profile=self.profile.name, inputs=input_uris, prompt=prompt,
                    negative_prompt=req.negative_prompt if req.negative_prompt is not None else defaults.negative_prompt,
                    seed=seed, steps=first_set(req.steps, self.profile.steps, defaults.steps),
                    true_cfg_scale=first_set(req.true_cfg_scale, self.profile.true_cfg_scale, defaults.true_cfg_scale),
                    width=width, height=height, output=self.layout.edit_uri(edit_id),
                    control=self.layout.control_uri(edit_id)))
        return jobs


def plan_run(request: EditRequest, settings: Settings | None = None, resume: SavedPlan | None = None) -> RunPlan:
    """Everything that can be refused is refused here, before anything is written. `resume`: a crashed run's
    plan.json (load_resume), whose run id, seeds and inputs are kept."""
    settings = settings or get_settings()
    profile = settings.get_profile(request.profile)
    mode = settings.handoff.mode
    video = settings.get_video_profile(request.video_profile) if mode != "none" or request.video_profile else None
    remote = started_remotely()
    root = check_storage_root(request.storage_root, settings, remote)
    prompts = list(request.prompts)
    if request.template:
        prompts.append(prompt_checks.fill(request.template, prompt_checks.parse_assignments(request.template_fields)))
    elif request.template_fields:
        raise BadInput("--set", request.template_fields[0], "--set fills a template", "add --template NAME")
    if not prompts:
        raise BadInput("--prompt", [], "no prompt given", "give a non-empty --prompt, or --template NAME")
    warnings = {prompt: prompt_checks.check(prompt, request.identity_notes) for prompt in prompts}
    if request.strict:
        for prompt, found in warnings.items():
            if found:
                raise BadInput("--prompt", prompt, f"prompt check: {found[0]}", "reword it, or run without --strict")
    images_in = resume.inputs if resume else request.images
    # Runs from the UI, the API or a schedule read only under the roots: checked by name first (a clear error
    # before any I/O), then on each file as it is opened (a link swapped in meanwhile leads nowhere).
    read_roots = settings.input_roots if remote else None
    if remote:
        check_inputs_allowed(images_in, settings.input_roots)
        for index, lora in enumerate(request.loras):
            check_inputs_allowed([lora.source], settings.input_roots, field=f"loras[{index}].source")
    images = [storage.read_image(f"images[{i}]", uri, settings.max_input_pixels, roots=read_roots)
              for i, uri in enumerate(images_in)]
    loras = [check_lora_file(f"loras[{i}].source", lora, roots=read_roots) for i, lora in enumerate(request.loras)]
    # Fails in seconds when a model cannot be had here (no GPU, not cached and no hub). With task workers the
    # models live on the workers' machines, not here.
    if settings.execution == "local":
        loading.check_available(profile, build=False)
        if mode == "inline":
            loading.check_available(video, build=False)
    notices = []
    if settings.execution == "workers":  # refused now if the workers could never read this run's jobs
        from recast.flows import fleet

        notices = [note for note in (fleet.check_served("edit", profile.name),
                                     fleet.check_served("video", video.name) if mode == "inline" else None) if note]
    seeds = resume.seeds if resume else (list(dict.fromkeys(request.seeds)) if request.seeds
                                            else [secrets.randbelow(MAX_SEED + 1)])
    moment = now()
    run_id = resume.run_id if resume else new_run_id(moment)
    storage.check_writable("storage", root)  # last: it creates the root folder, as the run would
    return RunPlan(run_id=run_id, created_at=resume.created_at if resume else timestamp(moment), request=request,
                   settings=settings, profile=profile, video_profile=video, layout=storage.RunLayout(root, run_id),
                   images=images, seeds=seeds, prompts=prompts,
                   prompt_warnings={p: w for p, w in warnings.items() if w}, loras=loras, notices=notices)


def load_resume(run: str, storage_root: str | None = None) -> tuple[EditRequest, SavedPlan]:
    """The request and plan of a run to resume; the request's storage root is the run's.

    `run` is a run id under the storage root; the CLI may also name a run folder (<root>/runs/<run id>). Runs from
    the UI, the API or a schedule take a run id only, under a configured storage root. What is read is untrusted
    (anyone who can write under a root can craft a plan.json): the run id must be one, the plan's own run id must
    be its folder's, the file is read capped and, for remote runs, only as opened under the root."""
    settings = get_settings()
    remote = started_remotely()
    field = "resume" if remote else "RUN"
    if "/" in run:
        if remote:
            raise BadInput(field, run, "a run started from the UI, the API or a schedule resumes a run by its id",
                           "pass the run id (the run folder's name under runs/)")
        parent, run_id = posixpath.split(storage.check_scheme(field, run).rstrip("/"))
        root, runs = posixpath.split(parent)
        if runs != "runs":
            raise BadInput(field, run, "not a run folder (<storage root>/runs/<run id>)",
                           "pass the run folder, or its run id with --storage")
    else:
        run_id, root = run, check_storage_root(storage_root, settings, remote)
    layout = storage.RunLayout(root, storage.check_run_id(field, run_id))
    if not storage.exists(layout.plan_uri):
        raise BadInput(field, run, "no plan.json there: not an edit run, or it crashed before its inputs were written",
                       "pass a run id under the storage root (see runs/), or the run folder")
    if storage.exists(layout.manifest_uri):
        raise BadInput(field, run, "the run is complete (it has a manifest.json)", "start a new run instead")
    data = storage.read_json_capped("plan.json", layout.plan_uri, roots=[root] if remote else None)
    try:
        saved = SavedPlan.model_validate(data)
        request = EditRequest.model_validate(saved.request)
    except ValidationError as exc:
        where, value, message, _ = first_error(exc)
        raise BadInput(f"plan.json {where}", value, message, "this plan.json was not written by recast; start a "
                       "new run") from None
    if saved.run_id != run_id:
        raise BadInput("plan.json run_id", saved.run_id, f"is not its folder's run id ({run_id})",
                       "this plan.json was not written by recast; start a new run")
    return request.model_copy(update={"storage_root": root}), saved


def handoff_size(width: int, height: int, area: int) -> tuple[int, int]:
    """The video frame size: the edited frame's aspect ratio at `area` pixels, multiples of 16."""
    return output_size(None, None, width / height, area)


def _report_progress(progress_id, done: int, total: int) -> None:
    for listener in progress_listeners:
        listener(done, total)
    if progress_id is not None:
        try:
            update_progress_artifact(progress_id, progress=100.0 * done / total, _sync=True)
        except Exception as exc:  # noqa: BLE001 - the UI's progress bar must never stop the run (server restarting)
            get_run_logger().warning("could not update the progress artifact: %s", exc)


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    request = flow_run.parameters.get("request")
    prompts = request.prompts if isinstance(request, EditRequest) else (request or {}).get("prompts", [])
    first = slug(prompts[0], 24) if prompts else "edit"
    return f"edit-{first}" + (f"-and-{len(prompts) - 1}-more" if len(prompts) > 1 else "")


@flow(name="recast-edit", flow_run_name=_flow_run_name, log_prints=True)
async def edit_flow(request: EditRequest, resume: str | None = None):
    """Edit a person's photo with every prompt and seed of the request; returns the manifest.

    `resume`: the run id of a run whose process died; it goes on in the same folder and redoes nothing done."""
    # Async, so the run ends when its work does (recast.flows.runs.blocking says why); the body blocks, in a thread.
    return await blocking(_edit_run, request, resume)


def _edit_run(request: EditRequest, resume: str | None):
    logger = get_run_logger()

    # 1. Plan (validates everything; nothing is written if it raises). The CLI may have planned it already.
    saved = load_resume(resume, request.storage_root)[1] if resume else None
    planned_by_cli = take_plan("edit", request)
    plan = planned_by_cli or plan_run(request, resume=saved)
    profile, layout = plan.profile, plan.layout
    logger.info("run %s: %d prompt(s) x %d seed(s) on profile %s -> %s%s", plan.run_id, len(plan.prompts),
                len(plan.seeds), profile.name, storage.redact(layout.folder), " (resumed)" if saved else "")
    if not planned_by_cli:  # the CLI printed them already
        for notice in plan.notices:
            logger.warning(notice)  # in the run's log in the UI

    # 2. Inputs and the plan
    input_uris = saved.inputs if saved else [
        storage.write_bytes(layout.input_uri(index, image.uri, image.format), image.data)
        for index, image in enumerate(plan.images)]
    if not saved:
        storage.write_json(layout.plan_uri, SavedPlan(run_id=plan.run_id, created_at=plan.created_at,
                                                      request=request.model_dump(), seeds=plan.seeds,
                                                      inputs=input_uris).model_dump())

    # 3. Edits, fanned out; each chain of attempts kept with its job, in request order
    jobs = plan.jobs(input_uris)
    # _sync: the flow is async (recast.flows.runs.blocking), its body is not; Prefect would hand back coroutines.
    progress_id = create_progress_artifact(progress=0.0, description=f"recast run {plan.run_id}: edits done",
                                           _sync=True)
    chains: list[list[EditRecord]] = [[] for _ in jobs]
    attempts = [_edit_chain(job, plan) for job in jobs]
    for done, (index, chain) in enumerate(run_chains(edit_task_for(profile.name), attempts, stage="edit"), start=1):
        chains[index] = chain
        _report_progress(progress_id, done, len(jobs))
    records = [record for chain in chains for record in chain]

    # 4. Handoff: the best identity among the edits that met the target
    target = _identity_target(plan, chains)
    eligible = [r for r in records if r.status == "succeeded" and (target is None or target.met_by(r)
                                                                    or request.handoff_below_target)]
    handoff_uri = None
    if eligible:
        chosen = max(eligible, key=lambda r: r.identity.score if r.identity.score is not None else -1.0)
        width, height = handoff_size(chosen.width, chosen.height, profile.handoff_area)
        handoff = Handoff(run_id=plan.run_id, frame=chosen.output, edit_id=chosen.edit_id,
                          motion_prompt=request.motion_prompt or plan.settings.handoff.motion_prompt,
                          width=width, height=height, num_frames=plan.settings.handoff.num_frames,
                          fps=plan.settings.handoff.fps, seed=chosen.seed, manifest=layout.manifest_uri,
                          reference=input_uris[0])
        handoff_uri = storage.write_json(layout.handoff_uri, handoff.model_dump())
    elif target is not None and any(r.status == "succeeded" for r in records):
        logger.warning("no edit reached identity %s: nothing is handed to video (handoff_below_target hands the "
                       "best anyway)", target.grade)

    # 5. Video stage; the contact sheet (the edits only) is made meanwhile, off the chain's critical path
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="recast-overlap-sheet") as pool:
        sheet = pool.submit(_write_contact_sheet, plan, records) if any(r.output for r in records) else None
        animation = hand_over(handoff_uri, plan) if handoff_uri else None
        sheet_uri = sheet.result() if sheet is not None else None

    # 6. Manifest (last), after the contact sheet it points to
    manifest = _manifest(plan, records, handoff_uri, target, resumed=saved is not None)
    manifest.animation = animation
    manifest.contact_sheet = sheet_uri
    storage.write_json(layout.manifest_uri, storage.redact_all(manifest.model_dump()))
    storage.remove_tree(storage.join(layout.folder, ".jobs"))  # heartbeats and records: the manifest holds it all

    # 7. UI
    with one_client():
        _publish(manifest, layout.manifest_uri, plan.settings)
    dump = storage.redact_all(manifest.model_dump())
    if manifest.status == "failed":
        reason = next((r.error for r in records if r.error), "no edit succeeded")
        return Failed(message=f"all {len(records)} edits failed: {reason}; see {storage.redact(layout.manifest_uri)}",
                      data=dump)
    if manifest.status == "identity_not_met":
        return Failed(message=f"no edit reached identity {target.grade} (best: {target.best_grade}); see "
                      f"{storage.redact(layout.manifest_uri)}", data=dump)
    return Completed(message=f"{manifest.status}: {len(records)} edit attempts", data=dump)


def _write_contact_sheet(plan: RunPlan, records: list[EditRecord]) -> str:
    return storage.write_bytes(storage.join(plan.layout.folder, "contact_sheet.png"),
                               storage.png_bytes(contact_sheet(plan.images[0].data, records)))


def _edit_chain(job: EditJob, plan: RunPlan):
    """One (prompt, seed), as a chain for run_chains: yields each attempt's job until the identity target is met
    (a new seed each time) or attempts run out; returns the attempts' records. Attempts already recorded (a resumed
    run) are read back, not redone."""
    request, layout = plan.request, plan.layout
    attempts = request.max_attempts if request.min_identity else 1
    chain: list[EditRecord] = []
    base = job.edit_id.rsplit("-s", 1)[0]
    for attempt in range(1, attempts + 1):
        record = _recorded(layout, job.edit_id)
        if record is None:
            outcome: Outcome = yield job
            result = outcome.result if isinstance(outcome.result, EditResult) else None
            record = _record(job, result, outcome.message, plan, attempt, outcome.submissions)
            storage.write_json(layout.record_uri(job.edit_id), record.model_dump())
        chain.append(record)
        if record.status == "failed" or request.min_identity is None or \
                identity.meets(record.identity.grade, request.min_identity):
            break
        if attempt < attempts:  # below the requested grade: same prompt, a new seed (kept in the chain's record)
            seed = record.next_seed if record.next_seed is not None else secrets.randbelow(MAX_SEED + 1)
            if record.next_seed is None:
                record.next_seed = seed
                storage.write_json(layout.record_uri(job.edit_id), record.model_dump())
            edit_id = f"{base}-s{seed}"
            job = job.model_copy(update=dict(seed=seed, edit_id=edit_id, output=layout.edit_uri(edit_id),
                                             control=layout.control_uri(edit_id)))
    return chain


def _recorded(layout: storage.RunLayout, edit_id: str) -> EditRecord | None:
    """The attempt a crashed run recorded for this edit, if it is this edit's (a record naming another output, or
    one that does not parse, was not written by this run: the edit is done again)."""
    uri = layout.record_uri(edit_id)
    if not storage.exists(uri):
        return None
    try:
        record = EditRecord.model_validate(storage.read_json_capped("record", uri))
    except (BadInput, ValidationError):
        return None
    return record if record.edit_id == edit_id and record.output in (None, layout.edit_uri(edit_id)) else None


def _identity_target(plan: RunPlan, chains: list[list[EditRecord]]) -> IdentityTarget | None:
    wanted = plan.request.min_identity
    if wanted is None:
        return None
    missed = [chain[-1].edit_id for chain in chains if chain and chain[-1].status == "succeeded"
              and not identity.meets(chain[-1].identity.grade, wanted)]
    grades = [r.identity.grade for chain in chains for r in chain if r.status == "succeeded"]
    best = max(grades, key=lambda g: identity.GRADE_ORDER.index(g) if g in identity.GRADE_ORDER else -1,
               default=None)
    return IdentityTarget(grade=wanted, met=not missed and bool(grades), missed=missed, best_grade=best)


def hand_over(handoff_uri: str, plan: RunPlan) -> dict | None:
    """Run the video stage for the chosen frame as settings.handoff.mode says; record, never raise."""
    mode = plan.settings.handoff.mode
    if mode == "none":
        return None
    # The clip lands in this run's folder (clips/), with the edit's seed: the same edit gives the same clip.
    request = AnimateRequest(handoff=handoff_uri, storage_root=plan.layout.root,
                             video_profile=plan.request.video_profile, into_edit_run=True)
    logger = get_run_logger()
    try:
        if mode == "inline":
            from recast.flows.animate import animate_flow  # the edit flow is built on it (a subflow)

            state = run_flow(animate_flow, request, return_state=True)
            manifest = state.result(raise_on_failure=False, _sync=True)
            if not isinstance(manifest, dict):
                return {"mode": mode, "status": "failed", "error": state.message}
            return {"mode": mode, "status": manifest["status"], "run_id": manifest["run_id"],
                    "manifest": manifest["manifest"],
                    "clips": [{k: c[k] for k in ("clip_id", "output", "last_frame", "num_frames", "fps", "width",
                                                 "height", "seconds", "error", "identity", "identity_strip",
                                                 "timeline")}
                              for c in manifest["clips"]]}
        from prefect.deployments import run_deployment

        # The video model lives on its own GPU pool; this flow waits for it as a subflow.
        run = run_deployment(plan.settings.handoff.deployment, parameters={"request": request.model_dump()},
                             as_subflow=True, timeout=plan.settings.handoff.timeout_s, _sync=True)
        return {"mode": mode, "deployment": plan.settings.handoff.deployment, "flow_run_id": str(run.id),
                "status": run.state.type.value.lower() if run.state else "unknown"}
    except Exception as exc:  # noqa: BLE001 - the edits are done; a video failure is recorded, not fatal
        logger.error("video stage (%s) failed: %s", mode, exc)
        return {"mode": mode, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}


def _record(job: EditJob, result: EditResult | None, message: str | None, plan: RunPlan, attempt: int,
            submissions: list[dict]) -> EditRecord:
    scored = dict(result.identity or {}) if result else {}
    scorer_notes = scored.pop("notes", "")
    return EditRecord(
        attempt=attempt, prompt_warnings=plan.prompt_warnings.get(job.prompt, []), submissions=submissions,
        loras=[lora.model_copy(update=dict(source=storage.redact(lora.source))) for lora in job.loras],
        edit_id=job.edit_id, status="succeeded" if result else "failed", prompt=job.prompt,
        negative_prompt=job.negative_prompt, seed=job.seed, steps=job.steps, true_cfg_scale=job.true_cfg_scale,
        inputs=[storage.redact(u) for u in job.inputs], output=result.output if result else None,
        width=result.width if result else job.width, height=result.height if result else job.height,
        seconds=result.seconds if result else None, cache_hit=result.cache_hit if result else None,
        cold_start_s=result.cold_start_s if result else None, prepared=result.prepared if result else None,
        compile_cache=result.compile_cache if result else None, device=result.device if result else None,
        timeline=result.timeline if result else None, error=None if result else (message or "failed"),
        identity=IdentityRecord(notes=plan.request.identity_notes, scorer_notes=scorer_notes, **scored))


def _manifest(plan: RunPlan, records: list[EditRecord], handoff: str | None, target: IdentityTarget | None,
              resumed: bool) -> Manifest:
    profile, settings = plan.profile, plan.settings
    done = [r for r in records if r.status == "succeeded"]
    first = done[0] if done else None
    # This run paid the cold start only if its first edit loaded the pipeline.
    cold_start_paid = first.cold_start_s if first and not first.cache_hit else 0.0
    gpu_seconds = sum(r.seconds for r in done) + (cold_start_paid or 0.0)
    if not done:
        status = "failed"
    elif target is not None and not target.met:
        status = "identity_not_met"
    else:
        chains_failed = any(r.status == "failed" for r in records)
        status = "partial" if chains_failed else "succeeded"
    request = plan.request.model_dump()
    request["seeds"] = plan.seeds
    return Manifest(
        run_id=plan.run_id, folder=plan.layout.folder, created_at=plan.created_at, finished_at=timestamp(),
        status=status, request=request, model=ModelInfo.of(profile), versions=versions(),
        # Where the edits ran: the worker says (this process may be a CLI on a laptop that never imports torch).
        device=first.device if first is not None and first.device else profile.device,
        pipeline=PipelineInfo.of(first),
        edits=records, cost=Cost.of(gpu_seconds, profile, settings), identity_target=target, resumed=resumed,
        handoff=handoff, identity_notes=plan.request.identity_notes, prefect=flow_run_info(),
    )


def _publish(manifest: Manifest, manifest_uri: str, settings: Settings) -> None:
    def shown(uri: str | None) -> str:
        """An output as the UI shows it: its gallery address when there is a gallery, else its (redacted) URI."""
        if not uri:
            return ""
        relative = uri[len(manifest.folder.rstrip("/")) + 1:] if uri.startswith(manifest.folder) else None
        return (relative and settings.gallery_link(manifest.folder, relative)) or storage.redact(uri)

    rows = [{"prompt theme": theme(e.prompt), "attempt": e.attempt, "identity": e.identity.grade,
             "score": e.identity.score, "seed": e.seed, "seconds": e.seconds, "status": e.status,
             "output": shown(e.output)} for e in manifest.edits]
    for clip in (manifest.animation or {}).get("clips", []):  # the clip's identity beside the edits'
        identity = clip.get("identity") or {}
        rows.append({"prompt theme": f"clip {clip['clip_id']}", "attempt": 1, "identity": identity.get("grade"),
                     "score": min((f["score"] for f in identity.get("frames", []) if f.get("score") is not None),
                                  default=None), "seed": None, "seconds": clip.get("seconds"),
                     "status": "succeeded" if clip.get("output") else "failed",
                     "output": shown(clip.get("output"))})
    create_table_artifact(table=rows, key="recast-edit-results", description=f"recast run {manifest.run_id}",
                          _sync=True)
    ok = sum(e.status == "succeeded" for e in manifest.edits)
    model = manifest.model
    revision = f"@ `{model.revision}`" if model.revision else "(built locally, no revision)" \
        if model.id.startswith("tiny") else "(unpinned)"
    lines = [
        f"# recast run `{manifest.run_id}`: {manifest.status}",
        f"- model: `{model.id}` {revision} ({model.profile}, {model.dtype}) on {manifest.device}",
        f"- edits: {ok}/{len(manifest.edits)} succeeded; cold start {manifest.pipeline.cold_start_s} s, "
        f"cache hit {manifest.pipeline.cache_hit}, prepared weights {manifest.pipeline.prepared}",
        f"- cost: {manifest.cost.gpu_seconds} GPU-s = ${manifest.cost.usd}",
        *([f"- gallery: [{manifest.run_id}]({page})"] if (page := settings.gallery_link(manifest.folder)) else []),
        f"- manifest: `{storage.redact(manifest_uri)}`",
        f"- handoff: `{storage.redact(manifest.handoff or 'none')}`",
    ]
    if settings.signed_thumbnails_s:  # pictures in object storage, seen in the UI without credentials
        signed = [(e, storage.signed_url(e.output, settings.signed_thumbnails_s)) for e in manifest.edits if e.output]
        lines += [f"![{theme(e.prompt)} s{e.seed}]({url})" for e, url in signed if url]
    if manifest.identity_target is not None:
        target = manifest.identity_target
        lines.append(f"- identity target {target.grade}: {'met' if target.met else 'NOT met'} "
                     f"(best {target.best_grade})")
    create_markdown_artifact(key="recast-edit-summary", markdown="\n".join(lines), _sync=True)
