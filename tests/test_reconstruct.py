"""Block-wise reconstruction (reconstruct.py): masks and grids exact, every layer's output error lowered, the same
checkpoint streamed, in memory and resumed."""

from __future__ import annotations

import copy

import pytest
import torch

from llm_sparsify import prune_checkpoint
from llm_sparsify.models import decoder_layers
from llm_sparsify.quantize.grid import round_to_grid
from llm_sparsify.recipe import RecipeError, Reconstruction, load_recipe
from llm_sparsify.reconstruct import reconstruct_layer, relative_error, sample_batches
from llm_sparsify.stream import StreamedLayers
from llm_sparsify.targets import layer_linears
from llm_sparsify.transform_pass import fitted_batches, prune_model
from tests.conftest import tiny_model
from tests.test_stream import output_tensors, save_sharded

FIT = {"steps": 12, "lr": 0.1, "batch_size": 2}  # × the RMS of the tiny kept weights (≈ 0.03): 3e-3


def recipe(pruning: dict, reconstruction: dict | None = FIT, **sections) -> object:
    return load_recipe({"pruning": pruning, **({"reconstruction": reconstruction} if reconstruction else {}),
                        **sections})


def zeros(model) -> dict[str, torch.Tensor]:
    return {name: module.weight == 0 for layer in layer_linears(model) for name, module in layer.items()}


@pytest.mark.parametrize("pruning", [{"method": "wanda", "sparsity": 0.5}, {"method": "sparsegpt", "sparsity": "2:4"},
                                     {"method": "magnitude", "sparsity": 0.75}])
def test_masks_stay_exact_and_every_layer_fits_better(model, calibration, pruning, one_thread):
    pruned = copy.deepcopy(model)
    prune_model(pruned, recipe(pruning, None), calibration, batch_size=2)
    reports = prune_model(model, recipe(pruning), calibration, batch_size=2)
    first = [name for name in zeros(model) if ".layers.0." in name]  # same inputs, so the same masks
    assert all(torch.equal(zeros(model)[name], zeros(pruned)[name]) for name in first)
    for name, removed in zeros(model).items():
        if pruning["sparsity"] == "2:4":
            assert (removed.reshape(removed.shape[0], -1, 4).sum(2) == 2).all(), name
        elif pruning["method"] == "magnitude":  # ranked over the whole matrix
            assert removed.sum() == int(removed.numel() * pruning["sparsity"]), name
        else:
            assert (removed.sum(1) == int(removed.shape[1] * pruning["sparsity"])).all(), name
    for report in reports:
        before, after = report.reconstruction
        assert after < before
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, pruned.model.layers[0].mlp.down_proj.weight)


def test_the_first_layer_fits_the_same_targets_either_way(calibration, one_thread):
    """Layer 0's inputs are the same in the dense and the pruned stream, so both target choices fit it alike; later
    layers differ."""
    reports = {}
    for targets in ("dense", "pruned"):
        model = tiny_model()
        reports[targets] = prune_model(model, recipe({"method": "wanda", "sparsity": 0.5}, FIT | {"targets": targets}),
                                       calibration, batch_size=2)
    assert reports["dense"][0].reconstruction == reports["pruned"][0].reconstruction
    assert reports["dense"][2].reconstruction != reports["pruned"][2].reconstruction


def layer_inputs(model, layer, calibration) -> tuple[list[torch.Tensor], list[dict]]:
    """The hidden states and keywords `layer` receives in the model's forward of the calibration tokens."""
    hidden, kwargs = [], []

    def record(module, args, kw) -> None:
        hidden.append(args[0])
        kwargs.append(kw)

    handle = layer.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        model(calibration, use_cache=False)
    handle.remove()
    return hidden, kwargs


def output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def test_the_fit_equals_adam_on_the_whole_masked_weights(calibration, one_thread):
    """reconstruct_layer keeps Adam states for the kept weights alone; the obvious reference keeps them for every
    weight, masked (the removed ones get zero gradients, so zero states and zero steps), each module at lr times the
    RMS of its kept weights: the same fit."""
    model = tiny_model()
    layer = decoder_layers(model)[0]
    hidden, kwargs = layer_inputs(model, layer, calibration)
    modules = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    for module in modules:
        module.weight.data[torch.rand_like(module.weight) < 0.5] = 0
    with torch.no_grad():
        targets = [output(layer(h, **kw)) * 1.1 for h, kw in zip(hidden, kwargs, strict=True)]  # a fit to make
    reference = copy.deepcopy(layer)
    reconstruct_layer(layer, modules, hidden, kwargs, targets, torch.device("cpu"), 5, 1e-3, batch_size=len(hidden[0]))

    params = [m for m in reference.modules() if isinstance(m, torch.nn.Linear)]
    kept = [m.weight != 0 for m in params]
    latent = [m.weight.detach().clone().requires_grad_() for m in params]
    rms = [w.detach()[k].pow(2).mean().sqrt().item() for w, k in zip(latent, kept, strict=True)]
    optimizer = torch.optim.Adam([{"params": [w], "lr": 1e-3 * r} for w, r in zip(latent, rms, strict=True)])
    for _ in range(5):
        for m, w, k in zip(params, latent, kept, strict=True):
            del m.weight
            m.weight = w * k  # a plain tensor that autograd follows back to the latent weight
        out = output(reference(hidden[0], **kwargs[0]))
        loss = (out - targets[0]).pow(2).sum() / targets[0].pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for module, w, k in zip(modules, latent, kept, strict=True):
        assert torch.equal(module.weight == 0, ~k | (w == 0))
        assert torch.allclose(module.weight, (w * k).detach(), atol=1e-6)


def test_a_fitted_layer_matches_its_targets_better_than_the_pruned_one(calibration, one_thread):
    """reconstruct_layer on its own: its first loss is the pruned layer's error, written out below; fitting lowers it
    and the removed weights stay zero."""
    model = tiny_model()
    layer, dense = decoder_layers(model)[0], copy.deepcopy(decoder_layers(model)[0])
    modules = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    for module in modules.values():
        module.weight.data[:, ::2] = 0
    hidden, kwargs = layer_inputs(model, layer, calibration)

    def outputs(module: torch.nn.Module) -> list[torch.Tensor]:
        with torch.no_grad():
            outs = [module(h, **kw) for h, kw in zip(hidden, kwargs, strict=True)]
        return [o[0] if isinstance(o, tuple) else o for o in outs]

    targets = outputs(dense)

    def error() -> float:  # the mean over batches of ‖f(x) − y‖² / ‖y‖², written out
        pairs = zip(outputs(layer), targets, strict=True)
        return sum(((o - y).pow(2).sum() / y.pow(2).sum()).item() for o, y in pairs) / len(targets)

    pruned_error = error()
    assert relative_error(outputs(layer), targets) == pytest.approx(pruned_error)
    losses = reconstruct_layer(layer, list(modules.values()), hidden, kwargs, targets, torch.device("cpu"), 20, 0.1,
                               batch_size=6)
    assert losses[0] == pytest.approx(pruned_error)  # one batch of all six samples: the first loss is the error
    assert error() < pruned_error and losses[-1] < losses[0]
    assert all(bool((module.weight[:, ::2] == 0).all()) for module in modules.values())


def test_each_step_takes_samples_not_yet_seen():
    inputs = [torch.zeros(4, 3, 2), torch.zeros(4, 3, 2), torch.zeros(1, 3, 2)]
    batches = sample_batches(inputs, 2)
    seen = [(b, row) for b, rows in batches for row in range(*rows.indices(len(inputs[b])))]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 9  # every sample once
    assert [b for b, _ in batches[:3]] == [0, 1, 2]  # from each input batch in turn


@pytest.mark.parametrize(("steps", "batch_size", "expected"), [(1, 1, 1), (2, 2, 1), (5, 1, 2), (4, 2, 2), (9, 1, 3),
                                                                (50, 2, 3)])
def test_the_fit_keeps_the_dense_stream_for_the_batches_its_samples_fill(steps, batch_size, expected):
    hidden = [torch.zeros(4, 3, 2), torch.zeros(4, 3, 2), torch.zeros(1, 3, 2)]
    assert fitted_batches(hidden, Reconstruction(steps=steps, batch_size=batch_size)) == expected


def test_quantized_weights_stay_on_their_grids(calibration, one_thread):
    model = tiny_model()
    reports = prune_model(model, recipe({"method": "sparsegpt", "sparsity": 0.5},
                                        quantization={"method": "rtn", "bits": 4, "group_size": 32}),
                          calibration, batch_size=2)
    assert all(r.reconstruction[1] < r.reconstruction[0] for r in reports)
    for layer in layer_linears(model):
        for module in layer.values():
            grid = module.quantization_grid
            assert torch.equal(round_to_grid(module.weight, grid), module.weight)
            assert (module.weight == 0).sum() >= module.weight.numel() // 2  # sparsegpt: per block of columns


def test_streamed_equals_in_memory_and_resumes(tmp_path, calibration, monkeypatch, one_thread):
    """From disk to disk the same checkpoint as in memory; killed after two layers and run again, the same too (the
    dense stream rebuilt from the source checkpoint's layers)."""
    checkpoint = save_sharded(tiny_model(), tmp_path / "in")
    fitted = recipe({"method": "wanda", "sparsity": 0.5})
    prune_checkpoint(str(checkpoint), fitted, tmp_path / "out", calibration, device="cpu", dtype=torch.float32,
                     batch_size=2)
    model = tiny_model()
    prune_model(model, fitted, calibration, batch_size=2)
    streamed = output_tensors(tmp_path / "out")
    for name, tensor in model.state_dict().items():
        if name in streamed:
            assert torch.equal(streamed[name], tensor), name

    load = StreamedLayers.load

    def killed_at_layer_2(self, index, device, original=False):
        if index == 2:
            raise KeyboardInterrupt
        return load(self, index, device, original)

    monkeypatch.setattr(StreamedLayers, "load", killed_at_layer_2)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoint(str(checkpoint), fitted, tmp_path / "resumed", calibration, device="cpu",
                         dtype=torch.float32, batch_size=2)
    monkeypatch.setattr(StreamedLayers, "load", load)
    record = prune_checkpoint(str(checkpoint), fitted, tmp_path / "resumed", calibration, device="cpu",
                              dtype=torch.float32, batch_size=2)
    assert record["resumed_after_layers"] == 2
    resumed = output_tensors(tmp_path / "resumed")
    for name, tensor in streamed.items():
        assert torch.equal(resumed[name], tensor), name


@pytest.mark.parametrize(("section", "message"), [
    ({"steps": 0}, "reconstruction.steps must be a positive integer"),
    ({"lr": -1}, "reconstruction.lr must be a positive number"),
    ({"targets": "teacher"}, "reconstruction.targets must be one of dense, pruned"),
    ({"epochs": 2}, "unknown reconstruction key"),
])
def test_bad_settings_are_refused(section, message):
    with pytest.raises(RecipeError, match=message):
        recipe({"method": "wanda", "sparsity": 0.5}, section)


def test_reconstruction_needs_a_pruning_section():
    with pytest.raises(RecipeError, match="reconstruction applies to the pruned weights"):
        load_recipe({"depth": {"blocks": 1}, "reconstruction": {}})


def test_the_section_survives_the_record():
    fitted = recipe({"method": "ria", "sparsity": "2:4", "update": "lstsq"}, {"steps": 8, "targets": "pruned"})
    assert load_recipe(fitted.to_dict()) == fitted
    assert fitted.needs_calibration and fitted.streams


def test_a_fit_that_makes_a_layer_worse_is_undone_exactly(calibration, one_thread):
    """At an absurd learning rate every fit diverges; each layer is then restored to its pruned weights bit for bit
    (from the compact copy the fit keeps: mask and kept values)."""
    pruned, fitted = tiny_model(), tiny_model()
    pruning = {"method": "sparsegpt", "sparsity": 0.5}
    prune_model(pruned, recipe(pruning, None), calibration, batch_size=2)
    reports = prune_model(fitted, recipe(pruning, FIT | {"lr": 1e4}), calibration, batch_size=2)
    assert all(r.reconstruction[0] == r.reconstruction[1] for r in reports)  # every fit undone
    for a, b in zip(pruned.state_dict().values(), fitted.state_dict().values(), strict=True):
        assert torch.equal(a, b)
