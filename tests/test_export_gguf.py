"""GGUF export: read back by transformers' own GGUF loader and compared with the source model, tensor by tensor
against gguf's dequantization, with the tokenizer, metadata and pruned zeros checked."""

from __future__ import annotations

import copy
import json

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from llm_sparsify import compress
from llm_sparsify.data import load_documents
from llm_sparsify.export import GGUF_TYPES, ExportError
from llm_sparsify.export.gguf import export_gguf, interleave_rotary_halves, read_gguf, tokenizer_style
from llm_sparsify.export.hf import save_checkpoint
from llm_sparsify.files import OutputExistsError
from llm_sparsify.pipeline import prune_width
from llm_sparsify.structure.resize import remove_kv_groups
from tests.conftest import TINY

TEXTS = ["The quick brown fox jumps over the lazy dog.", "In 1997, 42 people paid $3.50 each!",
         "<|im_start|>user\nCafé, naïve — 東京?<|im_end|>\n", "  two  spaces\n\ttab"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer (GPT-2 style, like SmolLM2's) trained on WikiText-2, with chat tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(load_documents("wikitext2", "test")[:300], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def spm_tokenizer() -> PreTrainedTokenizerFast:
    """A small SentencePiece-style BPE tokenizer laid out as Llama 2's tokenizer.json is: <unk>, <s>, </s>, the 256
    byte-fallback tokens <0x00>..<0xFF>, then the pieces; spaces written ▁, one put before the text; <s> added."""
    trained = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trained.train_from_iterator(load_documents("wikitext2", "test")[:300], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *bytes_], show_progress=False))
    spec = json.loads(trained.to_str())["model"]
    tokenizer = Tokenizer(models.BPE(vocab=spec["vocab"], merges=[tuple(m) for m in spec["merges"]],
                                     unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tiny(path, kind: str = "llama", tied: bool = True, prune: bool = True, tokenizer=None, **config):
    """A tiny random model with the BPE tokenizer (or `tokenizer`), magnitude-pruned 2:4, saved as an llm_sparsify
    checkpoint. Its generation config names id 2 (<|im_end|>) as end of sequence, the BPE tokenizer <|endoftext|>
    (id 0)."""
    tokenizer = tokenizer or bpe_tokenizer()
    torch.manual_seed(0)
    shape = dict(TINY, vocab_size=len(tokenizer) + 4, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                 tie_word_embeddings=tied, **config)  # 4 embedding rows without a token
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**shape, sliding_window=16))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    model.eval()
    if prune:
        compress(model, "magnitude-2of4", device="cpu")
    model.generation_config.eos_token_id = 2
    save_checkpoint(model, tokenizer, path, {"recipe_name": "magnitude-2of4", "sparsity": {"overall": 0.5}})
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("gguf") / "tiny")


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """The checkpoint exported once in every type: qtype -> path."""
    out = tmp_path_factory.mktemp("gguf-out")
    return {qtype: export_gguf(checkpoint, out / f"tiny-{qtype}.gguf", qtype=qtype) for qtype in GGUF_TYPES}


def load_gguf_model(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0]


def token_ids(checkpoint) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return torch.tensor([tokenizer(" ".join(TEXTS)).input_ids[:48]])


def gguf_tensors(path) -> dict[str, tuple[np.ndarray, str]]:
    """Every tensor of a GGUF file dequantized by gguf's own code (PyTorch shape), with its type name."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: (gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)]),
                     t.tensor_type.name) for t in reader.tensors}


def gguf_name(hf_name: str, layers: int) -> str:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    return names.get_name(hf_name, try_suffixes=(".weight",))


def round_as_written(model, path):
    """`model` with each weight rounded by gguf's own code to the type it has in the GGUF file at `path`."""
    types = {name: t["type"] for name, t in read_gguf(path)["tensors"].items()}
    with torch.no_grad():
        for name, param in model.named_parameters():
            kind = gguf.GGMLQuantizationType[types[gguf_name(name, model.config.num_hidden_layers)]]
            rounded = gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), kind), kind)
            param.copy_(torch.from_numpy(rounded.reshape(param.shape)))
    return model


# --- logits and tensors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_logits_equal_the_source_with_the_files_own_rounding(checkpoint, exported, qtype):
    """transformers reading the GGUF gives the logits of the source model whose weights are rounded exactly as gguf
    rounds them (tight), and stays close to the unrounded source (looser as the type shrinks)."""
    source = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = token_ids(checkpoint)
    reference = logits(source, ids)
    loaded = load_gguf_model(exported[qtype])
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.config.tie_word_embeddings
    got = logits(loaded, ids)

    rounded_reference = logits(round_as_written(source, exported[qtype]), ids)
    scale = reference.abs().max()
    assert (got - rounded_reference).abs().max() <= 1e-5 * scale

    error = ((got - reference).abs().max() / scale).item()
    bound = {"F32": 1e-6, "F16": 2e-3, "BF16": 2e-2, "Q8_0": 3e-2, "Q4_0": 0.3}[qtype]
    assert error <= bound
    correlation = torch.corrcoef(torch.stack([got.flatten(), reference.flatten()]))[0, 1]
    assert correlation > (0.99 if qtype != "Q4_0" else 0.9)


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0"])
def test_llama_cpp_reads_the_export_and_computes_the_same_logits(checkpoint, exported, qtype):
    """llama.cpp itself (llama-cpp-python, where it is installed: it builds llama.cpp from source) tokenizes like
    the source tokenizer and gives the logits of the source model rounded as the file stores it. Measured error:
    1e-4 (F32), 2e-4 (F16), 5e-3 (Q8_0, Q4_0: llama.cpp also rounds the activations to 8 bits)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ids = token_ids(checkpoint)
    source = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    reference = logits(round_as_written(source, exported[qtype]), ids)
    llm = llama_cpp.Llama(model_path=str(exported[qtype]), n_ctx=64, logits_all=True, verbose=False)
    try:
        assert llm.tokenize(" ".join(TEXTS).encode(), add_bos=False, special=True)[:48] == ids[0].tolist()
        llm.eval(ids[0].tolist())
        got = torch.from_numpy(np.array(llm.scores[: ids.shape[1]]))
    finally:
        llm.close()
    bound = {"F32": 1e-3, "F16": 1e-3}.get(qtype, 2e-2)
    assert (got - reference).abs().max() <= bound * reference.abs().max()


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0"])
def test_tensors_match_gguf_dequantize_and_zeros_stay_zero(checkpoint, exported, qtype):
    """What transformers loads is gguf's dequantization of the written blocks (q/k rows put back in Hugging Face
    order), those blocks are gguf's quantization of the source, and every pruned zero is still exactly zero."""
    source = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    loaded = load_gguf_model(exported[qtype]).state_dict()
    written = gguf_tensors(exported[qtype])
    config = source.config
    assert set(written) == {gguf_name(name, config.num_hidden_layers) for name in source.state_dict()
                            if name != "lm_head.weight"}  # tied: no output.weight
    zeros = 0
    for name, weight in source.state_dict().items():
        if name == "lm_head.weight":
            continue
        data, type_name = written[gguf_name(name, config.num_hidden_layers)]
        kind = gguf.GGMLQuantizationType[type_name]
        if "q_proj" in name or "k_proj" in name:
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            weight = interleave_rotary_halves(weight, heads)
            loaded_weight = interleave_rotary_halves(loaded[name], heads)
        else:
            loaded_weight = loaded[name]
        expected = gguf.quants.dequantize(gguf.quants.quantize(weight.numpy(), kind), kind).reshape(weight.shape)
        np.testing.assert_array_equal(data, expected)
        np.testing.assert_allclose(loaded_weight.numpy(), data, rtol=1e-6, atol=0)
        pruned = weight == 0
        zeros += int(pruned.sum())
        assert (torch.tensor(data)[pruned] == 0).all()
        assert (loaded_weight[pruned] == 0).all()
        assert type_name == ("F32" if weight.ndim == 1 else
                             "Q8_0" if qtype == "Q4_0" and "embed_tokens" in name else qtype)
    linear = sum(p.numel() for n, p in source.named_parameters() if "layers" in n and p.ndim == 2)
    assert zeros >= linear // 2  # 2:4 pruning happened


# --- metadata and tokenizer ---------------------------------------------------------------------------------------


def test_metadata_names_the_llama_hyperparameters_and_tokenizer(checkpoint, exported):
    source = AutoModelForCausalLM.from_pretrained(checkpoint)
    config, tokenizer = source.config, AutoTokenizer.from_pretrained(checkpoint)
    meta = read_gguf(exported["Q8_0"])["metadata"]
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert "magnitude-2of4" in meta["general.description"]
    expected = {"llama.block_count": config.num_hidden_layers, "llama.embedding_length": config.hidden_size,
                "llama.feed_forward_length": config.intermediate_size,
                "llama.context_length": config.max_position_embeddings,
                "llama.attention.head_count": config.num_attention_heads,
                "llama.attention.head_count_kv": config.num_key_value_heads,
                "llama.rope.dimension_count": config.hidden_size // config.num_attention_heads,
                "llama.vocab_size": config.vocab_size}
    assert {key: meta[key] for key in expected} == expected
    assert meta["llama.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)

    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == config.vocab_size
    assert tokens[: len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and set(types[3 : len(tokenizer)]) == {gguf.TokenType.NORMAL}
    assert set(types[len(tokenizer) :]) == {gguf.TokenType.UNUSED}
    merges = json.loads((checkpoint / "tokenizer.json").read_text())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges]
    assert meta["tokenizer.ggml.eos_token_id"] == 2 != tokenizer.eos_token_id  # the generation config's
    assert meta["tokenizer.ggml.bos_token_id"] == 1
    assert meta["tokenizer.ggml.padding_token_id"] == 0
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE


def test_tokenizer_read_back_encodes_like_the_source(checkpoint, exported):
    source = AutoTokenizer.from_pretrained(checkpoint)
    path = exported["Q8_0"]
    loaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert loaded(text).input_ids == source(text).input_ids
    assert loaded.eos_token == "<|im_end|>"
    assert loaded.decode(source(TEXTS[1]).input_ids) == TEXTS[1]


SPM_TEXTS = [text for text in TEXTS if "<|" not in text] + ["東京 naïve Ünïcödé"]  # the last by byte fallback


@pytest.fixture(scope="module")
def spm_export(tmp_path_factory):
    """A checkpoint with the SentencePiece-style tokenizer, and its F32 GGUF."""
    out = tmp_path_factory.mktemp("spm")
    checkpoint = save_tiny(out / "spm", tokenizer=spm_tokenizer())
    return checkpoint, export_gguf(checkpoint, out / "spm.gguf", qtype="F32")


def test_a_sentencepiece_style_tokenizer_is_written_as_llama_cpp_s_llama_vocabulary(spm_export):
    """Llama 2 / Mistral style: scores in merge order, bytes as BYTE tokens, a space prefix, BOS added; read back by
    transformers, it encodes as the source does, byte fallback included, and the model computes the same logits."""
    checkpoint, path = spm_export
    meta = read_gguf(path)["metadata"]
    source = AutoTokenizer.from_pretrained(checkpoint)
    assert meta["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in meta
    types, scores = meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.scores"]
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert set(types[3:259]) == {gguf.TokenType.BYTE} and meta["tokenizer.ggml.tokens"][3] == "<0x00>"
    merges = json.loads((checkpoint / "tokenizer.json").read_text())["model"]["merges"]
    first, last = ("".join(merges[i]) for i in (0, -1))
    assert scores[source.convert_tokens_to_ids(first)] == 0 > scores[source.convert_tokens_to_ids(last)]
    assert meta["tokenizer.ggml.add_space_prefix"] is True and meta["tokenizer.ggml.add_bos_token"] is True

    assert "<0xE6>" in source.convert_ids_to_tokens(source(SPM_TEXTS[-1]).input_ids)
    loaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in SPM_TEXTS:  # transformers' reader puts no ▁ before a text that starts with a space; llama.cpp does
        if not text[0].isspace():
            assert loaded(text).input_ids == source(text).input_ids, text
    ids = torch.tensor([source(" ".join(SPM_TEXTS)).input_ids[:48]])
    torch.testing.assert_close(logits(load_gguf_model(path), ids),
                               logits(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32), ids))


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
METASPACE = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
SPM_DECODER = {"type": "Sequence", "decoders": [{"type": "Replace"}, {"type": "ByteFallback"}, {"type": "Fuse"}]}


@pytest.mark.parametrize(("spec", "style"), [
    ({"model": {"type": "BPE"}, "pre_tokenizer": BYTE_LEVEL, "decoder": BYTE_LEVEL}, "gpt2"),
    # transformers 5.17's conversion of SmolLM2: byte fallback and an SPM-style decoder around the byte-level
    # pre-tokenizer; every byte is in its vocabulary, so it encodes and decodes as the plain byte-level one
    ({"model": {"type": "BPE", "byte_fallback": True}, "decoder": SPM_DECODER,
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits"}, BYTE_LEVEL]}}, "gpt2"),
    ({"model": {"type": "BPE", "byte_fallback": True}, "pre_tokenizer": METASPACE, "decoder": SPM_DECODER}, "llama"),
    ({"model": {"type": "BPE", "byte_fallback": True}, "pre_tokenizer": None, "decoder": SPM_DECODER,
      "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                        {"type": "Replace", "pattern": {"String": " "},
                                                         "content": "▁"}]}}, "llama"),
    ({"model": {"type": "BPE"}, "pre_tokenizer": METASPACE}, None),  # no byte fallback: unknown bytes lost
    ({"model": {"type": "Unigram"}, "pre_tokenizer": METASPACE}, None),
    ({"model": {"type": "WordPiece"}, "pre_tokenizer": {"type": "BertPreTokenizer"}}, None),
])
def test_a_tokenizer_is_judged_by_what_it_does(spec, style):
    assert tokenizer_style(spec) == style


def test_llama_cpp_tokenizes_the_sentencepiece_style_export_as_the_source(spm_export):
    llama_cpp = pytest.importorskip("llama_cpp")
    checkpoint, path = spm_export
    source = AutoTokenizer.from_pretrained(checkpoint)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
    try:
        for text in SPM_TEXTS:
            assert llm.tokenize(text.encode(), add_bos=True) == source(text).input_ids, text
    finally:
        llm.close()


def save_unequal(path):
    """A tiny Llama width-pruned to layers of different MLP widths and KV groups (global scope), saved."""
    tokenizer = bpe_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dict(TINY, vocab_size=len(tokenizer) + 4, bos_token_id=1, eos_token_id=2,
                                                pad_token_id=0))).eval()
    prune_width(model, "mlp", 0.3, score="weight", scope="global")
    remove_kv_groups(model, [torch.tensor([True, True]), torch.tensor([False, True]), torch.tensor([True, False])])
    save_checkpoint(model, tokenizer, path, {"recipe_name": "width-global"})
    return path, model


def deinterleave_rotary_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """interleave_rotary_halves undone: llama.cpp's q/k rows back in the Hugging Face order."""
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(
        weight.shape)


def test_unequal_layers_export_as_deci_with_per_layer_widths_and_the_same_logits(tmp_path):
    """llama.cpp's deci architecture reads each layer's FFN width and head counts from arrays (its llama takes
    layer 0's for all). transformers cannot read such a file back, so the model is rebuilt from the GGUF's own
    tensors and arrays here: the widths are the source's, and so are the logits."""
    checkpoint, source = save_unequal(tmp_path / "unequal")
    widths = source.config.layer_widths
    path = export_gguf(checkpoint, tmp_path / "unequal.gguf", qtype="F32")
    meta = read_gguf(path)["metadata"]
    assert meta["general.architecture"] == "deci"
    assert meta["deci.feed_forward_length"] == widths["intermediate_size"] != [widths["intermediate_size"][0]] * 3
    assert meta["deci.attention.head_count_kv"] == widths["num_key_value_heads"] == [2, 1, 1]
    assert meta["deci.attention.head_count"] == [4, 2, 2]

    rebuilt = copy.deepcopy(source)
    tensors = gguf_tensors(path)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, 3)
    with torch.no_grad():
        for name, param in rebuilt.named_parameters():
            stored = torch.from_numpy(tensors[names.get_name(name, try_suffixes=(".weight",))][0].copy())
            if ".self_attn.q_proj" in name or ".self_attn.k_proj" in name:
                layer = int(name.split(".")[2])
                key = "head_count" if "q_proj" in name else "head_count_kv"
                stored = deinterleave_rotary_halves(stored, meta[f"deci.attention.{key}"][layer])
            assert stored.shape == param.shape, name
            param.copy_(stored)
    ids = torch.randint(0, 300, (1, 24))
    torch.testing.assert_close(logits(rebuilt, ids), logits(source, ids))
    with pytest.raises(AssertionError):  # the rebuild does read the file: without the rotary order undone it differs
        q = rebuilt.model.layers[1].self_attn.q_proj.weight
        with torch.no_grad():
            q.copy_(interleave_rotary_halves(q, 2))
        torch.testing.assert_close(logits(rebuilt, ids), logits(source, ids))


def test_llama_cpp_runs_the_unequal_layer_export_with_the_source_logits(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    checkpoint, source = save_unequal(tmp_path / "unequal")
    path = export_gguf(checkpoint, tmp_path / "unequal.gguf", qtype="F32")
    ids = token_ids(checkpoint)[0, :24].tolist()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        got = torch.from_numpy(np.array(llm.scores[: len(ids)]))
    finally:
        llm.close()
    reference = logits(source, torch.tensor([ids]))
    assert (got - reference).abs().max() <= 1e-3 * reference.abs().max()


def test_untied_embeddings_write_an_output_tensor(tmp_path):
    checkpoint = save_tiny(tmp_path / "untied", tied=False)
    path = export_gguf(checkpoint, tmp_path / "untied.gguf", qtype="Q4_0")
    types = {name: t["type"] for name, t in read_gguf(path)["tensors"].items()}
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q4_0"
    f32 = export_gguf(checkpoint, tmp_path / "untied-f32.gguf", qtype="F32")
    loaded = load_gguf_model(f32)
    assert not loaded.config.tie_word_embeddings
    ids = token_ids(checkpoint)
    torch.testing.assert_close(logits(loaded, ids), logits(AutoModelForCausalLM.from_pretrained(checkpoint), ids))


def test_mistral_exports_as_llama(tmp_path):
    checkpoint = save_tiny(tmp_path / "tiny-mistral", kind="mistral")
    path = export_gguf(checkpoint, tmp_path / "mistral.gguf", qtype="F32")
    assert read_gguf(path)["metadata"]["general.architecture"] == "llama"
    ids = token_ids(checkpoint)[:, :16]  # within the sliding window, where both attend alike
    torch.testing.assert_close(logits(load_gguf_model(path), ids),
                               logits(AutoModelForCausalLM.from_pretrained(checkpoint), ids))


def test_llama3_rope_scaling_becomes_frequency_divisors(tmp_path):
    """llama.cpp divides each rotary frequency by rope_freqs: base frequencies over it give the model's own."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    checkpoint = save_tiny(tmp_path / "llama3", prune=False, rope_parameters=rope)
    path = export_gguf(checkpoint, tmp_path / "llama3.gguf", qtype="F16")
    factors = torch.tensor(gguf_tensors(path)["rope_freqs.weight"][0])
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    dim = model.config.hidden_size // model.config.num_attention_heads
    base = 1.0 / 10000.0 ** (torch.arange(0, dim, 2).float() / dim)
    torch.testing.assert_close(base / factors, model.model.rotary_emb.inv_freq)
    assert (factors > 1).any() and (factors == 1).any()  # low frequencies scaled, high ones kept


# --- bad input ----------------------------------------------------------------------------------------------------


def test_bad_input_is_refused_and_leaves_nothing(tmp_path, checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExportError, match="not a checkpoint"):
        export_gguf(tmp_path, out / "x.gguf")
    with pytest.raises(ExportError, match="Q3_K"):
        export_gguf(checkpoint, out / "x.gguf", qtype="Q3_K")
    qwen = save_tiny(tmp_path / "qwen", kind="qwen2", prune=False)
    with pytest.raises(ExportError, match="Qwen2ForCausalLM"):
        export_gguf(qwen, out / "x.gguf")
    yarn = save_tiny(tmp_path / "yarn", prune=False, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                                                      "factor": 4.0})
    with pytest.raises(ExportError, match="yarn"):
        export_gguf(yarn, out / "x.gguf")
    (checkpoint / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    try:
        with pytest.raises(ExportError, match="tokenizer.json"):
            export_gguf(checkpoint, out / "x.gguf")
    finally:
        (tmp_path / "tokenizer.json").rename(checkpoint / "tokenizer.json")
    assert list(out.iterdir()) == []


def test_an_existing_file_is_replaced_only_with_overwrite(tmp_path, checkpoint):
    path = tmp_path / "model.gguf"
    path.write_text("old")
    for overwrite in (False, True):  # a file that llm-sparsify did not write stays, even with overwrite
        with pytest.raises(OutputExistsError):
            export_gguf(checkpoint, path, qtype="F16", overwrite=overwrite)
    assert path.read_text() == "old"
    path.unlink()
    export_gguf(checkpoint, path, qtype="Q8_0")
    with pytest.raises(OutputExistsError):
        export_gguf(checkpoint, path, qtype="F16")
    export_gguf(checkpoint, path, qtype="F16", overwrite=True)
    assert read_gguf(path)["metadata"]["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


# --- the real model -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_q8_0_agrees_with_the_hf_model(tmp_path):
    """SmolLM2-135M-Instruct in Q8_0: the tokenizer read back from the file gives the same ids; over WikiText-2 text
    the logits pick the same top token as the float32 model nearly everywhere, and equal those of the float32 model
    whose weights gguf rounds to Q8_0."""
    from llm_sparsify.models import default_model_path

    checkpoint = default_model_path()
    path = export_gguf(checkpoint, tmp_path / "smollm2-q8_0.gguf", qtype="Q8_0")
    meta = read_gguf(path)["metadata"]
    assert meta["tokenizer.ggml.eos_token_id"] == 2 and meta["tokenizer.ggml.bos_token_id"] == 1
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    source_tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "\n\n".join(load_documents("wikitext2", "test")[:40])
    for sample in [*TEXTS, text]:
        assert tokenizer(sample).input_ids == source_tokenizer(sample).input_ids
    ids = torch.tensor([source_tokenizer(text).input_ids[:256]])
    source = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    reference = logits(source, ids)
    got = logits(load_gguf_model(path), ids)
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.95
    rounded = logits(round_as_written(source, path), ids)
    assert (got - rounded).abs().max() <= 1e-4 * rounded.abs().max()
