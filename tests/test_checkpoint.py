"""Atomic output directories, and pruned checkpoints that reload with exactly the same zeros."""

from __future__ import annotations

import dataclasses
import json
import stat

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llm_sparsify.export.hf import RECORD, read_record, save_checkpoint
from llm_sparsify.files import MARKER, OutputExistsError, atomic_directory, check_output
from llm_sparsify.recipe import load_recipe
from llm_sparsify.transform_pass import prune_model


def leftovers(directory) -> list[str]:
    """Temporary or moved-aside entries that an output operation may have left next to its target."""
    return sorted(p.name for p in directory.iterdir() if ".partial" in p.name or p.name.endswith(".old"))


# --- atomic_directory -------------------------------------------------------------------------------------------


def test_success_renames_into_place(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        assert tmp != out
        assert tmp.parent == tmp_path  # beside the output, so the rename stays on one file system
        assert ".partial" in tmp.name
        assert not out.exists()  # nothing that looks finished while the block runs
        (tmp / "weights.bin").write_text("w")
    assert (out / "weights.bin").read_text() == "w"
    assert not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_missing_parents_are_created(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with atomic_directory(out) as tmp:
        (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1"


def test_exception_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(out) as tmp:
        (tmp / "half-written").write_text("partial")
        raise RuntimeError("boom")
    assert not out.exists()
    assert not tmp.exists()
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), atomic_directory(out) as tmp:
        (tmp / "x").write_text("1")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_exception_while_overwriting_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / RECORD).write_text("{}")  # an output of ours: --overwrite may replace it
    with pytest.raises(RuntimeError), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == [RECORD, "old.txt"]
    assert (out / "old.txt").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_existing_output_without_overwrite_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    ran = False
    refused = "already exists; choose another output or pass --overwrite"
    with pytest.raises(OutputExistsError, match=refused), atomic_directory(out):
        ran = True
    assert not ran  # refused before the work starts
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert (out / "old.txt").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_existing_file_without_overwrite_is_refused(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    with pytest.raises(OutputExistsError), atomic_directory(out):
        pass
    assert out.read_text() == "a file"


def test_output_exists_error_is_a_file_exists_error(tmp_path):
    (tmp_path / "x").write_text("1")
    with pytest.raises(FileExistsError):
        check_output(tmp_path, overwrite=False)
    (tmp_path / RECORD).write_text("{}")  # an output of ours: --overwrite may replace it
    check_output(tmp_path, overwrite=True)
    check_output(tmp_path / "missing", overwrite=False)


def test_existing_empty_directory_is_used(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with atomic_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new.txt"]  # no record: the marker says it is ours
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "shared.txt").write_text("old")
    (out / RECORD).write_text("{}")  # an output of ours: --overwrite may replace it
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "shared.txt").write_text("new")
        assert (out / "old.txt").exists()  # the old output stays until the new one is complete
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "shared.txt"]
    assert (out / "shared.txt").read_text() == "new"
    assert leftovers(tmp_path) == []


# --- save_checkpoint --------------------------------------------------------------------------------------------


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def decoder_linears(model) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": module.weight.detach().clone()
            for i, layer in enumerate(model.model.layers)
            for name, module in layer.named_modules() if isinstance(module, nn.Linear)}


@pytest.fixture(scope="module")
def pruned():
    model = tiny_llama()
    recipe = load_recipe("wanda-50")
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    reports = prune_model(model, recipe, calibration, device="cpu", batch_size=2)
    return model, recipe, reports


def test_save_checkpoint_reloads_with_the_same_zeros(tmp_path, pruned):
    model, recipe, reports = pruned
    record = {"recipe": recipe.to_dict(),
              "sparsity": {name: share for report in reports for name, share in report.sparsity.items()}}
    out = save_checkpoint(model, None, tmp_path / "ckpt", record)
    assert out == tmp_path / "ckpt"
    assert (out / "config.json").exists()
    assert (out / "model.safetensors").exists()
    assert leftovers(tmp_path) == []

    before = decoder_linears(model)
    assert len(before) == 2 * 7  # q, k, v, o, gate, up, down per layer
    for name, weight in before.items():
        assert (weight == 0).float().mean().item() == pytest.approx(0.5), name  # wanda-50: half of every row

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    after = decoder_linears(reloaded)
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name] == 0, before[name] == 0), name
        assert torch.equal(after[name], before[name]), name
    # what was not pruned comes back unchanged as well
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert (reloaded.model.embed_tokens.weight != 0).all()


def test_read_record_returns_the_recipe_and_sparsity(tmp_path, pruned):
    model, recipe, reports = pruned
    sparsity = {name: share for report in reports for name, share in report.sparsity.items()}
    record = {"recipe": recipe.to_dict(), "sparsity": sparsity}
    out = save_checkpoint(model, None, tmp_path / "ckpt", record)
    as_json = json.loads(json.dumps(record))  # tuples (targets, ignore) come back as lists
    assert json.loads((out / RECORD).read_text()) == as_json
    read = read_record(out)
    assert read == as_json
    assert read["recipe"]["pruning"]["targets"] == ["*"]
    assert read["recipe"]["pruning"]["method"] == "wanda"
    assert load_recipe(read["recipe"]) == dataclasses.replace(recipe, name="custom")  # the record runs again
    assert len(read["sparsity"]) == 14
    assert all(share == pytest.approx(0.5) for share in read["sparsity"].values())
    assert read_record(tmp_path) is None


def test_save_checkpoint_refuses_an_existing_output(tmp_path, pruned):
    model, recipe, _ = pruned
    out = save_checkpoint(model, None, tmp_path / "ckpt", {"recipe": recipe.to_dict(), "run": 1})
    with pytest.raises(OutputExistsError):
        save_checkpoint(model, None, out, {"recipe": recipe.to_dict(), "run": 2})
    assert read_record(out)["run"] == 1
    save_checkpoint(model, None, out, {"recipe": recipe.to_dict(), "run": 3}, overwrite=True)
    assert read_record(out)["run"] == 3
    assert leftovers(tmp_path) == []


def test_a_failing_save_leaves_nothing(tmp_path, pruned, monkeypatch):
    model, recipe, _ = pruned

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, None, tmp_path / "ckpt", {"recipe": recipe.to_dict()})
    assert list(tmp_path.iterdir()) == []


# --- bad input found in review: each ends in a clear error ---------------------------------------------------


def test_output_directory_gets_normal_permissions(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "x").write_text("1")
    reference = tmp_path / "reference"
    reference.mkdir()
    if stat.S_IMODE(reference.stat().st_mode) == 0o700:
        pytest.skip("umask 077: a plain mkdir gives 0700 as well")
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)


def test_overwrite_refuses_a_file_it_did_not_write(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    with pytest.raises(OutputExistsError, match="did not write"), atomic_directory(out, overwrite=True):
        pass
    assert out.read_text() == "a file"
    assert leftovers(tmp_path) == []
