"""GGUF files for llama.cpp from Llama-architecture checkpoints, with F32, F16, BF16, Q8_0 or Q4_0 weights.

llama.cpp's layout: tensors under its own names (blk.N.attn_q, ...), 2-D weights row-major [out, in] with
quantization blocks of 32 along the input, the rows of each q/k head reordered from Hugging Face's two
rotary halves to interleaved pairs, norms in F32, the tokenizer as metadata. Tensors are read, converted and
written one at a time, so memory holds one tensor. Pruned zeros stay exactly zero in Q8_0 and Q4_0: a block's
zero quantizes to the code of zero, whatever the block's scale.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PretrainedConfig

from llm_sparsify import __version__
from llm_sparsify.checkpoint import read_tensors, weight_map
from llm_sparsify.events import Event, progress
from llm_sparsify.export import GGUF_TYPE, GGUF_TYPES, ExportError
from llm_sparsify.export.hf import read_record
from llm_sparsify.files import GGUF_KEY, atomic_file, check_output
from llm_sparsify.models import ModelError

log = logging.getLogger(__name__)

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")  # one layout; llama.cpp calls both "llama"
_FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
               "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
               "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
_BLOCKED = ("Q8_0", "Q4_0")
_PARTS = {"attn_q": 0, "attn_k": 0, "attn_v": 0, "attn_output": 0, "ffn_gate": 1, "ffn_up": 1, "ffn_down": 1}
_ROPE_AS_FACTORS = ("linear", "llama3")  # scalings that only divide each rotary frequency: llama.cpp's rope_freqs
# The split pattern of Llama 3's pre-tokenizer as its tokenizer.json spells it (llama.cpp calls it "llama-bpe").
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # a SentencePiece byte-fallback token
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def export_gguf(checkpoint: str | Path, output: str | Path, *, qtype: str = GGUF_TYPE, overwrite: bool = False,
                on_event: Event | None = None) -> Path:
    """Write a Llama/Mistral checkpoint as one GGUF file for llama.cpp and return its path.

    `qtype` is the type of the 2-D weights (F32, F16, BF16, Q8_0, Q4_0); norms stay F32. With Q4_0 the token
    embedding (which is also the output layer when they are tied) and a separate output layer are Q8_0, as
    llama.cpp's own quantizer keeps that layer at a higher precision, unless the checkpoint's budget plan chose
    Q4_0 for it; a layer's attention or MLP that the plan upgraded is written at the plan's upgrade type (both:
    planned_types). A row length that is not a multiple of
    32 falls back to F16. The file appears only once complete; its metadata key `llm_sparsify.version` lets a
    later export with `overwrite` replace it (and nothing else).
    """
    checkpoint, output = Path(checkpoint), Path(output)
    qtype = qtype.upper()
    if qtype not in GGUF_TYPES:
        raise ExportError(f"GGUF type {qtype!r} is not supported; choose one of {', '.join(GGUF_TYPES)}")
    config = _llama_config(checkpoint)
    try:
        files = weight_map(checkpoint)
    except ModelError as error:
        raise ExportError(str(error)) from error
    plan = _tensor_plan(checkpoint, files, config, qtype)
    rope_freqs = rope_factors(config)
    check_output(output, overwrite, source=checkpoint)  # before the work, not after

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[_arch(config)])
    _add_metadata(writer, checkpoint, config, qtype)
    _add_tokenizer(writer, checkpoint, config)
    for _, gguf_name, shape, kind in plan:  # the header lists every tensor before any data is written
        byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
        writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=kind)
    if rope_freqs is not None:
        writer.add_tensor_info("rope_freqs.weight", list(rope_freqs.shape), np.dtype(np.float32), rope_freqs.nbytes)
    with atomic_file(output, overwrite=overwrite) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for name, gguf_name, _, kind in progress(plan, on_event, f"GGUF {qtype}", "tensor"):
                tensor = read_tensors(checkpoint, files, [name])[name]
                writer.write_tensor_data(_convert(tensor, gguf_name, config, kind))
            if rope_freqs is not None:
                writer.write_tensor_data(rope_freqs.numpy())
        finally:
            writer.close()
    log.info("wrote %s (%s, %.1f MB)", output, qtype, output.stat().st_size / 1e6)
    return output


def read_gguf(path: str | Path) -> dict[str, Any]:
    """A GGUF file's metadata (key -> value) and tensors (name -> type and shape in PyTorch order [out, in])."""
    reader = gguf.GGUFReader(str(path))
    metadata = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = {t.name: {"type": t.tensor_type.name, "shape": [int(d) for d in reversed(t.shape)]}
               for t in reader.tensors}
    return {"metadata": metadata, "tensors": tensors}


def interleave_rotary_halves(weight: Tensor, heads: int) -> Tensor:
    """q/k rows reordered for llama.cpp: Hugging Face keeps each head's rotary pairs as two halves of its rows
    (all first members, then all second members); llama.cpp wants the two members of a pair side by side."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def rope_factors(config: PretrainedConfig) -> Tensor | None:
    """llama.cpp's rope_freqs tensor (each rotary frequency's divisor) for linear and llama3 rope scaling;
    None without scaling. Other scalings change more than the frequencies: an ExportError."""
    theta, kind = _rope(config)
    if kind == "default":
        return None
    if kind not in _ROPE_AS_FACTORS:
        raise ExportError(f"rope scaling {kind!r} cannot be written for llama.cpp here (supported: default, "
                          f"{', '.join(_ROPE_AS_FACTORS)})")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, attention_factor = ROPE_INIT_FUNCTIONS[kind](config, torch.device("cpu"))
    if attention_factor != 1.0:
        raise ExportError(f"rope scaling {kind!r} with an attention factor of {attention_factor} is not supported")
    dim = _head_dim(config)
    base = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    return (base / scaled).float()


def _llama_config(checkpoint: Path) -> PretrainedConfig:
    """The checkpoint's config, if it describes a model llama.cpp's "llama" architecture runs exactly."""
    if not (checkpoint / "config.json").is_file():
        raise ExportError(f"{checkpoint} is not a checkpoint directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError, KeyError) as error:
        raise ExportError(f"could not read the config of {checkpoint}: {error}") from error
    architectures = config.architectures or []
    if not set(architectures) & set(ARCHITECTURES):
        raise ExportError(f"{checkpoint} is a {', '.join(architectures) or config.model_type} model; GGUF export "
                          f"supports {' and '.join(ARCHITECTURES)}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ExportError(f"{checkpoint} has attention or MLP biases, which the GGUF export does not write")
    if config.hidden_act != "silu":
        raise ExportError(f"{checkpoint} uses the {config.hidden_act!r} activation; llama.cpp's llama runs SiLU")
    if 0 in [n for values in layer_shapes(config) for n in values]:
        raise ExportError(f"{checkpoint} has a decoder layer without MLP channels or KV heads; llama.cpp's GGUF "
                          "layouts need at least one of each")
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        log.warning("%s attends within a sliding window of %d tokens; llama.cpp's llama architecture attends to "
                    "the whole context, so outputs differ beyond %d tokens", checkpoint, window, window)
    return config


def _arch(config: PretrainedConfig) -> gguf.MODEL_ARCH:
    """llama, or deci for layers of different widths (global width pruning): llama.cpp's deci reads each layer's
    FFN width and head counts from per-layer arrays, its llama takes layer 0's for every layer."""
    return gguf.MODEL_ARCH.DECI if getattr(config, "layer_widths", None) else gguf.MODEL_ARCH.LLAMA


def layer_shapes(config: PretrainedConfig) -> tuple[list[int], list[int], list[int]]:
    """Per decoder layer: its FFN width, query heads and KV heads (config.layer_widths where width pruning left
    them unequal; there the config's plain fields hold the widest layer's)."""
    kv = config.num_key_value_heads or config.num_attention_heads
    widths = getattr(config, "layer_widths", None) or {}
    ffn = widths.get("intermediate_size", [config.intermediate_size] * config.num_hidden_layers)
    kv_heads = widths.get("num_key_value_heads", [kv] * config.num_hidden_layers)
    return ffn, [k * (config.num_attention_heads // kv) for k in kv_heads], kv_heads


def _rope(config: PretrainedConfig) -> tuple[float, str]:
    """(theta, rope type) from either the transformers 5 `rope_parameters` or the older `rope_scaling`."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params.get("rope_type", params.get("type", "default"))


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _tensor_plan(checkpoint: Path, files: dict[str, str], config: PretrainedConfig,
                 qtype: str) -> list[tuple[str, str, list[int], gguf.GGMLQuantizationType]]:
    """(checkpoint name, GGUF name, shape, GGML type) of every tensor to write, from the shards' headers."""
    names = gguf.get_tensor_name_map(_arch(config), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    small_output, upgrade, upgraded = planned_types(checkpoint, qtype)
    if upgraded is not None and len(upgraded) != config.num_hidden_layers:
        raise ExportError(f"{checkpoint}: its budget plan upgrades parts of {len(upgraded)} layers, but it has "
                          f"{config.num_hidden_layers}")
    plan = []
    for name in sorted(files):
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / the embedding serves as the output layer
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"{checkpoint}: tensor {name} has no llama.cpp counterpart")
        with safe_open(checkpoint / files[name], "pt") as f:
            shape = list(f.get_slice(name).get_shape())
        part = _PARTS.get(gguf_name.split(".")[2]) if gguf_name.startswith("blk.") else None
        up = upgraded is not None and part is not None and upgraded[int(gguf_name.split(".")[1])][part]
        kind = tensor_type(gguf_name, shape, upgrade if up else qtype, tied, small_output)
        plan.append((name, gguf_name, shape, kind))
    if not tied and "output.weight" not in {p[1] for p in plan}:
        raise ExportError(f"{checkpoint} has untied embeddings but no lm_head.weight")
    return plan


def tensor_type(gguf_name: str, shape: list[int], qtype: str, tied: bool,
                small_output: bool = False) -> gguf.GGMLQuantizationType:
    """The type a tensor is written as in a file of `qtype` (see export_gguf); `small_output`: the output layer at
    `qtype` too (a budget plan's choice, planned_types)."""
    types = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return types.F32
    if qtype in _BLOCKED and shape[-1] % gguf.GGML_QUANT_SIZES[types[qtype]][0] != 0:
        log.warning("%s: rows of %d values do not split into %s blocks; writing F16", gguf_name, shape[-1], qtype)
        return types.F16
    output_layer = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    if qtype == "Q4_0" and output_layer and not small_output:
        return types.Q8_0
    return types[qtype]


def planned_types(checkpoint: Path, qtype: str) -> tuple[bool, str | None, list[list[bool]] | None]:
    """What the checkpoint's budget plan (its record's stages.budget) chose for a file of the type it was planned in:
    whether the output layer takes `qtype`, and the upgrade type with each layer's [attention, MLP] upgraded or not
    (None, None: no upgrades planned)."""
    budget = ((read_record(checkpoint) or {}).get("stages") or {}).get("budget") or {}
    if budget.get("qtype") != qtype:
        return False, None, None
    upgraded = budget.get("upgraded")
    return bool(budget.get("small_output")), budget.get("upgrade") if upgraded else None, upgraded


def tensor_bytes(shape: list[int], kind: gguf.GGMLQuantizationType) -> int:
    """Bytes of a tensor's data in the file."""
    values, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    return math.prod(shape) // values * block_bytes


def _convert(tensor: Tensor, gguf_name: str, config: PretrainedConfig, kind: gguf.GGMLQuantizationType) -> np.ndarray:
    """The tensor as llama.cpp stores it: q/k rows reordered, then converted or quantized to `kind`."""
    if gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
        _, heads, kv_heads = layer_shapes(config)
        layer = int(gguf_name.split(".")[1])  # blk.<layer>.attn_q.weight
        tensor = interleave_rotary_halves(tensor, (heads if "attn_q" in gguf_name else kv_heads)[layer])
    data = gguf.quants.quantize(tensor.float().numpy(), kind)
    if kind == gguf.GGMLQuantizationType.F16 and not np.isfinite(data).all():
        raise ExportError(f"{gguf_name} has values beyond float16's range; export as BF16 or F32")
    return data


def _add_metadata(writer: gguf.GGUFWriter, checkpoint: Path, config: PretrainedConfig, qtype: str) -> None:
    """general.* and the llama.* hyperparameters llama.cpp reads."""
    record = read_record(checkpoint) or {}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_string(GGUF_KEY, __version__)  # marks the file as ours: --overwrite may replace it
    writer.add_name(str(record.get("base_model") or checkpoint.name))
    if "recipe_name" in record:
        overall = record.get("sparsity", {}).get("overall")
        share = f", {overall:.1%} of the pruned modules' weights zero" if overall else ""
        writer.add_description(f"pruned with llm_sparsify ({record['recipe_name']}{share})")
    writer.add_file_type(_FILE_TYPES[qtype])
    if qtype in _BLOCKED:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    heads, head_dim = config.num_attention_heads, _head_dim(config)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    for add, values in zip((writer.add_feed_forward_length, writer.add_head_count, writer.add_head_count_kv),
                           layer_shapes(config), strict=True):
        add(values if _arch(config) == gguf.MODEL_ARCH.DECI else values[0])  # per layer, or one for all
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope(config)[0])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _steps(section: dict | None, key: str) -> list[dict]:
    """The steps of a tokenizer.json normalizer or pre-tokenizer (`key`: its Sequence's list), flattened."""
    if not section:
        return []
    if section.get("type") == "Sequence":
        return [step for inner in section[key] for step in _steps(inner, key)]
    return [section]


def tokenizer_style(spec: dict) -> str | None:
    """llama.cpp's name for what a tokenizer.json does: "gpt2" where the pre-tokenizer maps bytes to characters
    (whatever the decoder and byte_fallback say: every byte is then in the vocabulary), "llama" for a BPE with byte
    fallback that writes spaces as ▁ (in its normalizer or a Metaspace pre-tokenizer), else None."""
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        return None
    pre = _steps(spec.get("pre_tokenizer"), "pretokenizers")
    if any(step["type"] == "ByteLevel" for step in pre):
        return "gpt2"
    normalizer = _steps(spec.get("normalizer"), "normalizers")
    metaspace = any(step["type"] == "Metaspace" for step in pre) or any(
        step["type"] == "Replace" and step.get("pattern", {}).get("String") == " " and step.get("content") == "▁"
        for step in normalizer)
    return "llama" if metaspace and model.get("byte_fallback") else None


def _prepends_space(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts ▁ before the text (llama.cpp's add_space_prefix)."""
    normalizer = _steps(spec.get("normalizer"), "normalizers")
    pre = _steps(spec.get("pre_tokenizer"), "pretokenizers")
    return any(step["type"] == "Prepend" and step.get("prepend") == "▁" for step in normalizer) or any(
        step["type"] == "Metaspace" and step.get("prepend_scheme", "always" if step.get("add_prefix_space", True)
                                                 else "never") != "never" for step in pre)


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer of tokenizer.json, or an ExportError."""
    steps = _steps(pre, "pretokenizers")
    kinds = [step["type"] for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    raise ExportError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) has no known llama.cpp name; "
                      "supported: GPT-2 byte level, SmolLM (digits split), Llama 3")


def _first(*values: Any) -> int | None:
    """The first value that is set (the first id of a list of ids)."""
    for value in values:
        if isinstance(value, list | tuple):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def _add_tokenizer(writer: gguf.GGUFWriter, checkpoint: Path, config: PretrainedConfig) -> None:
    """The vocabulary, token types, special ids and chat template, as one of llama.cpp's two BPE tokenizers:
    gpt2 (byte-level: SmolLM2, Llama 3; with the merges) or llama (SentencePiece-style: Llama 2, Mistral, Mixtral;
    ▁ for spaces, bytes as <0xNN> tokens, each token's score the negated rank of the merge that makes it, which
    is the order llama.cpp merges in)."""
    path = checkpoint / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{checkpoint} has no tokenizer.json; llama.cpp needs the vocabulary inside the GGUF")
    spec = json.loads(path.read_text(encoding="utf-8"))
    style = tokenizer_style(spec)
    if style is None:
        raise ExportError(f"{checkpoint}: only BPE tokenizers that are byte level (GPT-2 style) or SentencePiece "
                          "style (▁ for spaces, byte fallback: Llama 2, Mistral) are exported to GGUF so far")
    model, added = spec["model"], spec.get("added_tokens", [])
    vocab = {**model["vocab"], **{token["content"]: token["id"] for token in added}}
    if max(vocab.values()) >= config.vocab_size:
        raise ExportError(f"{checkpoint}: the tokenizer has ids up to {max(vocab.values())} but the model embeds "
                          f"only {config.vocab_size}")
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    tokens = [f"[PAD{i}]" for i in range(config.vocab_size)]  # llama.cpp's filler for unused embedding rows
    types = [gguf.TokenType.UNUSED] * config.vocab_size
    for text, index in vocab.items():
        tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for token in added:
        types[token["id"]] = gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED
    if style == "llama":
        for text, index in model["vocab"].items():
            if _BYTE_TOKEN.fullmatch(text):
                types[index] = gguf.TokenType.BYTE
        if model.get("unk_token") in vocab:
            types[vocab[model["unk_token"]]] = gguf.TokenType.UNKNOWN
    writer.add_tokenizer_model(style)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if style == "gpt2":
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
        writer.add_token_merges([" ".join(pair) for pair in pairs])
    else:
        scores = [-float(len(pairs))] * config.vocab_size  # below every merge: never preferred to one
        for rank, pair in reversed(list(enumerate(pairs))):
            if "".join(pair) in vocab:
                scores[vocab["".join(pair)]] = -float(rank)
        writer.add_token_scores(scores)

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    generation = GenerationConfig.from_pretrained(checkpoint) if (checkpoint / "generation_config.json").exists() \
        else None
    eos = _first(getattr(generation, "eos_token_id", None), config.eos_token_id, tokenizer.eos_token_id)
    ids = {"bos": _first(config.bos_token_id, tokenizer.bos_token_id),
           "eos": eos,
           "unk": _first(tokenizer.unk_token_id),
           "pad": _first(getattr(generation, "pad_token_id", None), config.pad_token_id, tokenizer.pad_token_id)}
    for kind, index in ids.items():
        if index is not None:
            getattr(writer, f"add_{kind}_token_id")(index)
    marked = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    writer.add_add_bos_token(len(marked) > len(plain) and marked[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(marked) > len(plain) and marked[-1] == tokenizer.eos_token_id)
    writer.add_add_space_prefix(style == "llama" and _prepends_space(spec))
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)
