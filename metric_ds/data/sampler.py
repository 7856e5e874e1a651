"""Batch samplers: random batches, and P classes x K samples (pk) so that every SupCon anchor has positives.

Both are pure functions of (seed, epoch, rank, world_size): resuming mid-epoch replays the same order and skips
the batches already seen. Under W ranks each rank gets a disjoint share, and every rank the same number of
batches (short shares are padded by repeating batches), so collective steps never hang; the W ranks' k-th
batches together form the k-th global batch.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


class RandomBatchSampler:
    """Shuffled batches of ``batch_size`` rows per rank.

    Args:
        n: number of rows.
        batch_size: rows per batch per rank.
        seed: base seed; the epoch is mixed in by :meth:`set_epoch`.
        rank, world_size: this process's share.
        drop_last: drop the last, smaller batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rows_per_rank(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __len__(self) -> int:
        rows = self._rows_per_rank()
        return rows // self.batch_size if self.drop_last else math.ceil(rows / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        perm = _rng(self.seed, self.epoch).permutation(self.n)
        total = self._rows_per_rank() * self.world_size
        if total > self.n:  # pad by wrapping around, as torch's DistributedSampler does
            perm = np.concatenate([perm, perm[: total - self.n]])
        mine = perm[self.rank::self.world_size]
        for b in range(len(self)):
            yield mine[b * self.batch_size:(b + 1) * self.batch_size].tolist()


class PKBatchSampler:
    """Batches of ``classes_per_batch`` (P) classes x ``samples_per_class`` (K) metric rows, filled up to
    ``batch_size`` with rows without ``metric_mask``.

    Each class's metric rows are shuffled and cut into chunks of K (a last chunk of one row joins the previous
    chunk, so it still has a positive); chunks are shuffled and P of them make a batch (P distinct classes
    where possible). Every metric row is used once per epoch; rows without ``metric_mask`` (classifier-only
    rows) fill the batches and, when left over, form batches of their own.

    Args:
        labels: encoded class of each row.
        metric_mask: 0/1 per row.
        classes_per_batch: P.
        samples_per_class: K (>= 2).
        batch_size: rows per batch per rank (at least P x K, or P x K is used).
        seed, rank, world_size: as for :class:`RandomBatchSampler`.
    """

    def __init__(self, labels: np.ndarray, metric_mask: np.ndarray, classes_per_batch: int, samples_per_class: int,
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.labels = np.asarray(labels)
        self.metric = np.asarray(metric_mask).astype(bool)
        self.p, self.k = classes_per_batch, samples_per_class
        self.batch_size = max(batch_size, self.p * self.k)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self._len = len(self._global_batches(0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self, epoch: int) -> list[list[int]]:
        rng = _rng(self.seed, epoch)
        chunks: list[list[int]] = []
        for cls in np.unique(self.labels[self.metric]):
            idx = rng.permutation(np.flatnonzero(self.metric & (self.labels == cls))).tolist()
            cls_chunks = [idx[i:i + self.k] for i in range(0, len(idx), self.k)]
            if len(cls_chunks) > 1 and len(cls_chunks[-1]) == 1:
                cls_chunks[-2].extend(cls_chunks.pop())
            chunks.extend(cls_chunks)
        order = rng.permutation(len(chunks))
        chunks = [chunks[i] for i in order]
        fill = rng.permutation(np.flatnonzero(~self.metric)).tolist()
        batches = []
        for start in range(0, len(chunks), self.p):
            batch = [i for chunk in chunks[start:start + self.p] for i in chunk]
            room = self.batch_size - len(batch)
            if room > 0 and fill:
                batch.extend(fill[:room])
                fill = fill[room:]
            batches.append(batch)
        for start in range(0, len(fill), self.batch_size):
            batches.append(fill[start:start + self.batch_size])
        return batches

    def __len__(self) -> int:
        return math.ceil(self._len / self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._global_batches(self.epoch)
        total = len(self) * self.world_size
        batches = batches + batches[: total - len(batches)]
        yield from batches[self.rank::self.world_size]
