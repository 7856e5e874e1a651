"""TF32 and the fused op (metric_ds.ops.precision): the self-check and the op's own matmuls run in IEEE fp32 whatever
the process's setting, unless ``training.allow_tf32`` asked for TF32, and the caller's setting comes back after.

On CPU the TF32 settings change no arithmetic, so these tests check the settings that the op and the self-check
see, and that they are restored; on a GPU the same settings decide cuBLAS's precision."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import metric_ds.ops as ops
from metric_ds.config import Config
from metric_ds.env_report import env_report
from metric_ds.ops import fused, precision, selfcheck

needs_op = pytest.mark.skipif(not ops.op_status()["cpu_available"], reason="fused op not built for CPU")
USER_SETTINGS = {
    "default": lambda: None,
    "high": lambda: torch.set_float32_matmul_precision("high"),  # the usual way users turn TF32 on
    "medium": lambda: torch.set_float32_matmul_precision("medium"),
    "legacy flag": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "per-backend switch": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),  # torch >= 2.9
}


def _try(fn):
    try:
        return fn()
    except RuntimeError as exc:  # torch refuses some getters after a mix of its legacy and new APIs
        return f"refused: {str(exc)[:40]}"


def user_view() -> tuple:
    """What a user can read of the fp32 matmul settings."""
    return (_try(lambda: torch.backends.cuda.matmul.allow_tf32), _try(torch.get_float32_matmul_precision),
            precision._get("cuda"), precision._get("mkldnn"))


def op_view() -> tuple[str | None, str | None]:
    """The settings that decide the precision of a matmul on CUDA and on CPU (oneDNN)."""
    return precision._get("cuda"), precision._get("mkldnn")


IEEE = ("ieee", "ieee")


@pytest.fixture(autouse=True)
def restore_torch(monkeypatch):
    """Each test starts from torch's defaults and gives them back (they are process-wide)."""
    monkeypatch.setattr(precision, "_state", {"allow_tf32": False})
    before = {b: precision._get(b) for b in precision._BACKENDS}
    legacy = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(legacy)
    for backend, value in before.items():
        precision._set(backend, value)


@pytest.mark.parametrize("setting", list(USER_SETTINGS))
def test_ieee_inside_and_the_users_setting_restored(setting):
    USER_SETTINGS[setting]()
    before = user_view()
    with precision.ieee_fp32_matmuls():
        assert op_view() == IEEE
        if setting != "per-backend switch":  # after a mix of torch's two switches, torch refuses the legacy getter
            assert torch.backends.cuda.matmul.allow_tf32 is False
    assert user_view() == before
    with pytest.raises(KeyError), precision.ieee_fp32_matmuls():  # restored on an exception too
        raise KeyError
    assert user_view() == before


def test_allow_tf32_turns_it_on_and_the_op_keeps_it():
    precision.allow_tf32(True)
    assert torch.backends.cuda.matmul.allow_tf32 is True and precision.tf32_allowed()
    with precision.ieee_fp32_matmuls():
        assert precision._get("cuda") == "tf32"  # the op's own calls: as asked
    with precision.ieee_fp32_matmuls(force=True):
        assert op_view() == IEEE  # the self-check: never TF32
    assert precision._get("cuda") == "tf32"


def test_allow_tf32_false_leaves_the_process_setting_alone():
    torch.set_float32_matmul_precision("high")
    precision.allow_tf32(False)
    assert torch.get_float32_matmul_precision() == "high" and not precision.tf32_allowed()


class OpSpy(TorchDispatchMode):
    """Records the matmul settings in force when the op's forward and backward kernels are called."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("metric_ds."):
            self.seen[name.split(".")[-1]] = op_view()
        return func(*args, **(kwargs or {}))


def op_call():
    z = F.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(3)), dim=1).requires_grad_()
    y = torch.arange(40) % 5
    spy = OpSpy()
    with spy:
        loss, _ = fused.supcon_loss_fused(z, y, 0.1, 0, 40, None, num_classes=5)
        loss.backward()
    return spy.seen


@needs_op
def test_the_ops_matmuls_run_without_tf32():
    torch.set_float32_matmul_precision("high")
    before = user_view()
    assert op_call() == {"supcon_fwd": IEEE, "supcon_bwd": IEEE}
    assert user_view() == before


@needs_op
def test_the_ops_matmuls_use_tf32_when_the_config_asks():
    precision.allow_tf32(True)
    assert op_call()["supcon_fwd"][0] == "tf32" and op_call()["supcon_bwd"][0] == "tf32"


@needs_op
@pytest.mark.parametrize("allowed", [False, True])
def test_the_self_check_runs_without_tf32_and_restores(monkeypatch, allowed):
    """Under TF32 a correct op and the reference round apart by more than the self-check's tolerance."""
    monkeypatch.setattr(selfcheck, "_verdicts", {})
    seen = []

    def spying(fn):
        def spy(*args, **kwargs):
            seen.append(op_view())
            return fn(*args, **kwargs)
        return spy

    monkeypatch.setattr(fused, "supcon_loss_fused", spying(fused.supcon_loss_fused))
    monkeypatch.setattr(selfcheck, "supcon_loss_reference", spying(selfcheck.supcon_loss_reference))
    torch.set_float32_matmul_precision("high")
    precision.allow_tf32(allowed)
    before = user_view()
    assert selfcheck.check(torch.device("cpu"), torch.float32) is None
    assert len(seen) == 2 * len(selfcheck._SLICES) and set(seen) == {IEEE}
    assert user_view() == before


def test_env_says_which_precision(monkeypatch):
    monkeypatch.delenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", raising=False)
    line = [r for r in env_report().splitlines() if r.startswith("supcon op: fp32 matmuls")]
    assert len(line) == 1 and "IEEE fp32" in line[0] and "training.allow_tf32" in line[0]
    precision.allow_tf32(True)
    assert "TF32 on CUDA (training.allow_tf32: true)" in precision.describe()
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")
    assert "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 forces it" in precision.describe()


def test_the_config_key():
    assert Config.model_validate({"model_name": "m", "data": {"train_path": "t.parquet"}}).training.allow_tf32 is False
    cfg = Config.model_validate({"model_name": "m", "data": {"train_path": "t.parquet"},
                                 "training": {"allow_tf32": True}})
    assert cfg.training.allow_tf32 is True
