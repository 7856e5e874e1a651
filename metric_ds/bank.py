"""The embedding bank: a ring buffer, on the training device, of the metric rows of recent optimizer steps.

It holds, per row, the normalised SupCon embedding ``z`` (for ``cos`` retrieval), the raw pooled embedding
``h`` (for ``l2`` retrieval and norm statistics), the label and the optimizer step that added it. Rows added
at step ``s`` live while ``newest_step - s < keep_last_n_steps``; older rows are evicted on each
:meth:`add`, and when the buffer is full the oldest rows are overwritten. The training loop feeds it each step's
rows of every rank through :meth:`~EmbeddingBank.add_step_rows`; a checkpoint saved under another bank size is
restored through :func:`migrate_state`. The retrieval metrics that use it, and its health statistics
(:func:`metric_ds.metrics.embedding_stats`), live in :mod:`metric_ds.metrics`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from metric_ds import distributed as D
from metric_ds.errors import UserError
from metric_ds.metrics import embedding_stats

_EMPTY = -1  # ``steps`` value of a slot that holds no live row


class EmbeddingBank:
    """Ring buffer of recent train embeddings.

    Args:
        capacity: rows held at most (``keep_last_n_steps`` x metric rows per optimizer step).
        z_dim: size of the normalised SupCon embedding ``z``.
        h_dim: size of the raw pooled embedding ``h``.
        keep_last_n_steps: rows added at step ``s`` stay while ``newest step - s < keep_last_n_steps``.
        device: where the tensors live (the training device).
    """

    def __init__(self, capacity: int, z_dim: int, h_dim: int, keep_last_n_steps: int,
                 device: torch.device | str = "cpu"):
        if capacity < 0 or z_dim <= 0 or h_dim <= 0 or keep_last_n_steps <= 0:
            raise ValueError(f"EmbeddingBank needs capacity >= 0 and z_dim, h_dim, keep_last_n_steps > 0; "
                             f"got capacity={capacity}, z_dim={z_dim}, h_dim={h_dim}, "
                             f"keep_last_n_steps={keep_last_n_steps}")
        self.capacity, self.keep = int(capacity), int(keep_last_n_steps)
        self.z = torch.zeros(self.capacity, z_dim, device=device)
        self.h = torch.zeros(self.capacity, h_dim, device=device)
        self.labels = torch.zeros(self.capacity, dtype=torch.long, device=device)
        self.steps = torch.full((self.capacity,), _EMPTY, dtype=torch.long, device=device)
        self.ptr = 0  # next slot to write; slots ptr, ptr+1, ... (mod capacity) run oldest to newest
        self.last_step = -1  # newest step added

    @property
    def device(self) -> torch.device:
        return self.z.device

    def __len__(self) -> int:
        return int((self.steps != _EMPTY).sum())

    @torch.no_grad()
    def add(self, z: torch.Tensor, h: torch.Tensor, labels: torch.Tensor, step: int) -> None:
        """Append rows seen at optimizer ``step``, then evict rows more than ``keep_last_n_steps`` steps old.

        Rows are copied (detached, as fp32) onto the bank's device. When more rows arrive than fit, the oldest
        are overwritten; of a single call larger than ``capacity`` only its last ``capacity`` rows are kept.

        Shape:
            z: (n, z_dim); h: (n, h_dim); labels: (n,) class ids.
        """
        n = z.shape[0]
        if h.shape[0] != n or labels.shape[0] != n or z.shape[1:] != self.z.shape[1:] or \
                h.shape[1:] != self.h.shape[1:]:
            raise ValueError(f"EmbeddingBank.add: expected z (n, {self.z.shape[1]}), h (n, "
                             f"{self.h.shape[1]}) and labels (n,), got {tuple(z.shape)}, {tuple(h.shape)}, "
                             f"{tuple(labels.shape)}")
        self.last_step = max(self.last_step, int(step))
        if n and self.capacity:
            if n > self.capacity:
                z, h, labels = z[-self.capacity:], h[-self.capacity:], labels[-self.capacity:]
                n = self.capacity
            slots = (torch.arange(n, device=self.device) + self.ptr) % self.capacity
            self.z[slots] = z.detach().to(self.z)
            self.h[slots] = h.detach().to(self.h)
            self.labels[slots] = labels.to(self.labels)
            self.steps[slots] = int(step)
            self.ptr = (self.ptr + n) % self.capacity
        self.evict_older_than(self.last_step - self.keep + 1)

    def evict_older_than(self, step: int) -> None:
        """Drop every row added before ``step``."""
        self.steps.masked_fill_((self.steps != _EMPTY) & (self.steps < step), _EMPTY)

    def _order(self) -> torch.Tensor:
        """Slots of the live rows, oldest first."""
        order = (torch.arange(self.capacity, device=self.device) + self.ptr) % self.capacity
        return order[self.steps[order] != _EMPTY]

    def copy_live_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The live rows in insertion order (oldest first).

        Returns:
            ``(z, h, labels, steps)``: (n, z_dim), (n, h_dim), (n,), (n,) copies on the bank's device.
        """
        order = self._order()
        return self.z[order], self.h[order], self.labels[order], self.steps[order]

    def state_dict(self) -> dict[str, Any]:
        """Plain CPU tensors and ints, readable by ``torch.load(weights_only=True)``."""
        return {"z": self.z.cpu(), "h": self.h.cpu(), "labels": self.labels.cpu(), "steps": self.steps.cpu(),
                "ptr": self.ptr, "last_step": self.last_step, "keep_last_n_steps": self.keep}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: exactly when the shape is unchanged, else through :func:`migrate_state`.

        A run resumed with another ``train_bank_steps`` or batch size keeps the newest rows that fit
        and are young enough under the new setting.

        Raises:
            UserError: the saved embedding sizes differ from this bank's (the model changed).
        """
        z, h = state["z"], state["h"]
        if z.shape[1:] != self.z.shape[1:] or h.shape[1:] != self.h.shape[1:]:
            raise UserError(f"the checkpoint's embedding bank holds z of size {z.shape[1]} and h of size "
                            f"{h.shape[1]}, but this model gives {self.z.shape[1]} and {self.h.shape[1]}: "
                            f"resume with the same model and model.projection_dim")
        if z.shape[0] != self.capacity or int(state.get("keep_last_n_steps", self.keep)) != self.keep:
            state = migrate_state(state, self.capacity, self.keep)
        for key in ("z", "h", "labels", "steps"):
            getattr(self, key).copy_(state[key])
        self.ptr, self.last_step = int(state["ptr"]), int(state["last_step"])

    @torch.no_grad()
    def add_step_rows(self, rows: StepRows, step: int) -> None:
        """Add one optimizer step's metric rows from every rank, in rank order, so that every rank's bank is the
        same. The rows and counts that the loss already gathered are reused: only ``h`` is gathered here (and
        ``z`` and the labels where the loss contrasted this rank's rows only). The metric rows of ``h`` are taken
        by their indices (found on the CPU), not by a boolean mask, which would wait for the device."""
        h_m = rows.h.detach()[rows.metric_rows].float()
        if D.world_size() > 1 and rows.local:  # the loss gathered no rows
            z = D.gather_rows(rows.z.float(), rows.sizes, with_grad=False)
            y = D.gather_rows(rows.labels, rows.sizes, with_grad=False)
        else:
            z, y = rows.z.float(), rows.labels
        self.add(z, D.gather_rows(h_m, rows.sizes, with_grad=False), y, step)

    def stats(self, num_classes: int, current_step: int | None = None) -> dict[str, float]:
        """Health statistics of the live rows, keys under ``bank/``: :func:`metric_ds.metrics.embedding_stats`,
        with ``mean_age``, the mean over rows of ``current_step - step added`` (``current_step`` defaults to the
        newest step added).

        Args:
            num_classes: number of classes of the task (labels are ``0 .. num_classes - 1``).
            current_step: the optimizer step the ages are measured at.
        """
        z, h, labels, steps = self.copy_live_rows()
        if labels.numel() and (int(labels.max()) >= num_classes or int(labels.min()) < 0):
            raise ValueError(f"EmbeddingBank.stats: labels must be in [0, {num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        current = self.last_step if current_step is None else int(current_step)
        stats = embedding_stats(z, h, labels, num_classes, ages=current - steps)
        return {f"bank/{key}": value for key, value in stats.items()}


@dataclass
class StepRows:
    """One optimizer step's rows for the bank, as the loss left them (nothing gathered or copied yet).

    Attributes:
        h: this rank's pooled embeddings of every row; ``metric_rows`` picks the metric rows.
        metric_rows: the indices of this rank's metric rows, in row order (int64, on ``h``'s device).
        z, labels: the loss's contrast rows: every rank's where the loss gathered them, else this rank's.
        sizes: every rank's metric row count, in rank order.
        local: the loss contrasted this rank's rows only (``training.supcon_scope: local``).
    """

    h: torch.Tensor
    metric_rows: torch.Tensor
    z: torch.Tensor
    labels: torch.Tensor
    sizes: list[int]
    local: bool


def migrate_state(state: dict[str, Any], capacity: int, keep_last_n_steps: int) -> dict[str, Any]:
    """A bank's :meth:`~EmbeddingBank.state_dict` saved under another capacity or ``keep_last_n_steps``, turned
    into the state of a bank of ``capacity`` and ``keep_last_n_steps``: its live rows re-added oldest first, so
    that the newest rows that fit and are young enough under the new setting stay."""
    z, h = state["z"], state["h"]
    old = EmbeddingBank(z.shape[0], z.shape[1], h.shape[1], int(state.get("keep_last_n_steps", keep_last_n_steps)))
    for key in ("z", "h", "labels", "steps"):
        getattr(old, key).copy_(state[key])
    old.ptr, old.last_step = int(state["ptr"]), int(state["last_step"])
    new = EmbeddingBank(capacity, z.shape[1], h.shape[1], keep_last_n_steps)
    oz, oh, olab, osteps = old.copy_live_rows()
    for s in torch.unique(osteps).tolist():  # ascending: oldest first
        rows = osteps == s
        new.add(oz[rows], oh[rows], olab[rows], s)
    new.last_step = max(new.last_step, old.last_step)
    new.evict_older_than(new.last_step - new.keep + 1)
    return new.state_dict()
