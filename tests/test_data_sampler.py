"""Batch samplers: determinism per (seed, epoch), equal shards per rank, pk composition, resume by skipping."""
from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from metric_ds.data.sampler import PKBatchSampler, RandomBatchSampler


def _flat(batches):
    return [i for b in batches for i in b]


@pytest.mark.parametrize("n,bs,world,drop_last", [
    (50, 4, 1, False), (50, 4, 3, False), (50, 4, 3, True), (7, 4, 2, False), (64, 8, 4, False), (5, 2, 8, False),
])
def test_random_sampler_shards(n, bs, world, drop_last):
    shards = []
    for rank in range(world):
        s = RandomBatchSampler(n, bs, seed=3, rank=rank, world_size=world, drop_last=drop_last)
        s.set_epoch(2)
        got = list(s)
        assert len(got) == len(s) and all(0 < len(b) <= bs for b in got)
        if drop_last:
            assert all(len(b) == bs for b in got)
        shards.append(got)
    assert len({len(s) for s in shards}) == 1  # every rank the same number of batches
    seen = Counter(_flat(itertools.chain(*shards)))
    if not drop_last:
        total = math.ceil(n / world) * world
        assert set(seen) == set(range(n)) and sum(seen.values()) == total
        assert sum(c - 1 for c in seen.values()) == total - n  # only the wrap-around padding repeats


def test_random_sampler_is_a_pure_function_of_seed_and_epoch():
    def order(seed, epoch):
        s = RandomBatchSampler(100, 16, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(1, 0) == order(1, 0) and order(1, 3) == order(1, 3)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    s = RandomBatchSampler(100, 16, seed=1)
    s.set_epoch(3)
    list(s)
    s.set_epoch(0)
    assert list(s) == order(1, 0)  # no hidden state carried between epochs


def _pk_data(seed: int = 0):
    """Classes of many sizes, some with one metric row, plus classifier-only rows."""
    rng = np.random.default_rng(seed)
    sizes = [40, 25, 17, 9, 5, 3, 2, 1, 1, 12, 7, 30]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    metric = np.ones(len(labels), dtype=np.int8)
    extra = rng.integers(0, len(sizes), 45)  # classifier-only rows of random classes
    labels = np.concatenate([labels, extra])
    metric = np.concatenate([metric, np.zeros(len(extra), dtype=np.int8)])
    perm = rng.permutation(len(labels))
    return labels[perm], metric[perm]


@pytest.mark.parametrize("p,k,bs", [(4, 3, 16), (4, 2, 8), (3, 4, 20), (6, 2, 12), (2, 5, 10)])
@pytest.mark.parametrize("seed", [0, 1])
def test_pk_batches_composition(p, k, bs, seed):
    labels, metric = _pk_data(seed)
    s = PKBatchSampler(labels, metric, classes_per_batch=p, samples_per_class=k, batch_size=bs, seed=seed)
    metric_counts = Counter(labels[metric == 1].tolist())
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)  # the same count in every epoch
        seen = Counter(_flat(batches))
        assert set(seen) == set(range(len(labels)))  # every row at least once per epoch
        repeats = sum(c - 1 for c in seen.values())
        odd_classes = sum(1 for c in metric_counts.values() if c >= 3 and c % 2 == 1)
        assert repeats == (odd_classes if k == 2 else 0)
        for b in batches:
            assert len(b) <= bs
            m = [i for i in b if metric[i]]
            in_batch = Counter(labels[m].tolist())
            for i in m:  # every metric row of a class with a second metric row has a positive
                if metric_counts[labels[i]] >= 2:
                    assert in_batch[labels[i]] >= 2
        first = Counter(labels[[i for i in batches[0] if metric[i]]].tolist())
        assert sum(1 for c, n in first.items() if n >= 2) == p  # P distinct classes while there are enough


def test_pk_classes_smaller_than_k_form_one_chunk_and_singletons_fill():
    labels = np.array([0] * 2 + [1] * 3 + [2] * 1 + [3] * 8)
    metric = np.ones(len(labels), dtype=int)
    s = PKBatchSampler(labels, metric, classes_per_batch=2, samples_per_class=4, batch_size=9, seed=0)
    batches = list(s)
    assert sorted(_flat(batches)) == list(range(len(labels)))
    for b in batches:
        counts = Counter(labels[b].tolist())
        assert all(n >= 2 for c, n in counts.items() if c != 2)
        assert counts.get(2, 0) <= 1
    assert len(batches) == len(s) == 2  # 4 chunks (classes 0 and 1: one each; class 3: two) / P; class 2 fills


@pytest.mark.parametrize("world", [2, 3, 5])
def test_pk_shards_are_equal_disjoint_slices_of_the_global_batches(world):
    labels, metric = _pk_data(3)
    args = dict(labels=labels, metric_mask=metric, classes_per_batch=4, samples_per_class=3, batch_size=16, seed=9)
    glob = PKBatchSampler(**args).global_batches(4)
    shards = []
    for rank in range(world):
        s = PKBatchSampler(**args, rank=rank, world_size=world)
        s.set_epoch(4)
        shards.append(list(s))
    assert {len(x) for x in shards} == {len(shards[0])} and len(shards[0]) == math.ceil(len(glob) / world)
    for k in range(len(shards[0])):
        for rank in range(world):
            assert shards[rank][k] == glob[(k * world + rank) % len(glob)]
    covered = Counter(_flat(b for shard in shards for b in shard))
    assert set(covered) == set(range(len(labels)))


@pytest.mark.parametrize("make", [
    lambda rank, world: RandomBatchSampler(83, 8, seed=5, rank=rank, world_size=world),
    lambda rank, world: PKBatchSampler(*_pk_data(1), 3, 3, 12, seed=5, rank=rank, world_size=world),
])
@pytest.mark.parametrize("skip", [0, 1, 4])
def test_resume_by_skipping_replays_the_same_order(make, skip):
    for world in (1, 2):
        for rank in range(world):
            first = make(rank, world)
            first.set_epoch(2)
            full = list(first)
            resumed = make(rank, world)  # a fresh process after a restart
            resumed.set_epoch(2)
            assert list(itertools.islice(iter(resumed), skip, None)) == full[skip:]


def test_pk_with_only_classifier_rows_and_bad_arguments():
    labels = np.arange(10) % 3
    s = PKBatchSampler(labels, np.zeros(10), 2, 2, 4, seed=0)
    assert [len(b) for b in s] == [4, 4, 2] and len(s) == 3
    with pytest.raises(ValueError, match=r"batch_size \(5\) must be >= classes_per_batch x samples_per_class"):
        PKBatchSampler(labels, np.ones(10), 2, 3, 5)
    with pytest.raises(ValueError, match="samples_per_class >= 2"):
        PKBatchSampler(labels, np.ones(10), 2, 1, 5)
    with pytest.raises(ValueError, match="rank < world_size"):
        RandomBatchSampler(10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="differ in length"):
        PKBatchSampler(labels, np.ones(9), 2, 2, 4)
