"""Startup checks, before anything trains: one class, max_seq_length beyond the model, an unusable checkpoints_dir."""
from __future__ import annotations

import os

import pytest
from conftest import make_frame, run

from metric_ds.errors import UserError


def test_one_class_is_refused(tmp_path, tiny_model_dir):
    df = make_frame(40)
    df["label"] = "only"
    path = tmp_path / "one.parquet"
    df.to_parquet(path)
    with pytest.raises(UserError, match="holds one class"):
        run(tmp_path, tiny_model_dir, path)


def test_max_seq_length_beyond_the_model_is_refused_at_startup(tmp_path, tiny_model_dir, tiny_table):
    with pytest.raises(UserError, match="max_seq_length: 512 is longer than the model .* at most 128"):
        run(tmp_path, tiny_model_dir, tiny_table, training__max_seq_length=512)


def test_unusable_checkpoints_dir_is_refused_at_startup(tmp_path, tiny_model_dir, tiny_table, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        run(tmp_path, tiny_model_dir, tiny_table, checkpointing__checkpoints_dir=str(blocker / "runs"))
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(UserError, match="is not writable"):
        run(tmp_path, tiny_model_dir, tiny_table)
