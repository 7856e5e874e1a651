"""The ONNX export: one graph that other tools run without metric_ds or PyTorch.

:func:`export_onnx` writes ``model.onnx``: encoder, pooling and heads in one graph with inputs
``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer makes them), dynamic batch and
sequence axes, outputs ``logits`` and ``embedding`` (the normalised ``z``), and the tokenizer beside it. It uses
the ``torch.export``-based exporter (``dynamo=True``, which needs onnxscript): it fails loudly on code it cannot
capture, where the legacy TorchScript tracer (deprecated in torch 2.9) silently freezes Python-side branches of
the trace into constants. The export is checked against PyTorch with ONNX Runtime before it is kept.

The sentence-transformers files are part of every model folder (:mod:`metric_ds.st_layout`, written by
:mod:`metric_ds.artifact`); ``metric-ds export --format st`` copies the folder and rewrites them.

sentence-transformers, onnx, onnxscript and onnxruntime are optional (``pip install 'metric-ds[export]'``); a
step that needs a missing one raises :class:`~metric_ds.errors.EnvironmentProblem` with the command.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from metric_ds.artifact import LABELS, load_model, read_label_names, read_max_seq_length
from metric_ds.errors import EnvironmentProblem
from metric_ds.model import MetricClassifier
from metric_ds.open_set import OPEN_SET_FILE, REFERENCE_FILE

ONNX_FILE = "model.onnx"
ONNX_OUTPUTS = ("logits", "embedding")
ONNX_TOLERANCE = 1e-4
EXPORT_EXTRA = "pip install 'metric-ds[export]'"
# import name -> PyPI name of the optional export packages
OPTIONAL_PACKAGES = {"sentence_transformers": "sentence-transformers", "onnx": "onnx", "onnxscript": "onnxscript",
                     "onnxruntime": "onnxruntime"}
# sample texts for tracing and for checking an export: different lengths, so that the batch is padded
CHECK_TEXTS = ["I lost my card", "How long does a transfer from another country take to arrive?", "refund"]


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional package, or say which one is missing and how to install it.

    Raises:
        EnvironmentProblem: naming the package and the pip command.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        pip_name = OPTIONAL_PACKAGES.get(module, module)
        raise EnvironmentProblem(f"{purpose} needs the optional package {pip_name}, which is not installed: "
                                 f"{EXPORT_EXTRA} (or pip install {pip_name})") from None


class OnnxGraph(nn.Module):
    """What the ONNX graph computes: :class:`MetricClassifier`'s ``(logits, z)`` for token ids."""

    def __init__(self, model: MetricClassifier):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids, attention_mask, token_type_ids)
        return out.logits.float(), out.z


def _input_names(tokenizer: Any) -> list[str]:
    names = ["input_ids", "attention_mask"]
    return names + (["token_type_ids"] if "token_type_ids" in tokenizer.model_input_names else [])


def check_onnx(onnx_path: str | Path, model: MetricClassifier, tokenizer: Any, max_seq_length: int,
               texts: list[str] = CHECK_TEXTS) -> dict[str, float]:
    """Run ``texts`` through ONNX Runtime (batch 1 and all at once) and PyTorch.

    Returns:
        the largest absolute difference of each output, ``{"logits": ..., "embedding": ...}``.
    """
    ort = require("onnxruntime", "checking the ONNX export")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = _input_names(tokenizer)
    diffs = dict.fromkeys(ONNX_OUTPUTS, 0.0)
    for batch in ([texts[0]], texts):
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_seq_length, return_tensors="pt")
        got = session.run(list(ONNX_OUTPUTS), {k: enc[k].numpy() for k in names})
        with torch.no_grad():
            want = OnnxGraph(model)(*(enc[k] for k in names))
        for name, g, w in zip(ONNX_OUTPUTS, got, want):
            diffs[name] = max(diffs[name], float((torch.from_numpy(g) - w).abs().max()))
    return diffs


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Only errors from these loggers, and no progress lines on stdout, while the exporter runs."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _name_outputs(graph: Any, names: tuple[str, ...]) -> None:
    """Name the graph's outputs; an inner value that already has one of the names (the encoder's ``embedding``
    op) is renamed first, as ONNX names must be unique."""
    taken = set(names)
    for node in graph.all_nodes():
        for value in node.outputs:
            if value.name in taken and value not in graph.outputs:
                value.name = f"{value.name}_inner"
    for value, name in zip(graph.outputs, names):
        value.name = name


def export_onnx(folder: str | Path, out_dir: str | Path, max_seq_length: int | None = None) -> dict[str, float]:
    """Write ``model.onnx`` and the tokenizer into ``out_dir`` (created), and check it against PyTorch.

    The tokenizer is saved with ``model_max_length = max_seq_length``, so ``tokenizer(texts, truncation=True)``
    truncates as training did; ``labels.json`` (and a calibrated folder's ``open_set.json`` and
    ``reference.safetensors``, :mod:`metric_ds.open_set`) are copied and the graph's metadata holds ``id2label`` and
    ``max_seq_length``.

    Args:
        folder: a model folder.
        out_dir: the output folder (the caller makes the write atomic).
        max_seq_length: default: the training config's (:func:`metric_ds.artifact.read_max_seq_length`).

    Returns:
        the check's largest absolute differences per output.

    Raises:
        EnvironmentProblem: onnxscript or onnxruntime missing, or ONNX Runtime disagreeing with PyTorch.
    """
    require("onnxscript", "the ONNX export")
    require("onnxruntime", "checking the ONNX export")
    folder, out = Path(folder), Path(out_dir)
    model, tokenizer = load_model(folder)
    if max_seq_length is None:
        max_seq_length = read_max_seq_length(folder)
    names = _input_names(tokenizer)
    example = tokenizer(CHECK_TEXTS[:2], padding=True, return_tensors="pt")
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    # weights over 2 GB cannot sit inside the .onnx protobuf
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1_800_000_000
    with warnings.catch_warnings(), _quiet("torch.onnx", "torch.export", "torch._dynamo"):
        # the same axis name on several inputs is one dimension, which is what we mean; the exporter says so
        warnings.filterwarnings("ignore", message=".*axis name.*", category=UserWarning)
        program = torch.onnx.export(OnnxGraph(model).eval(), tuple(example[k] for k in names), dynamo=True,
                                    input_names=names, dynamic_shapes=axes, verbose=False)
    _name_outputs(program.model.graph, ONNX_OUTPUTS)
    labels = read_label_names(folder)
    program.model.metadata_props.update({
        "producer": "metric_ds", "max_seq_length": str(max_seq_length), "pooling": model.pooling,
        **({"id2label": json.dumps({str(i): str(n) for i, n in enumerate(labels)})} if labels else {}),
    })
    out.mkdir(parents=True, exist_ok=True)
    program.save(out / ONNX_FILE, external_data=big)
    tokenizer.model_max_length = max_seq_length
    tokenizer.save_pretrained(out)
    if labels is not None:
        (out / LABELS).write_text((folder / LABELS).read_text(encoding="utf-8"), encoding="utf-8")
    for name in (OPEN_SET_FILE, REFERENCE_FILE):  # what rejection needs: the thresholds, centroids, reference rows
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
    diffs = check_onnx(out / ONNX_FILE, model, tokenizer, max_seq_length)
    if max(diffs.values()) > ONNX_TOLERANCE:
        raise EnvironmentProblem(f"the ONNX export disagrees with PyTorch beyond {ONNX_TOLERANCE}: {diffs}; "
                                 "this is a bug in the exporter for this encoder, please report it")
    return diffs
