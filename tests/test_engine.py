import logging

import pytest
import torch

from llm_sparsify import compress
from llm_sparsify.models import ModelError, decoder_layers
from llm_sparsify.prune.wanda import prune_wanda
from llm_sparsify.recipe import Recipe, RecipeError, load_recipe
from llm_sparsify.stats import InputStatistics
from llm_sparsify.targets import target_modules
from llm_sparsify.transform_pass import prune_model
from llm_sparsify.walk import capture_layer_inputs, collect_statistics
from tests.conftest import TINY, tiny_model


@torch.no_grad()
def test_layerwise_pass_reproduces_full_model_logits(model, calibration):
    """Captured layer-0 inputs streamed through every layer give the full model's logits."""
    hidden, kwargs = capture_layer_inputs(model, calibration, torch.device("cpu"), batch_size=4)
    for layer in decoder_layers(model):
        hidden = [layer(h, **kw) for h, kw in zip(hidden, kwargs, strict=True)]
    logits = model.lm_head(model.model.norm(torch.cat(hidden)))
    assert torch.allclose(logits, model(calibration).logits, atol=1e-5)


@torch.no_grad()
def test_zero_sparsity_leaves_the_model_unchanged(model, calibration):
    before = model(calibration).logits
    prune_model(model, Recipe("sparsegpt", 0.0, options={"blocksize": 128, "dampening": 0.01}), calibration)
    assert torch.allclose(model(calibration).logits, before, atol=1e-4)


GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


@torch.no_grad()
def sequential_wanda_reference(model, ids, sparsity, inputs):
    """Slow obvious reference: run the whole (partly pruned) model to get a layer's input norms, for all
    its modules at once (inputs="dense"), or again before each group of modules (inputs="pruned")."""
    for layer in decoder_layers(model):
        for group in GROUPS if inputs == "pruned" else [sum(GROUPS, [])]:
            linears = [layer.get_submodule(name) for name in group]
            seen = {}

            def keep(module, args, seen=seen):
                seen[module] = args[0].reshape(-1, args[0].shape[-1])

            hooks = [m.register_forward_pre_hook(keep) for m in linears]
            model(ids)
            for h in hooks:
                h.remove()
            for module in linears:
                module.weight.data = prune_wanda(module.weight.data, seen[module].norm(dim=0), sparsity)


@pytest.mark.parametrize("inputs", ["pruned", "dense"])
@pytest.mark.parametrize("pattern", [0.5, (2, 4)])
def test_wanda_engine_matches_sequential_full_model_reference(model, calibration, pattern, inputs):
    reference = tiny_model(type(model).__name__.removesuffix("ForCausalLM").lower())
    sequential_wanda_reference(reference, calibration, pattern, inputs)
    prune_model(model, Recipe("wanda", pattern, inputs=inputs), calibration, batch_size=4)
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours == 0, theirs == 0), name


def test_the_two_input_orders_differ_after_the_first_group(calibration):
    """Only q/k/v (which read the layer's input) are calibrated alike; o_proj already sees pruned q/k/v."""
    pruned, dense = tiny_model(), tiny_model()
    prune_model(pruned, Recipe("wanda", 0.5, inputs="pruned"), calibration)
    prune_model(dense, Recipe("wanda", 0.5, inputs="dense"), calibration)
    layer_p, layer_d = decoder_layers(pruned)[0], decoder_layers(dense)[0]
    assert torch.equal(layer_p.self_attn.q_proj.weight, layer_d.self_attn.q_proj.weight)
    assert not torch.equal(layer_p.self_attn.o_proj.weight, layer_d.self_attn.o_proj.weight)


def test_batch_size_does_not_change_the_result(calibration):
    one, six = tiny_model(), tiny_model()
    prune_model(one, load_recipe("sparsegpt-2of4"), calibration, batch_size=1)
    prune_model(six, load_recipe("sparsegpt-2of4"), calibration, batch_size=6)
    for a, b in zip(one.parameters(), six.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_modules_reading_the_same_input_share_statistics(calibration):
    model = tiny_model()
    hidden, kwargs = capture_layer_inputs(model, calibration, torch.device("cpu"), 3)
    layer = decoder_layers(model)[0]
    modules = dict(layer.named_modules())
    linears = {n: m for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    stats = collect_statistics(layer, linears, hidden, kwargs, hessian=True)
    q, k, v, o = (stats[f"self_attn.{p}_proj"] for p in "qkvo")
    gate, up, down = (stats[f"mlp.{p}_proj"] for p in ("gate", "up", "down"))
    assert q is k is v and gate is up
    assert len({id(q), id(o), id(gate), id(down)}) == 4
    assert q.tokens == calibration.numel()
    assert isinstance(down, InputStatistics) and down.sum.shape == (128, 128)


def test_statistics_forward_stops_once_every_module_has_its_input(calibration):
    """down_proj's own product is not needed for statistics: it is never computed."""
    model = tiny_model()
    hidden, kwargs = capture_layer_inputs(model, calibration, torch.device("cpu"), 3)
    layer = decoder_layers(model)[0]
    calls = []
    layer.mlp.down_proj.register_forward_hook(lambda *args: calls.append(1))
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    stats = collect_statistics(layer, linears, hidden, kwargs, hessian=False)
    assert calls == []
    down_inputs = []
    layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: down_inputs.append(args[0].reshape(-1, 128)))
    for h, kw in zip(hidden, kwargs, strict=True):
        layer(h, **kw)
    expected = torch.cat(down_inputs).norm(dim=0)
    assert torch.allclose(stats["mlp.down_proj"].column_norms(), expected, rtol=1e-5)


@pytest.mark.parametrize("recipe", ["magnitude-50", "wanda-50", "sparsegpt-50", "wanda-2of4", "sparsegpt-2of4"])
def test_every_target_is_pruned_and_nothing_else(model, calibration, recipe):
    before = {n: p.clone() for n, p in model.named_parameters()}
    reports = prune_model(model, load_recipe(recipe), calibration, batch_size=4)
    assert len(reports) == 3 and all(len(r.sparsity) == 7 for r in reports)
    for name, param in model.named_parameters():
        if ".layers." in name and name.endswith("proj.weight"):
            assert (param == 0).float().mean() >= 0.5, name
        else:  # embeddings, norms, lm_head
            assert torch.equal(param, before[name]), name
    assert all(share >= 0.5 for r in reports for share in r.sparsity.values())


def test_targets_and_ignore_select_modules(calibration):
    model = tiny_model()
    recipe = Recipe("wanda", 0.5, targets=("*.self_attn.*",), ignore=("model.layers.0.*",))
    prune_model(model, recipe, calibration)
    for name, param in model.named_parameters():
        pruned = ".self_attn." in name and not name.startswith("model.layers.0.") and "proj" in name
        assert ((param == 0).float().mean() >= 0.5) == pruned, name


def test_recipe_errors_found_before_work(calibration):
    model = tiny_model()
    with pytest.raises(RecipeError, match="matches no Linear"):
        target_modules(model, Recipe("wanda", 0.5, targets=("*.attention.*",)))
    with pytest.raises(RecipeError, match="divisible by 24"):
        prune_model(model, Recipe("wanda", (1, 24)), calibration)  # in_features 64 and 128: not multiples of 24
    with pytest.raises(ValueError, match="LongTensor"):
        prune_model(model, load_recipe("wanda-50"), calibration.float())


def test_global_magnitude_spreads_sparsity_unevenly():
    model = tiny_model()
    with torch.no_grad():
        decoder_layers(model)[0].mlp.down_proj.weight.mul_(0.01)  # a layer of tiny weights
    reports = prune_model(model, Recipe("magnitude", 0.5, options={"scope": "global"}), None)
    shares = {n: s for r in reports for n, s in r.sparsity.items()}
    sizes = {n: model.get_submodule(n).weight.numel() for n in shares}
    overall = sum(shares[n] * sizes[n] for n in shares) / sum(sizes.values())
    assert abs(overall - 0.5) < 1e-3
    assert shares["model.layers.0.mlp.down_proj"] > 0.99


def test_compress_api_takes_recipe_files_and_returns_the_model(tmp_path, calibration):
    path = tmp_path / "r.yaml"
    path.write_text("pruning:\n  method: wanda\n  sparsity: 0.6\n")
    model = tiny_model()
    assert compress(model, path, calibration, device="cpu") is model
    weight = model.model.layers[1].mlp.up_proj.weight
    assert ((weight == 0).sum(1) == int(64 * 0.6)).all()


def test_unsupported_layout_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ModelError, match="GPT2LMHeadModel is not supported.*Llama, Mistral"):
        prune_model(gpt2, load_recipe("wanda-50"), torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize(("inputs", "expected"), [("pruned", [4, 3, 3]), ("dense", [6, 6, 3])])
def test_forwards_per_layer(calibration, inputs, expected):
    """inputs: pruned gathers statistics and the next layer's inputs in one forward of each batch (plus,
    once per layer structure, a forward of one batch that finds the module groups); dense runs a
    statistics forward, then a propagation forward (none after the last layer)."""
    model = tiny_model()
    calls = [0] * 3
    for i, layer in enumerate(decoder_layers(model)):
        layer.self_attn.q_proj.register_forward_pre_hook(lambda *args, i=i: calls.__setitem__(i, calls[i] + 1))
    prune_model(model, Recipe("wanda", 0.5, inputs=inputs), calibration, batch_size=2)
    assert calls == expected  # 3 batches


def test_a_failure_during_the_forward_leaves_no_paused_work_behind(calibration, monkeypatch):
    """If pruning a group fails, the paused forwards are unwound and the hooks removed."""
    import llm_sparsify.transform_pass as engine

    model = tiny_model()
    original, calls = engine.prune_weights, []

    def fail_on_second_group(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("boom")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "prune_weights", fail_on_second_group)
    with pytest.raises(ValueError, match="boom"):
        prune_model(model, load_recipe("sparsegpt-50"), calibration, batch_size=2)
    assert not any(m._forward_pre_hooks for m in model.modules())
    monkeypatch.undo()
    prune_model(model, load_recipe("wanda-50"), calibration, batch_size=2)  # the model is usable again


@pytest.mark.parametrize(("recipe", "nsamples", "warns"), [
    ("sparsegpt-50", 4, True),            # 4 × 32 = 128 tokens < 2 × 128 inputs of down_proj
    ("sparsegpt-50", 8, False),           # 256 tokens: enough
    ("sparsegpt-50-w4g128", 4, True),     # GPTQ needs the Hessian too
    ("wanda-50", 4, False),               # column norms: no matrix to condition
])
def test_too_few_calibration_tokens_for_a_hessian_warn(caplog, recipe, nsamples, warns):
    ids = torch.randint(0, TINY["vocab_size"], (nsamples, 32), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="llm_sparsify.api"):
        compress(tiny_model(), recipe, ids, device="cpu")
    assert ("poorly conditioned" in caplog.text) == warns
    if warns:
        assert f"{nsamples * 32} calibration tokens for a Hessian of up to 128 inputs" in caplog.text
