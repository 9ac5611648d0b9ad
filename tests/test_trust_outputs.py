"""Resume continues only the run it belongs to, and --overwrite replaces only what llm-sparsify wrote (issue 16)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llm_sparsify import prune_checkpoint
from llm_sparsify.cli import main
from llm_sparsify.export import compact
from llm_sparsify.export.compact import save_compact
from llm_sparsify.files import (
    MARKER,
    RECORD,
    OutputExistsError,
    OutputOverlapError,
    atomic_file,
    check_output,
    written_by_us,
)
from llm_sparsify.models import ModelError
from llm_sparsify.stream import PROGRESS, PartialOutput, model_content
from tests.conftest import tiny_model
from tests.test_stream import output_tensors, save_sharded


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return save_sharded(tiny_model(), tmp_path / "model")


def interrupted_run(checkpoint: Path, output: Path, calibration: torch.Tensor, layers: int = 1) -> Path:
    """Run a prune that stops, as if killed, once `layers` layers are recorded as finished; return its partial."""
    layer_done = PartialOutput.layer_done

    def stop_after(self, report):
        layer_done(self, report)
        if len(self.finished) == layers:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PartialOutput, "layer_done", stop_after)
        with pytest.raises(KeyboardInterrupt):
            prune_checkpoint(str(checkpoint), "wanda-50", output, calibration, device="cpu")
    partial = output.with_name(f".{output.name}.partial")
    assert len(json.loads((partial / PROGRESS).read_text())["layers"]) == layers
    return partial


def headers(checkpoint: Path) -> dict[str, bytes]:
    """The safetensors header (length and JSON) of every shard."""
    result = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        data = shard.read_bytes()
        result[shard.name] = data[:8 + int.from_bytes(data[:8], "little")]
    return result


def stderr_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("llm-sparsify: error: ") and err.count("\n") == 1, err  # one line, no traceback
    return err


# --- 1. resume checks what it resumes -----------------------------------------------------------------------------


def test_resume_refuses_other_weights_of_the_same_shapes_under_the_same_path(tmp_path, checkpoint, calibration):
    output = tmp_path / "out"
    interrupted_run(checkpoint, output, calibration)
    before = headers(checkpoint)
    shutil.rmtree(checkpoint)
    save_sharded(tiny_model(seed=1), checkpoint)  # another model's weights, same names, shapes and offsets
    assert headers(checkpoint) == before  # so a header alone would not tell them apart
    with pytest.raises(OutputExistsError, match=r"other settings \(model content\).*--overwrite to start over"):
        prune_checkpoint(str(checkpoint), "wanda-50", output, calibration, device="cpu")
    assert not output.exists()

    record = prune_checkpoint(str(checkpoint), "wanda-50", output, calibration, device="cpu", overwrite=True)
    assert record["resumed_after_layers"] == 0  # started over: nothing of the old weights is mixed in
    fresh = tmp_path / "fresh"
    prune_checkpoint(str(checkpoint), "wanda-50", fresh, calibration, device="cpu")
    expected, got = output_tensors(fresh), output_tensors(output)
    assert expected.keys() == got.keys() and all(torch.equal(expected[n], got[n]) for n in expected)


def test_the_same_content_resumes_even_copied_elsewhere(tmp_path, checkpoint, calibration):
    output = tmp_path / "out"
    interrupted_run(checkpoint, output, calibration)
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint, moved)  # new path, new modification times, same content
    shutil.rmtree(checkpoint)
    record = prune_checkpoint(str(moved), "wanda-50", output, calibration, device="cpu")
    assert record["resumed_after_layers"] == 1
    uninterrupted = tmp_path / "uninterrupted"
    prune_checkpoint(str(moved), "wanda-50", uninterrupted, calibration, device="cpu")
    expected, got = output_tensors(uninterrupted), output_tensors(output)
    assert all(torch.equal(expected[n], got[n]) for n in expected)


def test_resume_refuses_other_tokens_or_recipe_and_names_them(tmp_path, checkpoint, calibration):
    output = tmp_path / "out"
    interrupted_run(checkpoint, output, calibration)
    with pytest.raises(OutputExistsError, match=r"\(calibration tokens\)"):
        prune_checkpoint(str(checkpoint), "wanda-50", output, calibration.roll(1, 1), device="cpu")
    with pytest.raises(OutputExistsError, match=r"\(recipe\)"):
        prune_checkpoint(str(checkpoint), "sparsegpt-50", output, calibration, device="cpu")


def test_model_content_changes_with_any_tensor_and_names_a_damaged_shard(tmp_path, checkpoint):
    content = model_content(checkpoint)
    assert model_content(shutil.copytree(checkpoint, tmp_path / "copy")) == content
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] += 1  # one weight, near the start of one tensor
    changed = save_sharded(model, tmp_path / "changed")
    assert headers(changed) == headers(checkpoint)
    differs = [shard for shard in content if model_content(changed)[shard] != content[shard]]
    assert len(differs) == 1 and differs[0].endswith(".safetensors")
    shard = checkpoint / differs[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ModelError, match=f"{differs[0]} is not a readable safetensors file"):
        model_content(checkpoint)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_a_damaged_shard_in_a_partial_is_one_line_that_says_overwrite_starts_over(tmp_path, checkpoint, calibration,
                                                                                    capsys, damage):
    output = tmp_path / "out"
    partial = interrupted_run(checkpoint, output, calibration, layers=2)
    shard = partial / sorted(json.loads((partial / PROGRESS).read_text())["files"])[1]  # the second layer's
    size = shard.stat().st_size
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: size // 2])
    elif damage == "garbage":
        shard.write_bytes(os.urandom(size))
    else:
        shard.unlink()
    ids = tmp_path / "ids.pt"
    torch.save(calibration, ids)
    command = ["prune", str(checkpoint), "--recipe", "wanda-50", "--calibration", str(ids), "--output", str(output),
               "--device", "cpu", "-q"]
    capsys.readouterr()
    assert main(command) == 2
    err = stderr_line(capsys)
    assert "unfinished run that is damaged" in err and shard.name in err and "--overwrite to start over" in err
    assert partial.exists() and not output.exists()

    record = prune_checkpoint(str(checkpoint), "wanda-50", output, calibration, device="cpu", overwrite=True)
    assert record["resumed_after_layers"] == 0 and not partial.exists()


def test_a_partial_directory_it_did_not_write_is_not_removed(tmp_path, checkpoint, calibration):
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="llm-sparsify did not write"):
            prune_checkpoint(str(checkpoint), "wanda-50", tmp_path / "out", calibration, device="cpu",
                             overwrite=overwrite)
    assert (partial / "notes.txt").read_text() == "mine"


# --- 2. --overwrite only replaces what llm-sparsify wrote ---------------------------------------------------------


@pytest.mark.parametrize("where", ["is", "lies inside", "contains"])
def test_prune_refuses_an_output_that_is_inside_or_around_the_input(tmp_path, checkpoint, calibration, capsys,
                                                                     where):
    output = {"is": checkpoint, "lies inside": checkpoint / "pruned", "contains": tmp_path}[where]
    files = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    ids = tmp_path / "ids.pt"
    torch.save(calibration, ids)
    capsys.readouterr()
    assert main(["prune", str(checkpoint), "--calibration", str(ids), "--output", str(output), "--overwrite",
                 "--device", "cpu", "-q"]) == 2
    assert f"{where} the input" in stderr_line(capsys)
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == files
    with pytest.raises(OutputOverlapError):
        prune_checkpoint(str(checkpoint), "wanda-50", output, calibration, device="cpu", overwrite=True)


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_overwrite_refuses_what_llm_sparsify_did_not_write(tmp_path, checkpoint, calibration, capsys, kind):
    output = tmp_path / "photos"
    if kind == "directory":
        (output / "2019").mkdir(parents=True)
        (output / "2019" / "a.jpg").write_bytes(b"jpeg")
    else:
        output.write_bytes(b"jpeg")
    ids = tmp_path / "ids.pt"
    torch.save(calibration, ids)
    capsys.readouterr()
    assert main(["prune", str(checkpoint), "--calibration", str(ids), "--output", str(output), "--overwrite",
                 "--device", "cpu", "-q"]) == 2
    assert "--overwrite only replaces what llm-sparsify wrote" in stderr_line(capsys)
    assert (output / "2019" / "a.jpg" if kind == "directory" else output).read_bytes() == b"jpeg"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.pt", "model", "photos"]  # no partial either


def test_export_onto_its_source_is_refused_and_the_source_stays_whole(checkpoint, capsys):
    files = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    capsys.readouterr()
    assert main(["export", str(checkpoint), "--format", "compact", "--output", str(checkpoint), "--overwrite"]) == 2
    assert "is the input" in stderr_line(capsys)
    assert capsys.readouterr().out == ""  # no "100% of the checkpoint"
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == files


def test_outputs_of_llm_sparsify_are_replaced_with_overwrite(tmp_path, checkpoint, calibration):
    pruned = tmp_path / "pruned"
    prune_checkpoint(str(checkpoint), "wanda-50", pruned, calibration, device="cpu")
    assert (pruned / RECORD).exists() and written_by_us(pruned)
    prune_checkpoint(str(checkpoint), "magnitude-50", pruned, calibration, device="cpu", overwrite=True)
    assert json.loads((pruned / RECORD).read_text())["recipe_name"] == "magnitude-50"

    dense = tmp_path / "dense-compact"
    save_compact(checkpoint, dense)  # a checkpoint without a record: the export is marked instead
    assert not (dense / RECORD).exists() and (dense / MARKER).exists()
    (dense / "stale.txt").write_text("x")
    save_compact(checkpoint, dense, overwrite=True)
    assert not (dense / "stale.txt").exists() and (dense / MARKER).exists()


def test_a_gguf_file_is_ours_only_with_our_metadata_key(tmp_path):
    foreign = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(foreign, "llama")
    writer.add_name("someone else's model")
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert not written_by_us(foreign)
    with pytest.raises(OutputExistsError, match="did not write"):
        check_output(foreign, overwrite=True)
    (tmp_path / "garbage.gguf").write_bytes(b"GGUF" + os.urandom(64))
    assert not written_by_us(tmp_path / "garbage.gguf")


def test_a_failed_export_into_an_existing_output_leaves_it_and_no_temporary_file(tmp_path, checkpoint, monkeypatch):
    output = save_compact(checkpoint, tmp_path / "compact")
    before = {p.name: p.read_bytes() for p in output.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(compact, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_compact(checkpoint, output, overwrite=True)
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compact", "model"]


def test_a_file_never_replaces_a_directory_and_a_failed_rename_leaves_no_temporary_file(tmp_path, monkeypatch):
    directory = tmp_path / "out.gguf"
    directory.mkdir()
    (directory / RECORD).write_text("{}")
    ran = False
    with pytest.raises(OutputExistsError, match="is a directory"), atomic_file(directory, overwrite=True):
        ran = True
    assert not ran and (directory / RECORD).exists()

    def refuse(*args):
        raise PermissionError("read-only")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError), atomic_file(tmp_path / "x.gguf") as tmp:
        tmp.write_text("data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]
