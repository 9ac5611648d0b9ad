"""What an export gains where it runs: bytes on disk and prefill / decode tokens per second, against the dense model
in the same format.

GGUF files run in llama.cpp (llama-cpp-python), checkpoint directories in transformers. Every model is loaded
once; then each round times every model in turn (prefill: `prompt` tokens in one batch; decode: `new` tokens one
at a time after them, the same fixed ids for every model), so a machine that slows down mid-way slows all alike,
and the medians over the rounds are reported. Without the runtime a format needs, `RuntimeMissing` says so: no
figure is guessed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llm_sparsify.errors import UserError
from llm_sparsify.files import disk_size

PROMPT, NEW, ROUNDS = 128, 64, 5
Timer = Callable[[list[int], list[int]], tuple[float, float]]  # (prompt ids, decoded ids) -> (prefill s, decode s)


class RuntimeMissing(UserError, RuntimeError):
    """The runtime a format is measured in is not installed."""


def require_llama_cpp() -> None:
    """RuntimeMissing unless llama-cpp-python is installed (checked without loading it)."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise RuntimeMissing("measuring a GGUF file needs llama.cpp: pip install llama-cpp-python")


def _llama_cpp(path: Path, threads: int, context: int, stack: contextlib.ExitStack) -> tuple[Timer, int]:
    require_llama_cpp()
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    stack.callback(llm.close)

    def timer(prompt: list[int], decoded: list[int]) -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        middle = time.perf_counter()
        for token in decoded:
            llm.eval([token])
        return middle - start, time.perf_counter() - middle

    return timer, llm.n_vocab()


def _transformers(path: Path, threads: int) -> tuple[Timer, int]:
    from llm_sparsify.models import load_model

    model, _ = load_model(str(path))
    model.config.use_cache = True

    @torch.no_grad()
    def timer(prompt: list[int], decoded: list[int]) -> tuple[float, float]:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            start = time.perf_counter()
            cache = model(torch.tensor([prompt]), use_cache=True).past_key_values
            middle = time.perf_counter()
            for token in decoded:
                cache = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).past_key_values
            return middle - start, time.perf_counter() - middle
        finally:
            torch.set_num_threads(previous)

    return timer, model.config.vocab_size


def measure_speed(models: dict[str, Path], *, threads: int | None = None, prompt: int = PROMPT, new: int = NEW,
                  rounds: int = ROUNDS) -> dict[str, dict[str, float]]:
    """{label: {"bytes", "prefill_tokens_per_s", "decode_tokens_per_s"}} of each model (a .gguf file or a checkpoint
    directory), timed as the module docstring says on `threads` CPU threads (default: all)."""
    threads = threads or torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        timers, vocab = {}, []
        for label, path in models.items():
            path = Path(path)
            timer, size = (_llama_cpp(path, threads, prompt + new + 1, stack) if path.suffix == ".gguf"
                           else _transformers(path, threads))
            timers[label] = timer
            vocab.append(size)
        ids = [(17 + 7919 * i) % min(vocab) for i in range(prompt + new)]  # the same ordinary ids for every model
        times: dict[str, list[tuple[float, float]]] = {label: [] for label in timers}
        for timer in timers.values():  # a warm-up round, not counted
            timer(ids[:prompt], ids[prompt:])
        for r in range(rounds):
            labels = list(timers)
            for label in labels[r % len(labels):] + labels[: r % len(labels)]:  # who goes first rotates
                times[label].append(timers[label](ids[:prompt], ids[prompt:]))
    return {label: {"bytes": disk_size(Path(models[label])),
                    "prefill_tokens_per_s": prompt / statistics.median(t[0] for t in runs),
                    "decode_tokens_per_s": new / statistics.median(t[1] for t in runs)}
            for label, runs in times.items()}
