"""Several processes (``torchrun``) for the training steps 1, 4 and 6, and the ranks that
sharded inference steps split their image lists by.

torchrun gives every process RANK, WORLD_SIZE and LOCAL_RANK. A training step calls
``setup`` in place of ``resolve_device``: under torchrun it joins the process group (gloo on
CPU, nccl on CUDA); without torchrun nothing is initialised and every helper below is a
no-op, so ``python <script>`` stays one process that behaves exactly as before.
"""
from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

from .config import ConfigError, resolve_device

# Rank 0 validates alone while the other ranks wait for its numbers: a long validation
# (a big val set at full size) must not trip the collective's timeout.
TIMEOUT = timedelta(hours=2)


def is_initialized() -> bool:
    """True inside a process group (a torchrun training step, or a test that made one)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes: the group's, else torchrun's WORLD_SIZE (inference steps make
    no group), else 1."""
    if is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    """This process's rank among ``world_size()`` (0 without torchrun)."""
    if is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def is_main() -> bool:
    """Rank 0: the only process of a training step that writes files."""
    return rank() == 0


def setup(cfg: Mapping) -> torch.device:
    """This process's device; under torchrun the process group is joined first.

    Training cannot be split with ``shard`` (every shard would train the whole model into
    the same files), and SyncBatchNorm needs CUDA: both are config errors here.
    """
    if cfg.get("shard"):
        raise ConfigError("key 'shard' only splits inference steps; run a training step on "
                          "several processes with torchrun")
    device = resolve_device(cfg["device"])
    if world_size() > 1 and not is_initialized():
        if cfg["train"]["sync_bn"] and device.type != "cuda":
            raise ConfigError("key 'train.sync_bn' needs CUDA devices (SyncBatchNorm has no "
                              "CPU implementation)")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        atexit.register(cleanup)
    return device


def cleanup() -> None:
    """Leave the process group (registered at exit by ``setup``)."""
    if is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel inside a group (else ``model`` itself).

    SyncBatchNorm replaces BatchNorm in place and keeps the same parameter objects, so
    parameter groups taken from ``model`` before stay valid; checkpoints keep plain
    BatchNorm keys (the trainer saves the unwrapped model).
    """
    if not is_initialized():
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                   else None)


def train_sampler(dataset: Dataset, seed: int) -> DistributedSampler:
    """A shuffling sampler giving this rank its share of every epoch (``set_epoch`` reseeds
    it); the same seed on every rank keeps the shares disjoint."""
    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True,
                              seed=seed)


def _collective_device() -> torch.device:
    """nccl reduces CUDA tensors only; gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(sums: Mapping[str, float], count: int) -> dict[str, float]:
    """Per-key means over the samples of every rank: ``sums`` and ``count`` (this rank's)
    are added up across ranks before dividing, so the log shows the whole epoch."""
    keys = list(sums)  # the same step_fn on every rank: the same keys in the same order
    totals = [sums[key] for key in keys] + [count]
    if is_initialized():
        tensor = torch.tensor(totals, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor)
        totals = tensor.tolist()
    return {key: total / max(totals[-1], 1) for key, total in zip(keys, totals)}


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable objects, e.g. validation metrics)."""
    if not is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_from_ranks(value: Any) -> list:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` in one process."""
    if not is_initialized():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    """Wait for every rank, e.g. until rank 0's checkpoints are on disk."""
    if is_initialized():
        dist.barrier()
