"""Deterministic data stream: what sample comes at which position never depends on the world
size, the number of workers, or on resuming.

The stream is the concatenation of per-epoch permutations of the dataset
(``perm(epoch) = default_rng([seed, epoch]).permutation(N)``); position ``k`` of the stream is
sample ``perm(k // N)[k % N]``. An optimizer step consumes ``batch_size`` consecutive positions,
in ``grad_accum`` micro-batches of ``batch_size / grad_accum``; rank ``r`` of ``W`` takes the
``r``-th slice of each micro-batch. The data position saved in a checkpoint is the stream
position, so a resume (at any world size) continues with exactly the next samples.

Each sample also gets its own random generator, seeded from (seed, stream position): the
augmentations a sample receives are the same whichever rank or worker loads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

__all__ = ["TrainDataset", "Stream", "make_loader", "sample_rng"]


class TrainDataset(Protocol):
    """What a recipe's dataset provides."""

    def __len__(self) -> int: ...

    def get(self, index: int, rng: np.random.Generator) -> Any:
        """Sample ``index`` (a manifest row), augmented with ``rng``."""
        ...


def sample_rng(seed: int, position: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), 0x5A4D, int(position)])


class Stream:
    """Global sample order (see the module docstring)."""

    def __init__(self, n: int, seed: int) -> None:
        if n <= 0:
            raise ValueError("the training set is empty")
        self.n, self.seed = n, int(seed)
        self._cache: dict[int, np.ndarray] = {}

    def index(self, position: int) -> int:
        epoch, off = divmod(int(position), self.n)
        perm = self._cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.n)
            self._cache = {epoch: perm}
        return int(perm[off])

    def epoch(self, position: int) -> float:
        return position / self.n


class _Keys(torch.utils.data.Sampler):
    """Batches of (dataset index, stream position) for this rank, from ``start`` on."""

    def __init__(self, stream: Stream, start: int, micro_global: int, micro_local: int,
                 rank: int, n_micro: int) -> None:
        self.stream, self.start = stream, start
        self.g, self.m, self.rank, self.n_micro = micro_global, micro_local, rank, n_micro

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for j in range(self.n_micro):
            base = self.start + j * self.g + self.rank * self.m
            yield [(self.stream.index(p), p) for p in range(base, base + self.m)]

    def __len__(self) -> int:
        return self.n_micro


class _Wrapped(torch.utils.data.Dataset):
    def __init__(self, ds: TrainDataset, seed: int) -> None:
        self.ds, self.seed = ds, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, position = key
        return self.ds.get(index, sample_rng(self.seed, position))


def make_loader(ds: TrainDataset, stream: Stream, start: int, micro_global: int,
                micro_local: int, rank: int, n_micro: int, collate: Any,
                num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader yielding this rank's micro-batches from stream position ``start``."""
    return torch.utils.data.DataLoader(
        _Wrapped(ds, stream.seed),
        batch_sampler=_Keys(stream, start, micro_global, micro_local, rank, n_micro),
        collate_fn=collate, num_workers=num_workers,
        persistent_workers=False, multiprocessing_context="fork" if num_workers else None)
