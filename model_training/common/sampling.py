"""Repeat-factor sampling (LVIS): images of rare classes are drawn more often per epoch.

Step 1 draws its training images by their labels; any step with per-image class sets can.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler


def repeat_factors(targets: np.ndarray, threshold: float) -> np.ndarray:
    """LVIS repeat factors: r_c = max(1, sqrt(t / f_c)), an image's r = max over its classes.

    f_c is the share of training images labelled c; images without labels repeat once.
    """
    frequency = targets.mean(axis=0)
    class_factor = np.maximum(1.0, np.sqrt(threshold / np.maximum(frequency, 1e-12)))
    factors = np.where(targets > 0, class_factor[None, :], 1.0).max(axis=1, initial=1.0)
    return factors


class RepeatFactorSampler(Sampler[int]):
    """Each epoch image i appears floor(r_i) or ceil(r_i) times (stochastic rounding),
    shuffled; the draw depends only on (seed, epoch). ``num_replicas``/``rank`` shard the
    epoch for distributed training; the epoch is padded (wrapping around) to a multiple of
    ``num_replicas``, since DDP ranks must run the same number of batches.
    """

    def __init__(self, factors: np.ndarray, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        self.factors = torch.as_tensor(factors, dtype=torch.float64)
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        whole = torch.floor(self.factors)
        counts = whole + (torch.rand(len(self.factors), generator=generator, dtype=torch.float64)
                          < self.factors - whole)
        indices = torch.repeat_interleave(torch.arange(len(self.factors)), counts.long())
        indices = indices[torch.randperm(len(indices), generator=generator)]
        padding = torch.arange(-len(indices) % self.num_replicas) % max(len(indices), 1)
        indices = torch.cat([indices, indices[padding]])
        self.indices = indices[self.rank::self.num_replicas].tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
