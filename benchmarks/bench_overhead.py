"""Trainer overhead: the real ``metric-ds train`` against a bare PyTorch loop of the same model, loss and batches.

    # CPU (the <= 1.05x target): MiniLM-sized random BERT, fp32
    nice -n 19 .venv/bin/python benchmarks/bench_overhead.py --device cpu --size minilm --batch 32 --seq 64 \\
        --steps 20 --log-every 5 --repeats 2
    # GPU (scripts/gpu_check.sh, step overhead): BERT-base-sized, bf16, ZeRO 0 and 2, the fused op
    python benchmarks/bench_overhead.py --device cuda --size bert-base --batch 128 --seq 64 --steps 30 \\
        --log-every 10 --precision bf16 --zero 0 2 --impl fused --out "$OUT"

Nothing is downloaded: the model is a randomly initialised BERT of the chosen size (vocabulary 30522, as BERT's),
saved with a small WordPiece tokenizer made from the test fixtures' keywords (``tests/conftest.py``), and the
table has texts long enough to fill ``--seq`` tokens.

* trainer: ``metric-ds train`` (``metric_ds.cli.main``) in a fresh process, ``--steps`` optimizer steps, timed by
  its own log records (``train/step_time_s``), the first ``--log-every`` steps left out as warm-up. It includes
  everything the trainer does per step: DeepSpeed, the loss's collectives, the bank, logging.
* bare: the same model, :class:`metric_ds.losses.JointLoss`, parameter groups, sampler and collator, with
  ``torch.optim.AdamW(fused=True)``, gradient clipping, and no DeepSpeed, in a fresh process; the same warm-up is
  left out. Like for like with the trainer: under bf16 the model's weights are bf16 and the optimizer steps fp32
  copies of them (DeepSpeed's bf16 recipe, no autocast), and on CUDA the loader pins its batches as the trainer's.

The ratio (trainer step time / bare step time) is the trainer's overhead, in wall time and in CPU seconds
(the fairer one on a shared CPU); each is the best of ``--repeats`` interleaved runs. Peak memory is the GPU's
``max_memory_allocated`` (CUDA) or the process's peak RSS (CPU). Results: ``overhead.json`` and
``overhead.md`` in ``--out``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

# (hidden, layers, heads, intermediate); vocabulary 30522 except for "tiny".
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (32, 2, 2, 64),
    "minilm": (384, 6, 12, 1536),
    "bert-base": (768, 12, 12, 3072),
}
NUM_CLASSES = 16


def fixture_words() -> list[str]:
    """The keywords of the test fixtures' synthetic tables (``tests/conftest.py``)."""
    spec = importlib.util.spec_from_file_location("_md_conftest", REPO / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.WORDS)


def prepare(workdir: Path, size: str, seq: int, rows: int, seed: int = 0) -> tuple[Path, Path]:
    """Write a random-initialised BERT of ``size`` with a small tokenizer, and a table of ``rows`` texts.

    Returns:
        ``(model_dir, table_path)``.
    """
    import numpy as np
    import pandas as pd
    import torch
    from transformers import BertConfig, BertModel

    try:
        from transformers import BertTokenizerFast as Tokenizer
    except ImportError:  # pragma: no cover - a transformers without the Fast alias
        from transformers import BertTokenizer as Tokenizer

    words = fixture_words()
    model_dir, table = workdir / f"model-{size}", workdir / f"train-{seq}-{rows}.parquet"
    if not (model_dir / "config.json").is_file():
        model_dir.mkdir(parents=True, exist_ok=True)
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
        (workdir / "vocab.txt").write_text("\n".join(vocab) + "\n")
        Tokenizer(vocab_file=str(workdir / "vocab.txt"), do_lower_case=True).save_pretrained(model_dir)
        hidden, layers, heads, inter = SIZES[size]
        config = BertConfig(vocab_size=len(vocab) if size == "tiny" else 30522, hidden_size=hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                            max_position_embeddings=max(512, seq + 2))
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(model_dir)
    if not table.is_file():
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, NUM_CLASSES, size=rows)
        texts = [" ".join([words[y % len(words)], *rng.choice(words, size=seq)]) for y in labels]
        pd.DataFrame({"text": texts, "label": [f"class_{y}" for y in labels], "metric_mask": 1,
                      "classifier_mask": 1}).to_parquet(table)
    return model_dir, table


def write_config(workdir: Path, name: str, model_dir: Path, table: Path, args: argparse.Namespace, impl: str,
                 zero: int) -> Path:
    """The run's YAML: one epoch capped at ``--steps`` steps, a small validation split, jsonl logs only."""
    import yaml

    cfg = {
        "run_name": name,
        "model_name": str(model_dir),
        "data": {"train_path": str(table), "val_ratio": 0.05},
        "training": {"batch_size": args.batch, "num_epochs": 1, "max_steps": args.steps,
                     "max_seq_length": args.seq, "mixed_precision": args.precision, "supcon_impl": impl,
                     "log_every_n_steps": args.log_every, "seed": 0},
        "checkpointing": {"checkpoints_dir": str(workdir / "runs"), "save_best_by": "loss"},
        "logging": {"backends": ["jsonl"]},
        "deepspeed": {"zero_stage": zero},
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def peak_memory_mib(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_trainer(cfg_path: str, device: str) -> dict[str, Any]:
    """In a fresh process: ``metric-ds train --config cfg_path``; step times from its log records."""
    from metric_ds import train as train_module
    from metric_ds.cli import main
    from metric_ds.config import load_config

    # CPU seconds at each training log record: on a shared CPU, wall time mostly counts waits for a core
    marks: list[tuple[int, float]] = []
    log = train_module.Trainer._log

    def marking_log(self, record):
        if "train/step_time_s" in record:
            marks.append((self.state.global_step, time.process_time()))
        return log(self, record)

    train_module.Trainer._log = marking_log
    rc = main(["train", "--config", cfg_path])
    if rc != 0:
        raise SystemExit(f"metric-ds train exited {rc}")
    cfg = load_config(cfg_path, [])
    lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    windows = [r for r in map(json.loads, lines) if "train/step_time_s" in r]
    timed = [r["train/step_time_s"] for r in windows[1:]]  # the first window holds the warm-up
    (step0, cpu0), (step1, cpu1) = marks[0], marks[-1]
    return {"step_s": statistics.fmean(timed), "timed_steps": len(timed) * cfg.training.log_every_n_steps,
            "cpu_step_s": (cpu1 - cpu0) / (step1 - step0), "peak_mib": peak_memory_mib(device)}


def worker_bare(cfg_path: str, device: str) -> dict[str, Any]:
    """In a fresh process: the bare loop over the trainer's own model, loss, parameter groups and batches."""
    import torch

    from metric_ds.config import load_config
    from metric_ds.data.collate import Collator, TextDataset
    from metric_ds.data.pipeline import load_training_data
    from metric_ds.losses import JointLoss
    from metric_ds.model import MetricClassifier, load_encoder, model_inputs
    from metric_ds.train import _param_groups, _scheduler_factory, _train_sampler, seed_everything

    cfg = load_config(cfg_path, [])
    t = cfg.training
    seed_everything(t.seed)
    data = load_training_data(cfg)
    encoder, tokenizer = load_encoder(cfg.model_name, t.attention_implementation)
    model = MetricClassifier(encoder, data.label_map.num_classes, cfg.model.pooling, cfg.model.projection_dim,
                             cfg.model.classifier_dropout).to(device).train()
    groups = _param_groups(model, cfg.optimizer.weight_decay, cfg.optimizer.head_learning_rate)
    masters = MasterWeights(model, groups) if t.mixed_precision == "bf16" else None
    optimizer = torch.optim.AdamW(masters.groups if masters else groups, lr=cfg.optimizer.learning_rate, fused=True)
    scheduler = _scheduler_factory(cfg, t.max_steps)(optimizer)
    loss_fn = JointLoss(t.classification_loss_weight, t.metric_loss_weight, t.supcon_temperature, t.supcon_impl,
                        t.supcon_scope, num_classes=data.label_map.num_classes)
    loader = torch.utils.data.DataLoader(
        TextDataset.from_frame(data.train, tokenizer, t.max_seq_length),
        batch_sampler=_train_sampler(cfg, data.train, t.seed), collate_fn=Collator(tokenizer),
        num_workers=cfg.data.num_workers, pin_memory=device == "cuda", generator=torch.Generator().manual_seed(t.seed))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    warmup, start, cpu_start = t.log_every_n_steps, 0.0, 0.0
    steps = 0
    for batch in loader:
        if steps == warmup:
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        out = model(**model_inputs(batch))
        terms = loss_fn(out.logits, out.z, batch["labels"], batch["classifier_mask"], batch["metric_mask"])
        terms.backward_loss.backward()
        if masters:
            masters.take_grads()
        if t.gradient_clip_val > 0:
            torch.nn.utils.clip_grad_norm_(masters.params if masters else model.parameters(), t.gradient_clip_val)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if masters:
            masters.write_back()
        steps += 1
        if steps == t.max_steps:
            break
    sync()
    timed = steps - warmup
    return {"step_s": (time.perf_counter() - start) / max(timed, 1), "timed_steps": timed,
            "cpu_step_s": (time.process_time() - cpu_start) / max(timed, 1),
            "peak_mib": peak_memory_mib(device), "params": sum(p.numel() for p in model.parameters())}


class MasterWeights:
    """DeepSpeed's bf16 recipe without DeepSpeed: the model's weights in bf16, the optimizer on fp32 copies.

    Args:
        model: cast to bf16 in place.
        groups: its parameter groups (``_param_groups``), rewritten onto the fp32 copies as :attr:`groups`.
    """

    def __init__(self, model: Any, groups: list[dict[str, Any]]):
        import torch

        self.low = [p for g in groups for p in g["params"]]
        self.params = [p.detach().float().requires_grad_() for p in self.low]
        master_of = {id(lp): mp for lp, mp in zip(self.low, self.params)}
        self.groups = [{**g, "params": [master_of[id(p)] for p in g["params"]]} for g in groups]
        model.to(torch.bfloat16)

    def take_grads(self) -> None:
        """The bf16 gradients into the fp32 copies (fp32 ``.grad``), the model's cleared."""
        for lp, mp in zip(self.low, self.params):
            mp.grad = None if lp.grad is None else lp.grad.float()
            lp.grad = None

    def write_back(self) -> None:
        """The stepped fp32 copies back into the model's bf16 weights."""
        import torch

        with torch.no_grad():
            torch._foreach_copy_(self.low, self.params)


def run_worker(kind: str, cfg_path: Path, device: str, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__)), "--worker", kind, str(cfg_path), "--device", device]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    rows = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not rows:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"{kind} worker for {cfg_path.name} failed (exit {proc.returncode}):\n{tail}")
    return rows[0]


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"Trainer overhead, {meta['device']} ({meta['device_name']}), {meta['size']} "
             f"({meta['params_m']:.1f}M parameters), batch {meta['batch']}, length {meta['seq']}, "
             f"{meta['precision']}, {meta['steps']} steps (first {meta['log_every']} left out), "
             f"torch {meta['torch']}, {meta['threads']} threads, best of {meta['repeats']} run(s).", "",
             "| impl | ZeRO | trainer samples/s | bare samples/s | trainer / bare step time | "
             "trainer / bare CPU seconds per step | trainer peak MiB | bare peak MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['zero']} | {r['trainer_samples_per_s']:.1f} | "
                     f"{r['bare_samples_per_s']:.1f} | {r['ratio']:.3f} | {r['cpu_ratio']:.3f} | "
                     f"{r['trainer_peak_mib']:.0f} | {r['bare_peak_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", default="minilm", choices=list(SIZES))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run, warm-up included")
    p.add_argument("--log-every", type=int, default=5, help="log window; the first one is the warm-up")
    p.add_argument("--precision", default="no", choices=["no", "bf16"])
    p.add_argument("--zero", type=int, nargs="+", default=[0])
    p.add_argument("--impl", nargs="+", default=["auto"], choices=["auto", "fused", "reference"])
    p.add_argument("--repeats", type=int, default=1, help="runs of each, interleaved; the best is reported")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--workdir", default=None, help="model, table and runs (default: OUT/overhead-work)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    args = p.parse_args(argv)
    if args.worker:
        kind, cfg_path = args.worker
        fn = worker_trainer if kind == "trainer" else worker_bare
        print("RESULT " + json.dumps(fn(cfg_path, args.device)), flush=True)
        return 0
    if args.steps < 2 * args.log_every:
        p.error("--steps must be at least twice --log-every (one warm-up window and one timed)")

    import torch

    out = Path(args.out)
    workdir = Path(args.workdir) if args.workdir else out / "overhead-work"
    workdir.mkdir(parents=True, exist_ok=True)
    rows_needed = math.ceil(args.batch * (args.steps + 2) / 0.95) + NUM_CLASSES * 4
    model_dir, table = prepare(workdir, args.size, args.seq, rows_needed)
    results: list[dict[str, Any]] = []
    params = 0
    for impl in args.impl:
        runs: dict[str, list[dict[str, Any]]] = {}
        configs = {f"trainer-z{z}": write_config(workdir, f"{impl}-z{z}", model_dir, table, args, impl, z)
                   for z in args.zero}
        configs["bare"] = configs[f"trainer-z{args.zero[0]}"]
        for _ in range(args.repeats):
            for name, cfg_path in configs.items():
                if name != "bare":  # a fresh run folder: a second run would append to the first one's log
                    shutil.rmtree(workdir / "runs" / cfg_path.stem, ignore_errors=True)
                got = run_worker("bare" if name == "bare" else "trainer", cfg_path, args.device, args.timeout)
                runs.setdefault(name, []).append(got)
                print(f"{impl:>9} {name:>11}: {got['step_s'] * 1000:.1f} ms/step over {got['timed_steps']} "
                      f"steps ({got['cpu_step_s'] * 1000:.1f} CPU ms), peak {got['peak_mib']:.0f} MiB", flush=True)
        # the best run of each: on a shared machine noise only ever adds time
        bare_s = min(r["step_s"] for r in runs["bare"])
        params = runs["bare"][0]["params"]
        for z in args.zero:
            trainer_s = min(r["step_s"] for r in runs[f"trainer-z{z}"])
            trainer_cpu = min(r["cpu_step_s"] for r in runs[f"trainer-z{z}"])
            bare_cpu = min(r["cpu_step_s"] for r in runs["bare"])
            results.append({
                "impl": impl, "zero": z, "trainer_step_s": trainer_s, "bare_step_s": bare_s,
                "ratio": trainer_s / bare_s, "cpu_ratio": trainer_cpu / bare_cpu,
                "trainer_cpu_step_s": trainer_cpu, "bare_cpu_step_s": bare_cpu,
                "trainer_samples_per_s": args.batch / trainer_s,
                "bare_samples_per_s": args.batch / bare_s,
                "trainer_peak_mib": max(r["peak_mib"] for r in runs[f"trainer-z{z}"]),
                "bare_peak_mib": max(r["peak_mib"] for r in runs["bare"]),
                "trainer_runs_s": [r["step_s"] for r in runs[f"trainer-z{z}"]],
                "bare_runs_s": [r["step_s"] for r in runs["bare"]],
            })
    meta = {"device": args.device, "size": args.size, "params_m": params / 1e6, "batch": args.batch,
            "seq": args.seq, "precision": args.precision, "steps": args.steps, "log_every": args.log_every,
            "repeats": args.repeats, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else
            (os.uname().machine + f", {os.cpu_count()} cores")}
    (out / "overhead.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    text = markdown(results, meta)
    (out / "overhead.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
