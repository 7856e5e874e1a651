"""The embedding bank: a ring buffer, on the training device, of the metric rows of recent optimizer steps.

It holds, per row, the normalised SupCon embedding ``z`` (for ``cos`` retrieval), the raw pooled embedding
``h`` (for ``l2`` retrieval and norm statistics), the label and the optimizer step that added it. Rows added
at step ``s`` live while ``newest_step - s < keep_last_n_steps``; older rows are evicted on each
:meth:`add`, and when the buffer is full the oldest rows are overwritten. The retrieval metrics that use it
live in :mod:`metric_ds.metrics`.
"""
from __future__ import annotations

from typing import Any

import torch

from metric_ds.errors import UserError
from metric_ds.metrics import alignment, uniformity

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
        """Restore a :meth:`state_dict`: exactly when the shape is unchanged, else by re-adding the live rows.

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
        if z.shape[0] == self.capacity and int(state.get("keep_last_n_steps", self.keep)) == self.keep:
            for key in ("z", "h", "labels", "steps"):
                getattr(self, key).copy_(state[key])
            self.ptr, self.last_step = int(state["ptr"]), int(state["last_step"])
            return
        old_keep = int(state.get("keep_last_n_steps", self.keep))
        old = EmbeddingBank(z.shape[0], z.shape[1], h.shape[1], old_keep)
        for key in ("z", "h", "labels", "steps"):
            getattr(old, key).copy_(state[key])
        old.ptr, old.last_step = int(state["ptr"]), int(state["last_step"])
        self.__init__(self.capacity, self.z.shape[1], self.h.shape[1], self.keep, self.device)
        oz, oh, olab, osteps = old.copy_live_rows()
        for s in torch.unique(osteps).tolist():  # ascending: oldest first
            rows = osteps == s
            self.add(oz[rows], oh[rows], olab[rows], s)
        self.last_step = max(self.last_step, old.last_step)
        self.evict_older_than(self.last_step - self.keep + 1)

    @torch.no_grad()
    def stats(self, num_classes: int, current_step: int | None = None) -> dict[str, float]:
        """Health statistics of the bank, keys under ``bank/``. All in O(n d) memory.

        * ``size``: live rows ``n``; ``classes_covered``: classes with at least one row, of ``classes_total``.
        * ``class_count_min`` / ``_median`` / ``_max``: rows per covered class (the median of an even number
          of classes is the mean of the two middle counts, as ``numpy.median``).
        * ``mean_age``: mean over rows of ``current_step - step added`` (``current_step`` defaults to the
          newest step added).
        * ``h_norm_mean`` / ``h_norm_std``: mean and population standard deviation of ``||h_i||``.
        * ``intra_cos``: mean of ``cos(z_i, z_j)`` over all ordered pairs ``i != j`` of the same class, pooled
          over classes (a class with ``m`` rows weighs ``m (m - 1)``); from per-class sums of unit vectors,
          ``sum_{i != j} u_i.u_j = ||sum_i u_i||^2 - sum_i ||u_i||^2``.
        * ``inter_centroid_cos``: mean cosine over ordered pairs of distinct covered classes of their
          centroids (the mean of each class's normalised ``z``).
        * ``alignment``: :func:`metric_ds.metrics.alignment` of ``z`` (same-class pairs as positives).
        * ``uniformity``: :func:`metric_ds.metrics.uniformity` of ``z`` (t = 2).

        A statistic with nothing to average (e.g. ``intra_cos`` when no class has two rows) is left out.

        Args:
            num_classes: number of classes of the task (labels are ``0 .. num_classes - 1``).
            current_step: the optimizer step the ages are measured at.
        """
        z, h, labels, steps = self.copy_live_rows()
        n = int(labels.numel())
        out: dict[str, float] = {"bank/size": float(n), "bank/classes_total": float(num_classes)}
        if n == 0:
            out["bank/classes_covered"] = 0.0
            return out
        if int(labels.max()) >= num_classes or int(labels.min()) < 0:
            raise ValueError(f"EmbeddingBank.stats: labels must be in [0, {num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        current = self.last_step if current_step is None else int(current_step)
        counts = torch.bincount(labels, minlength=num_classes)
        covered = counts[counts > 0].double()
        norms = h.double().norm(dim=1)
        out.update({
            "bank/classes_covered": float((counts > 0).sum()),
            "bank/class_count_min": float(covered.min()),
            "bank/class_count_median": float(covered.quantile(0.5)),
            "bank/class_count_max": float(covered.max()),
            "bank/mean_age": float((current - steps).double().mean()),
            "bank/h_norm_mean": float(norms.mean()),
            "bank/h_norm_std": float(norms.std(correction=0)),
        })
        unit = torch.nn.functional.normalize(z.double(), dim=1)
        sums = torch.zeros(num_classes, unit.shape[1], dtype=torch.float64, device=z.device)
        sums.index_add_(0, labels, unit)
        c = counts.double()
        pairs = float((c * (c - 1)).sum())
        if pairs > 0:  # ||sum_i u_i||^2 - sum_i ||u_i||^2 = sum over ordered pairs i != j of u_i.u_j
            out["bank/intra_cos"] = float(((sums * sums).sum() - (unit * unit).sum()) / pairs)
        cent = torch.nn.functional.normalize(sums[counts > 0], dim=1)
        m = cent.shape[0]
        if m > 1:
            total = cent.sum(0)
            out["bank/inter_centroid_cos"] = float((total @ total - (cent * cent).sum()) / (m * (m - 1)))
        align = alignment(z, labels)
        if align == align:  # not NaN
            out["bank/alignment"] = align
        if n > 1:
            out["bank/uniformity"] = uniformity(z)
        return out
