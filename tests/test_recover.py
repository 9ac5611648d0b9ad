"""Recovery fine-tuning: frozen masks (full and LoRA), the merged model, group lasso, gradual pruning, LR rewinding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from llm_sparsify.prune.magnitude import prune_magnitude
from llm_sparsify.recover import (
    RecoveryError,
    distillation_loss,
    finetune,
    gradual_prune,
    group_lasso_penalty,
    lr_schedule,
    sparsity_masks,
    teacher_logits,
)
from llm_sparsify.targets import layer_linears
from tests.conftest import TINY, tiny_model


def linears(model) -> dict[str, nn.Linear]:
    return {name: module for layer in layer_linears(model) for name, module in layer.items()}


@torch.no_grad()
def magnitude(model, sparsity: float) -> None:
    for module in linears(model).values():
        module.weight.data = prune_magnitude(module.weight.data, sparsity)


def tokens(rows: int, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (rows, seqlen), generator=torch.Generator().manual_seed(seed))


def test_sparsity_masks_are_the_zeros_of_decoder_linears():
    model = tiny_model("llama")
    magnitude(model, 0.5)
    masks = sparsity_masks(model)
    assert set(masks) == set(linears(model)) and not any("lm_head" in name or "embed" in name for name in masks)
    for name, module in linears(model).items():
        assert torch.equal(masks[name], module.weight == 0)
        assert masks[name].sum() >= int(0.5 * module.weight.numel())


def test_lr_schedule_warms_up_then_decays_to_zero():
    base, total, warmup = 0.1, 20, 5
    rates = [lr_schedule(step, total, warmup, base) for step in range(total + 1)]
    assert all(a < b for a, b in zip(rates[:warmup], rates[1:warmup], strict=False))
    assert rates[warmup - 1] == pytest.approx(base) and rates[warmup] == pytest.approx(base)
    assert all(a > b for a, b in zip(rates[warmup:total], rates[warmup + 1 : total + 1], strict=True))
    assert rates[total - 1] > 0 and rates[total] == 0
    decay = [rates[s + 1] - rates[s] for s in range(warmup, total)]
    assert max(decay) == pytest.approx(min(decay))  # linear
    assert lr_schedule(0, 10, 0, base) == base


@pytest.mark.parametrize("lora", [None, 4])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_masks_stay_frozen(kind, lora):
    model = tiny_model(kind)
    magnitude(model, 0.5)
    masks = sparsity_masks(model)
    before = copy.deepcopy(model.state_dict())
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.model.norm.weight.requires_grad_(False)  # a flag that differs from the rest must come back too
    flags["model.norm.weight"] = False
    finetune(model, tokens(4), steps=4, lr=1e-2, batch_size=2, lora=lora, weight_decay=0.1)

    assert not model.training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(type(m) is nn.Linear for m in linears(model).values())  # no parametrization or adapter left
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, module in linears(model).items():
        weight = module.weight.detach()
        assert torch.equal(weight[masks[name]], torch.zeros_like(weight[masks[name]]))
        assert torch.equal(weight == 0, masks[name])  # the mask did not change
        changed = weight[~masks[name]] != before[f"{name}.weight"][~masks[name]]
        assert changed.float().mean() > 0.99
    trained = {f"{name}.weight" for name in linears(model)}
    for key in before.keys() - trained:  # embeddings, norms, biases, lm_head
        assert torch.equal(after[key], before[key]), key


def test_adamw_moves_a_weight_whose_gradient_is_zero():
    """Why finetune re-zeroes after each step: a zero gradient alone does not hold a weight that has momentum."""
    weight = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, weight_decay=0.0)
    weight.grad = torch.ones(3)
    optimizer.step()
    with torch.no_grad():
        weight[0] = 0.0  # pruned now
    weight.grad = torch.tensor([0.0, 1.0, 1.0])
    optimizer.step()
    assert weight[0] != 0


@pytest.mark.parametrize("lora", [None, 4])
def test_trained_model_is_the_merged_model(lora):
    """The loss the run computes at step N is the loss of the model a run of N steps hands back (merged)."""
    data, warmup, steps = tokens(1), 10, 3  # within the warmup the rates do not depend on the run's length
    model, longer = tiny_model("llama"), tiny_model("llama")
    magnitude(model, 0.6)
    magnitude(longer, 0.6)
    finetune(model, data, steps, lr=1e-2, batch_size=1, lora=lora, warmup=warmup, weight_decay=0.1)
    losses = finetune(longer, data, steps + 1, lr=1e-2, batch_size=1, lora=lora, warmup=warmup, weight_decay=0.1)
    with torch.no_grad():
        merged = model(input_ids=data, labels=data).loss.item()
    assert merged == pytest.approx(losses[steps], rel=1e-6, abs=1e-6)
    assert losses[steps] != pytest.approx(losses[0], rel=1e-4)  # the steps did change the model


@pytest.mark.parametrize("lora", [None, 8])
def test_loss_goes_down_on_a_repeated_batch(lora):
    model = tiny_model("mistral")
    magnitude(model, 0.5)
    losses = finetune(model, tokens(2), steps=15, lr=3e-3, batch_size=2, lora=lora)
    assert len(losses) == 15
    assert losses[-1] < losses[0] - 0.1


def full_kl(teacher, student, ids) -> float:
    """KL(p_teacher ‖ q_student) over the whole vocabulary, averaged over every position of `ids`."""
    with torch.no_grad():
        p_log, q_log = (model(ids).logits.float().log_softmax(-1) for model in (teacher, student))
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean().item()


def test_distillation_loss_with_every_logit_is_the_kl_divergence():
    dense, student = tiny_model("llama"), tiny_model("llama")
    magnitude(student, 0.5)
    ids = tokens(3)
    top = teacher_logits(dense, ids, k=TINY["vocab_size"], batch_size=2)
    assert top.values.shape == (3, 32, TINY["vocab_size"]) and top.indices.dtype == torch.int32
    with torch.no_grad():
        loss = distillation_loss(student(ids).logits, top.values, top.indices).item()
    assert loss == pytest.approx(full_kl(dense, student, ids), rel=1e-5)
    few = teacher_logits(dense, ids, k=8)  # the top 8 only: most of the teacher's mass, renormalised
    assert few.values.shape[-1] == 8 and torch.equal(few.values, top.values[..., :8])


@pytest.mark.parametrize("lora", [None, 4])
def test_distillation_lowers_the_kl_to_the_dense_model_with_masks_frozen(lora):
    dense = tiny_model("llama")
    student = copy.deepcopy(dense)
    magnitude(student, 0.6)
    zeros = {name: m.weight == 0 for name, m in linears(student).items()}
    train, held_out = tokens(8), tokens(4, seed=2)
    before = full_kl(dense, student, held_out), full_kl(dense, student, train)
    teacher = teacher_logits(dense, train, k=TINY["vocab_size"])
    losses = finetune(student, train, steps=20, lr=1e-3, batch_size=4, lora=lora, teacher=teacher)
    assert losses[-1] < losses[0]
    assert full_kl(dense, student, train) < 0.8 * before[1]
    assert full_kl(dense, student, held_out) < before[0]
    assert all(bool((m.weight[zeros[name]] == 0).all()) for name, m in linears(student).items())  # still pruned
    with pytest.raises(RecoveryError, match="teacher's logits cover windows"):
        finetune(student, tokens(4), steps=1, teacher=teacher)


def test_a_recipe_distils_from_the_model_before_pruning(monkeypatch, tmp_path):
    from llm_sparsify import compress, pipeline
    from llm_sparsify.export.hf import read_record

    taken = []
    original = pipeline.teacher_logits
    monkeypatch.setattr(pipeline, "teacher_logits", lambda model, *args: taken.append(
        sum(int((m.weight == 0).sum()) for m in linears(model).values())) or original(model, *args))
    model = tiny_model("llama")
    compress(model, {"pruning": {"method": "magnitude", "sparsity": 0.5},
                     "recovery": {"steps": 3, "loss": "kl", "top_k": 8, "nsamples": 4, "seqlen": 16}},
             tokens(8, 16), device="cpu", output=tmp_path / "out")
    assert taken == [0]  # the teacher is the dense model
    recovery = read_record(tmp_path / "out")["stages"]["recovery"]
    assert recovery["loss"] == "kl" and recovery["top_k"] == 8 and recovery["last_loss"] >= 0
    assert min(sum(int((m.weight == 0).sum()) / m.weight.numel() for m in layer.values()) / len(layer)
               for layer in layer_linears(model)) >= 0.5


def reference_penalty(model, unit: str) -> torch.Tensor:
    """Σ_g ‖W_g‖₂, one group at a time; each layer's heads counted from its own weights (they differ after global
    head pruning)."""
    total = torch.zeros(())
    for layer in model.model.layers:
        if unit == "mlp":
            gate, up, down = (layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight)
            for g in range(gate.shape[0]):
                total = total + torch.cat([gate[g], up[g], down[:, g]]).norm()
        else:
            attn = layer.self_attn
            d = attn.head_dim
            heads, kv_heads = attn.q_proj.weight.shape[0] // d, attn.k_proj.weight.shape[0] // d
            for g in range(kv_heads):
                parts = [attn.k_proj.weight[g * d : (g + 1) * d].reshape(-1),
                         attn.v_proj.weight[g * d : (g + 1) * d].reshape(-1)]
                for h in range(heads):
                    if h * kv_heads // heads == g:  # query head h reads KV head g (repeat_kv)
                        parts += [attn.q_proj.weight[h * d : (h + 1) * d].reshape(-1),
                                  attn.o_proj.weight[:, h * d : (h + 1) * d].reshape(-1)]
                total = total + torch.cat(parts).norm()
    return total


@pytest.mark.parametrize("unit", ["mlp", "heads"])
def test_group_lasso_penalty_matches_a_loop_over_units(model, unit):
    with torch.no_grad():
        torch.testing.assert_close(group_lasso_penalty(model, unit), reference_penalty(model, unit))


def test_group_lasso_takes_each_layers_own_kv_groups_after_global_head_pruning():
    """Global head pruning leaves layers with different numbers of KV groups (config: the largest); the lasso's
    groups are each layer's own, as width pruning defines them, not the config's count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_sparsify.pipeline import prune_width

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dict(TINY, num_attention_heads=8, num_key_value_heads=4))).eval()
    prune_width(model, "heads", 5 / 12, score="weight", scope="global")
    groups = [layer.self_attn.k_proj.out_features // layer.self_attn.head_dim for layer in model.model.layers]
    assert sum(groups) == 7 and len(set(groups)) > 1
    with torch.no_grad():
        torch.testing.assert_close(group_lasso_penalty(model, "heads"), reference_penalty(model, "heads"))


@pytest.mark.parametrize("unit", ["mlp", "heads"])
def test_group_lasso_shrinks_the_groups(unit):
    plain, lasso = tiny_model("llama"), tiny_model("llama")
    data = tokens(4)
    finetune(plain, data, steps=6, lr=1e-2, batch_size=2, masks={})
    finetune(lasso, data, steps=6, lr=1e-2, batch_size=2, masks={}, group_lasso=1.0, lasso_unit=unit)
    with torch.no_grad():
        assert group_lasso_penalty(lasso, unit) < group_lasso_penalty(plain, unit) - 1.0


@pytest.mark.parametrize("rewind", [True, False])
def test_gradual_prune(rewind):
    model = tiny_model("llama")
    schedule, steps, lr, warmup = [0.2, 0.5, 0.7], 3, 1e-2, 1
    stage_masks: list[dict[str, torch.Tensor]] = []

    def prune(model, sparsity):
        for masks in stage_masks[-1:]:  # AdamW carries on across the stages without rewinding: zeros still held?
            for name, module in linears(model).items():
                assert not module.weight[masks[name]].any()
        magnitude(model, sparsity)
        stage_masks.append(sparsity_masks(model))

    results = gradual_prune(model, tokens(4), schedule, prune, steps, rewind=rewind, lr=lr, warmup=warmup,
                            batch_size=2, weight_decay=0.1)
    sizes = [m.weight.numel() for m in linears(model).values()]
    for result, target, masks in zip(results, schedule, stage_masks, strict=True):
        assert result["target"] == target
        assert result["sparsity"] * sum(sizes) >= sum(int(n * target) for n in sizes)
        assert result["sparsity"] == pytest.approx(sum(int(m.sum()) for m in masks.values()) / sum(sizes))
        assert result["loss_start"] is not None and result["loss_end"] is not None
    for earlier, later in zip(stage_masks, stage_masks[1:], strict=False):  # masks only grow
        assert all((later[name] | ~earlier[name]).all() for name in earlier)
    assert all(torch.equal(m.weight == 0, stage_masks[-1][name]) for name, m in linears(model).items())

    rates = [result["lrs"] for result in results]
    if rewind:
        expected = [[lr_schedule(s, steps, warmup, lr) for s in range(steps)]] * len(schedule)
        assert rates[1][0] > rates[0][-1]  # restarts
    else:
        total = steps * len(schedule)
        flat = [lr_schedule(s, total, warmup, lr) for s in range(total)]
        expected = [flat[i * steps : (i + 1) * steps] for i in range(len(schedule))]
        assert rates[1][0] < rates[0][-1]  # continues its decay
    assert rates == expected


def test_errors_are_value_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="LongTensor"):
        finetune(model, tokens(2).float(), steps=1)
    with pytest.raises(RecoveryError, match="names no Linear"):
        finetune(model, tokens(2), steps=1, masks={"lm_head": torch.zeros(128, 64, dtype=torch.bool)})
    with pytest.raises(RecoveryError, match="unit"):
        finetune(model, tokens(2), steps=1, group_lasso=0.1, lasso_unit="layers")
    with pytest.raises(RecoveryError, match="LoRA rank"):
        finetune(model, tokens(2), steps=1, lora=0)
    with pytest.raises(RecoveryError, match="non-decreasing"):
        gradual_prune(model, tokens(2), [0.5, 0.2], magnitude, 1)
    with pytest.raises(RecoveryError, match="does not take"):
        gradual_prune(model, tokens(2), [0.5], magnitude, 1, masks={})


@pytest.mark.slow
def test_smollm2_recovery_after_wanda_70():
    from llm_sparsify.api import compress
    from llm_sparsify.data import calibration_ids, evaluation_ids
    from llm_sparsify.evaluate import perplexity
    from llm_sparsify.models import load_model

    model, tokenizer = load_model(None)
    calibration = calibration_ids("c4", tokenizer, 16, 128, seed=0)
    compress(model, {"pruning": {"method": "wanda", "sparsity": 0.7}}, calibration, device="cpu")
    masks = sparsity_masks(model)
    held_out = evaluation_ids("wikitext2", tokenizer)
    before = perplexity(model, held_out, seqlen=256, max_windows=4)
    # short windows, batch 1: a few minutes on 2 CPU cores (a step of 128 tokens takes seconds)
    finetune(model, calibration_ids("c4", tokenizer, 8, 128, seed=1), steps=20, lr=1e-4, batch_size=1)
    after = perplexity(model, held_out, seqlen=256, max_windows=4)
    assert after < before
    assert all(torch.equal(m.weight == 0, masks[name]) for name, m in linears(model).items())
