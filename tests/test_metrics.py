"""Classification, retrieval and geometry metrics against brute-force numpy / sklearn oracles."""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from metric_ds import metrics as M

SETTINGS = {"recall_at_k": (1, 5, 10), "knn_k": 10, "distance": "cos"}  # metric_validation's defaults
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ------------------------------------------------------------------------------------------------ oracles


def oracle_neighbours(q: np.ndarray, db: np.ndarray, k: int, distance: str) -> tuple[np.ndarray, np.ndarray]:
    """All Q x N scores in float64, sorted by score descending then index ascending."""
    if distance == "cos":
        s = q @ db.T
    else:
        s = -np.sqrt(((q[:, None, :] - db[None, :, :]) ** 2).sum(-1))
    idx = np.arange(db.shape[0])
    order = np.stack([np.lexsort((idx, -row)) for row in s])[:, :k]
    return np.take_along_axis(s, order, 1), order


def oracle_vote(labels: list[int], scores: list[float]) -> int:
    votes, sums = Counter(labels), Counter()
    for lab, sc in zip(labels, scores, strict=True):
        sums[lab] += sc
    return min(votes, key=lambda c: (-votes[c], -sums[c], c))


def oracle_retrieval(qz, qh, qy, dz, dh, dy, ks, knn_k, distance) -> dict[str, float]:
    q, db = (qz, dz) if distance == "cos" else (qh, dh)
    k = min(max(max(ks), knn_k), db.shape[0])
    s, i = oracle_neighbours(q, db, k, distance)
    nl = dy[i]
    out = {f"recall@{K}": float(np.mean([(nl[r, :K] == qy[r]).any() for r in range(len(qy))])) for K in ks}
    kk = min(knn_k, k)
    pred = np.array([oracle_vote(list(nl[r, :kk]), list(s[r, :kk])) for r in range(len(qy))])
    out["knn_acc"] = accuracy_score(qy, pred)
    out["knn_f1"] = f1_score(qy, pred, average="macro")
    return out


def int_embeddings(rng: np.random.Generator, n: int, d: int, low: int = -2, high: int = 3) -> np.ndarray:
    """Small integers: fp32 dot products and squared distances are exact, so ties are exact too."""
    return rng.integers(low, high, size=(n, d)).astype(np.float64)


# -------------------------------------------------------------------------------------------- classification


@pytest.mark.parametrize("n,classes_y,classes_p",
                         [(1, 1, 1), (7, 3, 3), (50, 5, 3), (50, 3, 6), (200, 12, 12)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_equal_sklearn(n, classes_y, classes_p, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes_y, n)
    p = np.where(rng.random(n) < 0.5, y, rng.integers(0, classes_p, n))  # p may miss classes or invent some
    yt, pt = torch.from_numpy(y), torch.from_numpy(p)
    assert M.accuracy(yt, pt) == pytest.approx(accuracy_score(y, p), abs=1e-12)
    assert M.macro_f1(yt, pt) == pytest.approx(f1_score(y, p, average="macro"), abs=1e-12)
    c = int(max(y.max(), p.max())) + 3  # two trailing classes in neither y nor p
    expected = f1_score(y, p, average=None, labels=np.arange(c), zero_division=0)
    np.testing.assert_allclose(M.per_class_f1(yt, pt, c).numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("y,p", [
    ([0, 0, 1, 1], [0, 0, 0, 0]),        # class 1 never predicted
    ([0, 0, 0], [0, 2, 2]),              # class 2 predicted, never true; class 1 in neither (does not count)
    ([3, 3], [3, 3]),                    # only class 3 present: macro over {3}
    ([1, 2, 4, 4], [2, 1, 4, 0]),
])
def test_macro_f1_classes_absent_from_predictions(y, p):
    expected = f1_score(y, p, average="macro")
    assert M.macro_f1(torch.tensor(y), torch.tensor(p)) == pytest.approx(expected, abs=1e-12)


def test_empty_classification():
    e = torch.zeros(0, dtype=torch.long)
    assert M.accuracy(e, e) == 0.0 and M.macro_f1(e, e) == 0.0 and M.confusion_pairs(e, e) == []
    assert M.per_class_f1(e, e, 3).tolist() == [0.0, 0.0, 0.0]


def test_per_class_f1_rejects_ids_beyond_num_classes():
    with pytest.raises(ValueError, match="num_classes=2"):
        M.per_class_f1(torch.tensor([0, 5]), torch.tensor([0, 1]), 2)


@pytest.mark.parametrize("top", [1, 3, 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_confusion_pairs_match_counter(top, seed):
    rng = np.random.default_rng(seed)
    y, p = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    counts = Counter((int(a), int(b)) for a, b in zip(y, p, strict=True) if a != b)
    expected = sorted(((a, b, c) for (a, b), c in counts.items()), key=lambda t: (-t[2], t[0], t[1]))[:top]
    assert M.confusion_pairs(torch.from_numpy(y), torch.from_numpy(p), top=top) == expected
    assert M.confusion_pairs(torch.tensor([1, 2]), torch.tensor([1, 2])) == []


# ------------------------------------------------------------------------------------------------- search


@pytest.mark.parametrize("distance", ["cos", "l2"])
@pytest.mark.parametrize("n_db,k", [(3, 10), (50, 10), (50, 1), (64, 64)])
@pytest.mark.parametrize("query_chunk,db_chunk", [(1, 1), (7, 5), (1024, 13), (16, 8192)])
def test_knn_search_matches_brute_force_with_ties(distance, n_db, k, query_chunk, db_chunk):
    rng = np.random.default_rng(n_db + k)
    db = int_embeddings(rng, n_db, 6)
    db[n_db // 2:] = db[: n_db - n_db // 2]  # duplicated rows: exact score ties across db chunks
    q = int_embeddings(rng, 23, 6)
    s, i = M.knn_search(torch.from_numpy(q).float(), torch.from_numpy(db).float(), k, distance,
                        query_chunk, db_chunk)
    es, ei = oracle_neighbours(q, db, min(k, n_db), distance)
    assert i.shape == (23, min(k, n_db))
    np.testing.assert_array_equal(i.numpy(), ei)
    np.testing.assert_allclose(s.double().numpy(), es, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("distance", ["cos", "l2"])
def test_knn_search_random_floats(distance):
    """Continuous data: the k scores match the fp64 oracle; the items are its items up to fp32 near-ties."""
    rng = np.random.default_rng(5)
    db = rng.normal(size=(300, 16))
    q = rng.normal(size=(40, 16))
    if distance == "cos":
        db /= np.linalg.norm(db, axis=1, keepdims=True)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    s, i = M.knn_search(torch.from_numpy(q).float(), torch.from_numpy(db).float(), 7, distance, 9, 31)
    es, ei = oracle_neighbours(q, db, 7, distance)
    np.testing.assert_allclose(s.double().numpy(), es, atol=1e-4)
    full = q @ db.T if distance == "cos" else -np.sqrt(((q[:, None] - db[None]) ** 2).sum(-1))
    np.testing.assert_allclose(np.take_along_axis(full, i.numpy(), 1), es, atol=1e-4)
    assert (i.numpy() == ei).mean() > 0.99


def test_knn_search_ties_go_to_the_smaller_index():
    db = torch.ones(10, 4)
    s, i = M.knn_search(torch.ones(3, 4), db, 4, "cos", query_chunk=2, db_chunk=3)
    assert i.tolist() == [[0, 1, 2, 3]] * 3


def test_knn_search_empty_queries_and_bad_arguments():
    s, i = M.knn_search(torch.zeros(0, 4), torch.randn(5, 4), 3)
    assert s.shape == (0, 3) and i.shape == (0, 3)
    with pytest.raises(ValueError, match="distance"):
        M.knn_search(torch.randn(2, 4), torch.randn(5, 4), 3, "dot")
    with pytest.raises(ValueError, match="database"):
        M.knn_search(torch.randn(2, 4), torch.randn(5, 3), 3)


@pytest.mark.parametrize("labels,scores,expected", [
    ([[1, 2, 2, 1]], [[0.9, 0.1, 0.1, 0.8]], [1]),      # 2-2 vote tie: larger summed score wins
    ([[2, 1, 1, 2]], [[0.5, 0.5, 0.5, 0.5]], [1]),      # vote and score tie: smaller class id
    ([[3, 0, 3]], [[0.1, 0.9, 0.2]], [3]),              # plain majority beats the best single score
    ([[4]], [[-2.0]], [4]),
    ([[2, 5], [5, 2]], [[-1.0, -1.0], [-3.0, -0.5]], [2, 2]),  # l2-style negative scores
])
def test_knn_vote_tie_rules(labels, scores, expected):
    assert M.knn_vote(torch.tensor(labels), torch.tensor(scores)).tolist() == expected


# ---------------------------------------------------------------------------------------------- retrieval


@pytest.mark.parametrize("distance", ["cos", "l2"])
@pytest.mark.parametrize("n_db,knn_k,ks",
                         [(2, 5, [1, 5]), (40, 5, [1, 5, 10]), (90, 8, [3]), (90, 1, [1, 2])])
@pytest.mark.parametrize("query_chunk,bank_chunk", [(1, 1), (6, 17), (1024, 8192)])
@pytest.mark.parametrize("device", DEVICES)
def test_retrieval_metrics_match_oracle(distance, n_db, knn_k, ks, query_chunk, bank_chunk, device):
    rng = np.random.default_rng(n_db * 7 + knn_k)
    dz, dh = int_embeddings(rng, n_db, 4, -1, 2), int_embeddings(rng, n_db, 6)
    dz[n_db // 2:] = dz[: n_db - n_db // 2]  # duplicates: ties in both the search and the vote
    dy = rng.integers(0, 4, n_db)
    qz, qh, qy = int_embeddings(rng, 33, 4, -1, 2), int_embeddings(rng, 33, 6), rng.integers(0, 5, 33)
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    got = M.retrieval_metrics(t(qz).float(), t(qh).float(), t(qy), (t(dz).float(), t(dh).float(), t(dy)),
                              recall_at_k=ks, knn_k=knn_k, distance=distance,
                              query_chunk=query_chunk, bank_chunk=bank_chunk)
    expected = oracle_retrieval(qz, qh, qy, dz, dh, dy, ks, knn_k, distance)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key


def test_retrieval_metrics_accepts_a_bank_and_bf16():
    from metric_ds.bank import EmbeddingBank

    rng = np.random.default_rng(3)
    dz, dh, dy = int_embeddings(rng, 30, 4), int_embeddings(rng, 30, 5), rng.integers(0, 3, 30)
    qz, qh, qy = int_embeddings(rng, 12, 4), int_embeddings(rng, 12, 5), rng.integers(0, 3, 12)
    bank = EmbeddingBank(capacity=40, z_dim=4, h_dim=5, keep_last_n_steps=3)
    for step, rows in enumerate(np.array_split(np.arange(30), 3)):
        bank.add(torch.from_numpy(dz[rows]).bfloat16(), torch.from_numpy(dh[rows]).bfloat16(),
                 torch.from_numpy(dy[rows]), step)
    for distance in ("cos", "l2"):
        got = M.retrieval_metrics(torch.from_numpy(qz).bfloat16(), torch.from_numpy(qh).bfloat16(),
                                  torch.from_numpy(qy), bank, recall_at_k=[1, 4], knn_k=3, distance=distance)
        expected = oracle_retrieval(qz, qh, qy, dz, dh, dy, [1, 4], 3, distance)
        assert got == pytest.approx(expected, abs=1e-12)


def test_retrieval_metrics_empty_bank_warns_once(monkeypatch):
    monkeypatch.setattr(M, "_warned_empty", False)
    empty = (torch.zeros(0, 4), torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    q = (torch.randn(3, 4), torch.randn(3, 6), torch.tensor([0, 1, 2]))
    with pytest.warns(UserWarning, match="empty"):
        assert M.retrieval_metrics(*q, empty, **SETTINGS) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert M.retrieval_metrics(*q, empty, **SETTINGS) == {}
    no_queries = (torch.zeros(0, 4), torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    db = (torch.randn(2, 4), torch.randn(2, 6), torch.tensor([0, 1]))
    assert M.retrieval_metrics(*no_queries, db, **SETTINGS) == {}


@pytest.mark.parametrize("kwargs,match", [({"recall_at_k": []}, "recall_at_k"), ({"knn_k": 0}, "knn_k"),
                                          ({"distance": "dot"}, "distance")])
def test_retrieval_metrics_rejects_bad_arguments(kwargs, match):
    q = (torch.randn(3, 4), torch.randn(3, 6), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=match):
        M.retrieval_metrics(*q, (torch.randn(2, 4), torch.randn(2, 6), torch.tensor([0, 1])), **{**SETTINGS, **kwargs})


# ----------------------------------------------------------------------------------------------- geometry


def oracle_alignment(z: np.ndarray, y: np.ndarray) -> float:
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    mask = (y[:, None] == y[None]) & ~np.eye(len(y), dtype=bool)
    return float(d2[mask].mean()) if mask.any() else float("nan")


def oracle_uniformity(z: np.ndarray, t: float = 2.0) -> float:
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    return float(np.log(np.exp(-t * d2)[~np.eye(len(z), dtype=bool)].mean()))


@pytest.mark.parametrize("n,classes", [(2, 1), (17, 3), (120, 9)])
@pytest.mark.parametrize("max_block", [1, 50, 1 << 22])
def test_alignment_and_uniformity_match_brute_force(n, classes, max_block):
    rng = np.random.default_rng(n)
    z = rng.normal(size=(n, 8))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    z[-1] = z[0]  # a duplicate (distance 0 off the diagonal)
    y = rng.integers(0, classes, n) * 10  # labels need not be contiguous
    got = M.alignment(torch.from_numpy(z), torch.from_numpy(y))
    assert got == pytest.approx(oracle_alignment(z, y), rel=1e-9)
    got = M.uniformity(torch.from_numpy(z).float(), max_block=max_block)
    assert got == pytest.approx(oracle_uniformity(z), abs=1e-5)


def test_geometry_undefined_cases_are_nan():
    assert np.isnan(M.alignment(torch.randn(3, 4), torch.tensor([0, 1, 2])))
    assert np.isnan(M.alignment(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)))
    assert np.isnan(M.uniformity(torch.randn(1, 4)))
