"""Perplexity with the Wanda/SparseGPT protocol: non-overlapping windows of `seqlen` tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from llm_sparsify.architecture import home_device
from llm_sparsify.data import DataError, check_count, warn_long_windows
from llm_sparsify.events import Event, progress


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    ids: Tensor,
    seqlen: int = 2048,
    device: str | torch.device = "cpu",
    max_windows: int | None = None,
    *,
    on_event: Event | None = None,
) -> float:
    """exp(mean negative log-likelihood) of the token stream `ids` [1, N].

    The stream is cut into N // seqlen windows (the last partial one is dropped); each is scored
    on its own, every token but the first predicted from those before it in the window. `max_windows`: score only
    the first that many (None: all).
    """
    check_count(seqlen, "seqlen")
    check_count(max_windows, "max_windows")
    warn_long_windows(seqlen, model.config)
    windows = ids.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise DataError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    home = home_device(model)
    model.to(device)
    total_nll, total_tokens = 0.0, 0
    for i in progress(range(windows), on_event, "perplexity", "window"):
        window = ids[:, i * seqlen : (i + 1) * seqlen].to(device)
        logits = model(window, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += window.shape[1] - 1
    model.to(home)
    return math.exp(total_nll / total_tokens)
