"""Scale-out with torch.distributed (`torchrun --nproc-per-node N llm-sparsify prune ...`).

Each rank runs the calibration samples of its own share through the layer; the statistics (column
norms, Hessians) are summed over ranks; each rank prunes its share of the layer's modules and sends
the results (weights, quantization grids, reconstruction errors) to all others, so every rank holds
the same pruned layer and propagates its own samples. Rank 0 writes the output. With one process
every function here is a no-op.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from llm_sparsify.data import DataError
from llm_sparsify.quantize.grid import Grid, QuantScheme
from llm_sparsify.stats import SAMPLES_PER_SUM, InputStatistics

log = logging.getLogger(__name__)


def rank_and_size() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_environment(device: str | None) -> str | None:
    """Join the process group that torchrun describes in the environment, if any.

    Returns the device this rank should use: cuda:LOCAL_RANK when the job runs on GPUs, else `device`.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if on_gpu:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    log.info("rank %d of %d on %s", dist.get_rank(), dist.get_world_size(), device or "cpu")
    return device


def samples_of_this_rank(ids: Tensor, batch_size: int) -> Tensor:
    """This rank's contiguous share of the calibration samples [nsamples, seqlen], in whole runs of batches.

    Whole batches, so that every sample meets the same neighbours in a forward pass as in one process;
    whole runs of SAMPLES_PER_SUM samples, so that the float32 partial sums of statistics are the same.
    """
    rank, size = rank_and_size()
    run = -(-SAMPLES_PER_SUM // batch_size) * batch_size  # samples per run, in whole batches
    runs = ids.split(run)
    if len(runs) < size:
        raise DataError(f"{ids.shape[0]} calibration samples make {len(runs)} runs of {run} (batch size "
                        f"{batch_size}), which cannot be shared by {size} processes; use more samples")
    share = torch.tensor_split(torch.arange(len(runs)), size)[rank]
    return torch.cat([runs[i] for i in share.tolist()])


def sum_statistics(stats: Iterable[InputStatistics]) -> None:
    """Sum every distinct accumulator (shared ones once) over all ranks, in place."""
    if rank_and_size()[1] == 1:
        return
    for accumulator in {id(s): s for s in stats}.values():
        accumulator.flush()
        dist.all_reduce(accumulator.sum)
        tokens = torch.tensor([accumulator.tokens], dtype=torch.long, device=accumulator.sum.device)
        dist.all_reduce(tokens)
        accumulator.tokens = int(tokens.item())


def is_mine(index: int) -> bool:
    """Whether this rank prunes the `index`-th group of a layer's modules (round robin over ranks)."""
    rank, size = rank_and_size()
    return index % size == rank


def share_pruned_weights(groups: list[list[nn.Linear]], first: int = 0, scheme: QuantScheme | None = None) -> None:
    """Send each group's pruned weights, and their quantization grids under `scheme`, from the rank that pruned
    them (see is_mine; the groups are numbered from `first`) to every other rank."""
    rank, size = rank_and_size()
    if size == 1:
        return
    for index, modules in enumerate(groups, start=first):
        for module in modules:
            dist.broadcast(module.weight.data, src=index % size)
            if scheme is None:
                continue
            if index % size != rank:  # room for the grid, [out, groups of inputs]
                out, columns = module.weight.shape
                shape = (out, -(-columns // scheme.group_width(columns)))
                module.quantization_grid = Grid(scheme, module.weight.new_empty(shape, dtype=torch.float32),
                                                module.weight.new_empty(shape, dtype=torch.int32))
            dist.broadcast(module.quantization_grid.scale, src=index % size)
            dist.broadcast(module.quantization_grid.zero_point, src=index % size)


def merge(values: dict) -> dict:
    """The union of every rank's `values` (e.g. the reconstruction errors of the modules each pruned)."""
    if rank_and_size()[1] == 1:
        return values
    parts: list[dict] = [{} for _ in range(rank_and_size()[1])]
    dist.all_gather_object(parts, values)
    return {key: value for part in parts for key, value in part.items()}


def same_on_all_ranks(value: object) -> object:
    """Rank 0's `value`, on every rank (e.g. where to resume)."""
    if rank_and_size()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average(tensors: Iterable[Tensor]) -> None:
    """Replace each tensor by its mean over all ranks, in place (e.g. the gradients of a reconstruction step)."""
    _, size = rank_and_size()
    if size == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor)
        tensor.div_(size)


def total(tensor: Tensor) -> Tensor:
    """The sum of `tensor` over all ranks, in place (e.g. the tokens each rank's samples route to each expert)."""
    if rank_and_size()[1] > 1:
        dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    if rank_and_size()[1] > 1:
        dist.barrier()


def leave() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
