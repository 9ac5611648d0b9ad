"""Compact sparse storage: every tensor restored bit for bit (2:4 and unstructured, float32 and bfloat16, stray
zeros, −0.0, integer codes of quantized checkpoints), and the bytes on disk that each layout should cost."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llm_sparsify import compress
from llm_sparsify.checkpoint import read_tensors, weight_map
from llm_sparsify.export import ExportError
from llm_sparsify.export.compact import (
    INDEX,
    decompress_compact,
    load_compact,
    pack_bits,
    pack_choices,
    pack_codes,
    save_compact,
    unpack_bits,
    unpack_choices,
    unpack_codes,
)
from llm_sparsify.export.hf import save_checkpoint
from llm_sparsify.files import OutputExistsError, disk_size
from llm_sparsify.quantize.grid import GRIDS_FILE, QuantScheme, rtn, save_grids
from tests.conftest import TINY, tiny_model

INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(INT[tensor.element_size()])


def save_pruned(path, sparsity: str = "2:4", dtype=torch.float32, stray_zeros: bool = False,
                quantize: int | None = None, tied: bool = True):
    """A tiny Llama magnitude-pruned to `sparsity`, in `dtype`, optionally with a few extra zeros and a −0.0 among
    the kept weights, or round-to-nearest quantized (grids beside it), saved as a checkpoint."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tied)).eval()
    compress(model, "magnitude-2of4" if sparsity == "2:4" else "magnitude-50", device="cpu")
    model.to(dtype)
    grids = {}
    with torch.no_grad():
        if stray_zeros:
            weight = model.model.layers[0].self_attn.q_proj.weight
            kept = weight.flatten().nonzero().flatten()
            weight.view(-1)[kept[:5]] = 0.0
            weight.view(-1)[kept[5]] = -0.0
        if quantize:
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and ".layers." in name:
                    rounded, grids[name] = rtn(module.weight, QuantScheme(quantize, 32))
                    module.weight.copy_(rounded)
    save_checkpoint(model, None, path, {"recipe_name": f"magnitude {sparsity}"})
    if grids:
        save_grids(grids, path / GRIDS_FILE)
    return path


def checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    files = weight_map(path)
    return read_tensors(path, files, list(files))


def assert_bit_identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(expected) <= set(got)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(bits(got[name]), bits(tensor)), name


def layouts(path) -> dict[str, dict]:
    return json.loads((path / INDEX).read_text())["tensors"]


def stored_bytes(path) -> int:
    """Bytes of the tensor data in the compact safetensors files (headers left out)."""
    total = 0
    for file in path.glob("compact-*.safetensors"):
        with safe_open(file, "pt") as f:
            total += sum(f.get_tensor(key).nbytes for key in f.keys())  # noqa: SIM118 (safe_open is no dict)
    return total


# --- bit for bit --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", ["2:4", "50%"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stray_zeros", [False, True])
def test_restores_every_tensor_bit_for_bit(tmp_path, sparsity, dtype, stray_zeros):
    checkpoint = save_pruned(tmp_path / "dense", sparsity, dtype, stray_zeros)
    expected = checkpoint_tensors(checkpoint)
    compact = save_compact(checkpoint, tmp_path / "compact")

    entries = layouts(compact)
    pruned_layout = "nm" if sparsity == "2:4" else "bitmask"
    for name, tensor in expected.items():
        layout = pruned_layout if ".layers." in name and tensor.ndim == 2 else "dense"
        assert entries[name]["layout"] == layout, name
    if sparsity == "2:4":
        assert {(e["n"], e["m"]) for e in entries.values() if e["layout"] == "nm"} == {(2, 4)}

    model = load_compact(compact)
    assert_bit_identical(model.state_dict(), expected)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again

    restored = decompress_compact(compact, tmp_path / "restored")
    assert sorted(p.name for p in restored.iterdir()) == sorted(p.name for p in checkpoint.iterdir())
    assert_bit_identical(checkpoint_tensors(restored), expected)
    ids = torch.arange(20)[None]
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(restored, dtype=dtype)(ids).logits,
                                   AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)(ids).logits,
                                   rtol=0, atol=0)


def test_negative_zero_comes_back_as_negative_zero(tmp_path):
    checkpoint = save_pruned(tmp_path / "dense", "2:4", torch.float32, stray_zeros=True, tied=False)
    name = "model.layers.0.self_attn.q_proj.weight"
    original = checkpoint_tensors(checkpoint)
    assert torch.signbit(original[name][original[name] == 0]).any()
    model = load_compact(save_compact(checkpoint, tmp_path / "compact"))
    assert torch.equal(torch.signbit(model.state_dict()[name]), torch.signbit(original[name]))
    assert_bit_identical(model.state_dict(), original)  # an untied lm_head is stored and restored too
    assert model.lm_head.weight is not model.model.embed_tokens.weight


# --- bytes --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", ["2:4", "50%"])
def test_stored_bytes_are_what_the_layout_costs(tmp_path, sparsity):
    """2:4: half the values and one byte per three groups of four (six choices each); unstructured: the kept values
    and one bit per weight; everything else as is."""
    checkpoint = save_pruned(tmp_path / "dense", sparsity, torch.bfloat16)
    expected = 0
    for name, tensor in checkpoint_tensors(checkpoint).items():
        if ".layers." in name and tensor.ndim == 2:
            if sparsity == "2:4":
                expected += tensor.numel() // 2 * tensor.element_size() + math.ceil(tensor.numel() / 4 / 3)
            else:
                expected += int((tensor != 0).sum()) * tensor.element_size() + math.ceil(tensor.numel() / 8)
        else:
            expected += tensor.nbytes
    compact = save_compact(checkpoint, tmp_path / "compact")
    assert stored_bytes(compact) == expected
    assert disk_size(compact) < disk_size(checkpoint)


@pytest.mark.parametrize("bits_", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_checkpoints_store_integer_codes(tmp_path, bits_, dtype):
    checkpoint = save_pruned(tmp_path / "dense", "2:4", dtype, quantize=bits_)
    expected = checkpoint_tensors(checkpoint)
    compact = save_compact(checkpoint, tmp_path / "compact")
    entries = layouts(compact)
    linears = [n for n, t in expected.items() if ".layers." in n and t.ndim == 2]
    assert all(entries[n].get("codes") == bits_ for n in linears)
    assert_bit_identical(load_compact(compact).state_dict(), expected)
    assert_bit_identical(checkpoint_tensors(decompress_compact(compact, tmp_path / "restored")), expected)

    codes = sum(math.ceil(expected[n].numel() // 2 * bits_ / 8) + math.ceil(expected[n].numel() / 12) for n in linears)
    others = sum(t.nbytes for n, t in expected.items() if n not in linears)
    assert stored_bytes(compact) == codes + others
    floats = save_compact(save_pruned(tmp_path / "float", "2:4", dtype), tmp_path / "float-compact")
    linear_floats = stored_bytes(floats) - others
    per_weight = (bits_ / 16 + 1 / 12) / (expected[linears[0]].element_size() / 2 + 1 / 12)  # 2:4 codes vs floats
    assert codes / linear_floats == pytest.approx(per_weight, rel=0.01)


def test_a_weight_off_its_grid_is_stored_as_floats(tmp_path):
    checkpoint = save_pruned(tmp_path / "dense", "2:4", torch.float32, quantize=4)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors = checkpoint_tensors(checkpoint)
    from safetensors.torch import save_file

    tensors[name] = tensors[name] * 1.001  # changed after quantization
    (checkpoint / "model.safetensors").unlink()
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    compact = save_compact(checkpoint, tmp_path / "compact")
    assert "codes" not in layouts(compact)[name]
    assert layouts(compact)["model.layers.1.mlp.down_proj.weight"]["codes"] == 4
    assert_bit_identical(load_compact(compact).state_dict(), tensors)


# --- packing ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 8, 13, 1000])
def test_packers_round_trip_and_bit_order(count):
    generator = torch.Generator().manual_seed(count)
    flags = torch.rand(count, generator=generator) > 0.5
    packed = pack_bits(flags)
    np.testing.assert_array_equal(packed.numpy(), np.packbits(flags.numpy(), bitorder="little"))
    assert torch.equal(unpack_bits(packed, count), flags)

    choices = torch.randint(0, 6, (count,), generator=generator)
    packed = pack_choices(choices, 6)
    assert packed.numel() == math.ceil(count / 3)  # 6^3 = 216 fits a byte
    assert torch.equal(unpack_choices(packed, 6, count), choices)
    assert int(pack_choices(torch.tensor([5, 4, 3]), 6)[0]) == 5 + 4 * 6 + 3 * 36

    codes = torch.randint(0, 16, (count,), generator=generator)
    packed = pack_codes(codes, 4)
    assert packed.numel() == math.ceil(count / 2) and int(packed[0]) & 0x0F == int(codes[0])
    assert torch.equal(unpack_codes(packed, 4, count).long(), codes)
    assert torch.equal(unpack_codes(pack_codes(codes * 16, 8), 8, count).long(), codes * 16)


# --- bad input and sizes --------------------------------------------------------------------------------------------


def test_bad_input_is_refused_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExportError, match="not a checkpoint"):
        save_compact(tmp_path / "missing", out / "c")
    (tmp_path / "weightless").mkdir()
    (tmp_path / "weightless" / "config.json").write_text(json.dumps(tiny_model().config.to_dict()))
    with pytest.raises(ExportError, match="safetensors"):
        save_compact(tmp_path / "weightless", out / "c")
    with pytest.raises(ExportError, match="not a compact checkpoint"):
        load_compact(tmp_path / "weightless")
    with pytest.raises(ExportError, match="not a compact checkpoint"):
        decompress_compact(tmp_path / "weightless", out / "d")
    checkpoint = save_pruned(tmp_path / "dense")
    compact = save_compact(checkpoint, tmp_path / "compact")
    with pytest.raises(ExportError, match="already compact"):
        save_compact(compact, out / "c")
    with pytest.raises(OutputExistsError):
        save_compact(checkpoint, compact)
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compact", "dense", "out", "weightless"]


def test_disk_size_counts_every_file(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 1234)
    (tmp_path / "link").symlink_to(tmp_path / "sub" / "b")
    walked = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(tmp_path) for f in files)
    assert disk_size(tmp_path) == walked == 10 + 1234 + 1234
    assert disk_size(tmp_path / "a") == 10
    with pytest.raises(FileNotFoundError):
        disk_size(tmp_path / "nothing")


# --- the real model -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_2of4_compact_is_exact_and_smaller(tmp_path):
    """SmolLM2-135M pruned 2:4 (magnitude): compact storage restores every tensor and saves over a third of the
    bytes (the 28M-parameter embedding stays dense)."""
    from llm_sparsify import prune_checkpoint

    checkpoint = tmp_path / "pruned"
    prune_checkpoint(None, "magnitude-2of4", checkpoint)
    compact = save_compact(checkpoint, tmp_path / "compact")
    assert_bit_identical(load_compact(compact).state_dict(), checkpoint_tensors(checkpoint))
    assert disk_size(compact) < 0.66 * disk_size(checkpoint)
