"""The `recast` command. Its options are generated from the same pydantic models the Prefect UI form uses.

Exit codes: 0 done; 1 the job ran and failed (the reason is printed); 2 bad input (one line on stderr naming the
field, the value and the fix; nothing written); 3 the run finished but its identity target was not met.
Six commands and their summaries; the pydantic-to-argparse bridge lives in cli_models.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import metadata

from pydantic import ValidationError

from recast.flows.cli_models import (add_model_arguments, describe_file_error, describe_validation_error,
                                     model_from_args, yaml_keys_help)
from recast.flows.forks import FLOW_RUN_STARTS  # the standard library only: the CLI stays quick to start
from recast.tasks.errors import BadInput, ModelUnavailable
from recast.tasks.schemas.requests import AnimateRequest, EditRequest, Storyboard
from recast.tasks.settings import ConfigError, get_settings

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_IDENTITY_NOT_MET = 1, 2, 3


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"recast: warning: {warning}", file=sys.stderr)


def _theme(prompt: str) -> str:
    """A prompt's first clause, for one-line messages (never cut mid-word)."""
    return prompt.split(",")[0].strip()


def _run(flow, *args, **kwargs) -> tuple[dict | None, str | None]:
    """Run a flow in this process; (manifest, None) or (manifest or None, the reason it failed)."""
    from recast.flows.runs import run_flow

    with _prefect_server():
        state = run_flow(flow, *args, return_state=True, **kwargs)
        data = state.result(raise_on_failure=False, _sync=True)
    manifest = data if isinstance(data, dict) else None
    return manifest, None if state.is_completed() else (state.message or str(data))


_on_background_server = [False]  # this command's flows ran on the background server (see _keep_loaded)


def _prefect_server():
    """The Prefect server this command's flow runs on: PREFECT_API_URL's when set; else, with `cli_server:
    background` (the default), the local background server the commands share, started now if none is up
    (recast.flows.local_server); with `temporary`, Prefect's own temporary server for this command only."""
    import contextlib

    from recast.flows import local_server

    from prefect.settings import get_current_settings

    settings = get_settings()
    # A server named anywhere Prefect looks (PREFECT_API_URL, the active Prefect profile) is the one to use.
    if get_current_settings().api.url or settings.cli_server != "background":
        return contextlib.nullcontext()
    state, started = local_server.ensure(settings.cli_server_idle_s)
    os.environ["PREFECT_API_URL"] = state["api"]
    # recast's own server: its clients skip what they need not ask it (local_server.own_server_clients)
    os.environ.update(local_server.own_server_clients(os.environ, local_server.prefect_home()))
    _on_background_server[0] = True
    if "prefect.context" in sys.modules:  # Prefect read its settings at import: make it read them again
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
    if started:
        print(f"recast: started a Prefect server in the background at {state['api'].removesuffix('/api')}; the "
              f"next commands reuse it; `{local_server.stop_command()}` stops it (it stops itself after "
              f"{settings.cli_server_idle_s / 60:.0f} min unused)", file=sys.stderr, flush=True)
    return local_server.in_use()


def _server(args: argparse.Namespace) -> int:
    from recast.flows import local_server

    if args.action == "stop":
        from recast.flows import cli_workers

        if worker := cli_workers.stop():  # first: it keeps the server in use
            print(f"recast server: stopped the background worker ({cli_workers.describe(worker['models'])})",
                  flush=True)
        state = local_server.stop()
        if state and state.get("owner"):
            print(f"recast server: the server at {state['api']} belongs to `{state['owner']}` (pid {state['pid']}); "
                  "stop that instead", file=sys.stderr, flush=True)
            return EXIT_BAD_INPUT
        print(f"recast server: stopped the background server at {state['api']}" if state else
              f"recast server: no background server was running in {local_server.prefect_home()} (PREFECT_HOME)",
              flush=True)
        return 0
    if args.action == "start":
        state, started = local_server.ensure(get_settings().cli_server_idle_s)
        print(f"recast server: {'started' if started else 'already running'} at {state['api']}", flush=True)
        return 0
    state = local_server.running()
    owner = f", started by `{state['owner']}`" if state and state.get("owner") else ""
    print(f"recast server: running at {state['api']} (pid {state['pid']}{owner})" if state else
          f"recast server: no background server is running in {local_server.prefect_home()} (PREFECT_HOME)",
          flush=True)
    return 0


def _use_running_workers(needs) -> None:
    """The default, RECAST_EXECUTION unset: when `recast worker` processes on this command's server already serve
    every model the command needs (and read its task parameters), its jobs run there, where the model is loaded
    once, instead of loading it in this process again (a tiny edit: ~4 s instead of 11-13 s on 2 cores).
    RECAST_EXECUTION=local keeps them here. `needs`: a callable giving [(stage, profile name)]; a name it cannot
    resolve is left to the command's own plan to refuse."""
    if "RECAST_EXECUTION" in os.environ or get_settings().execution != "local":
        return
    from prefect.settings import get_current_settings

    if get_settings().cli_server == "temporary" and not get_current_settings().api.url:
        return  # its flows run on a temporary server of their own, which no worker can reach
    try:
        pairs = needs(get_settings())
    except Exception:  # noqa: BLE001 - refused by the plan next, with its proper message
        return
    from recast.flows import cli_workers, fleet

    served = fleet.serve_all(pairs)
    kept = cli_workers.registered()
    if not served and cli_workers.serves(kept, pairs):  # an earlier command's worker, still loading them
        print(f"recast: waiting for the background worker to load {cli_workers.describe(pairs)} (left by an earlier "
              "command; RECAST_EXECUTION=local runs it here)", file=sys.stderr, flush=True)
        served = cli_workers.wait_until_serving(kept, pairs, lambda: fleet.serve_all(pairs))
    if served:
        os.environ["RECAST_EXECUTION"] = "workers"
        print(f"recast: running on the workers already serving {cli_workers.describe(pairs)} (RECAST_EXECUTION=local "
              "runs it here)", file=sys.stderr, flush=True)
    elif kept is not None:  # this command loads other models here: the background worker gives the memory back
        cli_workers.stop()
        print(f"recast: stopped the background worker that kept {cli_workers.describe(kept['models'])} loaded",
              file=sys.stderr, flush=True)


def _keep_loaded(models: list[tuple[str, object]], settings) -> None:
    """After a command ran `models` in its own process on the background server: leave a worker that keeps them
    loaded for the next commands (recast.flows.cli_workers), unless cli_worker_idle_s is 0."""
    if settings.execution != "local" or not _on_background_server[0] or settings.cli_worker_idle_s <= 0:
        return
    from recast.flows import cli_workers, local_server

    pairs = [(kind, profile.name) for kind, profile in models]
    if cli_workers.keep(pairs, settings.cli_worker_idle_s):
        print(f"recast: a background worker keeps {cli_workers.describe(pairs)} loaded for the next commands (it "
              f"stops after {settings.cli_worker_idle_s / 60:.0f} min without one; `{local_server.stop_command()}` "
              "stops it)", file=sys.stderr, flush=True)


def _edit_models(settings, request) -> list[tuple[str, object]]:
    """The models an edit command runs, (kind, profile): its edit profile, and its video profile when the clip is
    made inline."""
    models = [("edit", settings.get_profile(request.profile))]
    if settings.handoff.mode == "inline":
        models.append(("video", settings.get_video_profile(request.video_profile)))
    return models


# --------------------------------------------------------------------------------------------------
# Commands


def _edit(args: argparse.Namespace) -> int:
    request = model_from_args(EditRequest, args)
    from recast.flows.edit import plan_run
    from recast.flows.runs import remember_plan

    _use_running_workers(lambda settings: [(kind, p.name) for kind, p in _edit_models(settings, request)])
    plan = plan_run(request)  # refuse bad input here, before Prefect starts or anything is written
    remember_plan("edit", request, plan)  # the flow runs this plan instead of reading everything again
    if plan.settings.execution == "local":  # the model loads while the Prefect server starts and the run begins
        from recast.tasks.models import loading

        loading.preload(_edit_models(plan.settings, request))
    for prompt, warnings in plan.prompt_warnings.items():
        _print_warnings([f"prompt '{_theme(prompt)}': {w}" for w in warnings])
    _print_warnings(plan.notices)
    code = _run_edit(request, args.json)
    if code == 0:
        _keep_loaded(_edit_models(plan.settings, request), plan.settings)
    return code


def _resume(args: argparse.Namespace) -> int:
    from recast.flows.edit import load_resume

    # Refuses a run that is not there, is complete, or whose plan.json is not recast's; the request it returns
    # writes under the run's own storage root.
    request, _ = load_resume(args.run, args.storage)
    return _run_edit(request, args.json, resume=args.run)


def _run_edit(request: EditRequest, as_json: bool, resume: str | None = None) -> int:
    from recast.flows.edit import edit_flow, progress_listeners

    progress = _Progress(quiet=as_json)
    progress_listeners.append(progress)
    try:
        manifest, failure = _run(edit_flow, request, resume=resume)
    finally:
        progress_listeners.remove(progress)
        progress.close()
    if manifest is None:
        print(f"recast edit: failed: {failure}", file=sys.stderr)
        return EXIT_FAILED
    if as_json:
        print(json.dumps(manifest, indent=2, default=str))
    else:
        _print_edit_summary(manifest)
    if manifest["status"] == "failed":
        print(f"recast edit: failed: {failure}", file=sys.stderr)
        return EXIT_FAILED
    if manifest["status"] == "identity_not_met":
        target = manifest["identity_target"]
        print(f"recast edit: identity target {target['grade']} not met (best: {target['best_grade']}); nothing was "
              "handed to video (--handoff-below-target hands the best anyway)", file=sys.stderr)
        return EXIT_IDENTITY_NOT_MET
    return 0


def _print_edit_summary(manifest: dict) -> None:
    from recast.tasks import storage

    ok = [e for e in manifest["edits"] if e["status"] == "succeeded"]
    # Where it ran, when anything ran (a run whose edits all failed on a worker did not run here).
    where = manifest["device"] if ok else "no edit ran"
    print(f"recast run {manifest['run_id']}: {manifest['status']} ({len(ok)}/{len(manifest['edits'])} edits, "
          f"profile {manifest['model']['profile']}, {where})")
    print(f"  {'theme':30} {'try':>3} {'identity':10} {'score':>6} {'seed':>10} {'seconds':>8}  output")
    for edit in manifest["edits"]:
        where = edit["output"] if edit["status"] == "succeeded" else f"FAILED: {edit['error']}"
        seconds = f"{edit['seconds']:.2f}" if edit["seconds"] is not None else "-"
        score = edit["identity"].get("score")
        print(f"  {_theme(edit['prompt'])[:30]:30} {edit['attempt']:>3} {str(edit['identity'].get('grade') or '-'):10} "
              f"{'-' if score is None else format(score, '.3f'):>6} {edit['seed']:>10} {seconds:>8}  {where}")
    target = manifest.get("identity_target")
    if target:
        print(f"  identity target {target['grade']}: {'met' if target['met'] else 'NOT met'} "
              f"(best {target['best_grade']})")
    if manifest.get("contact_sheet"):
        print(f"  contact sheet: {manifest['contact_sheet']}")
    pipeline = manifest["pipeline"]
    if pipeline.get("cold_start_s") is not None:
        print(f"  pipeline: cold start {pipeline['cold_start_s']}s, already loaded {pipeline['cache_hit']}, prepared "
              f"weights {pipeline.get('prepared')}")
    print(f"  handoff: {manifest['handoff']}")
    animation = manifest.get("animation")
    if animation:
        clips = ", ".join((c["output"] + (f" (identity {c['identity']['grade']})" if c.get("identity") else ""))
                          if c["output"] else f"FAILED: {c['error']}" for c in animation.get("clips", [])) \
            or animation.get("error", "")
        print(f"  video ({animation['mode']}): {animation['status']}: {clips}")
    print(storage.join(manifest["folder"], "manifest.json"))


def _animate(args: argparse.Namespace) -> int:
    request = model_from_args(AnimateRequest, args)
    from recast.flows.animate import animate_flow, plan_animation

    _use_running_workers(lambda settings: [("video", settings.get_video_profile(request.video_profile).name)])
    plan = plan_animation(request)  # refuse bad input before Prefect starts
    code = _run_planned("animate", animate_flow, request, plan, plan.warnings, args.json, _print_animate_summary)
    if code == 0:
        _keep_loaded([("video", plan.profile)], plan.settings)
    return code


def _run_planned(command: str, flow_fn, request, plan, warnings, as_json: bool, print_summary) -> int:
    """Run a flow whose request was planned (refused or accepted) before Prefect started: the flow reuses the plan;
    prints the manifest (JSON, or print_summary's lines) and the failure's reason."""
    from recast.flows.runs import remember_plan

    remember_plan(command, request, plan)
    _print_warnings(warnings)
    manifest, failure = _run(flow_fn, request)
    if manifest is not None:
        if as_json:
            print(json.dumps(manifest, indent=2, default=str))
        else:
            print_summary(manifest)
    if failure:
        print(f"recast {command}: failed: {failure}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _print_animate_summary(manifest: dict) -> None:
    clip = manifest["clips"][0]
    print(f"recast animate {manifest['run_id']}: {manifest['status']} ({clip['num_frames']} frames "
          f"{clip['width']}x{clip['height']} at {clip['fps']} fps, seed {clip['seed']}, profile "
          f"{manifest['model']['profile']})")
    print(f"  clip: {clip['output'] or 'FAILED: ' + str(clip['error'])}\n  last frame: {clip['last_frame']}")
    if clip.get("identity"):
        drift = clip["identity"].get("drift_from")
        print(f"  identity: {clip['identity']['grade']} (worst sampled frame)"
              + (f", drifts from frame {drift}" if drift is not None else "")
              + f"; strip: {clip.get('identity_strip')}")
    print(manifest["manifest"])


def _storyboard(args: argparse.Namespace) -> int:
    import yaml

    from recast.tasks import storage

    try:
        data = yaml.safe_load(storage.read_bytes(storage.check_scheme("FILE", args.file)))
    except FileNotFoundError:
        raise BadInput("FILE", args.file, "file does not exist", "pass a storyboard YAML file") from None
    except yaml.YAMLError as exc:
        raise BadInput("FILE", args.file, f"not valid YAML ({str(exc).splitlines()[0]})", "fix the YAML") from None
    if not isinstance(data, dict):
        raise BadInput("FILE", args.file, "expected a mapping with 'scenes'", "see `recast storyboard --help`")
    for option, key in (("image", "reference"), ("storage", "storage_root"), ("profile", "profile"),
                        ("video_profile", "video_profile")):
        if getattr(args, option):
            data[key] = getattr(args, option)
    try:
        board = Storyboard.model_validate(data)
    except ValidationError as exc:
        raise _FileError(describe_file_error(args.file, Storyboard, exc)) from None
    from recast.flows.storyboard import check_storyboard, storyboard_flow

    plan = check_storyboard(board)
    return _run_planned("storyboard", storyboard_flow, board, plan, plan.prompt_warnings, args.json,
                        _print_storyboard_summary)


def _print_storyboard_summary(manifest: dict) -> None:
    from recast.tasks import storage

    print(f"recast storyboard {manifest['run_id']}: {manifest['status']} ({len(manifest['scenes'])} scenes)")
    for scene in manifest["scenes"]:
        where = scene.get("clip") if scene.get("status") != "skipped" else f"({scene.get('reason')})"
        print(f"  scene {scene['scene']}: {scene.get('status')} from {scene['source']}: {where}")
    print(f"  stitched: {manifest['stitched']['output']} ({manifest['stitched']['num_frames']} frames)")
    print(storage.join(manifest["folder"], "manifest.json"))


class _FileError(ValueError):
    """A file that does not validate: the message names the file, where in it, and the fix."""


VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi")


def _identity(args: argparse.Namespace) -> int:
    from recast.tasks import identity, storage
    from recast.tasks.settings import get_settings

    limit = get_settings().max_input_pixels
    reference = storage.read_image("REFERENCE", args.reference, limit)
    videos = [uri for uri in args.images if uri.lower().endswith(VIDEO_SUFFIXES)]
    images = [storage.read_image(f"IMAGE[{i}]", uri, limit) for i, uri in enumerate(args.images) if uri not in videos]
    rows = [{"image": image.uri, **score.as_dict()} for image, score in
            zip(images, identity.score_images(reference.data, [image.data for image in images]))]
    clips = []
    for index, uri in enumerate(videos):
        uri = storage.check_scheme(f"VIDEO[{index}]", uri)
        if not storage.exists(uri):
            raise BadInput(f"VIDEO[{index}]", uri, "file does not exist", "check the path or URI")
        fps = storage.video_fps(uri)
        scored, _ = identity.score_clip(reference.data, storage.iter_video(uri), fps, args.every)
        clips.append({"video": uri, "fps": fps, "frames": [{k: f[k] for k in ("index", "score", "grade")}
                                                           for f in scored.frames],
                      "grade": scored.grade, "drift_from": scored.drift_from, "no_face_frames": scored.no_face_frames,
                      "notes": scored.notes, "seconds": scored.seconds})
    if args.json:
        print(json.dumps(rows + clips, indent=2))
        return 0
    if rows:
        print(f"{'grade':11} {'score':>6} {'face px':>8}  image")
    for row in rows:
        score = "-" if row["score"] is None else f"{row['score']:.3f}"
        note = f"  ({row['notes']})" if row["notes"] else ""
        print(f"{row['grade']:11} {score:>6} {str(row['face_px'] or '-'):>8}  {row['image']}{note}")
    for clip in clips:
        drift = f", drifts from frame {clip['drift_from']}" if clip["drift_from"] is not None else ", no drift"
        print(f"{clip['grade']:11} clip{drift}, {clip['no_face_frames']} of {len(clip['frames'])} sampled frames "
              f"without a face: {clip['video']}")
        print("  " + "  ".join(f"#{f['index']} {f['grade']}" + (f" {f['score']:.2f}" if f["score"] is not None else "")
                               for f in clip["frames"]))
    return 0


def _worker(args: argparse.Namespace) -> int:
    from recast.tasks.models import readahead

    readahead.start()  # first: the reads overlap the imports below and the model's (a new node's empty page cache)
    from recast.flows.workers import serve_worker

    gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else None
    # With no server named, a worker joins (or starts) the background server the CLI's commands share, and keeps it
    # in use while it serves: `recast worker edit &` then `RECAST_EXECUTION=workers recast edit ...` meet with no
    # set-up, and each command finds the model already loaded.
    with _prefect_server():
        serve_worker(list(dict.fromkeys(args.kinds)), gpu=args.gpu, profile_name=args.profile,
                     video_profile_name=args.video_profile, gpus=gpus)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from recast.tasks.models import loading
    from recast.tasks.settings import get_settings

    settings = get_settings()
    targets = [("edit", settings.get_profile(args.profile))] if args.profile or not args.video_profile else []
    if args.video_profile:
        targets.append(("video", settings.get_video_profile(args.video_profile)))
    if args.compile:  # before anything is made: compiled code is for the card it is compiled on
        import torch

        for kind, profile in targets:
            if profile.device.startswith("cuda") and not torch.cuda.is_available():
                raise BadInput("--compile", profile.name, f"this {kind} profile runs on {profile.device}, which torch "
                               "does not see here, and compiled code is for the card it was compiled on",
                               "run `recast prepare --compile` on a machine with the workers' GPU, or leave "
                               "--compile out (the first worker start then compiles and keeps the code)")
    for kind, profile in targets:
        folder, made, seconds = loading.prepare_weights(kind, profile)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        shown = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
        print(f"recast prepare: {kind} {profile.name}: {'made' if made else 'verified'} {shown} in {seconds:.1f}s: "
              f"{folder}", flush=True)
        if args.compile:
            print(f"recast prepare: {kind} {profile.name}: {_compile_once(kind, profile)}", flush=True)
    from recast.tasks.models import readahead

    readahead.record()  # what a start imports, for a new node's readahead (an image that holds the weights holds it)
    return 0


def _compile_once(kind: str, profile) -> str:
    """Load the profile as a worker does (placed, compiled, warmed up), so that its compiled code and compile cache
    are kept beside its prepared weights for every later start (what `--compile` reports)."""
    import time

    from recast.tasks.models import loading, prepared

    if not profile.compile:
        return "nothing to compile (the profile sets compile: false)"
    started = time.perf_counter()
    try:
        loaded, _ = loading.get_pipeline(kind, profile)
        blocks = loaded.phases.get("load_parts", {}).get("compiled_blocks", "compiled in the process")
        return (f"{blocks}, compile cache {loaded.compile_cache}, in {time.perf_counter() - started:.1f}s: kept in "
                f"{prepared.compile_cache_path(kind, profile).parent}")
    finally:
        loading.clear_cache()


def _gallery(args: argparse.Namespace) -> int:
    from recast.flows.gallery import serve
    from recast.tasks import storage
    from recast.tasks.settings import get_settings

    roots = [storage.check_scheme("--storage", root) for root in (args.storage or get_settings().storage_roots)]
    serve(roots, host=args.host, port=args.port)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from recast.flows.serve import serve

    return serve(args.port, args.profile, args.video_profile, args.one_worker, args.flow_run_start,
                 args.flow_runs_at_once)


class _Progress:
    """Edits done: one live bar on a terminal, a plain line per edit in a log (no bar codes in files)."""

    def __init__(self, quiet: bool):
        self._bar, self._quiet, self._tty = None, quiet, sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if self._quiet:
            return
        if not self._tty:
            # Written, not print()ed: inside a flow run with log_prints, print() becomes a Prefect log record,
            # which the CLI's WARNING level hides.
            sys.stderr.write(f"recast: {done}/{total} edits done\n")
            sys.stderr.flush()
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="edits", unit="edit", file=sys.stderr, leave=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# --------------------------------------------------------------------------------------------------
# The parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recast", description="Identity-preserving photo edits -> video.")
    parser.add_argument("--version", action="version", version=f"recast {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    edit = sub.add_parser("edit", help="edit photos of a person with one or more prompts",
                          description=EditRequest.__doc__)
    add_model_arguments(edit, EditRequest)
    edit.add_argument("--json", action="store_true", help="print the manifest as JSON instead of a summary")
    edit.set_defaults(handler=_edit, model=EditRequest)

    resume = sub.add_parser("resume", help="finish an edit run whose process died, in the same folder",
                            description="Resume an edit run that did not finish (no manifest.json): what it had "
                            "done is kept, the rest runs, and the manifest records every attempt.")
    resume.add_argument("run", metavar="RUN", help="the run id (a folder under runs/), or the run folder's URI")
    resume.add_argument("--storage", help="the storage root the run is under (default ./artifacts)")
    resume.add_argument("--json", action="store_true", help="print the manifest as JSON instead of a summary")
    resume.set_defaults(handler=_resume, model=None)

    animate = sub.add_parser("animate", help="animate an edit run's chosen frame (its handoff.json)",
                             description=AnimateRequest.__doc__)
    add_model_arguments(animate, AnimateRequest)
    animate.add_argument("--json", action="store_true", help="print the manifest as JSON")
    animate.set_defaults(handler=_animate, model=AnimateRequest)

    ident = sub.add_parser("identity", help="score images or videos against a reference photo's face",
                           description="Grade how well each image, or each sampled frame of a video, keeps the "
                           "identity of the reference photo's face (YuNet + SFace cosine: Excellent, Good, Drifted, "
                           "Lost; unscorable when the reference has no face). A video's grade is its worst frame; "
                           "drift_from is the first frame graded below the first.")
    ident.add_argument("reference", metavar="REFERENCE", help="photo of the person")
    ident.add_argument("images", metavar="IMAGE_OR_VIDEO", nargs="+",
                       help=f"images, or videos ({', '.join(VIDEO_SUFFIXES)}), to score")
    ident.add_argument("--every", type=int, default=None, metavar="N",
                       help="score every Nth frame of a video (default: one per second; first and last always)")
    ident.add_argument("--json", action="store_true", help="print the scores as JSON")
    ident.set_defaults(handler=_identity, model=None)

    worker = sub.add_parser("worker", help="serve edit and/or animate tasks, keeping the models loaded (one GPU)",
                            description="Load and warm the models, then serve Prefect task runs one at a time. "
                            "A worker serves only the profiles it loaded. Needs a Prefect server (PREFECT_API_URL).")
    worker.add_argument("kinds", nargs="+", choices=["edit", "animate"], metavar="{edit,animate}",
                        help="which tasks this worker serves (both: one process for the whole chain)")
    worker.add_argument("--gpu", type=int, default=None, help="GPU index (sets CUDA_VISIBLE_DEVICES)")
    worker.add_argument("--gpus", default=None, metavar="0,1",
                        help="several GPUs for one job at a time: one process per GPU, CFG-parallel (and Ulysses "
                        "sequence parallelism beyond two, or without CFG); rank 0 takes the Prefect jobs")
    worker.add_argument("--profile", default=None, help="edit profile to load (default from config)")
    worker.add_argument("--video-profile", dest="video_profile", default=None,
                        help="video profile to load (default from config)")
    worker.set_defaults(handler=_worker, model=None)

    prepare = sub.add_parser(
        "prepare", help="make a profile's ready-to-serve weights (LoRA fused, FP8) in the model cache",
        description="Write the prepared weights of an edit profile and/or a video profile into the model cache "
        "(RECAST_CACHE_DIR): the distillation LoRA fused, the quantized tensors with their scales, the text encoder "
        "as the profile runs it, with a manifest of SHA-256 per file. A worker then starts from them (and from "
        "torch.compile's cache kept beside them) instead of the checkpoint. Verifies prepared weights that are "
        "there already; makes them again when they do not verify. Run it where the image is built, on a GPU for "
        "the GPU profiles.")
    prepare.add_argument("--profile", default=None, help="edit profile (default: the configured one, unless only "
                         "--video-profile is given)")
    prepare.add_argument("--video-profile", dest="video_profile", default=None, help="video profile")
    prepare.add_argument("--compile", action="store_true", help="also load each profile once as a worker does, so "
                         "its compiled blocks and compile cache are kept beside the weights: a new node whose image "
                         "or volume holds them compiles nothing at its first start (run it on the workers' kind of "
                         "GPU: compiled code is for the card it was compiled on)")
    prepare.set_defaults(handler=_prepare, model=None)

    gallery = sub.add_parser(
        "gallery", help="see the runs in a browser: edits, clips, identity (read-only)",
        description="A read-only web page over the storage roots: runs newest first, each run's reference photo, "
        "edits with their identity grades, contact sheet, clips (playing in the page), drift strips, storyboards and "
        "manifest. Serves only files inside run folders under the roots. Bound to 127.0.0.1 unless --host says "
        "otherwise (anyone who can reach that address sees every run: there is no login).")
    gallery.add_argument("--storage", action="append", default=None, metavar="URI",
                         help="a storage root to show (repeatable; default: the configured storage roots)")
    gallery.add_argument("--port", type=int, default=4300, help="port (default 4300)")
    gallery.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                         "only)")
    gallery.set_defaults(handler=_gallery, model=None)

    serve = sub.add_parser(
        "serve", help="a local Prefect server, the deployments, a flow worker and task workers (`make serve`)",
        description="Start a Prefect server on 127.0.0.1, deploy deployments/prefect.yaml, and start a process worker "
        "for flow runs and an edit and an animate task worker (the configured default profiles). Prints the "
        "addresses once every worker is ready. Ctrl-C or TERM stops everything it started, flow runs included. "
        "Environment: RECAST_SERVE_PORT (default 4200), RECAST_SERVE_GALLERY_PORT (default: the port + 100), "
        "RECAST_SERVE_DATABASE (postgres, or a "
        "postgresql+asyncpg:// URL; default SQLite under PREFECT_HOME), RECAST_SERVE_LOG_LEVEL (default INFO).")
    serve.add_argument("--port", type=int, default=None, help="the server's port (default RECAST_SERVE_PORT or 4200)")
    serve.add_argument("--profile", default=None, help="edit profile the edit worker loads (default from config)")
    serve.add_argument("--video-profile", dest="video_profile", default=None,
                       help="video profile the animate worker loads (default from config)")
    serve.add_argument("--one-worker", action="store_true",
                       help="one task worker for both stages (one card: the memory policy keeps both when they fit)")
    serve.add_argument("--flow-run-start", dest="flow_run_start", default="fork", choices=FLOW_RUN_STARTS,
                       help="fork (default): each flow run is forked from a process that has already imported Prefect "
                       "and the flows (~3 CPU-s less a run; restart after changing the flows); process: Prefect's "
                       "own, a new Python process per run")
    serve.add_argument("--flow-runs-at-once", dest="flow_runs_at_once", type=int, default=None,
                       help="the most flow runs the flow worker runs at once (default: no limit); the others wait as "
                       "scheduled runs and start, in the order they were created, as runs end (a burst that starts "
                       "together queues on the one Prefect API process; docs/OPERATING.md)")
    serve.set_defaults(handler=_serve, model=None)

    server = sub.add_parser(
        "server", help="the background Prefect server the commands share (start, stop, status)",
        description="Without PREFECT_API_URL, the first command that runs a flow starts a local Prefect server in "
                    "the background (under PREFECT_HOME) and the next commands reuse it; it stops itself after "
                    "cli_server_idle_s unused. RECAST_CLI_SERVER=temporary: a temporary server per command instead.")
    server.add_argument("action", choices=["start", "stop", "status"])
    server.set_defaults(handler=_server, model=None)

    board = sub.add_parser("storyboard", help="edit and animate a storyboard of scenes, stitched into one video",
                           description=Storyboard.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="The YAML file's keys:\n" + yaml_keys_help(Storyboard))
    board.add_argument("file", metavar="FILE.yaml", help="the storyboard (its keys are listed below)")
    board.add_argument("--image", help="the person's photo (overrides the file's reference)")
    board.add_argument("--storage", help="where the run is written (default ./artifacts)")
    board.add_argument("--profile", help="edit model profile")
    board.add_argument("--video-profile", dest="video_profile", help="video model profile")
    board.add_argument("--json", action="store_true", help="print the manifest as JSON")
    board.set_defaults(handler=_storyboard, model=Storyboard)
    return parser


def _version() -> str:
    try:
        return metadata.version("recast")
    except metadata.PackageNotFoundError:
        return "unknown"


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, and for an unknown option name the closest one the command has ('--promt': did you mean --prompt?)."""
    import difflib

    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = parser._subparsers._group_actions[0].choices[args.command]  # noqa: SLF001 - argparse's own table
        known = [flag for action in command._actions for flag in action.option_strings]  # noqa: SLF001
        flag = next((u.split("=")[0] for u in unknown if u.startswith("--")), None)
        close = difflib.get_close_matches(flag, known, n=1) if flag else []
        hint = f"; did you mean {close[0]}?" if close else f"; see `recast {args.command} --help`"
        command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args


def main(argv: list[str] | None = None) -> int:
    # Offline by design (no telemetry from the embedded server), and Prefect's own INFO lines stay out of the
    # terminal: recast prints its progress and the reasons itself. A deployment's workers set their own level.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")  # no telemetry notice from Prefect's client either
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # A temporary server (cli_server: temporary) gets 2 minutes to answer, not Prefect's 20 s: on a busy 2-core
    # machine a test run saw "Timed out while attempting to connect to ephemeral Prefect API server".
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    try:
        parser = build_parser()
        args = _parse(parser, argv)
    except ConfigError as exc:  # a misspelt RECAST_* variable: one line, whatever the command
        print(f"recast: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return args.handler(args)
    except ValidationError as exc:
        print(f"recast {args.command}: {describe_validation_error(args.model, exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (BadInput, ConfigError, _FileError) as exc:
        print(f"recast {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModelUnavailable as exc:
        print(f"recast {args.command}: model unavailable: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"recast {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last word: the reason, not a stack trace
        print(f"recast {args.command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


def run() -> None:
    """The `recast` console script: main(), then the exit a finished command needs and no more. Python's own
    finalization (tearing down torch's, diffusers' and Prefect's modules one by one) took 2.3 s after every edit
    on 2 cores, after its output was printed; here what must happen at exit still does (threads that are not
    daemons finish, the atexit handlers run: Prefect sends its last logs and events, logging flushes), then the
    process ends."""
    import atexit
    import threading

    try:
        code = main()
    except SystemExit as exc:  # argparse's --help, --version and usage errors
        code = exc.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    # The interpreter's own first step at exit: threading's exit hooks, then every non-daemon thread joined. Joining
    # them without the hooks hung `recast prepare --compile` for good: inductor's compile thread pool is never shut
    # down, and concurrent.futures wakes its idle workers only in those hooks (queued work still runs first).
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    run()
