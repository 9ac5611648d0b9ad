"""Depth, width, OWL and sensitivity allocation streamed from disk to disk: the same checkpoint as the whole model in
memory, tensor for tensor, resumable after SIGKILL and the same under two processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from llm_sparsify import compress, load_recipe, prune_checkpoint
from llm_sparsify.recipe import builtin_recipes
from llm_sparsify.structure.resize import load_width_pruned
from tests.test_stream import output_tensors, prune_command, resumable, run, run_killed_after, save_sharded  # noqa: F401

COMBINED = {"depth": {"blocks": 2}, "width": {"unit": "mlp", "amount": 0.2},
            "pruning": {"method": "sparsegpt", "sparsity": 0.6, "allocation": "owl"}}
RECIPES = {
    "depth-cosine-4": "depth-cosine-4",
    "width-mlp-30": "width-mlp-30",
    "owl-wanda-70": "owl-wanda-70",
    "combined": COMBINED,
    "heads-global": {"width": {"unit": "heads", "amount": 0.4, "score": "activation", "scope": "global"}},
    "depth-iterative-interval-2": {"depth": {"blocks": 2, "interval": 2, "iterative": True},
                                   "pruning": {"method": "wanda", "sparsity": "2:4"}},
    "depth-random-width-weight": {"depth": {"blocks": 1, "score": "random"}, "width": {"unit": "mlp", "amount": 0.5,
                                                                                       "score": "weight"}},
    "sensitivity": {"pruning": {"method": "wanda", "sparsity": 0.6, "allocation": "sensitivity"}},
    "depth-budget-tied": {"depth": {"max_parameters": 193_376}},  # 3 blocks; 4 if the tied embedding counted twice
}
STRUCTURE = ("num_hidden_layers", "intermediate_size", "num_key_value_heads", "num_attention_heads", "head_dim",
             "layer_types", "max_window_layers")


def holds_the_model(output: Path, model) -> None:
    """The checkpoint at `output` has exactly the model's tensors (a tied lm_head stored once) and structure."""
    streamed = output_tensors(output)
    expected = {n: t for n, t in model.state_dict().items() if n in streamed}
    assert set(streamed) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(streamed[key], tensor), key
    saved = AutoConfig.from_pretrained(output)
    for field in (*STRUCTURE, "layer_widths"):
        assert getattr(saved, field, None) == getattr(model.config, field, None), field


def without_seconds(stage: dict | None) -> dict | None:
    """A stage's record without the time it took (a per-layer allocation's nested one too)."""
    if not isinstance(stage, dict):
        return stage
    return {key: without_seconds(value) for key, value in stage.items() if key != "seconds"}


def eight_layers(kind: str = "llama"):
    torch.manual_seed(0)
    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)
    if kind == "qwen3":  # per-layer config lists, q/k norms, a tied embedding
        return Qwen3ForCausalLM(Qwen3Config(**shape, head_dim=16, tie_word_embeddings=True)).eval()
    return LlamaForCausalLM(LlamaConfig(**shape)).eval()


@pytest.mark.parametrize("name", [name for name in builtin_recipes() if load_recipe(name).streams])
def test_every_shipped_recipe_from_disk_gives_the_checkpoint_compress_makes(tmp_path, name, one_thread):
    """`llm-sparsify prune`'s path (prune_checkpoint, streamed) and the in-memory API give the same tensors and config
    for every recipe the package ships that streams (all but wanda-70-recover, whose fine-tuning needs the whole
    model: there prune_checkpoint loads it and runs the in-memory code itself)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    calibration = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    checkpoint = save_sharded(model, tmp_path / "in")
    record = prune_checkpoint(str(checkpoint), name, tmp_path / "out", calibration, device="cpu",
                              dtype=torch.float32, batch_size=4)
    compress(model, name, calibration, device="cpu", batch_size=4)
    holds_the_model(tmp_path / "out", model)
    assert "resumed_after_layers" in record  # it streamed


@pytest.mark.parametrize("name", RECIPES)
def test_streamed_structure_recipe_equals_the_whole_model_in_memory(tmp_path, calibration, name, one_thread):
    model = eight_layers("qwen3" if name in ("combined", "depth-budget-tied") else "llama")
    checkpoint = save_sharded(model, tmp_path / "in")
    record = prune_checkpoint(str(checkpoint), RECIPES[name], tmp_path / "out", calibration, device="cpu",
                              dtype=torch.float32, batch_size=4)
    compress(model, RECIPES[name], calibration, device="cpu", batch_size=4, output=tmp_path / "memory")
    holds_the_model(tmp_path / "out", model)
    assert AutoConfig.from_pretrained(tmp_path / "out").use_cache is True  # as the checkpoint had it
    stages = json.loads((tmp_path / "memory" / "llm_sparsify.json").read_text())["stages"]
    for stage in ("depth", "width", "pruning"):
        assert without_seconds(record["stages"].get(stage)) == without_seconds(stages.get(stage)), stage
    assert record["stages"]["parameters_after"] == sum(p.numel() for p in model.parameters())
    reloaded = load_width_pruned(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(reloaded(calibration).logits, model(calibration).logits)
    assert "resumed_after_layers" in record and not list(tmp_path.glob(".*"))  # it streamed


def test_a_streamed_structure_recipe_shrinks_the_checkpoint_as_planned(tmp_path, calibration, one_thread):
    checkpoint = save_sharded(eight_layers(), tmp_path / "in")
    record = prune_checkpoint(str(checkpoint), COMBINED, tmp_path / "out", calibration, device="cpu",
                              dtype=torch.float32, batch_size=4)
    assert record["resumed_after_layers"] == 0  # streamed, not loaded whole
    removed = record["stages"]["depth"]["removed"]
    assert len(removed) == 2 and record["stages"]["width"]["kept"] == [102] * 6  # 128 - round(0.2 × 128)
    tensors = output_tensors(tmp_path / "out")
    assert {int(n.split(".")[2]) for n in tensors if n.startswith("model.layers.")} == set(range(6))
    sparsities = record["stages"]["pruning"]["owl"]["sparsities"]
    assert len(sparsities) == 6 and abs(sum(sparsities) / 6 - 0.6) < 1e-9
    for i, target in enumerate(sparsities):
        up = tensors[f"model.layers.{i}.mlp.up_proj.weight"]
        assert up.shape == (102, 64) and tensors[f"model.layers.{i}.mlp.down_proj.weight"].shape == (64, 102)
        assert abs((up == 0).float().mean().item() - target) < 0.02


# --- resume after SIGKILL, torchrun ----------------------------------------------------------------

@pytest.fixture(scope="module")
def structure_run(resumable):  # noqa: F811
    """test_stream's 8-layer bf16 checkpoint, the combined recipe as a file, one uninterrupted run."""
    (resumable / "combined.yaml").write_text(yaml.safe_dump(COMBINED))
    run(prune_command(resumable, resumable / "uninterrupted-structure", str(resumable / "combined.yaml")))
    return resumable


def same_checkpoints(first: Path, second: Path) -> None:
    one, two = output_tensors(first), output_tensors(second)
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name
    assert json.loads((first / "config.json").read_text()) == json.loads((second / "config.json").read_text())


def test_a_killed_structure_run_resumes_to_the_same_checkpoint(structure_run):
    resumed = structure_run / "resumed-structure"
    command = prune_command(structure_run, resumed, str(structure_run / "combined.yaml"))
    run_killed_after(command, structure_run / ".resumed-structure.partial" / "progress.json", 2)
    assert not resumed.exists()
    run(command)
    assert json.loads((resumed / "llm_sparsify.json").read_text())["resumed_after_layers"] >= 2
    same_checkpoints(structure_run / "uninterrupted-structure", resumed)


def test_two_processes_give_the_same_structure_checkpoint_as_one(structure_run):
    two = structure_run / "two-structure"
    run(prune_command(structure_run, two, str(structure_run / "combined.yaml"), processes=2))
    record = json.loads((two / "llm_sparsify.json").read_text())
    alone = json.loads((structure_run / "uninterrupted-structure" / "llm_sparsify.json").read_text())
    assert record["processes"] == 2 and without_seconds(record["stages"]) == without_seconds(alone["stages"])
    same_checkpoints(structure_run / "uninterrupted-structure", two)
