"""Streaming a checkpoint from disk to disk: same result as in memory, one layer at a time, resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llm_sparsify import prune_checkpoint
from llm_sparsify.files import OutputExistsError
from llm_sparsify.quantize.grid import GRIDS_FILE, load_grids
from llm_sparsify.recipe import Recipe, load_recipe
from llm_sparsify.stream import StreamedLayers
from llm_sparsify.transform_pass import prune_model
from tests.conftest import tiny_model

REPO = Path(__file__).resolve().parent.parent


def save_sharded(model, path: Path, dtype=torch.float32) -> Path:
    model.to(dtype).save_pretrained(path, max_shard_size="20KB")  # several shards, split mid-layer
    assert (path / "model.safetensors.index.json").exists()
    return path


def output_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for name, file in index.items():
        with safe_open(path / file, "pt") as f:
            tensors[name] = f.get_tensor(name)
    return tensors


@pytest.mark.parametrize("recipe", ["wanda-50", "sparsegpt-2of4", "magnitude-50",
                                    Recipe("magnitude", 0.5, options={"scope": "global"})])
def test_streamed_checkpoint_equals_pruning_in_memory(tmp_path, model, calibration, recipe):
    checkpoint = save_sharded(model, tmp_path / "in")
    recipe = load_recipe(recipe)
    record = prune_checkpoint(str(checkpoint), recipe, tmp_path / "out", calibration, device="cpu",
                              dtype=torch.float32, batch_size=4)
    prune_model(model, recipe, calibration, batch_size=4)
    streamed = output_tensors(tmp_path / "out")
    expected = {n: t for n, t in model.state_dict().items() if n in streamed}
    assert set(streamed) == set(expected)  # a tied lm_head is not stored twice
    for name, tensor in expected.items():
        assert torch.equal(streamed[name], tensor), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(reloaded(calibration).logits, model(calibration).logits)
    assert record["sparsity"]["overall"] >= 0.5
    assert not list(tmp_path.glob(".*"))  # no partial or temporary directory left behind


def test_only_one_layer_is_materialised_at_a_time(tmp_path, calibration, monkeypatch):
    checkpoint = save_sharded(tiny_model(), tmp_path / "in")
    seen = []
    load = StreamedLayers.load

    def checked_load(self, index, device, original=False):
        layer = load(self, index, device, original)
        real = [i for i, layer in enumerate(self.layers) if not next(layer.parameters()).is_meta]
        embeddings = self.model.get_input_embeddings().weight
        seen.append((real, embeddings.is_meta))
        return layer

    monkeypatch.setattr(StreamedLayers, "load", checked_load)
    prune_checkpoint(str(checkpoint), "sparsegpt-50", tmp_path / "out", calibration, device="cpu")
    assert seen == [([0], True), ([1], True), ([2], True)]


def test_output_keeps_the_checkpoint_dtype(tmp_path, calibration):
    checkpoint = save_sharded(tiny_model(), tmp_path / "in", dtype=torch.bfloat16)
    prune_checkpoint(str(checkpoint), "wanda-50", tmp_path / "out", calibration, device="cpu")  # float32 maths
    tensors = output_tensors(tmp_path / "out")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    weight = tensors["model.layers.1.mlp.up_proj.weight"]
    assert ((weight == 0).sum(1) == weight.shape[1] // 2).all()


def test_a_partial_run_with_other_settings_is_not_mixed_in(tmp_path, calibration):
    checkpoint = save_sharded(tiny_model(), tmp_path / "in")
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / "progress.json").write_text(json.dumps({"fingerprint": {"recipe": "other"}, "layers": []}))
    with pytest.raises(OutputExistsError, match="unfinished run with other settings.*--overwrite"):
        prune_checkpoint(str(checkpoint), "wanda-50", tmp_path / "out", calibration, device="cpu")
    prune_checkpoint(str(checkpoint), "wanda-50", tmp_path / "out", calibration, device="cpu", overwrite=True)
    assert (tmp_path / "out" / "llm_sparsify.json").exists() and not partial.exists()


# --- resume after SIGKILL --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    """A checkpoint with enough layers (and work per layer) for a run to be killed in the middle."""
    path = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    save_sharded(LlamaForCausalLM(config), path / "model", dtype=torch.bfloat16)
    torch.save(torch.randint(0, 256, (16, 128), generator=torch.Generator().manual_seed(0)), path / "ids.pt")
    return path


def prune_command(base: Path, output: Path, recipe: str = "sparsegpt-50", processes: int = 1) -> list[str]:
    launcher = [sys.executable, "-m"]
    if processes > 1:
        launcher += ["torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m"]
    return [*launcher, "llm_sparsify.cli", "prune", str(base / "model"), "--recipe", recipe, "--calibration",
            str(base / "ids.pt"), "--output", str(output), "--device", "cpu", "--batch-size", "4", "-q"]


# One thread per process, as torchrun sets it: the float results of a matrix product can depend on
# how many threads share it, and the distributed test compares processes bit for bit.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(command: list[str]) -> None:
    subprocess.run(command, cwd=REPO, env=ENV, check=True, stdout=subprocess.DEVNULL)


def run_killed_after(command: list[str], progress: Path, layers: int) -> None:
    """Start the command, SIGKILL it once `layers` layers are recorded as finished."""
    process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if progress.exists() and len(json.loads(progress.read_text() or "{}").get("layers", [])) >= layers:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def test_a_killed_run_resumes_to_the_same_checkpoint(resumable):
    uninterrupted = resumable / "uninterrupted"
    run(prune_command(resumable, uninterrupted))

    resumed = resumable / "resumed"
    run_killed_after(prune_command(resumable, resumed), resumable / ".resumed.partial" / "progress.json", 3)
    assert not resumed.exists()  # nothing that looks finished
    finished = json.loads((resumable / ".resumed.partial" / "progress.json").read_text())["layers"]
    assert 3 <= len(finished) < 8
    run(prune_command(resumable, resumed))

    record = json.loads((resumed / "llm_sparsify.json").read_text())
    assert record["resumed_after_layers"] >= 3
    assert len(record["layers"]) == 8 and all(layer["seconds"] > 0 for layer in record["layers"])
    first, second = output_tensors(uninterrupted), output_tensors(resumed)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert not (resumable / ".resumed.partial").exists()


def test_a_finished_output_is_not_overwritten_by_running_again(resumable):
    """The same command again prunes nothing (it only does the steps after pruning, none here); a command with other
    settings is refused."""
    output = resumable / "uninterrupted"
    if not output.exists():
        run(prune_command(resumable, output))
    before = output_tensors(output)
    written = {p.name: p.stat().st_mtime_ns for p in output.glob("*.safetensors")}
    same = subprocess.run(prune_command(resumable, output), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert same.returncode == 0, same.stderr
    other = subprocess.run([*prune_command(resumable, output), "--seed", "1"], cwd=REPO, env=ENV,
                           capture_output=True, text=True)
    assert other.returncode == 2 and "already exists" in other.stderr
    after = output_tensors(output)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert {p.name: p.stat().st_mtime_ns for p in output.glob("*.safetensors")} == written


# --- torchrun ------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["wanda-50", "sparsegpt-2of4", "sparsegpt-50-w4g128"])
def test_two_processes_give_the_same_checkpoint_as_one(resumable, recipe):
    """torchrun with the gloo backend: samples split across ranks, statistics summed, modules shared out (with
    their quantization grids and reconstruction errors)."""
    one, two = resumable / f"one-{recipe}", resumable / f"two-{recipe}"
    run(prune_command(resumable, one, recipe))
    run(prune_command(resumable, two, recipe, processes=2))
    record = json.loads((two / "llm_sparsify.json").read_text())
    assert record["processes"] == 2
    first, second = output_tensors(one), output_tensors(two)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    alone = json.loads((one / "llm_sparsify.json").read_text())["layers"]
    assert [layer["error"] for layer in record["layers"]] == [layer["error"] for layer in alone]
    assert all(len(layer["error"]) == 7 for layer in alone)
    if "w4" in recipe:
        grids, shared = load_grids(one / GRIDS_FILE), load_grids(two / GRIDS_FILE)
        assert grids.keys() == shared.keys() and len(grids) == 8 * 7
        for name in grids:
            assert torch.equal(grids[name].scale, shared[name].scale), name
            assert torch.equal(grids[name].zero_point, shared[name].zero_point), name


def test_other_weight_files_beside_the_shards_are_not_copied(tmp_path, calibration):
    checkpoint = save_sharded(tiny_model(), tmp_path / "in")
    torch.save({}, checkpoint / "pytorch_model.bin")  # e.g. a repo that ships both formats
    (checkpoint / "README.md").write_text("the base model's card")
    prune_checkpoint(str(checkpoint), "wanda-50", tmp_path / "out", calibration, device="cpu")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "pytorch_model.bin" not in names
    assert "the base model's card" not in (tmp_path / "out" / "README.md").read_text()  # the output's own card
    assert {"config.json", "generation_config.json", "llm_sparsify.json"} <= names
