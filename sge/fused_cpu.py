"""C++ CPU kernels for the fused SGE (``sge/fused_cpu.cpp``; ``sge/fused.py`` calls them).

Why: the PyTorch path of the fused op on CPU is a dozen ATen calls per chunk of samples,
several over per-position tensors only C/G times smaller than the feature map; it left the
fused SGE-ResNet50 at 1.05-1.08x ResNet50's CPU time. Like the Triton kernels on GPUs, one
task here handles one (sample, group) pair, its C/G x H*W tile staying in the core's cache
through all passes: the forward reads z and writes y once, the backward reads dy and z and
writes dx once, and also sums dx and dx * z per channel for BN's backward, whose input
gradient then goes into dx in place (one more sweep, no fresh tensor).

Built with ``torch.utils.cpp_extension`` on first use into ``.cache/torch_extensions``
(git-ignored; later imports load the cached library). float32 and float64 contiguous-able
tensors only; other dtypes, or a failed build (no compiler), use the PyTorch path, the
latter with a one-line notice.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor

from sge.layer import EPS

_SOURCE = Path(__file__).with_name("fused_cpu.cpp")
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
            # -fopenmp: at::parallel_for is OpenMP code inlined from ATen's headers.
            load_inline("sge_cpu", _SOURCE.read_text(), build_directory=str(build_dir),
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


def _vec(t, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t.reshape(-1).to(like.dtype).contiguous()


def forward(z: Tensor, scale, shift, weight: Tensor, bias: Tensor, groups: int, keep: bool):
    """``(y, chat, sigma, m)`` like ``sge.fused.sge_forward`` (contiguous NCHW ``y``; empty
    statistics without ``keep``); ``scale``/``shift`` per channel (BN folded in) or None."""
    z = z.contiguous()
    n, c, h, w = z.shape
    y = torch.empty_like(z)
    if keep:
        chat, sigma, m = (z.new_empty(s) for s in ((n, groups, h * w), (n, groups, 1),
                                                   (n, groups, c // groups)))
    else:
        chat, sigma, m = (z.new_empty(0) for _ in range(3))
    _ops().forward(z, _vec(scale, z), _vec(shift, z), _vec(weight, z), _vec(bias, z), y,
                   chat, sigma, m, groups, keep, EPS)
    return y, chat, sigma, m


def backward(dy: Tensor, z: Tensor, scale, shift, chat: Tensor, sigma: Tensor, m: Tensor,
             weight: Tensor, bias: Tensor):
    """``(dx, dweight, dbias, sums)``: the gradient with respect to SGE's input x (= BN(z)
    when ``scale`` is given), and then ``sums`` (2, C): per channel sum of dx and of dx * z
    (None without BN). BN's own backward is left to the caller (``bn_input_grad``)."""
    z, dy = z.contiguous(), dy.to(z.dtype).contiguous()
    n, c = z.shape[:2]
    groups = chat.shape[1]
    dx = torch.empty_like(dy)
    dw, db = (chat.new_empty((n, groups)) for _ in range(2))
    sums = z.new_empty((2, n, c)) if scale is not None else z.new_empty(0)
    _ops().backward(dy, z, _vec(scale, z), _vec(shift, z), chat, sigma, m, _vec(weight, z),
                    _vec(bias, z), dx, dw, db, sums, EPS)
    shape = (1, groups, 1, 1)
    return (dx, dw.sum(0).view(shape).to(weight.dtype), db.sum(0).view(shape).to(bias.dtype),
            sums.sum(1) if scale is not None else None)


def bn_input_grad(dx: Tensor, z: Tensor, a: Tensor, b, d) -> Tensor:
    """BN's input gradient ``a_c dx + b_c z + d_c`` (``a_c dx`` when b is None) into ``dx``
    (contiguous, from ``backward``)."""
    z = z.contiguous()
    _ops().bn_input_grad(dx, z, _vec(a, z), _vec(b, z), _vec(d, z))
    return dx


def batch_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    """BatchNorm's batch statistics of ``z`` (contiguous NCHW): per channel mean and biased
    variance, in ``z``'s dtype."""
    mean, var = z.new_empty(z.shape[1]), z.new_empty(z.shape[1])
    _ops().batch_stats(z, mean, var)
    return mean, var
