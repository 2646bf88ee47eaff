"""The cold-start and stream benchmarks' code paths on the CPU (tiny models): what the GPU runs measure, run here
so a benchmark call never fails on a path nobody ran. The numbers mean nothing on tiny models; the rows' shape,
and what the paths did, do."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cold_start_benchmark_starts_from_the_hub_layout_then_prepared_weights(tmp_path):
    results = tmp_path / "rows.jsonl"
    scenarios = "hub,prepared,restart,respawn,restart@shards,restart@no-readahead"
    proc = subprocess.run([sys.executable, "cold_start.py", "--tiny", "--rows", "tiny", "--scenarios", scenarios,
                           "--hub", str(tmp_path / "hub"), "--work", str(tmp_path / "work"), "--results", str(results)],
                          cwd=BENCHMARKS, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["variant"]: row for row in _rows(results)}
    assert set(rows) == set(scenarios.split(",")), rows.keys()
    # what the last start read is read ahead by the next (recast.tasks.models.readahead), unless turned off
    assert rows["restart"]["readahead"]["files"] > 0 and rows["restart@no-readahead"]["readahead"]["files"] == 0, \
        f"a restart must read ahead what the start before it listed, a @no-readahead one nothing: " \
        f"{rows['restart']['readahead']} / {rows['restart@no-readahead']['readahead']}"
    assert rows["restart@shards"]["prepared_reads"] == "shards" and rows["restart"]["prepared_reads"] == "blocks", \
        "a `@shards` scenario must start its worker with prepared_reads: shards, and the others with the default"
    # A serving process started again by the worker's parent has the libraries imported (recast.flows.respawn).
    assert rows["respawn"]["imports_s"] < rows["restart"]["imports_s"], \
        f"the respawned process imported again: {rows['respawn']['imports_s']} s against a restart's " \
        f"{rows['restart']['imports_s']} s"
    imports = rows["restart"]["imports_top_s"]
    assert imports and all(seconds >= 0 for seconds in imports.values()) and \
        sum(imports.values()) <= rows["restart"]["ready_s"], f"the restart's slowest imports are not told: {imports}"
    assert rows["hub"]["prepared"] == {"edit": False, "video": False}, "the first start makes the prepared weights"
    assert rows["prepared"]["prepared"] == {"edit": True, "video": True}, "later starts load them"
    assert rows["hub"]["sources"]["edit"] == str(tmp_path / "hub"), "the first start reads the hub layout"
    for row in rows.values():
        assert row["ready_s"] > 0 and row["first_result_s"] >= row["ready_s"] and row["host_rss_peak_gib"] > 0
    for kind in ("edit", "video"):  # where a prepared start's load went, part by part (the next GPU row needs it)
        parts = rows["prepared"]["phases"][kind]["load_parts"]
        assert {"key", "structure", "read", "weights", "checks", "place", "obtain"} <= set(parts), f"{kind}: {parts}"
        # which phase set the host RSS peak (a `wan22-lightning` start peaked at 9.0 GiB, the cause not seen)
        rss = rows["prepared"]["phases"][kind].get("host_rss_peak_gib") or {}
        assert 0 < rss.get("structure", 0) <= rss.get("weights", 0) <= rss.get("loaded", 0) <= \
            rss.get("warmed_up", 0) <= rows["prepared"]["host_rss_peak_gib"], \
            f"{kind}: the host RSS peak after the structure, the weights, loading and the warm-up is not recorded: {rss}"
    # The structure taken apart: in a new process most of it is importing the classes the configs name, which a
    # respawned process has already (on one H200 a restart's structure took 13.4 s, a respawn's 2.2 s)
    restart, respawn = (rows[name]["phases"]["edit"]["load_parts"] for name in ("restart", "respawn"))
    assert {"structure_imports", "structure_modules", "structure_pipeline", "structure_recipe"} <= set(restart), \
        f"the prepared load's structure is not taken apart: {restart}"
    assert respawn["structure_imports"] < restart["structure_imports"], \
        f"the respawned process imported the model classes again: {respawn} against a restart's {restart}"


def test_stream_benchmark_serves_runs_through_the_deployment_on_one_worker(tmp_path):
    results = tmp_path / "rows.jsonl"
    # Where Debian's PostgreSQL is installed (.ci/run installs it), the server on PostgreSQL too, in the same run.
    databases = ["postgres", "sqlite"] if Path("/usr/lib/postgresql").exists() else ["sqlite"]
    # PostgreSQL runs as the postgres user, which cannot enter pytest's private temporary folders.
    work = Path(tempfile.mkdtemp(prefix="recast-stream-"))
    work.chmod(0o755)
    try:
        proc = subprocess.run([sys.executable, "gpu_stream.py", "--tiny", "--work", str(work), "--clips", "2",
                               "--edits", "2", "--databases", ",".join(databases), "--take-next", "after_gpu,on_gpu",
                               "--results", str(results)],
                              cwd=BENCHMARKS, capture_output=True, text=True, timeout=1200)
        kept_logs = {folder.name: {log.name for log in folder.iterdir()} for folder in (work / "logs").iterdir()} \
            if (work / "logs").is_dir() else {}
        late_imports = [line for log in work.glob("logs/*/flow-worker.log") for line in log.read_text().splitlines()
                        if "modules the fork server had not" in line]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # Each serve's logs stay (the next serve writes the same logs/ folder), the forked runs' server's among them.
    assert set(kept_logs) == {f"{database}-{take_next}-fork" for database in databases
                              for take_next in ("after_gpu", "on_gpu")}, f"each serve's logs were not kept: {kept_logs}"
    assert all({"flow-worker.log", "flow-run-forks.log", "worker.log"} <= logs for logs in kept_logs.values()), \
        kept_logs
    # A forked run imports what the fork server imported for it, not ~190 modules again (its CPU in a burst).
    assert not late_imports, f"forked runs imported what the fork server had not: {late_imports[:2]}"
    rows = {(row["variant"], row["profile"]): row for row in _rows(results)}
    # Flow runs forked from a process that has imported Prefect and the flows (`recast serve`'s default).
    variants = [f"{variant}+forked-runs" for database in databases
                for variant in (database, f"{database}+take-next-on_gpu")]
    assert set(rows) == {(variant, stream) for variant in variants for stream in ("stream-clips", "stream-edits")}, \
        f"one row per database, worker_take_next and stream expected: {sorted(rows)}"
    for row in rows.values():
        assert row["completed"] == row["requests"] == 2, row
        assert row["variant"].startswith(row["database"]) and isinstance(row["server_503s"], int), row
        assert 0 < row["busy_fraction"] < 1 and row["latency_p50_s"] > 0 and row["per_hour"] > 0, row
        # Where a stream's time went when the card waited: each service's CPU seconds, found by its command line.
        assert all(row["cpu_s"][role] > 0 for role in ("server", "flow_runs", "task_worker", "host")), \
            f"the stream's CPU seconds by role were not all found: {row['cpu_s']}"
        # Where the card's idle time went, from each job's timeline: the parts are times, and they add up to the
        # wall time less the model calls' (clocks of one host; the model seconds are timed apart, hence the slack).
        idle = row["idle_s"]
        assert idle is not None and idle["jobs"] == (4 if row["profile"] == "stream-clips" else 2), \
            f"every edit and clip must record when it ran: {idle}"
        parts = [value for key, value in idle.items() if key != "jobs"]
        assert all(value >= -0.05 for value in parts), f"an idle part is negative: {idle}"
        assert abs(sum(parts) - (row["wall_s"] - row["model_seconds"])) < 0.5, \
            f"the idle parts {idle} do not add up to the wall less the model time ({row['wall_s']} - " \
            f"{row['model_seconds']})"
    for variant in variants:
        assert set(rows[variant, "stream-clips"]["worker_cold_start_s"]) == {"edit", "video"}, \
            "one worker serves both stages"


def test_load_rate_benchmark_streams_shards_through_the_loader(tmp_path):
    results = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, "load_rate.py", "--folder", str(tmp_path / "shards"), "--gib", "0.02",
                           "--shard-mib", "4", "--results", str(results)], cwd=BENCHMARKS, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["profile"]: row for row in _rows(results)}
    assert {"read+hash-whole", "read+hash-blocks", "place-pageable"} <= set(rows), rows.keys()
    assert all(row["gb_per_s"] > 0 and row["gib"] > 0 for row in rows.values()), rows


def test_vae_benchmark_times_every_convolution_setting_and_scores_it_against_the_default(tmp_path):
    results = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, "wan_vae.py", "--tiny", "--runs", "1", "--results", str(results)],
                          cwd=BENCHMARKS, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["variant"]: row for row in _rows(results)}
    assert set(rows) == {"default", "benchmark", "channels-last", "both", "fused-norms"}, rows.keys()
    # The fused norms' kernel needs a CUDA card: here diffusers' norms run, and the row says the kernel did not
    assert rows["fused-norms"]["kernel_calls"] == 0 and rows["default"]["kernel_calls"] == 0, rows
    assert all(row["encode_s"] > 0 and row["decode_s"] > 0 for row in rows.values()), rows
    # Layout and algorithm choice must not change the frames beyond float rounding (a wrong layout would)
    assert all(row["rel_l2_vs_default"] < 1e-3 for row in rows.values()), rows


def test_attention_benchmark_measures_what_runs_here_and_says_why_the_rest_cannot(tmp_path):
    """On a CPU the bf16 kernels run and are scored against float32 (their bound must reject an unrelated output);
    the CUDA-only backends (SageAttention, FlashAttention 3) are rows that give diffusers' or recast's reason."""
    results = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, "attention.py", "--tiny", "--device", "cpu", "--check", "--results",
                           str(results)], cwd=BENCHMARKS, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {row["profile"]: row for row in _rows(results)}
    for shape in ("qwen-edit", "wan-480p"):
        native = rows[f"{shape}:native"]
        assert native["rel_l2"] < native["error_bound"] < native["unrelated_rel_l2"], native
        for backend in ("recast-sage", "sage", "_flash_3"):
            assert "not installed" in rows[f"{shape}:{backend}"].get("error", "") or \
                "not usable" in rows[f"{shape}:{backend}"].get("error", ""), rows[f"{shape}:{backend}"]
        for backend in ("fa3-fp8", "fa3-fp8-compiled", "fa3-fp8-kernel"):
            assert "needs a CUDA card" in rows[f"{shape}:{backend}"].get("error", ""), rows[f"{shape}:{backend}"]
    assert rows["qwen-edit:native"]["compiles_fullgraph"] is True, "the compile check did not run on the first shape"


def test_the_vae_probe_says_which_conditioning_latents_depend_on_the_photo():
    """wan_vae.py --photo-dependence (#26: could the 80 zero frames' encode be kept from one clip to the next?):
    every one of the 21 latent frames gets its measured dependence, and the verdict names the independent ones."""
    proc = subprocess.run([sys.executable, "wan_vae.py", "--photo-dependence", "16x16"], cwd=BENCHMARKS,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_frame = [line for line in proc.stdout.splitlines() if line.startswith("  0: ")]
    assert per_frame and per_frame[0].count(": ") == 21, f"one value per latent frame expected: {proc.stdout}"
    assert "latent frames that do not depend on the photo: " in proc.stdout, proc.stdout


def test_the_vision_windows_probe_finds_one_call_the_same_computation_as_transformers_windows():
    """vision_windows.py (#26: the edit's text encoder attends the photo's windows in one call a block): on the
    full-size vision tower with random weights, the two ways agree to float32's rounding, and every distance the
    docs quote (bf16's own error beside the two ways' bf16 distance) is printed."""
    proc = subprocess.run([sys.executable, "vision_windows.py", "--side", "224"], cwd=BENCHMARKS,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["grid_thw"] == [[1, 16, 16]], f"a 224-px photo is 16 x 16 patches (4 windows): {result}"
    assert result["float32_one_call_vs_per_window"] < 1e-4, f"one call computes something else: {result}"
    for key in ("bf16_one_call_vs_per_window", "bf16_vs_float32_per_window", "bf16_per_window_twice"):
        assert isinstance(result.get(key), float), f"{key} missing from the probe's output: {result}"
