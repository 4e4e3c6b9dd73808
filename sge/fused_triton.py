"""Triton kernels for the fused SGE on CUDA GPUs (``sge/fused.py`` calls them).

Why: on a GPU the PyTorch path of the fused op launches about twenty small kernels per
block, several of them reductions over awkward shapes (thousands of 1 x C/G by C/G x H*W
products); an H100 ran SGE-ResNet50's train step at 3.2x ResNet50's that way (bf16,
channels_last, batch 128). Here one program handles one (sample, group) pair: it loads the
group's whole C/G x H*W tile once, keeps it in registers, computes every statistic in float32
and writes the output once; the backward reads dy and the conv output once and writes dx
once. Same formula, same saved statistics (chat, sigma, m) and the same derivation as the
module docstring of ``sge/fused.py``.

The tile has to fit in registers: up to ``MAX_TILE`` elements after padding to powers of
two, which covers ResNets at 224-256 px with G=64 (largest tile 4 x 56*56). Larger tiles,
float64, and machines without Triton take the PyTorch path (with a one-line notice).
``TRITON_INTERPRET=1`` runs the same kernels on CPU tensors (the CPU tests use it).
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from sge.layer import EPS

try:
    import triton
    import triton.language as tl
except Exception as err:  # missing, or a build that does not match this torch
    triton, _IMPORT_ERROR = None, err
else:
    _IMPORT_ERROR = None

MAX_TILE = 16384
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_noticed: set = set()


def _notice(key: str, message: str) -> None:
    if key not in _noticed:
        _noticed.add(key)
        warnings.warn(f"sge: {message}; the fused SGE uses its PyTorch path there (slower)",
                      stacklevel=3)


def _blocks(k: int, p: int) -> tuple[int, int]:
    return max(2, 1 << (k - 1).bit_length()), max(2, 1 << (p - 1).bit_length())


def applies(z: Tensor, groups: int) -> bool:
    """Whether the kernels handle ``z`` (a CUDA tensor, or any under TRITON_INTERPRET=1)."""
    if z.device.type != "cuda" and not _INTERPRET:
        return False
    if triton is None:
        _notice("import", f"Triton is unavailable ({_IMPORT_ERROR})")
        return False
    if z.dtype not in _DTYPES or z.numel() == 0:
        return False
    n, c, h, w = z.shape
    bk, bp = _blocks(c // groups, h * w)
    if bk * bp > MAX_TILE:
        _notice(f"tile{bk}x{bp}", f"a group's tile of {c // groups} x {h * w} (padded "
                f"{bk} x {bp}) is over the kernels' {MAX_TILE} elements")
        return False
    return True


def _strides(t: Tensor):
    """``(t, (sample, channel, position) strides)``: the kernels index position p = h*W + w
    with one stride, which holds for NCHW and NHWC tensors (others are copied first)."""
    n, c, h, w = t.shape
    if w == 1:
        return t, (t.stride(0), t.stride(1), t.stride(2))
    if h == 1 or t.stride(2) == w * t.stride(3):
        return t, (t.stride(0), t.stride(1), t.stride(3))
    return _strides(t.contiguous())


def _launch_args(z: Tensor, groups: int, elems_per_thread: int):
    """One program per (sample, group); enough warps that each thread holds about
    ``elems_per_thread`` elements of each tile-sized tensor (registers, not spills)."""
    n, c, h, w = z.shape
    bk, bp = _blocks(c // groups, h * w)
    warps = min(16, max(1, bk * bp // (32 * elems_per_thread)))
    return (n * groups,), dict(BLOCK_K=bk, BLOCK_P=bp, num_warps=1 << (warps.bit_length() - 1))


def forward(z: Tensor, scale, shift, weight: Tensor, bias: Tensor, groups: int):
    """``(y, chat, sigma, m)`` like ``sge.fused.sge_forward``; ``scale``/``shift`` float32
    per-channel (BN folded into an affine map) or None."""
    z, z_strides = _strides(z)
    n, c, h, w = z.shape
    k, p = c // groups, h * w
    y = torch.empty_like(z)
    assert y.stride() == z.stride()
    chat = z.new_empty((n, groups, p), dtype=torch.float32)
    sigma = z.new_empty((n, groups, 1), dtype=torch.float32)
    m = z.new_empty((n, groups, k), dtype=torch.float32)
    has_bn = scale is not None
    grid, meta = _launch_args(z, groups, 32)
    _forward_kernel[grid](
        z, y, chat, sigma, m, scale if has_bn else z, shift if has_bn else z,
        weight.reshape(-1).contiguous(), bias.reshape(-1).contiguous(),
        groups, k, p, *z_strides, EPS, float(max(p - 1, 1)), HAS_BN=has_bn, **meta)
    return y, chat, sigma, m


def backward(dy: Tensor, z: Tensor, scale, shift, chat: Tensor, sigma: Tensor, m: Tensor,
             weight: Tensor, bias: Tensor):
    """``(dx, dweight, dbias)``: the gradient with respect to SGE's input x (= BN(z) when
    ``scale`` is given; BN's own backward is left to the caller)."""
    z, z_strides = _strides(z)
    dy, dy_strides = _strides(dy)
    n, c, h, w = z.shape
    groups = chat.shape[1]
    k, p = c // groups, h * w
    dx = torch.empty_like(dy)
    assert dx.stride() == dy.stride()
    dw = chat.new_empty((n, groups))
    db = chat.new_empty((n, groups))
    has_bn = scale is not None
    grid, meta = _launch_args(z, groups, 16)  # two tiles live at once: x and dy
    _backward_kernel[grid](
        dy, z, dx, chat, sigma, m, scale if has_bn else z, shift if has_bn else z,
        weight.reshape(-1).contiguous(), bias.reshape(-1).contiguous(), dw, db,
        groups, k, p, *z_strides, *dy_strides, EPS, float(max(p - 1, 1)),
        HAS_BN=has_bn, **meta)
    shape = (1, groups, 1, 1)
    return (dx, dw.sum(0).view(shape).to(weight.dtype), db.sum(0).view(shape).to(bias.dtype))


if triton is not None:

    @triton.jit
    def _tile(g, K, P, s_c, s_p, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
        """Offsets (within a sample: int32) and mask of group g's (C/G x H*W) tile. A unit
        stride is specialised by Triton, so NCHW loads vectorise along positions and NHWC
        loads along channels."""
        kk = tl.arange(0, BLOCK_K)
        pp = tl.arange(0, BLOCK_P)
        offs = (g * K + kk)[:, None] * s_c + pp[None, :] * s_p
        mask = (kk < K)[:, None] & (pp < P)[None, :]
        return offs, mask

    @triton.jit
    def _load_x(z_ptr, scale_ptr, shift_ptr, offs, mask, g, K, BLOCK_K: tl.constexpr,
                HAS_BN: tl.constexpr):
        """The tile of SGE's input in float32, zero outside the mask."""
        x = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BN:
            kk = tl.arange(0, BLOCK_K)
            scale = tl.load(scale_ptr + g * K + kk, mask=kk < K, other=0.0)
            shift = tl.load(shift_ptr + g * K + kk, mask=kk < K, other=0.0)
            x = tl.where(mask, x * scale[:, None] + shift[:, None], 0.0)
        return x

    @triton.jit
    def _forward_kernel(z_ptr, y_ptr, chat_ptr, sigma_ptr, m_ptr, scale_ptr, shift_ptr,
                        w_ptr, b_ptr, G, K, P, s_n, s_c, s_p, eps, dof,
                        HAS_BN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
        row = tl.program_id(0)
        n, g = row // G, row % G
        offs, mask = _tile(g, K, P, s_c, s_p, BLOCK_K, BLOCK_P)
        sample = n.to(tl.int64) * s_n  # y has z's strides
        z_ptr += sample
        y_ptr += sample
        x = _load_x(z_ptr, scale_ptr, shift_ptr, offs, mask, g, K, BLOCK_K, HAS_BN)
        kk = tl.arange(0, BLOCK_K)
        pp = tl.arange(0, BLOCK_P)
        m = tl.sum(x, axis=1) / P                         # channel means g_k
        c = tl.sum(x * m[:, None], axis=0)                # c_p = <g, x_p>; 0 past P
        d = tl.where(pp < P, c - tl.sum(c, axis=0) / P, 0.0)
        sigma = tl.sqrt(tl.sum(d * d, axis=0) / dof)      # unbiased std
        chat = d / (sigma + eps)
        gate = tl.sigmoid(tl.load(w_ptr + g).to(tl.float32) * chat
                          + tl.load(b_ptr + g).to(tl.float32))
        tl.store(y_ptr + offs, (x * gate[None, :]).to(y_ptr.dtype.element_ty), mask=mask)
        base = row.to(tl.int64)
        tl.store(chat_ptr + base * P + pp, chat, mask=pp < P)
        tl.store(m_ptr + base * K + kk, m, mask=kk < K)
        tl.store(sigma_ptr + row, sigma)

    @triton.jit
    def _backward_kernel(dy_ptr, z_ptr, dx_ptr, chat_ptr, sigma_ptr, m_ptr, scale_ptr,
                         shift_ptr, w_ptr, b_ptr, dw_ptr, db_ptr, G, K, P,
                         s_n, s_c, s_p, d_n, d_c, d_p, eps, dof,
                         HAS_BN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
        row = tl.program_id(0)
        n, g = row // G, row % G
        offs, mask = _tile(g, K, P, s_c, s_p, BLOCK_K, BLOCK_P)
        doffs, _ = _tile(g, K, P, d_c, d_p, BLOCK_K, BLOCK_P)
        z_ptr += n.to(tl.int64) * s_n
        dy_ptr += n.to(tl.int64) * d_n  # dx has dy's strides
        dx_ptr += n.to(tl.int64) * d_n
        x = _load_x(z_ptr, scale_ptr, shift_ptr, offs, mask, g, K, BLOCK_K, HAS_BN)
        dy = tl.load(dy_ptr + doffs, mask=mask, other=0.0).to(tl.float32)
        kk = tl.arange(0, BLOCK_K)
        pp = tl.arange(0, BLOCK_P)
        base = row.to(tl.int64)
        chat = tl.load(chat_ptr + base * P + pp, mask=pp < P, other=0.0)
        m = tl.load(m_ptr + base * K + kk, mask=kk < K, other=0.0)
        sigma = tl.load(sigma_ptr + row)
        gamma = tl.load(w_ptr + g).to(tl.float32)
        s = tl.sigmoid(gamma * chat + tl.load(b_ptr + g).to(tl.float32))
        da = tl.where(pp < P, tl.sum(dy * x, axis=0) * s * (1.0 - s), 0.0)
        da_sum = tl.sum(da, axis=0)
        da_chat = tl.sum(da * chat, axis=0)
        tl.store(dw_ptr + row, da_chat)
        tl.store(db_ptr + row, da_sum)
        # sigma == 0 means chat == 0: the normalisation's term vanishes (no 0/0).
        coef = -(sigma + eps) * da_chat / (tl.where(sigma > 0, sigma, 1.0) * dof)
        dc = tl.where(pp < P, gamma / (sigma + eps) * (da - da_sum / P + chat * coef), 0.0)
        dm = tl.sum(x * dc[None, :], axis=1) / P
        dx = dy * s[None, :] + dm[:, None] + m[:, None] * dc[None, :]
        tl.store(dx_ptr + doffs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
