"""Every check before the work, no silent substitutions, one line and exit 2 for bad input and for operational
failures (disk full, read-only output, damaged checkpoints, ...), and a rerun that finishes the steps after saving.

Each command runs on a tiny random Llama with the default model's tokenizer (tests/test_cli.py). "Before the work"
is checked by making any layer pruning an error (`no_pruning`) and by finding no output and no partial output."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess

import pytest
import torch

import llm_sparsify.pipeline
import llm_sparsify.transform_pass
from llm_sparsify import __version__, compress
from llm_sparsify.api import DeviceError, check_device, prune_checkpoint
from llm_sparsify.cli import main
from llm_sparsify.data import DataError, evaluation_ids
from llm_sparsify.errors import UserError
from llm_sparsify.evaluate import perplexity
from llm_sparsify.export.hf import RECORD, read_record
from llm_sparsify.recipe import RecipeError, load_recipe
from tests.conftest import tiny_model
from tests.test_cli import prune_args
from tests.test_hub import TOKEN, USER, hub  # noqa: F401 (the local Hub fixture)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("trust")


@pytest.fixture
def no_pruning(monkeypatch):
    """Make pruning any layer (or removing any block) a test failure: what is checked must be checked before."""
    def pruned(*args, **kwargs):
        raise AssertionError("the work started before the check")

    monkeypatch.setattr(llm_sparsify.transform_pass, "prune_modules", pruned)
    monkeypatch.setattr(llm_sparsify.pipeline, "remove_depth", pruned)


def error_line(err: str) -> str:
    """The one error line of a failed command: no traceback, exactly one `llm-sparsify: error:` line."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("llm-sparsify:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("llm-sparsify: error: ")
    return lines[0]


def nothing_written(folder, output) -> bool:
    return not output.exists() and not any(".partial" in p.name for p in folder.iterdir())


def write_recipe(folder, text: str):
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


def refused(args, capsys) -> str:
    """Run a command that must fail with exit 2 and one line; return that line."""
    capsys.readouterr()
    assert main(args) == 2
    return error_line(capsys.readouterr().err)


# --- item 3: every check before the work ---------------------------------------------------------------------------


@pytest.mark.parametrize(("section", "message"), [
    ("evaluate: {perplexity: [no-such-text.txt]}", "no-such-text.txt: no such file"),
    ("evaluate: {tasks: [piqa, no_such_task]}", "unknown task no_such_task"),
    ("export: {formats: [gguf], qtype: Q5_K}", "export.qtype must be one of F32, F16, BF16, Q8_0, Q4_0, got 'Q5_K'"),
    ("export: {formats: [compressed-tensors]}", "compressed-tensors stores integer weights, so it needs a "
                                                "`quantization:` section"),
], ids=["unknown-dataset", "unknown-task", "gguf-type", "compressed-tensors-unquantized"])
def test_a_bad_evaluate_or_export_section_fails_before_the_work(tmp_path, model_dir, calib, capsys, no_pruning,
                                                                 section, message):
    recipe = write_recipe(tmp_path, "pruning: {method: wanda, sparsity: 0.5}\n" + section + "\n")
    out = tmp_path / "out"
    assert message in refused(prune_args(model_dir, calib, out, recipe=recipe), capsys)
    assert nothing_written(tmp_path, out)


def test_the_recipe_checks_also_hold_in_the_api():
    with pytest.raises(RecipeError, match="export.qtype"):
        load_recipe({"pruning": {"method": "magnitude", "sparsity": 0.5}, "export": {"formats": ["gguf"],
                                                                                    "qtype": "Q5_K"}})
    assert load_recipe({"pruning": {"method": "magnitude", "sparsity": 0.5},
                        "export": {"formats": ["gguf"], "qtype": "q4_0"}}).export.qtype == "Q4_0"
    with pytest.raises(RecipeError, match="needs a `quantization:` section"):
        load_recipe({"pruning": {"method": "magnitude", "sparsity": 0.5}, "export": {"formats": "compressed-tensors"}})
    quantized = {"pruning": {"method": "magnitude", "sparsity": 0.5}, "quantization": {"method": "rtn"},
                 "export": {"formats": ["compressed-tensors"]}}
    assert load_recipe(quantized).export.formats == ("compressed-tensors",)


def test_an_existing_export_output_is_refused_before_the_work(tmp_path, model_dir, calib, capsys, no_pruning):
    recipe = write_recipe(tmp_path, "pruning: {method: wanda, sparsity: 0.5}\nexport: {formats: [compact]}\n")
    out = tmp_path / "out"
    (tmp_path / "out-compact").mkdir()
    (tmp_path / "out-compact" / "notes.txt").write_text("someone else's")
    assert "out-compact" in refused(prune_args(model_dir, calib, out, recipe=recipe), capsys)
    assert not out.exists() and (tmp_path / "out-compact" / "notes.txt").exists()


@pytest.mark.parametrize("token", ["none", "refused", "read-only"])
def test_push_to_hub_without_a_usable_token_fails_before_the_work(hub, tmp_path, model_dir, calib, capsys,  # noqa: F811
                                                                  monkeypatch, no_pruning, token):
    extra = []
    if token == "none":
        monkeypatch.delenv("HF_TOKEN")
        message = "no Hugging Face token"
    elif token == "refused":
        extra = ["--token", "hf_not_a_token"]
        message = "refused the token (401"
    else:
        hub.tokens["hf_read_token"] = "bob"
        hub.read_only.add("bob")
        extra = ["--token", "hf_read_token"]
        message = "the token of bob may only read"
    out = tmp_path / "out"
    assert message in refused(prune_args(model_dir, calib, out, "--push-to-hub", f"{USER}/tiny", *extra), capsys)
    assert nothing_written(tmp_path, out)
    assert hub.repos == {}


def test_push_to_hub_with_a_good_token_is_checked_once_and_pushed(hub, tmp_path, model_dir, calib):  # noqa: F811
    out = tmp_path / "out"
    assert main(prune_args(model_dir, calib, out, "--push-to-hub", f"{USER}/tiny")) == 0
    kinds = [kind for kind, _, _ in hub.requests]
    assert kinds[0] == "whoami-v2" and kinds.count("whoami-v2") == 1  # asked before the work, then pushed
    assert set(hub.files(f"{USER}/tiny")) >= {"README.md", RECORD, "config.json"}


@pytest.fixture(scope="module")
def sharded_dir(workdir, model_dir):
    """The tiny Llama saved in shards of at most 2 MB: the embeddings and lm_head each in a shard of their own."""
    from transformers import AutoModelForCausalLM

    path = workdir / "sharded"
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(path, max_shard_size="2MB")
    for item in model_dir.iterdir():
        if item.name.startswith("tokenizer") or item.name.endswith(".jinja"):
            shutil.copy(item, path / item.name)
    return path


def shard_of(checkpoint, tensor: str) -> str:
    return json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def damaged_copy(sharded_dir, tmp_path, tensor: str, damage: str):
    """A copy of the sharded checkpoint whose shard holding `tensor` is missing, truncated or corrupt, or whose
    index no longer names `tensor` ("unindexed")."""
    checkpoint = shutil.copytree(sharded_dir, tmp_path / "damaged")
    shard = checkpoint / shard_of(checkpoint, tensor)
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        os.truncate(shard, shard.stat().st_size - 1000)
    elif damage == "corrupt":
        with shard.open("r+b") as file:
            file.write(b"\xff" * 16)  # the header's length and its first bytes
    else:
        index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
        del index["weight_map"][tensor]
        (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    return checkpoint, shard


@pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.up_proj.weight"])
@pytest.mark.parametrize(("damage", "message"), [
    ("missing", "is missing: model.safetensors.index.json names it for"),
    ("truncated", "is not a readable safetensors file (truncated or corrupt?)"),
    ("corrupt", "is not a readable safetensors file (truncated or corrupt?)"),
    ("unindexed", "lacks 1 tensors the model needs"),
])
def test_a_damaged_checkpoint_fails_before_the_work(tmp_path, sharded_dir, calib, capsys, no_pruning, tensor, damage,
                                                    message):
    """magnitude: the recipe that would otherwise meet lm_head's shard only after pruning every layer."""
    checkpoint, shard = damaged_copy(sharded_dir, tmp_path, tensor, damage)
    out = tmp_path / "out"
    line = refused(prune_args(checkpoint, calib, out, recipe="magnitude-50"), capsys)
    assert message in line
    assert (tensor if damage == "unindexed" else shard.name) in line
    assert nothing_written(tmp_path, out)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_checkpoint_fails_before_the_work_in_memory_too(tmp_path, sharded_dir, calib, capsys, no_pruning,
                                                                  damage):
    """A recovery recipe loads the whole model (transformers reads every shard) before any work."""
    checkpoint, shard = damaged_copy(sharded_dir, tmp_path, "lm_head.weight", damage)
    out = tmp_path / "out"
    line = refused(prune_args(checkpoint, calib, out, recipe="wanda-70-recover"), capsys)
    assert f"could not load model {str(checkpoint)!r}" in line
    assert nothing_written(tmp_path, out)


def test_the_sharded_checkpoint_itself_prunes(tmp_path, sharded_dir, calib):
    """The undamaged original of the cases above runs, so what they refuse is the damage."""
    assert shard_of(sharded_dir, "lm_head.weight") != shard_of(sharded_dir, "model.embed_tokens.weight")
    assert main(prune_args(sharded_dir, calib, tmp_path / "out", recipe="magnitude-50")) == 0


@pytest.mark.parametrize("option", [["--nsamples", "0"], ["--seqlen", "0"], ["--seqlen", "-5"], ["--batch-size", "0"],
                                    ["--batch-size", "-1"], ["--ppl", "--ppl-windows", "0"]])
def test_zero_and_negative_counts_are_refused_before_the_work(tmp_path, model_dir, capsys, no_pruning, option):
    out = tmp_path / "out"
    line = refused(prune_args(model_dir, "c4", out, *option), capsys)
    assert f"{option[-2]} must be a positive integer, got {option[-1]}" in line
    assert nothing_written(tmp_path, out)


# --- item 3, second half: a step after saving fails; the rerun does it -----------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real small filesystem: a tmpfs of `size` MiB mounted at tmp_path/disk (root only), unmounted after.
    `small_disk.resize(mib)` grows it, `small_disk.read_only()` remounts it read-only."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); this check needs root")

    class Disk:
        path = mount

        @staticmethod
        def resize(mib: int) -> None:
            subprocess.run(["mount", "-o", f"remount,size={mib}m", str(mount)], check=True)

        @staticmethod
        def read_only() -> None:
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)

    yield Disk
    subprocess.run(["umount", str(mount)], check=True)


def test_a_failed_export_keeps_the_output_and_the_rerun_only_exports(small_disk, model_dir, calib, capsys, caplog):
    """The pruned output (16 MB) fits the 24 MB disk, its compact export does not: disk full after saving. The
    output stays complete with its card; once there is room the same command exports, and neither prunes nor
    evaluates again."""
    small_disk.resize(24)
    recipe = write_recipe(small_disk.path, "pruning: {method: wanda, sparsity: 0.5}\nexport: {formats: [compact]}\n")
    out = small_disk.path / "out"
    args = prune_args(model_dir, calib, out, "--ppl", "--ppl-windows", "1", recipe=recipe)
    capsys.readouterr()
    assert main(args) == 2
    captured = capsys.readouterr()
    line = error_line(captured.err)
    assert "No space left on device" in line
    assert f"the pruned model in {out} is complete, and the same command does the remaining steps" in line
    assert "WikiText-2 perplexity" in captured.out  # evaluated before the export failed
    assert (out / "README.md").exists() and "## Evaluation" in (out / "README.md").read_text()
    assert not (small_disk.path / "out-compact").exists()
    record, weights = (out / RECORD).read_text(), {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}

    small_disk.resize(64)
    with caplog.at_level(logging.INFO, logger="llm_sparsify"):
        assert main(args) == 0
    captured = capsys.readouterr()
    assert "already holds this command's pruned model" in caplog.text
    assert "already holds this command's evaluation" in caplog.text
    assert "WikiText-2 perplexity" not in captured.out  # not evaluated again
    assert "exported" in captured.out and (small_disk.path / "out-compact" / "llm_sparsify.json").exists()
    assert (out / RECORD).read_text() == record  # not pruned again
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == weights

    assert main(args) == 0  # everything done: nothing to do, no "already exists"
    assert not any(".partial" in p.name for p in small_disk.path.iterdir())


def test_a_rerun_with_other_settings_is_still_refused(tmp_path, model_dir, calib, capsys):
    out = tmp_path / "out"
    assert main(prune_args(model_dir, calib, out)) == 0
    record = (out / RECORD).read_text()
    for other in (["--seed", "3"], ["--dtype", "bfloat16"]):
        assert "already exists" in refused(prune_args(model_dir, calib, out, *other), capsys)
    assert "already exists" in refused(prune_args(model_dir, calib, out, recipe="wanda-50"), capsys)
    assert (out / RECORD).read_text() == record


def test_an_interrupted_step_after_saving_says_the_output_is_complete(tmp_path, model_dir, calib, capsys,
                                                                      monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("llm_sparsify.finish.write_model_card", interrupted)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(prune_args(model_dir, calib, out)) == 130
    assert capsys.readouterr().err.strip() == (f"llm-sparsify: interrupted; the pruned model in {out} is complete, "
                                               "and the same command does the remaining steps")
    assert read_record(out)["recipe_name"] == "wanda-2of4"


# --- item 4: no silent substitutions ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_text(workdir):
    path = workdir / "eval.txt"
    path.write_text(" ".join(f"word{i % 23}" for i in range(300)))
    return path


@pytest.mark.parametrize("option", [["--max-windows", "0"], ["--max-windows", "-2"], ["--seqlen", "0"],
                                    ["--batch-size", "0"], ["--limit", "0"]])
def test_eval_refuses_zero_and_negative_counts(model_dir, eval_text, capsys, monkeypatch, option):
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the check")

    monkeypatch.setattr("llm_sparsify.finish.load_model", load)
    line = refused(["eval", str(model_dir), "--dataset", str(eval_text), "--device", "cpu", "-q", *option], capsys)
    assert f"{option[0]} must be a positive integer, got {option[1]}" in line


def test_all_windows_has_its_own_spelling(model_dir, eval_text, capsys):
    from transformers import AutoTokenizer

    runs = {}
    for windows in ("all", "2"):
        assert main(["eval", str(model_dir), "--dataset", str(eval_text), "--seqlen", "16", "--max-windows", windows,
                     "--json", "--device", "cpu", "-q"]) == 0
        [runs[windows]] = json.loads(capsys.readouterr().out)
    tokens = evaluation_ids(eval_text, AutoTokenizer.from_pretrained(model_dir)).numel()
    assert runs["all"]["windows"] == tokens // 16 > 2 and runs["2"]["windows"] == 2
    assert runs["all"]["perplexity"] != runs["2"]["perplexity"]
    with pytest.raises(SystemExit) as exit_info:  # neither a number nor "all": a usage error
        main(["eval", "--max-windows", "every"])
    assert exit_info.value.code == 2


def test_perplexity_refuses_zero_windows_in_the_api():
    model = tiny_model()
    ids = torch.randint(0, 128, (1, 64))
    with pytest.raises(DataError, match="max_windows must be a positive integer, got 0"):
        perplexity(model, ids, seqlen=16, max_windows=0)
    assert perplexity(model, ids, seqlen=16, max_windows=None) > 1


def test_windows_beyond_the_model_context_are_warned_about(calibration, caplog, one_thread):
    """The tiny model knows 256 positions."""
    long_ids = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="llm_sparsify"):
        compress(tiny_model(), "wanda-50", calibration, device="cpu")
        assert "longer than the model's context" not in caplog.text
        compress(tiny_model(), "wanda-50", long_ids, device="cpu")
    assert "windows of 300 tokens are longer than the model's context of 256 tokens" in caplog.text
    with caplog.at_level(logging.WARNING, logger="llm_sparsify"):
        perplexity(tiny_model(), long_ids[:1], seqlen=300)
    assert caplog.text.count("longer than the model's context") == 2


def test_token_ids_that_override_nsamples_and_seqlen_say_so(tmp_path, model_dir, calib, caplog):
    with caplog.at_level(logging.WARNING, logger="llm_sparsify"):
        assert main(prune_args(model_dir, calib, tmp_path / "same", "--nsamples", "4", "--seqlen", "16")) == 0
        assert "used as they are" not in caplog.text  # the shape asked for is the tensor's
        assert main(prune_args(model_dir, calib, tmp_path / "other", "--nsamples", "8", "--seqlen", "32")) == 0
    assert f"the calibration token ids {calib} are 4 x 16 and are used as they are: nsamples 8 and seqlen 32 do " \
           "not apply" in caplog.text
    assert read_record(tmp_path / "other")["calibration"]["nsamples"] == 4


@pytest.mark.parametrize("pruning", [
    'pruning: {method: wanda, sparsity: 0.5, ignore: ["*"]}',
    'pruning: {method: magnitude, sparsity: 0.5, targets: ["*.q_proj"], ignore: ["*.self_attn.*"]}',
    'depth: {blocks: 1}\npruning: {method: wanda, sparsity: 0.5, ignore: ["*"]}',
])
def test_a_recipe_that_leaves_nothing_to_prune_is_refused(tmp_path, model_dir, calib, capsys, no_pruning, pruning):
    recipe = write_recipe(tmp_path, pruning + "\n")
    out = tmp_path / "out"
    assert "leave no Linear to prune" in refused(prune_args(model_dir, calib, out, recipe=recipe), capsys)
    assert nothing_written(tmp_path, out)


@pytest.mark.parametrize(("width", "message"), [
    ("{unit: heads, amount: 0.2}", "width amount 0.2 removes none of the 2 KV groups of layer 0 (round(0.2 × 2) = 0)"),
    ("{unit: mlp, amount: 0.007}", "width amount 0.007 removes none of the 64 MLP channels of layer 0"),
    ("{unit: mlp, amount: 0.003, scope: global}", "width amount 0.003 removes none of the 128 MLP channels of the "
                                                  "model"),
])
def test_a_width_amount_that_removes_nothing_is_refused_before_the_depth_stage(tmp_path, model_dir, calib, capsys,
                                                                               no_pruning, width, message):
    recipe = write_recipe(tmp_path, f"depth: {{blocks: 1}}\nwidth: {width}\n")
    out = tmp_path / "out"
    assert message in refused(prune_args(model_dir, calib, out, recipe=recipe), capsys)
    assert nothing_written(tmp_path, out)


@pytest.mark.parametrize(("recipe", "hint"), [
    ("wanda-2of4", "; the same command continues from the last finished layer"),  # streamed: resumes
    ("depth-cosine-4", "; the same command continues from the last finished layer"),  # streams too
    ("wanda-70-recover", ""),  # in memory: nothing to resume, so no promise
])
def test_the_interrupt_hint_promises_a_resume_only_where_one_exists(tmp_path, model_dir, calib, capsys, monkeypatch,
                                                                    recipe, hint):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("llm_sparsify.cli.prune_checkpoint", interrupted)
    capsys.readouterr()
    assert main(prune_args(model_dir, calib, tmp_path / "out", recipe=recipe)) == 130
    assert capsys.readouterr().err.strip() == f"llm-sparsify: interrupted{hint}"


# --- item 5: one line, exit 2, for operational failures -------------------------------------------------------------


def test_disk_full_is_one_line_and_the_same_command_continues(small_disk, model_dir, calib, capsys, caplog):
    """8 MB: the decoder layers fit, the embeddings and lm_head (6 MB each) do not."""
    out = small_disk.path / "out"
    args = prune_args(model_dir, calib, out)
    capsys.readouterr()
    assert main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "the same command continues from the last finished layer" in line
    assert not out.exists()

    small_disk.resize(64)
    with caplog.at_level(logging.INFO, logger="llm_sparsify"):
        assert main(args) == 0
    assert f"resuming {out} after 2 finished layers" in caplog.text
    assert read_record(out)["resumed_after_layers"] == 2


def test_a_read_only_output_is_refused_before_the_work(small_disk, model_dir, calib, capsys, no_pruning):
    small_disk.read_only()
    out = small_disk.path / "sub" / "out"
    line = refused(prune_args(model_dir, calib, out), capsys)
    assert line == f"llm-sparsify: error: Read-only file system: {small_disk.path}"
    with pytest.raises(OSError) as raised:
        prune_checkpoint(str(model_dir), "wanda-2of4", out, calib, device="cpu")
    assert raised.value.errno == errno.EROFS


CUDA = ("device 'cuda': this torch" if not torch.backends.cuda.is_built()  # e.g. this CPU-only torch
        else "device 'cuda': no such device" if not torch.cuda.is_available() else None)  # None: cuda is usable


@pytest.mark.parametrize(("device", "message"), [
    ("gpu", "'gpu' is not a device; give one like cpu, cuda or cuda:1"),
    ("cuda:x", "'cuda:x' is not a device"),
    ("cuda:99", "device 'cuda:99': "),
    ("cuda", CUDA),
])
def test_an_unusable_device_is_one_line(tmp_path, model_dir, calib, capsys, no_pruning, device, message):
    if message is None:  # a machine with CUDA: then `cuda` is no bad input
        assert check_device(device) == device
        return
    out = tmp_path / "out"
    args = prune_args(model_dir, calib, out)
    args[args.index("--device") + 1] = device
    assert message in refused(args, capsys)
    assert nothing_written(tmp_path, out)
    assert message in refused(["eval", str(model_dir), "--device", device, "-q"], capsys)
    with pytest.raises(DeviceError):
        compress(tiny_model(), "magnitude-50", device=device)


@pytest.mark.parametrize(("content", "message"), [
    (torch.empty(0, 16, dtype=torch.long), "is empty (shape [0, 16]): no calibration tokens"),
    (torch.rand(4, 16), "calibration ids must be a LongTensor [nsamples, seqlen], not float32 of shape [4, 16]"),
    ([[1, 2, 3]], "holds a list, not a LongTensor of token ids"),
    (b"not a tensor at all", "not a saved tensor of token ids"),
], ids=["empty", "float", "list", "garbage"])
def test_an_unusable_pt_file_is_one_line(tmp_path, model_dir, capsys, no_pruning, content, message):
    path = tmp_path / "calib.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    out = tmp_path / "out"
    assert message in refused(prune_args(model_dir, path, out), capsys)
    assert nothing_written(tmp_path, out)


def test_a_text_file_that_is_not_utf8_is_one_line(tmp_path, model_dir, capsys, no_pruning):
    text = tmp_path / "calib.txt"
    text.write_bytes("caf\xe9 au lait ".encode("latin-1") * 200)
    out = tmp_path / "out"
    line = refused(prune_args(model_dir, text, out), capsys)
    assert f"{text}: not UTF-8 text (invalid continuation byte at byte 3)" in line
    assert nothing_written(tmp_path, out)


@pytest.mark.parametrize(("calibration", "message"), [
    (torch.empty(0, 8, dtype=torch.long), "the calibration tensor is empty"),
    (torch.empty(3, 0, dtype=torch.long), "the calibration tensor is empty"),
    ([[1, 2, 3, 4]], "calibration must be token ids as a LongTensor [nsamples, seqlen], a data source name or a "
                     "file path, not a list"),
    (torch.ones(2, 8, dtype=torch.int32), "not int32 of shape [2, 8]"),
])
def test_bad_calibration_in_the_api_is_a_typed_error(calibration, message):
    with pytest.raises(DataError) as raised:
        compress(tiny_model(), "wanda-50", calibration, device="cpu")
    assert message in str(raised.value) and isinstance(raised.value, UserError)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"nsamples": 0}, "nsamples must be a positive integer, got 0"),
    ({"seqlen": -1}, "seqlen must be a positive integer, got -1"),
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
])
def test_zero_counts_in_the_api_are_typed_errors(tmp_path, model_dir, kwargs, message, no_pruning):
    with pytest.raises(DataError, match=message):
        prune_checkpoint(str(model_dir), "wanda-50", tmp_path / "out", "c4", device="cpu", **kwargs)
    with pytest.raises(DataError, match=message):
        compress(tiny_model(), "wanda-50", device="cpu", **kwargs)
    assert nothing_written(tmp_path, tmp_path / "out")


def test_every_user_error_class_is_one_user_error():
    from llm_sparsify.export import ExportError
    from llm_sparsify.export.card import CardError
    from llm_sparsify.export.hub import PushError
    from llm_sparsify.files import OutputExistsError
    from llm_sparsify.models import ModelError
    from llm_sparsify.recover import RecoveryError
    from llm_sparsify.structure.depth import DepthError
    from llm_sparsify.structure.width import WidthError

    for kind in (RecipeError, DataError, ModelError, OutputExistsError, ExportError, PushError, CardError, DepthError,
                 WidthError, RecoveryError, DeviceError):
        assert issubclass(kind, UserError), kind
    assert issubclass(OutputExistsError, FileExistsError) and issubclass(DataError, ValueError)  # old bases kept


def test_quiet_hides_the_progress_bars(tmp_path, model_dir, calib, capsys):
    assert main(prune_args(model_dir, calib, tmp_path / "loud")[:-1]) == 0  # without -q
    err = capsys.readouterr().err
    assert "wanda 2:4: 100%|" in err and "2/2" in err  # the engine's bar, one tick per layer
    assert main(prune_args(model_dir, calib, tmp_path / "quiet")) == 0
    err = capsys.readouterr().err
    assert "layer/s" not in err and "s/layer" not in err and "it/s" not in err and "%|" not in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"llm-sparsify {__version__}"
