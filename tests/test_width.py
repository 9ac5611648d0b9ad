"""Width pruning: removing MLP channels / KV groups equals zeroing their output weights, scores equal brute force,
the smaller models save and load back."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llm_sparsify.architecture import parameter_count
from llm_sparsify.pipeline import prune_width
from llm_sparsify.score_passes import activation_importance
from llm_sparsify.structure.resize import load_width_pruned, remove_kv_groups, remove_mlp_channels
from llm_sparsify.structure.width import (
    UNITS,
    WidthError,
    channel_scores,
    choose_units,
    group_scores,
)
from tests.conftest import TINY, tiny_model
from tests.test_fisher import brute_fisher

IDS = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(2))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def random_keep(sizes, seed=0, at_least=1):
    """Random keep masks, each with at least `at_least` units kept and at least one removed."""
    g = torch.Generator().manual_seed(seed)
    masks = []
    for n in sizes:
        kept = int(torch.randint(at_least, n, (1,), generator=g))
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=g)[:kept]] = True
        masks.append(mask)
    return masks


def head_columns(layer, group):
    """o_proj columns (= q_proj rows) of the query heads of KV group `group`."""
    attention = layer.self_attn
    width = attention.num_key_value_groups * attention.head_dim
    return slice(group * width, (group + 1) * width)


def test_removing_mlp_channels_equals_zeroing_their_down_columns(model):
    keep = random_keep([TINY["intermediate_size"]] * TINY["num_hidden_layers"])
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer, mask in zip(reference.model.layers, keep, strict=True):
            layer.mlp.down_proj.weight[:, ~mask] = 0
    before = parameter_count(model)
    remove_mlp_channels(model, keep)
    for layer, mask in zip(model.model.layers, keep, strict=True):
        n = int(mask.sum())
        assert layer.mlp.gate_proj.weight.shape[0] == layer.mlp.up_proj.weight.shape[0] == n
        assert layer.mlp.down_proj.weight.shape[1] == n
    assert parameter_count(model) == before - 3 * TINY["hidden_size"] * sum(int((~m).sum()) for m in keep)
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-4, atol=1e-5)
    assert model.config.layer_widths["intermediate_size"] == [int(m.sum()) for m in keep]


def test_removing_kv_groups_equals_zeroing_their_heads_o_columns(model):
    keep = [torch.tensor([True, False]), torch.tensor([False, True]), torch.tensor([True, False])]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer, mask in zip(reference.model.layers, keep, strict=True):
            for group in (~mask).nonzero().squeeze(1).tolist():
                layer.self_attn.o_proj.weight[:, head_columns(layer, group)] = 0
    head_dim = model.model.layers[0].self_attn.head_dim
    remove_kv_groups(model, keep)
    for layer in model.model.layers:
        attention = layer.self_attn
        assert attention.k_proj.weight.shape[0] == attention.v_proj.weight.shape[0] == head_dim
        assert attention.q_proj.weight.shape[0] == attention.o_proj.weight.shape[1] == 2 * head_dim
        if attention.q_proj.bias is not None:  # qwen2
            assert attention.q_proj.bias.shape[0] == 2 * head_dim and attention.k_proj.bias.shape[0] == head_dim
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-4, atol=1e-5)
    config = model.config
    assert (config.num_key_value_heads, config.num_attention_heads, config.head_dim) == (1, 2, head_dim)
    assert not hasattr(config, "layer_widths")


def test_generation_with_kv_cache_after_removing_groups():
    model = tiny_model("llama")
    keep = [torch.tensor([False, True]), torch.tensor([True, False]), torch.tensor([True, True])]  # unequal
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer, mask in zip(reference.model.layers, keep, strict=True):
            for group in (~mask).nonzero().squeeze(1).tolist():
                layer.self_attn.o_proj.weight[:, head_columns(layer, group)] = 0
    remove_kv_groups(model, keep)
    prompt = IDS[:1, :6]
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **options)
    assert cached.shape[1] == 14
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **options))
    assert torch.equal(cached, reference.generate(prompt, use_cache=True, **options))


def random_importance(layer, names, seed):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(layer.get_submodule(name).weight.shape, generator=g) for name in names}


@pytest.mark.parametrize("given", [False, True])
def test_scores_equal_a_loop_over_units(model, given):
    layer = model.model.layers[1]
    mlp_names = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    attention_names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    importance = random_importance(layer, mlp_names + attention_names, 3) if given else None
    imp = importance or {name: layer.get_submodule(name).weight.detach().abs() for name in mlp_names + attention_names}

    expected = [torch.cat([imp["mlp.gate_proj"][c], imp["mlp.up_proj"][c], imp["mlp.down_proj"][:, c]]).norm()
                for c in range(TINY["intermediate_size"])]
    torch.testing.assert_close(channel_scores(layer, importance), torch.stack(expected))

    d, r = layer.self_attn.head_dim, layer.self_attn.num_key_value_groups
    expected = []
    for g in range(TINY["num_key_value_heads"]):
        entries = [imp["self_attn.k_proj"][g * d + i] for i in range(d)] + [imp["self_attn.v_proj"][g * d + i]
                                                                          for i in range(d)]
        for head in range(g * r, (g + 1) * r):
            for i in range(d):
                entries += [imp["self_attn.q_proj"][head * d + i], imp["self_attn.o_proj"][:, head * d + i]]
        expected.append(torch.cat(entries).norm())
    torch.testing.assert_close(group_scores(layer, importance), torch.stack(expected))


def test_activation_importance_equals_weights_times_input_norms(model, calibration):
    inputs = {}
    hooks = [module.register_forward_pre_hook(
        lambda m, args, name=name: inputs.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and ".layers." in name]
    with torch.no_grad():
        model(calibration, use_cache=False)
    for hook in hooks:
        hook.remove()
    importance = activation_importance(model, calibration, batch_size=4)  # 6 samples: batches of 4 and 2
    assert len(importance) == TINY["num_hidden_layers"]
    for i, per_layer in enumerate(importance):
        assert len(per_layer) == 7
        for name, value in per_layer.items():
            norms = torch.cat(inputs[f"model.layers.{i}.{name}"]).double().square().sum(0).sqrt()
            weight = model.get_submodule(f"model.layers.{i}.{name}").weight.detach()
            torch.testing.assert_close(value, (weight.abs() * norms.float()), rtol=1e-4, atol=1e-6)


def test_layer_scope_removes_the_same_count_and_the_lowest():
    scores = [torch.rand(40, generator=torch.Generator().manual_seed(i)) * 10**i for i in range(3)]
    keep = choose_units(scores, 0.3, "layer")
    for s, mask in zip(scores, keep, strict=True):
        assert int((~mask).sum()) == 12
        assert s[~mask].max() < s[mask].min()


def test_global_scope_ranks_normalised_scores_and_keeps_one_per_layer():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(30, generator=g) * 1000, torch.rand(50, generator=g), torch.rand(20, generator=g) + 5]
    keep = choose_units(scores, 0.4, "global")
    assert sum(int((~m).sum()) for m in keep) == 40
    normalised = [s / s.mean() for s in scores]
    removed = torch.cat([n[~m] for n, m in zip(normalised, keep, strict=True)])
    kept = torch.cat([n[m] for n, m in zip(normalised, keep, strict=True)])
    assert removed.max() <= kept.min()
    assert len({int((~m).sum()) for m in keep}) > 1  # not the same count everywhere

    # a layer whose units all rank low still keeps its best one
    keep = choose_units([torch.tensor([1.0, 1.0, 1.0, 100.0]), torch.ones(4)], 0.75, "global")
    assert [int(m.sum()) for m in keep] == [1, 1]
    assert keep[0].tolist() == [False, False, False, True]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_multiple_keeps_whole_blocks_of_the_best_units(scope):
    """width-mlp-30 on SmolLM2 keeps 1075 of 1536 channels, which GGUF writes in F16; with multiple 32 every layer
    keeps a multiple of 32 (the nearest, at least one), and the units kept are still the best of their layer."""
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(1536, generator=g) * (i + 1) for i in range(4)] + [torch.rand(40, generator=g)]
    keep = choose_units(scores, 0.3, scope, multiple=32)
    plain = choose_units(scores, 0.3, scope)
    for s, mask, before in zip(scores, keep, plain, strict=True):
        kept = int(mask.sum())
        assert kept % 32 == 0 and abs(kept - int(before.sum())) <= 16
        assert s[~mask].max() < s[mask].min()
    with pytest.raises(WidthError, match="multiple"):
        choose_units(scores, 0.3, scope, multiple=0)


@pytest.mark.parametrize(("amount", "scope"), [(0, "layer"), (1, "layer"), (1.5, "global"), (0.3, "model"),
                                               (0.9, "layer"), (0.99, "global")])
def test_choose_units_rejects_bad_requests(amount, scope):
    with pytest.raises(WidthError):
        choose_units([torch.rand(2), torch.rand(2)], amount, scope)


def test_prune_width_errors():
    model = tiny_model("llama")
    with pytest.raises(WidthError, match="calibration"):
        prune_width(model, "mlp", 0.2, score="activation")
    with pytest.raises(WidthError, match="removes all"):
        prune_width(model, "heads", 0.8, score="weight")  # 2 KV groups per layer
    for kwargs in (dict(unit="ffn"), dict(score="fisher"), dict(amount=0.0)):
        with pytest.raises(WidthError):
            prune_width(model, **{"unit": "mlp", "amount": 0.2, "score": "weight", **kwargs})
    with pytest.raises(WidthError, match="shape"):
        prune_width(model, "mlp", 0.2, importance=[{"mlp.gate_proj": torch.ones(1), "mlp.up_proj": torch.ones(1),
                                                    "mlp.down_proj": torch.ones(1)}] * 3)
    assert model.model.layers[0].mlp.gate_proj.out_features == TINY["intermediate_size"]  # untouched


def test_prune_width_with_given_importance_removes_its_lowest_channels():
    model = tiny_model("mistral")
    names = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    importance = [random_importance(layer, names, i) for i, layer in enumerate(model.model.layers)]
    expected = choose_units([channel_scores(layer, imp) for layer, imp in zip(model.model.layers, importance,
                                                                             strict=True)], 0.25)
    gate = [layer.mlp.gate_proj.weight.detach().clone() for layer in model.model.layers]
    report = prune_width(model, "mlp", 0.25, importance=importance)
    assert report["kept"] == [96] * 3 and report["score"] == "importance"
    for layer, rows, mask in zip(model.model.layers, gate, expected, strict=True):
        assert torch.equal(layer.mlp.gate_proj.weight, rows[mask])


@pytest.mark.parametrize("unit", ["mlp", "heads"])
def test_obd_width_removes_the_units_with_the_lowest_summed_saliency(unit, calibration, one_thread):
    """score "obd": a unit's saliency is Σ ½·F·w² over its weights, F from per-sample autograd (test_fisher)."""
    model = tiny_model("llama")
    layers = model.model.layers
    names = [f"model.layers.{i}.{name}" for i in range(len(layers)) for name in UNITS[unit]]
    fisher = brute_fisher(model, calibration, names)
    modules = dict(model.named_modules())
    saliency = {name: 0.5 * fisher[name] * modules[name].weight.detach().square() for name in names}
    expected = []
    for i, layer in enumerate(layers):
        s = {name: saliency[f"model.layers.{i}.{name}"] for name in UNITS[unit]}
        if unit == "mlp":  # channel c: gate/up row c, down column c
            per_unit = s["mlp.gate_proj"].sum(1) + s["mlp.up_proj"].sum(1) + s["mlp.down_proj"].sum(0)
        else:  # KV group g: its k/v rows, its query heads' q rows and o columns
            head_dim, groups = layer.self_attn.head_dim, TINY["num_key_value_heads"]
            per_unit = torch.stack([
                s["self_attn.q_proj"][head_columns(layer, g)].sum()
                + s["self_attn.o_proj"][:, head_columns(layer, g)].sum()
                + s["self_attn.k_proj"][g * head_dim:(g + 1) * head_dim].sum()
                + s["self_attn.v_proj"][g * head_dim:(g + 1) * head_dim].sum() for g in range(groups)])
        expected.append(per_unit.argsort(descending=True)[: per_unit.numel() // 2].sort().values)
    first = UNITS[unit][0]
    rows = [layer.get_submodule(first).weight.detach().clone() for layer in layers]
    report = prune_width(model, unit, 0.5, score="obd", calibration=calibration)
    assert report["score"] == "obd"
    for layer, before, keep in zip(layers, rows, expected, strict=True):
        if unit == "heads":
            keep = torch.cat([torch.arange(head_columns(layer, int(g)).start, head_columns(layer, int(g)).stop)
                              for g in keep])
        assert torch.equal(layer.get_submodule(first).weight, before[keep])


def test_uniform_widths_reload_with_plain_transformers(tmp_path, calibration):
    model = tiny_model("qwen2")
    prune_width(model, "heads", 0.5, score="activation", calibration=calibration)
    report = prune_width(model, "mlp", 0.25, score="activation", calibration=calibration)
    assert report["parameters_after"] == parameter_count(model) < report["parameters_before"]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    config = loaded.config
    assert (config.intermediate_size, config.num_key_value_heads, config.num_attention_heads) == (96, 1, 2)
    assert config.head_dim == TINY["hidden_size"] // TINY["num_attention_heads"]
    assert not hasattr(config, "layer_widths")
    torch.testing.assert_close(logits(loaded), logits(model))
    torch.testing.assert_close(logits(load_width_pruned(tmp_path)), logits(model))


@pytest.mark.parametrize("tied", [False, True])
def test_unequal_widths_load_with_load_width_pruned(tmp_path, tied):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tied)).eval()
    report = prune_width(model, "mlp", 0.3, score="weight", scope="global")
    assert sum(report["of"]) - sum(report["kept"]) == round(0.3 * 3 * TINY["intermediate_size"])
    remove_kv_groups(model, [torch.tensor([True, True]), torch.tensor([False, True]), torch.tensor([True, False])])
    widths = model.config.layer_widths
    assert widths == {"intermediate_size": report["kept"], "num_key_value_heads": [2, 1, 1]}
    model.save_pretrained(tmp_path)
    loaded = load_width_pruned(tmp_path)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    torch.testing.assert_close(logits(loaded), logits(model))
    with pytest.raises(RuntimeError):  # plain transformers builds every layer at one width
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.slow
def test_mlp_width_pruning_on_the_real_model(tmp_path, one_thread):
    from llm_sparsify import load_model, perplexity
    from llm_sparsify.data import calibration_ids, evaluation_ids

    model, tokenizer = load_model(None)
    ids = evaluation_ids("wikitext2", tokenizer)
    dense = perplexity(model, ids, seqlen=256, max_windows=4)
    report = prune_width(model, "mlp", 0.2, score="activation", calibration=calibration_ids("c4", tokenizer, 8, 128))
    assert report["kept"] == [1229] * 30
    assert report["parameters_after"] == report["parameters_before"] - 30 * 307 * 3 * 576
    pruned = perplexity(model, ids, seqlen=256, max_windows=4)
    assert dense < pruned < 50 * dense
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.intermediate_size == 1229 and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(loaded, ids[:, :64]), logits(model, ids[:, :64]))
