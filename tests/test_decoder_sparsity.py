"""No silent success: the share of zeros over all decoder-layer weights beside the share over the targets, the
decoder weights no target covers (e.g. fused MoE experts) named in the record and the card, and a warning when
the targets miss most of the decoder."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from llm_sparsify.api import compress, prune_checkpoint, run_record
from llm_sparsify.cli import main
from llm_sparsify.export.card import model_card
from llm_sparsify.export.hf import read_record
from llm_sparsify.pipeline import run_recipe
from llm_sparsify.recipe import load_recipe
from tests.conftest import TINY, save_tiny_llama, tiny_model

MOE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256)
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_moe(kind: str):
    """A tiny Mixtral (every layer MoE) or Qwen3-MoE (layer 0 MoE, layer 1 a dense MLP), experts as fused 3-D
    parameters as transformers 5 keeps them."""
    torch.manual_seed(0)
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**MOE, num_local_experts=4)).eval()
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**MOE, num_experts=4, moe_intermediate_size=32, head_dim=8,
                                              mlp_only_layers=[1])).eval()


def ids(vocab: int = 128):
    return torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(1))


def decoder_weights(model) -> dict[str, torch.Tensor]:
    """Brute force: every parameter of two or more dimensions under model.model.layers, by full name."""
    return {f"model.layers.{i}.{name}": p.detach() for i, layer in enumerate(model.model.layers)
            for name, p in layer.named_parameters() if p.dim() >= 2}


def zero_share(weights: dict[str, torch.Tensor]) -> float:
    return sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())


def run(model, recipe, calibration=None):
    """The recipe run in memory as compress runs it; the record of the run."""
    recipe = load_recipe(recipe)
    start = time.perf_counter()
    reports, _ = run_recipe(model, recipe, calibration)
    return run_record(None, recipe, {}, "cpu", torch.float32, start, reports, model)


def warnings_of(caplog) -> list[str]:
    """The library's warnings so far."""
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name.startswith("llm_sparsify")]


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_fused_experts_left_fused_are_reported_untargeted_and_warned_of(kind, caplog, one_thread):
    """run_recipe on a model whose experts stay fused (a layout structure/experts.py does not know would): only the
    Linears are pruned, and the rest is named and warned of."""
    model = tiny_moe(kind)
    with caplog.at_level(logging.WARNING):
        record = run(model, "wanda-50", ids())
    sparsity = record["sparsity"]
    weights = decoder_weights(model)
    assert sparsity["overall"] == pytest.approx(0.5)
    assert sparsity["decoder"] == pytest.approx(zero_share(weights))  # every ≥2-D decoder weight, counted
    assert sparsity["decoder"] < 0.25  # the experts hold most of the weights and were left as they were
    expert_names = ([f"model.layers.*.{name}" for name in EXPERTS] if kind == "mixtral"  # every layer: generalised
                    else [f"model.layers.0.{name}" for name in EXPERTS])  # only layer 0 has experts: by full name
    assert set(expert_names) <= set(sparsity["untargeted"])
    covered = {f"{name}.weight" for name in sparsity["modules"]}
    missed = sum(w.numel() for name, w in weights.items() if name not in covered)
    assert sum(sparsity["untargeted"].values()) == pytest.approx(missed / sum(w.numel() for w in weights.values()))
    assert sum(sparsity["untargeted"].values()) > 0.5
    assert sum(layer["weights"] for layer in record["layers"]) == sum(w.numel() for w in weights.values())
    [warning] = warnings_of(caplog)
    assert all(name in warning for name in expert_names)


def test_compress_prunes_the_experts_without_a_warning(caplog, one_thread):
    """The public API unfuses the experts (structure/experts.py): they are pruned, and the targets cover nearly all
    of the decoder (all but the router), so no warning is given."""
    model = tiny_moe("mixtral")
    enough = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(1))  # no expert sent too few
    with caplog.at_level(logging.WARNING):
        compress(model, "wanda-50", enough, device="cpu")
    assert warnings_of(caplog) == []
    weights = decoder_weights(model)
    assert zero_share(weights) > 0.49
    assert all(zero_share({name: w}) == 0.5 for name, w in weights.items() if ".experts." in name)


def test_the_router_is_the_only_untargeted_weight_of_a_streamed_moe(tmp_path, one_thread):
    tiny_moe("mixtral").save_pretrained(tmp_path / "dense")
    record = prune_checkpoint(str(tmp_path / "dense"), "wanda-50", tmp_path / "out", ids(), device="cpu",
                              dtype=torch.float32)
    assert set(record["sparsity"]["untargeted"]) == {"model.layers.*.mlp.gate.weight"}
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert record["sparsity"]["decoder"] == pytest.approx(zero_share(decoder_weights(saved)))


def test_dense_model_decoder_share_is_the_brute_force_count(caplog, one_thread):
    model = tiny_model("llama")
    with caplog.at_level(logging.WARNING):
        record = run(model, "wanda-50", ids(TINY["vocab_size"]))
    sparsity = record["sparsity"]
    assert sparsity["untargeted"] == {}
    assert sparsity["decoder"] == pytest.approx(zero_share(decoder_weights(model)), abs=0)
    assert 0.45 < sparsity["decoder"] <= 0.5
    assert warnings_of(caplog) == []


@pytest.mark.parametrize(("ignore", "named"), [
    ("*.down_proj", "model.layers.*.mlp.down_proj.weight"),  # left out in every layer: one name with *
    ("model.layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj.weight"),  # in one layer: its full name
])
def test_untargeted_linears_are_named_with_their_share(ignore, named, caplog):
    model = tiny_model("llama")
    with caplog.at_level(logging.WARNING):
        record = run(model, {"pruning": {"method": "magnitude", "sparsity": 0.5, "ignore": [ignore]}})
    weights = decoder_weights(model)
    total = sum(w.numel() for w in weights.values())
    left = [w for name, w in weights.items() if name.endswith("down_proj.weight") and
            (named.startswith("model.layers.*") or name == named)]
    sparsity = record["sparsity"]
    assert sparsity["untargeted"] == pytest.approx({named: sum(w.numel() for w in left) / total})
    assert all((w != 0).all() for w in left)
    assert sparsity["decoder"] == pytest.approx(zero_share(weights)) and sparsity["decoder"] < sparsity["overall"]
    assert warnings_of(caplog) == []  # the targets still cover most of the decoder


def test_targets_missing_most_of_the_decoder_are_warned_of(caplog):
    model = tiny_model("llama")
    with caplog.at_level(logging.WARNING):
        record = run(model, {"pruning": {"method": "magnitude", "sparsity": 0.5, "targets": ["*.self_attn.*"]}})
    [warning] = warnings_of(caplog)
    assert set(record["sparsity"]["untargeted"]) == {f"model.layers.*.mlp.{m}.weight" for m in
                                                     ("gate_proj", "up_proj", "down_proj")}
    assert all(name in warning for name in record["sparsity"]["untargeted"])


def test_streamed_decoder_share_matches_memory_and_disk(tmp_path, one_thread):
    """prune_checkpoint counts each layer as it is saved: the same share as in memory, and as on disk."""
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    calibration = ids(TINY["vocab_size"])
    streamed = prune_checkpoint(str(tmp_path / "dense"), "wanda-50", tmp_path / "out", calibration, device="cpu",
                                dtype=torch.float32)
    in_memory = run(tiny_model("llama"), "wanda-50", calibration)
    assert streamed["sparsity"]["decoder"] == in_memory["sparsity"]["decoder"]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert streamed["sparsity"]["decoder"] == pytest.approx(zero_share(decoder_weights(saved)), abs=0)
    assert streamed["sparsity"]["untargeted"] == {}
    assert read_record(tmp_path / "out")["sparsity"]["decoder"] == streamed["sparsity"]["decoder"]


def test_card_shows_both_shares_and_the_untargeted_weights(one_thread):
    record = run(tiny_moe("mixtral"), "wanda-50", ids())
    card = model_card(record, {"weights": 2**20, "weight_files": 1, "total": 2**21})
    sparsity = record["sparsity"]
    assert (f"{sparsity['overall']:.2%} of the targeted weights are zero ({sparsity['decoder']:.2%} of all "
            "decoder-layer weights).") in card
    for name, share in sparsity["untargeted"].items():
        assert f"| `{name}` | {share:.2%} |" in card


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    directory = tmp_path_factory.mktemp("decoder-sparsity")
    calibration = directory / "calib.pt"
    torch.save(torch.randint(0, 49152, (4, 16), generator=torch.Generator().manual_seed(0)), calibration)
    return save_tiny_llama(directory / "six-layers", hidden=32, layers=6), calibration


def prune_cli(model_dir, calibration, output, recipe) -> list[str]:
    return ["prune", str(model_dir), "--recipe", str(recipe), "--calibration", str(calibration), "--output",
            str(output), "--device", "cpu", "-q"]


@pytest.mark.parametrize("recipe", ["depth-cosine-4", "depth: {blocks: 1}\nwidth: {unit: mlp, amount: 0.25}\n"])
def test_structure_only_summary_says_what_was_removed(tmp_path, six_layers, recipe, capsys, one_thread):
    if "\n" in recipe:
        (tmp_path / "structure.yaml").write_text(recipe)
        recipe = tmp_path / "structure.yaml"
    assert main(prune_cli(*six_layers, tmp_path / "out", recipe)) == 0
    stdout = capsys.readouterr().out
    record = read_record(tmp_path / "out")
    stages = record["stages"]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert record["sparsity"]["decoder"] == zero_share(decoder_weights(saved))  # no pruning: counted on the model
    assert record["sparsity"]["untargeted"] == {}
    removed = f"decoder blocks {', '.join(map(str, stages['depth']['removed']))}"
    if "width" in stages:
        removed += " and 25% of the MLP channels"
    assert (f"s: removed {removed} (parameters {stages['parameters_before']:,} -> {stages['parameters_after']:,})\n"
            in stdout)
    assert stages["parameters_after"] < stages["parameters_before"]
    assert "targeted weights" not in stdout


def test_pruning_summary_gives_both_shares(tmp_path, six_layers, capsys, one_thread):
    recipe = tmp_path / "depth-wanda.yaml"
    recipe.write_text("depth: {blocks: 2}\npruning: {method: wanda, sparsity: 0.5, ignore: ['*.down_proj']}\n")
    assert main(prune_cli(*six_layers, tmp_path / "out", recipe)) == 0
    stdout = capsys.readouterr().out
    record = read_record(tmp_path / "out")
    sparsity, stages = record["sparsity"], record["stages"]
    assert sparsity["decoder"] < sparsity["overall"] - 0.1  # down_proj left dense
    assert (f"removed decoder blocks {', '.join(map(str, stages['depth']['removed']))} (parameters "
            f"{stages['parameters_before']:,} -> {stages['parameters_after']:,}); {sparsity['overall']:.2%} of the "
            f"targeted weights are zero ({sparsity['decoder']:.2%} of all decoder-layer weights)\n") in stdout
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| `model.layers.*.mlp.down_proj.weight` |" in card
