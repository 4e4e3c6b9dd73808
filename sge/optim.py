"""SGD with parameter groups, the linear lr-scaling rule, and per-iteration lr schedules.

The paper (DESIGN.md) decays **all** parameters; the modern recipe exempts normalization
layers, biases and SGE's per-group gamma/beta (``wd_norm_bias=False``), which are scale
and shift parameters that weight decay would only pull towards zero.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sge import sge_layer


def scaled_lr(lr: float, global_batch: int, ref_batch: int = 256) -> float:
    """Linear scaling rule (Goyal et al. 2017): ``lr`` is for ``ref_batch`` images per step."""
    return lr * global_batch / ref_batch


def param_groups(model: nn.Module, weight_decay: float, wd_norm_bias: bool) -> list[dict]:
    """One group with decay, and (unless ``wd_norm_bias``) one without for BN/bias/SGE."""
    if wd_norm_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "weight_decay": weight_decay}]
    sge_types = (sge_layer("reference"), sge_layer("fused"))
    no_decay = set()
    for module in model.modules():
        if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                               *sge_types)):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    for name, p in model.named_parameters():
        if name.endswith(".bias") or p.ndim <= 1:
            no_decay.add(id(p))
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]


def build_sgd(model: nn.Module, lr: float, momentum: float, nesterov: bool,
              weight_decay: float, wd_norm_bias: bool) -> torch.optim.SGD:
    groups = param_groups(model, weight_decay, wd_norm_bias)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


class LrSchedule:
    """The lr as a pure function of the optimizer step, applied before every step.

    ``step`` milestones (epochs) multiply the lr by ``gamma`` (the paper: x0.1 at 30/60/90);
    ``cosine`` decays from the peak to ``min_lr`` over the run. Both may start with a linear
    warmup from 0. Being a function of the step, its only state is the step count, so a
    resumed run gets exactly the lr it would have had.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, steps_per_epoch: int,
                 epochs: int, name: str = "step", milestones=(), gamma: float = 0.1,
                 warmup_epochs: float = 0.0, min_lr: float = 0.0):
        self.optimizer = optimizer
        self.base_lr, self.name, self.gamma, self.min_lr = base_lr, name, gamma, min_lr
        self.milestones = [m * steps_per_epoch for m in milestones]
        self.warmup = round(warmup_epochs * steps_per_epoch)
        self.total = epochs * steps_per_epoch
        self.last_step = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        if self.name == "step":
            return self.base_lr * self.gamma ** sum(step >= m for m in self.milestones)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return self.min_lr + (self.base_lr - self.min_lr) * cosine

    def apply(self, step: int) -> float:
        """Set the lr of every parameter group for optimizer step ``step`` (0-based)."""
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.last_step = step
        return lr

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "base_lr": self.base_lr, "name": self.name}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = state["last_step"]
