"""The embedding bank: a ring buffer, on the training device, of the metric rows of recent optimizer steps.

It holds, per row, the normalised SupCon embedding ``z`` (for ``cos`` retrieval), the raw pooled embedding ``h``
(for ``l2`` retrieval and norm statistics), the label and the optimizer step that added it. Rows older than
``keep_last_n_steps`` steps are evicted; when full, the oldest rows are overwritten.
"""
from __future__ import annotations

from typing import Any

import torch

from metric_ds.metrics import alignment, uniformity


class EmbeddingBank:
    """Ring buffer of recent train embeddings.

    Args:
        capacity: rows held at most (``keep_last_n_steps`` x metric rows per step).
        z_dim, h_dim: embedding sizes.
        keep_last_n_steps: rows added at step ``s`` stay while ``current - s < keep_last_n_steps``.
        device: where the tensors live (the training device).
    """

    def __init__(self, capacity: int, z_dim: int, h_dim: int, keep_last_n_steps: int,
                 device: torch.device | str = "cpu"):
        self.capacity, self.keep = int(capacity), int(keep_last_n_steps)
        self.z = torch.zeros(self.capacity, z_dim, device=device)
        self.h = torch.zeros(self.capacity, h_dim, device=device)
        self.labels = torch.zeros(self.capacity, dtype=torch.long, device=device)
        self.steps = torch.full((self.capacity,), -1, dtype=torch.long, device=device)
        self.ptr = 0  # next slot to write
        self.count = 0  # filled slots
        self.last_step = 0

    def __len__(self) -> int:
        return int(self._live().sum())

    def _live(self) -> torch.Tensor:
        filled = self.steps >= 0
        return filled & (self.last_step - self.steps < self.keep)

    def add(self, z: torch.Tensor, h: torch.Tensor, labels: torch.Tensor, step: int) -> None:
        """Append rows added at optimizer ``step`` (overwriting the oldest when full)."""
        self.last_step = max(self.last_step, int(step))
        n = z.shape[0]
        if n == 0 or self.capacity == 0:
            return
        if n > self.capacity:
            z, h, labels, n = z[-self.capacity:], h[-self.capacity:], labels[-self.capacity:], self.capacity
        slots = (torch.arange(n, device=self.z.device) + self.ptr) % self.capacity
        self.z[slots] = z.detach().to(self.z)
        self.h[slots] = h.detach().to(self.h)
        self.labels[slots] = labels.to(self.labels)
        self.steps[slots] = int(step)
        self.ptr = (self.ptr + n) % self.capacity
        self.count = min(self.count + n, self.capacity)

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Live rows in insertion order (oldest first): ``(z, h, labels, steps)``."""
        order = (torch.arange(self.capacity, device=self.z.device) + (self.ptr if self.count == self.capacity
                                                                       else 0)) % self.capacity
        order = order[self._live()[order]]
        return self.z[order], self.h[order], self.labels[order], self.steps[order]

    def state_dict(self) -> dict[str, Any]:
        return {"z": self.z.cpu(), "h": self.h.cpu(), "labels": self.labels.cpu(), "steps": self.steps.cpu(),
                "ptr": self.ptr, "count": self.count, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("z", "h", "labels", "steps"):
            getattr(self, key).copy_(state[key])
        self.ptr, self.count, self.last_step = int(state["ptr"]), int(state["count"]), int(state["last_step"])

    @torch.no_grad()
    def stats(self, num_classes: int, current_step: int | None = None) -> dict[str, float]:
        """Statistics under ``bank/``.

        * ``size``; ``classes_covered`` of ``classes_total``; per-class count ``class_count_min/median/max``
          over covered classes;
        * ``mean_age``: mean of ``current_step - step added``;
        * ``norm_mean`` / ``norm_std``: of the raw ``h``;
        * ``intra_cos``: mean cosine over same-class pairs i != j (of ``z``), pairs pooled over classes;
        * ``inter_centroid_cos``: mean cosine between the normalised centroids of distinct covered classes;
        * ``alignment`` and ``uniformity`` (Wang & Isola 2020, alpha = 2, t = 2) of ``z``.
        """
        z, h, labels, steps = self.view()
        n = int(labels.numel())
        out: dict[str, float] = {"bank/size": float(n), "bank/classes_total": float(num_classes)}
        if n == 0:
            out["bank/classes_covered"] = 0.0
            return out
        current = self.last_step if current_step is None else current_step
        counts = torch.bincount(labels, minlength=num_classes)
        covered = counts[counts > 0].double()
        out.update({
            "bank/classes_covered": float((counts > 0).sum()),
            "bank/class_count_min": float(covered.min()),
            "bank/class_count_median": float(covered.median()),
            "bank/class_count_max": float(covered.max()),
            "bank/mean_age": float((current - steps).double().mean()),
            "bank/norm_mean": float(h.norm(dim=1).mean()),
            "bank/norm_std": float(h.norm(dim=1).std()) if n > 1 else 0.0,
        })
        zd = torch.nn.functional.normalize(z.double(), dim=1)
        sums = torch.zeros(num_classes, zd.shape[1], dtype=torch.float64, device=z.device).index_add_(0, labels, zd)
        c = counts.double()
        pair_dots = (sums * sums).sum(1) - c  # sum over ordered same-class pairs i != j of cos (unit vectors)
        pairs = c * (c - 1)
        out["bank/intra_cos"] = float(pair_dots.sum() / pairs.sum()) if pairs.sum() > 0 else float("nan")
        cent = torch.nn.functional.normalize(sums[counts > 0], dim=1)
        m = cent.shape[0]
        if m > 1:
            g = cent @ cent.T
            out["bank/inter_centroid_cos"] = float((g.sum() - g.diagonal().sum()) / (m * (m - 1)))
        else:
            out["bank/inter_centroid_cos"] = float("nan")
        out["bank/alignment"] = alignment(zd, labels)
        out["bank/uniformity"] = uniformity(zd)
        return out
