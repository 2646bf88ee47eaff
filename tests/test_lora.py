"""Per-request LoRA adapters on the real tiny pipeline: effect, weight 0, unloading, switching, bad files."""

from __future__ import annotations

import pytest
import torch

from recast.tasks import storage
from recast.tasks.models import loading, lora, tiny
from recast.tasks.edit import edit_image
from recast.tasks.schemas.jobs import EditJob, ResolvedLora
from recast.tasks.settings import get_settings


def make_lora(folder, seed: int, rank: int = 4, targets=("to_q", "to_k", "to_v", "to_out.0")) -> str:
    """A random LoRA for the tiny transformer, saved the diffusers way."""
    from diffusers import QwenImageEditPlusPipeline, QwenImageTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = QwenImageTransformer2DModel.from_pretrained(str(tiny.ensure("tiny")),
                                                              subfolder="transformer")
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                       target_modules=list(targets)), adapter_name="test")
    state = get_peft_model_state_dict(transformer, adapter_name="test")
    QwenImageEditPlusPipeline.save_lora_weights(str(folder), transformer_lora_layers=state, safe_serialization=True)
    return str(folder / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    (root / "a").mkdir()
    (root / "b").mkdir()
    return make_lora(root / "a", 1), make_lora(root / "b", 2)


def resolved(path: str, weight: float = 1.0) -> ResolvedLora:
    from recast.tasks.schemas.requests import LoraRef

    return lora.check_lora_file("loras[0].source", LoraRef(source=path, weight=weight))


@pytest.fixture
def run(memory_root, astronaut):
    image = storage.join(memory_root, "in.png")
    storage.write_bytes(image, astronaut.read_bytes())

    def edit(name: str, loras=()) -> bytes:
        job = EditJob(edit_id=name, profile="tiny", inputs=[image], prompt="James Bond 007", negative_prompt=" ",
                      seed=5, steps=3, true_cfg_scale=4.0, width=64, height=64,
                      output=storage.join(memory_root, f"{name}.png"), loras=list(loras), score_identity=False)
        return storage.read_bytes(edit_image(job).output)
    return edit


def test_lora_changes_output_and_weight_zero_or_unloading_restores_it(run, lora_files):
    base = run("base")
    assert run("with", [resolved(lora_files[0])]) != base, "a LoRA at weight 1 must change the output"
    assert run("zero", [resolved(lora_files[0], 0.0)]) == base, "weight 0 must give the base output bit for bit"
    assert run("after", []) == base, "a request without LoRAs must get the base model back bit for bit"


def test_switching_adapters_between_requests_does_not_reload(run, lora_files):
    loaded, _ = loading.get_pipeline("edit", get_settings().get_profile("tiny"))
    cold = loaded.cold_start_s
    a, b = resolved(lora_files[0]), resolved(lora_files[1])
    out_a = run("a", [a])
    out_b = run("b", [b])
    assert out_a != out_b, "two different LoRAs must give different outputs"
    assert run("a-again", [a]) == out_a, "switching back must reproduce the first adapter's output"
    again, hit = loading.get_pipeline("edit", get_settings().get_profile("tiny"))
    assert hit and again is loaded and again.cold_start_s == cold, "switching adapters reloaded the pipeline"
    assert {a.name, b.name} <= set(loaded.adapters)


def test_manifest_records_the_adapter(lora_files, astronaut, memory_root, monkeypatch):
    """The run's manifest says which adapter each edit used: its file (by SHA-256, computed here from the bytes),
    where it came from and at what weight."""
    import hashlib

    from recast.flows.edit import edit_flow
    from recast.flows.runs import run_flow
    from recast.tasks.schemas.requests import EditRequest, LoraRef

    monkeypatch.setenv("RECAST_HANDOFF__MODE", "none")
    manifest = run_flow(edit_flow, EditRequest(images=[str(astronaut)], prompts=["James Bond 007, tuxedo"],
                                               seeds=[3], steps=2, storage_root=memory_root,
                                               loras=[LoraRef(source=lora_files[0], weight=0.7)]))
    (edit,) = manifest["edits"]
    sha = hashlib.sha256(open(lora_files[0], "rb").read()).hexdigest()
    assert edit["loras"] == [{"name": f"lora-{sha[:12]}", "source": storage.normalize_uri(lora_files[0]),
                              "weight": 0.7, "sha256": sha}], edit["loras"]


def test_malformed_lora_is_refused_before_running(tmp_path):
    from recast.tasks.errors import BadInput
    from recast.tasks.schemas.requests import LoraRef

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(BadInput, match="not a safetensors file"):
        lora.check_lora_file("loras[0].source", LoraRef(source=str(junk)))
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(BadInput, match="no LoRA tensors"):
        lora.check_lora_file("loras[0].source", LoraRef(source=str(tmp_path / "model.safetensors")))


def test_mismatched_lora_fails_clearly_and_leaves_the_pipeline_as_it_was(run, tmp_path):
    from safetensors.torch import save_file

    base = run("base-before")
    # Right key names, wrong shapes: a LoRA made for another model size.
    bad = tmp_path / "mismatch.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 999),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(48, 4)}, str(bad))
    with pytest.raises(lora.BadLora, match="does not fit"):
        run("bad", [resolved(str(bad))])
    loaded, _ = loading.get_pipeline("edit", get_settings().get_profile("tiny"))
    assert resolved(str(bad)).name not in loaded.adapters
    assert run("base-after", []) == base, "a failed LoRA load must leave the pipeline as it was"
