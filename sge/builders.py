"""The one place that turns a config into objects (below it, functions take plain values).

``build_model`` is shared by training and evaluation; the rest assemble the training parts:
device placement and wrappers (SyncBN, channels_last, DDP, compile), SGD + schedule with the
linear lr rule, the grad scaler, EMA, mixup/cutmix and the loss.
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
from functools import partial

import torch
from torch import nn

import models
from sge import distributed, optim
from sge.config import Config

AMP_DTYPES = {"none": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_model(cfg: Config) -> nn.Module:
    """The plain model of ``cfg.model`` (CPU, float32, no wrappers)."""
    kwargs = {"num_classes": cfg.model.num_classes}
    if models.is_sge(cfg.model.name):
        kwargs.update(groups=cfg.model.groups, sge_impl=cfg.model.sge_impl)
    if cfg.model.channels:
        kwargs["channels"] = tuple(cfg.model.channels)
    return models.create_model(cfg.model.name, **kwargs)


def set_threads(cfg: Config) -> None:
    """Apply ``train.threads``: on a small CPU, torch's default (one thread per core) competes
    with the loader's workers; the quickstart measured 451 img/s with 1 thread against 28 with
    2 on a busy 2-core machine."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)


def init_process(cfg: Config) -> torch.device:
    """This process's device, after ``train.threads``, joining torchrun's process group
    (``dist.*``) and ``train.keep_freed_memory``: what training and evaluation both start with."""
    set_threads(cfg)
    device = distributed.init(cfg.dist.backend, cfg.dist.timeout_s)
    keep_freed_memory(cfg, device)
    return device


def keep_freed_memory(cfg: Config, device: torch.device) -> bool:
    """Apply ``train.keep_freed_memory`` where the model runs on the CPU; return whether it did."""
    return cfg.train.keep_freed_memory and device.type == "cpu" and glibc_keep_freed_memory()


def glibc_keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process; return whether it took.

    By default glibc hands each freed block over its mmap threshold back to the OS, so every
    CPU step faults its large feature maps in again: ResNet-50 at batch 16, 224 px took
    337,000 page faults per inference batch and 555,000 per train step on a 2-core VM. With
    no mmap for allocations and no trimming under 2 GB of free heap they took none, and the
    batch went 1.22 -> 0.83 s, the step 3.25 -> 2.54 s, for 5% and 17% more peak RSS
    (docs/benchmarks.md, "nineteenth session"). This is ``MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=...`` applied from inside the process. Other C libraries (no
    ``mallopt``, or one that refuses) are left as they are.
    """
    if not sys.platform.startswith("linux"):  # CDLL(None) is no C library on Windows
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1


def memory_format(cfg: Config) -> torch.memory_format:
    return torch.channels_last if cfg.model.channels_last else torch.contiguous_format


def place_model(cfg: Config, model: nn.Module, device: torch.device) -> nn.Module:
    """SyncBN (before DDP, so statistics are reduced across GPUs), device, memory format."""
    if cfg.model.sync_bn and distributed.is_dist():
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device=device, memory_format=memory_format(cfg))


def wrap_for_training(cfg: Config, model: nn.Module, device: torch.device) -> nn.Module:
    """DDP under torchrun, then torch.compile (compiling the DDP module lets Dynamo split
    graphs at bucket boundaries so gradient all-reduce overlaps with backward)."""
    model = distributed.wrap_ddp(model, device)
    return torch.compile(model) if cfg.model.compile else model


def global_batch(cfg: Config, world: int) -> int:
    return cfg.data.batch_size * world * cfg.train.accum_steps


def build_optimizer(cfg: Config, model: nn.Module, world: int) -> torch.optim.SGD:
    lr = optim.scaled_lr(cfg.optim.lr, global_batch(cfg, world), cfg.optim.ref_batch)
    return optim.build_sgd(model, lr, cfg.optim.momentum, cfg.optim.nesterov,
                           cfg.optim.weight_decay, cfg.optim.wd_norm_bias)


def build_schedule(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    # defaults["lr"] is the scaled peak lr given to SGD, untouched by the schedule.
    return optim.LrSchedule(optimizer, optimizer.defaults["lr"], steps_per_epoch, cfg.train.epochs,
                            name=cfg.sched.name, milestones=cfg.sched.milestones,
                            gamma=cfg.sched.gamma, warmup_epochs=cfg.sched.warmup_epochs,
                            min_lr=cfg.sched.min_lr)


def build_scaler(cfg: Config, device: torch.device) -> torch.amp.GradScaler:
    # Only float16 needs loss scaling; bfloat16 has float32's exponent range.
    return torch.amp.GradScaler(device.type, enabled=cfg.amp.dtype == "float16")


def autocast(cfg: Config, device: torch.device):
    """A factory of the one autocast context (a no-op context when AMP is off)."""
    dtype = AMP_DTYPES[cfg.amp.dtype]
    if dtype is None:
        return contextlib.nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def build_ema(cfg: Config, model: nn.Module):
    """An EMA copy of the plain model (timm's ModelEmaV3), or None."""
    if not cfg.train.ema:
        return None
    from timm.utils import ModelEmaV3
    return ModelEmaV3(model, decay=cfg.train.ema_decay)


def build_mixup(cfg: Config):
    """timm's Mixup/CutMix (it also applies label smoothing to the soft targets), or None."""
    if cfg.train.mixup <= 0 and cfg.train.cutmix <= 0:
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=cfg.train.mixup, cutmix_alpha=cfg.train.cutmix,
                 label_smoothing=cfg.train.label_smoothing, num_classes=cfg.model.num_classes)


def build_train_loss(cfg: Config) -> nn.Module:
    if cfg.train.mixup > 0 or cfg.train.cutmix > 0:
        from timm.loss import SoftTargetCrossEntropy
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
