"""Triton kernels for the fused SGE on CUDA GPUs (``sge/fused.py`` calls them).

Why: on a GPU the PyTorch path of the fused op launches about twenty small kernels per
block, several of them reductions over awkward shapes (thousands of 1 x C/G by C/G x H*W
products); an H100 ran SGE-ResNet50's train step at 3.2x ResNet50's that way (bf16,
channels_last, batch 128). Here one program handles one (sample, group) pair: it loads the
group's whole C/G x H*W tile of the conv output z once, applies the block's last BN to it
in registers, computes every statistic in float32 and writes the output once. Nothing but z
(which BN keeps anyway) is saved: the backward recomputes the statistics from its tile,
reads dy once, writes dx once and BN's per-sample channel sums, and two small kernels finish
BN's backward. Same formula and derivation as the module docstring of ``sge/fused.py``.

Channels_last maps with narrow groups (under 32 bytes of a group per position: ResNet-50's
first two stages) take chunked kernels instead (``_narrow_block``): a program takes several
whole groups of a sample, so its loads are whole sectors, and sweeps the positions in
chunks, merging the statistics; it reads z three times in the forward instead of once,
and was still 1.8-2x faster than the tile kernels at the first stage on an H100. Their
forward keeps each sample's per-channel and per-group statistics (C/G * H*W times smaller
than the map), so that their backward reads z twice instead of four times (not yet timed on
a GPU: the tests and an sm_90 compile ran in CI).

The tile has to fit in registers: up to ``MAX_TILE`` elements after padding to powers of
two, which covers ResNets at 224-256 px with G=64 (largest tile 4 x 56*56). Larger tiles,
float64, and machines without Triton take the PyTorch path (with a one-line notice).
``TRITON_INTERPRET=1`` runs the same kernels on CPU tensors (the CPU tests use it).
"""
from __future__ import annotations

import importlib
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


def _build_errors() -> tuple:
    """Triton's errors for a kernel it cannot build for this GPU: its compiler's, ptxas's,
    and too little shared memory or registers."""
    found = []
    for module, names in (("triton.compiler.errors", ("CompilationError",)),
                          ("triton.runtime.errors", ("OutOfResources", "PTXASError"))):
        try:
            errors = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(errors, name) for name in names if hasattr(errors, name)]
    return tuple(found)


_BUILD_ERRORS = _build_errors() if triton is not None else ()
_unbuildable: set = set()


def _launch(name: str, grid, *args, **meta) -> bool:
    """Run the kernel ``name`` on ``grid``; False where Triton cannot build it here (a GPU
    architecture or data type it does not support, no ptxas, too little shared memory), with
    a one-line notice: the caller then takes the PyTorch path. A variant that failed is not
    tried again. Errors while a kernel runs propagate. (Host time counts here: the variant's
    key is only made once something failed.)"""
    if _unbuildable and _variant(name, args, meta) in _unbuildable:
        return False
    try:
        globals()[name][grid](*args, **meta)
    except _BUILD_ERRORS as err:
        _unbuildable.add(_variant(name, args, meta))
        first = (str(err).strip().splitlines() or [""])[-1][:200]
        _notice(f"build {name}", f"Triton could not build {name} for this GPU "
                f"({type(err).__name__}: {first})")
        return False
    return True


def _variant(name: str, args, meta) -> tuple:
    """What Triton compiles a kernel per: its constants and its tensors' dtypes."""
    return (name, tuple(sorted(meta.items())),
            tuple(a.dtype for a in args if isinstance(a, Tensor)))


def _pow2(x: int) -> int:
    """The least power of two >= x, at least 2 (Triton's block sizes)."""
    return max(2, 1 << (x - 1).bit_length())


def _blocks(k: int, p: int) -> tuple[int, int]:
    return _pow2(k), _pow2(p)


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


def _dense(t: Tensor, like: Tensor | None = None) -> Tensor:
    """``t`` in NCHW or NHWC order (``like``'s, when given), copied only if it is not."""
    if like is not None:
        if like.is_contiguous():
            return t.contiguous()
        return t.contiguous(memory_format=torch.channels_last)
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _strides(t: Tensor) -> tuple[int, int, int]:
    """(sample, channel, position) strides of a dense NCHW or NHWC ``t``: the kernels index
    position p = h*W + w with one stride (a size-1 dimension's own stride is arbitrary)."""
    n, c, h, w = t.shape
    return t.stride(0), t.stride(1), t.stride(3) if w > 1 else t.stride(2)


def _bn_args(bn, like: Tensor):
    """The BN before SGE as kernel arguments: ``(mean, var, weight, bias)`` (``like`` as a
    placeholder where absent), eps, whether there is one, whether it is affine."""
    if bn is None:
        return (like,) * 4, 0.0, False, False
    mean, var, weight, bias, eps = bn
    if weight is None:
        return (mean, var, mean, mean), eps, True, False
    return (mean, var, weight, bias), eps, True, True


def _launch_args(z: Tensor, groups: int, elems_per_warp: int):
    """One program per (sample, group), with a warp per ``elems_per_warp`` elements of the
    padded tile, 2 to 8 warps. From a sweep of 2-32 warps on an H100 (bf16, batch 128,
    ResNet-50's four stages; docs/benchmarks.md): 2048 per warp is the best or close to it
    in most places, the NHWC backward wants 1024, and more than 8 warps only lost (the
    first stage's NHWC backward: 2.40 ms with 8, 4.04 ms with 16)."""
    n, c, h, w = z.shape
    bk, bp = _blocks(c // groups, h * w)
    warps = min(8, max(2, bk * bp // elems_per_warp))
    return (n * groups,), dict(BLOCK_K=bk, BLOCK_P=bp, num_warps=1 << (warps.bit_length() - 1))


# Narrow groups in channels_last maps: where a group's channels span fewer bytes per
# position than this (ResNet-50's first two stages at G=64: 4 or 8 bf16 channels), a
# program reading one group's tile reads a fraction of each 32-byte sector, and the tile
# (4 x 3136 positions at 224 px) strains registers. The chunked kernels take whole
# groups, NARROW_CHANNELS channels of a sample, so many positions at a time. On an H100
# (bf16, batch 128, 256 x 56 x 56): forward 0.466 ms with 64 channels x 64 positions
# (0.860 for the tile kernel), backward 1.103 ms with 64 x 128 (2.161); 32 channels or 32
# positions were slower, and at 512 x 28 x 28 these choices were the best or within 0.01 ms.
NARROW_BYTES = 32
NARROW_CHANNELS = 64
NARROW_FORWARD_POSITIONS = 64
NARROW_BACKWARD_POSITIONS = 128


def _narrow_block(z: Tensor, groups: int) -> int:
    """Channels per program of the chunked kernels for the dense map ``z``, or 0 where the
    tile kernels run (NCHW maps, wide groups, group sizes that are not powers of two)."""
    n, c, h, w = z.shape
    k = c // groups
    if z.is_contiguous() or h * w < 2 or k & (k - 1) or k * z.element_size() >= NARROW_BYTES:
        return 0
    block = NARROW_CHANNELS
    while block > k and c % block:
        block //= 2
    return block if block >= k and c % block == 0 else 0


def keeps_statistics(z: Tensor, groups: int) -> bool:
    """Whether ``forward(..., keep=True)`` keeps statistics for the backward: the chunked
    kernels do (their backward would sweep z twice more to recompute them), the tile
    kernels do not (the tile is in registers anyway)."""
    return bool(_narrow_block(_dense(z), groups))


def forward(z: Tensor, bn, weight: Tensor, bias: Tensor, groups: int,
            residual: Tensor | None = None, keep: bool = False):
    """SGE's output for its input ``x = BN(z)`` with ``bn = (mean, var, bn_weight, bn_bias,
    eps)`` (bn_weight/bn_bias may be None), or ``x = z`` with ``bn`` None; with a
    ``residual``, the block's tail ``relu(SGE(x) + residual)`` in the same write (ResNet's
    add and ReLU are two more passes over the map). BN is applied in the kernel, so ``x``
    is never stored, nor is chat, a float32 (N, G, H*W) per block (half a bfloat16 feature
    map at C/G = 4): the tile kernels' backward recomputes every statistic from its tile.

    Returns ``(y, kept)``, or None where the kernel cannot be built here (``_launch``).
    ``kept``: with ``keep`` (a backward will run) and the chunked kernels
    (``keeps_statistics``), each sample's channel means of z - mean, (N, C), and its groups'
    mean and std of c, (N, G, 2), in float32, C/G * H*W times smaller than the map, which
    spare the chunked backward two of its four sweeps over z; else None.
    """
    z = _dense(z)
    n, c, h, w = z.shape
    y = torch.empty_like(z)
    assert y.stride() == z.stride()
    res = z if residual is None else _dense(residual, like=z)
    bn_ptrs, bn_eps, has_bn, affine = _bn_args(bn, z)
    block, k = _narrow_block(z, groups), c // groups
    kept = None
    if block:
        if keep:
            kept = (torch.empty((n, c), dtype=torch.float32, device=z.device),
                    torch.empty((n, groups, 2), dtype=torch.float32, device=z.device))
        built = _launch(
            "_narrow_forward_kernel", (n * (c // block),), z, res, y, *bn_ptrs, weight, bias,
            *(kept or (y, y)), c, h * w, *_strides(z), bn_eps, EPS, float(max(h * w - 1, 1)),
            HAS_BN=has_bn, AFFINE=affine, HAS_RES=residual is not None, KEEP=keep,
            BLOCK_K=k, GB=block // k, BLOCK_Q=NARROW_FORWARD_POSITIONS, num_warps=4)
    else:
        grid, meta = _launch_args(z, groups, 2048)
        built = _launch(
            "_forward_kernel", grid, z, res, y, *bn_ptrs, weight, bias, groups, c // groups,
            h * w, *_strides(z), bn_eps, EPS, float(max(h * w - 1, 1)), HAS_BN=has_bn,
            AFFINE=affine, HAS_RES=residual is not None, **meta)
    return (y, kept) if built else None


def backward(dy: Tensor, z: Tensor, bn, bn_training: bool, weight: Tensor, bias: Tensor,
             groups: int, kept=None):
    """``(dz, dweight, dbias, dbn_weight, dbn_bias)``: the gradients of SGE(BN(z)) (``bn`` as
    ``forward``'s; with batch statistics when ``bn_training``), the BN ones None without an
    affine BN; ``dz`` is the gradient with respect to x when ``bn`` is None.

    Three kernels: SGE's backward writes dx = dL/dx and, per sample, BN's channel sums of
    dx and dx * (z - mean) and SGE's parameter gradients; a small one adds those over
    samples, into every parameter gradient and BN's coefficients; an elementwise one makes
    dz from dx in place. ATen's BN backward would read dx and z twice more and allocate dz.

    ReLU's backward (with a residual) stays outside, in ATen: done here it made the tile
    kernel 2x slower at ResNet-50's first two stages (an H100, bf16, batch 128: 4.55 against
    2.28 ms at 256 x 56 x 56 NHWC), one more tile live in registers.

    ``kept``: the forward's (``forward``), used where the chunked backward runs and their
    shapes fit (else the statistics are recomputed). None where a kernel cannot be built
    here (``_launch``).
    """
    dy = _dense(dy)
    if z.stride() != dy.stride():
        z = _dense(z, like=dy)
    n, c, h, w = z.shape
    k, p = c // groups, h * w
    dx = torch.empty_like(dy)
    assert dx.stride() == dy.stride()
    bn_ptrs, bn_eps, has_bn, affine = _bn_args(bn, z)
    # One float32 allocation for the kernels' small outputs, instead of three (each costs
    # host time: 8 us per torch.empty on the lent H200 machine): rows (a, b, mean, d) of
    # BN's coefficients per channel, BN's per-sample channel sums, SGE's per-sample
    # parameter gradients. Slices, since Tensor.split's Python wrapper costs more than that.
    c4, nc2 = (4 * c, 2 * n * c) if has_bn else (0, 0)
    work = torch.empty(c4 + nc2 + 2 * n * groups, dtype=torch.float32, device=dy.device)
    coef, sums, dparams = work[:c4], work[c4:c4 + nc2], work[c4 + nc2:].view(2, n, groups)
    block = _narrow_block(z, groups)
    if block:
        saved = kept is not None and kept[0].shape == (n, c) and kept[1].shape == (n, groups, 2)
        built = _launch(
            "_narrow_backward_kernel", (n * (c // block),), dy, z, dx, *bn_ptrs, weight, bias,
            *(kept if saved else (dparams, dparams)), dparams, sums, n, c, p, *_strides(z),
            bn_eps, EPS, float(max(p - 1, 1)), HAS_BN=has_bn, AFFINE=affine, SAVED=saved,
            BLOCK_K=k, GB=block // k, BLOCK_Q=NARROW_BACKWARD_POSITIONS, num_warps=4)
    else:
        grid, meta = _launch_args(z, groups, 2048 if dy.is_contiguous() else 1024)
        built = _launch(
            "_backward_kernel", grid, dy, z, dx, *bn_ptrs, weight, bias, dparams, sums, groups,
            k, p, *_strides(z), bn_eps, EPS, float(max(p - 1, 1)), HAS_BN=has_bn,
            AFFINE=affine, **meta)
    dweight, dbias = torch.empty_like(weight), torch.empty_like(bias)
    dbn = (torch.empty_like(bn[2]), torch.empty_like(bn[3])) if affine else (coef, coef)
    width = max(c if has_bn else 0, groups)
    block_c = min(128, _pow2(width))
    built = built and _launch(
        "_finish_kernel", (-(-width // block_c),), dparams, dweight, dbias, sums,
        *bn_ptrs[:3], coef, *dbn, n, groups, c, float(n * p), bn_eps, HAS_BN=has_bn,
        TRAINING=bn_training, AFFINE=affine, BLOCK_N=min(32, _pow2(n)), BLOCK_C=block_c)
    if has_bn and built:
        elems = 1024  # per program
        built = _launch(
            "_bn_input_grad_kernel", (-(-dx.numel() // elems),), dx, z, coef,
            dx.numel(), c, p if dx.is_contiguous() else 1, WIDE=dx.numel() + elems >= 2**31,
            BLOCK=elems, num_warps=4)
    if not built:
        return None
    if not affine:
        return dx, dweight, dbias, None, None
    return dx, dweight, dbias, *dbn


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
    def _bn_channels(ch, ok, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, bn_eps,
                     HAS_BN: tl.constexpr, AFFINE: tl.constexpr):
        """BN's ``(mean, scale, beta)`` for channels ``ch`` (where ``ok``), in float32:
        x = BN(z) = (z - mean) * scale + beta; (0, 1, 0) without BN. Same rounding as
        ``sge.fused._affine``'s invstd: a correctly rounded square root, then a division."""
        zero = tl.zeros_like(ch).to(tl.float32)
        mean, scale, beta = zero, zero + 1.0, zero
        if HAS_BN:
            mean = tl.load(mean_ptr + ch, mask=ok, other=0.0).to(tl.float32)
            var = tl.load(var_ptr + ch, mask=ok, other=1.0).to(tl.float32)
            scale = 1.0 / tl.sqrt_rn(var + bn_eps)
            if AFFINE:
                scale = scale * tl.load(bnw_ptr + ch, mask=ok, other=0.0).to(tl.float32)
                beta = tl.load(bnb_ptr + ch, mask=ok, other=0.0).to(tl.float32)
        return mean, scale, beta

    @triton.jit
    def _load_z(z_ptr, offs, mask, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, g, K, bn_eps,
                BLOCK_K: tl.constexpr, HAS_BN: tl.constexpr, AFFINE: tl.constexpr):
        """``(zc, scale, beta)``: the tile of zc = z - mean in float32, zero outside the
        mask, and BN's per-channel scale and shift, so that SGE's input is
        x = BN(z) = zc * scale + beta. x itself is never held as a tile: every use of it is
        a reduction or the output."""
        kk = tl.arange(0, BLOCK_K)
        mean, scale, beta = _bn_channels(g * K + kk, kk < K, mean_ptr, var_ptr, bnw_ptr,
                                         bnb_ptr, bn_eps, HAS_BN, AFFINE)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return tl.where(mask, z - mean[:, None], 0.0), scale, beta

    @triton.jit
    def _statistics(zc, scale, beta, P, eps, dof, BLOCK_P: tl.constexpr):
        """``(m, chat, sigma)`` of the tile x = zc * scale + beta (zc zero outside its
        mask): the channel means g_k, the normalised per-position c_p = <g, x_p> and its
        unbiased std, in float32. c_p is taken as <g * scale, zc_p>: the two differ by a
        constant, which the centring removes."""
        pp = tl.arange(0, BLOCK_P)
        m = tl.sum(zc, axis=1) / P * scale + beta         # channel means g_k
        c = tl.sum(zc * (m * scale)[:, None], axis=0)    # 0 past P
        d = tl.where(pp < P, c - tl.sum(c, axis=0) / P, 0.0)
        sigma = tl.sqrt(tl.sum(d * d, axis=0) / dof)      # unbiased std
        return m, d / (sigma + eps), sigma

    @triton.jit
    def _forward_kernel(z_ptr, res_ptr, y_ptr, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, w_ptr,
                        b_ptr, G, K, P, s_n, s_c, s_p, bn_eps, eps, dof, HAS_BN: tl.constexpr,
                        AFFINE: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_P: tl.constexpr):
        row = tl.program_id(0)
        n, g = row // G, row % G
        offs, mask = _tile(g, K, P, s_c, s_p, BLOCK_K, BLOCK_P)
        sample = n.to(tl.int64) * s_n  # y and the residual have z's strides
        zc, scale, beta = _load_z(z_ptr + sample, offs, mask, mean_ptr, var_ptr, bnw_ptr,
                                  bnb_ptr, g, K, bn_eps, BLOCK_K, HAS_BN, AFFINE)
        _, chat, _ = _statistics(zc, scale, beta, P, eps, dof, BLOCK_P)
        gate = tl.sigmoid(tl.load(w_ptr + g).to(tl.float32) * chat
                          + tl.load(b_ptr + g).to(tl.float32))
        y = (zc * scale[:, None] + beta[:, None]) * gate[None, :]
        if HAS_RES:  # the block's tail: relu(SGE(x) + residual), rounded once
            y = y + tl.load(res_ptr + sample + offs, mask=mask, other=0.0).to(tl.float32)
            y = tl.maximum(y, 0.0)
        tl.store(y_ptr + sample + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(dy_ptr, z_ptr, dx_ptr, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, w_ptr,
                         b_ptr, dparams_ptr, sums_ptr, G, K, P, s_n, s_c, s_p, bn_eps, eps,
                         dof, HAS_BN: tl.constexpr, AFFINE: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
        row = tl.program_id(0)
        n, g = row // G, row % G
        offs, mask = _tile(g, K, P, s_c, s_p, BLOCK_K, BLOCK_P)
        sample = n.to(tl.int64) * s_n  # z, dy and dx share strides
        zc, scale, beta = _load_z(z_ptr + sample, offs, mask, mean_ptr, var_ptr, bnw_ptr,
                                  bnb_ptr, g, K, bn_eps, BLOCK_K, HAS_BN, AFFINE)
        m, chat, sigma = _statistics(zc, scale, beta, P, eps, dof, BLOCK_P)
        dy = tl.load(dy_ptr + sample + offs, mask=mask, other=0.0).to(tl.float32)
        kk = tl.arange(0, BLOCK_K)
        pp = tl.arange(0, BLOCK_P)
        gamma = tl.load(w_ptr + g).to(tl.float32)
        s = tl.sigmoid(gamma * chat + tl.load(b_ptr + g).to(tl.float32))
        ds = tl.sum(dy * (zc * scale[:, None] + beta[:, None]), axis=0)  # sum_k dy x
        da = tl.where(pp < P, ds * s * (1.0 - s), 0.0)
        da_sum = tl.sum(da, axis=0)
        da_chat = tl.sum(da * chat, axis=0)
        num_rows = tl.num_programs(0)
        tl.store(dparams_ptr + row, da_chat)
        tl.store(dparams_ptr + num_rows + row, da_sum)
        # sigma == 0 means chat == 0: the normalisation's term vanishes (no 0/0).
        coef = -(sigma + eps) * da_chat / (tl.where(sigma > 0, sigma, 1.0) * dof)
        dc = tl.where(pp < P, gamma / (sigma + eps) * (da - da_sum / P + chat * coef), 0.0)
        # sum_p x_kp dc_p = scale_k * sum_p zc_kp dc_p, since sum_p dc_p = 0.
        dm = tl.sum(zc * dc[None, :], axis=1) * scale / P
        dx = dy * s[None, :] + dm[:, None] + m[:, None] * dc[None, :]
        tl.store(dx_ptr + sample + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_BN:  # BN's per-sample channel sums, from dx before rounding
            dx = tl.where(mask, dx, 0.0)
            ch = n.to(tl.int64) * G * K + g * K + kk
            tl.store(sums_ptr + ch, tl.sum(dx, axis=1), mask=kk < K)
            tl.store(sums_ptr + num_rows * K + ch, tl.sum(dx * zc, axis=1), mask=kk < K)

    @triton.jit
    def _finish_kernel(dparams_ptr, dw_ptr, db_ptr, sums_ptr, mean_ptr, var_ptr, bnw_ptr,
                       coef_ptr, dbnw_ptr, dbnb_ptr, N, G, C, count, bn_eps,
                       HAS_BN: tl.constexpr, TRAINING: tl.constexpr, AFFINE: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """The backward's sums over samples. SGE's parameter gradients, group j by program
        j // BLOCK_C: dgamma = sum da * chat, dbeta = sum da, from ``dparams`` (2, N, G).
        With BN, channel j by the same program, from the per-sample sums S1 = sum dx,
        S2 = sum dx * (z - mean): dz = a * dx + b * (z - mean) + d, stored as rows
        (a, b, mean, d). With batch statistics a = scale, b = -scale * S2 * invstd^2 / count,
        d = -scale * S1 / count; with running ones dz = scale * dx. dgamma = S2 * invstd,
        dbeta = S1. Each output is written in its own dtype."""
        cc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok_g = cc < G
        dw = tl.zeros((BLOCK_C,), tl.float32)
        db = tl.zeros((BLOCK_C,), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            offs = nn[:, None] * G + cc[None, :]
            both = (nn < N)[:, None] & ok_g[None, :]
            dw += tl.sum(tl.load(dparams_ptr + offs, mask=both, other=0.0), axis=0)
            db += tl.sum(tl.load(dparams_ptr + N * G + offs, mask=both, other=0.0), axis=0)
        tl.store(dw_ptr + cc, dw.to(dw_ptr.dtype.element_ty), mask=ok_g)
        tl.store(db_ptr + cc, db.to(db_ptr.dtype.element_ty), mask=ok_g)
        if HAS_BN:
            ok = cc < C
            s1 = tl.zeros((BLOCK_C,), tl.float32)
            s2 = tl.zeros((BLOCK_C,), tl.float32)
            for n0 in range(0, N, BLOCK_N):
                nn = n0 + tl.arange(0, BLOCK_N)
                offs = nn.to(tl.int64)[:, None] * C + cc[None, :]
                both = (nn < N)[:, None] & ok[None, :]
                s1 += tl.sum(tl.load(sums_ptr + offs, mask=both, other=0.0), axis=0)
                s2 += tl.sum(tl.load(sums_ptr + N * C + offs, mask=both, other=0.0), axis=0)
            mean = tl.load(mean_ptr + cc, mask=ok, other=0.0).to(tl.float32)
            invstd = 1.0 / tl.sqrt_rn(tl.load(var_ptr + cc, mask=ok, other=1.0).to(tl.float32)
                                      + bn_eps)
            scale = invstd
            if AFFINE:
                scale = invstd * tl.load(bnw_ptr + cc, mask=ok, other=0.0).to(tl.float32)
                tl.store(dbnw_ptr + cc, (s2 * invstd).to(dbnw_ptr.dtype.element_ty), mask=ok)
                tl.store(dbnb_ptr + cc, s1.to(dbnb_ptr.dtype.element_ty), mask=ok)
            if TRAINING:
                b = -scale * s2 * invstd * invstd / count
                d = -scale * s1 / count
            else:
                b = tl.zeros_like(scale)
                d = tl.zeros_like(scale)
            tl.store(coef_ptr + cc, scale, mask=ok)
            tl.store(coef_ptr + C + cc, b, mask=ok)
            tl.store(coef_ptr + 2 * C + cc, mean, mask=ok)
            tl.store(coef_ptr + 3 * C + cc, d, mask=ok)

    # Narrow groups in channels_last maps (``_narrow_block``): a program takes GB whole
    # groups (GB * K adjacent channels) of one sample and sweeps its positions in chunks of
    # BLOCK_Q, so loads are whole sectors and no tile has to fit in registers. The sample's
    # statistics take two sweeps; the forward writes in a third, the backward takes two more.

    @triton.jit
    def _chunk(z_ptr, cc, q0, C, P, s_c, s_p, mean, BLOCK_Q: tl.constexpr):
        """``(zc, offs, mask, on)``: zc = z - mean in float32 over channels ``cc`` and the
        positions q0 .. q0 + BLOCK_Q (zero outside the map), their offsets and mask, and
        which positions are in the map."""
        pp = q0 + tl.arange(0, BLOCK_Q)
        on = pp < P
        offs = cc[:, None] * s_c + pp[None, :] * s_p
        mask = (cc < C)[:, None] & on[None, :]
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return tl.where(mask, z - mean[:, None], 0.0), offs, mask, on

    @triton.jit
    def _by_group(t, GB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr):
        """Each group's sum over its channels: (GB * BLOCK_K, BLOCK_Q) -> (GB, BLOCK_Q)."""
        return tl.sum(tl.reshape(t, (GB, BLOCK_K, BLOCK_Q)), axis=1)

    @triton.jit
    def _per_channel(t, GB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr):
        """Each group's row for each of its channels: (GB, BLOCK_Q) -> (GB * BLOCK_K,
        BLOCK_Q)."""
        return tl.reshape(tl.broadcast_to(t[:, None, :], (GB, BLOCK_K, BLOCK_Q)),
                          (GB * BLOCK_K, BLOCK_Q))

    @triton.jit
    def _per_channel_1d(v, GB: tl.constexpr, BLOCK_K: tl.constexpr):
        return tl.reshape(tl.broadcast_to(v[:, None], (GB, BLOCK_K)), (GB * BLOCK_K,))

    @triton.jit
    def _narrow_statistics(z_ptr, cc, C, P, s_c, s_p, mean, scale, beta, dof,
                           GB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr):
        """``(m, zbar, w, cmean, sigma)`` of one sample's groups, in two sweeps: the channel
        means m of x and zbar of zc, w = m * scale, and per group the mean and unbiased std
        of c_p = <w, zc_p> (the tile kernels' c), merged over chunks as Chan et al. do, so
        that no large sum of squares is subtracted."""
        zsum = tl.zeros((GB * BLOCK_K,), tl.float32)
        for q0 in range(0, P, BLOCK_Q):
            zc, offs, mask, on = _chunk(z_ptr, cc, q0, C, P, s_c, s_p, mean, BLOCK_Q)
            zsum += tl.sum(zc, axis=1)
        zbar = zsum / P
        m = zbar * scale + beta
        w = m * scale
        cmean = tl.zeros((GB,), tl.float32)
        m2 = tl.zeros((GB,), tl.float32)
        for q0 in range(0, P, BLOCK_Q):
            zc, offs, mask, on = _chunk(z_ptr, cc, q0, C, P, s_c, s_p, mean, BLOCK_Q)
            c = _by_group(zc * w[:, None], GB, BLOCK_K, BLOCK_Q)
            seen = q0 * 1.0                    # positions merged so far (whole chunks)
            count = tl.minimum(P - q0, BLOCK_Q) * 1.0
            mu = tl.sum(c, axis=1) / count      # c is 0 past P
            d = tl.where(on[None, :], c - mu[:, None], 0.0)
            delta = mu - cmean
            cmean += delta * (count / (seen + count))
            m2 += tl.sum(d * d, axis=1) + delta * delta * (seen * count / (seen + count))
        return m, zbar, w, cmean, tl.sqrt(m2 / dof)

    @triton.jit
    def _narrow_gate(zc, w, cmean, sigma, gamma, gbeta, on, eps, GB: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr):
        """``(chat, s)`` of a chunk, (GB, BLOCK_Q) each; chat is 0 past the map."""
        c = _by_group(zc * w[:, None], GB, BLOCK_K, BLOCK_Q)
        chat = tl.where(on[None, :], (c - cmean[:, None]) / (sigma[:, None] + eps), 0.0)
        return chat, tl.sigmoid(gamma[:, None] * chat + gbeta[:, None])

    @triton.jit
    def _kept_offsets(n, cc, gg, C, BLOCK_K: tl.constexpr):
        """Offsets of sample n's kept statistics: its channels cc in zbar (N, C) and, in
        (N, G, 2), the rows of its groups gg (mean of c, then std). No mask: C is a multiple
        of a program's channels (``_narrow_block``)."""
        channels = n.to(tl.int64) * C + cc
        return channels, (n.to(tl.int64) * (C // BLOCK_K) + gg) * 2

    @triton.jit
    def _narrow_program(z_ptr, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, w_ptr, b_ptr, zbar_ptr,
                        cs_ptr, C, P, s_n, s_c, s_p, bn_eps, dof, HAS_BN: tl.constexpr,
                        AFFINE: tl.constexpr, SAVED: tl.constexpr, BLOCK_K: tl.constexpr,
                        GB: tl.constexpr, BLOCK_Q: tl.constexpr):
        """This program's sample n, its offset, channels cc and groups gg; BN's per-channel
        (mean, scale, beta); ``_narrow_statistics``, or with SAVED the forward's (zbar per
        channel, c's mean and std per group, kept by ``_narrow_forward_kernel``); SGE's
        gamma and beta per group."""
        blocks = C // (GB * BLOCK_K)
        n = tl.program_id(0) // blocks
        c0 = tl.program_id(0) % blocks * (GB * BLOCK_K)
        sample = n.to(tl.int64) * s_n
        cc = c0 + tl.arange(0, GB * BLOCK_K)
        gg = c0 // BLOCK_K + tl.arange(0, GB)
        mean, scale, beta = _bn_channels(cc, cc < C, mean_ptr, var_ptr, bnw_ptr, bnb_ptr,
                                         bn_eps, HAS_BN, AFFINE)
        if SAVED:
            channels, rows = _kept_offsets(n, cc, gg, C, BLOCK_K)
            zbar = tl.load(zbar_ptr + channels)
            cmean = tl.load(cs_ptr + rows)
            sigma = tl.load(cs_ptr + rows + 1)
            m = zbar * scale + beta
            w = m * scale
        else:
            m, zbar, w, cmean, sigma = _narrow_statistics(z_ptr + sample, cc, C, P, s_c, s_p,
                                                          mean, scale, beta, dof, GB, BLOCK_K,
                                                          BLOCK_Q)
        gamma = tl.load(w_ptr + gg).to(tl.float32)
        gbeta = tl.load(b_ptr + gg).to(tl.float32)
        return n, sample, cc, gg, mean, scale, beta, m, zbar, w, cmean, sigma, gamma, gbeta

    @triton.jit
    def _narrow_da(z_ptr, dy_ptr, cc, q0, C, P, s_c, s_p, mean, scale, beta, w, cmean, sigma,
                   gamma, gbeta, eps, GB: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_Q: tl.constexpr):
        """A chunk's ``(zc, dy, offs, mask, on, chat, s, da)`` in the backward:
        da = (sum_k dy x) * s * (1 - s) per group and position, 0 past the map (dy is)."""
        zc, offs, mask, on = _chunk(z_ptr, cc, q0, C, P, s_c, s_p, mean, BLOCK_Q)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        chat, s = _narrow_gate(zc, w, cmean, sigma, gamma, gbeta, on, eps, GB, BLOCK_K,
                               BLOCK_Q)
        ds = _by_group(dy * (zc * scale[:, None] + beta[:, None]), GB, BLOCK_K, BLOCK_Q)
        return zc, dy, offs, mask, on, chat, s, ds * s * (1.0 - s)

    @triton.jit
    def _narrow_forward_kernel(z_ptr, res_ptr, y_ptr, mean_ptr, var_ptr, bnw_ptr, bnb_ptr,
                               w_ptr, b_ptr, zbar_ptr, cs_ptr, C, P, s_n, s_c, s_p, bn_eps,
                               eps, dof, HAS_BN: tl.constexpr, AFFINE: tl.constexpr,
                               HAS_RES: tl.constexpr, KEEP: tl.constexpr,
                               BLOCK_K: tl.constexpr, GB: tl.constexpr,
                               BLOCK_Q: tl.constexpr):
        """With KEEP, also stores each sample's channel means of z - mean (zbar, (N, C)) and
        its groups' mean and std of c ((N, G, 2)), for the backward (SAVED)."""
        n, sample, cc, gg, mean, scale, beta, m, zbar, w, cmean, sigma, gamma, gbeta = (
            _narrow_program(z_ptr, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, w_ptr, b_ptr, zbar_ptr,
                            cs_ptr, C, P, s_n, s_c, s_p, bn_eps, dof, HAS_BN, AFFINE, False,
                            BLOCK_K, GB, BLOCK_Q))
        if KEEP:
            channels, rows = _kept_offsets(n, cc, gg, C, BLOCK_K)
            tl.store(zbar_ptr + channels, zbar)
            tl.store(cs_ptr + rows, cmean)
            tl.store(cs_ptr + rows + 1, sigma)
        for q0 in range(0, P, BLOCK_Q):  # y and the residual have z's strides
            zc, offs, mask, on = _chunk(z_ptr + sample, cc, q0, C, P, s_c, s_p, mean, BLOCK_Q)
            chat, gate = _narrow_gate(zc, w, cmean, sigma, gamma, gbeta, on, eps, GB, BLOCK_K,
                                      BLOCK_Q)
            y = (zc * scale[:, None] + beta[:, None]) * _per_channel(gate, GB, BLOCK_K,
                                                                      BLOCK_Q)
            if HAS_RES:
                y = y + tl.load(res_ptr + sample + offs, mask=mask, other=0.0).to(tl.float32)
                y = tl.maximum(y, 0.0)
            tl.store(y_ptr + sample + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _narrow_backward_kernel(dy_ptr, z_ptr, dx_ptr, mean_ptr, var_ptr, bnw_ptr, bnb_ptr,
                                w_ptr, b_ptr, zbar_ptr, cs_ptr, dparams_ptr, sums_ptr, N, C, P,
                                s_n, s_c, s_p, bn_eps, eps, dof, HAS_BN: tl.constexpr,
                                AFFINE: tl.constexpr, SAVED: tl.constexpr,
                                BLOCK_K: tl.constexpr, GB: tl.constexpr,
                                BLOCK_Q: tl.constexpr):
        """``_backward_kernel``'s outputs, same layouts. The sweep after the statistics sums
        da and da * chat per group, and per channel the products of zd = zc - zbar with da
        and with chat: since sum_p dc_p = 0, sum_p zc_kp dc_p = sum_p zd_kp dc_p, which is
        gamma / (sigma + eps) * (sum zd da + coef * sum zd chat). The last sweep writes dx
        and BN's channel sums. With SAVED the statistics come from the forward (two sweeps
        over z fewer: two instead of four)."""
        n, sample, cc, gg, mean, scale, beta, m, zbar, w, cmean, sigma, gamma, gbeta = (
            _narrow_program(z_ptr, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, w_ptr, b_ptr, zbar_ptr,
                            cs_ptr, C, P, s_n, s_c, s_p, bn_eps, dof, HAS_BN, AFFINE, SAVED,
                            BLOCK_K, GB, BLOCK_Q))
        da_sum = tl.zeros((GB,), tl.float32)
        da_chat = tl.zeros((GB,), tl.float32)
        zd_da = tl.zeros((GB * BLOCK_K,), tl.float32)
        zd_chat = tl.zeros((GB * BLOCK_K,), tl.float32)
        for q0 in range(0, P, BLOCK_Q):  # z, dy and dx share strides
            zc, dy, offs, mask, on, chat, s, da = _narrow_da(
                z_ptr + sample, dy_ptr + sample, cc, q0, C, P, s_c, s_p, mean, scale, beta, w,
                cmean, sigma, gamma, gbeta, eps, GB, BLOCK_K, BLOCK_Q)
            da_sum += tl.sum(da, axis=1)
            da_chat += tl.sum(da * chat, axis=1)
            zd = tl.where(mask, zc - zbar[:, None], 0.0)
            zd_da += tl.sum(zd * _per_channel(da, GB, BLOCK_K, BLOCK_Q), axis=1)
            zd_chat += tl.sum(zd * _per_channel(chat, GB, BLOCK_K, BLOCK_Q), axis=1)
        rows = n * (C // BLOCK_K) + gg
        tl.store(dparams_ptr + rows, da_chat)
        tl.store(dparams_ptr + N * (C // BLOCK_K) + rows, da_sum)
        # sigma == 0 means chat == 0: the normalisation's term vanishes (no 0/0).
        coef = -(sigma + eps) * da_chat / (tl.where(sigma > 0, sigma, 1.0) * dof)
        kappa = gamma / (sigma + eps)
        dm = (_per_channel_1d(kappa, GB, BLOCK_K)
              * (zd_da + _per_channel_1d(coef, GB, BLOCK_K) * zd_chat) * scale / P)
        s1 = tl.zeros((GB * BLOCK_K,), tl.float32)
        s2 = tl.zeros((GB * BLOCK_K,), tl.float32)
        for q0 in range(0, P, BLOCK_Q):
            zc, dy, offs, mask, on, chat, s, da = _narrow_da(
                z_ptr + sample, dy_ptr + sample, cc, q0, C, P, s_c, s_p, mean, scale, beta, w,
                cmean, sigma, gamma, gbeta, eps, GB, BLOCK_K, BLOCK_Q)
            dc = tl.where(on[None, :], kappa[:, None] * (da - (da_sum / P)[:, None]
                                                          + chat * coef[:, None]), 0.0)
            dx = (dy * _per_channel(s, GB, BLOCK_K, BLOCK_Q) + dm[:, None]
                  + m[:, None] * _per_channel(dc, GB, BLOCK_K, BLOCK_Q))
            tl.store(dx_ptr + sample + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if HAS_BN:  # BN's per-sample channel sums, from dx before rounding
                dx = tl.where(mask, dx, 0.0)
                s1 += tl.sum(dx, axis=1)
                s2 += tl.sum(dx * zc, axis=1)
        if HAS_BN:
            ch = n.to(tl.int64) * C + cc
            tl.store(sums_ptr + ch, s1, mask=cc < C)
            tl.store(sums_ptr + N * C + ch, s2, mask=cc < C)

    @triton.jit
    def _bn_input_grad_kernel(dx_ptr, z_ptr, coef_ptr, numel, C, ch_div, WIDE: tl.constexpr,
                              BLOCK: tl.constexpr):
        """dz = a * dx + b * (z - mean) + d in place of dx; dx and z dense with the same
        layout, channel (i // ch_div) % C of element i (ch_div: H*W for NCHW, 1 for NHWC).
        Indices are int32 (cheaper divisions) unless the tensor is over 2^31 elements."""
        start = tl.program_id(0)
        if WIDE:
            start = start.to(tl.int64)
        i = start * BLOCK + tl.arange(0, BLOCK)
        ok = i < numel
        ch = (i // ch_div) % C
        a = tl.load(coef_ptr + ch, mask=ok, other=0.0)
        b = tl.load(coef_ptr + C + ch, mask=ok, other=0.0)
        mean = tl.load(coef_ptr + 2 * C + ch, mask=ok, other=0.0)
        d = tl.load(coef_ptr + 3 * C + ch, mask=ok, other=0.0)
        dx = tl.load(dx_ptr + i, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + i, mask=ok, other=0.0).to(tl.float32)
        tl.store(dx_ptr + i, (a * dx + b * (z - mean) + d).to(dx_ptr.dtype.element_ty), mask=ok)
