"""Zero-shot tasks with lm-eval on the model in memory, from local copies of the task data or from the Hub.

The task configs in tasks/*.yaml are lm-eval YAML with the names, prompts and metrics of lm-eval's own
tasks, reading JSON lines from a data directory (--data-dir or $LLM_SPARSIFY_TASK_DATA) laid out as
DIR/piqa/piqa_validation.jsonl, DIR/hellaswag/..., and so on. Without a data directory, lm-eval's own
tasks of the same names are used; they download their data from the Hugging Face Hub.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm_sparsify.architecture import home_device
from llm_sparsify.data import DataError

if TYPE_CHECKING:
    from lm_eval.api.task import Task

log = logging.getLogger(__name__)

DATA_ENV = "LLM_SPARSIFY_TASK_DATA"
_DATA_DIR_PLACEHOLDER = '"${LLM_SPARSIFY_TASK_DATA}"'


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads a task config for its data files, leaving lm-eval's !function tags unresolved."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, tag, node: None)


def _task_dir() -> Path:
    return Path(str(resources.files("llm_sparsify") / "tasks"))


def known_tasks() -> list[str]:
    """Names of the tasks with a config in tasks/ (the same names as lm-eval's tasks)."""
    return sorted(p.name.removesuffix(".yaml") for p in _task_dir().glob("*.yaml"))


def task_data_files(task: str) -> list[str]:
    """The data files of `task`, relative to the data directory."""
    config = yaml.load((_task_dir() / f"{task}.yaml").read_text(), Loader=_TaskYamlLoader)
    return list(config["dataset_kwargs"]["data_files"].values())


def task_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The task data directory: `data_dir`, else $LLM_SPARSIFY_TASK_DATA, else None (use the Hub).

    A directory that holds a tasks/ folder (like the shared data directory) means that folder.
    """
    data_dir = data_dir or os.environ.get(DATA_ENV)
    if not data_dir:
        return None
    root = Path(data_dir).expanduser()
    if (root / "tasks").is_dir():
        root = root / "tasks"
    if not root.is_dir():
        raise DataError(f"task data directory {root}: no such directory")
    return root.resolve()


def check_tasks(tasks: list[str], data_dir: str | Path | None = None) -> Path | None:
    """Fail early on an unknown task or a missing data file; return the data directory (None: the Hub)."""
    known = known_tasks()
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        what = f"unknown task {', '.join(unknown)}" if unknown else "no task given"
        raise DataError(f"{what}; known tasks: {', '.join(known)}")
    root = task_data_dir(data_dir)
    if root is None:
        return None
    for task in tasks:
        for name in task_data_files(task):
            if not (root / name).is_file():
                raise DataError(
                    f"{task}: data file {root / name} is missing; the data directory needs the layout "
                    f"DIR/<task>/<file> of llm_sparsify/tasks/{task}.yaml (e.g. DIR/{name}); "
                    f"give it with --data-dir DIR or {DATA_ENV}=DIR")
    return root


def _write_configs(tasks: list[str], root: Path, out: Path) -> None:
    """Copy the configs of `tasks` to `out` with the data directory filled in."""
    for task in tasks:
        text = (_task_dir() / f"{task}.yaml").read_text()
        (out / f"{task}.yaml").write_text(text.replace(_DATA_DIR_PLACEHOLDER, json.dumps(str(root))))


def load_tasks(tasks: list[str], data_dir: str | Path | None = None) -> dict[str, Task]:
    """lm-eval Task objects for `tasks`, their data loaded: from the local configs with the data directory
    (`data_dir`, else $LLM_SPARSIFY_TASK_DATA), else lm-eval's own configs of the same names (the Hub)."""
    from lm_eval.tasks import TaskManager

    root = check_tasks(tasks, data_dir)
    loaded = {}
    with tempfile.TemporaryDirectory(prefix="llm_sparsify-tasks-") as config_dir:
        if root is None:
            log.info("no task data directory given: loading %s with lm-eval's own configs (Hub)", ", ".join(tasks))
            manager = TaskManager()
        else:
            _write_configs(tasks, root, Path(config_dir))
            manager = TaskManager(include_path=config_dir, include_defaults=False)
        for task in tasks:
            try:
                loaded.update(manager.load([task])["tasks"])
            except Exception as error:  # datasets and lm-eval raise many kinds (offline, bad file, ...)
                source = f"local data in {root}" if root else "the Hugging Face Hub"
                hint = "" if root else f"; offline, give local copies with --data-dir DIR or {DATA_ENV}=DIR"
                message = " ".join(str(error).split())  # one line
                raise DataError(f"could not load task {task} from {source}: {message}{hint}") from None
    return loaded


def _metrics(result: dict, counts: dict) -> dict[str, float]:
    """lm-eval's "acc,none"-style entries as {"acc": ..., "acc_stderr": ..., "samples": n}."""
    metrics = {}
    for key, value in result.items():
        name, _, filter_name = key.partition(",")
        if filter_name == "none" and isinstance(value, (int, float)):
            metrics[name] = float(value)
    metrics["samples"] = int(counts["effective"])
    return metrics


def _packed_row(context: list[int], continuations: list[list[int]], dtype: torch.dtype, width: int):
    """One sequence scoring every continuation x_i of `context` c in one forward: c[:-1], then for each i the
    segment [c[-1]] + x_i[:-1], which sees c[:-1] and itself (causally) and sits at the positions it would have
    after c. Returns (ids, positions, additive mask [width, width], start of each segment); padding sees itself."""
    prefix = len(context) - 1
    ids = torch.zeros(width, dtype=torch.long)
    positions = torch.zeros(width, dtype=torch.long)
    seen = torch.zeros(width, width, dtype=torch.bool)
    ids[:prefix] = torch.tensor(context[:-1], dtype=torch.long)
    positions[:prefix] = torch.arange(prefix)
    seen[:prefix, :prefix] = torch.ones(prefix, prefix, dtype=torch.bool).tril()
    starts, start = [], prefix
    for x in continuations:
        end = start + len(x)
        ids[start:end] = torch.tensor(context[-1:] + x[:-1], dtype=torch.long)
        positions[start:end] = torch.arange(prefix, prefix + len(x))
        seen[start:end, :prefix] = True
        seen[start:end, start:end] = torch.ones(len(x), len(x), dtype=torch.bool).tril()
        starts.append(start)
        start = end
    seen[start:, start:] = torch.eye(width - start, dtype=torch.bool)
    mask = torch.zeros(width, width, dtype=dtype).masked_fill_(~seen, torch.finfo(dtype).min)
    return ids, positions, mask, starts


def _shared_context_lm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int):
    """lm-eval's HFLM scoring each distinct context once: a multiple-choice item's choices share their context,
    so one sequence holds the context and every choice after it (a block mask keeps the choices apart), and
    logits are made only where a choice's tokens are predicted. HFLM's log-likelihoods to float rounding, with
    about half the tokens and a third of the logits on piqa, arc_easy, winogrande and hellaswag. Attention that
    takes no custom mask (flash-attention kernels) gets HFLM as it is."""
    from lm_eval.models.huggingface import HFLM

    if getattr(model.config, "_attn_implementation", "eager") not in ("eager", "sdpa"):
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)

    class SharedContextLM(HFLM):
        @torch.no_grad()
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            results: list = [None] * len(requests)
            too_long = [i for i, (_, c, x) in enumerate(requests) if len(c) + len(x) > self.max_length + 1]
            if too_long:  # HFLM truncates these from the left
                answers = super()._loglikelihood_tokens([requests[i] for i in too_long], disable_tqdm, override_bs)
                for i, answer in zip(too_long, answers, strict=True):
                    results[i] = answer
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, (_, context, _) in enumerate(requests):
                if results[i] is None:
                    groups.setdefault(tuple(context), []).append(i)
            rows = []  # (context, requests): one packed sequence each, at most batch_size requests and max_length
            for context, members in groups.items():
                row, length = [], len(context) - 1
                for i in members:
                    if row and (len(row) == self.batch_size or length + len(requests[i][2]) > self.max_length):
                        rows.append((list(context), row))
                        row, length = [], len(context) - 1
                    row.append(i)
                    length += len(requests[i][2])
                rows.append((list(context), row))
            rows.sort(key=lambda r: len(r[0]) + sum(len(requests[i][2]) for i in r[1]))  # longest last: popped first
            progress = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
            while rows:
                batch = [rows.pop()]
                while rows and sum(len(r[1]) for r in batch) + len(rows[-1][1]) <= self.batch_size:
                    batch.append(rows.pop())
                answers = self._score_rows([(c, [requests[i][2] for i in members]) for c, members in batch])
                for i, answer in zip([i for _, members in batch for i in members], answers, strict=True):
                    results[i] = answer
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                progress.update(len(answers))
            progress.close()
            return results

        def _score_rows(self, rows):
            """(sum of log P(x_t | context, x_<t), every x_t the argmax) for each continuation x of each row."""
            lengths = [len(c) - 1 + sum(len(x) for x in xs) for c, xs in rows]
            width, dtype = max(lengths), self.model.dtype
            packed = [_packed_row(c, xs, dtype, width) for c, xs in rows]
            ids, positions, mask = (torch.stack([p[i] for p in packed]).to(self.device) for i in range(3))
            keep = width - min(len(c) - 1 for c, _ in rows)  # logits from the first continuation token on
            logits = self.model(ids, attention_mask=mask[:, None], position_ids=positions, logits_to_keep=keep,
                                use_cache=False).logits
            answers = []
            for row, ((_, xs), (*_, starts)) in enumerate(zip(rows, packed, strict=True)):
                for x, start in zip(xs, starts, strict=True):
                    target = torch.tensor(x, device=logits.device)
                    logprobs = logits[row, start - (width - keep):][:len(x)].log_softmax(-1, dtype=self.softmax_dtype)
                    greedy = bool((logprobs.argmax(-1) == target).all())
                    answers.append((float(logprobs.gather(-1, target[:, None]).sum()), greedy))
            return answers

    return SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def evaluate_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    *,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    batch_size: int = 8,
    device: str | None = None,
) -> dict[str, dict[str, float]]:
    """Zero-shot metrics of the loaded `model` per task: {task: {"acc": ..., "acc_stderr": ..., "samples": n}}.

    The model is wrapped in lm-eval's HFLM as it is (not reloaded) and run on `device` (default: where it
    is), then put back. `limit` scores the first N items of each task.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    loaded = load_tasks(tasks, data_dir)
    home = home_device(model)
    model.to(device or home)
    try:
        lm = _shared_context_lm(model, tokenizer, batch_size)
        output = simple_evaluate(  # seeds None: the global RNGs stay as they are (zero-shot draws nothing)
            lm, tasks=list(loaded.values()), task_manager=TaskManager(include_defaults=False), limit=limit,
            log_samples=False, random_seed=None, numpy_random_seed=None, torch_random_seed=None,
        )
    finally:
        model.to(home)
    return {task: _metrics(output["results"][task], output["n-samples"][task]) for task in tasks}


def _cell(metrics: dict | None, name: str) -> str:
    if metrics is None or name not in metrics:
        return "–"
    value = metrics[name]
    if name == "samples" or not isinstance(value, float):
        return str(value)
    stderr = metrics.get(f"{name}_stderr")
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def markdown_table(results: dict[str, dict], columns: list[str]) -> str:
    """Several models' results side by side: one row per task and metric, one column per model.

    `results` maps a column name ("dense", "wanda-2of4") to {task: {metric: value}}, as evaluate_tasks
    returns it (perplexity as e.g. {"wikitext2": {"perplexity": 29.9}}); stderrs join their metric's cell.
    """
    rows: dict[tuple[str, str], None] = {}
    for column in columns:
        for task, metrics in results[column].items():
            for name in metrics:
                if not name.endswith("_stderr"):
                    rows[(task, name)] = None
    lines = ["| task | metric | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for task, name in rows:
        cells = [_cell(results[column].get(task), name) for column in columns]
        lines.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
