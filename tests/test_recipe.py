"""Recipes: the built-in ones load, patterns parse, and every kind of bad recipe fails with a clear RecipeError."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from llm_sparsify.quantize.grid import QuantScheme
from llm_sparsify.recipe import (
    OPTIONS,
    Quantization,
    Recipe,
    RecipeError,
    builtin_recipes,
    load_recipe,
    parse_pattern,
    recipe_from_dict,
)

BUILTINS = ["best-2of4", "best-50", "best-70", "depth-cosine-4", "edge-fast", "edge-half", "magnitude-2of4",
            "magnitude-50", "owl-wanda-70",
            "sparsegpt-2of4", "sparsegpt-2of4-lstsq", "sparsegpt-50", "sparsegpt-50-rtn-w4g128", "sparsegpt-50-w4g128",
            "wanda-2of4", "wanda-50", "wanda-70-recover", "width-mlp-30"]


def write(tmp_path, text: str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- built-in recipes -------------------------------------------------------------------------------------------


def test_builtin_recipes_are_listed():
    assert builtin_recipes() == BUILTINS


@pytest.mark.parametrize("name", [n for n in BUILTINS if n.split("-")[0] in OPTIONS and n.count("-") < 3
                                  and "70" not in n])  # the stage recipes: test_pipeline.py
def test_every_builtin_pruning_recipe_loads(name):
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe)
    assert recipe.name == name
    method, amount = name.split("-")[:2]
    assert recipe.method == method
    if amount == "2of4":
        assert recipe.pattern == (2, 4)
        assert recipe.pattern_text == "2:4"
    else:
        assert recipe.pattern == 0.5
        assert recipe.pattern_text == "0.5"
    assert recipe.sparsity == pytest.approx(0.5)
    assert recipe.targets == ("*",)
    assert recipe.ignore == ()
    assert set(recipe.options) == set(OPTIONS[method])
    assert (recipe.quantization is not None) == name.endswith("-w4g128")
    if recipe.quantization is not None:
        assert recipe.quantization.method == ("rtn" if "-rtn-" in name else "gptq")
        assert recipe.quantization.scheme == QuantScheme(4, 128, True)


def test_builtin_options_have_their_defaults():
    assert load_recipe("sparsegpt-50").options == {"blocksize": 128, "dampening": 0.01, "update": "none",
                                                   "permute": False}
    assert load_recipe("magnitude-50").options == {"scope": "layer", "update": "none"}
    assert load_recipe("magnitude-2of4").options == {"scope": "layer", "update": "none"}
    assert load_recipe("wanda-50").options == {"update": "none", "permute": False}


@pytest.mark.parametrize("name", ["sparsegpt-2of4", "wanda-50", "magnitude-50", "sparsegpt-50-w4g128",
                                  "sparsegpt-50-rtn-w4g128"])
def test_to_dict_is_a_recipe_that_loads_back(name):
    recipe = load_recipe(name)
    data = recipe.to_dict()
    assert data["pruning"]["method"] == recipe.method
    assert yaml.safe_load(yaml.safe_dump(data)) == data  # plain YAML/JSON types only
    assert load_recipe(data) == dataclasses.replace(recipe, name="custom")


def test_load_recipe_accepts_a_recipe_a_dict_and_a_path(tmp_path):
    recipe = load_recipe("wanda-50")
    assert load_recipe(recipe) is recipe
    from_dict = load_recipe({"pruning": {"method": "wanda", "sparsity": "2:4"}})
    assert (from_dict.method, from_dict.pattern, from_dict.name) == ("wanda", (2, 4), "custom")
    path = write(tmp_path, "pruning:\n  method: magnitude\n  sparsity: 30%\n  scope: global\n", "mine.yaml")
    from_file = load_recipe(path)
    assert from_file.name == "mine"
    assert from_file.pattern == pytest.approx(0.3)
    assert from_file.options == {"scope": "global", "update": "none"}
    assert load_recipe(str(path)) == from_file


def test_targets_and_ignore_accept_a_string_or_a_list():
    recipe = recipe_from_dict(
        {"pruning": {"method": "wanda", "sparsity": 0.5, "targets": "*.mlp.*", "ignore": ["*.down_proj", "*.up_proj"]}}
    )
    assert recipe.targets == ("*.mlp.*",)
    assert recipe.ignore == ("*.down_proj", "*.up_proj")


def test_explicit_options_override_defaults():
    recipe = recipe_from_dict({"pruning": {"method": "sparsegpt", "sparsity": "4:8", "blocksize": 64,
                                           "dampening": 0.1}})
    assert recipe.options == {"blocksize": 64, "dampening": 0.1, "update": "none", "permute": False}
    assert recipe.pattern == (4, 8)


# --- patterns ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.5, 0.5), ("0.5", 0.5), ("50%", 0.5), ("12.5%", 0.125), (0.7, 0.7), ("2:4", (2, 4)), ("4:8", (4, 8)),
     (" 1 : 4 ", (1, 4))],
)
def test_parse_pattern(value, expected):
    result = parse_pattern(value)
    assert result == pytest.approx(expected) if isinstance(expected, float) else result == expected
    assert type(result) is type(expected)


def test_nm_sparsity_is_the_removed_share():
    assert recipe_from_dict({"pruning": {"method": "wanda", "sparsity": "1:4"}}).sparsity == pytest.approx(0.75)
    assert recipe_from_dict({"pruning": {"method": "wanda", "sparsity": "4:8"}}).pattern_text == "4:8"


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (0, "strictly between 0 and 1"),
        (1, "strictly between 0 and 1"),
        (1.5, "strictly between 0 and 1"),
        (-0.1, "strictly between 0 and 1"),
        ("0%", "strictly between 0 and 1"),
        ("100%", "strictly between 0 and 1"),
        ("4:2", "0 < N < M"),
        ("2:2", "0 < N < M"),
        ("0:4", "0 < N < M"),
        ("a:b", "not of the form N:M"),
        ("2:4:8", "not of the form N:M"),
        ("half", "neither a fraction"),
        (None, "neither a fraction"),
    ],
)
def test_bad_patterns(value, match):
    with pytest.raises(RecipeError, match=match):
        parse_pattern(value)


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, "4:2", "2:2", "0:4", "a:b"])
def test_bad_sparsity_in_a_recipe_file_names_the_file_and_the_value(tmp_path, value):
    path = write(tmp_path, f"pruning:\n  method: wanda\n  sparsity: {value!r}\n")
    with pytest.raises(RecipeError, match=r"recipe\.yaml: sparsity") as error:
        load_recipe(path)
    assert repr(value) in str(error.value)


# --- bad recipes ------------------------------------------------------------------------------------------------


def test_unknown_method():
    with pytest.raises(RecipeError, match=r"unknown method 'obc'; choose one of: magnitude, wanda, sparsegpt"):
        recipe_from_dict({"pruning": {"method": "obc", "sparsity": 0.5}})


def test_missing_method():
    with pytest.raises(RecipeError, match="unknown method None"):
        recipe_from_dict({"pruning": {"sparsity": 0.5}})


def test_missing_sparsity():
    with pytest.raises(RecipeError, match=r"pruning\.sparsity is required"):
        recipe_from_dict({"pruning": {"method": "wanda"}})


@pytest.mark.parametrize("data", [{}, {"pruning": None}, {"pruning": "wanda"}, None, ["pruning"],
                                  {"prune": {"method": "wanda", "sparsity": 0.5}}])
def test_missing_pruning_section(data):
    with pytest.raises(RecipeError, match="needs a `pruning:` section|mapping of sections|unknown recipe section"):
        recipe_from_dict(data)


def test_unknown_key_lists_the_allowed_keys():
    with pytest.raises(RecipeError, match="unknown key") as error:
        recipe_from_dict({"pruning": {"method": "wanda", "sparsity": 0.5, "blocksize": 128}})
    message = str(error.value)
    assert "blocksize" in message
    assert ("allowed: allocation, expert_tokens, ignore, inputs, method, owl_lambda, owl_threshold, permute, "
            "sparsity, targets, update") in message


@pytest.mark.parametrize(("method", "sparsity", "order"), [
    ("wanda", "2:4", "dense"), ("wanda", "4:8", "dense"), ("wanda", 0.5, "pruned"),
    ("sparsegpt", "2:4", "pruned"), ("sparsegpt", 0.5, "pruned"),
])
def test_default_calibration_order_is_the_measured_one_and_the_same_in_code_and_yaml(method, sparsity, order):
    from llm_sparsify.recipe import Recipe, parse_pattern

    from_yaml = recipe_from_dict({"pruning": {"method": method, "sparsity": sparsity}})
    assert from_yaml.inputs == order
    assert Recipe(method, parse_pattern(sparsity)).inputs == order  # the dataclass has the same default
    assert recipe_from_dict(from_yaml.to_dict()).inputs == order
    named = {"dense": "pruned", "pruned": "dense"}[order]  # a recipe that names the order keeps it
    assert recipe_from_dict({"pruning": {"method": method, "sparsity": sparsity, "inputs": named}}).inputs == named


def test_inputs_order_is_checked_and_kept():
    assert recipe_from_dict({"pruning": {"method": "wanda", "sparsity": 0.5}}).inputs == "pruned"
    dense = recipe_from_dict({"pruning": {"method": "sparsegpt", "sparsity": 0.5, "inputs": "dense"}})
    assert recipe_from_dict(dense.to_dict()).inputs == "dense"
    with pytest.raises(RecipeError, match="inputs must be one of pruned, dense"):
        recipe_from_dict({"pruning": {"method": "wanda", "sparsity": 0.5, "inputs": "sparse"}})
    with pytest.raises(RecipeError, match="unknown key.*inputs"):
        recipe_from_dict({"pruning": {"method": "magnitude", "sparsity": 0.5, "inputs": "dense"}})


def test_unknown_key_for_sparsegpt_lists_its_options():
    with pytest.raises(RecipeError, match="allowed: allocation, blocksize, dampening, expert_tokens, ignore, inputs, "
                       "method, owl_lambda, owl_threshold, permute, sparsity, targets, update"):
        recipe_from_dict({"pruning": {"method": "sparsegpt", "sparsity": 0.5, "scope": "layer"}})


def test_unknown_top_level_section():
    with pytest.raises(RecipeError, match=r"section\(s\): distill; known: experts, depth, width, budget, pruning"):
        recipe_from_dict({"pruning": {"method": "wanda", "sparsity": 0.5}, "distill": {"teacher": "x"}})


def test_sparsegpt_blocksize_must_be_a_multiple_of_m():
    with pytest.raises(RecipeError, match="blocksize 126 must be a multiple of M=4"):
        recipe_from_dict({"pruning": {"method": "sparsegpt", "sparsity": "2:4", "blocksize": 126}})
    with pytest.raises(RecipeError, match="multiple of M=8"):
        recipe_from_dict({"pruning": {"method": "sparsegpt", "sparsity": "4:8", "blocksize": 12}})
    # a fraction has no M: any positive blocksize is fine
    assert recipe_from_dict({"pruning": {"method": "sparsegpt", "sparsity": 0.5, "blocksize": 126}}).options[
        "blocksize"] == 126


@pytest.mark.parametrize("blocksize", [0, -4, 1.5, "128"])
def test_sparsegpt_blocksize_must_be_a_positive_integer(blocksize):
    with pytest.raises(RecipeError, match="blocksize must be a positive integer"):
        recipe_from_dict({"pruning": {"method": "sparsegpt", "sparsity": 0.5, "blocksize": blocksize}})


@pytest.mark.parametrize("dampening", [0, -0.01, "0.01", None])
def test_sparsegpt_dampening_must_be_positive(dampening):
    with pytest.raises(RecipeError, match="dampening must be a positive number"):
        recipe_from_dict({"pruning": {"method": "sparsegpt", "sparsity": 0.5, "dampening": dampening}})


def test_global_magnitude_rejects_nm():
    with pytest.raises(RecipeError, match="global magnitude ranking takes a fraction"):
        recipe_from_dict({"pruning": {"method": "magnitude", "sparsity": "2:4", "scope": "global"}})
    assert recipe_from_dict({"pruning": {"method": "magnitude", "sparsity": "2:4", "scope": "layer"}}).pattern == (2, 4)


def test_magnitude_scope_must_be_known():
    with pytest.raises(RecipeError, match="scope must be 'layer' or 'global', got 'row'"):
        recipe_from_dict({"pruning": {"method": "magnitude", "sparsity": 0.5, "scope": "row"}})


@pytest.mark.parametrize("value", [[""], [1], ["*", None], 3, {"a": 1}])
def test_bad_targets(value):
    with pytest.raises(RecipeError, match="targets must be a module-name glob"):
        recipe_from_dict({"pruning": {"method": "wanda", "sparsity": 0.5, "targets": value}})


def test_bad_ignore():
    with pytest.raises(RecipeError, match="ignore must be a module-name glob"):
        recipe_from_dict({"pruning": {"method": "wanda", "sparsity": 0.5, "ignore": [None]}})


# --- files ------------------------------------------------------------------------------------------------------


def test_invalid_yaml_file(tmp_path):
    path = write(tmp_path, "pruning:\n  method: wanda\n   sparsity: [0.5\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_empty_yaml_file(tmp_path):
    with pytest.raises(RecipeError, match="needs a `pruning:` section"):
        load_recipe(write(tmp_path, ""))


def test_errors_from_a_file_name_the_file(tmp_path):
    path = write(tmp_path, "pruning:\n  method: wanda\n  sparsity: 0.5\n  dampening: 0.1\n", "typo.yaml")
    with pytest.raises(RecipeError, match=r"typo\.yaml: unknown key\(s\) for wanda: dampening"):
        load_recipe(path)


def test_missing_path_lists_builtin_recipes(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError, match="is neither a file nor a built-in recipe") as error:
        load_recipe(missing)
    message = str(error.value)
    assert "nope.yaml" in message
    for name in BUILTINS:
        assert name in message


def test_unknown_builtin_name_lists_builtin_recipes():
    with pytest.raises(RecipeError, match=r"'wanda-60' is neither a file nor a built-in recipe \(best-2of4, best-50, "):
        load_recipe("wanda-60")


def test_a_directory_is_not_a_recipe(tmp_path):
    with pytest.raises(RecipeError, match="neither a file nor a built-in recipe"):
        load_recipe(tmp_path)


# --- bad input found in review: each ends in a clear error ---------------------------------------------------


def test_unhashable_method_is_a_recipe_error():
    with pytest.raises(RecipeError, match="unknown method"):
        recipe_from_dict({"pruning": {"method": ["wanda"], "sparsity": 0.5}})


def test_empty_targets_list_is_rejected():
    with pytest.raises(RecipeError, match="targets"):
        recipe_from_dict({"pruning": {"method": "wanda", "sparsity": 0.5, "targets": []}})


def test_unquoted_nm_pattern_in_yaml(tmp_path):
    assert load_recipe(write(tmp_path, "pruning:\n  method: wanda\n  sparsity: 2:4\n")).pattern == (2, 4)


# --- quantization -------------------------------------------------------------------------------------------------


def quantized(quantization, pruning=None):
    return recipe_from_dict({"pruning": pruning or {"method": "wanda", "sparsity": 0.5}, "quantization": quantization})


def test_quantization_defaults_and_what_it_needs():
    recipe = quantized({"method": "gptq"})
    assert recipe.quantization == Quantization("gptq", QuantScheme(4, 128, True), blocksize=128, dampening=0.01)
    assert recipe.statistic == "hessian"  # GPTQ needs the Hessian, even after Wanda
    assert quantized({"method": "rtn", "bits": 8, "group_size": None}).statistic == "column_norms"
    assert quantized({"method": "rtn"}, {"method": "magnitude", "sparsity": 0.5}).statistic is None
    magnitude = quantized({"method": "gptq"}, {"method": "magnitude", "sparsity": 0.5, "inputs": "dense"})
    assert (magnitude.statistic, magnitude.inputs) == ("hessian", "dense")  # now it has calibration inputs
    with pytest.raises(RecipeError, match="unknown key.*inputs"):
        quantized({"method": "rtn"}, {"method": "magnitude", "sparsity": 0.5, "inputs": "dense"})


def test_gptq_with_sparsegpt_shares_its_sweep():
    pruning = {"method": "sparsegpt", "sparsity": 0.5, "blocksize": 64, "dampening": 0.05}
    recipe = quantized({"method": "gptq", "group_size": 32}, pruning)
    assert (recipe.quantization.blocksize, recipe.quantization.dampening) == (64, 0.05)
    same = quantized({"method": "gptq", "blocksize": 64, "dampening": 0.05}, pruning)  # given, and equal: fine
    assert same.quantization == Quantization("gptq", QuantScheme(4, 128, True), 64, 0.05)
    with pytest.raises(RecipeError, match=r"quantization\.blocksize must equal pruning\.blocksize \(64\)"):
        quantized({"method": "gptq", "blocksize": 128}, pruning)
    with pytest.raises(RecipeError, match=r"quantization\.dampening must equal pruning\.dampening \(0\.05\)"):
        quantized({"method": "gptq", "dampening": 0.01}, pruning)


def test_quantization_round_trips_through_to_dict_and_yaml(tmp_path):
    path = write(tmp_path, "pruning:\n  method: wanda\n  sparsity: 2:4\nquantization:\n  method: gptq\n  bits: 8\n"
                 "  group_size: null\n  symmetric: false\n  dampening: 0.1\n  blocksize: 64\n")
    recipe = load_recipe(path)
    assert recipe.quantization == Quantization("gptq", QuantScheme(8, None, False), blocksize=64, dampening=0.1)
    data = recipe.to_dict()
    assert data["quantization"] == {"method": "gptq", "bits": 8, "group_size": None, "symmetric": False,
                                    "dampening": 0.1, "blocksize": 64, "actorder": True}
    assert yaml.safe_load(yaml.safe_dump(data)) == data
    assert load_recipe(data) == dataclasses.replace(recipe, name="custom")
    assert recipe.quantization.record() == {"method": "gptq", "bits": 8, "group_size": None, "symmetric": False}
    assert "quantization" not in load_recipe("sparsegpt-50").to_dict()


@pytest.mark.parametrize(("quantization", "match"), [
    (None, r"quantization needs a method: gptq or rtn \(got None\)"),
    ({"bits": 4}, r"quantization needs a method: gptq or rtn \(got None\)"),
    ({"method": "awq"}, r"quantization needs a method: gptq or rtn \(got 'awq'\)"),
    ("gptq", r"quantization needs a method: gptq or rtn \(got 'gptq'\)"),
    ({"method": ["gptq"]}, r"quantization needs a method: gptq or rtn \(got \['gptq'\]\)"),
    ({"method": "gptq", "bit": 4}, r"unknown quantization key\(s\) for gptq: bit; allowed: actorder, bits, "),
    ({"method": "rtn", "blocksize": 64}, r"for rtn: blocksize; allowed: bits, group_size, method, symmetric"),
    ({"method": "gptq", "bits": 3}, r"quantization\.bits must be 4 or 8, got 3"),
    ({"method": "gptq", "bits": "4"}, r"quantization\.bits must be 4 or 8, got '4'"),
    ({"method": "gptq", "bits": 4.0}, r"quantization\.bits must be 4 or 8, got 4\.0"),
    ({"method": "gptq", "bits": True}, r"quantization\.bits must be 4 or 8"),
    ({"method": "rtn", "group_size": 0}, r"group_size .*must be a positive integer, got 0"),
    ({"method": "rtn", "group_size": -128}, r"group_size .*must be a positive integer"),
    ({"method": "rtn", "group_size": 12.5}, r"group_size .*must be a positive integer"),
    ({"method": "rtn", "symmetric": "yes"}, r"quantization\.symmetric must be true or false, got 'yes'"),
    ({"method": "gptq", "dampening": 0}, r"quantization\.dampening must be a positive number, got 0"),
    ({"method": "gptq", "blocksize": 0}, r"quantization\.blocksize must be a positive integer, got 0"),
    ({"method": "gptq", "group_size": 96}, r"group_size 96 must divide the GPTQ blocksize 128 or be a multiple of it"),
    ({"method": "gptq", "group_size": 64, "blocksize": 48}, r"group_size 64 must divide the GPTQ blocksize 48"),
])
def test_bad_quantization_sections(quantization, match):
    with pytest.raises(RecipeError, match=match):
        quantized(quantization)


def test_quantization_groups_against_the_pattern():
    nm = {"method": "sparsegpt", "sparsity": "2:8", "blocksize": 64}
    with pytest.raises(RecipeError, match="group_size 4 must be a multiple of M=8"):
        quantized({"method": "gptq", "group_size": 4}, nm)
    assert quantized({"method": "gptq", "group_size": 256}, nm).quantization.scheme.group_size == 256  # 4 blocks
    assert quantized({"method": "rtn", "group_size": 4}, nm).quantization.scheme.group_size == 4  # no sweep
    wanda = {"method": "wanda", "sparsity": "2:8"}  # GPTQ after Wanda: the mask is fixed, M plays no part
    assert quantized({"method": "gptq", "group_size": 4}, wanda).quantization.scheme.group_size == 4


def test_quantization_errors_from_a_file_name_the_file(tmp_path):
    path = write(tmp_path, "pruning:\n  method: wanda\n  sparsity: 0.5\nquantization:\n  method: gptq\n  bits: 2\n",
                 "low.yaml")
    with pytest.raises(RecipeError, match=r"low\.yaml: quantization\.bits must be 4 or 8, got 2"):
        load_recipe(path)


def test_experts_section():
    recipe = recipe_from_dict({"experts": {"remove": 2}})
    assert recipe.experts.remove == 2 and recipe.streams and recipe.needs_calibration
    assert recipe_from_dict(recipe.to_dict()) == recipe
    for section, message in (({}, "exactly one of"), ({"remove": 1, "max_parameters": 10}, "exactly one of"),
                             ({"remove": 0}, "positive integer"), ({"keep": 2}, "unknown experts key")):
        with pytest.raises(RecipeError, match=message):
            recipe_from_dict({"experts": section})


def test_expert_tokens():
    recipe = recipe_from_dict({"pruning": {"method": "wanda", "sparsity": 0.5, "expert_tokens": "all"}})
    assert recipe.expert_tokens == "all" and recipe_from_dict(recipe.to_dict()) == recipe
    default = recipe_from_dict({"pruning": {"method": "wanda", "sparsity": 0.5}})
    assert "expert_tokens" not in default.to_dict()["pruning"]
    with pytest.raises(RecipeError, match="expert_tokens must be one of routed, all"):
        recipe_from_dict({"pruning": {"method": "wanda", "sparsity": 0.5, "expert_tokens": "some"}})
    with pytest.raises(RecipeError, match="unknown key"):  # magnitude reads no calibration tokens
        recipe_from_dict({"pruning": {"method": "magnitude", "sparsity": 0.5, "expert_tokens": "all"}})


# --- declared once (issue 19, item 7) --------------------------------------------------------------------------------

SECTIONS = {"depth": "Depth", "experts": "ExpertRemoval", "width": "Width", "reconstruction": "Reconstruction",
            "recovery": "Recovery", "evaluate": "Evaluation", "export": "Export"}


@pytest.mark.parametrize("section", SECTIONS)
def test_every_section_key_declares_its_default_and_its_check(section):
    """Each key of a section is one field with its default and its check: an empty section is the defaults, and
    every key refuses a value of no sensible kind in words that name it."""
    from llm_sparsify import recipe as recipe_module

    stage = getattr(recipe_module, SECTIONS[section])
    assert recipe_module.section_of({}, section, stage) == stage()
    for field in dataclasses.fields(stage):
        with pytest.raises(RecipeError, match=rf"^{section}\.{field.name} "):
            recipe_module.section_of({field.name: object()}, section, stage)


def test_the_recipe_the_methods_and_the_command_line_share_their_defaults():
    """A default lives in one place: the recipe's sections read the methods' own constants, and the command line the
    API's."""
    from llm_sparsify.cli import build_parser
    from llm_sparsify.export import GGUF_TYPE
    from llm_sparsify.finish import Steps
    from llm_sparsify.prune import owl
    from llm_sparsify.recipe import Export, Owl
    from llm_sparsify.stats import BLOCKSIZE, DAMPENING
    from llm_sparsify.walk import BATCH_SIZE

    assert (Owl().threshold, Owl().lam) == (owl.M, owl.LAMBDA)
    sparsegpt = load_recipe({"pruning": {"method": "sparsegpt", "sparsity": 0.5}, "quantization": {"method": "gptq"}})
    assert (sparsegpt.options["blocksize"], sparsegpt.options["dampening"]) == (BLOCKSIZE, DAMPENING)
    assert (sparsegpt.quantization.blocksize, sparsegpt.quantization.dampening) == (BLOCKSIZE, DAMPENING)
    prune = build_parser().parse_args(["prune"])
    assert (prune.batch_size, prune.ppl_windows) == (BATCH_SIZE, Steps.ppl_windows)
    assert build_parser().parse_args(["export", "x", "--format", "gguf"]).qtype == GGUF_TYPE == Export().qtype


@pytest.mark.parametrize(("key", "value"), [("owl_threshold", "x"), ("owl_lambda", -1), ("sensitivity_levels", 0),
                                            ("sensitivity_error", "l1")])
def test_allocation_keys_are_refused_by_their_own_names(key, value):
    allocation = "owl" if key.startswith("owl") else "sensitivity"
    with pytest.raises(RecipeError, match=rf"^pruning\.{key} "):
        recipe_from_dict({"pruning": {"method": "wanda", "sparsity": 0.5, "allocation": allocation, key: value}})


def test_numbers_yaml_reads_as_strings_are_taken_as_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `5e-3`, with no dot, as a string; a recipe means the number."""
    path = tmp_path / "r.yaml"
    path.write_text('pruning: {method: sparsegpt, sparsity: 0.5}\nreconstruction: {lr: 5e-3}\n'
                    'budget: {size: 5e-1, max_kv: 25e-2}\n')
    recipe = load_recipe(path)
    assert recipe.reconstruction.lr == 0.005 and recipe.budget.size == 0.5 and recipe.budget.max_kv == 0.25
    for text, message in [("reconstruction: {lr: fast}", "lr must be a positive number, got 'fast'"),
                          ("reconstruction: {lr: inf}", "lr must be a positive number, got 'inf'"),
                          ("reconstruction: {lr: -1e-3}", "lr must be a positive number")]:
        path.write_text("pruning: {method: sparsegpt, sparsity: 0.5}\n" + text + "\n")
        with pytest.raises(RecipeError, match=message):
            load_recipe(path)
