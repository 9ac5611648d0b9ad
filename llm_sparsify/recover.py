"""Recovery fine-tuning of a pruned model with frozen masks; gradual pruning; group lasso.

Masked fine-tuning. With M the mask of weight W (True = pruned), training minimises the causal-LM loss
L(W ⊙ (1 − M)): the gradient of every pruned entry is set to zero as it is computed, and the pruned entries
are set back to zero after every optimizer step. Only the Linear weights inside the decoder layers train
(or LoRA factors on them); embeddings, norms, biases and lm_head stay frozen. AdamW, gradient norm clipped
at 1.0, learning rate warmed up linearly for `warmup` steps then decayed linearly to zero.

Masked LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"). Each decoder-layer
Linear computes y = x Wᵀ with W' = W + (s·B A) ⊙ (1 − M), A ∈ R^{r×in}, B ∈ R^{out×r} (B = 0 at the start),
s = α/r with α = 2r; W stays frozen. The mask on the delta makes the merged weight W' exactly as sparse as W,
and the merged model is the very model that was trained (bit for bit), which a plain LoRA merge is not:
B A is dense. Written as a torch parametrization of `weight` (peft cannot mask its delta), merged by
removing the parametrization. The factors are kept in float32.

Group lasso (Yuan & Lin, 2006, "Model selection and estimation in regression with grouped variables").
The penalty λ Σ_g ‖W_g‖₂ drives whole groups W_g to zero together, so that structured pruning afterwards
removes groups that have already gone quiet. A group is an MLP intermediate channel (row g of gate_proj and
of up_proj, column g of down_proj) or an attention KV group (the rows of one KV head in k_proj and v_proj,
the rows of the query heads that read it in q_proj, and those heads' columns of o_proj).

Gradual pruning with learning-rate rewinding (Renda et al., 2020, "Comparing Rewinding and Fine-tuning in
Neural Network Pruning"). Sparsity rises in stages s_1 ≤ s_2 ≤ …, each followed by masked fine-tuning.
Rewinding restarts the learning-rate schedule (and the optimizer) at every stage; without it one schedule
and one AdamW state run across all stages, as one training run with pruning events in it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel

from llm_sparsify.architecture import ModelError, decoder_layers, home_device
from llm_sparsify.errors import UserError
from llm_sparsify.events import Event, progress
from llm_sparsify.recipe import Recovery
from llm_sparsify.structure.resize import unit_squares
from llm_sparsify.targets import layer_linears
from llm_sparsify.walk import check_calibration

log = logging.getLogger(__name__)

LASSO_UNITS = ("mlp", "heads")


class RecoveryError(UserError, ValueError):
    """Arguments that recovery fine-tuning or gradual pruning cannot work with."""


def _decoder_linears(model: PreTrainedModel) -> dict[str, nn.Linear]:
    """Every Linear inside the decoder layers, by full name (never lm_head or the embeddings)."""
    return {name: module for linears in layer_linears(model) for name, module in linears.items()}


@torch.no_grad()
def sparsity_masks(model: PreTrainedModel, modules: dict[str, nn.Linear] | None = None) -> dict[str, Tensor]:
    """Bool masks, True where a weight is exactly zero, of `modules` (default: every decoder-layer Linear)."""
    modules = _decoder_linears(model) if modules is None else modules
    return {name: module.weight == 0 for name, module in modules.items()}


def lr_schedule(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Learning rate of step `step` (from 0) of `total`: linear warmup over `warmup` steps, then linear decay to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * max(total - step, 0) / max(total - warmup, 1)


def _rates(start: int, total: int, warmup: int, base_lr: float) -> Callable[[int], float]:
    """The learning rate of each step of a run that begins at step `start` of a `total`-step schedule."""
    return lambda step: lr_schedule(start + step, total, warmup, base_lr)


def group_lasso_penalty(model: PreTrainedModel, unit: str = Recovery.lasso_unit) -> Tensor:
    """Σ_g ‖W_g‖₂ over all groups of all decoder layers (unscaled: finetune multiplies it by λ); differentiable."""
    if unit not in LASSO_UNITS:
        raise RecoveryError(f"group lasso unit must be one of {LASSO_UNITS}, got {unit!r}")
    # a whole zero group has no gradient of its norm; clamping gives it 0 instead of NaN
    try:
        return sum(unit_squares(layer, unit).clamp_min(1e-20).sqrt().sum() for layer in decoder_layers(model))
    except ModelError as error:
        raise RecoveryError(f"group lasso over {unit!r} needs Llama-style decoder layers ({error})") from None


class _MaskedLoRA(nn.Module):
    """Parametrization W ↦ W + (s·B A) ⊙ keep: a LoRA delta that never touches the pruned weights."""

    def __init__(self, weight: Tensor, rank: int, keep: Tensor | None, generator: torch.Generator) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        A = nn.init.kaiming_uniform_(torch.empty(rank, in_features), a=math.sqrt(5), generator=generator)  # as peft
        self.A = nn.Parameter(A.to(weight.device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=weight.device))
        self.scale = 2.0  # α / r with α = 2r
        self.keep = keep

    def forward(self, weight: Tensor) -> Tensor:
        delta = self.scale * (self.B @ self.A)
        if self.keep is not None:
            delta = delta * self.keep
        return weight + delta.to(weight.dtype)


def _batches(rows: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Row indices of `rows` windows in batches, reshuffled every epoch, endlessly."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(rows, generator=generator)
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size]


@dataclass(frozen=True)
class TopLogits:
    """The dense teacher's k largest logits at every position of the training windows (its distillation target,
    computed once before pruning: no second model in memory while the student trains)."""

    values: Tensor  # [windows, seqlen, k] float32
    indices: Tensor  # [windows, seqlen, k] int32


@torch.no_grad()
def teacher_logits(model: PreTrainedModel, data: Tensor, k: int = Recovery.top_k,
                   batch_size: int = Recovery.batch_size, device: str | torch.device = "cpu") -> TopLogits:
    """TopLogits of `model` on the windows `data` [n, seqlen], kept in host memory."""
    home = home_device(model)
    model.to(device)
    values, indices = [], []
    for batch in data.split(batch_size):
        top = model(batch.to(device), use_cache=False).logits.float().topk(min(k, model.config.vocab_size), dim=-1)
        values.append(top.values.cpu())
        indices.append(top.indices.to(torch.int32).cpu())
    model.to(home)
    return TopLogits(torch.cat(values), torch.cat(indices))


def distillation_loss(logits: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """KL(p ‖ q) at each position, averaged: p the teacher's softmax over its top-k logits `values` (renormalised),
    q the student's softmax over the whole vocabulary, read at the teacher's k tokens `indices`."""
    p_log = values.log_softmax(-1)
    q_log = logits.float().log_softmax(-1).gather(-1, indices.long())
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean()


def _check(model: PreTrainedModel, data: Tensor, steps: int, lr: float, batch_size: int, lora: int | None,
           group_lasso: float, lasso_unit: str, masks: dict[str, Tensor], modules: dict[str, nn.Linear]) -> None:
    check_calibration(model, data, "fine-tuning")
    if steps < 0 or lr < 0 or batch_size < 1 or group_lasso < 0:
        raise RecoveryError(f"need steps >= 0, lr >= 0, batch_size >= 1 and group_lasso >= 0; got steps={steps}, "
                            f"lr={lr}, batch_size={batch_size}, group_lasso={group_lasso}")
    if lora is not None and lora < 1:
        raise RecoveryError(f"the LoRA rank must be a positive integer, got {lora}")
    if lasso_unit not in LASSO_UNITS:
        raise RecoveryError(f"group lasso unit must be one of {LASSO_UNITS}, got {lasso_unit!r}")
    for name, mask in masks.items():
        if name not in modules:
            raise RecoveryError(f"mask {name!r} names no Linear in the decoder layers (e.g. {next(iter(modules))})")
        if mask.shape != modules[name].weight.shape or mask.dtype != torch.bool:
            raise RecoveryError(f"mask {name!r} must be a bool tensor shaped like its weight "
                                f"{tuple(modules[name].weight.shape)}, got {mask.dtype} {tuple(mask.shape)}")


def _check_teacher(teacher: TopLogits | None, data: Tensor) -> None:
    if teacher is not None and teacher.values.shape[:2] != data.shape:
        raise RecoveryError(f"the teacher's logits cover windows {tuple(teacher.values.shape[:2])}, the training data "
                            f"is {tuple(data.shape)}")


def _train(
    model: PreTrainedModel,
    data: Tensor,
    batches: Iterator[Tensor],
    steps: int,
    learning_rate: Callable[[int], float],
    masks: dict[str, Tensor],
    lora: int | None,
    group_lasso: float,
    lasso_unit: str,
    weight_decay: float,
    device: torch.device,
    seed: int,
    optimizer: torch.optim.Optimizer | None = None,
    on_event: Event | None = None,
    teacher: TopLogits | None = None,
) -> tuple[list[float], list[float], torch.optim.Optimizer | None]:
    """The training loop shared by finetune and gradual_prune: (losses, learning rates, the AdamW to carry on).
    The loss is the causal-LM loss on the windows `data` (rows drawn by `batches`), or with a `teacher` the
    distillation loss toward its logits at the same positions.

    The optimizer is only handed back (and only taken) for full fine-tuning: LoRA factors end at each merge.
    """
    modules = _decoder_linears(model)
    pruned = {name: mask.to(device) for name, mask in masks.items() if mask.any()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training, home = model.training, home_device(model)
    handles: list[Any] = []
    losses: list[float] = []
    rates: list[float] = []
    model.to(device)
    try:
        model.requires_grad_(False)
        if lora is None:
            params = [module.weight.requires_grad_(True) for module in modules.values()]
            for name, mask in pruned.items():
                handles.append(modules[name].weight.register_hook(lambda grad, mask=mask: grad.masked_fill(mask, 0)))
        else:
            generator = torch.Generator().manual_seed(seed)
            for name, module in modules.items():
                keep = ~pruned[name] if name in pruned else None
                parametrize.register_parametrization(module, "weight",
                                                     _MaskedLoRA(module.weight, lora, keep, generator))
            params = [p for module in modules.values() for p in module.parametrizations.weight[0].parameters()]
        if optimizer is None or lora is not None:
            # the fused kernel: one pass over each tensor, about 3x faster than the default on a CPU
            optimizer = torch.optim.AdamW(params, lr=learning_rate(0), weight_decay=weight_decay,
                                          fused=device.type in ("cpu", "cuda"))
        model.train()
        for step in progress(range(steps), on_event, "fine-tune (whole model)", "step"):
            rate = learning_rate(step)
            for group in optimizer.param_groups:
                group["lr"] = rate
            rows = next(batches)
            batch = data[rows].to(device)
            if teacher is None:
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            else:
                loss = distillation_loss(model(input_ids=batch, use_cache=False).logits,
                                         teacher.values[rows].to(device), teacher.indices[rows].to(device))
            total = loss + group_lasso * group_lasso_penalty(model, lasso_unit) if group_lasso else loss
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if lora is None:
                # A zero gradient is not enough: AdamW moves a weight by m̂/(√v̂ + ε), and the moments m, v of a
                # weight that was pruned after earlier steps (gradual pruning, one AdamW across stages) are
                # still nonzero, decaying only geometrically. So set the pruned weights back to exactly zero.
                with torch.no_grad():
                    for name, mask in pruned.items():
                        modules[name].weight.masked_fill_(mask, 0)
            losses.append(loss.item())
            rates.append(rate)
            if step % 10 == 0 or step == steps - 1:
                log.debug("step %d: loss %.4f, lr %.3g", step, losses[-1], rate)
    finally:
        for handle in handles:
            handle.remove()
        if lora is not None:
            with torch.no_grad():
                for module in modules.values():
                    if parametrize.is_parametrized(module, "weight"):
                        # keeps the weight Parameter object; its value becomes W + (s·B A) ⊙ keep, as trained
                        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = None
        model.train(was_training)
        model.to(home)
    return losses, rates, (optimizer if lora is None else None)


def finetune(
    model: PreTrainedModel,
    data: Tensor,
    steps: int,
    lr: float = Recovery.lr,
    batch_size: int = Recovery.batch_size,
    masks: dict[str, Tensor] | None = None,
    lora: int | None = None,
    group_lasso: float = Recovery.group_lasso,
    lasso_unit: str = Recovery.lasso_unit,
    weight_decay: float = 0.0,
    warmup: int = 0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    on_event: Event | None = None,
    teacher: TopLogits | None = None,
) -> list[float]:
    """Fine-tune the decoder-layer Linear weights (or rank-`lora` adapters, merged) in place, so pruned weights
    stay zero; return the loss of each step (without the group lasso term): causal LM, or with a `teacher`
    (teacher_logits of the dense model on the same `data`) the distillation loss toward it.

    `data` holds token windows [n, seqlen]. `masks` (True = frozen at zero) defaults to the weights that are zero
    now, `sparsity_masks(model)`; `{}` fine-tunes densely. `group_lasso` = λ adds λ·group_lasso_penalty(model,
    lasso_unit) to the loss. The model trains on `device` and returns to where it was, in the mode it was in.
    """
    modules = _decoder_linears(model)
    masks = sparsity_masks(model, modules) if masks is None else masks
    _check(model, data, steps, lr, batch_size, lora, group_lasso, lasso_unit, masks, modules)
    _check_teacher(teacher, data)
    losses, _, _ = _train(model, data, _batches(len(data), batch_size, seed), steps,
                          _rates(0, steps, warmup, lr), masks, lora, group_lasso, lasso_unit,
                          weight_decay, torch.device(device), seed, on_event=on_event, teacher=teacher)
    if losses:
        log.info("fine-tuned %d steps: loss %.4f -> %.4f", steps, losses[0], losses[-1])
    return losses


def gradual_prune(
    model: PreTrainedModel,
    calibration: Tensor,
    schedule: list[float],
    prune: Callable[[PreTrainedModel, float], None],
    steps_per_stage: int,
    rewind: bool = False,
    lr: float = Recovery.lr,
    batch_size: int = Recovery.batch_size,
    warmup: int = 0,
    seed: int = 0,
    on_event: Event | None = None,
    teacher: TopLogits | None = None,
    **finetune_kwargs: Any,
) -> list[dict[str, Any]]:
    """Prune in stages, `prune(model, s)` for each sparsity s of `schedule`, each stage followed by fine-tuning
    with the masks the model has then; return per stage the target and measured sparsity, losses and LR trace.

    rewind=True restarts the learning-rate schedule and AdamW at every stage (LR rewinding); rewind=False runs
    one schedule over all `len(schedule)·steps_per_stage` steps and one AdamW state across the stages. Other
    keywords (lora, group_lasso, lasso_unit, weight_decay, device) go to the fine-tuning as in `finetune`.
    `prune` must keep weights that are zero at zero (Wanda and magnitude do: their score of a zero is 0).
    """
    if not schedule or any(not 0 <= s < 1 for s in schedule) or list(schedule) != sorted(schedule):
        raise RecoveryError(f"the schedule must be a non-empty, non-decreasing list of sparsities in [0, 1), "
                            f"got {schedule}")
    unknown = set(finetune_kwargs) - {"lora", "group_lasso", "lasso_unit", "weight_decay", "device"}
    if unknown:
        raise RecoveryError(f"gradual_prune does not take {sorted(unknown)}")
    _check_teacher(teacher, calibration)
    options = {"lora": None, "group_lasso": 0.0, "lasso_unit": "mlp", "weight_decay": 0.0, "device": "cpu"}
    options.update(finetune_kwargs)
    device = torch.device(options.pop("device"))
    modules = _decoder_linears(model)
    total = len(schedule) * steps_per_stage
    batches = _batches(len(calibration), batch_size, seed)  # one stream of batches across the stages
    optimizer = None
    results = []
    for stage, target in enumerate(schedule):
        prune(model, target)
        masks = sparsity_masks(model, modules)
        _check(model, calibration, steps_per_stage, lr, batch_size, options["lora"], options["group_lasso"],
               options["lasso_unit"], masks, modules)
        zeros = sum(int(mask.sum()) for mask in masks.values())
        measured = zeros / sum(mask.numel() for mask in masks.values())
        if rewind:
            optimizer, rates = None, _rates(0, steps_per_stage, warmup, lr)
        else:
            rates = _rates(stage * steps_per_stage, total, warmup, lr)
        losses, lrs, optimizer = _train(model, calibration, batches, steps_per_stage, rates, masks, device=device,
                                        seed=seed + stage, optimizer=optimizer, on_event=on_event, teacher=teacher,
                                        **options)
        log.info("stage %d: sparsity %.4f (target %.2f), loss %s -> %s", stage, measured, target,
                 f"{losses[0]:.4f}" if losses else "-", f"{losses[-1]:.4f}" if losses else "-")
        results.append({"stage": stage, "target": target, "sparsity": measured,
                        "loss_start": losses[0] if losses else None, "loss_end": losses[-1] if losses else None,
                        "lrs": lrs})
    return results
