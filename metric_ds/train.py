"""The training loop: ``python -m metric_ds.train --config F`` (also ``metric-ds train``,
``deepspeed metric_ds/train.py --config F`` and ``torchrun -m metric_ds.train --config F``).

Reads top to bottom: data, model, DeepSpeed engine, then epochs of micro-batches; at each optimizer step the
bank takes the step's metric rows, a log record is written every ``log_every_n_steps``, validation runs every
``eval_every_n_steps`` and at each epoch end (and exports ``best/`` when it improves), and a checkpoint is
written every ``save_every_n_batches``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `deepspeed metric_ds/train.py`: run as a script, import the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from tqdm.auto import tqdm

from metric_ds import distributed as D
from metric_ds.bank import EmbeddingBank
from metric_ds.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, write_atomic
from metric_ds.config import Config, load_config, save_config
from metric_ds.console import add_config_arguments, apply_local_rank, run_guarded
from metric_ds.data.collate import Collator, TextDataset
from metric_ds.data.pipeline import load_training_data
from metric_ds.data.sampler import PKBatchSampler, RandomBatchSampler
from metric_ds.ds_config import build_ds_config, check_precision
from metric_ds.evaluator import ShardedBatches, collect_outputs, compute_metrics
from metric_ds.losses import JointLoss
from metric_ds.model import MetricClassifier, export_model, load_encoder
from metric_ds.progress import progress_bar
from metric_ds.tracking import build_trackers

GREATER_IS_BETTER = {"loss": False, "acc": True, "f1": True, "knn_acc": True, "knn_f1": True}
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class LoopState:
    """Everything that decides the future of a run besides weights, optimizer, scheduler, RNGs and the bank."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    samples_seen: int = 0
    best_value: float | None = None
    best_step: int | None = None


class SkipBatches:
    """A batch sampler without its first ``skip`` batches (resuming mid-epoch)."""

    def __init__(self, sampler: Any, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        for i, batch in enumerate(self.sampler):
            if i >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _param_groups(model: torch.nn.Module, weight_decay: float, head_lr: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and LayerNorm weights (as HF's Trainer does); the heads, which
    start from random weights while the encoder is pretrained, at their own peak lr when ``head_lr`` is set
    (the scheduler scales every group's lr by the same factor)."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((not name.startswith("encoder."), p.ndim >= 2), []).append(p)
    out = []
    for (is_head, decays), params in sorted(groups.items()):
        group: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if is_head and head_lr is not None:
            group["lr"] = head_lr
        out.append(group)
    return out


def _scheduler_factory(cfg: Config, num_training_steps: int):
    from transformers import get_scheduler

    s = cfg.scheduler
    kwargs = {}
    if s.name in ("cosine", "cosine_with_restarts"):
        kwargs = {"num_cycles": s.num_cycles if s.name == "cosine" else int(s.num_cycles)}

    def make(optimizer: torch.optim.Optimizer):
        return get_scheduler(s.name, optimizer, num_warmup_steps=s.warmup_steps,
                             num_training_steps=num_training_steps, scheduler_specific_kwargs=kwargs)

    return make


def _train_sampler(cfg: Config, train_df: Any, seed: int) -> Any:
    d = cfg.data
    if d.sampler == "pk":
        return PKBatchSampler(
            labels=train_df["label_id"].to_numpy(), metric_mask=train_df["metric_mask"].to_numpy(),
            classes_per_batch=d.classes_per_batch, samples_per_class=d.samples_per_class,
            batch_size=cfg.training.batch_size, seed=seed, rank=D.rank(), world_size=D.world_size(),
        )
    return RandomBatchSampler(len(train_df), cfg.training.batch_size, seed=seed, rank=D.rank(),
                              world_size=D.world_size(), drop_last=False)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    """One training run of ``cfg`` (see the module docstring for the order of events)."""

    def __init__(self, cfg: Config):
        import deepspeed

        D.ensure_env()
        check_precision(cfg)
        self.cfg = cfg
        t = cfg.training
        seed_everything(t.seed)
        self.run_dir = cfg.run_dir
        self.data = load_training_data(cfg)
        self.label_map = self.data.label_map
        encoder, self.tokenizer = load_encoder(cfg.model_name, t.attention_implementation)
        model = MetricClassifier(encoder, self.label_map.num_classes, cfg.model.pooling,
                                 cfg.model.projection_dim, cfg.model.classifier_dropout)
        if not D.is_dist():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                       verbose=False)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))

        collator = Collator(self.tokenizer, t.max_seq_length)
        self.collator = collator
        self.train_ds = TextDataset.from_frame(self.data.train, self.tokenizer, t.max_seq_length)
        self.val_ds = TextDataset.from_frame(self.data.val, self.tokenizer, t.max_seq_length)
        self.sampler = _train_sampler(cfg, self.data.train, t.seed)
        micro_per_epoch = len(self.sampler)
        self.steps_per_epoch = max(micro_per_epoch // t.gradient_accumulation_steps, 1)
        self.total_steps = self.steps_per_epoch * t.num_epochs
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)
        num_training_steps = cfg.scheduler.num_training_steps or self.total_steps

        self.engine, _, _, self.lr_scheduler = deepspeed.initialize(
            model=model,
            model_parameters=_param_groups(model, cfg.optimizer.weight_decay, cfg.optimizer.head_learning_rate),
            config=build_ds_config(cfg), lr_scheduler=_scheduler_factory(cfg, num_training_steps),
        )
        self.device = self.engine.device
        self.loss_fn = JointLoss(t.classification_loss_weight, t.metric_loss_weight, t.supcon_temperature,
                                 t.supcon_impl, t.supcon_scope)
        mv = cfg.metric_validation
        self.bank = None
        if mv.keep_last_n_emb_steps > 0:
            # every rank adds the metric rows of all ranks (so the banks are identical)
            rows_per_step = t.batch_size * t.gradient_accumulation_steps * D.world_size()
            h_dim = model.classifier.in_features
            z_dim = cfg.model.projection_dim or h_dim
            self.bank = EmbeddingBank(capacity=mv.keep_last_n_emb_steps * rows_per_step, z_dim=z_dim,
                                      h_dim=h_dim, keep_last_n_steps=mv.keep_last_n_emb_steps, device=self.device)
        self.state = LoopState()
        self.last_val: dict[str, float] = {}
        if t.resume_from:
            self._resume(t.resume_from)
        if D.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            self.label_map.save(self.run_dir / "labels.json")
        self.tracker = build_trackers(cfg.logging.backends + (["neptune"] if cfg.neptune.enabled and
                                                              "neptune" not in cfg.logging.backends else []),
                                      self.run_dir, cfg.neptune, D.is_main())
        self.tracker.log_params(cfg.to_dict())

    # ------------------------------------------------------------------------------------- state

    def _client_state(self) -> dict[str, Any]:
        return {"loop": asdict(self.state), "bank": self.bank.state_dict() if self.bank is not None else None}

    def _resume(self, resume_from: str) -> None:
        ckpt = resolve_resume(resume_from, self.run_dir)
        client = load_checkpoint(self.engine, ckpt)
        self.state = LoopState(**client["loop"])
        if self.bank is not None and client.get("bank") is not None:
            self.bank.load_state_dict(client["bank"])
        if D.is_main():
            tqdm.write(f"resumed from {ckpt} at step {self.state.global_step}")

    # -------------------------------------------------------------------------------------- loop

    def fit(self) -> dict[str, Any]:
        cfg, t, st = self.cfg, self.cfg.training, self.state
        start_wall = time.perf_counter()
        samples_at_start = st.samples_seen
        bar = progress_bar(self.total_steps, "train", initial=st.global_step, setting=cfg.logging.progress)
        window: dict[str, float] = {}
        window_micro, window_t0, window_samples = 0, time.perf_counter(), 0
        done = st.global_step >= self.total_steps
        last_eval_step = None
        # from_pretrained returns the encoder in eval mode: without this, dropout would stay off until the
        # first validation switched the whole model to train mode.
        self.engine.train()
        while not done and st.epoch < t.num_epochs:
            self.sampler.set_epoch(st.epoch)
            loader = torch.utils.data.DataLoader(
                self.train_ds, batch_sampler=SkipBatches(self.sampler, st.batch_in_epoch),
                collate_fn=self.collator, num_workers=cfg.data.num_workers,
                generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG untouched
            )
            for batch in loader:
                batch = _to_device(batch, self.device)
                out = self.engine(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
                terms = self.loss_fn(out.logits, out.z, batch["labels"], batch["classifier_mask"],
                                     batch["metric_mask"])
                boundary = self.engine.is_gradient_accumulation_boundary()
                self.engine.backward(terms["loss"])
                manual_norm = self._grad_norm_before_step() if boundary else None
                self.engine.step()
                st.batch_in_epoch += 1
                n_global = int(D.all_reduce_sum(torch.tensor(batch["index"].numel())).item())
                st.samples_seen += n_global
                window_samples += n_global
                window_micro += 1
                for key in ("total", "ce", "supcon", "ce_rows", "metric_rows", "anchor_pos_frac",
                            "mean_pos_per_anchor"):
                    window[key] = window.get(key, 0.0) + float(terms[key])
                if self.bank is not None:
                    self._bank_add(out, batch, st.global_step + 1)
                if not boundary:
                    continue
                st.global_step += 1
                bar.update(1)
                lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else 0.0
                if st.global_step % t.log_every_n_steps == 0 or st.global_step == self.total_steps:
                    elapsed = time.perf_counter() - window_t0
                    record = {f"train/{'loss' if k == 'total' else k}": v / window_micro for k, v in window.items()}
                    grad_norm = self.engine.get_global_grad_norm()
                    grad_norm = manual_norm if grad_norm is None else grad_norm
                    record.update({
                        "train/lr": lr,
                        "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                        "train/samples_per_s": window_samples / max(elapsed, 1e-9),
                        "train/step_time_s": elapsed / max(window_micro / t.gradient_accumulation_steps, 1),
                    })
                    self._log(record)
                    bar.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{lr:.2e}",
                                    sps=f"{record['train/samples_per_s']:.1f}")
                    window, window_micro, window_t0, window_samples = {}, 0, time.perf_counter(), 0
                epoch_end = st.batch_in_epoch >= len(self.sampler) - (len(self.sampler) % t.gradient_accumulation_steps)
                done = st.global_step >= self.total_steps
                if (t.eval_every_n_steps and st.global_step % t.eval_every_n_steps == 0) or epoch_end or done:
                    self.validate()
                    last_eval_step = st.global_step
                every = cfg.checkpointing.save_every_n_batches
                if every and (st.global_step % every == 0 or done):
                    self._checkpoint()
                if done:
                    break
            st.epoch += 1
            st.batch_in_epoch = 0
        bar.close()
        if last_eval_step != st.global_step and st.global_step > 0:
            self.validate()
        wall = time.perf_counter() - start_wall
        digests = self._rank_digests()
        summary = {
            "run_dir": str(self.run_dir),
            "best_dir": str(self.run_dir / "best"),
            "best_metric": f"val/{cfg.checkpointing.save_best_by}",
            "best_value": st.best_value,
            "best_step": st.best_step,
            "steps": st.global_step,
            "epochs": round(st.samples_seen / max(len(self.train_ds), 1), 3),  # passes over the train split
            "wall_time_s": wall,
            "train_samples_per_s": (st.samples_seen - samples_at_start) / max(wall, 1e-9),
            "world_size": D.world_size(),
            # every rank's fingerprint of its bank and last validation metrics: they must agree
            "rank_digests": digests,
            "ranks_agree": len({json.dumps(d, sort_keys=True) for d in digests}) == 1,
        }
        if D.is_main():
            write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            tqdm.write(
                f"done: {st.global_step} steps in {wall:.1f}s ({summary['train_samples_per_s']:.1f} samples/s); "
                f"best {summary['best_metric']} = {st.best_value} at step {st.best_step}; "
                f"best model: {summary['best_dir']}; run: {self.run_dir}"
            )
        self.tracker.close()
        return summary

    def _grad_norm_before_step(self) -> float | None:
        """The gradient norm before clipping, where DeepSpeed does not report one (ZeRO 0 in fp32)."""
        if self.cfg.deepspeed.zero_stage != 0 or self.cfg.training.mixed_precision != "no":
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def _rank_digests(self) -> list[dict[str, str]]:
        """A hash of the bank (in order) and of the last validation record, from every rank."""
        h = hashlib.sha256()
        if self.bank is not None:
            for t in self.bank.view():
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        mine = {"bank": h.hexdigest()[:16],
                "val": hashlib.sha256(json.dumps(self.last_val, sort_keys=True).encode()).hexdigest()[:16]}
        if not D.is_dist():
            return [mine]
        out: list = [None] * D.world_size()
        torch.distributed.all_gather_object(out, mine)
        return out

    def _bank_add(self, out: Any, batch: dict[str, torch.Tensor], step: int) -> None:
        """Add this micro-batch's metric rows (from every rank, in rank order) to the bank."""
        m = batch["metric_mask"].bool()
        z, h, y = out.z.detach()[m].float(), out.h.detach()[m].float(), batch["labels"][m]
        sizes = D.all_gather_counts([int(m.sum())], self.device)[:, 0].tolist()
        z, h, y = (D.gather_rows(x, sizes, with_grad=False) for x in (z, h, y))
        self.bank.add(z, h, y, step)

    def _log(self, record: dict[str, float]) -> None:
        self.tracker.log_metrics({"step": self.state.global_step,
                                  "epoch": self.state.epoch + self.state.batch_in_epoch / max(len(self.sampler), 1),
                                  **record}, step=self.state.global_step)

    # ------------------------------------------------------------------------------- validation

    def validate(self) -> dict[str, float]:
        cfg, t, mv = self.cfg, self.cfg.training, self.cfg.metric_validation
        batches = ShardedBatches(len(self.val_ds), mv.eval_batch_size or 4 * t.batch_size, D.rank(), D.world_size(),
                                 lengths=self.val_ds.lengths)
        loader = torch.utils.data.DataLoader(self.val_ds, batch_sampler=batches, collate_fn=self.collator,
                                             num_workers=0)
        dummy = self.collator([self.val_ds[0]]) if len(self.val_ds) else None
        outputs = collect_outputs(self.engine.module, loader, self.device, dummy)
        metrics = compute_metrics(
            outputs, ce_weight=t.classification_loss_weight, metric_weight=t.metric_loss_weight,
            temperature=t.supcon_temperature, batch_size=t.batch_size, bank=self.bank,
            recall_at_k=mv.recall_at_k, knn_k=mv.knn_k, distance=mv.distance, supcon_impl=t.supcon_impl,
        )
        record = {f"val/{k}": v for k, v in metrics.items()}
        if self.bank is not None:
            record.update(self.bank.stats(self.label_map.num_classes, self.state.global_step))
        self._log(record)
        self.last_val = record
        key = cfg.checkpointing.save_best_by
        value = metrics.get(key)
        if value is not None and not math.isnan(value):
            better = (self.state.best_value is None or
                      (value > self.state.best_value if GREATER_IS_BETTER[key] else value < self.state.best_value))
            if better:
                self.state.best_value, self.state.best_step = value, self.state.global_step
                self._export_best(record)
        return record

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights on every rank; under ZeRO-3 the partitions are gathered first (a collective)."""
        module = self.engine.module
        if self.cfg.deepspeed.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def _export_best(self, record: dict[str, float]) -> None:
        state_dict = self._full_state_dict()
        if D.is_main():
            best, tmp = self.run_dir / "best", self.run_dir / ".tmp-best"
            shutil.rmtree(tmp, ignore_errors=True)
            export_model(state_dict, self.engine.module, self.tokenizer, tmp, extra_files={
                "labels.json": self.label_map.to_json(),
                "metrics.json": {"step": self.state.global_step, **record},
                "training_data.json": {"train": str(Path(self.cfg.data.parquet_path).resolve())},
            })
            save_config(self.cfg, tmp / "metric_ds_config.yaml")
            old = self.run_dir / ".old-best"
            shutil.rmtree(old, ignore_errors=True)
            if best.exists():
                os.replace(best, old)
            os.replace(tmp, best)
            shutil.rmtree(old, ignore_errors=True)
        if D.is_dist():
            torch.distributed.barrier()

    def _checkpoint(self) -> None:
        save_checkpoint(self.engine, self.run_dir, self.state.global_step, self._client_state(),
                        self.cfg.checkpointing.keep_last_n_checkpoints)


def train(cfg: Config) -> dict[str, Any]:
    """Train ``cfg`` and return the summary. The process group stays up (in-process callers may train again)."""
    return Trainer(cfg).fit()


def train_process(cfg: Config) -> dict[str, Any]:
    """Train ``cfg`` as a whole process (the command-line entry points): train, then leave the process group."""
    summary = train(cfg)
    D.shutdown()
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metric-ds train", description="Train an encoder with CE + SupCon.")
    add_config_arguments(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return p


def main(argv: list[str] | None = None) -> int:
    """The script entry (``deepspeed metric_ds/train.py``, ``torchrun -m metric_ds.train``)."""
    args = build_parser().parse_args(argv)
    apply_local_rank(args)
    return run_guarded(lambda: train_process(load_config(args.config, args.overrides)), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
