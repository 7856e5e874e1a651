"""Batch samplers: random batches, and P classes x K samples (pk) so that every SupCon anchor has positives.

Both are pure functions of (seed, epoch, rank, world_size): resuming mid-epoch replays the same order and skips
the batches already seen. Under W ranks each rank gets a disjoint share, and every rank the same number of
batches (short shares are padded by repeating rows or batches from the start of the epoch, as torch's
``DistributedSampler`` does), so collective steps never hang; the W ranks' k-th batches together form the
k-th global batch. ``len()`` is the number of batches per epoch of one rank, the same for every epoch.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from metric_ds.data.labels import LABEL_FREE


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def _check_shard(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class RandomBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled batches of ``batch_size`` rows per rank.

    The epoch's permutation is padded by wrapping around to a multiple of W and dealt round-robin, so rank r
    gets rows ``perm[r::W]``; the k-th batches of the W ranks together are rows ``perm[k*B*W:(k+1)*B*W]``.

    Args:
        n: number of rows.
        batch_size: rows per batch per rank (B).
        seed: base seed; the epoch is mixed in by :meth:`set_epoch`.
        rank, world_size: this process's share.
        drop_last: drop each rank's last, smaller batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        _check_shard(batch_size, rank, world_size)
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields."""
        self.epoch = epoch

    def _rows_per_rank(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __len__(self) -> int:
        rows = self._rows_per_rank()
        return rows // self.batch_size if self.drop_last else math.ceil(rows / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.n == 0:
            return
        perm = _rng(self.seed, self.epoch).permutation(self.n)
        total = self._rows_per_rank() * self.world_size
        if total > self.n:
            perm = np.resize(perm, total)  # wraps around
        mine = perm[self.rank::self.world_size]
        for b in range(len(self)):
            yield mine[b * self.batch_size:(b + 1) * self.batch_size].tolist()


def _cut(rows: np.ndarray, k: int, rng: np.random.Generator) -> list[list[int]]:
    """Cut one class's shuffled metric rows (at least 2) into chunks of 2..K rows, every row once.

    A remainder of one row would have no positive: with K >= 3 the last full chunk gives it a partner
    (chunks K-1 and 2); with K = 2 it is paired with another row of its class drawn at random, which is then
    seen twice this epoch.
    """
    rows = rows.tolist()
    chunks = [rows[i:i + k] for i in range(0, len(rows), k)]
    if len(chunks[-1]) == 1:
        if k >= 3:
            chunks[-1].insert(0, chunks[-2].pop())
        else:
            others = rows[:-1]
            chunks[-1].append(others[int(rng.integers(len(others)))])
    return chunks


class PKBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of P classes x K metric rows (``metric_mask = 1``), topped up with the other rows.

    Per epoch: each class's metric rows are shuffled and cut into chunks of K rows (the last chunk of a class
    may be shorter, never a single row: see :func:`_cut`; a class with fewer than K metric rows is one chunk
    of all of them). Each batch takes P chunks from P distinct classes, drawn with probability proportional to
    the chunks a class has left (so that large classes do not pile up at the end of the epoch; only when
    fewer than P classes have chunks left does a batch repeat a class). Then the rows that cannot be anchors
    with a positive among the other rows are added: rows with ``metric_mask = 0`` (e.g. classifier-only rows),
    the metric rows of classes with a single metric row (there is no positive for them anywhere) and label-free
    rows (label :data:`~metric_ds.data.labels.LABEL_FREE`: their positive is their own second view). They are spread evenly
    over the batches, at most ``batch_size - P*K`` per batch, and what is left forms batches of
    ``batch_size`` of its own. So every row is seen once per epoch (except the K = 2 pairing above), every
    metric row in a P x K chunk has at least one positive in its batch, and no batch exceeds ``batch_size``.

    Args:
        labels: encoded class of each row, shape (N,).
        metric_mask: 0/1 per row, shape (N,).
        classes_per_batch: P (>= 1).
        samples_per_class: K (>= 2).
        batch_size: rows per batch per rank, at least P x K.
        seed, rank, world_size: as for :class:`RandomBatchSampler`; rank r gets global batches r, r+W, ...
    """

    def __init__(self, labels: np.ndarray, metric_mask: np.ndarray, classes_per_batch: int, samples_per_class: int,
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        _check_shard(batch_size, rank, world_size)
        if classes_per_batch < 1 or samples_per_class < 2:
            raise ValueError(f"need classes_per_batch >= 1 and samples_per_class >= 2, got {classes_per_batch} "
                             f"and {samples_per_class}")
        if batch_size < classes_per_batch * samples_per_class:
            raise ValueError(f"batch_size ({batch_size}) must be >= classes_per_batch x samples_per_class "
                             f"({classes_per_batch} x {samples_per_class})")
        self.labels = np.asarray(labels)
        self.metric = np.asarray(metric_mask).astype(bool)
        if self.labels.shape != self.metric.shape:
            raise ValueError(f"labels and metric_mask differ in length: {len(self.labels)} vs {len(self.metric)}")
        self.metric &= self.labels != LABEL_FREE  # label-free rows fill batches
        self.p, self.k, self.batch_size = classes_per_batch, samples_per_class, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        classes, inverse, counts = np.unique(self.labels[self.metric], return_inverse=True, return_counts=True)
        metric_rows = np.flatnonzero(self.metric)
        self._class_rows = [metric_rows[inverse == c] for c in range(len(classes)) if counts[c] >= 2]
        singles = [metric_rows[inverse == c] for c in range(len(classes)) if counts[c] == 1]
        self._fill_rows = np.sort(np.concatenate([np.flatnonzero(~self.metric), *singles])).astype(np.int64)
        # The batch count depends on the class sizes only, never on the draw: the same in every epoch.
        n_chunks = sum(math.ceil(len(r) / self.k) for r in self._class_rows)
        self._n_pk = math.ceil(n_chunks / self.p)
        leftover = max(0, len(self._fill_rows) - self._n_pk * (self.batch_size - self.p * self.k))
        self._n_global = self._n_pk + math.ceil(leftover / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields."""
        self.epoch = epoch

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` before sharding (what one process with W = 1 would see)."""
        rng = _rng(self.seed, epoch)
        per_class = [_cut(rng.permutation(rows), self.k, rng) for rows in self._class_rows]
        left = np.array([len(c) for c in per_class], dtype=np.int64)
        batches: list[list[int]] = []
        while left.sum() > 0:
            avail = np.flatnonzero(left)
            if len(avail) >= self.p:
                picks = rng.choice(avail, size=self.p, replace=False, p=left[avail] / left[avail].sum()).tolist()
            else:  # fewer than P classes left: take more chunks from the same classes
                picks, spare = [], left.copy()
                while len(picks) < self.p and spare.sum() > 0:
                    for c in np.flatnonzero(spare):
                        if len(picks) < self.p:
                            picks.append(int(c))
                            spare[c] -= 1
            batch = []
            for c in picks:
                left[c] -= 1
                batch.extend(per_class[c][left[c]])
            batches.append(batch)
        fill = rng.permutation(self._fill_rows).tolist()
        room = self.batch_size - self.p * self.k
        if batches and room > 0 and fill:
            take = min(len(fill), room * len(batches))
            sizes = np.full(len(batches), take // len(batches))
            sizes[: take % len(batches)] += 1
            start = 0
            for batch, size in zip(batches, sizes.tolist(), strict=True):
                batch.extend(fill[start:start + size])
                start += size
            fill = fill[take:]
        batches += [fill[i:i + self.batch_size] for i in range(0, len(fill), self.batch_size)]
        if len(batches) != self._n_global:
            raise RuntimeError(f"PKBatchSampler built {len(batches)} batches, expected {self._n_global} (a bug)")
        return batches

    def __len__(self) -> int:
        return math.ceil(self._n_global / self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches(self.epoch)
        total = len(self) * self.world_size
        if total > len(batches):  # pad by repeating batches from the start of the epoch
            batches = [batches[i % len(batches)] for i in range(total)]
        yield from batches[self.rank::self.world_size]
