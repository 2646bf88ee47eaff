"""The GPU recipes' code paths on the real tiny pipelines (CPU): Wan Lightning's schedule and fused LoRA pair, FP8
experts, per-request LoRAs on quantized layers, the memory policy, a worker's served profiles, and both GPU
benchmarks run end to end on tiny shapes."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recast.tasks.models import kernels, loading, lora, precision, qwen_edit, wan_video
from recast.tasks.schemas.settings import LoraSpec
from recast.tasks.settings import get_settings

REPO = Path(__file__).resolve().parent.parent


def test_wan_lightning_runs_exactly_the_recipes_four_timesteps():
    profile = get_settings().get_video_profile("wan22-lightning")
    scheduler = wan_video.make_scheduler(profile.scheduler, None)
    scheduler.set_timesteps(4, device="cpu")  # what WanImageToVideoPipeline asks for
    timesteps = scheduler.timesteps.tolist()
    assert timesteps == pytest.approx([1000.0, 937.5, 833.333, 625.0], abs=0.01), \
        f"Lightning needs timesteps [1000, 937.5, 833.3, 625], the scheduler gives {timesteps}"
    boundary = 0.9 * scheduler.config.num_train_timesteps  # Wan 2.2's boundary_ratio
    assert [t >= boundary for t in timesteps] == [True, True, False, False], \
        "two steps must run on the high-noise expert and two on the low-noise one"
    assert (profile.steps, profile.guidance_scale) == (4, 1.0), "Lightning runs 4 steps with CFG off"
    with pytest.raises(ValueError, match="exactly 4 steps"):
        scheduler.set_timesteps(8, device="cpu")


def _random_wan_lora(expert, path: Path, seed: int) -> LoraSpec:
    from diffusers import WanImageToVideoPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    expert.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                  target_modules=["attn1.to_q", "attn1.to_v", "ffn.net.2"]), adapter_name="t")
    state = get_peft_model_state_dict(expert, adapter_name="t")
    expert.delete_adapters("t")
    path.mkdir(parents=True, exist_ok=True)
    WanImageToVideoPipeline.save_lora_weights(str(path), transformer_lora_layers=state, safe_serialization=True)
    return LoraSpec(source=str(path / "pytorch_lora_weights.safetensors"))


def _clip(pipe, profile) -> np.ndarray:
    loaded = loading.install("video", profile, pipe, "test")
    try:
        image = Image.new("RGB", (48, 32), (120, 90, 60))
        return wan_video.run_video(loaded, image, prompt="he smiles", negative_prompt="", seed=3, steps=4,
                                   guidance_scale=1.0, num_frames=5, width=48, height=32, max_sequence_length=16)
    finally:
        loading.clear_cache()


def test_wan_lightning_recipe_fuses_one_lora_per_expert_and_runs_fp8_experts(tmp_path):
    from diffusers import WanImageToVideoPipeline

    source = loading.check_available(get_settings().get_video_profile("tiny"))
    load = lambda: WanImageToVideoPipeline.from_pretrained(source, dtype=torch.float32)  # noqa: E731
    lightning = get_settings().get_video_profile("wan22-lightning")
    base = get_settings().get_video_profile("tiny").model_copy(update=dict(
        name="tiny-lightning", quantize="fp8", quantize_text_encoder=True, scheduler=lightning.scheduler,
        steps=4, guidance_scale=1.0))
    donor = load()
    pair = _random_wan_lora(donor.transformer, tmp_path / "high", 1), _random_wan_lora(donor.transformer_2,
                                                                                        tmp_path / "low", 2)
    fused_profile = base.model_copy(update=dict(lightning=pair[0], lightning_2=pair[1]))

    pipe = load()
    decisions = wan_video.prepare(pipe, fused_profile)
    linears = [m for expert in (pipe.transformer, pipe.transformer_2) for m in expert.blocks.modules()
               if isinstance(m, (torch.nn.Linear, precision.Float8Linear))]
    assert linears and all(isinstance(m, precision.Float8Linear) for m in linears), "both experts' blocks run FP8"
    assert decisions["quantized_linears"] > len(linears), "the UMT5 encoder is quantized too"
    assert all(not isinstance(block.layer[1].DenseReluDense.wo, precision.Float8Linear)
               for block in pipe.text_encoder.encoder.block), "UMT5's wo keeps its precision"
    fused = _clip(pipe, fused_profile)

    plain = load()
    wan_video.prepare(plain, base)
    unfused = _clip(plain, base)
    assert fused.shape == (5, 32, 48, 3) and fused.dtype == np.uint8
    assert not np.array_equal(fused, unfused), "the fused Lightning pair must change the clip"


@pytest.mark.parametrize("scheme", ["int4", "fp8"])
def test_per_request_lora_on_quantized_layers_changes_the_output_and_restores_it_exactly(scheme, tmp_path,
                                                                                          astronaut):
    from recast.tasks.schemas.requests import LoraRef

    profile = get_settings().get_profile("tiny").model_copy(update=dict(name=f"tiny-{scheme}", quantize=scheme))
    loaded, _ = loading.get_pipeline("edit", profile)
    layers = [m for m in loaded.pipe.transformer.transformer_blocks.modules()
              if isinstance(m, (precision.Int4Linear, precision.Float8Linear))]
    assert layers, f"the {scheme} profile quantized nothing"
    weights = {id(m): (m.weight_packed if scheme == "int4" else m.weight).clone() for m in layers}
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, module in loaded.pipe.transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_v")):
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=generator)
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=generator)
    save_file(state, str(tmp_path / "adapter.safetensors"))
    adapter = lora.check_lora_file("loras[0].source", LoraRef(source=str(tmp_path / "adapter.safetensors")))

    image = Image.open(astronaut).convert("RGB").resize((64, 64))

    def edit(loras=()):
        out = qwen_edit.run_edit(loaded, profile, [image], prompt="a tuxedo", negative_prompt=" ", seed=1, steps=2,
                                 true_cfg_scale=4.0, width=64, height=64, loras=loras)
        return np.asarray(out)

    try:
        base = edit()
        with_lora = edit([adapter])
        assert not np.array_equal(base, with_lora), f"a LoRA on {scheme} layers must change the output"
        assert np.array_equal(edit(), base), "without the LoRA the base output must come back bit for bit"
        assert np.array_equal(edit([adapter.model_copy(update=dict(weight=0.0))]), base), "weight 0 is the base"
        for module in layers:
            kept = module.weight_packed if scheme == "int4" else module.weight
            assert torch.equal(kept, weights[id(module)]), "the quantized weights must stay untouched"
    finally:
        loading.clear_cache()


def _tiny(kind):
    settings = get_settings()
    return settings.get_profile("tiny") if kind == "edit" else settings.get_video_profile("tiny")


def test_memory_policy_keeps_both_pipelines_when_they_fit(monkeypatch):
    loading.clear_cache()
    monkeypatch.setenv("RECAST_DEVICE_MEMORY_GIB", "{cpu: 64}")
    loading.get_pipeline("edit", _tiny("edit"))
    loading.get_pipeline("video", _tiny("video"))
    kinds = sorted(p.key.kind for p in loading.cached_pipelines())
    assert kinds == ["edit", "video"], f"both fit, both must stay loaded; loaded: {kinds}"
    loading.clear_cache()


def test_memory_policy_releases_the_idle_pipeline_when_both_do_not_fit(monkeypatch):
    loading.clear_cache()
    edit, video = _tiny("edit"), _tiny("video")
    loaded_edit, _ = loading.get_pipeline("edit", edit)
    held = loaded_edit.resident_gib
    assert held > 0, "the loader must know how much the pipeline holds"
    # A card with room for one of them only.
    monkeypatch.setenv("RECAST_DEVICE_MEMORY_GIB", f"{{cpu: {held * 1.5}}}")
    video = video.model_copy(update=dict(memory_gib=held))
    pipe_ref = weakref.ref(loaded_edit.pipe)
    loaded_video, _ = loading.get_pipeline("video", video)
    gc.collect()
    assert [p.key.kind for p in loading.cached_pipelines()] == ["video"], "the idle edit pipeline must be released"
    assert pipe_ref() is None, "the released pipeline must really be freed, not just forgotten"
    # Room for the edit model, not for both.
    monkeypatch.setenv("RECAST_DEVICE_MEMORY_GIB", f"{{cpu: {held + loaded_video.resident_gib / 2}}}")
    again, hit = loading.get_pipeline("edit", edit.model_copy(update=dict(memory_gib=held)))
    assert not hit and [p.key.kind for p in loading.cached_pipelines()] == ["edit"], \
        "loading the edit model again releases the video one: never both on the card"
    loading.clear_cache()


def test_a_worker_refuses_profiles_it_was_not_started_with():
    loading.serve_only({("edit", "tiny")})
    try:
        with pytest.raises(loading.ProfileNotServed, match="serves edit tiny, not edit profile 'bf16'"):
            loading.get_pipeline("edit", get_settings().get_profile("bf16"))
        assert not loading.cached_pipelines() or all(p.key.profile == "tiny" for p in loading.cached_pipelines())
    finally:
        loading.serve_only(None)


def test_video_benchmark_runs_every_row_and_the_chain_on_tiny_models(tmp_path, api_server):
    out = tmp_path / "performance.json"
    # The chain row runs the flows: on the session's server (a temporary one would cost seconds).
    proc = subprocess.run([sys.executable, "gpu_video.py", "--tiny", "--device", "cpu", "--out", str(out)],
                          cwd=REPO / "benchmarks", capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PREFECT_API_URL=api_server))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {r["profile"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"wan-diffusers-baseline", "wan22-fp8", "wan22-lightning", "wan22-offload",
                         "chain-lightning"}, sorted(rows)
    for name, row in rows.items():
        assert "error" not in row and row["finite"], f"{name}: {row.get('error')}"
        assert row["num_frames"] == 9 and row["stage"] in ("video", "chain") and row["gpus"] == 1
    chain = rows["chain-lightning"]
    assert (chain["status"], chain["video_status"]) == ("succeeded", "succeeded"), chain
    assert sorted(chain["pipelines_loaded"]) == ["edit:lightning", "video:wan22-lightning"], \
        "in one process, the memory policy keeps both pipelines when they fit"
    assert rows["wan22-lightning"]["steps"] == 4 and rows["wan22-lightning"]["unrelated_psnr_db"] is not None
    split = chain["split_s"]
    assert split["run_video"] > 0 and split["run_edit"] > 0 and split["artifacts"] > 0 \
        and split["flows_and_prefect"] > 0, f"the chain's time split misses a part: {split}"
    assert split.get("mp4_bytes_overlapped", 0) > 0 and split["mp4_bytes"] == 0, \
        f"the mp4 should be encoded beside the decode, off the chain's critical path: {split}"
    tail = split.pop("mp4_tail", None)
    assert tail and tail["close"] > 0 and tail["after_close"] >= 0, \
        f"the mp4's tail is not taken apart (when its last frame reached x264, its close): {split}"
    edit_parts = split.pop("edit_parts", None)
    assert edit_parts and edit_parts["transformer_calls"] >= 1 and edit_parts["transformer"] > 0 \
        and edit_parts["text_encoder"] > 0 and edit_parts["vae_decode"] > 0 and edit_parts["other"] >= 0, \
        f"the chain's edit call is not taken apart (text encoder, transformer, VAE, the pipeline's own work): {split}"
    assert edit_parts["total"] <= split["run_edit"] + 0.01, \
        f"the edit's parts were timed outside the chain's run_edit: {edit_parts} against {split['run_edit']}"
    host = edit_parts.get("host") or {}
    assert host.get("call_thread_cpu_s", 0) > 0 and host.get("other_threads_cpu_s", -1) >= 0 \
        and host.get("gc_s", -1) >= 0 and host.get("gc_collections", -1) >= 0, \
        f"what the process did during the chain's edit (its thread's CPU, the others', garbage collections) is " \
        f"not recorded: {edit_parts}"
    parts = sum(v for k, v in split.items() if k != "total" and not k.endswith("_overlapped"))
    assert abs(parts - split["total"]) < 0.01, f"the parts of the chain's split do not add up to its total: {split}"
    assert 0 < chain["non_model_s"] < chain["seconds"], f"the chain's time beside its model calls: {chain}"


def test_video_benchmark_rows_split_over_processes_still_compare_with_the_baseline(tmp_path):
    # The 40-step rows take minutes each on a GPU: a run is split into one command per row, and the later row
    # must still get its PSNR against the earlier process's clip and its ratio to that baseline.
    out, refs = tmp_path / "performance.json", tmp_path / "references"
    for row in ("wan-diffusers-baseline", "wan22-fp8"):
        proc = subprocess.run([sys.executable, "gpu_video.py", "--tiny", "--device", "cpu", "--rows", row, "--out",
                               str(out), "--references", str(refs), "--check"], cwd=REPO / "benchmarks",
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["profile"]: r for r in json.loads(out.read_text())}
    fp8, base = rows["wan22-fp8"], rows["wan-diffusers-baseline"]
    assert fp8["psnr_db"] is not None and fp8["psnr_db"] > 30, f"no comparison with the earlier baseline: {fp8}"
    assert fp8["ratio_to_baseline"] == round(fp8["seconds"] / base["seconds"], 3), (fp8, base["seconds"])
    # wan22-fp8's quality bound is on one transformer pass on the baseline's own inputs; other inputs must fail it.
    bound = fp8["pass_bound"]
    assert fp8["pass_rel_l2"] is not None and fp8["pass_rel_l2"] < bound, f"FP8 pass strays from bf16: {fp8}"
    assert fp8["unrelated_pass_rel_l2"] > bound, f"the per-pass bound would not catch a wrong output: {fp8}"


def test_multi_gpu_benchmark_runs_teams_and_compares_them_with_one_gpu(tmp_path):
    # On the CPU (gloo): a 1-rank and a 2-rank team, each running two rows in one process (a new team per row),
    # and bf16 on 1 rank a second time beside the first (a repeat: how far two processes differ on their own).
    # Two calls on one results folder, as a device's 10-minute commands split a run: the second call's teams are
    # compared with the first call's 1-GPU rows, and each row keeps the call that measured it.
    out = tmp_path / "performance.json"
    plans = ["0:bf16,wan22;1:bf16", "0,1:bf16,wan22,wan22+whole-vae"]
    for plan in plans:
        proc = subprocess.run([sys.executable, "gpu_parallel.py", "--tiny", "--device", "cpu", "--runs", "1",
                               "--plan", plan, "--results", str(tmp_path / "ranks"), "--out", str(out)],
                              cwd=REPO / "benchmarks", capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert str(tmp_path) not in out.read_text(), "a row records a path of the machine it ran on"
    rows = {(r["profile"], r["gpus"]): r for r in json.loads(out.read_text()) if not r.get("variant")}
    variants = [r for r in json.loads(out.read_text()) if r.get("variant")]
    assert [(r["label"], r["one_gpu_seconds"]) for r in variants] == \
        [("wan22-cfg-parallel-whole-vae", rows[("wan22", 1)]["seconds"])], \
        f"the +whole-vae row must be a row of its own, compared with the same 1-GPU row: {variants}"
    for key, row in rows.items():
        plan = plans[0] if key[1] == 1 else plans[1]
        assert row["run"]["plan"] == plan, f"{key} claims the call {row['run']['command']!r}, not its own ({plan})"
    assert set(rows) == {("bf16", 1), ("bf16", 2), ("wan22", 1), ("wan22", 2)}, sorted(rows)
    edit, clip = rows[("bf16", 2)], rows[("wan22", 2)]
    assert edit["label"] == "bf16-cfg-parallel" and edit["cfg_degree"] == 2 and edit["table"] == "scale", edit
    assert edit["psnr_db"] == float("inf"), "CFG-parallel must give the one-GPU edit exactly"
    assert clip["psnr_db"] is not None and clip["psnr_db"] > 60, f"CFG-parallel clip strays from one GPU: {clip}"
    assert edit["speedup"] > 0 and clip["one_gpu_seconds"] == rows[("wan22", 1)]["seconds"]
    repeat = rows[("bf16", 1)]
    assert repeat.get("repeat_psnr_db") == float("inf") and repeat["repeat_seconds"] > 0, \
        f"the repeated 1-GPU row must be folded into the first, with the two processes' outputs compared: {repeat}"


def test_multi_gpu_benchmark_fails_when_a_rank_dies_before_its_row(tmp_path):
    # A rank that dies before writing its row (here: recast refuses a misspelt setting at start-up) must not
    # leave a run that reports success with rows missing.
    env = dict(os.environ, RECAST_NOT_A_SETTING="1")
    proc = subprocess.run([sys.executable, "gpu_parallel.py", "--tiny", "--device", "cpu", "--runs", "1",
                           "--plan", "0:bf16", "--results", str(tmp_path / "ranks"), "--out",
                           str(tmp_path / "p.json")], cwd=REPO / "benchmarks", capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 1, f"a run with a dead rank exited {proc.returncode}: {proc.stdout[-1500:]}"
    assert "1 of the 1 planned rows wrote nothing" in proc.stdout, proc.stdout[-1500:]


def test_multi_gpu_benchmark_refuses_an_unknown_row_variant_before_it_writes(tmp_path):
    proc = subprocess.run([sys.executable, "gpu_parallel.py", "--tiny", "--device", "cpu", "--plan", "0:wan22+whole",
                           "--results", str(tmp_path / "ranks")], cwd=REPO / "benchmarks", capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "'+whole-vae'" in proc.stderr, proc.stdout[-1000:] + proc.stderr[-1000:]
    assert not (tmp_path / "ranks").exists(), "a refused plan wrote its results folder"


def test_clip_frames_are_the_values_diffusers_gives(tmp_path):
    # run_video turns frames into uint8 on the device; they must equal diffusers' own "np" output, scaled.
    profile = get_settings().get_video_profile("tiny")
    loaded, _ = loading.get_pipeline("video", profile)
    image = Image.new("RGB", (64, 48), (120, 60, 30))
    ours = wan_video.run_video(loaded, image, prompt="a", negative_prompt="", seed=3, steps=2, guidance_scale=3.0,
                               num_frames=9, width=64, height=48, max_sequence_length=profile.max_sequence_length)
    theirs = loaded.pipe(image=image, prompt="a", negative_prompt="", height=48, width=64, num_frames=9,
                         num_inference_steps=2, guidance_scale=3.0, max_sequence_length=profile.max_sequence_length,
                         generator=torch.Generator().manual_seed(3), output_type="np").frames[0]
    assert ours.dtype == np.uint8 and ours.shape == (9, 48, 64, 3), (ours.dtype, ours.shape)
    assert np.array_equal(ours, (np.clip(theirs, 0, 1) * 255).round().astype(np.uint8)), \
        "the clip's frames differ from diffusers' output"


def _load_with_attention_warnings(kind: str, profile, caplog):
    """A fresh load of the profile's pipeline, and the attention-backend warnings it logged."""
    loading.clear_cache()
    with caplog.at_level("WARNING", logger="recast.models"):
        caplog.clear()
        loaded, _ = loading.get_pipeline(kind, profile)
    return loaded, [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]


def test_a_video_profiles_attention_backend_reaches_both_experts_and_falls_back_once(caplog):
    """`attention_backend` on a video profile: SageAttention cannot run on this CPU, so both experts fall back to
    native SDPA, said in one warning line, and the clip is the native backend's, frame for frame."""
    base = get_settings().get_video_profile("tiny")
    image = Image.new("RGB", (64, 48), (120, 60, 30))
    clips = {}
    for backend in ("sage", "native"):
        profile = base.model_copy(update={"attention_backend": backend})
        loaded, warnings = _load_with_attention_warnings("video", profile, caplog)
        assert len(warnings) == (1 if backend == "sage" else 0), f"{backend}: {warnings}"
        for expert in wan_video.experts(loaded.pipe):
            processor = expert.blocks[0].attn1.processor
            assert getattr(processor, "_attention_backend", None) == "native", \
                f"{backend}: an expert runs {getattr(processor, '_attention_backend', None)}, not native SDPA"
        clips[backend] = wan_video.run_video(loaded, image, prompt="a", negative_prompt="", seed=3, steps=2,
                                             guidance_scale=3.0, num_frames=5, width=64, height=48,
                                             max_sequence_length=profile.max_sequence_length)
    loading.clear_cache()
    assert np.array_equal(clips["sage"], clips["native"]), "the fallback must be the native backend's computation"


def test_an_attention_preference_list_takes_the_first_backend_this_machine_can_run(caplog):
    """`wan22-fp8` and `wan22-lightning` name `fa3-fp8,sage`: FlashAttention-3 where it runs, else SageAttention, else
    SDPA. On this CPU neither runs: one warning line names both and why, and both experts run native SDPA. A list
    whose later entry runs here (`fa3-fp8,_native_math`) takes it, and the warning names what was skipped and what
    is used."""
    base = get_settings().get_video_profile("tiny")
    shipped = {name: get_settings().get_video_profile(name).attention_backend for name in ("wan22-fp8", "wan22-lightning")}
    assert set(shipped.values()) == {"fa3-fp8,sage"}, f"the Wan profiles' measured preference changed: {shipped}"
    for backend, used in (("fa3-fp8,sage", "native"), ("fa3-fp8, _native_math", "_native_math")):
        loaded, warnings = _load_with_attention_warnings("video", base.model_copy(update={"attention_backend": backend}),
                                                         caplog)
        assert len(warnings) == 1 and "\n" not in warnings[0], f"{backend}: not one warning line: {warnings}"
        skipped = ["fa3-fp8", "sage"] if used == "native" else ["fa3-fp8"]
        assert all(f"{name} is not usable here (it needs a CUDA card)" in warnings[0] for name in skipped), \
            f"{backend}: the warning does not say what was skipped and why: {warnings[0]}"
        assert warnings[0].endswith("native bf16 SDPA" if used == "native" else f"using {used}"), \
            f"{backend}: the warning does not say what runs instead: {warnings[0]}"
        for expert in wan_video.experts(loaded.pipe):
            processor = expert.blocks[0].attn1.processor
            assert getattr(processor, "_attention_backend", None) == used, \
                f"{backend}: an expert runs {getattr(processor, '_attention_backend', None)}, not {used}"
    loading.clear_cache()


def test_edit_benchmark_checks_per_request_loras_on_quantized_profiles(tmp_path):
    # lightning covers the LoRA check on FP8 layers and the few-step reference; int4 is covered above on CPU.
    proc = subprocess.run([sys.executable, "gpu_edit.py", "--tiny", "--device", "cpu", "--check", "--runs", "1",
                           "--profiles", "lightning", "--out", str(tmp_path / "p.json"), "--trace", str(tmp_path / "trace")],
                          cwd=REPO / "benchmarks", capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = {r["profile"]: r for r in json.loads((tmp_path / "p.json").read_text())}
    # --trace: each row's kernel table on disk and its top kernels in the row (where a pass's time goes)
    for name, row in rows.items():
        assert "Self CPU" in (tmp_path / "trace" / f"{name}.txt").read_text(), f"{name}: no kernel table written"
        top = row.get("trace_top") or []
        assert top and all(k["ms"] > 0 and k["calls"] > 0 and k["name"] for k in top), f"{name}: trace_top {top}"
        assert [k["ms"] for k in top] == sorted((k["ms"] for k in top), reverse=True), f"{name}: not by time: {top}"
    for name in ("lightning",):
        assert rows[name]["lora_changes_output"] and rows[name]["lora_restores_base"], rows[name]
        assert rows[name]["psnr_db"] is not None
    assert rows["diffusers-baseline"]["unrelated_psnr_db"] is not None


def test_each_wan_expert_gets_its_own_lightning_lora_at_its_scale(tmp_path):
    """The high-noise file goes into `transformer`, the low-noise one into `transformer_2`: each expert's weights
    move by exactly its own file's low-rank delta (scale 1: these files carry no alpha and the spec names none)."""
    from diffusers import WanImageToVideoPipeline
    from safetensors.torch import load_file

    source = loading.check_available(get_settings().get_video_profile("tiny"))
    load = lambda: WanImageToVideoPipeline.from_pretrained(source, dtype=torch.float32)  # noqa: E731
    donor = load()
    high = _random_wan_lora(donor.transformer, tmp_path / "high", 1)
    low = _random_wan_lora(donor.transformer_2, tmp_path / "low", 2)
    base, fused = load(), load()
    profile = get_settings().get_video_profile("tiny").model_copy(update=dict(lightning=high, lightning_2=low))
    wan_video.transform_weights(fused, profile)
    for expert, spec in (("transformer", high), ("transformer_2", low)):
        state = load_file(spec.source)
        key = next(k for k in state if k.endswith("blocks.0.attn1.to_q.lora_A.weight"))
        delta = state[key.replace("lora_A", "lora_B")] @ state[key]
        moved = getattr(fused, expert).blocks[0].attn1.to_q.weight - getattr(base, expert).blocks[0].attn1.to_q.weight
        assert torch.allclose(moved, delta, atol=1e-5), f"{expert} did not get {Path(spec.source).parent.name}'s delta"


def test_an_attention_backend_this_machine_cannot_run_falls_back_to_sdpa_with_one_warning(caplog, astronaut):
    """A profile naming SageAttention (a CUDA kernel, optional package) still runs on a CPU: one warning line that
    names the backend and why, then the same image as the native bf16 SDPA backend gives."""
    from PIL import Image

    from recast.tasks.models import loading, qwen_edit
    from recast.tasks.settings import get_settings

    tiny = get_settings().get_profile("tiny")
    shipped = {name: get_settings().get_profile(name).attention_backend for name in ("fp8", "lightning")}
    assert set(shipped.values()) == {"_flash_3,sage"}, f"the edit profiles' measured preference changed: {shipped}"
    images = {}
    for backend in ("sage", "fa3-fp8", "_flash_3,sage", "native"):
        profile = tiny.model_copy(update={"attention_backend": backend})
        loaded, warnings = _load_with_attention_warnings("edit", profile, caplog)
        if backend != "native":
            assert len(warnings) == 1 and "native" in warnings[0], warnings
            assert all(f"{name} is not usable here" in warnings[0] for name in backend.split(",")), warnings
            assert "\n" not in warnings[0], "the fallback is said in one line"
        else:
            assert not warnings, warnings
        with Image.open(astronaut) as photo:
            out = qwen_edit.run_edit(loaded, profile, [photo.convert("RGB")], prompt="Neo, black trench coat",
                                     negative_prompt=" ", seed=3, steps=2, true_cfg_scale=4.0, width=64, height=64)
        images[backend] = out.tobytes() if hasattr(out, "tobytes") else out[0].tobytes()
    loading.clear_cache()
    assert images["sage"] == images["fa3-fp8"] == images["_flash_3,sage"] == images["native"], \
        "the fallback must be the native backend's computation"


def test_flash_attention_3_is_skipped_on_a_card_it_cannot_run_on(monkeypatch):
    """FlashAttention-3's hopper/ package imports on any machine it was installed on, but its kernels run only on
    sm90: on another card both its bf16 backend (`_flash_3`, the edit profiles' first choice) and recast's FP8 forward
    are skipped with the reason, before a worker warms up, instead of failing at the first attention."""
    import types

    hopper_package = types.ModuleType("flash_attn_interface")
    hopper_package.flash_attn_func = lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, "flash_attn_interface", hopper_package)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))

    class Transformer:  # set_attention_backend must not be reached on this card
        def set_attention_backend(self, name):
            raise AssertionError(f"{name} was set on an sm80 card")

    for backend in ("_flash_3", "fa3-fp8"):
        name, reason = kernels._try_attention_backend(Transformer(), backend, "cuda")
        assert name == backend and reason and "Hopper (sm90)" in reason and "sm80" in reason, \
            f"{backend} on an sm80 card: {reason!r}"


def test_a_backend_that_cannot_split_across_a_team_is_skipped_not_fatal(caplog):
    """A multi-GPU team turns on Ulysses (diffusers' context parallelism) before the profile's attention backend is
    set, and diffusers refuses a backend that cannot split with an error: FA3 in bf16, the edit profiles' first
    choice, is one. It is skipped with that reason and the list goes on, as for a missing package. (The CPU cannot run
    the team's all-to-all, so the split is marked on the processors as enable_parallelism leaves it; `_native_math`,
    which runs here and cannot split either, stands for FA3.)"""
    model = _tiny_wan(8, layers=1, dtype=torch.float32)
    for module in model.modules():
        if getattr(module, "processor", None) is not None:
            module.processor._parallel_config = object()
    with caplog.at_level("WARNING", logger="recast.models"):
        caplog.clear()
        used = kernels.use_attention_backend(model, "_native_math,native", "cpu")
    said = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert used == "native", f"a team's load took {used!r}, not the next backend in the list"
    assert len(said) == 1 and "_native_math is not usable here (it cannot split attention across a team's GPUs" \
        in said[0], f"the skip is not said with its reason: {said}"
    assert model.blocks[0].attn1.processor._attention_backend == "native"


def test_the_fp8_attention_takes_the_keys_and_values_mean_out_before_the_cast():
    """Real models' keys and values carry a large mean over the tokens; cast to e4m3 as they are, that mean takes the
    3 mantissa bits and the differences between tokens (what attention computes) are lost. `fa3_fp8_attention`
    takes the means out first (exact: the softmax cancels K's, V's is added back), so with means 20x the spread its
    error stays that of centred inputs, where the plain cast's grows several-fold. The kernel is stood in by what it
    computes on its e4m3 inputs (their values times their descales, then float32 attention)."""
    from recast.tasks.models import kernels

    def dequantized_attention(q8, k8, v8, q_descale, k_descale, v_descale, scale):
        q, k, v = (t.float() * d[:, None, :, None] for t, d in ((q8, q_descale), (k8, k_descale), (v8, v_descale)))
        return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                                scale=scale).transpose(1, 2)

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 256, 2, 128, generator=generator) for _ in range(3))
    k, v = k + 20 * torch.randn(1, 1, 2, 128, generator=generator), v + 20 * torch.randn(1, 1, 2, 128,
                                                                                         generator=generator)
    reference = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    reference = reference.transpose(1, 2)

    def error(out):
        # against the attention's own variation: the mean of V, which every output row carries, is not the signal
        centred = reference - reference.mean(dim=1, keepdim=True)
        return float((out.float() - reference).norm() / centred.norm())

    kernels._FA3_FP8_OP = dequantized_attention  # what fa3_fp8_op() returns once registered
    try:
        smoothed = error(kernels.fa3_fp8_attention(q, k, v))
    finally:
        kernels._FA3_FP8_OP = None
    (q8, dq), (k8, dk), (v8, dv) = kernels.to_e4m3(q), kernels.to_e4m3(k), kernels.to_e4m3(v)
    plain = error(dequantized_attention(q8, k8, v8, dq, dk, dv, None))
    assert smoothed < 0.1 and smoothed * 3 < plain, \
        f"with the means taken out the error is {smoothed:.4f} against {plain:.4f} for the plain cast"


def _tiny_wan(head_dim: int, layers: int = 2, dtype=torch.bfloat16):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim,
                                 in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                 num_layers=layers, rope_max_seq_len=32).to(dtype).eval()


def _run_first_block_compiled(model, hidden_states) -> None:
    """The model's first block under torch.compile(fullgraph=True) (a graph break raises), run once."""
    width = model.config.num_attention_heads * model.config.attention_head_dim
    compiled = torch.compile(model.blocks[0], fullgraph=True)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        compiled(torch.randn(1, 32, width, dtype=dtype), torch.randn(1, 16, width, dtype=dtype),
                 torch.randn(1, 6, width, dtype=dtype), model.rope(hidden_states))


def test_recast_sage_backend_routes_every_attention_of_a_block_through_one_op_and_falls_back_for_the_rest(monkeypatch):
    """`attention_backend: sage` sends each maskless bf16 attention with head dim 64/128 to recast::sageattn (one op
    that torch.compile keeps whole) and leaves the rest to diffusers. The kernel itself needs a CUDA card, so here
    the op is stood in by bf16 SDPA: what is tested is recast's routing through the real diffusers processors, and
    that a compiled block traces it as one graph."""
    from recast.tasks.models import kernels

    calls = []

    def sdpa_in_nhd(query, key, value, scale):
        calls.append(tuple(query.shape))
        out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, key, value)),
                                                               scale=scale)
        return out.transpose(1, 2)

    monkeypatch.setattr(kernels, "sage_attention_op", lambda: sdpa_in_nhd)
    model = _tiny_wan(head_dim=64)
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8, dtype=torch.bfloat16), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 16, 32, dtype=torch.bfloat16), return_dict=False)
    with torch.no_grad():
        native = model(**inputs)[0]
        assert kernels.use_sage(model) == 4, "both blocks' self- and cross-attention processors are routed"
        routed = model(**inputs)[0]
    assert len(calls) == 4 and calls[0] == (1, 32, 2, 64), f"the op got {calls}, not the four attentions"
    assert torch.equal(routed, native), "routing changed what the stand-in (the same SDPA) computes"

    calls.clear()
    _run_first_block_compiled(model, inputs["hidden_states"])
    assert calls, "the compiled block did not run the op"

    float32 = _tiny_wan(head_dim=64, layers=1, dtype=torch.float32)
    kernels.use_sage(float32)
    calls.clear()
    with torch.no_grad():
        float32(**{**inputs, "hidden_states": inputs["hidden_states"].float(),
                   "encoder_hidden_states": inputs["encoder_hidden_states"].float()})
    assert not calls, "a float32 attention (SageAttention takes bf16/fp16) went to the op instead of diffusers"


def test_the_text_encoder_attends_the_photos_vision_windows_in_one_call_a_block_with_the_same_result():
    """Qwen2.5-VL's vision tower attends within windows of patches; transformers' SDPA path computes each window by
    itself (a device sync, a split, one SDPA call per window, a concatenation: ~100 launches a block on a card,
    where the text encoder is bound by its launches). The edit recipe runs each block's windows as one SDPA call
    with a block-diagonal mask: the prompt embeddings must be those of transformers' own windows."""
    from PIL import Image

    from recast.tasks.models import kernels, loading
    from recast.tasks.settings import get_settings

    loaded, _ = loading.get_pipeline("edit", get_settings().get_profile("tiny"))
    pipe, visual = loaded.pipe, loaded.pipe.text_encoder.model.visual
    assert visual.config._attn_implementation == kernels.VISION_WINDOWS, \
        "the recipe left the vision windows as they were"
    photo = Image.new("RGB", (384, 384))
    photo.putdata([((x * 7) % 256, (y * 5) % 256, (x * y) % 256) for y in range(384) for x in range(384)])
    calls, embeds = {}, {}
    original_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls[way] = calls.get(way, 0) + 1
        return original_sdpa(*args, **kwargs)

    try:
        for way in ("one call", "per window"):
            visual.config._attn_implementation = kernels.VISION_WINDOWS if way == "one call" else "sdpa"
            torch.nn.functional.scaled_dot_product_attention = counted
            with torch.inference_mode():
                embeds[way] = pipe.encode_prompt(prompt="Neo, black trench coat", image=[photo],
                                                 device=torch.device("cpu"))[0]
            torch.nn.functional.scaled_dot_product_attention = original_sdpa
    finally:
        torch.nn.functional.scaled_dot_product_attention = original_sdpa
        visual.config._attn_implementation = kernels.VISION_WINDOWS
    blocks, text_layers = len(visual.blocks), len(pipe.text_encoder.model.language_model.layers)
    assert calls["one call"] == blocks + text_layers, f"SDPA calls: {calls} ({blocks} vision blocks)"
    assert calls["per window"] > 4 * blocks + text_layers, f"the photo should span many windows: {calls}"
    error = float((embeds["one call"] - embeds["per window"]).norm() / embeds["per window"].norm())
    assert error < 1e-5, f"the prompt embeddings moved by {error:.2e} (relative L2) with the windows in one call"


def test_the_fp8_attention_casts_each_head_to_e4m3_with_the_factor_that_undoes_it():
    """FlashAttention-3's FP8 forward takes e4m3 q, k, v and one descale factor per (batch, head): the cast must use
    e4m3's range per head (a head 1000x larger than another loses nothing) and hand back the factor that restores
    the values, or the kernel's output is scaled wrong while still looking like attention."""
    from recast.tasks.models import kernels

    x = torch.randn(2, 64, 3, 16, generator=torch.Generator().manual_seed(0))
    x[:, :, 1] *= 1000.0  # one loud head
    q8, descale = kernels.to_e4m3(x)
    assert q8.dtype == torch.float8_e4m3fn and tuple(descale.shape) == (2, 3), (q8.dtype, descale.shape)
    restored = q8.float() * descale[:, None, :, None]
    for head in range(3):
        error = float((restored[:, :, head] - x[:, :, head]).norm() / x[:, :, head].norm())
        assert error < 0.05, f"head {head}: e4m3 with its descale restores the values to {error:.3f} relative L2"
    assert float(q8.float().abs().amax()) == 448.0, "each head's largest value should land on e4m3's largest (448)"


def test_recast_fa3_fp8_backend_hands_each_attention_e4m3_heads_and_their_descales_and_compiles_whole(monkeypatch):
    """`attention_backend: fa3-fp8` sends each maskless bf16 attention with head dim 128 to recast::fa3_fp8 with q, k
    and v in e4m3 and one descale per (batch, head), cast in traced code (a compiled block holds cast and op in one
    graph), and leaves the rest to diffusers. The kernel needs a Hopper card, so here the op is stood in by what the
    kernel computes: the inputs times their descales, then SDPA. What is tested is recast's routing through the real
    diffusers processors and the cast's contract: a wrong or missing descale lands far outside the bound."""
    from recast.tasks.models import kernels

    calls = []

    def dequantized_sdpa(query, key, value, query_descale, key_descale, value_descale, scale):
        calls.append((query.dtype, tuple(query.shape), tuple(query_descale.shape)))
        q, k, v = (t.float() * d[:, None, :, None] for t, d in ((query, query_descale), (key, key_descale),
                                                                 (value, value_descale)))
        out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=scale)
        return out.transpose(1, 2).to(torch.bfloat16)

    monkeypatch.setattr(kernels, "fa3_fp8_op", lambda: dequantized_sdpa)
    model = _tiny_wan(head_dim=128)
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8, dtype=torch.bfloat16), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 16, 32, dtype=torch.bfloat16), return_dict=False)
    with torch.no_grad():
        native = model(**inputs)[0].float()
        assert kernels.use_fa3_fp8(model) == 4, "both blocks' self- and cross-attention processors are routed"
        routed = model(**inputs)[0].float()
        assert len(calls) == 4 and calls[0] == (torch.float8_e4m3fn, (1, 32, 2, 128), (1, 2)), \
            f"the op got {calls}, not four attentions of e4m3 heads with a (batch, heads) descale each"
        other = model(**{**inputs, "hidden_states": torch.randn(1, 4, 2, 8, 8, dtype=torch.bfloat16)})[0].float()
    error, unrelated = (float((out - native).norm() / native.norm()) for out in (routed, other))
    assert error < 0.05 < unrelated, f"through e4m3 the model's output is {error:.4f} from bf16's (an unrelated " \
        f"input's {unrelated:.4f}): the cast or its descales are wrong"

    calls.clear()
    _run_first_block_compiled(model, inputs["hidden_states"])
    assert calls, "the compiled block did not run the op"

    for name, untaken in (("float32", _tiny_wan(128, layers=1, dtype=torch.float32)),
                          ("head dim 64", _tiny_wan(64, layers=1))):
        kernels.use_fa3_fp8(untaken)
        calls.clear()
        dtype = next(untaken.parameters()).dtype
        with torch.no_grad():
            untaken(**{**inputs, "hidden_states": inputs["hidden_states"].to(dtype),
                       "encoder_hidden_states": inputs["encoder_hidden_states"].to(dtype)})
        assert not calls, f"a {name} attention (the FP8 kernel takes bf16/fp16 at head dim 128) went to the op"


def test_the_vae_with_channels_last_weights_decodes_the_same_frames():
    """On a card the video recipe keeps the VAE's 3-D convolutions NDHWC (faster on Hopper): a layout, never other
    values. Here on the tiny VAE in float32 the frames must match the default layout's to float rounding."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8).eval()
    latents = torch.randn(1, vae.config.z_dim, 3, 6, 8)
    with torch.inference_mode():
        before = vae.decode(latents).sample
        converted = kernels.set_convolution_layout(vae, torch.channels_last_3d)
        after = vae.decode(latents).sample
    left = [n for n, p in vae.named_parameters() if p.dim() == 5
            and not p.is_contiguous(memory_format=torch.channels_last_3d)]
    assert converted > 0 and not left, f"{converted} converted; still in the default layout: {left}"
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-5), \
        f"channels-last changed the frames by up to {(before - after).abs().max():.2e}"


_FUSED_NORMS = """
import copy, json, torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm
from recast.tasks.models import fused_norms, kernels

def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())

torch.manual_seed(0)
kernel = {}
for channels in (8, 96, 384):  # the kernel alone, float32, channels-last 3-D and 2-D (the attention block's)
    norm = WanRMS_norm(channels, images=False)
    with torch.no_grad():
        norm.gamma.normal_(1, 0.2)
    for shape, layout in (((1, channels, 3, 10, 14), torch.channels_last_3d),
                          ((3, channels, 10, 14), torch.channels_last)):
        x = torch.randn(*shape).contiguous(memory_format=layout)
        norm.gamma.data = norm.gamma.data.reshape(channels, *([1] * (len(shape) - 2)))
        got = fused_norms.rms_norm_channels_last(x, norm.gamma, norm.bias, norm.scale, silu=True)
        kernel[f"{channels}x{len(shape)}d"] = [rel(got, F.silu(norm(x))), got.is_contiguous(memory_format=layout)]
vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2]).eval()
with torch.no_grad():
    for p in vae.parameters():
        p.add_(torch.randn_like(p) * 0.02)
kernels.set_convolution_layout(vae, torch.channels_last_3d)
video = torch.randn(1, 3, 5, 32, 48).contiguous(memory_format=torch.channels_last_3d)

def run(model, dtype):
    with torch.inference_mode():
        latents = model.encode(video.to(dtype)).latent_dist.mode()
        return latents, model.decode(latents).sample

truth = run(vae, torch.float32)
fused32 = copy.deepcopy(vae)
counts = fused_norms.fuse_wan_vae(fused32)
calls = fused_norms.fused_calls()
same32 = run(fused32, torch.float32)  # here float32 convolutions hand on NCDHW: diffusers' norms, the SiLU folded in
calls32 = fused_norms.fused_calls() - calls
eager16 = run(copy.deepcopy(vae).bfloat16(), torch.bfloat16)
fused16_model = copy.deepcopy(vae).bfloat16()
fused_norms.fuse_wan_vae(fused16_model)
calls = fused_norms.fused_calls()
fused16 = run(fused16_model, torch.bfloat16)
print(json.dumps({"kernel": kernel, "counts": counts, "again": fused_norms.fuse_wan_vae(fused32),
                  "calls32": calls32, "same32": [rel(a, b) for a, b in zip(same32, truth)],
                  "calls16": fused_norms.fused_calls() - calls,
                  "eager16": [rel(a, b) for a, b in zip(eager16, truth)],
                  "fused16": [rel(a, b) for a, b in zip(fused16, truth)]}))
"""


def test_the_vaes_fused_norms_compute_diffusers_norms_in_one_kernel():
    """`vae_fused_norms` (#26): each RMS norm of the Wan VAE, with the SiLU after it, as one Triton kernel. Run here
    by Triton's CPU interpreter: the kernel equals diffusers' norm + SiLU in float32; on a bf16 VAE the kernel runs
    for every norm and the frames are as close to the float32 VAE's as diffusers' own bf16 norms give; an input the
    kernel does not take (float32 NCDHW here) runs diffusers' norms with the SiLU folded in: the same frames."""
    done = subprocess.run([sys.executable, "-c", _FUSED_NORMS], env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for case, (error, layout_kept) in result["kernel"].items():
        assert error < 1e-6 and layout_kept, f"the kernel differs from diffusers' norm + SiLU ({case}): {error:.2e}"
    assert result["counts"]["norms"] > 0 and result["counts"]["with_silu"] > 0, result["counts"]
    assert result["again"] == result["counts"], f"fusing twice must change nothing: {result['again']}"
    assert result["calls32"] == 0 and max(result["same32"]) < 1e-6, \
        f"diffusers' own path with the SiLU folded in changed the float32 frames: {result}"
    assert result["calls16"] >= result["counts"]["norms"], f"the kernel did not run for every norm: {result}"
    for what, fused, eager in zip(("latents", "frames"), result["fused16"], result["eager16"]):
        assert fused <= eager * 1.25, \
            f"bf16 {what} with the fused norms are {fused:.4f} from float32's, diffusers' own bf16 {eager:.4f}"


def test_the_vaes_fused_norms_fall_back_to_diffusers_on_the_cpu_and_say_so(caplog):
    """A video profile with `vae_fused_norms` on this CPU: the kernel needs a CUDA card, so the VAE keeps
    diffusers' norms, said in one warning line, and the clip is the same frame for frame."""
    import logging

    base = get_settings().get_video_profile("tiny")
    image = Image.new("RGB", (64, 48), (120, 60, 30))
    clips = {}
    for fused in (True, False):
        profile = base.model_copy(update={"vae_fused_norms": fused})
        loading.clear_cache()
        with caplog.at_level(logging.WARNING, logger="recast.models"):
            caplog.clear()
            loaded, _ = loading.get_pipeline("video", profile)
            said = [r.getMessage() for r in caplog.records if "vae_fused_norms" in r.getMessage()]
        assert len(said) == (1 if fused else 0) and (not said or "CUDA" in said[0] and "\n" not in said[0]), said
        clips[fused] = wan_video.run_video(loaded, image, prompt="a", negative_prompt="", seed=3, steps=2,
                                           guidance_scale=3.0, num_frames=5, width=64, height=48,
                                           max_sequence_length=profile.max_sequence_length)
    loading.clear_cache()
    assert np.array_equal(clips[True], clips[False]), "the fallback must be diffusers' own norms"


def test_the_gpu_video_profiles_fuse_the_vaes_norms_and_the_cpu_profiles_do_not_ask():
    """The fused norms were measured faster at the same quality on a card (wan22-lightning 10.69 -> 9.91 s, H200), so
    every Wan profile for a card runs them; a CPU profile would only warn at every load, so none asks."""
    settings = get_settings()
    profiles = {name: settings.get_video_profile(name) for name in settings.video_profiles}
    on_card = sorted(n for n, p in profiles.items() if p.device == "cuda")
    assert on_card and all(profiles[n].vae_fused_norms for n in on_card), \
        f"GPU video profiles without the fused VAE norms: {[n for n in on_card if not profiles[n].vae_fused_norms]}"
    assert not any(p.vae_fused_norms for p in profiles.values() if p.device == "cpu"), \
        "a CPU video profile asks for the fused norms: every load would warn that they need a CUDA card"
