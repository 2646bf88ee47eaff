"""`recast gallery`: the runs, their edits, clips and identity, in a browser; read-only, over the storage roots.

    /                                   runs, newest first (?status=succeeded to filter): status, when, themes,
                                        the best grade, the clip's grade
    /runs/<root>/<run id>               one run: the reference photo, every edit with its grade, score, seed and
                                        seconds, the contact sheet, the clip playing in the page, the identity
                                        drift strip, a storyboard's scenes and stitched video, the manifest
    /files/<root>/<run id>/<path>       a file of that run, with byte ranges (a video seeks)

<root> is the index of a configured storage root (file, s3, gs, memory: fsspec, through recast.tasks.storage), so
no URL carries a URI. Only files inside a run folder are served, as opened (a link that leads out of the run is
refused: recast.tasks.storage.open_checked), never its .jobs/; anything else is a 404 and reads nothing. Files are
streamed in chunks, never whole in memory. It writes nothing. Bound to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from recast.tasks import storage
from recast.tasks.errors import BadInput

CHUNK = 2**20
MEDIA = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
         ".mp4": "video/mp4", ".json": "application/json"}
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class Run:
    root: int
    run_id: str
    folder: str
    manifest: dict | None

    @property
    def status(self) -> str:
        return (self.manifest or {}).get("status", "running or stopped (no manifest yet)")

    @property
    def kind(self) -> str:
        manifest = self.manifest or {}
        return manifest.get("kind") or ("edit" if "edits" in manifest else "run")

    def file(self, uri: str | None) -> str | None:
        """The run-relative path of a URI the manifest names, when it lies in this run's folder."""
        if not uri:
            return None
        prefix = self.folder.rstrip("/") + "/"
        normal = storage.normalize_uri(uri)
        return normal[len(prefix):] if normal.startswith(prefix) else None


def load_run(roots: list[str], root: int, run_id: str) -> Run:
    """A run by root index and id; BadInput (a 404) for anything that is not one."""
    if not 0 <= root < len(roots):
        raise BadInput("root", root, "no such storage root", "pick one from the runs page")
    layout = storage.RunLayout(roots[root], storage.check_run_id("run", run_id))
    manifest = None
    if storage.exists(layout.manifest_uri):
        try:
            manifest = storage.read_json_capped("manifest", layout.manifest_uri, roots=[layout.folder])
        except BadInput:
            manifest = None
    elif not storage.exists(layout.folder):
        raise BadInput("run", run_id, "no such run", "pick one from the runs page")
    return Run(root, run_id, layout.folder, manifest)


def summary(run: Run) -> dict:
    """What the runs page shows of a run."""
    manifest = run.manifest or {}
    edits = manifest.get("edits") or []
    grades = [e["identity"]["grade"] for e in edits if e.get("status") == "succeeded" and e.get("identity")]
    order = ["Lost", "Drifted", "Good", "Excellent"]
    best = max((g for g in grades if g in order), key=order.index, default=None)
    clips = (manifest.get("animation") or {}).get("clips") or manifest.get("clips") or []
    clip_grade = next(((c.get("identity") or {}).get("grade") for c in clips if c.get("identity")), None)
    themes = sorted({e["prompt"].split(",")[0].strip() for e in edits} |
                    {s["edit_prompt"].split(",")[0].strip() for s in manifest.get("scenes") or [] if s.get("edit_prompt")})
    return {"root": run.root, "run_id": run.run_id, "status": run.status, "kind": run.kind,
            "when": manifest.get("finished_at") or manifest.get("created_at") or run.run_id,
            "themes": themes, "best_grade": best, "clip_grade": clip_grade}


def page(run: Run) -> dict:
    """What a run's page shows: every picture and clip as a run-relative path."""
    manifest = run.manifest or {}
    inputs = storage.list_files(storage.join(run.folder, "inputs"))
    edits = [dict(e, file=run.file(e.get("output"))) for e in manifest.get("edits") or []]
    clips = [dict(c, file=run.file(c.get("output")), strip=run.file(c.get("identity_strip")),
                  last=run.file(c.get("last_frame")))
             for c in (manifest.get("animation") or {}).get("clips") or manifest.get("clips") or []]
    scenes = [dict(s, clip_file=run.file(s.get("clip"))) for s in manifest.get("scenes") or []]
    return {"run": summary(run), "reference": f"inputs/{inputs[0]}" if inputs else None, "edits": edits,
            "contact_sheet": run.file(manifest.get("contact_sheet")), "clips": clips, "scenes": scenes,
            "stitched": run.file((manifest.get("stitched") or {}).get("output")),
            "manifest": json.dumps(manifest, indent=2) if manifest else None}


def checked_path(path: str) -> str:
    """A run-relative path the gallery may serve: plain names, no '..', no hidden parts (the .jobs/ folder)."""
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or any(p in ("..", ".") or p.startswith(".") for p in parts):
        raise BadInput("path", path, "not a file of the run", "follow the links of the run's page")
    return posixpath.join(*parts)


# --------------------------------------------------------------------------------------------------
# The web application (Starlette, which Prefect's server already brings)


def app(roots: list[str]):
    from jinja2 import DictLoader, Environment, select_autoescape
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    roots = [storage.normalize_uri(root) for root in roots]
    templates = Environment(loader=DictLoader(TEMPLATES), autoescape=select_autoescape(["html"]))

    def not_found(why: str = "not found") -> Response:
        return PlainTextResponse(why, status_code=404)

    async def runs(request):
        wanted = request.query_params.get("status")
        rows = []
        for index, root in enumerate(roots):
            for run_id in storage.run_ids(root):
                row = summary(load_run(roots, index, run_id))
                if not wanted or row["status"] == wanted:
                    rows.append(row)
        rows.sort(key=lambda r: r["run_id"], reverse=True)
        return HTMLResponse(templates.get_template("runs.html").render(rows=rows, roots=roots, wanted=wanted))

    async def run_page(request):
        try:
            run = load_run(roots, int(request.path_params["root"]), request.path_params["run_id"])
        except (BadInput, ValueError):
            return not_found()
        return HTMLResponse(templates.get_template("run.html").render(**page(run), base=f"/files/{run.root}/"
                                                                      f"{run.run_id}"))

    async def file(request):
        try:
            run = load_run(roots, int(request.path_params["root"]), request.path_params["run_id"])
            uri = storage.join(run.folder, checked_path(request.path_params["path"]))
            size = storage.file_size("path", uri, roots=[run.folder])  # checked as opened: links, folders
        except (BadInput, ValueError, OSError):
            return not_found()
        media = MEDIA.get(posixpath.splitext(uri)[1].lower(), "application/octet-stream")
        headers = {"accept-ranges": "bytes", "cache-control": "no-store"}
        wanted = _RANGE.match(request.headers.get("range", ""))
        if not wanted:
            return StreamingResponse(storage.read_range("path", uri, [run.folder], 0, size - 1, CHUNK),
                                     media_type=media, headers=dict(headers, **{"content-length": str(size)}))
        first, last = wanted.groups()
        start = int(first) if first else max(0, size - int(last or 0))
        end = min(int(last), size - 1) if first and last else size - 1
        if start > end or start >= size:
            return Response(status_code=416, headers={"content-range": f"bytes */{size}"})
        return StreamingResponse(storage.read_range("path", uri, [run.folder], start, end, CHUNK), status_code=206,
                                 media_type=media, headers=dict(headers, **{
                                     "content-range": f"bytes {start}-{end}/{size}",
                                     "content-length": str(end - start + 1)}))

    return Starlette(routes=[Route("/", runs), Route("/runs/{root:int}/{run_id}", run_page),
                             Route("/files/{root:int}/{run_id}/{path:path}", file)])


def serve(roots: list[str], host: str = "127.0.0.1", port: int = 4300) -> None:
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"recast gallery: listening on {host}: anyone who can reach this machine on port {port} can see "
              "every run under these roots (no login)", flush=True)
    print(f"recast gallery: http://{'127.0.0.1' if host in ('127.0.0.1', 'localhost') else host}:{port} over "
          f"{', '.join(storage.redact(r) for r in roots)}", flush=True)
    uvicorn.run(app(roots), host=host, port=port, log_level="warning")


STYLE = """<link rel="icon" href="data:,"><style>
body{font-family:system-ui,sans-serif;margin:1.5rem;background:#fafafa;color:#222}
a{color:#1a56b0;text-decoration:none} table{border-collapse:collapse;width:100%}
td,th{padding:.35rem .6rem;border-bottom:1px solid #ddd;text-align:left;font-size:.92rem}
.grid{display:flex;flex-wrap:wrap;gap:1rem} figure{margin:0;background:#fff;padding:.5rem;border:1px solid #ddd}
figure img{max-width:320px;max-height:320px;display:block} figcaption{font-size:.85rem;margin-top:.3rem}
.status{font-weight:600} video{max-width:100%;background:#000} .wide{max-width:100%}
</style>"""

TEMPLATES = {
    "runs.html": """<!doctype html><html><head><meta charset="utf-8"><title>recast runs</title>""" + STYLE + """
</head><body><h1>recast runs</h1>
<p>{{ rows|length }} run(s) under {{ roots|length }} storage root(s).
Filter: <a href="/">all</a>{% for s in ["succeeded", "partial", "failed", "identity_not_met"] %} ·
<a href="/?status={{ s }}">{{ s }}</a>{% endfor %}</p>
<table><tr><th>run</th><th>kind</th><th>status</th><th>when</th><th>themes</th><th>best grade</th>
<th>clip grade</th></tr>
{% for r in rows %}<tr><td><a href="/runs/{{ r.root }}/{{ r.run_id }}">{{ r.run_id }}</a></td><td>{{ r.kind }}</td>
<td class="status">{{ r.status }}</td><td>{{ r.when }}</td><td>{{ r.themes|join("; ") }}</td>
<td>{{ r.best_grade or "-" }}</td><td>{{ r.clip_grade or "-" }}</td></tr>{% endfor %}
</table></body></html>""",
    "run.html": """<!doctype html><html><head><meta charset="utf-8"><title>recast {{ run.run_id }}</title>""" + STYLE + """
</head><body><p><a href="/">&larr; all runs</a></p>
<h1>{{ run.run_id }} <small class="status">{{ run.status }}</small></h1>
<div class="grid">
{% if reference %}<figure><img src="{{ base }}/{{ reference }}" alt="reference"><figcaption>reference</figcaption>
</figure>{% endif %}
{% for e in edits %}<figure>{% if e.file %}<img src="{{ base }}/{{ e.file }}" alt="{{ e.edit_id }}">{% endif %}
<figcaption><b>{{ e.prompt.split(",")[0] }}</b><br>{{ e.status }} · identity {{ e.identity.grade or "-" }}
{% if e.identity.score is not none %}({{ "%.3f"|format(e.identity.score) }}){% endif %} · seed {{ e.seed }}
{% if e.seconds %}· {{ "%.2f"|format(e.seconds) }} s{% endif %}{% if e.error %}<br>{{ e.error }}{% endif %}
</figcaption></figure>{% endfor %}
</div>
{% if contact_sheet %}<h2>contact sheet</h2><img class="wide" src="{{ base }}/{{ contact_sheet }}" alt="contact sheet">
{% endif %}
{% for c in clips %}<h2>clip {{ c.clip_id }}</h2>{% if c.file %}<video controls preload="metadata"
src="{{ base }}/{{ c.file }}"></video>{% endif %}
<p>{{ c.num_frames }} frames at {{ c.fps }} fps, {{ c.width }}x{{ c.height }}{% if c.seed is not none %}, seed
{{ c.seed }}{% endif %}{% if c.seconds %}, {{ "%.2f"|format(c.seconds) }} s{% endif %}{% if c.identity %},
identity {{ c.identity.grade }}{% endif %}{% if c.error %}: {{ c.error }}{% endif %}</p>
{% if c.strip %}<img class="wide" src="{{ base }}/{{ c.strip }}" alt="identity drift">{% endif %}{% endfor %}
{% if scenes %}<h2>scenes</h2><table><tr><th>scene</th><th>from</th><th>status</th><th>prompts</th><th>clip</th></tr>
{% for s in scenes %}<tr><td>{{ s.scene }}</td><td>{{ s.source }}</td><td>{{ s.status }}{% if s.reason %}:
{{ s.reason }}{% endif %}</td><td>{{ s.edit_prompt or "" }} / {{ s.motion_prompt }}</td><td>{% if s.clip_file %}
<video controls preload="metadata" width="240" src="{{ base }}/{{ s.clip_file }}"></video>{% endif %}</td></tr>
{% endfor %}</table>{% endif %}
{% if stitched %}<h2>storyboard</h2><video controls preload="metadata" src="{{ base }}/{{ stitched }}"></video>
{% endif %}
{% if manifest %}<details><summary>manifest.json</summary><pre>{{ manifest }}</pre></details>{% endif %}
</body></html>""",
}
