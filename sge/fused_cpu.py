"""C++ CPU kernels for the fused SGE (``sge/fused_cpu.cpp`` and its channels_last helpers
``sge/fused_cpu_layout.h``; ``sge/fused.py`` calls them).

Why: the PyTorch path of the fused op on CPU is a dozen ATen calls per chunk of samples,
several over per-position tensors only C/G times smaller than the feature map; it left the
fused SGE-ResNet50 at 1.05-1.08x ResNet50's CPU time. Like the Triton kernels on GPUs, one
task here handles one (sample, group) pair, its C/G x H*W tile staying in the core's cache
through all passes: the forward reads z and writes y once, the backward reads dy and z and
writes dx once, and also sums dx and dx * z per channel for BN's backward, whose input
gradient then goes into dx in place (one more sweep, no fresh tensor). With a residual the
forward also does the block's add and ReLU, and the backward ReLU's backward, as each tile
is read. Each is one call from Python: BN's coefficients, the outputs' allocation and BN's
backward are done in C++ too (the small ATen calls they took from Python cost ~0.15 ms per
block per step, forward and backward, timed on tiny maps). channels_last maps (Inductor's
layout for CPU convolutions) are taken and given back as they are, worked on by rows of
channels (``fused_cpu_layout.h``): a first version copied them to NCHW and back, a second
transposed strips of them for the tiles, at about twice the tile code's cost.

Eager training calls them through one C++ autograd node (``tail``): its forward and
backward, and the check whether its backward may write over its incoming gradient, run
without Python (a Python autograd.Function and its wrappers cost a block tail 243 us of host
time per forward and backward, the node 206, ResNet's BN, add and ReLU 124; 2 x 256 x 4 x 4,
one thread). It keeps chat by position on channels_last maps, as both its passes read it.

Built with ``torch.utils.cpp_extension`` on first use into ``.cache/torch_extensions``
(git-ignored; later imports load the cached library). float32 and float64 tensors only
(NCHW or channels_last; other strides are copied to NCHW); other dtypes, or a failed build
(no compiler), use the PyTorch path, the latter with a one-line notice.
"""
from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

from sge.layer import EPS

# Built as one unit, in this order (the kernels use the layout helpers).
_SOURCES = [Path(__file__).with_name(n) for n in ("fused_cpu_layout.h", "fused_cpu.cpp")]
_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"
# The vector instructions torch found on this CPU (ATen's own kernels dispatch on the same).
# Without these flags g++ emits SSE2 only and the forward took 1.4x BatchNorm's time at
# ResNet-50's shapes (AVX-512 here: 1.05x). Each level builds into its own folder, so a
# checkout shared by different CPUs never loads instructions its CPU lacks.
_ISA_FLAGS = {
    "AVX2": ["-mavx2", "-mfma"],
    "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"],
}
_DTYPES = (torch.float32, torch.float64)
# Set False to force the PyTorch path (the tests do, to keep that path covered).
ENABLED = True
_state: dict = {}


def _ops():
    """``torch.ops.sge_cpu`` once built and loaded, else None (after one notice)."""
    if "ops" not in _state:
        try:
            load_inline = _import_load_inline()
            isa = torch.backends.cpu.get_cpu_capability()
            build_dir = _CACHE / f"sge_cpu_{isa.lower()}"
            build_dir.mkdir(parents=True, exist_ok=True)
            if not (build_dir / "sge_cpu.so").is_file():  # else loaded (rebuilt if changed)
                _notice(f"sge: building the fused SGE's C++ CPU kernels, once (about half a "
                        f"minute), into {build_dir}")
            # -fopenmp: at::parallel_for is OpenMP code inlined from ATen's headers.
            load_inline("sge_cpu", [p.read_text() for p in _SOURCES],
                        build_directory=str(build_dir),
                        extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math",
                                      *_ISA_FLAGS.get(isa, [])],
                        is_python_module=False)
            _state["ops"] = torch.ops.sge_cpu
        except Exception as err:  # no compiler, no ninja, a failed build
            _state["ops"] = None
            warnings.warn(f"sge: the C++ CPU kernels could not be built ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''}); "
                          "the fused SGE uses its PyTorch path there (slower)", stacklevel=3)
    return _state["ops"]


def _notice(line: str) -> None:
    """``line`` on stderr, on a line of its own under a training run's progress bar."""
    try:
        from tqdm import tqdm
        tqdm.write(line, file=sys.stderr)
    except ImportError:
        print(line, file=sys.stderr, flush=True)


def _import_load_inline():
    """torch.utils.cpp_extension, without its import-time "No CUDA runtime is found" log line
    (printed on every CPU-only run otherwise; CUDA plays no part in these kernels)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load_inline
    finally:
        log.setLevel(level)
    return load_inline


def applies(z: Tensor) -> bool:
    """Whether the kernels handle ``z``: a non-empty float32/float64 CPU tensor, once built."""
    return (ENABLED and z.device.type == "cpu" and z.dtype in _DTYPES and z.numel() > 0
            and _ops() is not None)


def stats_apply(z: Tensor) -> bool:
    """Whether ``batch_stats`` takes ``z``: ``applies``, and stored NCHW or channels_last."""
    return (z.is_contiguous() or z.is_contiguous(memory_format=torch.channels_last)) \
        and applies(z)


def _bn_args(bn) -> tuple:
    """``bn = (mean, var, bn_weight, bn_bias, eps)`` (or None) in the ops' argument order."""
    if bn is None:
        return None, None, None, None, 0.0
    mean, var, bn_weight, bn_bias, eps = bn
    return bn_weight, bn_bias, mean, var, eps


def forward(z: Tensor, bn, weight: Tensor, bias: Tensor, groups: int, keep: bool,
            residual=None, zmean=None, out=None, residual_bn=None):
    """``(y, chat, sigma, m)`` like ``sge.fused.sge_forward`` (``y`` in ``z``'s layout, NCHW
    or channels_last; empty statistics without ``keep``), ``bn = (mean, var, bn_weight,
    bn_bias, eps)`` the BN the kernel applies first (weight and bias may be None) or None.
    With a ``residual``, ``y = relu(SGE(x) + residual)``, added as each tile is written;
    ``residual_bn`` (as ``bn``): the residual's own BN (a downsampling shortcut's), applied
    as the residual is read, ``y = relu(SGE(x) + BN(residual))``.
    ``zmean``: ``z``'s (N, C) channel means, from ``batch_stats`` (one pass less), or None.
    ``out``: where ``y`` goes (then also returned as ``y``), of ``z``'s shape, dtype and
    layout; ``z`` itself is allowed."""
    y, *stats = _ops().forward(z, *_bn_args(bn), weight, bias, residual, groups, keep, EPS,
                               zmean, out, *_bn_args(residual_bn))
    return (y if out is None else out), *stats


def backward(dy: Tensor, y, z: Tensor, bn, bn_training: bool, chat: Tensor, sigma: Tensor,
             m: Tensor, weight: Tensor, bias: Tensor, residual=None, residual_bn=None,
             residual_bn_training: bool = False, out=None):
    """``(dz, dresidual, dweight, dbias, dbn_weight, dbn_bias, drbn_weight, drbn_bias)``:
    ``forward``'s gradients (``dz`` with respect to x without BN). ``y`` is forward's output
    when it had a residual (ReLU's backward is done here too; ``dresidual`` is empty
    otherwise). BN's backward runs in the same sweep (its per-channel sums of dx and dx * z),
    then its input gradient goes into dx in place; BN's gradients are empty without its
    parameters. With ``residual_bn`` (and the ``residual`` it was applied to) its backward
    too: ``dresidual`` is then its input gradient, and the last two its parameters'
    gradients (empty otherwise). The map gradients have ``dy``'s layout (NCHW or
    channels_last). ``out``: where the first map gradient goes (``dresidual`` when ``y`` is
    given, else ``dz``; then also returned there), of ``dy``'s shape, dtype and layout;
    ``dy`` itself is allowed (each element is read before the gradient is written there)."""
    grads = list(_ops().backward(dy, y, z, *_bn_args(bn), bn_training, chat, sigma, m, weight,
                                 bias, EPS, residual, *_bn_args(residual_bn),
                                 residual_bn_training, out))
    if out is not None:
        grads[0 if y is None else 1] = out
    return tuple(grads)


def tail(z, bn_weight, bn_bias, mean, var, zmean, weight, bias, residual, groups,
         bn_training, bn_eps, keep, rbn_weight, rbn_bias, rmean, rvar, rbn_training, rbn_eps):
    """``forward``'s ``y`` as one C++ autograd node, whose backward is ``backward``'s (the
    block tail of eager training: the arguments of ``sge.fused._fused_forward``, then the
    residual's own BN as ``FusedSpatialGroupEnhance`` passes them). Its backward writes the
    first map gradient over its incoming gradient when autograd alone holds that
    (``grad_reuse``)."""
    return _ops().tail(z, bn_weight, bn_bias, mean, var, zmean, weight, bias, residual, groups,
                       bn_training, bn_eps, keep, rbn_weight, rbn_bias, rmean, rvar,
                       rbn_training, rbn_eps, EPS)


_POLICIES = ("check", "always", "never")


def grad_reuse(policy=None, recalibrate: bool = False) -> tuple:
    """``(policy, calibration)`` as they were, and sets them: whether ``tail``'s backward
    writes over its incoming gradient: "check" (the default: when autograd alone holds it,
    by its reference counts against a calibration taken once per process on a fresh
    gradient, before the first tail bound for a backward), "always" or "never" (tests, A/B
    timing). ``calibration``: the fresh gradient's counts (tensor, storage), None before it
    is taken; ``recalibrate`` drops it (and sets "check")."""
    if policy is not None and policy not in _POLICIES:
        raise ValueError(f"grad_reuse: policy must be one of {_POLICIES}, got {policy!r}")
    code = 3 if recalibrate else -1 if policy is None else _POLICIES.index(policy)
    was, *counts = _ops().grad_reuse(code)
    return _POLICIES[was], None if counts[0] < 0 else tuple(counts)


def tail_backwards(record: bool) -> list[tuple[bool, bool]]:
    """For each ``tail`` backward since the last call, in their order: whether it wrote over
    its incoming gradient, and whether it did the residual BN's backward (recorded only while
    ``record`` was last given True; tests)."""
    return [(bool(e & 1), bool(e & 2)) for e in _ops().backward_log(record)]


def batch_stats(z: Tensor, running_mean=None, running_var=None, momentum: float = 0.0):
    """BatchNorm's batch statistics of ``z`` (NCHW or channels_last): per channel mean and
    biased variance, in ``z``'s dtype; the running ones, when given, are updated as BatchNorm2d
    does (``momentum``, the running variance unbiased). Third: each sample's channel means
    ((N, C)), which ``forward`` takes as ``zmean``."""
    return _ops().batch_stats(z, running_mean, running_var, momentum)
