"""Zero-shot tasks through lm-eval: the local task configs, the bridge to the in-memory model, the table, the CLI."""

from __future__ import annotations

import gzip
import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import llm_sparsify.models
from llm_sparsify.cli import main
from llm_sparsify.data import DataError
from llm_sparsify.zero_shot import (
    DATA_ENV,
    _shared_context_lm,
    check_tasks,
    evaluate_tasks,
    known_tasks,
    load_tasks,
    markdown_table,
    task_data_dir,
    task_data_files,
)
from tests.conftest import TINY

SHARED_DATA = Path("/work/shared/data")


def _raw_docs(path: Path, n: int) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, n)]


def _winogrande(d: dict) -> tuple[list[tuple[str, str]], int]:
    blank = d["sentence"].index("_")
    rest = " " + d["sentence"][blank + 1 :].strip()
    return [(d["sentence"][:blank] + option, rest) for option in (d["option1"], d["option2"])], int(d["answer"]) - 1


def _lambada(d: dict) -> tuple[list[tuple[str, str]], None]:
    context, last_word = d["text"].rsplit(" ", 1)
    return [(context, " " + last_word)], None


def _choices(context: str, choices: list[str], gold: int) -> tuple[list[tuple[str, str]], int]:
    return [(context, " " + choice) for choice in choices], gold


# task: (items, raw record -> ([(context, continuation) per choice], gold)), from /work/shared/data/README.md's table
EXPECTED = {
    "piqa": (1838, lambda d: _choices(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"])),
    "hellaswag": (10042, lambda d: _choices(d["query"], d["choices"], d["gold"])),
    "arc_easy": (2376, lambda d: _choices(f"{d['query']}\nAnswer:", d["choices"], d["gold"])),
    "arc_challenge": (1172, lambda d: _choices(f"{d['query']}\nAnswer:", d["choices"], d["gold"])),
    "boolq": (3270, lambda d: _choices(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"],
                                       d["label"])),
    "winogrande": (1267, _winogrande),
    "lambada_openai": (5153, _lambada),
    "rte": (277, lambda d: _choices(f"{d['sentence1']}\nQuestion: {d['sentence2']} True or False?\nAnswer:",
                                    ["True", "False"], d["label"])),
    "openbookqa": (500, lambda d: _choices(d["question_stem"], d["choices"]["text"],
                                           d["choices"]["label"].index(d["answerKey"].lstrip()))),
}

# lm-eval's own metrics for these tasks
METRICS = {task: {"acc", "acc_norm"} for task in ("piqa", "hellaswag", "arc_easy", "arc_challenge", "openbookqa")}
METRICS |= {"boolq": {"acc"}, "winogrande": {"acc"}, "rte": {"acc"}, "lambada_openai": {"perplexity", "acc"}}


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """$LLM_SPARSIFY_TASK_DATA, else the shared data directory (which holds tasks/)."""
    path = Path(os.environ.get(DATA_ENV) or SHARED_DATA)
    if not path.is_dir() or (path == SHARED_DATA and not (path / "tasks").is_dir()):
        pytest.skip(f"task data directory missing: set {DATA_ENV} to local copies of the task files ({path} absent)")
    return path


@pytest.fixture(scope="module")
def tiny_with_tokenizer():
    """A tiny random Llama over the real default tokenizer's vocabulary: lm-eval runs it in moments."""
    tokenizer = AutoTokenizer.from_pretrained(llm_sparsify.models.default_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "vocab_size": len(tokenizer), "max_position_embeddings": 2048})
    return LlamaForCausalLM(config).eval(), tokenizer


# --- task configs ---------------------------------------------------------------------------------------------


def test_every_task_has_a_config_and_an_expectation():
    assert known_tasks() == sorted(EXPECTED) == sorted(METRICS)


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_config_loads_with_the_documented_items_and_prompts(task, data_dir):
    items, expected = EXPECTED[task]
    loaded = load_tasks([task], data_dir)
    assert list(loaded) == [task]
    lm_task = loaded[task]
    assert len(lm_task.eval_docs) == items
    assert set(lm_task.aggregation()) == METRICS[task]

    lm_task.build_all_requests(limit=3, rank=0, world_size=1)
    requests: dict[int, list] = {}
    for instance in lm_task.instances:
        requests.setdefault(instance.doc_id, []).append(instance)
    assert sorted(requests) == [0, 1, 2]
    [path] = [task_data_dir(data_dir) / name for name in task_data_files(task)]
    for doc_id, raw in enumerate(_raw_docs(path, 3)):
        pairs, gold = expected(raw)
        instances = sorted(requests[doc_id], key=lambda instance: instance.idx)
        assert [instance.arguments for instance in instances] == pairs
        assert all(instance.request_type == "loglikelihood" for instance in instances)
        if gold is not None:
            doc = instances[0].doc
            assert (lm_task.doc_to_text(doc) if lm_task.multiple_input else lm_task.doc_to_target(doc)) == gold


def test_data_dir_is_the_tasks_folder_or_its_parent(data_dir, monkeypatch):
    root = task_data_dir(data_dir)
    assert (root / "piqa").is_dir()
    assert task_data_dir(root) == root
    monkeypatch.setenv(DATA_ENV, str(root))
    assert task_data_dir(None) == root


# --- bad input ----------------------------------------------------------------------------------------------


def test_unknown_task_lists_the_known_ones(tmp_path):
    with pytest.raises(DataError, match="unknown task mmlu") as error:
        check_tasks(["piqa", "mmlu"], tmp_path)
    assert all(task in str(error.value) for task in known_tasks())


def test_missing_data_file_names_the_file_and_the_layout(tmp_path):
    (tmp_path / "piqa").mkdir()
    with pytest.raises(DataError) as error:
        load_tasks(["piqa"], tmp_path)
    message = str(error.value)
    assert str(tmp_path / "piqa" / "piqa_validation.jsonl") in message
    assert "DIR/piqa/piqa_validation.jsonl" in message and "--data-dir" in message


def test_missing_data_directory(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such directory"):
        check_tasks(["piqa"], tmp_path / "nowhere")
    with pytest.raises(DataError, match="no task given; known tasks: arc_challenge"):
        check_tasks([], tmp_path)


def test_without_data_a_hub_failure_says_how_to_give_local_data(monkeypatch):
    class OfflineTaskManager:
        def __init__(self, **kwargs):
            pass

        def load(self, tasks):
            raise ConnectionError("huggingface.co\nunreachable")

    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setattr("lm_eval.tasks.TaskManager", OfflineTaskManager)
    with pytest.raises(DataError) as error:
        load_tasks(["piqa"])
    message = str(error.value)
    assert "Hugging Face Hub" in message and "huggingface.co unreachable" in message
    assert "--data-dir" in message and DATA_ENV in message


# --- the bridge against a slow, obvious reference -----------------------------------------------------------------


@torch.no_grad()
def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context): the whole text's tokens after the context's, one sequence, no padding."""
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    ids = tokenizer(context + continuation, add_special_tokens=False).input_ids
    logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))


def test_piqa_accuracy_equals_a_reference_from_choice_loglikelihoods(tiny_with_tokenizer, data_dir):
    model, tokenizer = tiny_with_tokenizer
    n = 40
    rng_before = torch.get_rng_state()
    result = evaluate_tasks(model, tokenizer, ["piqa"], limit=n, data_dir=data_dir, batch_size=4)
    assert torch.equal(torch.get_rng_state(), rng_before)  # lm-eval did not reseed torch

    hits, hits_norm = 0, 0
    for doc in _raw_docs(task_data_dir(data_dir) / "piqa" / "piqa_validation.jsonl", n):
        context, choices = f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]]
        lls = [reference_loglikelihood(model, tokenizer, context, " " + choice) for choice in choices]
        per_char = [ll / len(choice) for ll, choice in zip(lls, choices, strict=True)]
        hits += max(range(2), key=lambda i: lls[i]) == doc["label"]
        hits_norm += max(range(2), key=lambda i: per_char[i]) == doc["label"]
    piqa = result["piqa"]
    assert piqa["samples"] == n
    assert piqa["acc"] == pytest.approx(hits / n, abs=1e-9)
    assert piqa["acc_norm"] == pytest.approx(hits_norm / n, abs=1e-9)
    assert 0 < piqa["acc_stderr"] < 1


@torch.no_grad()
def test_shared_context_scoring_equals_hflm_on_token_requests(tiny_with_tokenizer):
    """Contexts shared by 1-9 continuations (more than a batch), one-token contexts and continuations, rows of
    different lengths in one batch, and a request past max_length (HFLM's left truncation): the same
    log-likelihoods and greedy flags as lm-eval's own HFLM."""
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny_with_tokenizer
    generator = torch.Generator().manual_seed(1)

    def tokens(n):
        return torch.randint(0, len(tokenizer), (n,), generator=generator).tolist()

    requests = []
    for choices, context_length in [(4, 30), (2, 7), (1, 1), (9, 12), (3, 1), (2, 45), (5, 3)]:
        context = tokens(context_length)
        requests += [(("c", "x"), context, tokens(1 + (3 * k) % 11)) for k in range(choices)]
    requests.append((("c", "x"), tokens(60), tokens(8)))  # 68 tokens: past max_length 64
    shared = _shared_context_lm(model, tokenizer, 4)
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=64)
    shared._max_length = 64
    got = shared._loglikelihood_tokens(requests, disable_tqdm=True)
    want = reference._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in want]
    assert torch.allclose(torch.tensor([ll for ll, _ in got]), torch.tensor([ll for ll, _ in want]), atol=1e-4)
    head = model.lm_head.weight.clone()
    model.lm_head.weight.zero_()  # every logit 0: each token's log-probability is -log(vocab)
    try:
        flat = shared._loglikelihood_tokens(requests, disable_tqdm=True)
    finally:
        model.lm_head.weight.copy_(head)
    for (_, _, continuation), (ll, _) in zip(requests, flat, strict=True):
        assert ll == pytest.approx(-len(continuation) * torch.tensor(float(model.config.vocab_size)).log().item())


def test_attention_without_custom_masks_gets_hflm_as_it_is(tiny_with_tokenizer):
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny_with_tokenizer
    assert type(_shared_context_lm(model, tokenizer, 4)) is not HFLM  # sdpa takes the block mask
    model.config._attn_implementation = "flash_attention_2"
    try:
        assert type(_shared_context_lm(model, tokenizer, 4)) is HFLM
    finally:
        model.config._attn_implementation = "sdpa"


# --- the table --------------------------------------------------------------------------------------------------


def test_markdown_table_puts_models_side_by_side():
    results = {
        "dense": {"wikitext2": {"perplexity": 29.935}, "piqa": {"acc": 0.7, "acc_stderr": 0.05, "samples": 200}},
        "wanda-2of4": {"wikitext2": {"perplexity": 201.68}, "piqa": {"acc": 0.6, "acc_stderr": 0.04, "samples": 200},
                       "boolq": {"acc": 0.55, "samples": 200}},
    }
    lines = markdown_table(results, ["dense", "wanda-2of4"]).splitlines()
    assert lines[0] == "| task | metric | dense | wanda-2of4 |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2:] == [
        "| wikitext2 | perplexity | 29.9350 | 201.6800 |",
        "| piqa | acc | 0.7000 ± 0.0500 | 0.6000 ± 0.0400 |",
        "| piqa | samples | 200 | 200 |",
        "| boolq | acc | – | 0.5500 |",
        "| boolq | samples | – | 200 |",
    ]
    swapped = markdown_table(results, ["wanda-2of4", "dense"]).splitlines()
    assert swapped[2] == "| wikitext2 | perplexity | 201.6800 | 29.9350 |"


# --- the command line -------------------------------------------------------------------------------------------


def test_cli_eval_with_a_task_writes_json_and_the_table(tmp_path, data_dir, capsys):
    model = str(llm_sparsify.models.default_model_path())
    out = tmp_path / "results.json"
    args = ["eval", model, "--tasks", "piqa", "--limit", "5", "--data-dir", str(data_dir), "--seqlen", "64",
            "--max-windows", "2", "--json", str(out), "--device", "cpu", "-q"]
    assert main(args) == 0
    [record] = json.loads(out.read_text())
    assert record["model"] == model
    assert record["windows"] == 2 and record["seqlen"] == 64 and record["perplexity"] > 1
    piqa = record["tasks"]["piqa"]
    assert piqa["samples"] == 5 and piqa["acc"] in {k / 5 for k in range(6)}
    table = capsys.readouterr().out.splitlines()
    assert table[0] == f"| task | metric | {model} |"
    assert f"| wikitext2 | perplexity | {record['perplexity']:.4f} |" in table
    assert f"| piqa | acc | {piqa['acc']:.4f} ± {piqa['acc_stderr']:.4f} |" in table
    assert not list(tmp_path.glob(".*partial*"))


def test_cli_unknown_task_is_one_line_and_exit_2(capsys):
    assert main(["eval", "--tasks", "piqa,winogrand", "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "error: unknown task winogrand; known tasks:" in err


def test_cli_missing_data_file_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["eval", "--tasks", "boolq", "--data-dir", str(tmp_path), "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "boolq/boolq_validation.jsonl.gz is missing" in err
