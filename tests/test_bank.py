"""The embedding bank against a plain-Python model of it: ring wrap, eviction by age, a step's rows, resume and
migration, statistics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from metric_ds.bank import EmbeddingBank, StepRows, migrate_state
from metric_ds.errors import UserError
from metric_ds.metrics import embedding_stats

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class OracleBank:
    """A row list: keep the newest ``capacity``; drop rows ``keep`` or more steps older than the newest."""

    def __init__(self, capacity: int, keep: int):
        self.capacity, self.keep, self.rows, self.last = capacity, keep, [], -1

    def add(self, z, h, y, step):
        self.rows += [(z[i], h[i], int(y[i]), step) for i in range(len(y))]
        self.rows = self.rows[max(0, len(self.rows) - self.capacity):] if self.capacity else []
        self.last = max(self.last, step)
        self.rows = [r for r in self.rows if self.last - r[3] < self.keep]

    def copy_live_rows(self):
        return (np.array([r[0] for r in self.rows]), np.array([r[1] for r in self.rows]),
                np.array([r[2] for r in self.rows]), np.array([r[3] for r in self.rows]))


def assert_same(bank: EmbeddingBank, oracle: OracleBank) -> None:
    z, h, y, s = bank.copy_live_rows()
    ez, eh, ey, es = oracle.copy_live_rows()
    assert len(bank) == len(oracle.rows) == z.shape[0]
    if oracle.rows:
        np.testing.assert_array_equal(z.cpu().numpy(), ez)
        np.testing.assert_array_equal(h.cpu().numpy(), eh)
    np.testing.assert_array_equal(y.cpu().numpy(), ey.astype(np.int64).reshape(-1))
    np.testing.assert_array_equal(s.cpu().numpy(), es.astype(np.int64).reshape(-1))


def random_rows(rng: np.random.Generator, n: int, z_dim: int = 3, h_dim: int = 5, classes: int = 4):
    z = rng.normal(size=(n, z_dim)).astype(np.float32)
    return z, rng.normal(size=(n, h_dim)).astype(np.float32), rng.integers(0, classes, n)


def feed(bank, oracle, rng, steps, max_rows, micro=2):
    """Several micro-batches per optimizer step, of varying size (0 included)."""
    for step in steps:
        for _ in range(micro):
            z, h, y = random_rows(rng, int(rng.integers(0, max_rows + 1)))
            bank.add(torch.from_numpy(z), torch.from_numpy(h), torch.from_numpy(y), step)
            oracle.add(z, h, y, step)
            assert_same(bank, oracle)


@pytest.mark.parametrize("capacity,keep,max_rows",
                         [(10, 3, 4), (7, 100, 5), (40, 2, 6), (5, 1, 9), (1, 2, 3)])
@pytest.mark.parametrize("device", DEVICES)
def test_ring_buffer_and_eviction_match_oracle(capacity, keep, max_rows, device):
    rng = np.random.default_rng(capacity * 31 + keep)
    bank = EmbeddingBank(capacity, 3, 5, keep, device)
    feed(bank, OracleBank(capacity, keep), rng, range(12), max_rows)
    assert bank.z.device.type == device


def test_eviction_by_age_and_explicit():
    bank = EmbeddingBank(capacity=100, z_dim=2, h_dim=2, keep_last_n_steps=2)
    for step in range(3):
        bank.add(torch.full((3, 2), float(step)), torch.zeros(3, 2), torch.tensor([0, 1, 2]), step)
    assert bank.copy_live_rows()[3].tolist() == [1, 1, 1, 2, 2, 2]  # step 0 is 2 steps older than step 2: gone
    bank.add(torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), 3)  # a step with no rows
    assert bank.copy_live_rows()[3].tolist() == [2, 2, 2]
    bank.evict_older_than(3)
    assert len(bank) == 0 and bank.copy_live_rows()[0].shape == (0, 2)


def test_add_larger_than_capacity_keeps_the_last_rows():
    bank = EmbeddingBank(capacity=4, z_dim=1, h_dim=1, keep_last_n_steps=5)
    bank.add(torch.arange(3.0)[:, None], torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), 0)
    bank.add(torch.arange(10.0, 16.0)[:, None], torch.zeros(6, 1), torch.zeros(6, dtype=torch.long), 1)
    assert bank.copy_live_rows()[0][:, 0].tolist() == [12.0, 13.0, 14.0, 15.0]


def test_add_detaches_casts_and_checks_shapes():
    bank = EmbeddingBank(capacity=4, z_dim=2, h_dim=3, keep_last_n_steps=1)
    z = torch.randn(2, 2, requires_grad=True)
    bank.add(z.bfloat16(), torch.randn(2, 3).bfloat16(), torch.tensor([1, 0], dtype=torch.int32), 0)
    vz, vh, vy, _ = bank.copy_live_rows()
    assert not vz.requires_grad and vz.dtype == vh.dtype == torch.float32 and vy.dtype == torch.long
    torch.testing.assert_close(vz, z.detach().bfloat16().float())
    with pytest.raises(ValueError, match="h \\(n, 3\\)"):
        bank.add(torch.randn(2, 2), torch.randn(2, 4), torch.tensor([0, 1]), 1)
    with pytest.raises(ValueError, match="labels"):
        bank.add(torch.randn(2, 2), torch.randn(2, 3), torch.tensor([0]), 1)
    with pytest.raises(ValueError, match="keep_last_n_steps"):
        EmbeddingBank(4, 2, 3, 0)


def test_a_steps_rows_are_its_metric_rows_in_one_process():
    """One process: z and labels are the loss's contrast rows, h the pooled rows that the metric row indices pick."""
    bank = EmbeddingBank(8, 2, 3, 2)
    h = torch.arange(15.0).reshape(5, 3).bfloat16()
    mask = torch.tensor([1, 0, 1, 1, 0])
    rows = mask.nonzero().squeeze(1)
    z, y = torch.randn(3, 2), torch.tensor([2, 0, 1])
    bank.add_step_rows(StepRows(h, rows, z, y, [3], local=False), step=4)
    bz, bh, by, bs = bank.copy_live_rows()
    assert torch.equal(bz, z) and torch.equal(by, y) and torch.equal(bs, torch.full((3,), 4))
    assert torch.equal(bh, h[mask.bool()].float())
    bank.add_step_rows(StepRows(h, rows, z, y, [3], local=True), step=5)  # local: nothing to gather either
    assert len(bank) == 6 and bank.last_step == 5


def test_migrate_state_gives_the_new_shape_and_leaves_the_old_state_alone():
    rng = np.random.default_rng(2)
    bank = EmbeddingBank(12, 3, 5, 3)
    feed(bank, OracleBank(12, 3), rng, range(6), 4)
    state = bank.state_dict()
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    migrated = migrate_state(state, capacity=5, keep_last_n_steps=2)
    assert migrated["z"].shape == (5, 3) and migrated["keep_last_n_steps"] == 2
    assert migrated["last_step"] == bank.last_step
    for key, value in before.items():
        assert torch.equal(state[key], value) if isinstance(value, torch.Tensor) else state[key] == value
    direct, via = EmbeddingBank(5, 3, 5, 2), EmbeddingBank(5, 3, 5, 2)
    direct.load_state_dict(state)  # migrates
    via.load_state_dict(migrated)  # already this shape: restored exactly
    for a, b in zip(direct.copy_live_rows(), via.copy_live_rows(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("split_step", [0, 3, 7])
def test_state_dict_round_trip_resumes_exactly(tmp_path, split_step):
    rng = np.random.default_rng(split_step)
    bank, oracle = EmbeddingBank(9, 3, 5, 3), OracleBank(9, 3)
    feed(bank, oracle, rng, range(split_step + 1), 4)
    torch.save(bank.state_dict(), tmp_path / "bank.pt")
    resumed = EmbeddingBank(9, 3, 5, 3)
    resumed.load_state_dict(torch.load(tmp_path / "bank.pt", weights_only=True))
    assert_same(resumed, oracle)
    for key in ("z", "h", "labels", "steps"):
        assert torch.equal(getattr(resumed, key), getattr(bank, key))
    for step in range(split_step + 1, 12):  # both see the same stream afterwards and stay identical
        for _ in range(2):
            z, h, y = (torch.from_numpy(a) for a in random_rows(rng, int(rng.integers(0, 5))))
            bank.add(z, h, y, step)
            resumed.add(z, h, y, step)
            oracle.add(z.numpy(), h.numpy(), y.numpy(), step)
            assert_same(resumed, oracle)
    for a, b in zip(resumed.copy_live_rows(), bank.copy_live_rows(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("new_capacity,new_keep", [(4, 3), (30, 3), (30, 1)])
def test_load_into_another_capacity_keeps_the_newest_young_rows(new_capacity, new_keep):
    rng = np.random.default_rng(1)
    bank = EmbeddingBank(12, 3, 5, 3)
    feed(bank, OracleBank(12, 3), rng, range(6), 4)
    resized = EmbeddingBank(new_capacity, 3, 5, new_keep)
    resized.load_state_dict(bank.state_dict())
    z, h, y, s = bank.copy_live_rows()
    young = s > bank.last_step - new_keep
    expected = [t[young][-new_capacity:] for t in (z, h, y, s)]
    for a, b in zip(resized.copy_live_rows(), expected, strict=True):
        assert torch.equal(a, b)


def test_load_with_other_dims_is_a_user_error():
    bank = EmbeddingBank(4, 3, 5, 2)
    with pytest.raises(UserError, match="projection_dim"):
        EmbeddingBank(4, 8, 5, 2).load_state_dict(bank.state_dict())


# ------------------------------------------------------------------------------------------------- stats


def oracle_stats(z, h, y, steps, num_classes, current):
    counts = np.bincount(y, minlength=num_classes)
    cov = counts[counts > 0]
    u = z / np.linalg.norm(z, axis=1, keepdims=True)
    cos = u @ u.T
    same = (y[:, None] == y[None]) & ~np.eye(len(y), dtype=bool)
    cents = np.array([u[y == c].mean(0) for c in np.flatnonzero(counts)])
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    cc = cents @ cents.T
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    off = ~np.eye(len(y), dtype=bool)
    out = {
        "bank/size": len(y), "bank/classes_total": num_classes, "bank/classes_covered": len(cov),
        "bank/class_count_min": cov.min(), "bank/class_count_median": np.median(cov),
        "bank/class_count_max": cov.max(), "bank/mean_age": np.mean(current - steps),
        "bank/h_norm_mean": np.linalg.norm(h, axis=1).mean(),
        "bank/h_norm_std": np.linalg.norm(h, axis=1).std(),
        "bank/uniformity": np.log(np.exp(-2 * d2)[off].mean()),
    }
    if same.any():
        out["bank/intra_cos"] = cos[same].mean()
        out["bank/alignment"] = d2[same].mean()
    if len(cents) > 1:
        out["bank/inter_centroid_cos"] = cc[~np.eye(len(cents), dtype=bool)].mean()
    return out


@pytest.mark.parametrize("n_rows,num_classes", [(2, 5), (3, 3), (40, 4), (150, 12)])
@pytest.mark.parametrize("device", DEVICES)
def test_stats_match_brute_force(n_rows, num_classes, device):
    rng = np.random.default_rng(n_rows)
    bank = EmbeddingBank(capacity=n_rows, z_dim=6, h_dim=4, keep_last_n_steps=50, device=device)
    z = rng.normal(size=(n_rows, 6))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    h = rng.normal(size=(n_rows, 4)) * 3
    y = rng.integers(0, num_classes, n_rows)
    steps = np.sort(rng.integers(0, 5, n_rows))
    for s in np.unique(steps):
        m = steps == s
        bank.add(torch.from_numpy(z[m]), torch.from_numpy(h[m]), torch.from_numpy(y[m]), int(s))
    got = bank.stats(num_classes, current_step=7)
    z32, h32 = z.astype(np.float32).astype(np.float64), h.astype(np.float32).astype(np.float64)
    expected = oracle_stats(z32, h32, y, steps, num_classes, 7)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(float(value), rel=1e-6, abs=1e-6), key
    assert bank.stats(num_classes)["bank/mean_age"] == pytest.approx(np.mean(steps.max() - steps))


def test_stats_of_empty_and_single_class_banks():
    bank = EmbeddingBank(capacity=8, z_dim=2, h_dim=2, keep_last_n_steps=1)
    assert bank.stats(3) == {"bank/size": 0.0, "bank/classes_total": 3.0, "bank/classes_covered": 0.0}
    bank.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.ones(2, 2), torch.tensor([2, 2]), 0)
    s = bank.stats(3)
    assert s["bank/intra_cos"] == pytest.approx(0.0) and s["bank/alignment"] == pytest.approx(2.0)
    assert "bank/inter_centroid_cos" not in s and s["bank/classes_covered"] == 1.0
    with pytest.raises(ValueError, match="labels"):
        bank.stats(2)


def test_embedding_stats_are_the_banks_without_the_prefix():
    rng = np.random.default_rng(3)
    bank = EmbeddingBank(capacity=30, z_dim=4, h_dim=3, keep_last_n_steps=10)
    for step in range(3):
        z, h, y = (torch.from_numpy(a) for a in random_rows(rng, 8, 4, 3, 5))
        bank.add(z, h, y, step)
    z, h, y, _ = bank.copy_live_rows()
    plain = embedding_stats(z, h, y, 5)
    assert "mean_age" not in plain  # no ages given
    assert {f"bank/{k}": v for k, v in plain.items()} == {k: v for k, v in bank.stats(5).items()
                                                          if k != "bank/mean_age"}
    assert list(bank.stats(5))[:8] == ["bank/size", "bank/classes_total", "bank/classes_covered",
                                       "bank/class_count_min", "bank/class_count_median", "bank/class_count_max",
                                       "bank/mean_age", "bank/h_norm_mean"]  # the log record's order
