"""flash_attention_2 is refused at startup (train and validate) where it cannot run: fp32, no GPU, no package."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import yaml
from conftest import make_frame

from metric_ds.cli import main
from metric_ds.config import validate_config
from metric_ds.errors import UserError
from metric_ds.model import check_attention
from metric_ds.preflight import check_precision

FP32 = "runs only in fp16 or bf16, but training.mixed_precision is 'no'"
NO_GPU = "needs a CUDA GPU and none is visible"
NO_PACKAGE = "needs the flash_attn package"


@pytest.fixture
def machine(monkeypatch):
    """Pretend a GPU is or is not visible and flash_attn is or is not installed."""
    def set_machine(gpu: bool, flash_attn: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (object() if flash_attn else None) if name == "flash_attn"
                            else real(name, *a))
    return set_machine


@pytest.mark.parametrize("precision,gpu,flash_attn,expected", [
    ("bf16", True, True, []),
    ("fp16", True, True, []),
    ("no", True, True, [FP32]),
    ("bf16", True, False, [NO_PACKAGE]),
    ("bf16", False, True, [NO_GPU]),
    ("no", False, False, [FP32, NO_GPU, NO_PACKAGE]),  # every reason at once
    (None, True, True, []),  # evaluation: the caller picks the dtype, only the machine is checked
    (None, True, False, [NO_PACKAGE]),
])
def test_check_attention(machine, precision, gpu, flash_attn, expected):
    machine(gpu, flash_attn)
    if not expected:
        check_attention("flash_attention_2", precision)
        return
    with pytest.raises(UserError) as info:
        check_attention("flash_attention_2", precision)
    assert len(info.value.messages) == len(expected)
    for message, want in zip(info.value.messages, expected):
        assert message.startswith("training.attention_implementation: flash_attention_2") and want in message


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_other_implementations_need_nothing(machine, attn):
    machine(False, False)
    check_attention(attn, "no")


def test_check_precision_includes_the_attention_check(machine):
    machine(True, True)
    cfg = validate_config({"data": {"train_path": "unused"},
                           "training": {"attention_implementation": "flash_attention_2", "mixed_precision": "no"}})
    with pytest.raises(UserError, match="training.mixed_precision is 'no'"):
        check_precision(cfg)


def test_validate_refuses_flash_attention_in_fp32(tmp_path, capsys, machine):
    machine(True, True)
    table = tmp_path / "t.parquet"
    make_frame(40).to_parquet(table)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"train_path": str(table)},
                                   "training": {"attention_implementation": "flash_attention_2"}}))
    assert main(["validate", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "error: training.attention_implementation: flash_attention_2 runs only in fp16 or bf16" in err
    assert "Traceback" not in err
