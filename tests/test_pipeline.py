"""Recipes with depth, width, OWL, OBD and recovery stages, run through compress() and the prune command."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from llm_sparsify import compress, load_recipe
from llm_sparsify.cli import main
from llm_sparsify.export.hf import read_record
from llm_sparsify.fisher_pass import fisher_diagonal
from llm_sparsify.prune.fisher import prune_obd
from llm_sparsify.prune.owl import owl_sparsities
from llm_sparsify.recipe import RecipeError, builtin_recipes, recipe_from_dict
from llm_sparsify.score_passes import layer_outlier_ratios
from llm_sparsify.targets import layer_linears
from tests.conftest import tiny_model
from tests.test_cli import workdir  # noqa: F401  (fixture; model_dir and calib use it)

NEW_RECIPES = ["depth-cosine-4", "width-mlp-30", "owl-wanda-70", "wanda-70-recover"]


def zero_shares(model) -> list[float]:
    """Share of zeros over each decoder layer's Linear weights."""
    return [sum((m.weight == 0).sum().item() for m in layer.values()) / sum(m.weight.numel() for m in layer.values())
            for layer in layer_linears(model)]


@pytest.mark.parametrize("name", NEW_RECIPES)
def test_shipped_stage_recipes_round_trip(name):
    assert name in builtin_recipes()
    recipe = load_recipe(name)
    again = recipe_from_dict(recipe.to_dict(), name=name)
    assert again == recipe and recipe.needs_calibration
    assert recipe.streams == (recipe.recovery is None)  # depth, width and OWL stream from disk


@pytest.mark.parametrize(("data", "message"), [
    ({"depth": {"interval": 2}}, "exactly one of `blocks`"),
    ({"depth": {"blocks": 2, "max_parameters": 10}}, "exactly one of `blocks`"),
    ({"depth": {"blocks": 2, "score": "magic"}}, "depth.score must be one of cosine, last, random"),
    ({"depth": {"blocks": 2, "iterative": True, "score": "last"}}, "iterative re-scores"),
    ({"depth": {"blocks": 2, "sources": {"c4": -1}}}, "positive weights"),
    ({"width": {"unit": "rows"}}, "width.unit must be one of mlp, heads"),
    ({"width": {"amount": 1.2}}, "width.amount must be a fraction"),
    ({"width": {"amount": 0.2, "threshold": 3}}, "unknown width key"),
    ({"pruning": {"method": "wanda", "sparsity": "2:4", "allocation": "owl"}}, "takes a fraction, not N:M"),
    ({"pruning": {"method": "wanda", "sparsity": 0.5, "owl_lambda": 0.1}}, "need `allocation: owl`"),
    ({"pruning": {"method": "wanda", "sparsity": 0.9, "allocation": "owl", "owl_lambda": 0.2}}, "below min"),
    ({"pruning": {"method": "magnitude", "sparsity": 0.5, "allocation": "owl"}}, "unknown key"),
    ({"pruning": {"method": "wanda", "sparsity": 0.5}, "recovery": {"schedule": [0.3, 0.6]}}, "stay below"),
    ({"pruning": {"method": "wanda", "sparsity": 0.5}, "recovery": {"schedule": [0.3, 0.2]}}, "rise strictly"),
    ({"pruning": {"method": "wanda", "sparsity": 0.5}, "recovery": {"lora": 0}}, "recovery.lora"),
    ({"pruning": {"method": "wanda", "sparsity": 0.5}, "recovery": {}, "quantization": {"method": "rtn"}},
     "off their grid"),
    ({"quantization": {"method": "rtn"}, "depth": {"blocks": 1}}, "needs a `pruning:` section"),
    ({"pruning": {"method": "wanda", "sparsity": 0.5}, "export": {"formats": ["onnx"]}}, "export.formats"),
    ({"pruning": {"method": "wanda", "sparsity": 0.5}, "evaluate": {"limit": 0}}, "evaluate.limit"),
    ({"recovery": {}}, "needs a `pruning:` section"),
])
def test_bad_stage_sections_are_refused_in_words(data, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(data)


def test_depth_stage_removes_a_block_that_adds_nothing(calibration):
    """A block whose residual contributions are zero has importance 0: removing it changes no logit."""
    model = tiny_model("llama")
    block = model.model.layers[1]
    block.self_attn.o_proj.weight.data.zero_()
    block.mlp.down_proj.weight.data.zero_()
    before = model(calibration).logits
    compress(model, {"depth": {"blocks": 1}}, calibration, device="cpu")
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert torch.allclose(model(calibration).logits, before, atol=1e-5)


@pytest.mark.parametrize("score", ["activation", "obd"])
def test_width_stage_shrinks_every_mlp(calibration, score):
    model = tiny_model("mistral")
    compress(model, {"width": {"unit": "mlp", "amount": 0.25, "score": score}}, calibration, device="cpu")
    assert {layer.mlp.down_proj.in_features for layer in model.model.layers} == {96}
    assert model.config.intermediate_size == 96 and torch.isfinite(model(calibration).logits).all()


def test_owl_gives_each_layer_the_sparsity_of_its_outlier_ratio(calibration):
    model = tiny_model("llama")
    expected = owl_sparsities(layer_outlier_ratios(copy.deepcopy(model), calibration, 2.0), 0.5, 0.1)
    assert len(set(expected)) > 1  # the layers differ, or the check proves nothing
    recipe = {"pruning": {"method": "wanda", "sparsity": 0.5, "allocation": "owl", "owl_threshold": 2,
                          "owl_lambda": 0.1}}
    compress(model, recipe, calibration, device="cpu")
    for layer, target in zip(layer_linears(model), expected, strict=True):
        for module in layer.values():  # Wanda removes int(sparsity · columns) of each row
            rows, columns = module.weight.shape
            assert (module.weight == 0).sum().item() == rows * int(target * columns)


def test_obd_through_the_engine_equals_the_direct_computation(calibration):
    model = tiny_model("qwen2")
    reference = copy.deepcopy(model)
    modules = {name: m for layer in layer_linears(reference) for name, m in layer.items()}
    fisher = fisher_diagonal(reference, calibration, modules)
    compress(model, {"pruning": {"method": "obd", "sparsity": 0.5}}, calibration, device="cpu")
    for name, module in modules.items():
        expected = prune_obd(module.weight.data, fisher[name], 0.5)
        assert torch.equal(model.get_submodule(name).weight, expected)


@pytest.mark.parametrize("schedule", [[], [0.25]])
def test_recovery_keeps_the_pruned_weights_zero(calibration, schedule):
    model, pruned_only = tiny_model("llama"), tiny_model("llama")
    compress(pruned_only, {"pruning": {"method": "wanda", "sparsity": 0.5}}, calibration, device="cpu")
    recipe = {"pruning": {"method": "wanda", "sparsity": 0.5},
              "recovery": {"steps": 3, "lr": 1e-3, "batch_size": 2, "schedule": schedule}}
    compress(model, recipe, calibration, device="cpu")
    assert min(zero_shares(model)) >= 0.5
    if not schedule:  # the same mask as Wanda alone, other values
        for ours, theirs in zip(layer_linears(model), layer_linears(pruned_only), strict=True):
            for name in ours:
                assert torch.equal(ours[name].weight == 0, theirs[name].weight == 0)
                assert not torch.equal(ours[name].weight, theirs[name].weight)


def test_prune_command_runs_every_stage_and_saves_a_smaller_model(tmp_path, model_dir, calib, caplog):  # noqa: F811
    recipe = tmp_path / "stages.yaml"
    recipe.write_text(yaml.safe_dump({
        "depth": {"blocks": 1},
        "width": {"unit": "heads", "amount": 0.5, "score": "weight"},
        "pruning": {"method": "wanda", "sparsity": 0.5},
        "evaluate": {"perplexity": ["wikitext2"], "max_windows": 1},
        "export": {"formats": ["compact"]},
    }))
    output = tmp_path / "out"
    assert main(["prune", str(model_dir), "--recipe", str(recipe), "--calibration", str(calib), "--output",
                 str(output), "--device", "cpu", "-q", "--seqlen", "16"]) == 0
    assert not [r for r in caplog.records if "whole model in host memory" in r.getMessage()]  # it streams
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.num_hidden_layers == 1 and model.config.num_key_value_heads == 1
    assert model.model.layers[0].self_attn.k_proj.out_features == model.config.head_dim
    record = read_record(output)
    assert len(record["stages"]["depth"]["removed"]) == 1
    assert record["stages"]["parameters_after"] < record["stages"]["parameters_before"]
    assert record["sparsity"]["overall"] >= 0.5
    assert set(record["evaluation"]["models"]) == {"base", "pruned"}
    assert (tmp_path / "out-compact").is_dir() and (output / "README.md").exists()


def test_a_whole_model_stage_says_so_before_loading(tmp_path, model_dir, calib, caplog):  # noqa: F811
    recipe = tmp_path / "obd-width.yaml"
    recipe.write_text(yaml.safe_dump({"width": {"unit": "mlp", "amount": 0.25, "score": "obd"}}))
    assert main(["prune", str(model_dir), "--recipe", str(recipe), "--calibration", str(calib), "--output",
                 str(tmp_path / "out"), "--device", "cpu", "-q", "--seqlen", "16"]) == 0
    said = [r.getMessage() for r in caplog.records if "whole model in host memory" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("OBD needs the whole model in host memory: about ")


def test_a_stage_that_cannot_run_exits_2_and_writes_nothing(tmp_path, model_dir, calib, capsys):  # noqa: F811
    recipe = tmp_path / "too-deep.yaml"
    recipe.write_text(yaml.safe_dump({"depth": {"blocks": 5}}))
    output = tmp_path / "out"
    assert main(["prune", str(model_dir), "--recipe", str(recipe), "--calibration", str(calib), "--output",
                 str(output), "--device", "cpu", "-q"]) == 2
    error = capsys.readouterr().err
    assert "llm-sparsify: error: cannot remove 5 span(s)" in error and "Traceback" not in error
    assert not output.exists() and not list(tmp_path.glob(".out*"))


# --- the API runs the whole recipe (issue 19, item 3) ---------------------------------------------------------------

SECTIONS = {"pruning": {"method": "wanda", "sparsity": 0.5},
            "evaluate": {"perplexity": ["wikitext2"], "max_windows": 1}, "export": {"formats": ["compact"]}}


def test_prune_checkpoint_runs_the_evaluate_and_export_sections(tmp_path, model_dir, calib, monkeypatch):  # noqa: F811
    from llm_sparsify import finish, prune_checkpoint
    from llm_sparsify.finish import Steps

    output = tmp_path / "out"
    events, loads = [], []
    load_model = finish.load_model
    monkeypatch.setattr(finish, "load_model", lambda name, **kw: loads.append(name) or load_model(name, **kw))
    record = prune_checkpoint(str(model_dir), SECTIONS, output, str(calib), device="cpu", seqlen=16,
                              steps=Steps(ppl=True, ppl_windows=1), on_event=lambda *event: events.append(event))
    layers = [value for kind, value in events if kind == "layer"]
    steps = [event for event in events if event[0] not in ("walk", "layer", "progress")]
    assert [kind for kind, _ in steps] == ["saved", "perplexity", "evaluation", "export"]  # each as it finished
    loops = [(value["what"], value["done"], value["total"]) for kind, value in events if kind == "progress"]
    shards = loops[-1][2]  # one window of --ppl, then of `evaluate:`, for the base and the pruned model
    compact = [("compact", i, shards) for i in range(shards + 1)]
    assert loops == [("perplexity", 0, 1), ("perplexity", 1, 1)] * 4 + compact
    assert events[0] == ("walk", {"pass": "wanda 0.5", "layers": len(layers), "done": 0})
    assert events.index(steps[0]) == 1 + len(layers)  # every layer's event came before the output was saved
    assert [(layer["pass"], layer["index"]) for layer in layers] == [("wanda 0.5", i) for i in range(len(layers))]
    assert [layer["seconds"] for layer in layers] == [report["seconds"] for report in record["layers"]]
    assert steps[0][1]["recipe_name"] == record["recipe_name"]
    assert loads == [str(model_dir), str(output)]  # each model once for --ppl and `evaluate:` both
    done = record["steps"]
    assert set(done["evaluation"]) == {"base", "pruned"} and set(done["perplexity"]) == {"base", "pruned"}
    assert [export["path"] for export in done["exports"]] == [str(tmp_path / "out-compact")]
    assert (tmp_path / "out-compact").is_dir() and (output / "README.md").exists()
    assert read_record(output)["evaluation"]["models"] == done["evaluation"]
    again = prune_checkpoint(str(model_dir), SECTIONS, output, str(calib), device="cpu", seqlen=16,
                             steps=Steps(ppl=True, ppl_windows=1))
    assert again["steps"] == {}  # the same call again: pruned, evaluated and exported already


def test_compress_runs_the_sections_on_its_output_and_refuses_them_without_one(tmp_path):
    model, calibration = tiny_model("llama"), torch.randint(0, 128, (4, 16))
    with pytest.raises(RecipeError, match="evaluate, export run on a saved output"):
        compress(model, SECTIONS, calibration, device="cpu")
    assert zero_shares(model) == zero_shares(tiny_model("llama"))  # refused before any work
    recipe = {key: SECTIONS[key] for key in ("pruning", "export")}  # a random model has no tokenizer to evaluate
    events = []
    owl = {**recipe, "pruning": {**recipe["pruning"], "allocation": "owl"}}
    compress(model, owl, calibration, device="cpu", output=tmp_path / "out",
             on_event=lambda *event: events.append(event))
    assert min(zero_shares(model)) >= 0.4
    walks = [(kind, value["pass"], value.get("index")) for kind, value in events if kind in ("walk", "layer")]
    count = len(walks) // 2 - 1  # a score pass, then the transform pass, each over every layer in order
    assert walks == [(kind, name, i) for name in ("OWL outlier ratios", "wanda 0.5")
                     for kind, i in [("walk", None)] + [("layer", i) for i in range(count)]]
    assert [kind for kind, _ in events[len(walks):] if kind != "progress"] == ["saved", "export"]
    assert read_record(tmp_path / "out")["recipe"]["pruning"]["method"] == "wanda"
    assert (tmp_path / "out-compact").is_dir() and (tmp_path / "out" / "README.md").exists()
