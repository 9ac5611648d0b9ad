"""The llm-sparsify command line end to end, on a tiny random Llama that uses the default model's tokenizer."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from llm_sparsify.cli import main
from llm_sparsify.export.hf import RECORD, read_record
from llm_sparsify.finish import export_path
from llm_sparsify.models import load_model
from llm_sparsify.recipe import builtin_recipes, load_recipe
from tests.conftest import save_tiny_llama

RECIPES = Path(__file__).parents[1] / "recipes"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


def prune_args(model_dir, calib, output, *extra, recipe="wanda-2of4"):
    return ["prune", str(model_dir), "--recipe", str(recipe), "--calibration", str(calib), "--output", str(output),
            "--device", "cpu", "-q", *extra]


@pytest.fixture(scope="module")
def pruned(workdir, model_dir, calib):
    out = workdir / "out"
    assert main(prune_args(model_dir, calib, out)) == 0
    return out


def decoder_linears(model) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": module.weight.detach()
            for i, layer in enumerate(model.model.layers)
            for name, module in layer.named_modules() if isinstance(module, nn.Linear)}


def assert_2of4(path) -> None:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    weights = decoder_linears(model)
    assert len(weights) == 14
    for name, weight in weights.items():
        zeros = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1)
        assert (zeros == 2).all(), name  # exactly two of every four consecutive inputs removed


def no_leftovers(directory) -> bool:
    return not any(".partial" in p.name or p.name.endswith(".old") for p in directory.iterdir())


# --- prune ------------------------------------------------------------------------------------------------------


def test_prune_writes_a_2of4_checkpoint(pruned, model_dir):
    assert_2of4(pruned)
    for name in ("config.json", "model.safetensors.index.json", "tokenizer.json", RECORD):
        assert (pruned / name).exists(), name
    record = read_record(pruned)
    assert record["recipe_name"] == "wanda-2of4"
    assert record["recipe"]["pruning"]["sparsity"] == "2:4"
    assert record["base_model"] == str(model_dir)
    assert record["calibration"]["nsamples"] == 4 and record["calibration"]["seqlen"] == 16
    assert record["sparsity"]["overall"] == pytest.approx(0.5)
    assert set(record["sparsity"]["by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"}
    assert no_leftovers(pruned.parent)


def test_prune_leaves_the_input_model_alone(pruned, model_dir):
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert all((w != 0).all() for w in decoder_linears(original).values())


def test_prune_prints_a_summary(tmp_path, model_dir, calib, capsys):
    out = tmp_path / "out"
    assert main(prune_args(model_dir, calib, out)) == 0
    stdout = capsys.readouterr().out
    assert "with wanda-2of4" in stdout
    assert "50.00% of the targeted weights are zero" in stdout
    assert f"saved to {out}" in stdout


def test_prune_again_without_overwrite_is_refused(pruned, model_dir, calib, capsys):
    """With other settings (here the seed); the same command again only does the steps after pruning (see
    tests/test_trust_inputs.py)."""
    before = {f.name: f.read_bytes() for f in pruned.glob("*.safetensors")}
    record = (pruned / RECORD).read_text()
    capsys.readouterr()
    assert main(prune_args(model_dir, calib, pruned, "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert "already exists" in err
    assert "--overwrite" in err
    assert {f.name: f.read_bytes() for f in pruned.glob("*.safetensors")} == before
    assert (pruned / RECORD).read_text() == record


def test_prune_with_overwrite_replaces_the_output(tmp_path, pruned, model_dir, calib):
    out = tmp_path / "out"
    shutil.copytree(pruned, out)
    (out / "stale.txt").write_text("from an earlier run")
    assert main(prune_args(model_dir, calib, out, "--overwrite")) == 0
    assert not (out / "stale.txt").exists()
    assert_2of4(out)
    assert no_leftovers(tmp_path)


def test_prune_with_text_calibration(tmp_path, model_dir):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 37} and more text" for i in range(60)))
    out = tmp_path / "out"
    args = prune_args(model_dir, text, out, recipe="magnitude-50")
    assert main(args) == 0
    record = read_record(out)
    assert record["recipe"]["pruning"]["method"] == "magnitude"
    assert record["calibration"] == {}  # magnitude pruning reads no data
    assert record["sparsity"]["overall"] == pytest.approx(0.5)


def test_bad_recipe_file_fails_before_any_work(tmp_path, model_dir, calib, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("pruning:\n  method: wanda\n  sparsity: 1.5\n")
    out = tmp_path / "out"
    args = prune_args(model_dir, calib, out, recipe=recipe)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert "bad.yaml" in err and "strictly between 0 and 1" in err
    assert not out.exists()
    assert no_leftovers(tmp_path)


def test_unknown_recipe_name(tmp_path, model_dir, calib, capsys):
    out = tmp_path / "out"
    args = prune_args(model_dir, calib, out)
    args[args.index("wanda-2of4")] = "wanda-99"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "neither a file nor a built-in recipe" in err and "wanda-50" in err
    assert not out.exists()


def test_model_path_that_is_not_a_checkpoint(tmp_path, calib, capsys):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("hello")
    out = tmp_path / "out"
    assert main(prune_args(not_a_model, calib, out, recipe="wanda-50")) == 2
    err = capsys.readouterr().err
    assert "error: could not load model" in err
    assert not out.exists()


def test_bad_calibration_file(tmp_path, model_dir, capsys):
    bad = tmp_path / "calib.jsonl"
    bad.write_text(json.dumps({"content": "no text field"}) + "\n")
    out = tmp_path / "out"
    assert main(prune_args(model_dir, bad, out)) == 2
    assert '"text" field' in capsys.readouterr().err
    assert not out.exists()
    assert no_leftovers(tmp_path)


def test_nm_pattern_that_does_not_divide_in_features(tmp_path, model_dir, calib, capsys):
    recipe = tmp_path / "odd.yaml"
    recipe.write_text('pruning:\n  method: wanda\n  sparsity: "3:7"\n')
    out = tmp_path / "out"
    args = prune_args(model_dir, calib, out, recipe=recipe)
    assert main(args) == 2
    assert "needs in_features divisible by 7" in capsys.readouterr().err
    assert not out.exists()


# --- eval -------------------------------------------------------------------------------------------------------


def test_eval_prints_json_with_a_finite_perplexity(pruned, capsys):
    capsys.readouterr()
    assert main(["eval", str(pruned), "--seqlen", "16", "--max-windows", "2", "--json", "--device", "cpu"]) == 0
    [result] = json.loads(capsys.readouterr().out)  # one record per model
    assert result["model"] == str(pruned)
    assert result["dataset"] == "wikitext2"
    assert result["seqlen"] == 16
    assert result["windows"] == 2
    assert math.isfinite(result["perplexity"])
    assert result["perplexity"] > 1


def test_eval_of_a_text_file_prints_a_line(tmp_path, model_dir, capsys):
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"word{i % 23}" for i in range(200)))
    assert main(["eval", str(model_dir), "--dataset", str(text), "--seqlen", "16", "--max-windows", "3",
                 "--device", "cpu", "-q"]) == 0
    stdout = capsys.readouterr().out
    assert f"{model_dir}: {text} perplexity" in stdout
    assert "(seqlen 16, 3 windows)" in stdout


def test_eval_of_two_models_prints_them_side_by_side_and_writes_json(tmp_path, model_dir, pruned, capsys):
    out = tmp_path / "results.json"
    assert main(["eval", str(model_dir), str(pruned), "--seqlen", "16", "--max-windows", "2", "--json", str(out),
                 "--device", "cpu", "-q"]) == 0
    records = json.loads(out.read_text())
    assert [r["model"] for r in records] == [str(model_dir), str(pruned)]
    assert all(r["windows"] == 2 and math.isfinite(r["perplexity"]) for r in records)
    assert records[0]["perplexity"] != records[1]["perplexity"]  # the pruned model is another model
    table = capsys.readouterr().out.splitlines()
    assert table[0] == f"| task | metric | {model_dir} | {pruned} |"
    assert table[2] == (f"| wikitext2 | perplexity | {records[0]['perplexity']:.4f} | "
                        f"{records[1]['perplexity']:.4f} |")
    assert no_leftovers(tmp_path)


def test_eval_with_nothing_to_evaluate(capsys):
    assert main(["eval", "--no-perplexity", "--device", "cpu", "-q"]) == 2
    assert "error: nothing to evaluate: --no-perplexity needs --tasks" in capsys.readouterr().err


def test_eval_of_a_missing_model(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--seqlen", "16", "--max-windows", "1", "--device", "cpu", "-q"]) == 2
    assert "error: could not load model" in capsys.readouterr().err


# --- argument parsing -------------------------------------------------------------------------------------------


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    stdout = capsys.readouterr().out
    assert "prune" in stdout and "eval" in stdout


def test_eval_help_lists_the_tasks_and_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    stdout = capsys.readouterr().out
    for text in ("--tasks", "--limit", "--data-dir", "--no-perplexity", "--json", "LLM_SPARSIFY_TASK_DATA", "piqa",
                 "winogrande", "lambada_openai"):
        assert text in stdout, text


def test_prune_help_lists_the_builtin_recipes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--help"])
    assert exit_info.value.code == 0
    stdout = capsys.readouterr().out
    assert "--overwrite" in stdout and "wanda-2of4" in stdout


def test_missing_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_unknown_dtype_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--dtype", "int8"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# --- bad input found in review: each ends in a clear error ---------------------------------------------------


def test_missing_pt_calibration_file(tmp_path, model_dir, capsys):
    out = tmp_path / "out"
    assert main(prune_args(model_dir, tmp_path / "nope.pt", out)) == 2
    assert "error:" in capsys.readouterr().err


def test_eval_text_shorter_than_a_window(tmp_path, model_dir, capsys):
    text = tmp_path / "short.txt"
    text.write_text("only a few words")
    assert main(["eval", str(model_dir), "--dataset", str(text), "--seqlen", "64", "--device", "cpu", "-q"]) == 2
    assert "error:" in capsys.readouterr().err


def test_prune_writes_a_model_card_with_the_command(pruned):
    card = (pruned / "README.md").read_text()
    assert "wanda-2of4" in card and "llm-sparsify prune" in card
    assert (pruned / "llm_sparsify_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prune_with_ppl_prints_both_perplexities_and_puts_them_in_the_card(tmp_path, model_dir, calib, capsys):
    out = tmp_path / "out"
    assert main(prune_args(model_dir, calib, out, "--ppl", "--ppl-windows", "2")) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("WikiText-2 perplexity"))
    printed = [float(x) for x in line.split(": base ")[1].split(" -> pruned ")]
    models = read_record(out)["evaluation"]["models"]
    base, pruned = (models[label]["wikitext2"]["perplexity"] for label in ("base", "pruned"))
    assert [base, pruned] == pytest.approx(printed, abs=1e-3)
    card = (out / "README.md").read_text()
    assert "over 2 windows of" in card and f"| wikitext2 | perplexity | {base:.4f} | {pruned:.4f} |" in card


@pytest.mark.parametrize("pruning", ["", "pruning: {method: wanda, sparsity: 0.5}\n"])
def test_prune_with_structure_stages_writes_a_card_that_says_what_was_removed(tmp_path, model_dir, calib, pruning):
    """A recipe of depth and width stages, with and without a pruning stage: the model, the card, the plot."""
    recipe = tmp_path / "structure.yaml"
    recipe.write_text("depth: {blocks: 1}\nwidth: {unit: mlp, amount: 0.25}\n" + pruning)
    out = tmp_path / "out"
    assert main(prune_args(model_dir, calib, out, recipe=recipe)) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 1 and model.model.layers[0].mlp.gate_proj.out_features == 48
    stages = read_record(out)["stages"]
    card = (out / "README.md").read_text()
    assert f"removed decoder blocks {stages['depth']['removed'][0]} of the base model (cosine score)" in card
    assert "removed 25% of the MLP channels" in card and "MLP channels kept per layer: 48/64." in card
    assert f"Parameters: {stages['parameters_before']:,} → {stages['parameters_after']:,}" in card
    assert ("## Sparsity" in card) == bool(pruning) and ("wanda" in card) == bool(pruning)
    assert (out / "llm_sparsify_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # at least the depth panel


@pytest.fixture(scope="module")
def six_layer_dir(workdir):
    """Six layers, so that depth-cosine-4 has blocks to spare."""
    return save_tiny_llama(workdir / "six-layers", hidden=64, layers=6)


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name.startswith("edge-") else name
                                  for name in builtin_recipes()])  # edge-*: recovery and evaluation, minutes
def test_every_shipped_recipe_runs_from_the_command_line(tmp_path, six_layer_dir, name, one_thread):
    """Each recipe in recipes/, end to end on the bundled C4 sample: exit 0, a model that loads and runs, a card.

    The tiny model's 49152-token embeddings outweigh its six blocks, so no plan reaches edge-half's 49% of the
    file (test_edge_half_on_a_model_too_small_for_it): it runs here with the size such a model can reach."""
    out = tmp_path / "out"
    recipe_arg = name
    if name == "edge-half":
        recipe_arg = str(tmp_path / "edge-half.yaml")
        text = (RECIPES / "edge-half.yaml").read_text()
        assert "size: 0.49\n" in text
        (tmp_path / "edge-half.yaml").write_text(text.replace("size: 0.49\n", "size: 0.85\n"))
    assert main(["prune", str(six_layer_dir), "--recipe", recipe_arg, "--output", str(out), "--nsamples", "4",
                 "--seqlen", "32", "--device", "cpu", "-q"]) == 0
    recipe = load_recipe(recipe_arg)
    model, _ = load_model(str(out))  # unequal widths (a budget plan) too
    assert torch.isfinite(model(torch.arange(16)[None]).logits).all()
    removed = read_record(out)["stages"]["budget"]["removed"] if recipe.budget else []
    assert len(model.model.layers) == 6 - (recipe.depth.blocks if recipe.depth else 0) - len(removed)
    if recipe.width:
        assert model.model.layers[0].mlp.gate_proj.out_features == round(128 * (1 - recipe.width.amount))
    if recipe.method and recipe.method != "magnitude" and isinstance(recipe.pattern, float):
        # per row, floor(sparsity × inputs) of 64 or 128 inputs; OWL's is a mean over layers
        assert read_record(out)["sparsity"]["overall"] >= recipe.pattern - 1 / 64
    assert f"compressed with {recipe.name}" in (out / "README.md").read_text()
    for fmt in recipe.export.formats if recipe.export else ():
        assert export_path(out, fmt, recipe.export.qtype).exists(), fmt


def test_edge_half_on_a_model_too_small_for_it_is_refused_before_any_work(tmp_path, six_layer_dir, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(six_layer_dir), "--recipe", "edge-half", "--output", str(out), "--nsamples", "4",
                 "--seqlen", "32", "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "budget size 0.490 of dense is below" in err, err
    assert not out.exists()


def test_export_compact_restores_the_checkpoint_and_reports_sizes(tmp_path, pruned, capsys):
    from llm_sparsify.export.compact import load_compact

    out = tmp_path / "compact"
    assert main(["export", str(pruned), "--format", "compact", "--output", str(out), "-q"]) == 0
    assert "MiB" in capsys.readouterr().out
    restored = decoder_linears(load_compact(out))
    original = decoder_linears(AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32))
    assert restored.keys() == original.keys() and all(torch.equal(restored[k], original[k]) for k in original)


def test_export_gguf_writes_a_file_transformers_reads(tmp_path, pruned):
    out = tmp_path / "model.gguf"
    assert main(["export", str(pruned), "--format", "gguf", "--qtype", "F32", "--output", str(out), "-q"]) == 0
    reloaded = decoder_linears(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name))
    original = decoder_linears(AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32))
    assert all(torch.equal(reloaded[k], original[k]) for k in original)  # F32: exact, q/k order restored


def test_export_speed_measures_the_gguf_against_the_dense_model_in_llama_cpp(tmp_path, pruned, capsys):
    pytest.importorskip("llama_cpp")
    copy = shutil.copytree(pruned, tmp_path / "pruned")  # the record gains the figures
    out = tmp_path / "model.gguf"
    assert main(["export", str(copy), "--format", "gguf", "--qtype", "Q8_0", "--output", str(out), "--speed",
                 "--threads", "1", "-q"]) == 0
    report = read_record(copy)["deployment"]["gguf Q8_0"]
    assert report["runtime"] == "llama.cpp" and report["threads"] == 1
    assert report["pruned"]["bytes"] == out.stat().st_size
    assert report["dense"]["bytes"] > 0.9 * out.stat().st_size  # a 2:4-sparse Q8_0 file is no smaller than dense
    assert all(report[m][k] > 0 for m in ("dense", "pruned") for k in ("prefill_tokens_per_s", "decode_tokens_per_s"))
    assert "decode_tokens_per_s" in capsys.readouterr().out
    assert "## Deployment" in (copy / "README.md").read_text()


def test_export_speed_is_refused_before_any_work_where_it_cannot_be_measured(tmp_path, pruned, capsys, monkeypatch):
    out = tmp_path / "ct"
    assert main(["export", str(pruned), "--format", "compact", "--output", str(out), "--speed", "-q"]) == 2
    assert "GGUF exports" in capsys.readouterr().err and not out.exists()
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else
                        find_spec(name, *a))
    out = tmp_path / "model.gguf"
    assert main(["export", str(pruned), "--format", "gguf", "--output", str(out), "--speed", "-q"]) == 2
    assert "pip install llama-cpp-python" in capsys.readouterr().err and not out.exists()


def test_speed_of_checkpoints_in_transformers(pruned, model_dir):
    from llm_sparsify.export.speed import measure_speed

    speed = measure_speed({"dense": model_dir, "pruned": pruned}, threads=1, prompt=8, new=4, rounds=2)
    assert list(speed) == ["dense", "pruned"]
    assert all(s["prefill_tokens_per_s"] > 0 and s["decode_tokens_per_s"] > 0 for s in speed.values())


def test_export_of_an_unquantized_checkpoint_to_compressed_tensors_is_refused(tmp_path, pruned, capsys):
    out = tmp_path / "ct"
    assert main(["export", str(pruned), "--format", "compressed-tensors", "--output", str(out), "-q"]) == 2
    assert "quantization" in capsys.readouterr().err
    assert not out.exists() and no_leftovers(tmp_path)


def test_export_of_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "gguf", "--output", str(tmp_path / "x.gguf"), "-q"]) == 2
    assert "llm-sparsify: error:" in capsys.readouterr().err


def test_bars_follow_walks_and_other_loops_and_close_when_done():
    from llm_sparsify.cli import Bars

    bars = Bars()
    assert bars("walk", {"pass": "wanda 0.5", "layers": 3, "done": 1})  # a resumed walk: 1 of 3 already written
    assert bars.left == 2
    bars("layer", {"pass": "wanda 0.5", "index": 1, "layers": 3, "seconds": 0.1})
    assert bars.bar is not None and bars.left == 1
    bars("layer", {"pass": "wanda 0.5", "index": 2, "layers": 3, "seconds": 0.1})
    assert bars.bar is None
    bars("progress", {"what": "perplexity", "done": 0, "total": 2, "unit": "window"})
    bars("progress", {"what": "perplexity", "done": 1, "total": 2, "unit": "window"})
    assert bars.bar is not None and bars.left == 1
    bars("progress", {"what": "compact", "done": 0, "total": 1, "unit": "shard"})  # the loop before stopped short
    assert bars.bar is not None and bars.left == 1
    bars("progress", {"what": "compact", "done": 1, "total": 1, "unit": "shard"})
    assert bars.bar is None
    assert not bars("saved", {})  # not a bar's


def budget_recipe(tmp_path, speed: bool):
    path = tmp_path / "edge.yaml"
    path.write_text(f"budget: {{size: 0.8, qtype: Q4_0, levels: 2, samples: 2}}\n"
                    f"export: {{formats: [gguf], qtype: Q4_0, speed: {str(speed).lower()}}}\n")
    return path


def test_a_budget_recipe_prunes_exports_and_times_its_gguf(tmp_path, model_dir, calib, capsys):
    """The plan's tensor bytes are the GGUF's (its output layer at the planned type), under the budget; with
    llama.cpp, export.speed times the file against the dense one."""
    import gguf

    speed = importlib.util.find_spec("llama_cpp") is not None
    out = tmp_path / "edge"
    assert main(prune_args(model_dir, calib, out, recipe=budget_recipe(tmp_path, speed))) == 0
    printed = capsys.readouterr().out
    record = read_record(out)
    budget = record["stages"]["budget"]
    assert "budget plan, predicted" in printed and budget["predicted"]["size"] <= 0.8
    written = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(tmp_path / "edge-Q4_0.gguf")).tensors)
    assert written == budget["predicted"]["tensor_bytes"] <= 0.8 * budget["dense"]["tensor_bytes"]
    assert ("## Deployment" in (out / "README.md").read_text()) == speed
    if speed:
        assert record["deployment"]["gguf Q4_0"]["pruned"]["bytes"] == (tmp_path / "edge-Q4_0.gguf").stat().st_size


def test_a_recipe_asking_for_speed_without_llama_cpp_is_refused_before_any_work(tmp_path, model_dir, calib, capsys,
                                                                                monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else
                        find_spec(name, *a))
    out = tmp_path / "edge"
    assert main(prune_args(model_dir, calib, out, recipe=budget_recipe(tmp_path, True))) == 2
    assert "pip install llama-cpp-python" in capsys.readouterr().err and not out.exists()
