"""Recipes: what to prune, how, and how much, read from YAML and validated with clear errors.

    pruning:
      method: sparsegpt        # magnitude | wanda | sparsegpt
      sparsity: "2:4"          # a fraction in (0, 1) such as 0.5 or "50%", or N:M (keep N of every M)
      targets: ["*"]           # fnmatch globs on module names, e.g. "*.self_attn.*" (default: every
      ignore: ["*.down_proj"]  #   Linear inside the decoder layers; never embeddings or lm_head)
      blocksize: 128           # sparsegpt: columns per block
      dampening: 0.01          # sparsegpt: λ as a share of mean(diag H)
      scope: layer             # magnitude: rank per matrix (layer) or across the model (global)
      inputs: pruned           # wanda, sparsegpt: each module calibrated on the inputs the already
                               #   pruned modules before it produce, in one forward per layer (pruned),
                               #   or all on the unpruned layer's, in two forwards (dense, as the
                               #   reference code does)
    quantization:              # optional: the pruned weights on an integer grid (quantize/grid.py)
      method: gptq             # gptq: each column rounded as the sweep passes it, its error spread over the
                               #   columns not yet visited (with sparsegpt in the same sweep as the mask;
                               #   otherwise on the kept weights, the mask fixed) | rtn: round to nearest
      bits: 4                  # 4 or 8
      group_size: 128          # inputs per scale; null: one scale per output channel
      symmetric: true
      dampening: 0.01          # gptq: λ as a share of mean(diag H) (default: sparsegpt's, else 0.01)
      blocksize: 128           # gptq: columns per lazy batch (with sparsegpt: its own, one sweep)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from llm_sparsify.prune import STATISTIC
from llm_sparsify.prune.masks import Pattern
from llm_sparsify.quantize.grid import QuantScheme

OPTIONS: dict[str, dict[str, Any]] = {  # method -> its options and their defaults
    "magnitude": {"scope": "layer"},
    "wanda": {},
    "sparsegpt": {"blocksize": 128, "dampening": 0.01},
}
_COMMON = {"method", "sparsity", "targets", "ignore"}
INPUTS = ("pruned", "dense")
QUANTIZERS: dict[str, set[str]] = {  # quantization method -> its keys
    "gptq": {"method", "bits", "group_size", "symmetric", "dampening", "blocksize"},
    "rtn": {"method", "bits", "group_size", "symmetric"},
}


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124; in a recipe it means N:M."""


_RecipeLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _digit in "0123456789":
    _RecipeLoader.yaml_implicit_resolvers.setdefault(_digit, []).insert(
        0, ("tag:yaml.org,2002:str", re.compile(r"^\d+:\d+$"))
    )


class RecipeError(ValueError):
    """A recipe that cannot be run, with the reason in words."""


@dataclass(frozen=True)
class Quantization:
    """How the pruned weights are quantized: `gptq` (with error feedback; needs the Hessian) or `rtn`."""

    method: str
    scheme: QuantScheme
    blocksize: int = 128  # gptq
    dampening: float = 0.01  # gptq

    def to_dict(self) -> dict[str, Any]:
        section = {"method": self.method, "bits": self.scheme.bits, "group_size": self.scheme.group_size,
                   "symmetric": self.scheme.symmetric}
        return section | ({"dampening": self.dampening, "blocksize": self.blocksize} if self.method == "gptq" else {})

    def record(self) -> dict[str, Any]:
        """What a checkpoint's llm_sparsify.json says about its grids."""
        return {key: value for key, value in self.to_dict().items() if key not in ("dampening", "blocksize")}


@dataclass(frozen=True)
class Recipe:
    method: str
    pattern: Pattern
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    name: str = "custom"
    inputs: str = "pruned"  # calibrate each module on the pruned (or the dense) layer's activations
    quantization: Quantization | None = None

    @property
    def statistic(self) -> str | None:
        """The input statistic the recipe needs: the method's, or the Hessian for GPTQ (None: no data)."""
        if self.quantization is not None and self.quantization.method == "gptq":
            return "hessian"
        return STATISTIC[self.method]

    @property
    def sparsity(self) -> float:
        """The share of weights removed: the fraction itself, or 1 − N/M."""
        return 1 - self.pattern[0] / self.pattern[1] if isinstance(self.pattern, tuple) else self.pattern

    @property
    def pattern_text(self) -> str:
        return f"{self.pattern[0]}:{self.pattern[1]}" if isinstance(self.pattern, tuple) else f"{self.pattern:g}"

    def to_dict(self) -> dict[str, Any]:
        """The recipe in the YAML file format, so a saved record can be run again with load_recipe."""
        sparsity = self.pattern_text if isinstance(self.pattern, tuple) else self.pattern
        section = {"method": self.method, "sparsity": sparsity, "targets": list(self.targets),
                   "ignore": list(self.ignore), **self.options}
        if self.statistic is not None:
            section["inputs"] = self.inputs
        if self.quantization is None:
            return {"pruning": section}
        return {"pruning": section, "quantization": self.quantization.to_dict()}


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


def _positive(value: Any, key: str, integer: bool) -> None:
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        raise RecipeError(f"{key} must be a positive {'integer' if integer else 'number'}, got {value!r}")


def parse_quantization(section: Any, method: str, pattern: Pattern, options: dict[str, Any]) -> Quantization:
    """Validate a `quantization:` section; with sparsegpt, GPTQ shares its sweep (so its blocksize and dampening)."""
    quantizer = section.get("method") if isinstance(section, dict) else section
    if not isinstance(section, dict) or not isinstance(quantizer, str) or quantizer not in QUANTIZERS:
        raise RecipeError(f"quantization needs a method: {' or '.join(QUANTIZERS)} (got {quantizer!r})")
    if unknown := set(section) - QUANTIZERS[quantizer]:
        raise RecipeError(f"unknown quantization key(s) for {quantizer}: {', '.join(sorted(unknown))}; "
                          f"allowed: {', '.join(sorted(QUANTIZERS[quantizer]))}")
    bits, group_size, symmetric = section.get("bits", 4), section.get("group_size", 128), section.get("symmetric", True)
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
    sweep = {key: options[key] if joint else default for key, default in (("blocksize", 128), ("dampening", 0.01))}
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
    return Quantization("gptq", scheme, **sweep)


def recipe_from_dict(data: Any, name: str = "custom") -> Recipe:
    """Validate a parsed recipe (the whole document: its `pruning:` section, and `quantization:` if any)."""
    if not isinstance(data, dict) or not isinstance(data.get("pruning"), dict):
        raise RecipeError("a recipe needs a `pruning:` section with at least `method` and `sparsity`")
    if unknown := set(data) - {"pruning", "quantization"}:
        raise RecipeError(f"unknown recipe section(s): {', '.join(sorted(unknown))}; known: pruning, quantization")
    section = data["pruning"]
    method = section.get("method")
    if not isinstance(method, str) or method not in STATISTIC:
        raise RecipeError(f"unknown method {method!r}; choose one of: {', '.join(STATISTIC)}")
    if "sparsity" not in section:
        raise RecipeError("pruning.sparsity is required, e.g. 0.5 or \"2:4\"")
    quantizer = data["quantization"].get("method") if isinstance(data.get("quantization"), dict) else None
    needs_data = STATISTIC[method] is not None or quantizer == "gptq"
    allowed = _COMMON | set(OPTIONS[method]) | ({"inputs"} if needs_data else set())
    if unknown := set(section) - allowed:
        known = ", ".join(sorted(allowed))
        raise RecipeError(f"unknown key(s) for {method}: {', '.join(sorted(unknown))}; allowed: {known}")

    pattern = parse_pattern(section["sparsity"])
    options = {**OPTIONS[method], **{k: section[k] for k in OPTIONS[method] if k in section}}
    if method == "sparsegpt":
        _positive(options["blocksize"], "blocksize", integer=True)
        if isinstance(pattern, tuple) and options["blocksize"] % pattern[1]:
            raise RecipeError(f"blocksize {options['blocksize']} must be a multiple of M={pattern[1]}")
        _positive(options["dampening"], "dampening", integer=False)
    if method == "magnitude":
        if options["scope"] not in ("layer", "global"):
            raise RecipeError(f"magnitude scope must be 'layer' or 'global', got {options['scope']!r}")
        if options["scope"] == "global" and isinstance(pattern, tuple):
            raise RecipeError("global magnitude ranking takes a fraction; N:M is always per group")
    inputs = section.get("inputs", "pruned")
    if inputs not in INPUTS:
        raise RecipeError(f"inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
    quantization = None
    if "quantization" in data:
        quantization = parse_quantization(data["quantization"], method, pattern, options)
    return Recipe(
        method=method,
        pattern=pattern,
        targets=_globs(section.get("targets", "*"), "targets", allow_empty=False),
        ignore=_globs(section.get("ignore", []), "ignore", allow_empty=True),
        options=options,
        name=name,
        inputs=inputs,
        quantization=quantization,
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
