"""The model card written from a checkpoint's record, and the per-layer plot it shows."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
import yaml

from llm_sparsify.export.card import PLOT, CardError, write_model_card
from llm_sparsify.export.hf import save_checkpoint
from llm_sparsify.export.plot import PlotError, plot_layers
from tests.conftest import tiny_model

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_record(layers: int = 4, errors: bool = True, **extra) -> dict:
    """A record shaped like prune_checkpoint's, with distinct numbers per module type and layer."""
    modules = {f"model.layers.{i}.{'self_attn' if j < 4 else 'mlp'}.{k}": 0.5 - 0.01 * j - 0.002 * i
               for i in range(layers) for j, k in enumerate(KINDS)}
    by_type = {k: sum(v for n, v in modules.items() if n.endswith(k)) / layers for k in KINDS}
    record = {
        "llm_sparsify_version": "0.1.0", "base_model": "meta-llama/Llama-2-7b-hf", "recipe_name": "sparsegpt-2of4",
        "recipe": {"pruning": {"method": "sparsegpt", "sparsity": "2:4", "targets": ["*"], "ignore": ["*.down_proj"],
                               "blocksize": 128, "dampening": 0.01, "inputs": "pruned"}},
        "calibration": {"source": "c4", "nsamples": 128, "seqlen": 2048, "seed": 0},
        "device": "cuda:0", "dtype": "bfloat16", "seconds": 1234.5,
        "sparsity": {"overall": sum(by_type.values()) / len(by_type), "by_type": by_type, "modules": modules},
        "layers": [{"index": i, "seconds": 1.0,
                    "sparsity": {n: v for n, v in modules.items() if n.startswith(f"model.layers.{i}.")}}
                   for i in range(layers)],
    }
    if errors:
        for layer in record["layers"]:  # one exact (zero) error: the log scale must cope
            layer["error"] = {n: 0.0 if n.endswith("v_proj") and layer["index"] == 0 else 10 ** (layer["index"] / 9 - 3)
                              for n in layer["sparsity"]}
    return record | extra


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    record = make_record(
        quantization={"method": "rtn", "bits": 4, "group_size": 128, "symmetric": True},
        evaluation={"models": {"dense": {"wikitext2_ppl": 29.935, "piqa": {"acc": 0.6512, "acc_norm": 0.6643}},
                               "pruned": {"wikitext2_ppl": 118.72, "piqa": {"acc": 0.5871, "acc_norm": 0.5925}}}},
    )
    return save_checkpoint(tiny_model(), None, tmp_path / "llama-2of4", record)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, after checking its signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])


def test_card_holds_metadata_recipe_tables_plot_and_command(checkpoint):
    command = "llm-sparsify prune meta-llama/Llama-2-7b-hf --recipe sparsegpt-2of4 --output llama-2of4"
    card = write_model_card(checkpoint, command=command)
    text = card.read_text()
    record = yaml.safe_load((checkpoint / "llm_sparsify.json").read_text())  # JSON is YAML

    front = yaml.safe_load(re.match(r"---\n(.*?)\n---\n", text, re.DOTALL).group(1))
    assert front["base_model"] == "meta-llama/Llama-2-7b-hf"
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert {"sparse", "pruned", "sparsegpt", "semi-structured-sparsity", "quantized", "int4"} <= set(front["tags"])

    recipe = re.search(r"## Recipe\n\n```yaml\n(.*?)```", text, re.DOTALL).group(1)
    assert yaml.safe_load(recipe) == record["recipe"]
    for kind, share in record["sparsity"]["by_type"].items():
        assert re.search(rf"^\| {kind} \| {share:.2%} \| [0-9.e-]+ \|$", text, re.MULTILINE), kind
    assert f"{record['sparsity']['overall']:.2%} of the targeted weights are zero" in text
    assert "| c4 | 128 | 2048 | 0 |" in text
    assert "| rtn | 4 | 128 | True |" in text
    assert "| wikitext2_ppl | value | 29.9350 | 118.7200 |" in text and "| piqa | acc_norm | 0.6643 | 0.5925 |" in text
    weights = (checkpoint / "model.safetensors").stat().st_size
    assert f"{weights / 2**20:.1f} MiB of weights in 1 safetensors file," in text
    assert f"![Per-layer sparsity, reconstruction error and block importance]({PLOT})" in text
    assert png_size(checkpoint / PLOT)
    assert ": one-shot sparsegpt pruning to sparsity 2:4; int4 rtn quantization. Pruned weights are exact" in text
    assert f"```bash\n{command}\n```" in text
    assert [p.name for p in checkpoint.iterdir() if p.name.startswith(".")] == []  # written atomically


def test_card_of_a_plain_record_leaves_out_what_it_lacks(tmp_path):
    record = make_record(errors=False, base_model=str(tmp_path), command="llm-sparsify prune ./local")
    folder = save_checkpoint(tiny_model(), None, tmp_path / "out", record)
    text = write_model_card(folder).read_text()

    front = yaml.safe_load(re.match(r"---\n(.*?)\n---\n", text, re.DOTALL).group(1))
    assert "base_model" not in front and "quantized" not in front["tags"]  # a local path is no Hub base model
    assert "## Quantization" not in text and "## Evaluation" not in text
    assert "| module type | share of zeros |\n" in text  # no error column
    assert "```bash\nllm-sparsify prune ./local\n```" in text  # the record's own command


def test_card_needs_a_record(tmp_path):
    with pytest.raises(CardError, match="no llm_sparsify.json"):
        write_model_card(tmp_path)


def test_plot_with_and_without_errors(tmp_path):
    with_errors = plot_layers(make_record(layers=30), tmp_path / "errors.png")
    sparsity_only = plot_layers(make_record(layers=30, errors=False), tmp_path / "sparsity.png")
    for path in (with_errors, sparsity_only):
        assert 10_000 < path.stat().st_size < 1_000_000
    (width, height), (width_only, height_only) = png_size(with_errors), png_size(sparsity_only)
    assert width == width_only and height > 1.5 * height_only  # a second panel for the errors


def depth_record(record: dict, score: str = "cosine") -> dict:
    """`record` after a depth stage that removed blocks 2 and 5 of 7."""
    depth = {"removed": [2, 5], "importance": [0.4, 0.05, 0.01, 0.02, 0.03, 0.008, 0.09]}
    recipe = record.get("recipe", {}) | {"depth": {"blocks": 2, "score": score}}
    return record | {"recipe": recipe, "stages": {"parameters_before": 100, "parameters_after": 80, "depth": depth}}


@pytest.mark.parametrize("score", ["cosine", "random"])
def test_card_of_a_depth_stage_lists_every_block_score_and_the_removed_ones(tmp_path, score):
    record = depth_record(make_record(), score)
    text = write_model_card(save_checkpoint(tiny_model(), None, tmp_path / "out", record)).read_text()
    assert "removed decoder blocks 2, 5 of the base model" in text and "Parameters: 100 → 80 (-20.0%)." in text
    assert "0: 0.4000, 1: 0.0500, **2: 0.0100**, 3: 0.0200, 4: 0.0300, **5: 0.0080**, 6: 0.0900." in text
    assert ("1 − cos(block input, block output)" in text) == (score == "cosine")
    assert ("by the random baseline" in text) == (score == "random")
    assert "depth-pruned" in yaml.safe_load(re.match(r"---\n(.*?)\n---\n", text, re.DOTALL).group(1))["tags"]


def test_plot_of_a_depth_stage_adds_a_panel_of_block_importance(tmp_path):
    sparsity_only = plot_layers(make_record(layers=5, errors=False), tmp_path / "sparsity.png")
    with_depth = plot_layers(depth_record(make_record(layers=5, errors=False)), tmp_path / "depth.png")
    depth_only = plot_layers(depth_record({"layers": []}), tmp_path / "depth-only.png")
    assert png_size(with_depth)[1] > 1.5 * png_size(sparsity_only)[1]
    assert png_size(depth_only)[1] == png_size(sparsity_only)[1]  # one panel each


def test_plot_needs_layers(tmp_path):
    with pytest.raises(PlotError):
        plot_layers({"layers": []}, tmp_path / "plot.png")
    assert list(tmp_path.iterdir()) == []
