"""Checkpoints are verified before use (a damaged one is refused or skipped, never resumed silently) and a failed
save is a clear error that leaves the previous checkpoint intact."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from conftest import run

from metric_ds.checkpoint import resolve_resume
from metric_ds.errors import UserError


def _flip(path: Path, offset: int, n: int = 256) -> None:
    data = bytearray(path.read_bytes())
    start = min(offset, len(data) - n)
    data[start:start + n] = bytes(255 - b for b in data[start:start + n])
    path.write_bytes(bytes(data))


def test_a_corrupt_checkpoint_is_refused_or_skipped(checkpointed):
    run_dir, _ = checkpointed
    step3 = run_dir / "checkpoints" / "step-3"
    model_file = next((step3 / "ds").rglob("*model_states.pt"))
    _flip(model_file, 4096)
    with pytest.raises(UserError, match=r"model_states.pt is damaged.*newest complete checkpoint there is .*step-2"):
        resolve_resume(str(step3), run_dir)
    with pytest.warns(UserWarning, match="resuming from step-2"):
        assert resolve_resume("latest", run_dir) == run_dir / "checkpoints" / "step-2"


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_damaged_client_state_is_a_clear_error(checkpointed, damage):
    run_dir, _ = checkpointed
    step3 = run_dir / "checkpoints" / "step-3"
    client = step3 / "client_state_rank0.pt"
    if damage == "truncate":
        client.write_bytes(client.read_bytes()[:100])
    elif damage == "delete":
        client.unlink()
    else:
        _flip(client, 200)
    with pytest.raises(UserError, match="client_state_rank0.pt is (truncated|missing|damaged)"):
        resolve_resume(str(step3), run_dir)


def test_corrupt_checkpoint_never_resumes_silently(checkpointed, tiny_model_dir, tiny_table, tmp_path):
    run_dir, common = checkpointed
    for step in (1, 2, 3):
        _flip(next((run_dir / "checkpoints" / f"step-{step}" / "ds").rglob("*model_states.pt")), 2048)
    with pytest.raises(UserError, match="no checkpoint under .* can be loaded"):
        run(tmp_path, tiny_model_dir, tiny_table, training__resume_from="latest", **common)


def test_a_full_disk_during_a_save_is_a_clear_error(tmp_path, tiny_model_dir, tiny_table, monkeypatch):
    import metric_ds.checkpoint as ckpt_mod

    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, path, *a, **k):
        calls["n"] += 1
        if "client_state" in str(path) and ".tmp-step-2" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(UserError) as info:
        run(tmp_path, tiny_model_dir, tiny_table, training__max_steps=3, checkpointing__save_every_n_batches=1)
    msg = info.value.messages[0]
    assert "could not save checkpoint step-2" in msg and "no space left on device" in msg
    assert "the previous checkpoint step-1 is intact" in msg
    root = tmp_path / "runs" / "t" / "checkpoints"
    assert not list(root.glob(".tmp-*")) and (root / "latest").read_text() == "step-1"


def test_the_fallback_warning_names_every_checkpoint_it_skipped(tmp_path):
    from metric_ds.checkpoint import write_manifest

    root = tmp_path / "run" / "checkpoints"
    for step in (1, 2, 3):
        (root / f"step-{step}" / "ds").mkdir(parents=True)
        (root / f"step-{step}" / "ds" / "model_states.pt").write_bytes(bytes(range(256)) * 8)
        write_manifest(root / f"step-{step}")
    (root / "latest").write_text("step-3")
    _flip(root / "step-3" / "ds" / "model_states.pt", 0)
    (root / "step-2" / "ds" / "model_states.pt").unlink()
    with pytest.warns(UserWarning) as caught:
        assert resolve_resume("latest", tmp_path / "run") == root / "step-1"
    text = "\n".join(str(w.message) for w in caught)
    assert "skipped 2 checkpoint(s)" in text and "resuming from step-1" in text
    assert "step-3/ds/model_states.pt is damaged" in text and "step-2/ds/model_states.pt is missing" in text
