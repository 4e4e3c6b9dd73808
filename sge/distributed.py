"""Every torch.distributed call of the project.

Processes are started by ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT); a plain ``python train.py`` is a world of one and needs no process group.
The backend is NCCL on GPUs and Gloo on CPU (``dist.backend=auto``). The timeout bounds how
long a collective waits for a dead peer, so a lost process ends the run with an error instead
of a hang (torch's default is 30 minutes).
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(backend: str = "auto", timeout_s: int = 120) -> torch.device:
    """Join the process group described by torchrun's environment; return this process's device."""
    gpu = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if gpu and local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"process LOCAL_RANK={local_rank} has no GPU: only "
                           f"{torch.cuda.device_count()} visible; start at most that many "
                           f"processes per node (torchrun --nproc_per_node)")
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    if env_world_size() > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if gpu else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
    return device


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def sum_tensor(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over all processes (in place, also returned); a no-op on one process.

    Evaluation calls it once, after its loop: the val shards differ in length, so a
    collective inside the loop would deadlock.
    """
    if not is_dist():
        return values
    if dist.get_backend() == "nccl" and values.device.type != "cuda":  # NCCL: GPU tensors only
        on_gpu = values.cuda()
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        return values.copy_(on_gpu)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class PeerLostError(RuntimeError):
    """A collective failed because another process died or hung (bounded by dist.timeout_s)."""


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed collective (gloo/NCCL transport error or timeout)."""
    if not is_dist():
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("gloo", "NCCL", "Connection reset", "Connection closed",
                                  "timed out", "Timed out"))


def barrier() -> None:
    if is_dist():
        dist.barrier()


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel when a process group exists, else the model itself."""
    if not is_dist():
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model: torch.nn.Module):
    """Context skipping DDP's gradient all-reduce (accumulation micro-batches); else no-op."""
    return model.no_sync() if hasattr(model, "no_sync") and is_dist() else contextlib.nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BN running statistics) to every rank."""
    if is_dist():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
