"""Test set-up: the repository root on sys.path, a thread count fit for 2-core CI, and
fixtures shared by test files."""
import inspect
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def kernel_forwards(monkeypatch):
    """Records each forward of the C++ kernels (sge/fused_cpu.py), from Python
    (``fused_cpu.forward``) or as eager training's tail node (``fused_cpu.tail``), as a dict
    of ``fused_cpu.forward``'s arguments by name."""
    from sge import fused_cpu
    seen = []
    real_forward, real_tail = fused_cpu.forward, fused_cpu.tail
    signature = inspect.signature(real_forward)

    def forward(*args, **kw):
        bound = signature.bind(*args, **kw)
        bound.apply_defaults()
        seen.append(dict(bound.arguments))
        return real_forward(*args, **kw)

    def tail(z, bn_weight, bn_bias, mean, var, zmean, weight, bias, residual, groups,
             bn_training, bn_eps, keep, rbn_weight, rbn_bias, rmean, rvar, rbn_training,
             rbn_eps):
        seen.append(dict(
            z=z, bn=None if mean is None else (mean, var, bn_weight, bn_bias, bn_eps),
            weight=weight, bias=bias, groups=groups, keep=keep, residual=residual,
            zmean=zmean, out=None,
            residual_bn=None if rmean is None else (rmean, rvar, rbn_weight, rbn_bias, rbn_eps)))
        return real_tail(z, bn_weight, bn_bias, mean, var, zmean, weight, bias, residual,
                         groups, bn_training, bn_eps, keep, rbn_weight, rbn_bias, rmean, rvar,
                         rbn_training, rbn_eps)
    monkeypatch.setattr(fused_cpu, "forward", forward)
    monkeypatch.setattr(fused_cpu, "tail", tail)
    return seen
