"""Mixture-of-experts models: every expert's projections are pruning targets (structure/experts.py), calibrated on
the tokens routed to it, streamed from checkpoints in transformers' on-disk layout (checkpoint_layout.py)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from llm_sparsify.api import compress, prune_checkpoint
from llm_sparsify.checkpoint_layout import checkpoint_layout, model_layout
from llm_sparsify.structure.experts import (
    Experts,
    experts_unfused,
    fuse_experts,
    fused_tensors,
    unfuse_experts,
    unfused_tensors,
)
from tests.test_decoder_sparsity import decoder_weights, tiny_moe, warnings_of

KINDS = ["mixtral", "qwen3_moe"]


def calibration(n: int = 16, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(1))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def disk_tensors(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (a safe_open, not a dict)
    return tensors


def expert_weights(model) -> dict[str, torch.Tensor]:
    """Brute force: (layer, expert, projection) -> weight, sliced from the fused parameters."""
    found = {}
    for i, layer in enumerate(model.model.layers):
        experts = next((m for m in layer.modules()  # mlp.experts, block_sparse_moe.experts, ...
                        if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor) and m.gate_up_proj.dim() == 3),
                       None)
        if experts is None:
            continue
        gate, up = experts.gate_up_proj.detach().chunk(2, dim=1)
        for e in range(len(gate)):
            found |= {(i, e, "gate_proj"): gate[e], (i, e, "up_proj"): up[e],
                      (i, e, "down_proj"): experts.down_proj.detach()[e]}
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_unfused_experts_compute_what_the_fused_ones_do(kind, one_thread):
    model, ids = tiny_moe(kind), calibration(2)
    before = logits(model, ids)
    weights = {name: w.clone() for name, w in model.state_dict().items()}
    assert unfuse_experts(model) == (2 if kind == "mixtral" else 1)
    assert isinstance(model.model.layers[0].mlp.experts, Experts)
    names = {name for name, _ in model.named_modules()}
    assert {"model.layers.0.mlp.experts.3.gate_proj", "model.layers.0.mlp.experts.0.down_proj"} <= names
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    fuse_experts(model)
    assert all(torch.equal(weights[name], w) for name, w in model.state_dict().items())  # back, bit for bit
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_layout_is_transformers_own(kind, tmp_path):
    """Converting a saved checkpoint's tensors gives the model's state dict and back, exactly as transformers
    loads and saves them (Mixtral on disk: block_sparse_moe.experts.<e>.w1/w2/w3)."""
    model = tiny_moe(kind)
    model.save_pretrained(tmp_path)
    disk, state = disk_tensors(tmp_path), model.state_dict()
    if kind == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in disk
    else:
        assert "model.layers.0.mlp.experts.3.gate_proj.weight" in disk
    layer0 = {name: t for name, t in disk.items() if name.startswith("model.layers.0.")}
    converted = model_layout(model, layer0)
    assert converted.keys() == {name for name in state if name.startswith("model.layers.0.")}
    assert all(torch.equal(converted[name], state[name]) for name in converted)
    back = checkpoint_layout(model, converted)
    assert back.keys() == layer0.keys() and all(torch.equal(back[name], layer0[name]) for name in back)
    unfused = unfused_tensors(converted)
    assert "model.layers.0.mlp.experts.2.up_proj.weight" in unfused
    assert all(torch.equal(t, converted[name]) for name, t in fused_tensors(unfused).items())


def routed_inputs(model, ids: torch.Tensor, layer: int) -> list[torch.Tensor]:
    """Brute force: per expert, the inputs the router sends it in `layer` of the dense model."""
    captured = []
    experts = model.model.layers[layer].mlp.experts
    handle = experts.register_forward_pre_hook(lambda module, args: captured.append((args[0], args[1])))
    logits(model, ids)
    handle.remove()
    hidden = torch.cat([h for h, _ in captured])
    index = torch.cat([i for _, i in captured])
    return [hidden[(index == e).any(-1)] for e in range(experts.gate_up_proj.shape[0])]


def wanda_mask(weight: torch.Tensor, inputs: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Brute force Wanda: per output row, the kept weights are the largest |W_ij|·‖X_j‖₂."""
    score = weight.abs() * inputs.float().norm(dim=0)
    keep = weight.shape[1] - int(weight.shape[1] * sparsity)
    mask = torch.zeros_like(weight, dtype=torch.bool)
    for row in range(len(weight)):
        mask[row, sorted(range(weight.shape[1]), key=lambda j: -score[row, j].item())[:keep]] = True
    return mask


@pytest.mark.parametrize("kind", KINDS)
def test_an_experts_wanda_mask_is_ranked_on_the_tokens_routed_to_it(kind, caplog, one_thread):
    model, ids = tiny_moe(kind), calibration()
    dense = expert_weights(model)
    routed = routed_inputs(model, ids, 0)
    assert all(len(x) >= 2 * 32 for x in routed)  # every expert is sent enough tokens: no fallback
    with caplog.at_level(logging.WARNING):
        compress(model, {"pruning": {"method": "wanda", "sparsity": 0.5, "inputs": "dense"}}, ids, device="cpu")
    assert warnings_of(caplog) == []
    pruned = expert_weights(model)
    for e, x in enumerate(routed):
        gate = dense[(0, e, "gate_proj")]
        assert torch.equal(pruned[(0, e, "gate_proj")] != 0, wanda_mask(gate, x, 0.5))
        assert not torch.equal(wanda_mask(gate, x, 0.5), wanda_mask(gate, torch.cat(routed), 0.5))  # routing matters
        up = dense[(0, e, "up_proj")]
        assert torch.equal(pruned[(0, e, "up_proj")] != 0, wanda_mask(up, x, 0.5))
        act = model.model.layers[0].mlp.experts.act_fn
        down_inputs = act(x @ gate.T) * (x @ up.T)  # inputs: dense, so the unpruned gate and up produce them
        assert torch.equal(pruned[(0, e, "down_proj")] != 0, wanda_mask(dense[(0, e, "down_proj")], down_inputs, 0.5))


def test_all_tokens_calibrates_every_expert_on_every_token(one_thread):
    model, ids = tiny_moe("mixtral"), calibration()
    dense = expert_weights(model)
    every = torch.cat(routed_inputs(model, ids, 0)).unique(dim=0)
    compress(model, {"pruning": {"method": "wanda", "sparsity": 0.5, "inputs": "dense", "expert_tokens": "all"}},
             ids, device="cpu")
    pruned = expert_weights(model)
    for e in range(4):
        assert torch.equal(pruned[(0, e, "gate_proj")] != 0, wanda_mask(dense[(0, e, "gate_proj")], every, 0.5))


def test_an_expert_sent_too_few_tokens_is_calibrated_on_all_of_them_with_a_warning(caplog, one_thread):
    model, ids = tiny_moe("mixtral"), calibration(2, 16)  # 32 tokens, 16 per expert on average: fewer than 32 inputs
    dense = expert_weights(model)
    every = torch.cat(routed_inputs(model, ids, 0)).unique(dim=0)
    with caplog.at_level(logging.WARNING):
        compress(model, {"pruning": {"method": "wanda", "sparsity": 0.5, "inputs": "dense"}}, ids, device="cpu")
    assert any("fewer calibration tokens" in w and "layer 0" in w for w in warnings_of(caplog))
    pruned = expert_weights(model)
    assert torch.equal(pruned[(0, 0, "gate_proj")] != 0, wanda_mask(dense[(0, 0, "gate_proj")], every, 0.5))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("expert_tokens", ["routed", "all"])
def test_pruning_nothing_leaves_the_logits_unchanged(kind, expert_tokens, one_thread):
    """A sparsity that removes no weight (less than one per row) through the whole path: unfuse, calibrate (on all
    tokens too), prune, fuse; the output still takes only the router's top-k."""
    model, ids = tiny_moe(kind), calibration()
    before = logits(model, ids)
    compress(model, {"pruning": {"method": "wanda", "sparsity": 0.001, "expert_tokens": expert_tokens}}, ids,
             device="cpu")
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("recipe", ["magnitude-50", "wanda-50", "sparsegpt-50", "wanda-2of4", "sparsegpt-2of4"])
def test_every_expert_row_is_pruned_exactly(kind, recipe, one_thread):
    model = tiny_moe(kind)
    compress(model, recipe, calibration(), device="cpu")
    weights = expert_weights(model)
    assert weights
    for weight in weights.values():
        if recipe.endswith("2of4"):
            assert ((weight.reshape(-1, 4) == 0).sum(1) == 2).all()  # exactly 2 of every 4 consecutive inputs
        elif recipe.startswith("wanda"):
            assert ((weight == 0).sum(1) == weight.shape[1] // 2).all()  # half of every row
        else:  # magnitude ranks the whole matrix, SparseGPT each block of 128 columns (all of these)
            assert int((weight == 0).sum()) == weight.numel() // 2
    router = model.model.layers[0].mlp.gate.weight
    assert (router != 0).all()  # the router is not pruned


def test_targets_and_ignore_name_experts(one_thread):
    model = tiny_moe("mixtral")
    compress(model, {"pruning": {"method": "magnitude", "sparsity": 0.5, "targets": ["*.experts.3.*"],
                                 "ignore": ["*.experts.*.down_proj"]}}, device="cpu")
    for (_, e, projection), weight in expert_weights(model).items():
        assert ((weight == 0).any().item()) == (e == 3 and projection != "down_proj")


def test_gptq_on_experts_keeps_grids(tmp_path, one_thread):
    model = tiny_moe("mixtral")
    model.save_pretrained(tmp_path / "dense")
    record = prune_checkpoint(str(tmp_path / "dense"), "sparsegpt-50-w4g128", tmp_path / "out", calibration(),
                              device="cpu", dtype=torch.float32)
    with safe_open(tmp_path / "out" / "quantization.safetensors", "pt") as f:
        names = set(f.keys())
    assert any(".experts.3.down_proj" in name for name in names)
    assert record["sparsity"]["overall"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("kind", KINDS)
def test_a_moe_checkpoint_streams_from_disk_like_in_memory(kind, tmp_path, one_thread):
    """From disk to disk: the output keeps transformers' on-disk names, loads with from_pretrained, keeps its zeros,
    and equals the in-memory result tensor for tensor; the record covers the experts."""
    tiny_moe(kind).save_pretrained(tmp_path / "dense")
    ids = calibration()
    record = prune_checkpoint(str(tmp_path / "dense"), "sparsegpt-50", tmp_path / "out", ids, device="cpu",
                              dtype=torch.float32)
    assert disk_tensors(tmp_path / "out").keys() == disk_tensors(tmp_path / "dense").keys()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    in_memory = compress(tiny_moe(kind), "sparsegpt-50", ids, device="cpu")
    for name, weight in saved.state_dict().items():
        torch.testing.assert_close(weight, in_memory.state_dict()[name], rtol=0, atol=0)
    for weight in expert_weights(saved).values():
        assert int((weight == 0).sum()) == weight.numel() // 2
    sparsity = record["sparsity"]
    assert set(sparsity["untargeted"]) <= {"model.layers.*.mlp.gate.weight", "model.layers.0.mlp.gate.weight"}
    assert sparsity["decoder"] > 0.45
    zeros = sum(int((w == 0).sum()) for w in decoder_weights(saved).values())
    assert sparsity["decoder"] == pytest.approx(zeros / sum(w.numel() for w in decoder_weights(saved).values()))


def test_experts_unfused_fuses_back_on_error():
    model = tiny_moe("mixtral")
    with pytest.raises(RuntimeError), experts_unfused(model):
        assert isinstance(model.model.layers[0].mlp.experts, Experts)
        raise RuntimeError
    assert not isinstance(model.model.layers[0].mlp.experts, Experts)
    assert model.model.layers[0].mlp.experts.gate_up_proj.device.type == "cpu"


def test_expert_saliency_is_the_router_weighted_output_norm(one_thread):
    """REAP's saliency against a brute force over the dense model's routed tokens (layer 1 of a tiny Mixtral)."""
    from llm_sparsify.score_passes import expert_saliencies

    model, ids = tiny_moe("mixtral"), calibration(4)
    captured = []
    experts = model.model.layers[1].mlp.experts
    handle = experts.register_forward_pre_hook(lambda module, args: captured.append(args))
    logits(model, ids)
    handle.remove()
    hidden, index, weights = (torch.cat(parts) for parts in zip(*captured, strict=True))
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    expected = []
    for e in range(4):
        rows, slots = torch.where(index == e)
        gate, up = (hidden[rows] @ gate_up[e].T).chunk(2, dim=-1)
        out = (experts.act_fn(gate) * up) @ down[e].T
        expected.append((weights[rows, slots] * out.norm(dim=-1)).mean().item())
    with experts_unfused(model):
        saliency = expert_saliencies(model, ids)
    assert saliency[1].tolist() == pytest.approx(expected, rel=1e-4)


def ids_leaving_an_expert_unchosen(model, layers: int) -> torch.Tensor:
    """Token ids on which every MoE layer leaves at least one expert unchosen (searched over seeds)."""
    for seed in range(100):
        ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(seed))
        chosen: list[set[int]] = []

        def record(module, args, chosen=chosen):
            chosen.append(set(args[1].flatten().tolist()))

        handles = [model.model.layers[i].mlp.experts.register_forward_pre_hook(record) for i in range(layers)]
        logits(model, ids)
        for handle in handles:
            handle.remove()
        if all(len(c) < 8 for c in chosen):
            return ids
    raise AssertionError("no such ids")


def test_removing_experts_the_router_never_chooses_leaves_the_logits_unchanged(tmp_path, one_thread):
    from transformers import MixtralConfig, MixtralForCausalLM

    from tests.test_decoder_sparsity import MOE

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**MOE, num_local_experts=8)).eval()
    ids = ids_leaving_an_expert_unchosen(model, 2)
    before = logits(model, ids)
    compress(model, {"experts": {"remove": 1}}, ids, device="cpu")
    assert model.config.num_local_experts == 7
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 7
    assert model.model.layers[0].mlp.gate.weight.shape[0] == 7
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "out")  # loads in plain transformers, and generates
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(logits(reloaded, ids), before, rtol=1e-5, atol=1e-5)
    assert reloaded.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 10)


@pytest.mark.parametrize("kind", KINDS)
def test_expert_removal_to_a_parameter_budget(kind, one_thread):
    from llm_sparsify.architecture import parameter_count

    model = tiny_moe(kind)
    total = parameter_count(model)
    budget = total - 1  # one parameter less: one expert per layer must go, no more
    compress(model, {"experts": {"max_parameters": budget}}, calibration(4), device="cpu")
    assert parameter_count(model) <= budget
    assert expert_count_of(model) == 3


def expert_count_of(model) -> int:
    return next(layer.mlp.experts.gate_up_proj.shape[0] for layer in model.model.layers
                if hasattr(layer.mlp, "experts"))


@pytest.mark.parametrize("section", [{"remove": 3}, {"remove": 4}, {"max_parameters": 10}])
def test_an_impossible_expert_count_fails_before_any_work(section):
    from llm_sparsify.recipe import RecipeError

    model = tiny_moe("mixtral")  # 4 experts, top-2
    with pytest.raises(RecipeError, match="keep between 2 and 3"):
        compress(model, {"experts": section}, calibration(4), device="cpu")
    assert expert_count_of(model) == 4


def test_expert_removal_from_the_command_line(tmp_path, capsys, one_thread):
    from llm_sparsify.cli import main

    tiny_moe("qwen3_moe").save_pretrained(tmp_path / "dense")
    torch.save(calibration(4), tmp_path / "calib.pt")
    (tmp_path / "r.yaml").write_text("experts: {remove: 1}\npruning: {method: wanda, sparsity: 0.5}\n")
    assert main(["prune", str(tmp_path / "dense"), "--recipe", str(tmp_path / "r.yaml"), "--calibration",
                 str(tmp_path / "calib.pt"), "--output", str(tmp_path / "out"), "--device", "cpu", "-q"]) == 0
    assert "removed 1 of 4 experts in every MoE layer" in capsys.readouterr().out
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert saved.config.num_experts == 3
    for weight in expert_weights(saved).values():
        assert ((weight == 0).sum(1) == weight.shape[1] // 2).all()


def test_a_conversion_that_reshapes_is_no_renaming():
    from llm_sparsify.checkpoint_layout import as_renaming

    shapes = {"a": (2, 3), "b": (2, 3)}
    renamed = as_renaming(lambda t: {"x": t["b"], "y": t["a"]}, shapes, {"x": (2, 3), "y": (2, 3)})
    assert renamed == {"x": "b", "y": "a"}
    assert as_renaming(lambda t: {"ab": torch.cat([t["a"], t["b"]])}, shapes, {"ab": (4, 3)}) is None
    assert as_renaming(lambda t: {"x": t["a"], "y": t["a"]}, shapes, {"x": (2, 3), "y": (2, 3)}) is None


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_through_the_full_conversion_gives_the_same_checkpoint(kind, tmp_path, monkeypatch, one_thread):
    """Where a layer's conversion is not a plain renaming, its tensors go through transformers' mapping both ways
    (stacked and split): the output is the same."""
    import llm_sparsify.stream

    tiny_moe(kind).save_pretrained(tmp_path / "dense")
    ids = calibration()
    prune_checkpoint(str(tmp_path / "dense"), "wanda-50", tmp_path / "renamed", ids, device="cpu", dtype=torch.float32)
    monkeypatch.setattr(llm_sparsify.stream, "as_renaming", lambda *args: None)
    prune_checkpoint(str(tmp_path / "dense"), "wanda-50", tmp_path / "converted", ids, device="cpu",
                     dtype=torch.float32)
    renamed, converted = disk_tensors(tmp_path / "renamed"), disk_tensors(tmp_path / "converted")
    assert renamed.keys() == converted.keys()
    assert all(torch.equal(renamed[name], converted[name]) for name in renamed)


# --- resume after SIGKILL and torchrun, as for dense models (tests/test_stream.py) ---------------------------------

@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    """A sharded bfloat16 Mixtral with enough layers for a run to be killed in the middle, and calibration ids."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from tests.test_stream import save_sharded

    path = tmp_path_factory.mktemp("moe-resume")
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=256)
    save_sharded(MixtralForCausalLM(config), path / "model", dtype=torch.bfloat16)
    torch.save(torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(0)), path / "ids.pt")
    return path


def test_a_killed_moe_run_resumes_to_the_same_checkpoint(moe_checkpoint):
    from tests.test_stream import output_tensors, prune_command, run, run_killed_after

    uninterrupted, resumed = moe_checkpoint / "uninterrupted", moe_checkpoint / "resumed"
    run(prune_command(moe_checkpoint, uninterrupted))
    run_killed_after(prune_command(moe_checkpoint, resumed), moe_checkpoint / ".resumed.partial" / "progress.json", 2)
    assert not resumed.exists()
    run(prune_command(moe_checkpoint, resumed))
    assert json.loads((resumed / "llm_sparsify.json").read_text())["resumed_after_layers"] >= 2
    first, second = output_tensors(uninterrupted), output_tensors(resumed)
    assert first.keys() == second.keys()
    assert "model.layers.5.block_sparse_moe.experts.3.w2.weight" in first
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_two_processes_prune_a_moe_checkpoint_as_one_does(moe_checkpoint):
    """torchrun (gloo): each rank routes its share of the samples, the routed-token counts and every expert's
    statistics are summed, the experts are shared out."""
    from tests.test_stream import output_tensors, prune_command, run

    one, two = moe_checkpoint / "one", moe_checkpoint / "two"
    run(prune_command(moe_checkpoint, one, "sparsegpt-50"))
    run(prune_command(moe_checkpoint, two, "sparsegpt-50", processes=2))
    first, second = output_tensors(one), output_tensors(two)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    experts = [w for name, w in first.items() if ".experts." in name]
    assert len(experts) == 6 * 4 * 3 and all(int((w == 0).sum()) == w.numel() // 2 for w in experts)


@pytest.mark.parametrize("recipe", [
    "owl-wanda-70",
    {"pruning": {"method": "wanda", "sparsity": 0.5}, "quantization": {"method": "gptq", "bits": 4}},
])
def test_owl_and_gptq_after_the_mask_reach_the_experts(recipe, one_thread):
    model = tiny_moe("mixtral")
    compress(model, recipe, calibration(), device="cpu")
    weights = expert_weights(model)
    shares = {key: int((w == 0).sum()) / w.numel() for key, w in weights.items()}
    if recipe == "owl-wanda-70":  # each layer its own sparsity within 70% ± 8%, every expert of a layer the same
        for layer in (0, 1):  # (up to the rounding of a row's count: rows are 32 or 64 wide)
            layer_shares = [s for (i, _, _), s in shares.items() if i == layer]
            assert max(layer_shares) - min(layer_shares) <= 1 / 32 and 0.62 - 1 / 32 <= min(layer_shares) <= 0.78
    else:  # GPTQ after the Wanda mask: half of every row zero, the kept weights on a 4-bit grid of 128-input groups
        for weight in weights.values():
            assert ((weight == 0).sum(1) >= weight.shape[1] // 2).all()  # a kept weight may round to 0
            assert all(len(row[row != 0].unique()) <= 15 for row in weight)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_experts_that_share_one_input_are_pruned_a_few_at_a_time_alike(method, monkeypatch, one_thread):
    """Calibrated on all tokens, every expert's gate and up read one input: they are pruned in runs of whole matrices
    (transform_pass.PRUNED_AT_ONCE), so a layer's experts are never all held twice; the runs give what one group
    gives."""
    import llm_sparsify.transform_pass as engine

    recipe = {"pruning": {"method": method, "sparsity": 0.5, "expert_tokens": "all"}}
    sizes: list[int] = []
    prune_weights = engine.prune_weights
    monkeypatch.setattr(engine, "prune_weights", lambda m, weights, *a, **k: (sizes.append(len(weights)),
                                                                             prune_weights(m, weights, *a, **k))[1])
    whole = tiny_moe("mixtral")
    compress(whole, recipe, calibration(), device="cpu")
    assert max(sizes) == 4 * 2  # the gate and up of 4 experts
    sizes.clear()
    monkeypatch.setattr(engine, "PRUNED_AT_ONCE", 1)  # every matrix a run of its own
    runs = tiny_moe("mixtral")
    compress(runs, recipe, calibration(), device="cpu")
    assert set(sizes) == {1}
    for (key, a), b in zip(expert_weights(whole).items(), expert_weights(runs).values(), strict=True):
        assert torch.equal(a == 0, b == 0) and torch.allclose(a, b, rtol=1e-5, atol=1e-6), key


# --- every other family of this transformers that keeps its experts in the same fused form ---------------------------

FAMILIES = ["olmoe", "qwen2_moe", "phimoe", "minimax", "granitemoeshared", "solar_open", "mellum", "kolibri1",
            "minimax_m2"]  # found by building each MoE causal LM of transformers 5.25 and testing is_fused_experts
SMALL = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128,
             num_experts=4, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256)


def tiny_family(model_type: str):
    from transformers import AutoConfig

    try:
        base = AutoConfig.for_model(model_type)
    except (ValueError, KeyError):
        pytest.skip(f"{model_type} is not in transformers of this install")
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{k: v for k, v in SMALL.items() if hasattr(base, k)})
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_other_fused_expert_families_are_pruned_expert_by_expert(model_type, tmp_path, one_thread):
    """Unfused, the model computes what it computed fused; Wanda 50% zeroes exactly half of every row of every
    expert's gate, up and down; saved and reloaded, the zeros stay."""
    model = tiny_family(model_type)
    ids = calibration(4, 16)
    before = logits(model, ids)
    with experts_unfused(model):
        assert torch.allclose(logits(model, ids), before, atol=1e-5)
    compress(model, "wanda-50", calibration(), device="cpu")
    weights = expert_weights(model)
    assert len(weights) == 2 * 4 * 3
    assert all(((w == 0).sum(1) == w.shape[1] // 2).all() for w in weights.values())
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(w, expert_weights(again)[key]) for key, w in weights.items())


def test_experts_with_an_activation_of_their_own_stay_fused():
    """An experts module whose act_fn takes gate and up itself computes something else: it is not unfused (and the
    untargeted-weights warning names it), rather than run wrongly."""
    from llm_sparsify.structure.experts import is_fused_experts

    class GatedActivation(torch.nn.Module):
        def forward(self, gate, up):
            return torch.nn.functional.silu(gate) * up

    fused = next(m for m in tiny_moe("mixtral").modules() if is_fused_experts(m))
    fused.act_fn = GatedActivation()
    assert not is_fused_experts(fused)


@pytest.mark.parametrize("kind", KINDS)
def test_expert_removal_streams_from_disk_to_the_checkpoint_compress_makes(kind, tmp_path, one_thread):
    """Expert removal is a score pass and a cut on read, like depth and width: prune_checkpoint streams it (the
    skeleton loses the experts, each layer's tensors as they are read) and writes what compress writes."""
    from safetensors.torch import load_file

    def output_tensors(path):
        return {name: t for file in sorted(path.glob("*.safetensors")) for name, t in load_file(file).items()}

    recipe = {"experts": {"remove": 1}, "pruning": {"method": "wanda", "sparsity": 0.5}}
    tiny_moe(kind).save_pretrained(tmp_path / "dense")
    record = prune_checkpoint(str(tmp_path / "dense"), recipe, tmp_path / "streamed", calibration(8), device="cpu",
                              dtype=torch.float32, batch_size=4)
    assert "resumed_after_layers" in record  # it streamed
    model = tiny_moe(kind)
    compress(model, recipe, calibration(8), device="cpu", batch_size=4, output=tmp_path / "memory")
    streamed, memory = output_tensors(tmp_path / "streamed"), output_tensors(tmp_path / "memory")
    assert streamed.keys() == memory.keys()
    for name, tensor in memory.items():
        assert torch.equal(streamed[name], tensor), name
    saved = json.loads((tmp_path / "memory" / "llm_sparsify.json").read_text())["stages"]["experts"]
    assert record["stages"]["experts"]["kept"] == saved["kept"] and len(saved["kept"][0]) == 3
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.float32)
    assert expert_count_of(reloaded) == 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded(calibration(2)).logits, model(calibration(2)).logits)
