"""Quantized exports: compressed-tensors pack-quantized checkpoints and bitsandbytes NF4 / FP4 / LLM.int8 ones.

Every check reloads the output the way a user would (plain transformers) and compares it with the source
checkpoint: compressed-tensors must give back the exact ŵ of the grids, bitsandbytes exactly what its own
quantizer makes of the source weights; pruned weights must stay exact zeros in both.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors import unpack_from_int32
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, LlamaConfig, LlamaForCausalLM

from llm_sparsify.checkpoint import INDEX
from llm_sparsify.export import ExportError
from llm_sparsify.export.bitsandbytes import MODES, check_backend, export_bitsandbytes
from llm_sparsify.export.compressed_tensors import export_compressed_tensors
from llm_sparsify.export.hf import RECORD
from llm_sparsify.files import OutputExistsError, OutputOverlapError
from llm_sparsify.quantize.grid import GRIDS_FILE, QuantScheme, load_grids, quantize, rtn, save_grids
from tests.conftest import TINY

TOKENIZER_FILE = "tokenizer_config.json"  # stands for the tokenizer files, which must be copied unchanged


def pruned_model(hidden: int = 256, intermediate: int = 512, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A tiny random Llama whose decoder Linears have the smaller half of each row set to exact zeros."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "hidden_size": hidden, "intermediate_size": intermediate}))
    with torch.no_grad():
        for module in decoder_linears(model).values():
            weight = module.weight
            weight.mul_(weight.abs() > weight.abs().median(dim=1, keepdim=True).values)
    return model.to(dtype).eval()


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in name}


def write_checkpoint(model: LlamaForCausalLM, path: Path, scheme: QuantScheme | None = None,
                     max_shard_size: str = "1GB") -> Path:
    """`model` as an llm_sparsify checkpoint; with `scheme`, its decoder Linears first rounded to RTN grids."""
    record = {"recipe_name": "magnitude-50", "sparsity": {"overall": 0.5}}
    grids = {}
    if scheme is not None:
        with torch.no_grad():
            for name, module in decoder_linears(model).items():
                rounded, grids[name] = rtn(module.weight, scheme)
                module.weight.copy_(rounded)
        record["quantization"] = {"method": "rtn", "bits": scheme.bits, "group_size": scheme.group_size,
                                  "symmetric": scheme.symmetric}
    model.save_pretrained(path, max_shard_size=max_shard_size)
    if grids:
        save_grids(grids, path / GRIDS_FILE)
    (path / TOKENIZER_FILE).write_text('{"model_max_length": 256}\n')
    (path / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return path


def stored_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(checkpoint.glob("*.safetensors")) if f.name != GRIDS_FILE
            for k, v in load_file(f).items()}


def disk_bytes(checkpoint: Path) -> int:
    return sum(f.stat().st_size for f in checkpoint.glob("*.safetensors") if f.name != GRIDS_FILE)


def load_compressed(path: Path, symmetric: bool) -> LlamaForCausalLM:
    """The export reloaded with plain transformers: compressed (decompressed on the first forward) when symmetric;
    asymmetric ones with dequantize=True, because transformers' compressed loading rejects packed zero points."""
    if symmetric:
        return AutoModelForCausalLM.from_pretrained(path).eval()
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=CompressedTensorsConfig(dequantize=True))


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids).logits.float()


def leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


# --- compressed-tensors ---------------------------------------------------------------------------------------

SCHEMES = [QuantScheme(bits, group, sym) for bits in (4, 8) for group in (128, None) for sym in (True, False)]


def scheme_id(scheme: QuantScheme) -> str:
    return f"w{scheme.bits}-{f'g{scheme.group_size}' if scheme.group_size else 'channel'}-" + (
        "sym" if scheme.symmetric else "asym")


@pytest.fixture(scope="module", params=SCHEMES, ids=scheme_id)
def exported(request, tmp_path_factory):
    """(source model, source checkpoint, export) for one scheme."""
    root = tmp_path_factory.mktemp("ct")
    model = pruned_model()
    source = write_checkpoint(model, root / "source", request.param)
    return model, source, export_compressed_tensors(source, root / "export")


def test_packed_codes_are_the_grid_codes(exported):
    _, source, output = exported
    grids, dense, packed = load_grids(source / GRIDS_FILE), stored_tensors(source), stored_tensors(output)
    assert len(grids) == 7 * TINY["num_hidden_layers"]
    for name, grid in grids.items():
        scheme, weight = grid.scheme, dense[f"{name}.weight"]
        scale, zero = grid.expand(weight.shape[1])
        codes = quantize(weight, scale, zero, scheme)  # the reference: quantize.grid's own codes of ŵ
        assert f"{name}.weight" not in packed
        assert packed[f"{name}.weight_packed"].dtype == torch.int32
        assert packed[f"{name}.weight_shape"].tolist() == list(weight.shape)
        unpacked = unpack_from_int32(packed[f"{name}.weight_packed"], scheme.bits, weight.shape)
        assert torch.equal(unpacked.to(torch.int32), codes), name
        assert torch.equal(packed[f"{name}.weight_scale"], grid.scale)  # a float32 model keeps float32 scales
        if scheme.symmetric:
            assert f"{name}.weight_zero_point" not in packed  # vLLM loads no zero points for symmetric schemes
        else:
            zero_points = unpack_from_int32(packed[f"{name}.weight_zero_point"], scheme.bits, grid.zero_point.shape,
                                            packed_dim=0)
            assert torch.equal(zero_points.to(torch.int32), grid.zero_point), name
        assert (weight == 0).any() and (codes - zero)[weight == 0].eq(0).all()  # pruned weights decode to 0


def test_reloaded_weights_are_exactly_the_checkpoints(exported):
    model, source, output = exported
    scheme = next(iter(load_grids(source / GRIDS_FILE).values())).scheme
    reloaded = load_compressed(output, scheme.symmetric)
    assert torch.allclose(logits(reloaded), logits(model), rtol=0, atol=1e-5)  # the forward decompresses
    dense = stored_tensors(source)
    for name in decoder_linears(model):
        weight = reloaded.get_submodule(name).weight
        assert torch.equal(weight, dense[f"{name}.weight"]), name
        assert weight[dense[f"{name}.weight"] == 0].eq(0).all()
    assert not hasattr(reloaded.lm_head, "weight_scale") and not hasattr(reloaded.model.embed_tokens, "weight_scale")
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_config_record_and_tokenizer(exported):
    _, source, output = exported
    scheme = next(iter(load_grids(source / GRIDS_FILE).values())).scheme
    config = json.loads((output / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["quantization_status"] == "compressed"
    assert config["ignore"] == ["lm_head"]  # and embeddings are no Linear: never targeted
    assert not config.get("sparsity_config")  # current vLLM rejects a sparsity_config with targets
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    weights = group["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (
        scheme.bits, scheme.group_size, scheme.symmetric)
    assert weights["strategy"] == ("group" if scheme.group_size else "channel") and weights["type"] == "int"
    for name in (RECORD, TOKENIZER_FILE, "generation_config.json"):
        assert (output / name).read_bytes() == (source / name).read_bytes(), name
    assert not (output / GRIDS_FILE).exists()  # the grids live in the packed tensors now


@pytest.mark.parametrize("scheme", [QuantScheme(4, 128, True), QuantScheme(8, None, False)], ids=scheme_id)
def test_size_on_disk(scheme, tmp_path):
    model = pruned_model()
    source = write_checkpoint(model, tmp_path / "source", scheme)
    output = export_compressed_tensors(source, tmp_path / "export")
    tensors = stored_tensors(source)
    expected = 0
    for name, tensor in tensors.items():
        if name.removesuffix(".weight") not in decoder_linears(model):
            expected += tensor.numel() * tensor.element_size()  # embeddings, norms, lm_head: as they were
            continue
        rows, columns = tensor.shape
        groups = columns // (scheme.group_size or columns)
        expected += rows * math.ceil(columns * scheme.bits / 32) * 4 + rows * groups * 4 + 2 * 8  # codes, scales, shape
        if not scheme.symmetric:
            expected += math.ceil(rows * scheme.bits / 32) * groups * 4  # zero points, packed along the rows
    headers = 200 * len(stored_tensors(output))  # safetensors' JSON header, about a hundred bytes per tensor
    assert expected <= disk_bytes(output) <= expected + headers
    linear_bytes = sum(tensors[f"{n}.weight"].numel() * 4 for n in decoder_linears(model))
    assert disk_bytes(source) - disk_bytes(output) > linear_bytes * (1 - scheme.bits / 32) * 0.9


def test_sharded_checkpoint_gives_a_sharded_export(tmp_path):
    model = pruned_model()
    source = write_checkpoint(model, tmp_path / "source", QuantScheme(4, 128, False), max_shard_size="1MB")
    output = export_compressed_tensors(source, tmp_path / "export")
    shards = sorted(p.name for p in source.glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(p.name for p in output.glob("model-*.safetensors")) == shards
    index = json.loads((output / INDEX).read_text())["weight_map"]
    for shard in shards:
        assert {name for name, file in index.items() if file == shard} == set(load_file(output / shard)), shard
    reloaded = load_compressed(output, symmetric=False)
    assert torch.allclose(logits(reloaded), logits(model), rtol=0, atol=1e-5)


def test_bfloat16_checkpoint_keeps_its_codes_and_zeros(tmp_path):
    scheme = QuantScheme(4, 128, False)
    source = write_checkpoint(pruned_model(dtype=torch.bfloat16), tmp_path / "source", scheme)
    output = export_compressed_tensors(source, tmp_path / "export")
    grids, dense, packed = load_grids(source / GRIDS_FILE), stored_tensors(source), stored_tensors(output)
    reloaded = load_compressed(output, symmetric=False)
    for name, grid in grids.items():
        weight = dense[f"{name}.weight"]
        assert weight.dtype == torch.bfloat16 and packed[f"{name}.weight_scale"].dtype == torch.bfloat16
        codes = quantize(weight, *grid.expand(weight.shape[1]), scheme)
        assert torch.equal(unpack_from_int32(packed[f"{name}.weight_packed"], 4, weight.shape).to(torch.int32), codes)
        back = reloaded.get_submodule(name).weight.float()
        assert back[weight == 0].eq(0).all()
        # ŵ was rounded to bfloat16 from a float32 scale; the reload multiplies by the bfloat16 scale: 2 roundings
        assert ((back - weight.float()).abs() <= 2**-7 * weight.float().abs()).all(), name


def test_unquantized_checkpoint_is_refused(tmp_path):
    source = write_checkpoint(pruned_model(64, 128), tmp_path / "source")
    with pytest.raises(ExportError, match="quantization section to the recipe"):
        export_compressed_tensors(source, tmp_path / "export")
    (source / RECORD).unlink()
    with pytest.raises(ExportError, match="not an llm_sparsify checkpoint"):
        export_compressed_tensors(source, tmp_path / "export")
    assert leftovers(tmp_path, {"source"}) == []


def test_groups_that_do_not_divide_the_inputs_are_refused(tmp_path):
    source = write_checkpoint(pruned_model(64, 128), tmp_path / "source", QuantScheme(4, 128, True))  # 64 inputs
    with pytest.raises(ExportError, match="groups of 128 do not divide"):
        export_compressed_tensors(source, tmp_path / "export")
    assert leftovers(tmp_path, {"source"}) == []


def test_weights_off_their_grid_leave_nothing_behind(tmp_path):
    model = pruned_model()
    source = write_checkpoint(model, tmp_path / "source", QuantScheme(4, 128, True))
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] += 1e-3  # no longer a point of its grid
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"model\.layers\.1\.mlp\.down_proj\.weight does not lie on its grid"):
        export_compressed_tensors(source, tmp_path / "export")
    assert leftovers(tmp_path, {"source"}) == []


def test_record_and_grids_must_agree(tmp_path):
    source = write_checkpoint(pruned_model(), tmp_path / "source", QuantScheme(4, 128, True))
    record = json.loads((source / RECORD).read_text())
    record["quantization"]["bits"] = 8
    (source / RECORD).write_text(json.dumps(record))
    with pytest.raises(ExportError, match="names .*bits=8.* holds .*bits=4"):
        export_compressed_tensors(source, tmp_path / "export")


def test_existing_output_and_the_source_itself_are_refused(tmp_path):
    source = write_checkpoint(pruned_model(), tmp_path / "source", QuantScheme(8, None, True))
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        export_compressed_tensors(source, tmp_path / "export")
    assert (tmp_path / "export" / "keep.txt").read_text() == "x"
    with pytest.raises(OutputOverlapError, match="is the input"):
        export_compressed_tensors(source, source, overwrite=True)
    with pytest.raises(OutputExistsError, match="not an llm-sparsify output"):
        export_compressed_tensors(source, tmp_path / "export", overwrite=True)
    assert (tmp_path / "export" / "keep.txt").read_text() == "x"
    (tmp_path / "export" / RECORD).write_text("{}")  # an output of ours: --overwrite replaces it
    export_compressed_tensors(source, tmp_path / "export", overwrite=True)
    assert not (tmp_path / "export" / "keep.txt").exists() and (tmp_path / "export" / "config.json").exists()


# --- bitsandbytes ---------------------------------------------------------------------------------------------


def bnb_reference(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """What bitsandbytes' own quantizer makes of `weight` (block 64 for 4-bit; rows of float16 for int8)."""
    import bitsandbytes.functional as F

    if mode == "int8":
        codes, row_absmax, _ = F.int8_vectorwise_quant(weight.to(torch.float16))
        return F.int8_vectorwise_dequant(codes, row_absmax)
    return F.dequantize_4bit(*F.quantize_4bit(weight, blocksize=64, quant_type=mode))


def bnb_dequantized(module: nn.Module, mode: str) -> torch.Tensor:
    import bitsandbytes.functional as F

    if mode == "int8":
        return F.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
    return F.dequantize_4bit(module.weight.data, module.weight.quant_state)


def bitsandbytes_or_skip(mode: str):
    """The bitsandbytes module, where it is installed and runs `mode` on this CPU; else the test is skipped."""
    bnb = pytest.importorskip("bitsandbytes")
    try:
        check_backend(mode, "cpu")
    except ExportError as error:
        pytest.skip(str(error))
    return bnb


@pytest.mark.parametrize("mode", MODES)
def test_bitsandbytes_export_keeps_pruned_zeros(mode, tmp_path):
    bnb = bitsandbytes_or_skip(mode)
    model = pruned_model(64, 128)
    source = write_checkpoint(model, tmp_path / "source")
    output = export_bitsandbytes(source, tmp_path / "export", mode=mode, device="cpu")
    reloaded = AutoModelForCausalLM.from_pretrained(output, device_map="cpu")  # as a user would
    kind = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    dequantized = {}
    for name, module in decoder_linears(model).items():
        quantized = reloaded.get_submodule(name)
        assert isinstance(quantized, kind), name
        dequantized[name] = bnb_dequantized(quantized, mode).float()
        assert torch.equal(dequantized[name], bnb_reference(module.weight, mode).float()), name
        zeros = module.weight == 0
        assert zeros.float().mean() >= 0.5 and dequantized[name][zeros].eq(0).all(), name
    assert type(reloaded.lm_head) is nn.Linear and torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)

    # The reloaded forward against the same model computed densely with the dequantized weights.
    with torch.no_grad():
        for name, module in decoder_linears(model).items():
            module.weight.copy_(dequantized[name])
    got, want = logits(reloaded), logits(model)
    assert torch.isfinite(got).all()
    # bitsandbytes' CPU kernels compute 4-bit matmuls in bfloat16 (measured: 0.3% of the largest logit);
    # LLM.int8 rounds the activations to float16 and int8 too (0.6%)
    tolerance = 0.05 if mode == "int8" else 0.02
    assert (got - want).abs().max() <= tolerance * want.abs().max()

    config = json.loads((output / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes"
    assert config["load_in_8bit"] if mode == "int8" else config["bnb_4bit_quant_type"] == mode
    for name in (RECORD, TOKENIZER_FILE):
        assert (output / name).read_bytes() == (source / name).read_bytes(), name


@pytest.mark.parametrize(("mode", "kernel"), [("nf4", "quantize_4bit"), ("fp4", "quantize_4bit"),
                                              ("int8", "int8_vectorwise_quant")])
def test_bitsandbytes_backend_without_the_kernel(mode, kernel, tmp_path, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")

    def missing(*args, **kwargs):
        raise NotImplementedError(f"Could not run 'bitsandbytes::{kernel}' with arguments from the 'CPU' backend.")

    monkeypatch.setattr(bnb.functional, kernel, missing)  # what a build without that CPU kernel raises
    source = write_checkpoint(pruned_model(64, 128), tmp_path / "source")
    with pytest.raises(ExportError) as error:
        export_bitsandbytes(source, tmp_path / "export", mode=mode, device="cpu")
    message = str(error.value)
    assert f"bitsandbytes {bnb.__version__} cannot run {mode} on cpu" in message
    assert "GPU" in message and "compressed-tensors" in message and kernel in message
    assert leftovers(tmp_path, {"source"}) == []


def test_bitsandbytes_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    source = write_checkpoint(pruned_model(64, 128), tmp_path / "source")
    with pytest.raises(ExportError, match=r"nf4 export needs bitsandbytes.*llm_sparsify\[bnb\]"):
        export_bitsandbytes(source, tmp_path / "export", device="cpu")
    assert leftovers(tmp_path, {"source"}) == []


def test_bitsandbytes_bad_input(tmp_path):
    source = write_checkpoint(pruned_model(64, 128), tmp_path / "source")
    with pytest.raises(ExportError, match="unknown bitsandbytes mode 'int4'; choose one of nf4, fp4, int8"):
        export_bitsandbytes(source, tmp_path / "export", mode="int4")
    (source / "config.json").unlink()
    with pytest.raises(ExportError, match="not a Hugging Face checkpoint"):
        export_bitsandbytes(source, tmp_path / "export")
    assert leftovers(tmp_path, {"source"}) == []


def test_bitsandbytes_exports_a_dense_checkpoint_without_a_record(tmp_path):
    """The dense baseline (a plain HF checkpoint, no llm_sparsify.json) can be exported to compare sizes."""
    bnb = bitsandbytes_or_skip("nf4")
    source = write_checkpoint(pruned_model(64, 128), tmp_path / "source")
    (source / RECORD).unlink()
    output = export_bitsandbytes(source, tmp_path / "export", mode="nf4", device="cpu")
    reloaded = AutoModelForCausalLM.from_pretrained(output, device_map="cpu")
    assert isinstance(reloaded.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert not (output / RECORD).exists() and (output / TOKENIZER_FILE).exists()


# --- the real model -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_w4_g64_export(tmp_path):
    from llm_sparsify import compress, load_model

    model, tokenizer = load_model(device="cpu")
    compress(model, "magnitude-50", device="cpu")
    source = write_checkpoint(model, tmp_path / "source", QuantScheme(4, 64, True))  # 576 inputs: 128 does not divide
    output = export_compressed_tensors(source, tmp_path / "export")
    reloaded = load_compressed(output, symmetric=True)
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = model(ids).logits, reloaded(ids).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-3)
    for name in decoder_linears(model):
        assert torch.equal(reloaded.get_submodule(name).weight, model.get_submodule(name).weight), name
    assert disk_bytes(output) < 0.4 * disk_bytes(source)  # 540 MB float32 -> about 170 MB (embeddings stay dense)
