"""The budget planner (structure/budget.py, budget_pass.py): its cost model against real GGUF files, its plans
against a brute-force search, and a budget recipe run end to end on a tiny model."""

from __future__ import annotations

import copy
import itertools
import math
import random

import gguf
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llm_sparsify.budget_pass import file_cost, unit_losses
from llm_sparsify.evaluate import perplexity
from llm_sparsify.export.card import structure_section, what_was_done
from llm_sparsify.export.gguf import export_gguf
from llm_sparsify.export.hf import save_checkpoint
from llm_sparsify.models import decoder_layers
from llm_sparsify.pipeline import run_recipe
from llm_sparsify.recipe import RecipeError, load_recipe
from llm_sparsify.structure.budget import BLOCK, BudgetError, FileCost, LayerCost, plan_budget, width_levels
from llm_sparsify.structure.depth import Bypass
from llm_sparsify.structure.resize import cut_layer, remove_kv_groups
from tests.conftest import TINY, tiny_model
from tests.test_export_gguf import bpe_tokenizer, save_unequal


def test_width_levels_stay_multiples_of_the_gguf_block():
    assert width_levels(1536, 4, 0.75) == [1536, 1248, 960, 672, 384]
    for channels in (128, 1536, 11008, 14336):
        widths = width_levels(channels, 5, 0.9)
        assert all(w % BLOCK == 0 for w in widths) and widths == sorted(set(widths), reverse=True)
    assert width_levels(100, 2, 0.5) == [100, 75, 50]  # not a multiple of the block: any width


def costs(layers: int, seed: int) -> FileCost:
    rng = random.Random(seed)
    return FileCost([LayerCost(rng.uniform(50, 150), rng.uniform(1, 3), 96) for _ in range(layers)],
                    other_bytes=300, other_read=100, layer_time=rng.uniform(0, 80), token_time=40,
                    output_saving=40)


def every_plan(widths: list[list[int]]):
    return itertools.product(*[[None, *w] for w in widths])


def loss_of(kept, blocks, narrowed, widths) -> float:
    return sum(blocks[i] if k is None else narrowed[i][widths[i].index(k)] for i, k in enumerate(kept))


@pytest.mark.parametrize("measure", ["size", "time"])
def test_plans_are_the_best_within_the_budget(measure):
    """Against every plan of a 4-layer model (each layer at one of 3 widths or removed, the output layer at either
    type): the budget is met, the predicted loss is the plan's own sum, and no plan within the budget (less the
    rounding, a step per layer) has a lower one."""
    rng = random.Random(0)
    widths = [width_levels(96, 2, 0.67)] * 4  # 96, 64, 32 channels
    cost = costs(4, 1)
    of = cost.size if measure == "size" else cost.time
    dense = of([96] * 4)
    for trial in range(30):
        blocks = [rng.uniform(0.2, 2) for _ in range(4)]
        narrowed = [[0.0, *sorted(rng.uniform(0, b) for _ in widths[0][1:])] for b in blocks]
        output = rng.uniform(0, 1)
        limit = dense * rng.uniform(0.45, 0.95)
        plan = plan_budget(blocks, narrowed, widths, cost, measure, limit, output)
        assert of(plan.kept, plan.small_output) <= limit
        own_loss = loss_of(plan.kept, blocks, narrowed, widths) + output * plan.small_output
        assert plan.predicted_loss == pytest.approx(own_loss)
        feasible = [loss_of(k, blocks, narrowed, widths) + output * small for k in every_plan(widths)
                    for small in (False, True)
                    if any(x is not None for x in k) and of(list(k), small) <= limit * (1 - 1e-3)]
        assert plan.predicted_loss <= min(feasible) + 1e-9, trial


def loss_with_groups(choice, blocks, narrowed, grouped, widths, counts) -> float:
    """A plan's predicted loss, each layer's choice None (removed) or (MLP width, KV groups)."""
    return sum(blocks[i] if c is None else narrowed[i][widths[i].index(c[0])] + grouped[i][counts[i].index(c[1])]
               for i, c in enumerate(choice))


@pytest.mark.parametrize("measure", ["size", "time"])
def test_plans_with_kv_groups_are_the_best_within_the_budget(measure):
    """As above with each layer also at 3, 2 or 1 of its KV groups (losses added to its width's): against every plan
    of a 3-layer model."""
    rng = random.Random(1)
    widths = [width_levels(96, 2, 0.67)] * 3
    counts = [[3, 2, 1]] * 3
    base = costs(3, 2)
    cost = FileCost([LayerCost(c.fixed, c.per_channel, c.channels, rng.uniform(5, 15), 3) for c in base.layers],
                    base.other_bytes, base.other_read, base.layer_time, base.token_time, output_saving=40)
    of = cost.size if measure == "size" else cost.time
    dense = of([96] * 3)
    options = [[None, *itertools.product(widths[i], counts[i])] for i in range(3)]
    for trial in range(20):
        blocks = [rng.uniform(0.2, 2) for _ in range(3)]
        narrowed = [[0.0, *sorted(rng.uniform(0, b) for _ in widths[0][1:])] for b in blocks]
        grouped = [[0.0, *sorted(rng.uniform(0, b) for _ in range(2))] for b in blocks]
        limit = dense * rng.uniform(0.45, 0.95)
        plan = plan_budget(blocks, narrowed, widths, cost, measure, limit, None, group_losses=grouped,
                           group_counts=counts)
        assert of(plan.kept, False, plan.groups) <= limit
        assert [g is None for g in plan.groups] == [k is None for k in plan.kept]
        losses = (blocks, narrowed, grouped, widths, counts)
        chosen = [None if k is None else (k, g) for k, g in zip(plan.kept, plan.groups, strict=True)]
        assert plan.predicted_loss == pytest.approx(loss_with_groups(chosen, *losses))
        feasible = [loss_with_groups(choice, *losses) for choice in itertools.product(*options)
                    if any(c is not None for c in choice)
                    and of([c and c[0] for c in choice], False, [c and c[1] for c in choice]) <= limit * (1 - 1e-3)]
        assert plan.predicted_loss <= min(feasible) + 1e-9, trial


def loss_with_parts(choice, blocks, narrowed, parts, widths) -> float:
    """A plan's predicted loss, each layer's choice None (removed) or (MLP width, (attention, MLP) upgraded)."""
    return sum(blocks[i] if c is None else narrowed[i][widths[i].index(c[0])]
               + sum(loss for loss, up in zip(parts[i], c[1], strict=True) if not up) for i, c in enumerate(choice))


@pytest.mark.parametrize("measure", ["size", "time"])
def test_plans_with_upgraded_parts_are_the_best_within_the_budget(measure):
    """As above with each layer's attention and MLP at the file's type (a loss each) or the upgrade type (no loss,
    more bytes, each upgraded byte up_weight times the time): against every plan of a 3-layer model."""
    rng = random.Random(2)
    widths = [width_levels(96, 2, 0.67)] * 3
    base = costs(3, 3)
    layers = [LayerCost(c.fixed, c.per_channel, c.channels, 10.0, 3, c.per_channel * 1.9, 19.0) for c in base.layers]
    cost = FileCost(layers, base.other_bytes, base.other_read, base.layer_time, base.token_time, output_saving=40,
                    up_weight=1.35)
    of = cost.size if measure == "size" else cost.time
    dense = of([96] * 3)
    ups = list(itertools.product((False, True), repeat=2))
    options = [[None, *itertools.product(widths[i], ups)] for i in range(3)]
    upgrades = 0
    for trial in range(20):
        blocks = [rng.uniform(0.2, 2) for _ in range(3)]
        narrowed = [[0.0, *sorted(rng.uniform(0, b) for _ in widths[0][1:])] for b in blocks]
        losses = (blocks, narrowed, [(rng.uniform(0, 0.3), rng.uniform(0, 0.3)) for _ in range(3)], widths)
        limit = dense * rng.uniform(0.5, 1.3)
        plan = plan_budget(blocks, narrowed, widths, cost, measure, limit, None, part_losses=losses[2])
        assert of(plan.kept, False, None, plan.up) <= limit
        chosen = [None if k is None else (k, u) for k, u in zip(plan.kept, plan.up, strict=True)]
        assert plan.predicted_loss == pytest.approx(loss_with_parts(chosen, *losses))
        feasible = [loss_with_parts(choice, *losses) for choice in itertools.product(*options)
                    if any(c is not None for c in choice)
                    and of([c and c[0] for c in choice], False, None, [c and c[1] for c in choice])
                    <= limit * (1 - 1e-3)]
        assert plan.predicted_loss <= min(feasible) + 1e-9, trial
        upgrades += any(u and any(u) for u in plan.up)
    assert 0 < upgrades < 20  # some plans upgrade parts, some do not


def test_with_equal_costs_the_plan_is_the_best_one():
    """Blocks only, all of one size: dropping the k cheapest is optimal; a budget that no block fits is refused."""
    cost = FileCost([LayerCost(100, 0, 1)] * 6, other_bytes=0, other_read=0, layer_time=0, token_time=0)
    blocks = [0.5, 0.1, 0.9, 0.3, 0.2, 0.7]
    plan = plan_budget(blocks, [[0.0]] * 6, [[1]] * 6, cost, "size", 350)
    assert plan.removed_blocks == [1, 3, 4] and plan.predicted_loss == pytest.approx(0.6)
    with pytest.raises(BudgetError, match="no plan"):
        plan_budget(blocks, [[0.0]] * 6, [[1]] * 6, cost, "size", 50)


def gguf_tensor_bytes(path) -> int:
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0"])
def test_the_cost_model_counts_the_gguf_tensor_bytes_exactly(tmp_path, qtype):
    """Dense, and with unequal layers (MLP widths and KV groups), tied embeddings and not."""
    checkpoint, unequal = save_unequal(tmp_path / "unequal")
    cost = file_cost(unequal, qtype)
    assert cost.size([c.channels for c in cost.layers]) == gguf_tensor_bytes(
        export_gguf(checkpoint, tmp_path / "unequal.gguf", qtype=qtype))
    tokenizer = bpe_tokenizer()
    torch.manual_seed(0)
    untied = LlamaForCausalLM(LlamaConfig(**dict(TINY, vocab_size=len(tokenizer) + 4, tie_word_embeddings=False,
                                                 bos_token_id=1, eos_token_id=2, pad_token_id=0))).eval()
    save_checkpoint(untied, tokenizer, tmp_path / "untied", {"recipe_name": "dense"})
    cost = file_cost(untied, qtype)
    assert cost.size([c.channels for c in cost.layers]) == gguf_tensor_bytes(
        export_gguf(tmp_path / "untied", tmp_path / "untied.gguf", qtype=qtype))


@pytest.mark.parametrize("target", [{"size": 0.75}, {"decode_speedup": 1.3}])
def test_a_budget_recipe_meets_its_budget_on_a_tiny_model(calibration, target):
    model = tiny_model("llama")
    dense_cost = file_cost(model, "Q4_0")
    dense = [c.channels for c in dense_cost.layers]
    recipe = load_recipe({"budget": {**target, "qtype": "Q4_0", "levels": 2, "samples": 2}})
    _, stages = run_recipe(model, recipe, calibration)
    report = stages["budget"]
    after = file_cost(model, "Q4_0", report["small_output"])
    kept = [c.channels for c in after.layers]
    assert len(kept) == TINY["num_hidden_layers"] - len(report["removed"])
    assert kept == [k for k in report["kept"] if k is not None] and all(k % BLOCK == 0 for k in kept)
    if "size" in target:
        assert after.size(kept) <= 0.75 * dense_cost.size(dense)
        assert report["predicted"]["size"] == pytest.approx(after.size(kept) / dense_cost.size(dense), abs=1e-4)
    else:
        assert dense_cost.time(dense) / after.time(kept) >= 1.3
    assert report["removed"] or min(kept) < TINY["intermediate_size"]


def test_a_budget_recipe_with_kv_groups_cuts_what_it_planned(calibration, monkeypatch):
    """max_kv lets the plan take KV groups: the model keeps the groups and widths the report says, and its cost
    meets the budget. (This random model loses nothing without its blocks, so they are made costly here: the plan
    must cut widths and groups.)"""
    import llm_sparsify.budget_pass as budget_pass

    measured = budget_pass.unit_losses

    def costly_blocks(*args, **kwargs):
        losses = measured(*args, **kwargs)
        return {**losses, "blocks": [10.0] * len(losses["blocks"])}

    monkeypatch.setattr(budget_pass, "unit_losses", costly_blocks)
    model = tiny_model("llama")
    dense_cost = file_cost(model, "Q4_0")
    dense = [c.channels for c in dense_cost.layers]
    recipe = load_recipe({"budget": {"size": 0.6, "qtype": "Q4_0", "levels": 2, "max_kv": 0.5, "samples": 2}})
    _, stages = run_recipe(model, recipe, calibration)
    report = stages["budget"]
    assert len(report["group_losses"]) == TINY["num_hidden_layers"] and all(len(r) == 2 for r in report["group_losses"])
    after = file_cost(model, "Q4_0", report["small_output"])
    assert [c.groups for c in after.layers] == [g for g in report["groups"] if g is not None]
    assert [c.channels for c in after.layers] == [k for k in report["kept"] if k is not None]
    assert after.size([c.channels for c in after.layers]) <= 0.6 * dense_cost.size(dense)
    assert not report["removed"] and min(report["groups"]) == 1  # groups were cut
    for layer, groups in zip(decoder_layers(model), [g for g in report["groups"] if g is not None], strict=True):
        assert layer.self_attn.k_proj.out_features == groups * layer.self_attn.head_dim
        assert layer.self_attn.q_proj.out_features == groups * 2 * layer.self_attn.head_dim
    record = {"recipe": recipe.to_dict(), "stages": stages}
    cut = sum(2 - g for g in report["groups"])
    assert f"{cut} of the 6 KV groups of the layers kept" in " ".join(what_was_done(record))
    assert "KV groups kept per layer: " + ", ".join(f"{g}/2" for g in report["groups"]) in structure_section(record)


def test_upgraded_parts_are_planned_written_and_counted_exactly(tmp_path, calibration, monkeypatch):
    """`upgrade: Q8_0`: the plan may write a layer's attention or MLP at Q8_0 in a Q4_0 file. The file has each
    planned part at Q8_0 and every other at Q4_0, its tensor bytes are the cost model's for the plan, and the budget
    is met. (Parts are made costly at Q4_0 here and blocks costly to remove, so the plan must trade widths for
    upgrades.)"""
    import llm_sparsify.budget_pass as budget_pass

    measured = budget_pass.unit_losses

    def costly(*args, **kwargs):
        losses = measured(*args, **kwargs)
        assert losses["parts"] is not None and all(a != 0 and m != 0 for a, m in losses["parts"])
        return {**losses, "blocks": [10.0] * len(losses["blocks"]), "narrowed": [[0.0, 0.02, 0.04]] * 3,
                "parts": [(1.0, 0.01), (0.01, 2.0), (3.0, 0.01)]}

    monkeypatch.setattr(budget_pass, "unit_losses", costly)
    tokenizer = bpe_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dict(TINY, vocab_size=len(tokenizer) + 4, bos_token_id=1, eos_token_id=2,
                                                pad_token_id=0))).eval()
    dense = file_cost(model, "Q4_0")
    recipe = load_recipe({"budget": {"size": 0.95, "qtype": "Q4_0", "levels": 2, "samples": 2, "upgrade": "q8_0"}})
    _, stages = run_recipe(model, recipe, calibration)
    report = stages["budget"]
    upgraded = report["upgraded"]
    assert report["upgrade"] == "Q8_0" and len(upgraded) == TINY["num_hidden_layers"] - len(report["removed"])
    assert upgraded[0][0] and upgraded[1][1] and upgraded[2][0]  # the costly parts; not all: the bytes are short
    assert not all(all(up) for up in upgraded)
    save_checkpoint(model, tokenizer, tmp_path / "planned", {"recipe": recipe.to_dict(), "stages": stages})
    path = export_gguf(tmp_path / "planned", tmp_path / "planned.gguf", qtype="Q4_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) == 2}
    for i, (attention, mlp) in enumerate(upgraded):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            up = attention if name.startswith("attn") else mlp
            assert types[f"blk.{i}.{name}.weight"] == ("Q8_0" if up else "Q4_0"), (i, name)
    after = file_cost(model, "Q4_0", report["small_output"], upgrade="Q8_0")
    kept = [c.channels for c in after.layers]
    assert after.size(kept, up=[tuple(u) for u in upgraded]) == gguf_tensor_bytes(path)
    assert gguf_tensor_bytes(path) <= 0.95 * dense.size([c.channels for c in dense.layers])
    n = [sum(up[k] for up in upgraded) for k in (0, 1)]
    words = f"at Q8_0 rather than Q4_0: the attention of {n[0]} layers and the MLP of {n[1]} layer{'s' * (n[1] != 1)}"
    assert words in " ".join(what_was_done({"recipe": recipe.to_dict(), "stages": stages}))


def test_budget_recipes_are_checked_before_any_work(calibration):
    for section, message in [({"size": 0.5, "decode_speedup": 2}, "exactly one"), ({"qtype": "Q4_0"}, "exactly one"),
                             ({"decode_speedup": 0.9}, "above 1"), ({"size": 1.5}, "fraction"),
                             ({"size": 0.5, "max_kv": 1}, "max_kv must be a share"),
                             ({"size": 0.5, "max_kv": -0.1}, "max_kv must be a share"),
                             ({"size": 0.5, "upgrade": "Q4_0"}, "another type than qtype"),
                             ({"size": 0.5, "upgrade": "Q5_K"}, "upgrade must be one of")]:
        with pytest.raises(RecipeError, match=message):
            load_recipe({"budget": section})
    with pytest.raises(RecipeError, match="leave out the depth"):
        load_recipe({"budget": {"size": 0.5}, "depth": {"blocks": 1}})
    with pytest.raises(RecipeError, match="export.qtype is Q8_0"):
        load_recipe({"budget": {"size": 0.5}, "export": {"formats": ["gguf"]}})
    assert "budget planner" in load_recipe({"budget": {"size": 0.5}}).whole_model_stages
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetError, match="raise the budget"):  # below one block at its narrowest: refused first
        run_recipe(model, load_recipe({"budget": {"size": 0.05, "samples": 2}}), calibration)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_unit_losses_from_layer_i_on_equal_the_whole_model_s(kind, calibration):
    """Each change to layer i is measured from layer i on, over the dense inputs kept from one forward: the same
    losses as a forward of the whole changed model; the output layer's rounding too."""
    model = tiny_model(kind)
    scores = [torch.rand(128, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    group_scores = [torch.tensor([0.3, 0.7]), torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.6])]
    losses = unit_losses(model, calibration[:3], scores, [[128, 96, 64]] * 3, output_qtype="Q4_0",
                         group_scores=group_scores, group_counts=[[2, 1]] * 3, part_qtype="Q4_0")
    base, blocks, narrowed, output, grouped = (losses[k] for k in ("base", "blocks", "narrowed", "output", "grouped"))

    def loss() -> float:
        return math.log(perplexity(model, calibration[:3].reshape(1, -1), calibration.shape[1]))

    assert base == pytest.approx(loss(), abs=1e-5)
    layers = decoder_layers(model)
    for i in range(3):
        layer = layers[i]
        layers[i] = Bypass()
        assert blocks[i] == pytest.approx(loss() - base, abs=1e-5)
        layers[i] = layer
        down = layer.mlp.down_proj.weight
        saved = down.detach().clone()
        with torch.no_grad():
            down[:, scores[i].argsort()[:64]] = 0  # the 64 lowest-scoring channels
        assert narrowed[i][2] == pytest.approx(loss() - base, abs=1e-5) and narrowed[i][2] != 0
        with torch.no_grad():
            down.copy_(saved)
    weight = model.get_output_embeddings().weight
    saved = weight.detach().clone()
    kind_q4 = gguf.GGMLQuantizationType.Q4_0
    with torch.no_grad():
        weight.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(saved.numpy(), kind_q4), kind_q4)))
    assert output == pytest.approx(loss() - base, abs=1e-5) and output != 0
    with torch.no_grad():
        weight.copy_(saved)
    for i in range(3):  # a part's Linears rounded as the Q4_0 file stores them
        for k, names in enumerate((("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"))):
            linears = [getattr(getattr(layers[i], "self_attn" if k == 0 else "mlp"), name) for name in names]
            saved = [m.weight.detach().clone() for m in linears]
            with torch.no_grad():
                for m in linears:
                    q = gguf.quants.quantize(m.weight.numpy(), kind_q4)
                    m.weight.copy_(torch.from_numpy(gguf.quants.dequantize(q, kind_q4)))
            assert losses["parts"][i][k] == pytest.approx(loss() - base, abs=1e-5) and losses["parts"][i][k] != 0
            with torch.no_grad():
                for m, w in zip(linears, saved, strict=True):
                    m.weight.copy_(w)
    dense = copy.deepcopy(model)
    for i in range(3):  # a KV group's o_proj columns zeroed: the same loss as the group cut out of the layer
        cut_layer(decoder_layers(model)[i], "heads", group_scores[i] == group_scores[i].max())
        assert grouped[i][0] == 0 and grouped[i][1] == pytest.approx(loss() - base, abs=1e-5) and grouped[i][1] != 0
        model = copy.deepcopy(dense)


def test_the_cost_of_kv_groups_is_the_cut_model_s():
    """The dense model's cost with some layers' KV groups counted out equals the cost of the model they are cut from
    (whose bytes the test above checks against written GGUF files)."""
    model = tiny_model("llama")
    cost = file_cost(model, "Q4_0")
    assert [c.groups for c in cost.layers] == [2, 2, 2] and all(c.per_group > 0 for c in cost.layers)
    kept, counts = [c.channels for c in cost.layers], [2, 1, 1]
    remove_kv_groups(model, [torch.tensor([True, True]), torch.tensor([False, True]), torch.tensor([True, False])])
    cut = file_cost(model, "Q4_0")
    assert cost.size(kept, groups=counts) == pytest.approx(cut.size(kept), rel=1e-12)
    assert cost.size(kept, groups=counts) < cost.size(kept)
    assert cost.time(kept, True, counts) == pytest.approx(cut.time(kept, True), rel=1e-12)


def test_the_card_says_what_the_plan_removed_and_predicted(calibration):
    model = tiny_model("llama")
    recipe = load_recipe({"budget": {"size": 0.75, "qtype": "Q4_0", "levels": 2, "samples": 2}})
    _, stages = run_recipe(model, recipe, calibration)
    record = {"recipe": recipe.to_dict(), "stages": stages}
    assert load_recipe(record["recipe"]).budget == recipe.budget  # the saved recipe runs again as it was
    done = " ".join(what_was_done(record))
    assert "budget plan for 75% of the dense Q4_0 GGUF's bytes" in done
    section = structure_section(record)
    assert "Budget plan (Q4_0 GGUF)" in section and f"{stages['budget']['predicted']['size']:.1%}" in section
    assert section.count("removed") == len(stages["budget"]["removed"])
