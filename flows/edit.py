"""The edit flow: request -> verified inputs -> every (prompt, seed) edit -> handoff -> manifest.

    1. Plan: resolve settings and profile, verify every input photo, draw missing seeds (nothing written yet)
    2. Copy the inputs into the run folder
    3. Run every (prompt, seed) edit on the one loaded pipeline; a failed edit is recorded, not fatal
    4. Write the handoff for the image-to-video stage (the first successful edit is the chosen frame)
    5. Hand over to the video stage as configured: inline subflow, deployment run, or none
    6. Write the manifest, last: its presence means the run is complete
    7. Show the run in the Prefect UI: results table and summary
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from prefect import flow, get_run_logger
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)

from recast.flows.execution import run_task
from recast.flows.runs import (check_inputs_allowed, first_set, flow_run_info, new_run_id, now, slug,
                               started_remotely, take_plan, theme, timestamp, versions)
from recast.tasks import identity, storage
from recast.tasks import prompts as prompt_checks
from recast.tasks.edit import edit_task
from recast.tasks.errors import BadInput
from recast.tasks.frames import output_size
from recast.tasks.models import loading
from recast.tasks.models.lora import check_lora_file
from recast.tasks.schemas.fields import MAX_SEED
from recast.tasks.schemas.jobs import EditJob, EditResult, ResolvedLora
from recast.tasks.schemas.manifests import (Cost, EditRecord, Handoff, IdentityRecord, Manifest, ModelInfo,
                                            PipelineInfo)
from recast.tasks.schemas.requests import AnimateRequest, EditRequest
from recast.tasks.schemas.settings import ModelProfile, Settings
from recast.tasks.settings import get_settings

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
    layout: storage.RunLayout
    images: list[storage.InputImage]
    seeds: list[int]
    prompts: list[str]
    prompt_warnings: dict[str, list[str]]
    loras: list[ResolvedLora]

    def jobs(self, input_uris: list[str]) -> list[EditJob]:
        req, defaults = self.request, self.settings.edit
        reference = self.images[0]
        width, height = output_size(req.width, req.height, reference.width / reference.height,
                                    self.profile.output_area)
        jobs = []
        for p_index, prompt in enumerate(self.prompts, start=1):
            for seed in self.seeds:
                edit_id = f"{p_index:02d}-{slug(prompt)}-s{seed}"
                jobs.append(EditJob(loras=self.loras,
                    edit_id=edit_id, profile=self.profile.name, inputs=input_uris, prompt=prompt,
                    negative_prompt=req.negative_prompt if req.negative_prompt is not None else defaults.negative_prompt,
                    seed=seed, steps=first_set(req.steps, self.profile.steps, defaults.steps),
                    true_cfg_scale=first_set(req.true_cfg_scale, self.profile.true_cfg_scale, defaults.true_cfg_scale),
                    width=width, height=height, output=self.layout.edit_uri(edit_id)))
        return jobs


def plan_run(request: EditRequest, settings: Settings | None = None) -> RunPlan:
    """Everything that can be refused is refused here, before anything is written."""
    settings = settings or get_settings()
    profile = settings.get_profile(request.profile)
    root = storage.check_scheme("storage", request.storage_root or settings.storage_root)
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
    if started_remotely():
        check_inputs_allowed(request.images, [root, *settings.allowed_input_roots])
    images = [storage.read_image(f"images[{i}]", uri, settings.max_input_pixels)
              for i, uri in enumerate(request.images)]
    loras = [check_lora_file(f"loras[{i}].source", lora) for i, lora in enumerate(request.loras)]
    # Fails in seconds when the model cannot be had here (no GPU, not cached and no hub). With task workers the
    # model lives on the workers' machines, not here.
    if settings.execution == "local":
        loading.check_available(profile)
    seeds = list(dict.fromkeys(request.seeds)) if request.seeds else [secrets.randbelow(MAX_SEED + 1)]
    moment = now()
    run_id = new_run_id(moment)
    return RunPlan(run_id=run_id, created_at=timestamp(moment), request=request, settings=settings,
                   profile=profile, layout=storage.RunLayout(root, run_id), images=images, seeds=seeds,
                   prompts=prompts, prompt_warnings={p: w for p, w in warnings.items() if w}, loras=loras)


def handoff_size(width: int, height: int, area: int) -> tuple[int, int]:
    """The video frame size: the edited frame's aspect ratio at `area` pixels, multiples of 16."""
    return output_size(None, None, width / height, area)


def _report_progress(progress_id, done: int, total: int) -> None:
    for listener in progress_listeners:
        listener(done, total)
    if progress_id is not None:
        update_progress_artifact(progress_id, progress=100.0 * done / total)


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    request = flow_run.parameters.get("request")
    prompts = request.prompts if isinstance(request, EditRequest) else (request or {}).get("prompts", [])
    first = slug(prompts[0], 24) if prompts else "edit"
    return f"edit-{first}" + (f"-and-{len(prompts) - 1}-more" if len(prompts) > 1 else "")


@flow(name="recast-edit", flow_run_name=_flow_run_name, log_prints=True)
def edit_flow(request: EditRequest) -> dict:
    """Edit a person's photo with every prompt and seed of the request; returns the manifest."""
    logger = get_run_logger()

    # 1. Plan (validates everything; nothing is written if it raises). The CLI may have planned it already.
    plan = take_plan("edit", request) or plan_run(request)
    profile, layout = plan.profile, plan.layout
    logger.info("run %s: %d prompt(s) x %d seed(s) on profile %s -> %s", plan.run_id, len(request.prompts),
                len(plan.seeds), profile.name, storage.redact(layout.folder))

    # 2. Inputs
    input_uris = []
    for index, image in enumerate(plan.images):
        uri = layout.input_uri(index, image.uri, image.format)
        input_uris.append(storage.write_bytes(uri, image.data))

    # 3. Edits
    jobs = plan.jobs(input_uris)
    progress_id = create_progress_artifact(progress=0.0, description=f"recast run {plan.run_id}: edits done")
    records: list[EditRecord] = []
    results: list[EditResult] = []
    attempts = request.max_attempts if request.min_identity else 1
    for done, job in enumerate(jobs, start=1):
        for attempt in range(1, attempts + 1):
            result, message = run_task(edit_task, job)
            if not isinstance(result, EditResult):
                result = None
                logger.error("edit %s failed: %s", job.edit_id, message)
            else:
                results.append(result)
                logger.info("edit %s done in %.2fs (cache_hit=%s, identity %s)", job.edit_id, result.seconds,
                            result.cache_hit, (result.identity or {}).get("grade"))
            records.append(_record(job, result, message, plan, attempt))
            grade = (result.identity or {}).get("grade") if result else None
            if result is None or request.min_identity is None or identity.meets(grade, request.min_identity):
                break
            if attempt < attempts:  # below the requested grade: same prompt, new seed
                seed = secrets.randbelow(MAX_SEED + 1)
                edit_id = f"{job.edit_id.rsplit('-s', 1)[0]}-s{seed}"
                logger.info("edit %s graded %s (< %s): attempt %d with seed %d", job.edit_id, grade,
                            request.min_identity, attempt + 1, seed)
                job = job.model_copy(update=dict(seed=seed, edit_id=edit_id, output=layout.edit_uri(edit_id)))
        _report_progress(progress_id, done, len(jobs))

    # 4. Handoff
    handoff_uri = None
    if results:
        # The best-scoring identity goes to video; among equals (or unscored), the first.
        chosen = max(results, key=lambda r: (r.identity or {}).get("score") or -1.0)
        width, height = handoff_size(chosen.width, chosen.height, profile.handoff_area)
        handoff = Handoff(run_id=plan.run_id, frame=chosen.output, edit_id=chosen.edit_id,
                          motion_prompt=request.motion_prompt or plan.settings.handoff.motion_prompt,
                          width=width, height=height, num_frames=plan.settings.handoff.num_frames,
                          fps=plan.settings.handoff.fps, seed=chosen.seed, manifest=layout.manifest_uri)
        handoff_uri = storage.write_json(layout.handoff_uri, handoff.model_dump())

    # 5. Video stage
    animation = hand_over(handoff_uri, plan) if handoff_uri else None

    # 6. Manifest (last), after the contact sheet it points to
    manifest = _manifest(plan, records, results, handoff_uri)
    manifest.animation = animation
    if results:
        manifest.contact_sheet = storage.write_bytes(
            storage.join(layout.folder, "contact_sheet.png"),
            storage.png_bytes(contact_sheet(plan.images[0].data, manifest.edits)))
    storage.write_json(layout.manifest_uri, manifest.model_dump())

    # 7. UI
    _publish(manifest, layout.manifest_uri)
    if not results:
        raise RuntimeError(f"all {len(jobs)} edits failed; see {storage.redact(layout.manifest_uri)}")
    return manifest.model_dump()


def hand_over(handoff_uri: str, plan: RunPlan) -> dict | None:
    """Run the video stage for the chosen frame as settings.handoff.mode says; record, never raise."""
    mode = plan.settings.handoff.mode
    if mode == "none":
        return None
    request = AnimateRequest(handoff=handoff_uri, storage_root=plan.layout.root,
                             video_profile=plan.request.video_profile)
    logger = get_run_logger()
    try:
        if mode == "inline":
            from recast.flows.animate import animate_flow  # the edit flow is built on it (a subflow)

            manifest = animate_flow(request)
            return {"mode": mode, "status": manifest["status"], "run_id": manifest["run_id"],
                    "manifest": storage.join(manifest["folder"], "manifest.json"),
                    "clips": [{k: c[k] for k in ("clip_id", "output", "last_frame", "num_frames", "fps", "width",
                                                 "height", "seconds")} for c in manifest["clips"]]}
        from prefect.deployments import run_deployment

        # The video model lives on its own GPU pool; this flow waits for it as a subflow.
        run = run_deployment(plan.settings.handoff.deployment, parameters={"request": request.model_dump()},
                             as_subflow=True, timeout=plan.settings.handoff.timeout_s)
        return {"mode": mode, "deployment": plan.settings.handoff.deployment, "flow_run_id": str(run.id),
                "status": run.state.type.value.lower() if run.state else "unknown"}
    except Exception as exc:  # noqa: BLE001 - the edits are done; a video failure is recorded, not fatal
        logger.error("video stage (%s) failed: %s", mode, exc)
        return {"mode": mode, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}


def _record(job: EditJob, result: EditResult | None, message: str | None, plan: RunPlan, attempt: int) -> EditRecord:
    scored = dict(result.identity or {}) if result else {}
    scorer_notes = scored.pop("notes", "")
    return EditRecord(
        attempt=attempt, prompt_warnings=plan.prompt_warnings.get(job.prompt, []),
        loras=[lora.model_copy(update=dict(source=storage.redact(lora.source))) for lora in job.loras],
        edit_id=job.edit_id, status="succeeded" if result else "failed", prompt=job.prompt,
        negative_prompt=job.negative_prompt, seed=job.seed, steps=job.steps, true_cfg_scale=job.true_cfg_scale,
        inputs=[storage.redact(u) for u in job.inputs], output=result.output if result else None,
        width=result.width if result else job.width, height=result.height if result else job.height,
        seconds=result.seconds if result else None, cache_hit=result.cache_hit if result else None,
        error=None if result else (message or "failed"),
        identity=IdentityRecord(notes=plan.request.identity_notes, scorer_notes=scorer_notes, **scored))


def _manifest(plan: RunPlan, records: list[EditRecord], results: list[EditResult], handoff: str | None) -> Manifest:
    profile, settings = plan.profile, plan.settings
    first = results[0] if results else None
    # This run paid the cold start only if its first edit loaded the pipeline.
    cold_start_paid = first.cold_start_s if first and not first.cache_hit else 0.0
    gpu_seconds = sum(r.seconds for r in results) + cold_start_paid
    succeeded = len(results)
    status = "succeeded" if succeeded == len(records) else ("partial" if succeeded else "failed")
    request = plan.request.model_dump()
    request["images"] = [storage.redact(storage.normalize_uri(u)) for u in request["images"]]
    request["seeds"] = plan.seeds
    return Manifest(
        run_id=plan.run_id, folder=storage.redact(plan.layout.folder), created_at=plan.created_at,
        finished_at=timestamp(), status=status, request=request, model=ModelInfo.of(profile),
        versions=versions(), device=loading.describe_device(profile),
        pipeline=PipelineInfo(cold_start_s=first.cold_start_s if first else None,
                              cache_hit=first.cache_hit if first else None),
        edits=records, cost=Cost.of(gpu_seconds, profile, settings),
        handoff=handoff, identity_notes=plan.request.identity_notes, prefect=flow_run_info(),
    )


def contact_sheet(reference_png: bytes, edits: list[EditRecord], tile: int = 256):
    """The reference and every successful edit side by side, each labelled with its identity grade."""
    from PIL import Image, ImageDraw

    tiles = [(storage.decode_image(reference_png), "reference")]
    for edit in edits:
        if edit.output:
            score = f" {edit.identity.score:.2f}" if edit.identity.score is not None else ""
            tiles.append((storage.load_image(edit.output), f"{edit.identity.grade or '?'}{score} s{edit.seed}"))
    sheet = Image.new("RGB", (tile * len(tiles), tile + 24), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (image, label) in enumerate(tiles):
        image.thumbnail((tile, tile))
        sheet.paste(image, (index * tile + (tile - image.width) // 2, (tile - image.height) // 2))
        draw.text((index * tile + 6, tile + 6), label[:40], fill="black")
    return sheet


def _publish(manifest: Manifest, manifest_uri: str) -> None:
    rows = [{"prompt theme": theme(e.prompt), "identity": e.identity.grade, "score": e.identity.score,
             "seed": e.seed, "seconds": e.seconds, "status": e.status, "output": storage.redact(e.output or "")}
            for e in manifest.edits]
    create_table_artifact(table=rows, key="recast-edit-results", description=f"recast run {manifest.run_id}")
    ok = sum(e.status == "succeeded" for e in manifest.edits)
    create_markdown_artifact(key="recast-edit-summary", markdown="\n".join([
        f"# recast run `{manifest.run_id}`: {manifest.status}",
        f"- model: `{manifest.model.id}` @ `{manifest.model.revision}` ({manifest.model.profile}, "
        f"{manifest.model.dtype}) on {manifest.device}",
        f"- edits: {ok}/{len(manifest.edits)} succeeded; cold start {manifest.pipeline.cold_start_s} s, "
        f"cache hit {manifest.pipeline.cache_hit}",
        f"- cost: {manifest.cost.gpu_seconds} GPU-s = ${manifest.cost.usd}",
        f"- manifest: `{storage.redact(manifest_uri)}`",
        f"- handoff: `{storage.redact(manifest.handoff or 'none')}`",
    ]))
