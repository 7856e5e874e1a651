"""Exports that other tools load without metric_ds: the sentence-transformers layout, and one ONNX graph.

**sentence-transformers.** Every export folder (a run's ``best/``, and ``metric-ds export --format st``) also holds
the files that make ``SentenceTransformer(folder)`` return the model's SupCon embedding ``z``. Writing them needs
no sentence-transformers; they use the module names that every sentence-transformers release from 2 to 6 loads::

    modules.json                 transformer -> pooling -> [pooler] -> [projection] -> normalize
    sentence_bert_config.json    max_seq_length from the training config
    1_Pooling/config.json        mean or cls (``pooler`` pools the first token, then the next module)
    2_Pooler/                    model.pooling: pooler only: the encoder's own pooler, Dense + tanh on the first
                                 token, as BERT, RoBERTa and MPNet compute ``pooler_output``; for an encoder
                                 with another pooler the layout is left out with a warning (``metric-ds export
                                 --format st`` refuses it), while the ONNX export has every pooler
    3_Projection/                model.projection_dim only: the SupCon projection head as a Dense (no activation)
    4_Normalize/                 z = unit-norm
    config.json                  + ``id2label`` / ``label2id`` from labels.json (AutoModel still loads it)

The classifier head reads the pooled ``h``: every module before ``projection`` and ``normalize`` (the README's
"Use your model" section shows the few lines); its weights stay in ``heads.safetensors``.

**ONNX.** :func:`export_onnx` writes ``model.onnx``: encoder, pooling and heads in one graph with inputs
``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer makes them), dynamic batch and
sequence axes, outputs ``logits`` and ``embedding`` (the normalised ``z``), and the tokenizer beside it. It uses
the ``torch.export``-based exporter (``dynamo=True``, which needs onnxscript): it fails loudly on code it cannot
capture, where the legacy TorchScript tracer (deprecated in torch 2.9) silently freezes Python-side branches of
the trace into constants. The export is checked against PyTorch with ONNX Runtime before it is kept.

sentence-transformers, onnx, onnxscript and onnxruntime are optional (``pip install 'metric-ds[export]'``); a
step that needs a missing one raises :class:`~metric_ds.errors.EnvironmentProblem` with the command.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from metric_ds.errors import EnvironmentProblem, UserError
from metric_ds.model import HEADS_META, HEADS_WEIGHTS, MetricClassifier, load_exported

log = logging.getLogger("metric_ds")

ONNX_FILE = "model.onnx"
ONNX_OUTPUTS = ("logits", "embedding")
ONNX_TOLERANCE = 1e-4
EXPORT_EXTRA = "pip install 'metric-ds[export]'"
# import name -> PyPI name of the optional export packages
OPTIONAL_PACKAGES = {"sentence_transformers": "sentence-transformers", "onnx": "onnx", "onnxscript": "onnxscript",
                     "onnxruntime": "onnxruntime"}
# encoders whose pooler_output is tanh(Dense(first token)), under pooler.dense.*
TANH_POOLERS = {"bert", "roberta", "xlm-roberta", "camembert", "mpnet", "ernie", "megatron-bert", "data2vec-text"}
POOLER_KEYS = ("pooler.dense.weight", "pooler.dense.bias")
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


def resolve_export(path: str | Path) -> Path:
    """An export folder as is; a run folder as its ``best/``.

    Raises:
        UserError: when ``path`` is neither.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such folder; give a run folder (checkpoints_dir/run_name) or an export "
                        "folder such as RUN_DIR/best")
    if (path / HEADS_META).is_file():
        return path
    if (path / "best" / HEADS_META).is_file():
        return path / "best"
    raise UserError(f"{path} is neither a metric_ds export (it has no {HEADS_META}) nor a run folder with an export "
                    f"(no best/{HEADS_META}); give RUN_DIR or RUN_DIR/best of a run that validated at least once")


def training_max_seq_length(folder: str | Path) -> int | None:
    """``training.max_seq_length`` of the config saved in an export, or ``None`` when it has none."""
    path = Path(folder) / "metric_ds_config.yaml"
    if not path.is_file():
        return None
    value = (yaml.safe_load(path.read_text()) or {}).get("training", {}).get("max_seq_length")
    return int(value) if value is not None else None


def _label_names(folder: Path) -> list[Any] | None:
    path = folder / "labels.json"
    return json.loads(path.read_text(encoding="utf-8"))["names"] if path.is_file() else None


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _dense(folder: Path, weight: torch.Tensor, bias: torch.Tensor, activation: str) -> None:
    """A sentence-transformers ``Dense`` module folder."""
    out_features, in_features = weight.shape
    _write_json(folder / "config.json", {"in_features": in_features, "out_features": out_features, "bias": True,
                                         "activation_function": activation})
    save_file({"linear.weight": weight.contiguous(), "linear.bias": bias.contiguous()},
              str(folder / "model.safetensors"))


def _encoder_tensors(folder: Path, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Those of ``keys`` that the encoder's (possibly sharded) safetensors weights hold."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            found.update({k: fh.get_tensor(k) for k in keys if k in fh.keys()})
    return found


def _pooler(folder: Path, model_type: str | None) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The encoder's pooler as ``(weight, bias)`` of Dense + tanh, or why sentence-transformers cannot have it."""
    if model_type not in TANH_POOLERS:
        return (f"model.pooling is pooler, and sentence-transformers can only reproduce the Dense + tanh pooler of "
                f"{', '.join(sorted(TANH_POOLERS))} encoders, not of model_type {model_type!r}")
    found = _encoder_tensors(folder, POOLER_KEYS)
    if len(found) < len(POOLER_KEYS):
        return f"model.pooling is pooler, but the encoder weights in {folder} have no {' and '.join(POOLER_KEYS)}"
    return found[POOLER_KEYS[0]], found[POOLER_KEYS[1]]


def add_label_names(folder: str | Path) -> None:
    """Put ``id2label``/``label2id`` from ``labels.json`` into the encoder's ``config.json``."""
    folder = Path(folder)
    names = _label_names(folder)
    if names is None:
        return
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {str(i): str(name) for i, name in enumerate(names)}
    config["label2id"] = {str(name): i for i, name in enumerate(names)}
    _write_json(folder / "config.json", config)


def write_sentence_transformers(folder: str | Path, max_seq_length: int | None = None, strict: bool = False
                                ) -> None:
    """Add the sentence-transformers layout (see the module docstring) to an export folder, in place.

    Args:
        folder: an export written by :func:`metric_ds.model.export_model`.
        max_seq_length: the truncation length; by default ``training.max_seq_length`` of the folder's
            ``metric_ds_config.yaml``, else the encoder's ``max_position_embeddings``.
        strict: raise when the layout cannot be written (``pooler`` pooling of an encoder whose pooler is not
            BERT's Dense + tanh); otherwise warn and write only ``id2label``, so that training never fails on it.

    Raises:
        UserError: with ``strict``, when the pooler cannot be reproduced.
    """
    folder = Path(folder)
    add_label_names(folder)
    meta = json.loads((folder / HEADS_META).read_text())
    heads = load_file(str(folder / HEADS_WEIGHTS))
    config = json.loads((folder / "config.json").read_text())
    pooler = _pooler(folder, config.get("model_type")) if meta["pooling"] == "pooler" else None
    if isinstance(pooler, str):
        if strict:
            raise UserError(f"{pooler}; export with --format onnx, or train with model.pooling mean or cls")
        log.warning(f"{pooler}: {folder} is written without the sentence-transformers files")
        return
    hidden = int(heads["classifier.weight"].shape[1])
    if max_seq_length is None:
        max_seq_length = training_max_seq_length(folder) or int(config.get("max_position_embeddings", 512))
    modules = [{"name": "transformer", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"name": "pooling", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    _write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": meta["pooling"] in ("cls", "pooler"),
        "pooling_mode_mean_tokens": meta["pooling"] == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    })
    if pooler is not None:
        _dense(folder / "2_Pooler", *pooler, "torch.nn.modules.activation.Tanh")
        modules.append({"name": "pooler", "path": "2_Pooler", "type": "sentence_transformers.models.Dense"})
    if meta.get("projection_dim"):
        _dense(folder / "3_Projection", heads["projection.weight"], heads["projection.bias"],
               "torch.nn.modules.linear.Identity")
        modules.append({"name": "projection", "path": "3_Projection", "type": "sentence_transformers.models.Dense"})
    (folder / "4_Normalize").mkdir(exist_ok=True)
    modules.append({"name": "normalize", "path": "4_Normalize", "type": "sentence_transformers.models.Normalize"})
    _write_json(folder / "modules.json", [{"idx": i, **m} for i, m in enumerate(modules)])


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
    truncates as training did; ``labels.json`` is copied and the graph's metadata holds ``id2label`` and
    ``max_seq_length``.

    Args:
        folder: an export folder.
        out_dir: the output folder (the caller makes the write atomic).
        max_seq_length: default: the training config's.

    Returns:
        the check's largest absolute differences per output.

    Raises:
        EnvironmentProblem: onnxscript or onnxruntime missing, or ONNX Runtime disagreeing with PyTorch.
    """
    require("onnxscript", "the ONNX export")
    require("onnxruntime", "checking the ONNX export")
    folder, out = Path(folder), Path(out_dir)
    model, tokenizer = load_exported(folder)
    if max_seq_length is None:
        max_seq_length = training_max_seq_length(folder) or tokenizer.model_max_length
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
    labels = _label_names(folder)
    program.model.metadata_props.update({
        "producer": "metric_ds", "max_seq_length": str(max_seq_length), "pooling": model.pooling,
        **({"id2label": json.dumps({str(i): str(n) for i, n in enumerate(labels)})} if labels else {}),
    })
    out.mkdir(parents=True, exist_ok=True)
    program.save(out / ONNX_FILE, external_data=big)
    tokenizer.model_max_length = max_seq_length
    tokenizer.save_pretrained(out)
    if labels is not None:
        (out / "labels.json").write_text((folder / "labels.json").read_text(encoding="utf-8"), encoding="utf-8")
    diffs = check_onnx(out / ONNX_FILE, model, tokenizer, max_seq_length)
    if max(diffs.values()) > ONNX_TOLERANCE:
        raise EnvironmentProblem(f"the ONNX export disagrees with PyTorch beyond {ONNX_TOLERANCE}: {diffs}; "
                                 "this is a bug in the exporter for this encoder, please report it")
    return diffs
