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


def _record_calls(monkeypatch, owner, name, seen):
    """Wraps ``owner.name`` so that each call appends its arguments by name to ``seen``."""
    real = getattr(owner, name)
    signature = inspect.signature(real)

    def recorded(*args, **kw):
        bound = signature.bind(*args, **kw)
        bound.apply_defaults()
        seen.append(dict(bound.arguments))
        return real(*args, **kw)
    monkeypatch.setattr(owner, name, recorded)
    return seen


@pytest.fixture
def kernel_forwards(monkeypatch):
    """Records each forward of the C++ kernels (sge/fused_cpu.py), from Python
    (``fused_cpu.forward``) or as eager training's tail node (``fused_cpu.tail``), as a dict
    of ``fused_cpu.forward``'s arguments by name."""
    from sge import fused_cpu
    seen = _record_calls(monkeypatch, fused_cpu, "forward", [])
    real_tail = fused_cpu.tail

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
    monkeypatch.setattr(fused_cpu, "tail", tail)
    return seen


@pytest.fixture
def kernel_backwards(monkeypatch):
    """Records each call of the C++ kernels' backward from Python (``fused_cpu.backward``; a
    tail node's backward runs in C++ and is not seen here), as a dict of its arguments by
    name."""
    from sge import fused_cpu
    return _record_calls(monkeypatch, fused_cpu, "backward", [])
