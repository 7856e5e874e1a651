"""metric_ds.load(): predict, embed and k-NN on a tiny trained run; length-sorted batches keep input order."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_frame

import metric_ds
from metric_ds.data.collate import length_sorted_batches
from metric_ds.errors import UserError
from metric_ds.evaluator import ShardedBatches
from metric_ds.inference import LoadedModel

TEXTS = ["card", "refund please now", "", "transfer transfer transfer transfer transfer atm cash fee top up",
         "pin lost", "exchange fee account lost card please help me", "atm"]


@pytest.fixture(scope="module")
def model(tiny_run) -> LoadedModel:
    return metric_ds.load(tiny_run / "best", device="cpu", batch_size=2)


def one_by_one(model: LoadedModel, texts: list[str]):
    """The model's outputs text by text, with no batching and no padding: the reference for order."""
    out = {"logits": [], "h": [], "z": []}
    for t in texts:
        enc = model.tokenizer([t], truncation=True, max_length=model.max_seq_length, return_tensors="pt")
        with torch.no_grad():
            res = model.model(**enc)
        for k in out:
            out[k].append(getattr(res, k)[0])
    return {k: torch.stack(v) for k, v in out.items()}


def test_load_resolves_run_folder_and_reads_config(tiny_run, model):
    again = metric_ds.load(tiny_run, device="cpu")
    assert again.folder == tiny_run / "best" and model.max_seq_length == 16
    assert model.labels == [f"class_{i}" for i in range(4)] and model.embedding_dim == 16
    assert "4 labels" in repr(model)


@pytest.mark.parametrize("bad", ["missing", "plain_folder", "no_labels"])
def test_load_refuses_what_is_not_an_export(tmp_path, tiny_run, tiny_model_dir, bad):
    path = {"missing": tmp_path / "nothing", "plain_folder": tiny_model_dir}.get(bad)
    if bad == "no_labels":
        import shutil

        path = tmp_path / "copy"
        shutil.copytree(tiny_run / "best", path)
        (path / "labels.json").unlink()
    with pytest.raises(UserError, match="labels.json" if bad == "no_labels" else "best/"):
        metric_ds.load(path)


def test_predict_matches_unbatched_outputs_in_input_order(model):
    ref = one_by_one(model, TEXTS)
    pred = model.predict(TEXTS, top_k=3)
    probs = torch.softmax(ref["logits"], 1).numpy()
    np.testing.assert_allclose(pred.probabilities, probs, atol=1e-5)
    assert pred.labels == [model.labels[i] for i in probs.argmax(1)]
    np.testing.assert_allclose(pred.scores, probs.max(1), atol=1e-5)
    assert pred.top_k_scores.shape == (len(TEXTS), 3) and all(np.diff(pred.top_k_scores, axis=1).ravel() <= 0)
    assert [row[0] for row in pred.top_k_labels] == pred.labels
    np.testing.assert_allclose(pred.probabilities.sum(1), 1, atol=1e-5)


def test_predict_caps_top_k_and_takes_a_single_string(model):
    assert model.predict(TEXTS, top_k=99).top_k_scores.shape == (len(TEXTS), 4)
    assert len(model.predict("card lost").labels) == 1
    with pytest.raises(UserError, match="top_k"):
        model.predict(TEXTS, top_k=0)


@pytest.mark.parametrize("which,normalize", [("z", True), ("z", False), ("h", True), ("h", False)])
def test_embed_matches_the_model(model, which, normalize):
    ref = one_by_one(model, TEXTS)
    with torch.no_grad():
        vec = ref["h"] if which == "h" else model.model.projection(ref["h"])
    if normalize:
        vec = torch.nn.functional.normalize(vec, dim=-1)
    out = model.embed(TEXTS, normalize=normalize, which=which)
    assert out.dtype == np.float32 and out.shape == (len(TEXTS), 16 if which == "z" else 32)
    np.testing.assert_allclose(out, vec.numpy(), atol=1e-5)
    if which == "z" and normalize:
        np.testing.assert_allclose(out, ref["z"].numpy(), atol=1e-5)


def test_texts_that_are_not_strings_are_named(model):
    with pytest.raises(UserError, match=r"not text \(NoneType\) at position\(s\) 1 \(0-based\)"):
        model.embed(["a", None])
    assert model.embed([]).shape == (0, 16)


@pytest.mark.parametrize("distance", ["cos", "l2"])
def test_knn_votes_with_the_metrics_code(model, distance):
    df = make_frame(40, seed=5).drop_duplicates("text")
    bank = model.build_bank(df["text"], df["label"])
    assert len(bank) == len(df) and bank.label_map.names == sorted(set(df["label"]))
    # each bank text's nearest neighbour is itself
    res = model.knn(df["text"].tolist(), bank, k=1, distance=distance)
    assert res.labels == df["label"].tolist() and (res.neighbours[:, 0] == np.arange(len(df))).all()
    res = model.knn(TEXTS, bank, k=5, distance=distance)
    assert res.neighbours.shape == (len(TEXTS), 5) and ((res.scores > 0) & (res.scores <= 1)).all()
    for i, label in enumerate(res.labels):  # the winner has the most votes
        votes = pd.Series(df["label"].to_numpy()[res.neighbours[i]]).value_counts()
        assert votes[label] == votes.max()


def test_knn_bank_defaults_to_the_training_table(tiny_run, model):
    train = json.loads((tiny_run / "best" / "training_data.json").read_text())["train"]
    assert len(model.bank_from_table()) == len(pd.read_parquet(train))
    assert model.knn(TEXTS, k=3).labels == model.knn(TEXTS, model.bank_from_table(train), k=3).labels
    with pytest.raises(UserError, match="missing column"):
        model.bank_from_table(pd.DataFrame({"text": ["a"]}))
    with pytest.raises(UserError, match="2 texts but 1 labels"):
        model.build_bank(["a", "b"], ["x"])


def test_length_sorted_batches():
    lengths = [3, 9, 1, 9, 5, 2, 7]
    batches = length_sorted_batches(lengths, 3)
    assert batches == [[1, 3, 6], [4, 0, 5], [2]]  # longest first; equal lengths keep their order
    assert length_sorted_batches([], 3) == []


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_length_sorted_batches_cover_every_row_once(world):
    lengths = np.random.default_rng(0).integers(1, 50, size=23).tolist()
    shards = [list(ShardedBatches(23, 4, r, world, lengths=lengths)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of forwards on every rank
    rows = sorted(i for s in shards for b in s for i in b)
    assert rows == list(range(23))
    for s in shards:
        for b in s:
            assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


def test_evaluate_gives_the_same_outputs_sorted_or_not(tiny_run, model):
    from metric_ds.commands.evaluate import embed_table
    from metric_ds.data.labels import LabelMap

    df = make_frame(30, seed=2)
    df.loc[3, "text"] = "card " * 20  # lengths differ
    df["label_id"] = LabelMap(model.labels).encode(df["label"])
    a = embed_table(model.model, model.tokenizer, df, 16, 4, length_sorted=True)
    b = embed_table(model.model, model.tokenizer, df, 16, 4, length_sorted=False)
    assert torch.equal(a["index"], torch.arange(30))
    for key in ("logits", "z", "labels"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


def test_old_names_still_import_with_a_deprecation_warning():
    import metric_ds.inference as inference

    assert metric_ds.LoadedModel is LoadedModel and metric_ds.ReferenceSet is inference.ReferenceSet
    with pytest.warns(DeprecationWarning, match="use LoadedModel"):
        assert metric_ds.MetricModel is LoadedModel
    with pytest.warns(DeprecationWarning, match="use ReferenceSet"):
        from metric_ds.inference import Bank
    assert Bank is inference.ReferenceSet
    with pytest.raises(AttributeError):
        metric_ds.nothing_here  # noqa: B018
