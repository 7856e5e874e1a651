"""The training loop: ``python -m metric_ds.train --config F`` (also ``metric-ds train``,
``deepspeed metric_ds/train.py --config F`` and ``torchrun -m metric_ds.train --config F``).

Reads top to bottom: checks, data, model, DeepSpeed engine, then epochs of micro-batches. Each epoch's
micro-batches are cut into accumulation windows of ``gradient_accumulation_steps`` (the last one shorter when
they do not divide), and each window ends in an optimizer step, so no step mixes two epochs. At each step the
bank takes the step's metric rows, a log record is written every ``log_every_n_steps``, validation runs every
``eval_every_n_steps`` and at each epoch end (and exports ``best/`` when it improves), and a checkpoint is
written every ``save_every_n_batches``.

Training randomness depends only on the seed and the step: validation and export run under a forked RNG, so
how often a run validates never changes its weights, and a run resumed from any checkpoint equals the run that
was not interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
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
from metric_ds.artifact import save_model
from metric_ds.bank import EmbeddingBank
from metric_ds.checkpoint import (
    DS_TAG,
    UNIVERSAL_TAG,
    describe_io_error,
    ensure_universal,
    load_checkpoint,
    read_client_state,
    resolve_resume,
    save_checkpoint,
    write_atomic,
)
from metric_ds.config import Config, save_config
from metric_ds.console import add_train_arguments, apply_local_rank, config_from_args, run_guarded
from metric_ds.data.collate import Collator, TextDataset
from metric_ds.data.pipeline import TrainingData, load_training_data
from metric_ds.data.sampler import PKBatchSampler, RandomBatchSampler
from metric_ds.ds_config import build_ds_config
from metric_ds.errors import UserError
from metric_ds.evaluator import ShardedBatches, collect_outputs, compute_metrics
from metric_ds.grad_cache import accumulated_step
from metric_ds.losses import JointLoss, LossTerms, TermWindow
from metric_ds.metrics import lower_is_better
from metric_ds.model import MetricClassifier, load_encoder, model_inputs
from metric_ds.preflight import preflight
from metric_ds.progress import progress_bar
from metric_ds.resume_check import check_resume
from metric_ds.tracking import build_trackers


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
    given to DeepSpeed as the client optimizer: DeepSpeed's own torch_adam path cannot take ``fused``. On a
    MiniLM-sized model it steps 2.2x faster on CPU than the multi-tensor form, which was itself ~12% of a CPU step
    faster than the per-tensor loop (``benchmarks/bench_overhead.py``). DeepSpeed's mixed precision and ZeRO hand
    it their fp32 master partitions, so its state is the same in every mode."""
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


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    # non_blocking copies overlap with compute only from pinned memory (the loaders pin on CUDA)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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
        self.run_dir = cfg.run_dir
        self.data: TrainingData = load_training_data(cfg)
        self.label_map = self.data.label_map
        self.data_fingerprint = self.data.fingerprint()  # saved with every checkpoint, checked on resume
        encoder, self.tokenizer = load_encoder(cfg.model_name, t.attention_implementation)
        model = MetricClassifier(encoder, self.label_map.num_classes, cfg.model.pooling,
                                 cfg.model.projection_dim, cfg.model.classifier_dropout)
        D.init_process_group()
        self._build_data()
        self._resume = self._prepare_resume()
        self._build_engine(model)
        self.loss_fn = JointLoss(t.classification_loss_weight, t.metric_loss_weight, t.supcon_temperature,
                                 t.supcon_impl, t.supcon_scope, num_classes=self.label_map.num_classes)
        self.bank = _build_bank(cfg, model, self.device)
        self.state = LoopState()
        self.last_val: dict[str, float] = {}
        self._memory_note: dict[str, float] = {}  # accumulated windows on CUDA: activation memory, logged
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
        if self._resume is not None and self._resume[2] == UNIVERSAL_TAG:
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
        self.engine, _, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=_make_optimizer(model, cfg),
            config=ds_config, lr_scheduler=_scheduler_factory(cfg, num_training_steps),
        )
        self.device = self.engine.device
        if D.world_size() == 1 and cfg.deepspeed.zero_stage == 0:
            # one process: DeepSpeed would still flatten and "all-reduce" every gradient each step (~5% of a CPU step)
            self.engine.enable_backward_allreduce = False

    def _prepare_resume(self) -> tuple[Path, dict[str, Any], str] | None:
        """Before the engine exists: the checkpoint to resume, our state in it (the config and data checked against
        it), and the DeepSpeed tag to load: the checkpoint's own, or on another world size its universal form."""
        cfg = self.cfg
        if not cfg.training.resume_from:
            return None
        ckpt = resolve_resume(cfg.training.resume_from, self.run_dir)
        client = read_client_state(ckpt)
        check_resume(yaml.safe_load(client["config"]) if "config" in client else None,
                     client.get("data_fingerprint"), cfg.to_dict(), self.data_fingerprint, str(ckpt))
        saved_world = int(client.get("world_size", D.world_size()))
        if saved_world == D.world_size():
            return ckpt, client, DS_TAG
        self._remap_position(client["loop"], saved_world)
        if D.is_main():
            tqdm.write(f"resuming a checkpoint of {saved_world} process(es) on {D.world_size()}: the sampler position "
                       "and the bank remapped, the RNG streams started afresh (the run continues, not bit for bit)")
        if cfg.deepspeed.zero_stage == 0:  # every rank saved the whole state: it loads on any world size
            return ckpt, client, DS_TAG
        ensure_universal(ckpt)  # ZeRO 1-3 partitions the state by rank: DeepSpeed's universal form re-partitions it
        return ckpt, client, UNIVERSAL_TAG

    def _remap_position(self, loop: dict[str, Any], saved_world: int) -> None:
        """The position in the epoch, in this world size's micro-batches: the rows that the saved ranks consumed
        together, rounded down to whole global batches of the new world size (at most one global batch of rows is
        seen twice this epoch)."""
        rows = loop["batch_in_epoch"] * self.cfg.training.batch_size * saved_world
        per_micro = self.cfg.training.batch_size * D.world_size()
        loop["batch_in_epoch"] = min(rows // per_micro, self.micro_per_epoch)

    def _open_run_folder(self) -> None:
        """Resume (the engine's state, then ours), or start a fresh folder."""
        cfg = self.cfg
        if self._resume is not None:
            ckpt, client, tag = self._resume
            load_checkpoint(self.engine, ckpt, client, tag)
            self.state = LoopState(**client["loop"])
            if self.bank is not None and client.get("bank") is not None:
                self.bank.load_state_dict(client["bank"])
            if D.is_main():
                run_folder.open_resumed(self.run_dir, self.state.global_step)
                tqdm.write(f"resumed from {ckpt} at step {self.state.global_step}")
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
        cfg, t, st = self.cfg, self.cfg.training, self.state
        if st.global_step >= self.total_steps and (self.run_dir / "summary.json").is_file():
            if D.is_main():
                tqdm.write(f"{self.run_dir} already finished at step {st.global_step}; nothing to train")
            self.tracker.close()
            return json.loads((self.run_dir / "summary.json").read_text())
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
            self.sampler.set_epoch(st.epoch)
            loader = torch.utils.data.DataLoader(
                self.train_ds, batch_sampler=SkipBatches(self.sampler, st.batch_in_epoch),
                collate_fn=self.collator, num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG untouched
            )
            pending: list[dict[str, torch.Tensor]] = []
            for batch in loader:
                window_len, boundary = accumulation_window(st.batch_in_epoch, self.micro_per_epoch,
                                                           t.gradient_accumulation_steps)
                will_log = boundary and ((st.global_step + 1) % t.log_every_n_steps == 0
                                         or st.global_step + 1 == self.total_steps)
                st.batch_in_epoch += 1
                if t.contrastive_batch == "accumulated":
                    pending.append(batch)
                    if not boundary:
                        continue
                    terms, manual_norm = self._train_window(pending, will_log)
                    pending = []
                else:
                    terms, manual_norm = self._train_micro_batch(batch, window_len, boundary, will_log)
                st.samples_seen += terms.counts.rows
                window.add(terms, micro_batches=window_len if t.contrastive_batch == "accumulated" else 1)
                if not boundary:
                    continue
                st.global_step += 1
                bar.update(1)
                if will_log:
                    self._log_train(window, time.perf_counter() - window_t0, manual_norm, bar)
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

    def _train_micro_batch(self, batch: dict[str, torch.Tensor], window_len: int, boundary: bool,
                           will_log: bool) -> tuple[LossTerms, torch.Tensor | None]:
        """Forward, loss, backward and (at a window's end) the optimizer step of one micro-batch, then the bank.

        No host-device synchronisation happens here in one process, and one (the packed row counts) with W > 1:
        what is logged stays on the device until :meth:`_log_train` (``tests/test_host_syncs.py``).

        Returns:
            The loss terms, and the pre-clipping gradient norm where DeepSpeed reports none (``will_log`` only).
        """
        t = self.cfg.training
        self.engine.set_gradient_accumulation_boundary(boundary)
        batch = _to_device(batch, self.device)
        out = self.engine(**model_inputs(batch))
        terms = self.loss_fn(out.logits, out.z, batch["labels"], batch["classifier_mask"], batch["metric_mask"])
        # DeepSpeed divides by gradient_accumulation_steps; a shorter last window is a mean over its own micro-batches.
        scale = t.gradient_accumulation_steps / window_len
        self.engine.backward(terms.backward_loss * scale if scale != 1 else terms.backward_loss)
        manual_norm = self._grad_norm_before_step() if will_log else None
        self.engine.step()
        if self.bank is not None:
            self._bank_add(out.h, batch["metric_mask"], terms, self.state.global_step + 1)
        return terms, manual_norm

    def _train_window(self, batches: list[dict[str, torch.Tensor]], will_log: bool
                      ) -> tuple[LossTerms, torch.Tensor | None]:
        """One optimizer step whose contrastive batch is every row of the accumulation window
        (``training.contrastive_batch: accumulated``, :mod:`metric_ds.grad_cache`), then the bank."""
        norm: list[torch.Tensor | None] = [None]

        def before_step() -> None:
            if will_log:
                norm[0] = self._grad_norm_before_step()

        on_cuda = self.device.type == "cuda"
        if on_cuda and will_log:
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        result = accumulated_step(self.engine, self.loss_fn, [_to_device(b, self.device) for b in batches],
                                  before_step)
        if on_cuda and will_log:  # the activations of one micro-batch; a micro-batch of all rows needs ~len x that
            peak = (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
            self._memory_note = {"train/activation_peak_mb": peak,
                                 "train/memory_saved_mb_est": peak * (len(batches) - 1)}
        if self.bank is not None:
            self._bank_add(result.h, result.metric_mask, result.terms, self.state.global_step + 1)
        return result.terms, norm[0]

    def _log_train(self, window: TermWindow, elapsed: float, manual_norm: torch.Tensor | None, bar: Any) -> None:
        """The one host read of a logging window: its loss terms, lr, grad norm and throughput."""
        t = self.cfg.training
        terms = window.read()
        lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else 0.0
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = manual_norm if grad_norm is None else grad_norm
        record = {f"train/{'loss' if k == 'total' else k}": v for k, v in terms.items()}
        record.update(self._memory_note)
        record.update({
            "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/samples_per_s": window.rows / max(elapsed, 1e-9),
            "train/step_time_s": elapsed / max(window.micro / t.gradient_accumulation_steps, 1),
        })
        self._log(record)
        bar.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{lr:.2e}", sps=f"{record['train/samples_per_s']:.1f}")

    def _finish(self, wall: float, samples: int) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
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
            "train_samples_per_s": samples / max(wall, 1e-9),
            "world_size": D.world_size(),
            # every rank's fingerprint of its bank and last validation metrics: they must agree
            "rank_digests": digests,
            "ranks_agree": len({json.dumps(d, sort_keys=True) for d in digests}) == 1,
        }
        self.tracker.close()
        if D.is_main():
            write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        if st.best_step is None:
            raise UserError(
                f"no best/ was written: {summary['best_metric']} was never computed on the validation split "
                f"(checkpointing.save_best_by = {cfg.checkpointing.save_best_by}). The last weights are in the "
                f"checkpoints of {self.run_dir}; pick a save_best_by that the validation rows can score")
        if D.is_main():
            tqdm.write(
                f"done: {st.global_step} steps in {wall:.1f}s ({summary['train_samples_per_s']:.1f} samples/s); "
                f"best {summary['best_metric']} = {st.best_value} at step {st.best_step}; "
                f"best model: {summary['best_dir']}; run: {self.run_dir}"
            )
        return summary

    def _grad_norm_before_step(self) -> torch.Tensor | None:
        """The gradient norm before clipping, where DeepSpeed does not report one (ZeRO 0 in fp32); a device
        tensor, read at the log step."""
        if self.cfg.deepspeed.zero_stage != 0 or self.cfg.training.mixed_precision != "no":
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())

    def _rank_digests(self) -> list[dict[str, str]]:
        """A hash of the bank (in order) and of the last validation record, from every rank."""
        h = hashlib.sha256()
        if self.bank is not None:
            for t in self.bank.copy_live_rows():
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        mine = {"bank": h.hexdigest()[:16],
                "val": hashlib.sha256(json.dumps(self.last_val, sort_keys=True).encode()).hexdigest()[:16]}
        if not D.is_dist():
            return [mine]
        out: list = [None] * D.world_size()
        torch.distributed.all_gather_object(out, mine)
        return out

    def _bank_add(self, h: torch.Tensor, metric_mask: torch.Tensor, terms: LossTerms, step: int) -> None:
        """Add this micro-batch's metric rows (from every rank, in rank order) to the bank, reusing the rows and
        counts that the loss already gathered: only ``h`` is gathered here."""
        sizes = terms.counts.metric_sizes
        h_m = h.detach()[metric_mask.bool()].float()
        cs = terms.contrast
        if D.world_size() > 1 and self.loss_fn.supcon_scope == "local":  # the loss gathered no rows
            z, y = D.gather_rows(cs.z.float(), sizes, with_grad=False), D.gather_rows(cs.labels, sizes, with_grad=False)
        else:
            z, y = cs.z.float(), cs.labels
        self.bank.add(z, D.gather_rows(h_m, sizes, with_grad=False), y, step)

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
        cfg, t, mv = self.cfg, self.cfg.training, self.cfg.metric_validation
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
        if self._improved(metrics.get(cfg.checkpointing.save_best_by)):
            self.state.best_value, self.state.best_step = metrics[cfg.checkpointing.save_best_by], self.state.global_step
            self._export_best(record)
        return record

    def _improved(self, value: float | None) -> bool:
        """Whether ``value`` beats the best so far: decided on rank 0 and broadcast, so that ranks whose float
        metrics differ in the last bit never disagree (the export that follows is a collective)."""
        key, best = self.cfg.checkpointing.save_best_by, self.state.best_value
        better = value is not None and not math.isnan(value) and (
            best is None or (value < best if lower_is_better(key) else value > best))
        return D.broadcast_flag(better, self.device)

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
            def write(folder: Path) -> None:
                save_model(folder, self.engine.module, self.tokenizer, label_map=self.label_map, state_dict=state_dict,
                           config=self.cfg, metrics={"step": self.state.global_step, **record},
                           train_table=self.cfg.data.train_path)

            try:
                run_folder.swap_in_best(self.run_dir, write)
            except OSError as exc:
                raise UserError(f"could not export best/ to {self.run_dir}: {describe_io_error(exc, self.run_dir)} "
                                "(the previous best/ is intact)") from None
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
