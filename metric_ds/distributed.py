"""Process-group helpers: who we are, and gathers of variable-sized row blocks (with or without autograd).

Every rank must call these collectives in the same order. Ranks contribute different numbers of rows, so a
gather first shares the row counts, pads every block to the largest, gathers, and keeps the valid rows, in rank
order on every rank (so each rank builds the same concatenation).
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_env() -> None:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for a launcher-less single process.

    Without them DeepSpeed falls back to MPI discovery. Launchers (deepspeed, torchrun) set them already.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        return
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_process_group() -> None:
    """Join the process group the launcher described (or form a one-process group), once per process.

    The one place that picks the backend and the device: NCCL with this process's GPU (``LOCAL_RANK``) where
    CUDA is available, gloo otherwise. Idempotent, so in-process callers may train several times.
    """
    import deepspeed

    ensure_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not is_dist():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def shutdown() -> None:
    """End this process's part in the process group: wait for every rank, then destroy the group.

    Call it once per process, at the end of a successful run. A process that exits with a live gloo group can
    abort in interpreter finalisation ("terminate called without an active exception", SIGABRT) while its
    worker threads still hold tensors, and a rank that leaves early can break a peer still inside a collective.
    Not on error paths: a barrier there would wait for ranks that failed.
    """
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()


def all_gather_counts(counts: list[int], device: torch.device) -> torch.Tensor:
    """Gather a few integers from every rank: returns (W, len(counts)) int64, row r from rank r."""
    local = torch.tensor(counts, dtype=torch.int64, device=device)
    if not is_dist():
        return local.unsqueeze(0)
    out = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(out, local)
    return torch.stack(out)


def gather_rows(x: torch.Tensor, sizes: list[int], with_grad: bool) -> torch.Tensor:
    """Concatenate every rank's rows of ``x`` in rank order.

    Args:
        x: this rank's (n_r, ...) block; n_r == sizes[rank()].
        sizes: every rank's row count (from :func:`all_gather_counts`).
        with_grad: gather through ``torch.distributed.nn`` so gradients flow back to each owner (summed over
            ranks).

    Returns:
        (sum(sizes), ...) tensor.
    """
    if not is_dist():
        return x
    longest = max(sizes)
    pad = longest - x.shape[0]
    # Contiguous, equal-sized blocks: torch.distributed.nn.all_gather gives wrong gradients otherwise in some
    # torch versions.
    block = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
    block = block.contiguous()
    if with_grad:
        import warnings

        import torch.distributed.nn as dist_nn

        with warnings.catch_warnings():  # its deprecation notice: this autograd gather is what the tests check
            warnings.simplefilter("ignore")
            parts = dist_nn.all_gather(block)
    else:
        parts = [torch.empty_like(block) for _ in sizes]
        dist.all_gather(parts, block)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (the one decision that collectives after it depend on)."""
    if not is_dist():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a (detached) tensor over ranks; identity in one process."""
    if is_dist():
        x = x.clone()
        dist.all_reduce(x)
    return x
