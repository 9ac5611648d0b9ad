"""Recipes: what to prune, how, and how much, read from YAML and validated with clear errors.

    pruning:
      method: sparsegpt        # magnitude | wanda | ria | sparsegpt | admm | obd (½·F·w², F the diagonal Fisher)
      sparsity: "2:4"          # a fraction in (0, 1) such as 0.5 or "50%", or N:M (keep N of every M)
      targets: ["*"]           # fnmatch globs on module names, e.g. "*.self_attn.*" (default: every
      ignore: ["*.down_proj"]  #   Linear inside the decoder layers; never embeddings or lm_head)
      blocksize: 128           # sparsegpt: columns per block
      dampening: 0.01          # sparsegpt: λ as a share of mean(diag H)
      scope: layer             # magnitude: rank per matrix (layer) or across the model (global)
      alpha: 0.5               # ria: the power of ‖X_j‖₂ in its score (prune/ria.py)
      iterations: 20           # admm: ADMM iterations, the mask chosen at a rising sparsity over the first 15
                               #   (prune/admm.py; each one [rows, in] × [in, in] product)
      update: none             # after the mask, update the kept weights for it from the Hessian (prune/refit.py):
                               #   obs (SparseGPT's sweep; not for sparsegpt) | lstsq (the least-squares optimum)
      update_steps: 200        # lstsq: conjugate-gradient steps at most (each one [rows, in] × [in, in] product)
      permute: false           # wanda, ria, sparsegpt at N:M: form down_proj's and o_proj's groups over permuted
                               #   inputs, folded into gate/up and v_proj rows (prune/permute.py); no quantization
      inputs: pruned           # wanda, sparsegpt: each module calibrated on the inputs the already
                               #   pruned modules before it produce, in one forward per layer (pruned),
                               #   or all on the unpruned layer's, in two forwards (dense, as the
                               #   reference code does); default: dense for wanda at N:M, else pruned
      expert_tokens: routed    # MoE experts (structure/experts.py): each calibrated on the tokens the router sends
                               #   it (routed; an expert sent fewer tokens than its input width gets all of them,
                               #   with a warning) or on every calibration token (all); the output uses the top-k
    quantization:              # optional: the pruned weights on an integer grid (quantize/grid.py)
      method: gptq             # gptq: each column rounded as the sweep passes it, its error spread over the
                               #   columns not yet visited (with sparsegpt in the same sweep as the mask;
                               #   otherwise on the kept weights, the mask fixed) | rtn: round to nearest
      bits: 4                  # 4 or 8
      group_size: 128          # inputs per scale; null: one scale per output channel
      symmetric: true
      dampening: 0.01          # gptq: λ as a share of mean(diag H) (default: sparsegpt's, else 0.01)
      blocksize: 128           # gptq: columns per lazy batch (with sparsegpt: its own, one sweep)
      actorder: true           # gptq: visit columns by decreasing H_qq, grids fitted before the sweep (static
                               #   groups); default on, except with N:M chosen in the same sweep (its groups
                               #   need their columns in order)

The stages run in this order: experts -> depth -> width (or budget) -> pruning (+ quantization) -> recovery; then
evaluate and export the saved output. Expert removal, depth, width and the per-layer allocations stream one decoder
layer at a time like plain pruning; OBD, the budget planner and recovery need the whole model in memory
(Recipe.whole_model_stages). Every section is optional, but a recipe needs at least one of experts, depth, width,
budget, pruning.

    experts:                   # remove whole MoE experts, the same count in every MoE layer (structure/experts.py)
      remove: 2                #   experts removed per layer (or max_parameters: a budget for the whole model),
                               #   the least salient by REAP's router-weighted output norm on calibration data

    depth:                     # remove whole decoder blocks (structure/depth.py)
      blocks: 4                #   how many spans of `interval` blocks to remove (or max_parameters: a budget)
      interval: 1
      score: cosine            #   cosine: 1 − cos(input, output) on calibration data; last | random: baselines
      iterative: false         #   re-score after each removal
      sources: {c4: 1.0}       #   calibration sources and their weights in the fused score
    width:                     # remove attention KV groups or MLP channels (structure/width.py)
      unit: mlp                #   mlp | heads
      amount: 0.3              #   share of the units removed
      score: activation        #   weight (‖W‖) | activation (|W|·‖X‖) | obd (Σ ½·F·w², F the Fisher)
      scope: layer             #   layer: the same share in every layer | global: ranked across the model
      multiple: 1              #   units kept per layer rounded to a multiple: 32 MLP channels fill GGUF blocks
    budget:                    # plan depth, MLP widths and KV groups for the edge (structure/budget.py; whole model)
      size: 0.5                #   GGUF tensor bytes at `qtype`, as a share of the dense model's (or:)
      decode_speedup: 1.4      #   predicted decode speed in llama.cpp over the dense GGUF at `qtype`
      qtype: Q4_0              #   the GGUF type the plan is costed in (export.qtype must match)
      levels: 3                #   MLP widths tried per layer, down to `max_mlp` of its channels removed, each a
      max_mlp: 0.75            #   multiple of 32 (GGUF blocks)
      max_kv: 0.0              #   KV groups a layer may lose, in up to `levels` steps (0: attention kept whole)
      upgrade: null            #   a GGUF type (Q8_0) a layer's attention or MLP may be written at instead of qtype
      samples: 4               #   calibration windows of the loss measurements
    pruning:
      allocation: owl          # per-layer sparsity from outlier ratios (prune/owl.py), wanda and sparsegpt only
      owl_threshold: 5         #   M: a score is an outlier above M × its matrix's mean
      owl_lambda: 0.08         #   λ: layer sparsities lie within target ± λ
      # allocation: sensitivity  # per-layer sparsity from each layer's measured damage at several sparsities
      sensitivity_levels: 9    #   sparsities measured, evenly from target − spread to target + spread
      sensitivity_spread: 0.2  #   (prune/allocation.py); the parameter-weighted mean is exactly the target
      sensitivity_error: token #   token | sum | update: the damage measured (see prune/allocation.py)
      sensitivity_samples: 16  #   calibration windows of the score pass
    reconstruction:            # after each layer is pruned, fit its kept weights so the layer reproduces the
      steps: 8                 #   dense outputs (reconstruct.py): Adam steps
      lr: 2.5e-3               #   × each module's weight RMS: a step relative to the weights' size
      batch_size: 2            #   calibration samples per step
      targets: dense           #   dense: the dense model's outputs of the layer | pruned: the dense layer's
                               #   outputs on the pruned stream's inputs
    recovery:                  # fine-tune with the masks frozen (recover.py)
      steps: 100               #   optimizer steps (per stage with a schedule)
      lr: 1.0e-4
      batch_size: 4
      lora: null               #   LoRA rank, or null: full fine-tuning of the decoder Linears
      schedule: [0.2, 0.5]     #   gradual: prune to each sparsity, fine-tune, ..., then pruning.sparsity
      rewind: false            #   restart the learning-rate schedule at every stage
      group_lasso: 0.0         #   λ of Σ‖W_g‖₂ over `lasso_unit` groups (mlp | heads), so width pruning
      lasso_unit: mlp          #   afterwards removes groups that have gone quiet
      nsamples: 64             #   fine-tuning windows drawn from the calibration source (other windows)
      seqlen: 256
      loss: lm                 #   lm: the causal-LM loss | kl: distillation, KL from the dense model's logits
      top_k: 64                #   (its top_k per position, taken once before pruning: no teacher in memory)
    evaluate:                  # after saving; results go to the record and the model card
      perplexity: [wikitext2]
      max_windows: 64
      tasks: [piqa, arc_easy]  #   lm-eval zero-shot tasks (see eval/tasks)
      limit: 200
    export:                    # after saving, beside the output: OUTPUT-<format>
      formats: [gguf, compact] #   gguf | compact | compressed-tensors | bnb-nf4 | bnb-fp4 | bnb-int8
      qtype: Q8_0              #   gguf tensor type
      speed: false             #   time the gguf export against the dense model's in llama.cpp (export --speed)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from llm_sparsify.errors import UserError
from llm_sparsify.export import FORMATS as EXPORT_FORMATS
from llm_sparsify.export import GGUF_TYPE, GGUF_TYPES
from llm_sparsify.prune import STATISTIC, method_statistic
from llm_sparsify.prune.admm import ITERATIONS as ADMM_ITERATIONS
from llm_sparsify.prune.allocation import CURRENCIES
from llm_sparsify.prune.masks import Pattern
from llm_sparsify.prune.owl import LAMBDA, M
from llm_sparsify.prune.refit import UPDATES
from llm_sparsify.prune.ria import ALPHA
from llm_sparsify.quantize.grid import Quantization, QuantScheme
from llm_sparsify.stats import BLOCKSIZE, DAMPENING
from llm_sparsify.structure.depth import BASELINES
from llm_sparsify.structure.resize import UNITS
from llm_sparsify.structure.width import SCOPES, SCORES

OPTIONS: dict[str, dict[str, Any]] = {  # method -> its options and their defaults
    "magnitude": {"scope": "layer", "update": "none"},
    "wanda": {"update": "none", "permute": False},
    "ria": {"alpha": ALPHA, "update": "none", "permute": False},
    "sparsegpt": {"blocksize": BLOCKSIZE, "dampening": DAMPENING, "update": "none", "permute": False},
    "admm": {"iterations": ADMM_ITERATIONS, "update": "none"},
    "obd": {},
}
_COMMON = {"method", "sparsity", "targets", "ignore"}
INPUTS = ("pruned", "dense")


def default_inputs(method: str | None, pattern: Pattern | None) -> str:
    """The calibration order a recipe gets unless it names one, chosen from measurements (README, "Recipes"):
    Wanda at N:M calibrates on the dense layer (`dense`: 0.3-1.9% lower perplexity on SmolLM2 at 2:4 over four
    calibration sets); everything else in one forward on the pruned stream (`pruned`: as good or better, and one
    forward per layer instead of two)."""
    return "dense" if method == "wanda" and isinstance(pattern, tuple) else "pruned"

QUANTIZERS: dict[str, set[str]] = {  # quantization method -> its keys
    "gptq": {"method", "bits", "group_size", "symmetric", "dampening", "blocksize", "actorder"},
    "rtn": {"method", "bits", "group_size", "symmetric"},
}


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124; in a recipe it means N:M."""


_RecipeLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _digit in "0123456789":
    _RecipeLoader.yaml_implicit_resolvers.setdefault(_digit, []).insert(
        0, ("tag:yaml.org,2002:str", re.compile(r"^\d+:\d+$"))
    )


class RecipeError(UserError, ValueError):
    """A recipe that cannot be run, with the reason in words."""


def _spelled_number(value: Any) -> Any:
    """A string that spells a finite number as that number: YAML 1.1 (PyYAML) reads `5e-3`, with no dot, as a string."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def _positive(value: Any, key: str, integer: bool) -> None:
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        raise RecipeError(f"{key} must be a positive {'integer' if integer else 'number'}, got {value!r}")


def _count(value: Any, key: str) -> int:
    _positive(value, key, integer=True)
    return value


def _number(value: Any, key: str) -> float:
    value = _spelled_number(value)
    _positive(value, key, integer=False)
    return float(value)


def _integer(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecipeError(f"{key} must be an integer, got {value!r}")
    return value


def _at_least_zero(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise RecipeError(f"{key} must be a number ≥ 0, got {value!r}")
    return float(value)


def _fraction(value: Any, key: str) -> float:
    value = _spelled_number(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise RecipeError(f"{key} must be a fraction strictly between 0 and 1, got {value!r}")
    return float(value)


def _share(value: Any, key: str) -> float:
    value = _spelled_number(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise RecipeError(f"{key} must be a share from 0 up to (not including) 1, got {value!r}")
    return float(value)


def _fractions(value: Any, key: str) -> tuple[float, ...]:
    if not isinstance(value, list | tuple):
        raise RecipeError(f"{key} must be a list of sparsities, e.g. [0.2, 0.5], got {value!r}")
    return tuple(_fraction(v, f"{key} entries") for v in value)


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise RecipeError(f"{key} must be true or false, got {value!r}")
    return value


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise RecipeError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _gguf_type(value: Any, key: str) -> str:
    """A GGUF tensor type the exporter writes, in any case."""
    return _choice(value.upper() if isinstance(value, str) else value, key, GGUF_TYPES)


def _names(value: Any, key: str) -> tuple[str, ...]:
    if not value:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) and v for v in values):
        raise RecipeError(f"{key} must be a name or a list of names, got {value!r}")
    return tuple(values)


def _sources(value: Any, key: str) -> dict[str, float]:
    if not isinstance(value, dict) or not value or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and v > 0
            for k, v in value.items()):
        raise RecipeError(f"{key} maps calibration sources to positive weights, e.g. {{c4: 1.0}}; got {value!r}")
    return {k: float(v) for k, v in value.items()}


def one_of(*choices: str) -> Callable[[Any, str], str]:
    return lambda value, key: _choice(value, key, choices)


def names_of(*choices: str) -> Callable[[Any, str], tuple[str, ...]]:
    return lambda value, key: tuple(_choice(name, f"{key} entries", choices) for name in _names(value, key))


def optional(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    return lambda value, key: None if value is None else check(value, key)


def option(default: Any, check: Callable[[Any, str], Any]) -> Any:
    """A recipe key, declared once: its default, and `check(value, key)`, which refuses a bad value in words or
    returns it as the recipe keeps it (section_of applies both)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"check": check})
    return field(default=default, metadata={"check": check})


@dataclass(frozen=True)
class Depth:
    """Remove `blocks` spans of `interval` decoder blocks (or as many as `max_parameters` requires)."""

    blocks: int | None = option(None, optional(_count))
    max_parameters: int | None = option(None, optional(_count))
    interval: int = option(1, _count)
    score: str = option("cosine", one_of("cosine", *BASELINES))
    iterative: bool = option(False, _flag)
    sources: dict[str, float] = option({"c4": 1.0}, _sources)
    seed: int = option(0, _integer)


@dataclass(frozen=True)
class ExpertRemoval:
    """Remove the least salient experts of every MoE layer (structure/experts.py)."""

    remove: int | None = option(None, optional(_count))
    max_parameters: int | None = option(None, optional(_count))


@dataclass(frozen=True)
class Width:
    """Remove `amount` of the MLP channels or attention KV groups, ranked by `score` per layer or globally."""

    unit: str = option("mlp", one_of(*UNITS))
    amount: float = option(0.2, _fraction)
    score: str = option("activation", one_of(*SCORES))
    scope: str = option("layer", one_of(*SCOPES))
    multiple: int = option(1, _count)  # units kept per layer rounded to a multiple (32: whole GGUF Q8_0/Q4_0 blocks)


@dataclass(frozen=True)
class Budget:
    """Remove the blocks, MLP channels and (with max_kv) KV groups that cost the least loss until the GGUF at `qtype` is
    `size` of the dense model's tensor bytes, or decodes `decode_speedup` times faster (predicted);
    structure/budget.py."""

    size: float | None = option(None, optional(_fraction))
    decode_speedup: float | None = option(None, optional(_number))
    qtype: str = option("Q4_0", _gguf_type)
    levels: int = option(3, _count)
    max_mlp: float = option(0.75, _fraction)
    max_kv: float = option(0.0, _share)  # KV groups a layer may lose (0: attention is not planned)
    upgrade: str | None = option(None, optional(_gguf_type))  # a type parts may take instead (None: all at qtype)
    samples: int = option(4, _count)  # each unit's loss is a forward from its layer on: 1 + layers·(1 + levels)


@dataclass(frozen=True)
class Owl:
    """Outlier-weighted layer-wise sparsity: M (threshold) and λ (the spread around the target)."""

    threshold: float = option(M, _number)
    lam: float = option(LAMBDA, _number)


@dataclass(frozen=True)
class Sensitivity:
    """Per-layer sparsity from measured damage: how many levels, their spread around the target, the damage's
    currency and the calibration windows of the score pass (prune/allocation.py)."""

    levels: int = option(9, _count)  # with spread 0.2: every 0.05, as measured (eval/allocation_gain.py, held-out C4)
    spread: float = option(0.2, _number)
    error: str = option("token", one_of(*CURRENCIES))
    samples: int = option(16, _count)


@dataclass(frozen=True)
class Reconstruction:
    """Fit each pruned layer's kept weights to the dense outputs (reconstruct.py): Adam `steps` at `lr` on
    `batch_size` samples each, towards the dense model's outputs of the layer (`targets: dense`) or the dense layer's
    on the pruned stream (`pruned`)."""

    steps: int = option(8, _count)  # 8 matched 16 on held-out C4 at half the cost (SparseGPT 2:4 + lstsq, README)
    # × each module's weight RMS (SmolLM2's dense 0.16-0.23; the 7B benchmark's 0.02, where a plain 3e-4 diverged):
    # 2.5e-3 beat 1.5e-3 and 1e-3 on held-out C4 (best-50, README)
    lr: float = option(2.5e-3, _number)
    batch_size: int = option(2, _count)
    targets: str = option("dense", one_of("dense", "pruned"))


@dataclass(frozen=True)
class Recovery:
    """Fine-tuning with the masks frozen, optionally gradual (prune to each `schedule` step, fine-tune, ...)."""

    steps: int = option(100, _count)
    lr: float = option(1e-4, _number)
    batch_size: int = option(4, _count)
    lora: int | None = option(None, optional(_count))  # the LoRA rank; None: full fine-tuning
    schedule: tuple[float, ...] = option((), _fractions)
    rewind: bool = option(False, _flag)
    group_lasso: float = option(0.0, _at_least_zero)
    lasso_unit: str = option("mlp", one_of(*UNITS))
    nsamples: int = option(64, _count)
    seqlen: int = option(256, _count)
    loss: str = option("lm", one_of("lm", "kl"))  # kl: distillation from the dense model's top_k logits
    top_k: int = option(64, _count)


@dataclass(frozen=True)
class Evaluation:
    """What to measure on the saved output: perplexity datasets and lm-eval tasks."""

    perplexity: tuple[str, ...] = option(("wikitext2",), _names)
    max_windows: int | None = option(64, optional(_count))
    tasks: tuple[str, ...] = option((), _names)
    limit: int | None = option(None, optional(_count))


@dataclass(frozen=True)
class Export:
    """Formats written beside the saved output."""

    formats: tuple[str, ...] = option((), names_of(*EXPORT_FORMATS))
    qtype: str = option(GGUF_TYPE, _gguf_type)
    speed: bool = option(False, _flag)  # time the GGUF export against the dense model's in llama.cpp


Section = TypeVar("Section")


def section_of(values: Any, name: str, stage: type[Section], keys: dict[str, str] | None = None) -> Section:
    """A recipe section as its dataclass: every key known and checked as its field declares (option), the missing
    ones at their defaults. `keys`: each field's key within the section `name` where it is not the field's name
    (owl_lambda in pruning for Owl.lam)."""
    if not isinstance(values, dict):
        raise RecipeError(f"{name} must be a mapping of options, got {values!r}")
    allowed = {(keys or {}).get(f.name, f.name): f for f in fields(stage)}
    if unknown := set(values) - set(allowed):
        raise RecipeError(f"unknown {name} key(s): {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}")
    return stage(**{f.name: f.metadata["check"](values[key], f"{name}.{key}") for key, f in allowed.items()
                    if key in values})


@dataclass(frozen=True)
class Recipe:
    method: str | None  # None: no pruning section (depth or width only)
    pattern: Pattern | None
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    name: str = "custom"
    inputs: str | None = None  # calibrate each module on the pruned or the dense layer's activations (None:
    #                            the measured default for the method and pattern, default_inputs)
    expert_tokens: str = "routed"  # MoE: calibrate each expert on its routed tokens, or on all (structure/experts.py)
    quantization: Quantization | None = None
    owl: Owl | None = None
    sensitivity: Sensitivity | None = None
    reconstruction: Reconstruction | None = None
    experts: ExpertRemoval | None = None
    depth: Depth | None = None
    width: Width | None = None
    budget: Budget | None = None
    recovery: Recovery | None = None
    evaluate: Evaluation | None = None
    export: Export | None = None

    def __post_init__(self) -> None:
        if self.inputs is None:
            object.__setattr__(self, "inputs", default_inputs(self.method, self.pattern))

    @property
    def streams(self) -> bool:
        """Whether the recipe can run one decoder layer at a time from disk (else the whole model is loaded)."""
        return not self.whole_model_stages

    @property
    def whole_model_stages(self) -> list[str]:
        """The stages of the recipe that need the whole model in memory (pipeline.py), in words: the others stream."""
        obd = self.needs_fisher or bool(self.width and self.width.score == "obd")
        stages = {"OBD": obd, "budget planner": self.budget, "recovery": self.recovery}
        return [name for name, present in stages.items() if present]

    @property
    def needs_calibration(self) -> bool:
        needs = self.depth and self.depth.score == "cosine" or self.width and self.width.score != "weight"
        return bool(needs or self.experts or self.budget or self.recovery or self.owl or self.sensitivity
                    or self.reconstruction or self.statistic is not None)

    @property
    def needs_fisher(self) -> bool:
        """Whether the method scores weights by the diagonal Fisher (OBD): gradients through the whole model."""
        return bool(self.method) and method_statistic(self.method, self.options) == "fisher"

    @property
    def statistic(self) -> str | None:
        """The input statistic the recipe needs: the method's, or the Hessian for GPTQ (None: no data)."""
        if self.quantization is not None and self.quantization.method == "gptq":
            return "hessian"
        return method_statistic(self.method, self.options) if self.method else None

    @property
    def sparsity(self) -> float:
        """The share of weights removed: the fraction itself, or 1 − N/M."""
        return 1 - self.pattern[0] / self.pattern[1] if isinstance(self.pattern, tuple) else self.pattern

    @property
    def pattern_text(self) -> str:
        if self.pattern is None:
            return "none"
        return f"{self.pattern[0]}:{self.pattern[1]}" if isinstance(self.pattern, tuple) else f"{self.pattern:g}"

    def to_dict(self) -> dict[str, Any]:
        """The recipe in the YAML file format, so a saved record can be run again with load_recipe."""
        sections: dict[str, Any] = {}
        for key in ("experts", "depth", "width", "budget"):
            if (stage := getattr(self, key)) is not None:
                sections[key] = asdict(stage)
        if self.method is not None:
            sparsity = self.pattern_text if isinstance(self.pattern, tuple) else self.pattern
            section = {"method": self.method, "sparsity": sparsity, "targets": list(self.targets),
                       "ignore": list(self.ignore), **self.options}
            if self.statistic is not None:
                section["inputs"] = self.inputs
                if self.expert_tokens != Recipe.expert_tokens:
                    section["expert_tokens"] = self.expert_tokens
            if self.owl is not None:
                section |= {"allocation": "owl", "owl_threshold": self.owl.threshold, "owl_lambda": self.owl.lam}
            if self.sensitivity is not None:
                section |= {"allocation": "sensitivity",
                            **{f"sensitivity_{k}": v for k, v in asdict(self.sensitivity).items()}}
            sections["pruning"] = section
        if self.quantization is not None:
            sections["quantization"] = self.quantization.to_dict()
        for key in ("reconstruction", "recovery", "evaluate", "export"):
            if (stage := getattr(self, key)) is not None:
                sections[key] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(stage).items()}
        return sections


def parse_pattern(value: Any) -> Pattern:
    """0.5, "50%" or "2:4" -> 0.5 or (2, 4), or a RecipeError saying what is allowed."""
    if isinstance(value, str) and ":" in value:
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
        if not match:
            raise RecipeError(f"sparsity {value!r} is not of the form N:M, e.g. 2:4")
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise RecipeError(f"sparsity {value!r}: N:M keeps N of every M weights, so 0 < N < M is required")
        return (n, m)
    try:
        sparsity = float(value.strip().rstrip("%")) / 100 if isinstance(value, str) and "%" in value else float(value)
    except (TypeError, ValueError):
        raise RecipeError(f"sparsity {value!r} is neither a fraction like 0.5 nor an N:M pattern like 2:4") from None
    if not 0 < sparsity < 1:
        raise RecipeError(f"sparsity {value!r} must lie strictly between 0 and 1")
    return sparsity


def _globs(value: Any, key: str, allow_empty: bool) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) and v for v in values):
        raise RecipeError(f"{key} must be a module-name glob or a list of them, got {value!r}")
    if not values and not allow_empty:
        raise RecipeError(f"{key} is empty, so nothing would be pruned; leave it out to target every Linear")
    return tuple(values)


def parse_quantization(section: Any, method: str, pattern: Pattern, options: dict[str, Any]) -> Quantization:
    """Validate a `quantization:` section; with sparsegpt, GPTQ shares its sweep (so its blocksize and dampening)."""
    quantizer = section.get("method") if isinstance(section, dict) else section
    if not isinstance(section, dict) or not isinstance(quantizer, str) or quantizer not in QUANTIZERS:
        raise RecipeError(f"quantization needs a method: {' or '.join(QUANTIZERS)} (got {quantizer!r})")
    if unknown := set(section) - QUANTIZERS[quantizer]:
        raise RecipeError(f"unknown quantization key(s) for {quantizer}: {', '.join(sorted(unknown))}; "
                          f"allowed: {', '.join(sorted(QUANTIZERS[quantizer]))}")
    bits, group_size, symmetric = (section.get(key, getattr(QuantScheme, key)) for key in ("bits", "group_size",
                                                                                          "symmetric"))
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (4, 8):
        raise RecipeError(f"quantization.bits must be 4 or 8, got {bits!r}")
    if group_size is not None:
        _positive(group_size, "quantization.group_size (null: one scale per output channel)", integer=True)
    if not isinstance(symmetric, bool):
        raise RecipeError(f"quantization.symmetric must be true or false, got {symmetric!r}")
    scheme = QuantScheme(bits, group_size, symmetric)
    if quantizer == "rtn":
        return Quantization("rtn", scheme)
    joint = method == "sparsegpt"
    sweep = {key: options[key] if joint else default for key, default in (("blocksize", BLOCKSIZE),
                                                                                 ("dampening", DAMPENING))}
    for key, value in sweep.items():
        given = section.get(key, value)
        _positive(given, f"quantization.{key}", integer=key == "blocksize")
        if joint and given != value:
            raise RecipeError(f"with sparsegpt, GPTQ runs in the pruning's own sweep: quantization.{key} must "
                              f"equal pruning.{key} ({value}) or be left out, got {given!r}")
        sweep[key] = given
    blocksize = sweep["blocksize"]
    if group_size is not None and blocksize % group_size and group_size % blocksize:
        raise RecipeError(f"quantization.group_size {group_size} must divide the GPTQ blocksize {blocksize} or be "
                          "a multiple of it (each group's grid is fitted on up-to-date weights)")
    if joint and isinstance(pattern, tuple) and group_size is not None and group_size % pattern[1]:
        raise RecipeError(f"quantization.group_size {group_size} must be a multiple of M={pattern[1]} (one sweep)")
    actorder = section.get("actorder", not (joint and isinstance(pattern, tuple)))  # on, unless N:M in the sweep
    if not isinstance(actorder, bool):
        raise RecipeError(f"quantization.actorder must be true or false, got {actorder!r}")
    if actorder and isinstance(pattern, tuple) and joint:
        raise RecipeError("quantization.actorder visits columns out of order, but N:M sparsity chosen in the same "
                          "sweep needs them in order; leave actorder out for N:M")
    return Quantization("gptq", scheme, **sweep, actorder=actorder)


_ABSENT = object()  # a recipe without a quantization section (`quantization: null` is an error)
SECTIONS = ("experts", "depth", "width", "budget", "pruning", "quantization", "reconstruction", "recovery", "evaluate",
            "export")


def parse_depth(section: Any) -> Depth:
    """Validate a `depth:` section: a count of spans or a parameter budget, never a score threshold."""
    depth = section_of(section, "depth", Depth)
    _count_or_budget(depth.blocks, depth.max_parameters, "depth", "blocks", "how many spans to remove")
    if depth.iterative and (depth.blocks is None or depth.score != "cosine" or len(depth.sources) > 1):
        raise RecipeError("depth.iterative re-scores after each removal: it needs `blocks`, the cosine score and "
                          "one source")
    return depth


def parse_experts(section: Any) -> ExpertRemoval:
    """Validate an `experts:` section: how many experts go per MoE layer, or a parameter budget."""
    experts = section_of(section, "experts", ExpertRemoval)
    _count_or_budget(experts.remove, experts.max_parameters, "experts", "remove", "experts per MoE layer")
    return experts


def parse_budget(section: Any, data: dict) -> Budget:
    """Validate a `budget:` section: exactly one target, no depth or width of its own, and a GGUF export (if any) of
    the type the plan was costed in."""
    budget = section_of(section, "budget", Budget)
    if (budget.size is None) == (budget.decode_speedup is None):
        raise RecipeError("budget needs exactly one of `size` (a share of the dense GGUF's bytes) or `decode_speedup`")
    if budget.decode_speedup is not None and budget.decode_speedup <= 1:
        raise RecipeError(f"budget.decode_speedup must be above 1, got {budget.decode_speedup}")
    if budget.upgrade is not None and budget.upgrade == budget.qtype:
        raise RecipeError(f"budget.upgrade must be another type than qtype ({budget.qtype}), e.g. Q8_0 with Q4_0")
    if {"depth", "width"} & set(data):
        raise RecipeError("budget plans the depth and MLP widths itself: leave out the depth and width sections")
    export = data.get("export")
    if isinstance(export, dict) and "gguf" in (export.get("formats") or []):
        qtype = str(export.get("qtype", GGUF_TYPE)).upper()
        if qtype != budget.qtype:
            raise RecipeError(f"budget was costed in {budget.qtype}, but export.qtype is {qtype}: make them equal")
    return budget


def _count_or_budget(count: int | None, budget: int | None, name: str, key: str, meaning: str) -> None:
    """A section's count of units to remove (key `key`) or its `max_parameters` budget: exactly one."""
    if (count is None) == (budget is None):
        raise RecipeError(f"{name} needs exactly one of `{key}` ({meaning}) or `max_parameters`")


def parse_recovery(section: Any, pattern: Pattern | None) -> Recovery:
    """Validate a `recovery:` section; a schedule must climb to (and below) the pruning sparsity."""
    recovery = section_of(section, "recovery", Recovery)
    if steps := recovery.schedule:
        if pattern is None or isinstance(pattern, tuple):
            raise RecipeError("recovery.schedule prunes gradually to pruning.sparsity, which must be a fraction")
        if list(steps) != sorted(set(steps)) or steps[-1] >= pattern:
            raise RecipeError(f"recovery.schedule must rise strictly and stay below pruning.sparsity ({pattern:g}), "
                              f"got {list(steps)}")
    return recovery


SENSITIVITY_FIELDS = {f.name: f"sensitivity_{f.name}" for f in fields(Sensitivity)}  # Sensitivity field -> pruning key
SENSITIVITY_KEYS = set(SENSITIVITY_FIELDS.values())


def parse_sensitivity(section: dict[str, Any], pattern: Pattern) -> Sensitivity:
    """The `allocation: sensitivity` options of a pruning section, checked."""
    if isinstance(pattern, tuple):
        raise RecipeError("allocation: sensitivity varies the sparsity per layer, so it takes a fraction, not N:M")
    sensitivity = section_of({key: section[key] for key in SENSITIVITY_KEYS if key in section}, "pruning",
                             Sensitivity, SENSITIVITY_FIELDS)
    if sensitivity.levels < 2:
        raise RecipeError(f"pruning.sensitivity_levels must be 2 or more, got {sensitivity.levels}")
    if not 0 < pattern < 1:
        raise RecipeError(f"allocation: sensitivity needs a sparsity strictly between 0 and 1, got {pattern}")
    return sensitivity


OWL_FIELDS = {"threshold": "owl_threshold", "lam": "owl_lambda"}  # Owl field -> pruning key
OWL_KEYS = set(OWL_FIELDS.values())


def parse_pruning(section: Any, quantization: Any) -> dict[str, Any]:
    """Validate a `pruning:` section (and the `quantization:` that goes with it): the Recipe's pruning fields."""
    if not isinstance(section, dict):
        raise RecipeError(f"a recipe needs a `pruning:` section with at least `method` and `sparsity`, got {section!r}")
    method = section.get("method")
    if not isinstance(method, str) or method not in STATISTIC:
        raise RecipeError(f"unknown method {method!r}; choose one of: {', '.join(STATISTIC)}")
    if "sparsity" not in section:
        raise RecipeError("pruning.sparsity is required, e.g. 0.5 or \"2:4\"")
    quantizer = quantization.get("method") if isinstance(quantization, dict) else None
    options = {**OPTIONS[method], **{k: section[k] for k in OPTIONS[method] if k in section}}
    needs_data = method_statistic(method, options) not in (None, "fisher") or quantizer == "gptq"
    owl_keys = {"allocation", *OWL_KEYS} if method in ("wanda", "ria", "sparsegpt", "admm") else set()
    if owl_keys and section.get("allocation") == "sensitivity":
        owl_keys |= SENSITIVITY_KEYS
    elif owl_keys and SENSITIVITY_KEYS & set(section):
        raise RecipeError(f"{', '.join(sorted(SENSITIVITY_KEYS & set(section)))} need `allocation: sensitivity`")
    allowed = (_COMMON | set(OPTIONS[method]) | ({"inputs", "expert_tokens"} if needs_data else set()) | owl_keys
               | ({"update_steps"} if "update" in OPTIONS[method] else set()))
    if unknown := set(section) - allowed:
        known = ", ".join(sorted(allowed))
        raise RecipeError(f"unknown key(s) for {method}: {', '.join(sorted(unknown))}; allowed: {known}")

    pattern = parse_pattern(section["sparsity"])
    if "update" in options:
        _choice(options["update"], "pruning.update", UPDATES)
        if options["update"] != "none" and options.get("scope") == "global":
            raise RecipeError("pruning.update works on each matrix's mask; global magnitude ranking takes none")
        if method == "sparsegpt" and options["update"] == "obs":
            raise RecipeError("sparsegpt's own sweep is the obs update for its mask; use update: lstsq (or none)")
    if "update_steps" in section:
        if options["update"] != "lstsq":
            raise RecipeError("pruning.update_steps caps the conjugate gradients of update: lstsq; it needs that "
                              "update")
        _positive(section["update_steps"], "pruning.update_steps", integer=True)
        options["update_steps"] = section["update_steps"]
    if _flag(options.get("permute", False), "pruning.permute") and not isinstance(pattern, tuple):
        raise RecipeError("pruning.permute reorders inputs so that better N:M groups form; it needs an N:M sparsity")
    if options.get("permute") and quantization is not _ABSENT:
        raise RecipeError("pruning.permute cannot go with quantization: folding the permutation after the grids "
                          "are fitted would move inputs across their quantization groups")
    if "alpha" in options:
        alpha = options["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 4:
            raise RecipeError(f"pruning.alpha must be a number from 0 to 4, got {alpha!r}")
    if method == "sparsegpt":
        _positive(options["blocksize"], "blocksize", integer=True)
        if isinstance(pattern, tuple) and options["blocksize"] % pattern[1]:
            raise RecipeError(f"blocksize {options['blocksize']} must be a multiple of M={pattern[1]}")
        _positive(options["dampening"], "dampening", integer=False)
    if method == "admm":
        _positive(options["iterations"], "pruning.iterations", integer=True)
    if method == "magnitude":
        if options["scope"] not in ("layer", "global"):
            raise RecipeError(f"magnitude scope must be 'layer' or 'global', got {options['scope']!r}")
        if options["scope"] == "global" and isinstance(pattern, tuple):
            raise RecipeError("global magnitude ranking takes a fraction; N:M is always per group")
    inputs = section.get("inputs", default_inputs(method, pattern))
    if inputs not in INPUTS:
        raise RecipeError(f"inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
    expert_tokens = _choice(section.get("expert_tokens", Recipe.expert_tokens), "pruning.expert_tokens",
                            ("routed", "all"))
    owl = None
    allocation = _choice(section.get("allocation", "uniform"), "pruning.allocation", ("uniform", "owl", "sensitivity"))
    if allocation == "owl":
        if isinstance(pattern, tuple):
            raise RecipeError("allocation: owl varies the sparsity per layer, so it takes a fraction, not N:M")
        owl = section_of({key: section[key] for key in OWL_KEYS if key in section}, "pruning", Owl, OWL_FIELDS)
        if not owl.lam < min(pattern, 1 - pattern):
            raise RecipeError(f"pruning.owl_lambda {owl.lam} must be below min(sparsity, 1 − sparsity) so every "
                              "layer's sparsity stays in (0, 1)")
    elif OWL_KEYS & set(section):
        raise RecipeError("owl_threshold and owl_lambda need `allocation: owl`")
    sensitivity = parse_sensitivity(section, pattern) if allocation == "sensitivity" else None
    return {
        "method": method,
        "pattern": pattern,
        "targets": _globs(section.get("targets", "*"), "targets", allow_empty=False),
        "ignore": _globs(section.get("ignore", []), "ignore", allow_empty=True),
        "options": options,
        "inputs": inputs,
        "expert_tokens": expert_tokens,
        "owl": owl,
        "sensitivity": sensitivity,
        "quantization": None if quantization is _ABSENT else parse_quantization(quantization, method, pattern, options),
    }


def recipe_from_dict(data: Any, name: str = "custom") -> Recipe:
    """Validate a parsed recipe: a mapping of sections (see the module docstring), each checked in full."""
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe needs a `pruning:` section with at least `method` and `sparsity` (or an "
                          f"`experts:`, `depth:`, `width:` or `budget:` section); got {type(data).__name__}")
    if unknown := set(data) - set(SECTIONS):
        raise RecipeError(f"unknown recipe section(s): {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    if not {"pruning", "experts", "depth", "width", "budget"} & set(data):
        raise RecipeError("a recipe needs a `pruning:` section with at least `method` and `sparsity` "
                          "(or an `experts:`, `depth:`, `width:` or `budget:` section)")
    for section in ("quantization", "reconstruction"):
        if section in data and "pruning" not in data:
            raise RecipeError(f"{section} applies to the pruned weights: it needs a `pruning:` section")
    pruning = parse_pruning(data["pruning"], data.get("quantization", _ABSENT)) if "pruning" in data else {
        "method": None, "pattern": None}
    export = section_of(data["export"], "export", Export) if "export" in data else None
    if export and "compressed-tensors" in export.formats and "quantization" not in data:
        raise RecipeError("export.formats: compressed-tensors stores integer weights, so it needs a `quantization:` "
                          "section (e.g. {method: gptq, bits: 4}); for an unquantized model use compact or gguf")
    if export and export.speed and "gguf" not in export.formats:
        raise RecipeError("export.speed times a GGUF export in llama.cpp: add gguf to export.formats")
    if "recovery" in data and "quantization" in data:
        raise RecipeError("recovery would move quantized weights off their grid: quantize the recovered model in a "
                          "second recipe instead")
    return Recipe(
        **pruning,
        name=name,
        experts=parse_experts(data["experts"]) if "experts" in data else None,
        depth=parse_depth(data["depth"]) if "depth" in data else None,
        width=section_of(data["width"], "width", Width) if "width" in data else None,
        budget=parse_budget(data["budget"], data) if "budget" in data else None,
        reconstruction=(section_of(data["reconstruction"], "reconstruction", Reconstruction)
                        if "reconstruction" in data else None),
        recovery=parse_recovery(data["recovery"], pruning["pattern"]) if "recovery" in data else None,
        evaluate=section_of(data["evaluate"], "evaluate", Evaluation) if "evaluate" in data else None,
        export=export,
    )


def _recipe_dir():
    return resources.files("llm_sparsify") / "recipes"


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with the package (the files in recipes/)."""
    return sorted(p.name.removesuffix(".yaml") for p in _recipe_dir().iterdir()
                  if p.name.endswith(".yaml"))


def load_recipe(source: str | Path | dict | Recipe) -> Recipe:
    """A Recipe from a YAML path, a built-in recipe name (e.g. "wanda-50"), a dict, or a Recipe."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, dict):
        return recipe_from_dict(source)
    path = Path(source)
    if not path.exists() and str(source) in builtin_recipes():
        path = Path(str(_recipe_dir() / f"{source}.yaml"))
    if not path.is_file():
        raise RecipeError(f"recipe {str(source)!r} is neither a file nor a built-in recipe "
                          f"({', '.join(builtin_recipes())})")
    try:
        data = yaml.load(path.read_text(), Loader=_RecipeLoader)
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    try:
        return recipe_from_dict(data, name=path.name.removesuffix(".yaml"))
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}") from None
