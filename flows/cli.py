"""The `recast` command. Its options are generated from the same pydantic models the Prefect UI form uses.

Exit codes: 0 success; 1 the job ran and failed (the reason is printed); 2 bad input (one line on stderr
naming the field, the value and the fix; nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from recast.tasks.errors import BadInput, ModelUnavailable, first_error
from recast.tasks.schemas.requests import AnimateRequest, EditRequest, Storyboard
from recast.tasks.settings import ConfigError

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


# --------------------------------------------------------------------------------------------------
# pydantic model -> argparse


def _flag(name: str, extra: dict) -> str:
    return extra.get("cli") or "--" + name.replace("_", "-")


def _unwrap(annotation) -> tuple[type, bool]:
    """(scalar type, is_list) of a field annotation such as `list[int] | None`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        inner = typing.get_args(annotation)[0]
        inner = typing.get_args(inner)[0] if typing.get_origin(inner) is typing.Annotated else inner
        return inner, True
    return annotation, False


def add_model_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    for name, field in model.model_fields.items():
        extra = dict(field.json_schema_extra or {})
        scalar, is_list = _unwrap(field.annotation)
        help_text = field.description
        if extra.get("cli") == "positional-one":
            parser.add_argument(name, metavar=extra.get("metavar"), help=help_text)
            continue
        if extra.get("cli") == "positional":
            parser.add_argument(name, nargs="*", metavar=extra.get("metavar"), help=help_text)
            parser.add_argument("--" + name.rstrip("s"), dest=f"{name}_option", action="append", default=[],
                                metavar="PATH", help=f"same as {extra.get('metavar', name)} (repeatable)")
            continue
        kwargs: dict[str, Any] = dict(dest=name, help=help_text, default=argparse.SUPPRESS)
        if typing.get_origin(scalar) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(scalar))
        elif scalar is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = scalar if scalar in (int, float) else str
            kwargs["metavar"] = extra.get("metavar")
            if is_list:
                kwargs["action"] = "append"
        parser.add_argument(_flag(name, extra), **kwargs)


def model_from_args(model: type[BaseModel], args: argparse.Namespace) -> BaseModel:
    values = {}
    for name, field in model.model_fields.items():
        if (field.json_schema_extra or {}).get("cli") == "positional":
            values[name] = list(getattr(args, name)) + list(getattr(args, f"{name}_option"))
        elif hasattr(args, name):
            value = getattr(args, name)
            item, is_list = _unwrap(field.annotation)
            if is_list and isinstance(item, type) and hasattr(item, "parse_cli"):
                value = [item.parse_cli(v) for v in value]
            values[name] = value
    return model.model_validate(values)


def describe_validation_error(model: type[BaseModel], exc: ValidationError) -> str:
    """One line: the CLI flag, the value received, what is wrong and how to fix it."""
    where, value, message, kind = first_error(exc)
    name = where.split(".")[0] or "request"
    field = model.model_fields.get(name)
    extra = dict(field.json_schema_extra or {}) if field else {}
    positional = extra.get("cli", "").startswith("positional")
    flag = extra.get("metavar", name) if positional else _flag(name, extra)
    schema = model.model_json_schema()["properties"].get(name, {})
    bounds = next((s for s in [schema, schema.get("items", {}), *schema.get("anyOf", []),
                               *[s.get("items", {}) for s in schema.get("anyOf", [])]]
                   if "minimum" in s or "maximum" in s), {})
    if "minimum" in bounds and "maximum" in bounds:
        fix = f"use a value from {bounds['minimum']} to {bounds['maximum']}"
    elif kind in ("too_short", "string_too_short", "missing"):
        fix = f"give a non-empty {flag}"
    elif kind == "too_long":
        fix = f"give at most {exc.errors()[0].get('ctx', {}).get('max_length')} values for {flag}"
    else:
        fix = f"see `recast {model.__name__.removesuffix('Request').lower()} --help`"
    shown = value if not isinstance(value, (dict, BaseModel)) else "(missing)"
    return f"{flag}={shown!r}: {message}; fix: {fix}"


# --------------------------------------------------------------------------------------------------
# Commands


def _edit(args: argparse.Namespace) -> int:
    request = model_from_args(EditRequest, args)
    from recast.flows.edit import edit_flow, plan_run, progress_listeners
    from recast.flows.runs import remember_plan
    from recast.tasks import storage

    plan = plan_run(request)  # refuse bad input here, before Prefect starts or anything is written
    remember_plan("edit", request, plan)  # the flow runs this plan instead of reading everything again
    for prompt, warnings in plan.prompt_warnings.items():
        _print_warnings([f"prompt {prompt[:40]!r}: {w}" for w in warnings])

    bar = _progress_bar(quiet=args.json)
    progress_listeners.append(bar)
    try:
        manifest = edit_flow(request)
    finally:
        progress_listeners.remove(bar)
        bar.close()
    manifest_uri = storage.join(manifest["folder"], "manifest.json")
    if args.json:
        print(json.dumps(manifest, indent=2, default=str))
        return 0
    ok = [e for e in manifest["edits"] if e["status"] == "succeeded"]
    print(f"recast run {manifest['run_id']}: {manifest['status']} ({len(ok)}/{len(manifest['edits'])} edits, "
          f"profile {manifest['model']['profile']}, {manifest['device']})")
    print(f"  {'theme':32} {'identity':10} {'score':>6} {'seed':>10} {'seconds':>8}  output")
    for edit in manifest["edits"]:
        where = edit["output"] if edit["status"] == "succeeded" else f"FAILED: {edit['error']}"
        seconds = f"{edit['seconds']:.2f}" if edit["seconds"] is not None else "-"
        score = edit["identity"].get("score")
        print(f"  {edit['prompt'].split(',')[0][:32]:32} {str(edit['identity'].get('grade') or '-'):10} "
              f"{'-' if score is None else format(score, '.3f'):>6} {edit['seed']:>10} {seconds:>8}  {where}")
    if manifest.get("contact_sheet"):
        print(f"  contact sheet: {manifest['contact_sheet']}")
    print(f"  pipeline: cold start {manifest['pipeline']['cold_start_s']}s, cache hit {manifest['pipeline']['cache_hit']}")
    print(f"  handoff: {manifest['handoff']}")
    animation = manifest.get("animation")
    if animation:
        clips = ", ".join(c["output"] for c in animation.get("clips", [])) or animation.get("error", "")
        print(f"  video ({animation['mode']}): {animation['status']}: {clips}")
    print(manifest_uri)
    return 0


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"recast: warning: {warning}", file=sys.stderr)


def _animate(args: argparse.Namespace) -> int:
    request = model_from_args(AnimateRequest, args)
    from recast.flows.animate import animate_flow, plan_animation
    from recast.flows.runs import remember_plan

    plan = plan_animation(request)  # refuse bad input before Prefect starts
    remember_plan("animate", request, plan)
    _print_warnings(plan.warnings)
    manifest = animate_flow(request)
    if args.json:
        print(json.dumps(manifest, indent=2, default=str))
        return 0
    clip = manifest["clips"][0]
    print(f"recast animate {manifest['run_id']}: {manifest['status']} ({clip['num_frames']} frames "
          f"{clip['width']}x{clip['height']} at {clip['fps']} fps, seed {clip['seed']}, {clip['seconds']:.2f}s, "
          f"profile {manifest['model']['profile']})")
    print(f"  clip: {clip['output']}\n  last frame: {clip['last_frame']}")
    from recast.tasks import storage

    print(storage.join(manifest["folder"], "manifest.json"))
    return 0


def _identity(args: argparse.Namespace) -> int:
    from recast.tasks import identity, storage
    from recast.tasks.settings import get_settings

    limit = get_settings().max_input_pixels
    reference = storage.read_image("REFERENCE", args.reference, limit)
    images = [storage.read_image(f"IMAGE[{i}]", uri, limit) for i, uri in enumerate(args.images)]
    scores = identity.score_images(reference.data, [image.data for image in images])
    rows = [{"image": image.uri, **score.as_dict()} for image, score in zip(images, scores)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'grade':11} {'score':>6} {'face px':>8}  image")
    for row in rows:
        score = "-" if row["score"] is None else f"{row['score']:.3f}"
        note = f"  ({row['notes']})" if row["notes"] else ""
        print(f"{row['grade']:11} {score:>6} {str(row['face_px'] or '-'):>8}  {row['image']}{note}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from recast.flows.workers import serve_worker

    serve_worker(list(dict.fromkeys(args.kinds)), gpu=args.gpu, profile_name=args.profile,
                 video_profile_name=args.video_profile)
    return 0


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
        raise BadInput("FILE", args.file, "expected a mapping with 'scenes'", "see the README's storyboard example")
    for option, key in (("image", "reference"), ("storage", "storage_root"), ("profile", "profile"),
                        ("video_profile", "video_profile")):
        if getattr(args, option):
            data[key] = getattr(args, option)
    board = Storyboard.model_validate(data)
    from recast.flows.runs import remember_plan
    from recast.flows.storyboard import check_storyboard, storyboard_flow

    remember_plan("storyboard", board, check_storyboard(board))
    manifest = storyboard_flow(board)
    if args.json:
        print(json.dumps(manifest, indent=2, default=str))
        return 0
    print(f"recast storyboard {manifest['run_id']}: {manifest['status']} ({len(manifest['scenes'])} scenes)")
    for scene in manifest["scenes"]:
        print(f"  scene {scene['scene']}: {scene.get('status')} from {scene['source']}: {scene.get('clip')}")
    print(f"  stitched: {manifest['stitched']['output']} ({manifest['stitched']['num_frames']} frames)")
    print(storage.join(manifest["folder"], "manifest.json"))
    return 0


class _progress_bar:
    def __init__(self, quiet: bool):
        self._bar = None
        self._quiet = quiet

    def __call__(self, done: int, total: int) -> None:
        if self._quiet:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="edits", unit="edit", file=sys.stderr, leave=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recast", description="Identity-preserving photo edits -> video.")
    sub = parser.add_subparsers(dest="command", required=True)
    edit = sub.add_parser("edit", help="edit photos of a person with one or more prompts",
                          description=EditRequest.__doc__)
    add_model_arguments(edit, EditRequest)
    edit.add_argument("--json", action="store_true", help="print the manifest as JSON instead of a summary")
    edit.set_defaults(handler=_edit, model=EditRequest)

    animate = sub.add_parser("animate", help="animate an edit run's chosen frame (its handoff.json)",
                             description=AnimateRequest.__doc__)
    add_model_arguments(animate, AnimateRequest)
    animate.add_argument("--json", action="store_true", help="print the manifest as JSON")
    animate.set_defaults(handler=_animate, model=AnimateRequest)

    ident = sub.add_parser("identity", help="score images against a reference photo's face")
    ident.add_argument("reference", metavar="REFERENCE", help="photo of the person")
    ident.add_argument("images", metavar="IMAGE", nargs="+", help="images to score")
    ident.add_argument("--json", action="store_true", help="print the scores as JSON")
    ident.set_defaults(handler=_identity, model=None)

    worker = sub.add_parser("worker", help="serve edit and/or animate tasks, keeping the models loaded (one GPU)",
                            description="Load and warm the models, then serve Prefect task runs one at a time. "
                            "A worker serves only the profiles it loaded.")
    worker.add_argument("kinds", nargs="+", choices=["edit", "animate"], metavar="{edit,animate}",
                        help="which tasks this worker serves (both: one process for the whole chain)")
    worker.add_argument("--gpu", type=int, default=None, help="GPU index (sets CUDA_VISIBLE_DEVICES)")
    worker.add_argument("--profile", default=None, help="edit profile to load (default from config)")
    worker.add_argument("--video-profile", dest="video_profile", default=None,
                        help="video profile to load (default from config)")
    worker.set_defaults(handler=_worker, model=None)

    board = sub.add_parser("storyboard", help="edit and animate a storyboard of scenes, stitched into one video",
                           description=Storyboard.__doc__)
    board.add_argument("file", metavar="FILE.yaml", help="storyboard: reference (optional), scenes, num_frames, fps")
    board.add_argument("--image", help="the person's photo (overrides the file's reference)")
    board.add_argument("--storage", help="where the run is written (default ./artifacts)")
    board.add_argument("--profile", help="edit model profile")
    board.add_argument("--video-profile", dest="video_profile", help="video model profile")
    board.add_argument("--json", action="store_true", help="print the manifest as JSON")
    board.set_defaults(handler=_storyboard, model=Storyboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Offline by design: no usage telemetry from the embedded Prefect server.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ValidationError as exc:
        print(f"recast {args.command}: {describe_validation_error(args.model, exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (BadInput, ConfigError) as exc:
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


if __name__ == "__main__":
    sys.exit(main())
