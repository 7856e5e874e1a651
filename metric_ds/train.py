"""The training loop: ``python -m metric_ds.train --config F`` (also ``metric-ds train``,
``deepspeed metric_ds/train.py --config F`` and ``torchrun -m metric_ds.train --config F``).

Reads top to bottom: checks, data, model, the resume plan (:mod:`metric_ds.resume`), DeepSpeed engine, then
epochs of micro-batches. Each epoch's micro-batches are cut into accumulation windows of
``gradient_accumulation_steps`` (the last one shorter when they do not divide), and each window ends in an
optimizer step, so no step mixes two epochs. The step strategy of ``training.contrastive_batch``
(:mod:`metric_ds.steps`) trains each micro-batch, or holds the window's micro-batches and trains them as one
contrastive batch. At each step the bank takes the step's metric rows, a log record is written every
``log_every_n_steps``, validation runs every ``eval_every_n_steps`` and at each epoch end (and exports ``best/``
when it improves, :mod:`metric_ds.best`), and a checkpoint is written every ``save_every_n_batches``. The run
ends with ``summary.json`` (:mod:`metric_ds.run_folder`).

Training randomness depends only on the seed and the step: validation and export run under a forked RNG, so
how often a run validates never changes its weights, and a run resumed from any checkpoint equals the run that
was not interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `deepspeed metric_ds/train.py`: run as a script, import the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from metric_ds import distributed as D
from metric_ds import run_folder
from metric_ds.bank import EmbeddingBank
from metric_ds.best import BestKeeper
from metric_ds.calibration import calibrate_best
from metric_ds.checkpoint import UNIVERSAL_TAG, load_checkpoint, save_checkpoint
from metric_ds.config import Config, save_config
from metric_ds.console import add_train_arguments, apply_local_rank, config_from_args, run_guarded
from metric_ds.data.collate import Collator, TextDataset
from metric_ds.data.pipeline import TrainingData, load_training_data
from metric_ds.data.sampler import PKBatchSampler, RandomBatchSampler
from metric_ds.ds_config import build_ds_config
from metric_ds.errors import UserError
from metric_ds.evaluator import ShardedBatches, collect_outputs, compute_metrics
from metric_ds.losses import JointLoss, TermWindow
from metric_ds.model import MetricClassifier, load_encoder
from metric_ds.ops.precision import allow_tf32
from metric_ds.preflight import preflight
from metric_ds.progress import progress_bar
from metric_ds.resume import plan_resume
from metric_ds.steps import StepOutput, make_step
from metric_ds.tracking import build_trackers
from metric_ds.views import check_views_supported


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


def accumulation_window(batch_in_epoch: int, micro_per_epoch: int, accumulation: int) -> tuple[int, bool]:
    """The length of the accumulation window holding micro-batch ``batch_in_epoch`` (0-based), and whether that
    micro-batch ends it. Windows start at multiples of ``accumulation``; the epoch's last one may be shorter."""
    start = batch_in_epoch - batch_in_epoch % accumulation
    length = min(accumulation, micro_per_epoch - start)
    return length, batch_in_epoch == start + length - 1


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


def _make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """torch's fused AdamW (one kernel for all tensors; CPU and CUDA since torch 2.4) over :func:`_param_groups`,
    given to DeepSpeed as the client optimizer: DeepSpeed's own torch_adam path cannot take ``fused``, which was
    measured faster than the multi-tensor and per-tensor forms (benchmarks/README.md, trainer overhead). DeepSpeed's
    mixed precision and ZeRO hand it their fp32 master partitions, so its state is the same in every mode."""
    groups = _param_groups(model, cfg.optimizer.weight_decay, cfg.optimizer.head_learning_rate)
    return torch.optim.AdamW(groups, lr=cfg.optimizer.learning_rate, weight_decay=cfg.optimizer.weight_decay,
                             fused=True)


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


@contextlib.contextmanager
def _isolated_rng(device: torch.device):
    """Run a block without touching the training RNG streams (CPU, and the device's on CUDA)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def _build_bank(cfg: Config, model: MetricClassifier, device: torch.device) -> EmbeddingBank | None:
    """Every rank's bank takes the metric rows of all ranks, so the banks are identical."""
    mv, t = cfg.metric_validation, cfg.training
    if mv.train_bank_steps <= 0:
        return None
    rows_per_step = t.batch_size * t.gradient_accumulation_steps * D.world_size()
    h_dim = model.classifier.in_features
    return EmbeddingBank(capacity=mv.train_bank_steps * rows_per_step, z_dim=cfg.model.projection_dim or h_dim,
                         h_dim=h_dim, keep_last_n_steps=mv.train_bank_steps, device=device)


class Trainer:
    """One training run of ``cfg`` (see the module docstring for the order of events)."""

    def __init__(self, cfg: Config):
        preflight(cfg)
        self.cfg, t = cfg, cfg.training
        seed_everything(t.seed)
        allow_tf32(t.allow_tf32)  # the fused op's fp32 matmuls (metric_ds.ops.precision)
        self.run_dir = cfg.run_dir
        self.data: TrainingData = load_training_data(cfg)
        self.label_map = self.data.label_map
        self.data_fingerprint = self.data.fingerprint()  # saved with every checkpoint, checked on resume
        encoder, self.tokenizer = load_encoder(cfg.model_name, t.attention_implementation)
        model = MetricClassifier(encoder, self.label_map.num_classes, cfg.model.pooling,
                                 cfg.model.projection_dim, cfg.model.classifier_dropout)
        D.init_process_group()
        check_views_supported(self.data.train, cfg.deepspeed.zero_stage, D.world_size())
        self._build_data()
        self._resume = plan_resume(cfg, self.run_dir, self.data_fingerprint, self.micro_per_epoch)
        self._build_engine(model)
        self.loss_fn = JointLoss(t.classification_loss_weight, t.metric_loss_weight, t.supcon_temperature,
                                 t.supcon_impl, t.supcon_scope, num_classes=self.label_map.num_classes,
                                 label_free_weight=t.label_free_weight)
        self.step = make_step(self.engine, self.loss_fn, cfg)
        self.bank = _build_bank(cfg, model, self.device)
        self.best = BestKeeper(cfg, self.run_dir, self.engine, self.tokenizer, self.label_map)
        self.state = LoopState()
        self.last_val: dict[str, float] = {}
        self._open_run_folder()
        self.tracker = build_trackers(cfg.logging.backends + (["neptune"] if cfg.neptune.enabled and
                                                              "neptune" not in cfg.logging.backends else []),
                                      self.run_dir, cfg.neptune, D.is_main())
        self.tracker.log_params(cfg.to_dict())

    def _build_data(self) -> None:
        t = self.cfg.training
        self.collator = Collator(self.tokenizer)
        self.train_ds = TextDataset.from_frame(self.data.train, self.tokenizer, t.max_seq_length)
        self.val_ds = TextDataset.from_frame(self.data.val, self.tokenizer, t.max_seq_length)
        self.sampler = _train_sampler(self.cfg, self.data.train, t.seed)
        self.micro_per_epoch = len(self.sampler)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / t.gradient_accumulation_steps)
        self.total_steps = self.steps_per_epoch * t.num_epochs
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)

    def _build_engine(self, model: MetricClassifier) -> None:
        import deepspeed

        cfg = self.cfg
        num_training_steps = cfg.scheduler.num_training_steps or self.total_steps
        ds_config = build_ds_config(cfg)
        if self._resume is not None and self._resume.tag == UNIVERSAL_TAG:
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
        self.engine, _, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=_make_optimizer(model, cfg),
            config=ds_config, lr_scheduler=_scheduler_factory(cfg, num_training_steps),
        )
        self.device = self.engine.device
        if D.world_size() == 1 and cfg.deepspeed.zero_stage == 0:
            # one process: DeepSpeed would still flatten and "all-reduce" every gradient each step (benchmarks/README.md)
            self.engine.enable_backward_allreduce = False

    def _open_run_folder(self) -> None:
        """Resume (the engine's state, then ours), or start a fresh folder."""
        cfg, plan = self.cfg, self._resume
        if plan is not None:
            load_checkpoint(self.engine, plan.checkpoint, plan.client, plan.tag)
            self.state = LoopState(**plan.client["loop"])
            if self.bank is not None and plan.client.get("bank") is not None:
                self.bank.load_state_dict(plan.client["bank"])
            if D.is_main():
                run_folder.open_resumed(self.run_dir, self.state.global_step)
                tqdm.write(f"resumed from {plan.checkpoint} at step {self.state.global_step}")
        elif D.is_main():
            run_folder.open_fresh(self.run_dir, cfg.checkpointing.overwrite)
        if D.is_dist():
            torch.distributed.barrier()
        if D.is_main():
            save_config(cfg, self.run_dir / "config.yaml")
            self.label_map.save(self.run_dir / "labels.json")

    def _client_state(self) -> dict[str, Any]:
        return {"loop": asdict(self.state), "bank": self.bank.state_dict() if self.bank is not None else None,
                "config": yaml.safe_dump(self.cfg.to_dict(), sort_keys=True),
                "data_fingerprint": self.data_fingerprint}

    # -------------------------------------------------------------------------------------- loop

    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps`` (or the end of ``num_epochs``), validating, logging and checkpointing on the way
        (see the module docstring); returns the run summary."""
        cfg, t, st = self.cfg, self.cfg.training, self.state
        if st.global_step >= self.total_steps and (summary := run_folder.read_summary(self.run_dir)) is not None:
            return self._already_finished(summary)
        start_wall = time.perf_counter()
        samples_at_start = st.samples_seen
        bar = progress_bar(self.total_steps, "train", initial=st.global_step, setting=cfg.logging.progress)
        window = TermWindow(t.classification_loss_weight, t.metric_loss_weight)
        window_t0 = time.perf_counter()
        done = st.global_step >= self.total_steps
        # from_pretrained returns the encoder in eval mode: without this, dropout would stay off until the
        # first validation switched the whole model to train mode.
        self.engine.train()
        while not done and st.epoch < t.num_epochs:
            for batch in self._epoch_loader():
                window_len, boundary = accumulation_window(st.batch_in_epoch, self.micro_per_epoch,
                                                           t.gradient_accumulation_steps)
                will_log = boundary and ((st.global_step + 1) % t.log_every_n_steps == 0
                                         or st.global_step + 1 == self.total_steps)
                st.batch_in_epoch += 1
                out = self.step(batch, window_len, boundary, will_log)
                if out is None:  # accumulated: the window's micro-batches are held until its last one
                    continue
                if self.bank is not None:
                    self.bank.add_step_rows(out.rows, st.global_step + 1)
                st.samples_seen += out.terms.counts.rows
                window.add(out.terms, micro_batches=out.micro_batches)
                if not boundary:
                    continue
                st.global_step += 1
                bar.update(1)
                if will_log:  # the one host read of the window's terms
                    self._log_train(window, time.perf_counter() - window_t0, out, bar)
                    window.reset()
                    window_t0 = time.perf_counter()
                epoch_end = st.batch_in_epoch >= self.micro_per_epoch
                done = st.global_step >= self.total_steps
                if (t.eval_every_n_steps and st.global_step % t.eval_every_n_steps == 0) or epoch_end or done:
                    self.validate()
                every = cfg.checkpointing.save_every_n_batches
                if every and (st.global_step % every == 0 or done):
                    self._checkpoint()
                if done:
                    break
            if not done:
                st.epoch += 1
                st.batch_in_epoch = 0
        bar.close()
        return self._finish(time.perf_counter() - start_wall, st.samples_seen - samples_at_start)

    def _epoch_loader(self) -> torch.utils.data.DataLoader:
        """This epoch's micro-batches, from the position the loop state records."""
        cfg, t, st = self.cfg, self.cfg.training, self.state
        self.sampler.set_epoch(st.epoch)
        return torch.utils.data.DataLoader(
            self.train_ds, batch_sampler=SkipBatches(self.sampler, st.batch_in_epoch),
            collate_fn=self.collator, num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG untouched
        )

    def _already_finished(self, summary: dict[str, Any]) -> dict[str, Any]:
        """A run resumed after its last step: nothing to train, its ``summary``."""
        if D.is_main():
            tqdm.write(f"{self.run_dir} already finished at step {self.state.global_step}; nothing to train")
        self.tracker.close()
        return summary

    def _log_train(self, window: TermWindow, elapsed: float, out: StepOutput, bar: Any) -> None:
        """The one host read of a logging window: its loss terms, lr, grad norm and throughput."""
        t = self.cfg.training
        terms = window.read()
        lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else 0.0
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = out.grad_norm if grad_norm is None else grad_norm
        record = {f"train/{'loss' if k == 'total' else k}": v for k, v in terms.items()}
        record.update(out.memory)
        record.update({
            "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/samples_per_s": window.rows / max(elapsed, 1e-9),
            "train/step_time_s": elapsed / max(window.micro / t.gradient_accumulation_steps, 1),
        })
        self._log(record)
        bar.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{lr:.2e}", sps=f"{record['train/samples_per_s']:.1f}")

    def _finish(self, wall: float, samples: int) -> dict[str, Any]:
        """Write ``summary.json`` (every rank's digest of its bank and last validation included) and say where the
        best model is."""
        cfg, st = self.cfg, self.state
        digests = run_folder.rank_digests(self.bank.copy_live_rows() if self.bank is not None else None,
                                          self.last_val)
        summary = run_folder.run_summary(self.run_dir, cfg.checkpointing.save_best_by, st, len(self.train_ds),
                                         wall, samples, digests)
        self.tracker.close()
        if D.is_main():
            run_folder.write_summary(self.run_dir, summary)
        if st.best_step is None:
            raise UserError(
                f"no best/ was written: {summary['best_metric']} was never computed on the validation split "
                f"(checkpointing.save_best_by = {cfg.checkpointing.save_best_by}). The last weights are in the "
                f"checkpoints of {self.run_dir}; pick a save_best_by that the validation rows can score")
        if cfg.open_set.calibrate:
            calibrate_best(self.run_dir / run_folder.BEST, self.data, cfg, self.device)
        if D.is_main():
            tqdm.write(
                f"done: {st.global_step} steps in {wall:.1f}s ({summary['train_samples_per_s']:.1f} samples/s); "
                f"best {summary['best_metric']} = {st.best_value} at step {st.best_step}; "
                f"best model: {summary['best_dir']}; run: {self.run_dir}"
            )
        return summary

    def _log(self, record: dict[str, float]) -> None:
        self.tracker.log_metrics({"step": self.state.global_step,
                                  "epoch": self.state.epoch + self.state.batch_in_epoch / max(self.micro_per_epoch, 1),
                                  **record}, step=self.state.global_step)

    # ------------------------------------------------------------------------------- validation

    def validate(self) -> dict[str, float]:
        """Validate, log, and export ``best/`` when the metric improved; the training RNG is not touched."""
        with _isolated_rng(self.device):
            return self._validate()

    def _validate(self) -> dict[str, float]:
        t, mv = self.cfg.training, self.cfg.metric_validation
        batches = ShardedBatches(len(self.val_ds), mv.eval_batch_size or 4 * t.batch_size, D.rank(), D.world_size(),
                                 lengths=self.val_ds.lengths)
        loader = torch.utils.data.DataLoader(self.val_ds, batch_sampler=batches, collate_fn=self.collator,
                                             num_workers=0, pin_memory=self.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(t.seed))
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
        if self.best.improved(metrics, self.state.best_value):
            self.state.best_value, self.state.best_step = metrics[self.best.key], self.state.global_step
            self.best.save(record, self.state.global_step)
        return record

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
    add_train_arguments(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return p


def main(argv: list[str] | None = None) -> int:
    """The script entry (``deepspeed metric_ds/train.py``, ``torchrun -m metric_ds.train``)."""
    args = build_parser().parse_args(argv)
    apply_local_rank(args)
    return run_guarded(lambda: train_process(config_from_args(args)), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
