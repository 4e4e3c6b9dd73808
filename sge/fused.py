"""The fused SGE (issue 5): the reference's numbers at close to ResNet's time and memory.

Why: autograd through the reference (``sge/layer.py``) keeps several full-size tensors per
block and allocates several more; on a CPU every fresh full-size tensor also costs page
faults (glibc hands blocks over 32 MB back to the OS), so time goes with allocations. Here
one opaque op runs the forward with matmul-shaped passes and keeps only statistics:

    chat (N, G, H*W)  the normalized per-position value     (C/G times smaller than x)
    sigma (N, G, 1)   the unbiased std of each group's c
    m (N, G, C/G)     the per-sample channel means g

The block's last BN output ``x``, which SGE gates, is saved by nobody else; keeping it would
cost one full tensor per block. So when SGE follows a BatchNorm2d (``defer_norm``), the op
applies that BN itself, ``x = z * scale + shift`` from the conv output ``z`` and the batch
statistics, without ever storing ``x``: the forward allocates only ``y`` (where ResNet
allocates the BN output) and the backward recomputes ``x`` from ``z``, which BN's backward
needs anyway. Batch statistics come from ``torch.batch_norm_update_stats`` (on CPU from a
one-pass kernel of ``sge/fused_cpu.py``, which also hands the forward each sample's channel
means), once per forward, so running statistics update exactly once per step.

The op can also finish the block (``residual=``, as ``models/resnet.py``'s SGE blocks call
it): ``y = relu(SGE(x) + residual)`` in the same write, where ResNet runs BN, the add and the
ReLU as three passes over the block's output. Its backward then starts with ReLU's (the
residual's gradient), which needs ``y``: the block's output, kept by the next block's
convolution anyway.

On CPU the time is in passes over memory, not arithmetic: the op goes through the batch a
few samples at a time (about 8 MB of feature map, ``_CPU_CHUNK_BYTES``), applying BN first,
so SGE's extra passes over a chunk read the last-level cache instead of memory. The backward
also does BN's (with the batch statistics or the running ones) in two sweeps: per-channel
sums of dx and dx * z while each dx chunk is in cache, then dz in place. Every statistic
is per sample, so chunks are independent. On GPUs one chunk is the whole batch, and
``sge/fused_triton.py`` takes over where it applies: it keeps no full-size statistics (its
backward recomputes them; the chunked kernels keep per-sample ones, C/G * H*W times smaller
than the map) and does BN's backward too. On CPU, float32/float64 maps go to
the C++ kernels of ``sge/fused_cpu.py`` (one task per sample and group, built on first use);
these chunks are their fallback and the path of half-precision maps.

Hand-derived SGE backward, per sample and group, K = C/G channels, P = H*W positions,
s = sigmoid(gamma * chat + beta), dof = max(P - 1, 1):

    ds_p   = sum_k dy_kp x_kp                 da = ds * s * (1 - s)
    dgamma = sum da * chat                    dbeta = sum da
    dc_p   = gamma / (sigma + eps) * (da_p - mean(da)) - gamma * chat_p * sum(da*chat) / (dof*sigma)
    dx_kp  = dy_kp s_p + m_k dc_p + (1/P) sum_q dc_q x_kq

Since sum_p dc_p = 0, the last term is scale_k/P * sum_q dc_q z_kq. At sigma = 0 (H*W = 1 or
a constant map) chat is 0, and so is the normalization's share of the gradient.

Both passes are ``torch.library`` custom ops, so a whole-model ``torch.compile`` sees SGE as
one opaque call instead of compiling its many reductions, and autocast cannot downcast the
statistics: they are computed in float32 (float64 for float64 inputs) like the reference.
Eager calls run the same code through a plain autograd.Function (``_EagerFused``), which
costs the host far less per call; where the C++ kernels run, through one C++ autograd node
instead (``fused_cpu.tail``: no Python in its forward or backward), whose backward writes
the block's first map gradient over its incoming one when autograd alone holds that.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn

from sge import fused_cpu, fused_triton
from sge.layer import EPS, SpatialGroupEnhance


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _keep_format(out: Tensor, like: Tensor) -> Tensor:
    """``out`` in ``like``'s format: channels_last when ``like`` is stored so, else NCHW
    (what the ops' fakes promise, ``empty_like``). ``out`` may come in either: ATen's
    elementwise ops follow their first channels_last input, not ``like``. An empty placeholder
    output stays as it is."""
    if out.dim() != 4:
        return out
    cl = not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last)
    return out.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def _affine(bn_weight, bn_bias, mean, var, eps, ct):
    """Per-channel ``(scale, shift, invstd)`` with ``BN(z) = z * scale + shift``; Nones
    without BN."""
    if mean is None:
        return None, None, None
    invstd = torch.rsqrt(var.to(ct) + eps)
    scale = invstd if bn_weight is None else invstd * bn_weight.to(ct)
    shift = -mean.to(ct) * scale
    return scale, shift if bn_bias is None else shift.add_(bn_bias.to(ct)), invstd


def _apply_norm(z, bn_weight, bn_bias, mean, var, eps, out=None):
    """``BN(z)`` with the given statistics, by BatchNorm's own kernel (eval mode: no stats
    update), into ``out`` when given. A broadcast ``addcmul`` does the same maths 1.3-4x
    slower on CPU: its per-channel operands are not contiguous along the inner dimension,
    so it does not vectorize."""
    # The out= form takes no mixed dtypes, and it is only used (and measured) on CPU: on GPUs
    # this PyTorch path is the fallback of the Triton kernels.
    if out is None or mean.dtype != z.dtype or z.device.type != "cpu":
        x = nn.functional.batch_norm(z, mean, var, bn_weight, bn_bias, False, 0.0, eps)
        return x if out is None else out.copy_(x)
    # Two distinct scratch tensors: CUDA's kernel of this op copies the running mean into
    # save_mean, then writes invstd into save_invstd; one shared tensor normalized with invstd
    # as the mean there (caught by the CUDA run of tests/test_fused.py).
    return torch.ops.aten.native_batch_norm.out(
        z, bn_weight, bn_bias, mean, var, False, 0.0, eps, out=out,
        save_mean=z.new_empty(0), save_invstd=z.new_empty(0))[0]


def _gate(chat: Tensor, weight: Tensor, bias: Tensor, out: Tensor) -> Tensor:
    g = chat.shape[1]
    return torch.addcmul(bias.reshape(1, g, 1).to(chat.dtype), chat,
                         weight.reshape(1, g, 1).to(chat.dtype), out=out).sigmoid_()


# A float32 copy of a float16/bfloat16 feature map is twice its size; the products below
# convert at most this many elements at a time, so statistics stay float32 without one.
_CONVERT = 1 << 22
# On CPU the op works through the batch a few samples at a time, about this many bytes of
# feature map each: its several passes over a chunk then read the last-level cache
# (32 MB here) instead of memory. Every statistic is per sample, so chunks are independent.
_CPU_CHUNK_BYTES = 8 << 20


def _chunks(z: Tensor) -> tuple[int, list[slice]]:
    """``(most samples in a chunk, the chunks)``."""
    n = z.shape[0]
    if z.device.type != "cpu" or n == 0:
        return n, [slice(0, n)]
    step = min(n, max(1, _CPU_CHUNK_BYTES // max(1, z[0].numel() * z.element_size())))
    return step, [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _bmm(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """``torch.bmm(a, b, out=out)`` in ``a``'s dtype, converting ``b`` (possibly narrower)
    a slice at a time."""
    if b.dtype == a.dtype:
        return torch.bmm(a, b, out=out)
    step = max(1, _CONVERT // max(1, b[0].numel()))
    for i in range(0, a.shape[0], step):
        torch.bmm(a[i:i + step], b[i:i + step].to(a.dtype), out=out[i:i + step])
    return out


# Per-position tensors are only C/G = 4 times smaller than the feature map in ResNet's first
# stage (256 channels, G=64), so each elementwise op on them counts: reductions over a
# group's channels are batched matrix-vector products (a few times faster than sum/mul
# along a middle dimension), and addcmul / sigmoid_backward fuse pairs of ops.

def sge_forward(z, bn_weight, bn_bias, mean, var, weight, bias, groups, bn_eps, keep=True,
                residual=None):
    """Return ``(y, chat, sigma, m)`` for ``x = BN(z)`` (or ``x = z`` when ``mean`` is None);
    with ``keep`` False (no backward will run) the last three are empty. With a
    ``residual``, ``y = relu(SGE(x) + residual)`` (the block's tail).

    Every output owns its storage (no views): custom-op outputs must not be views. On CPU,
    fresh memory costs page faults on first touch (about a third of a pass over it), so
    per-chunk temporaries live in one workspace allocated once per call.
    """
    n, c, h, w = z.shape
    ct = _compute_dtype(z.dtype)
    zc = z.contiguous()
    step, chunks = _chunks(zc)
    y = torch.empty_like(zc)
    rc = None if residual is None else residual.contiguous()
    rows = n if keep else step
    chat = zc.new_empty((rows, groups, h * w), dtype=ct)
    sigma = zc.new_empty((rows, groups, 1), dtype=ct)
    m = zc.new_empty((rows, groups, c // groups), dtype=ct)
    gate = zc.new_empty((step, groups, h * w), dtype=ct)
    for i in chunks:
        j = i if keep else slice(0, i.stop - i.start)
        _forward_chunk(zc[i], y[i], chat[j], sigma[j], m[j], gate, bn_weight, bn_bias, mean,
                       var, bn_eps, weight, bias)
        if rc is not None:  # while the chunk is in cache
            y[i].add_(rc[i]).relu_()
    if not keep:
        chat, sigma, m = (zc.new_empty(0, dtype=ct) for _ in range(3))
    return _keep_format(y, z), chat, sigma, m


def _forward_chunk(z, y, chat, sigma, m, gate, bn_weight, bn_bias, mean, var, bn_eps, weight,
                   bias):
    """``sge_forward`` for some samples, into their slices of the outputs."""
    n, c, h, w = z.shape
    g = chat.shape[1]
    k, p, ng = c // g, h * w, n * g
    if mean is None:
        x = z
    else:  # BN first: the passes below then read x from cache, not z from memory
        x = _apply_norm(z, bn_weight, bn_bias, mean, var, bn_eps, out=y)
    torch.mean(x.view(n, c, p), 2, dtype=m.dtype, out=m.view(n, c))  # channel means g
    _bmm(m.view(ng, 1, k), x.view(ng, k, p), chat.view(ng, 1, p))   # c = <g, x>
    chat.sub_(chat.mean(2, keepdim=True))
    # Unbiased std (var_mean's inner-dim Welford measured 80x slower than this norm); with
    # H*W == 1, c - mean(c) == 0 and std 0, so c_hat = 0 like the reference.
    torch.linalg.vector_norm(chat, dim=2, keepdim=True, out=sigma)
    sigma.div_(max(p - 1, 1) ** 0.5)
    chat.div_(sigma + EPS)
    s = _gate(chat, weight, bias, gate[:n]).to(z.dtype).view(ng, 1, p)  # rounded as the ref.
    torch.mul(x.view(ng, k, p), s, out=y.view(ng, k, p))


def sge_backward(dy, z, bn_weight, bn_bias, mean, var, chat, sigma, m, weight, bias,
                 bn_training, bn_eps):
    """Return ``(dz, dweight, dbias, dbn_weight, dbn_bias)``.

    With BN, its backward is done here too, in two sweeps over the chunks: the first
    writes dx and sums ``dx`` and ``dx * z`` per channel while the chunk is in cache, the
    second turns dx into dz in place. ATen's BN backward would read dx and z twice more
    from memory and allocate dz (page faults).
    """
    n, c, h, w = dy.shape
    ct = chat.dtype
    zc, dyc = z.contiguous(), dy.contiguous()
    scale, _, invstd = _affine(bn_weight, bn_bias, mean, var, bn_eps, ct)
    # One full-size scratch buffer: x * dy, then dx, then dz.
    buf = torch.empty_like(dyc, dtype=ct)
    dparams = chat.new_zeros((2, chat.shape[1]))                    # dgamma, dbeta
    step, chunks = _chunks(zc)
    work = chat.new_empty((3, step) + chat.shape[1:])
    if scale is not None:
        sums = chat.new_zeros((2, c))                               # sum dx, sum dx * z
        prod = chat.new_empty((step, c, h * w))
    for i in chunks:
        _backward_chunk(dyc[i], zc[i], buf[i], chat[i], sigma[i], m[i], work, bn_weight,
                        bn_bias, mean, var, bn_eps, scale, weight, bias, dparams)
        if scale is not None:
            dx3, z3 = buf[i].flatten(2), zc[i].flatten(2)
            sums[0].add_(dx3.sum((0, 2)))
            sums[1].add_(torch.mul(dx3, z3, out=prod[:len(dx3)]).sum((0, 2)))
    dweight, dbias = (d.view(weight.shape).to(weight.dtype, copy=True) for d in dparams)
    if scale is None:
        return _keep_format(buf.to(dy.dtype), dy), dweight, dbias, *_no_grads(dy)
    coef, dbn = _bn_backward_from_sums(sums, bn_weight, mean, invstd, scale, n * h * w,
                                       bn_training, dy)
    coef = [t if t is None else t.view(1, c, 1) for t in coef]
    for i in chunks:
        dx3 = buf[i].flatten(2).mul_(coef[0])
        if bn_training:
            dx3.addcmul_(zc[i].flatten(2), coef[1]).add_(coef[2])
    return _keep_format(buf.to(dy.dtype), dy), dweight, dbias, *dbn


def _no_grads(like: Tensor) -> tuple[Tensor, Tensor]:
    """Two empty tensors for "no BN parameter gradients": custom-op outputs cannot be None,
    nor alias each other."""
    return like.new_empty(0), like.new_empty(0)


def _bn_backward_from_sums(sums, bn_weight, mean, invstd, scale, count, training, like):
    """BN's backward from the per-channel ``sums`` of dx and dx * z: the coefficients
    ``(a, b, d)`` of its input gradient ``dz = a * dx + b * z + d`` and its parameter
    gradients. dbeta = sum dx, dgamma = sum dx * xhat; dz = scale * dx in eval mode, and with
    batch statistics dz = scale * (dx - mean(dx) - xhat * mean(dx * xhat))."""
    mean = mean.to(scale.dtype)
    sum_dx, sum_dxc = sums[0], sums[1].sub_(mean * sums[0])  # sum dx * (z - mean)
    if training:
        k = sum_dxc * invstd * invstd / count
        coef = (scale, -scale * k, scale * (k * mean - sum_dx / count))
    else:
        coef = (scale, None, None)
    if bn_weight is None:
        return coef, _no_grads(like)
    return coef, ((sum_dxc * invstd).to(bn_weight.dtype), sum_dx.to(bn_weight.dtype))


def _backward_chunk(dy, z, buf, chat, sigma, m, work, bn_weight, bn_bias, mean, var, bn_eps,
                    scale, weight, bias, dparams):
    """``sge_backward`` up to dx for some samples: dx into ``buf``, parameter gradients
    added to ``dparams``; ``work`` holds three per-position temporaries."""
    n, c, h, w = dy.shape
    g = chat.shape[1]
    k, p, ng = c // g, h * w, n * g
    ct = chat.dtype
    da, s, dc = (t[:n] for t in work)
    if mean is None:
        torch.mul(z.to(ct), dy, out=buf)
    elif buf.dtype == z.dtype:
        _apply_norm(z, bn_weight, bn_bias, mean, var, bn_eps, out=buf).mul_(dy)
    else:
        buf.copy_(_apply_norm(z, bn_weight, bn_bias, mean, var, bn_eps)).mul_(dy)
    ones = chat.new_ones((1, 1, k)).expand(ng, 1, k)
    torch.bmm(ones, buf.view(ng, k, p), out=da.view(ng, 1, p))     # ds = sum_k x dy
    _gate(chat, weight, bias, s)
    torch.ops.aten.sigmoid_backward.grad_input(da, s, grad_input=da)
    da_chat = torch.mul(da, chat, out=dc).sum(2, keepdim=True)
    da_sum = da.sum(2, keepdim=True)
    dparams[0].add_(da_chat.sum(0).view(g))
    dparams[1].add_(da_sum.sum(0).view(g))
    # dc = gamma/(sigma+eps) * (da - mean(da) + chat * b); sigma == 0 means chat == 0 (no 0/0).
    coef_b = -(sigma + EPS) * da_chat / torch.where(sigma > 0, sigma, 1.0).mul_(max(p - 1, 1))
    torch.addcmul(da_sum.div_(-p), chat, coef_b, out=dc).add_(da)
    dc.mul_(weight.reshape(1, g, 1).to(ct) / (sigma + EPS))
    # dm_k = sum_p z_kp dc_p as (1 x P) @ (P x K): 3-8x faster than (K x P) @ (P x 1) here.
    dm = _bmm(dc.view(ng, 1, p), z.view(ng, k, p).transpose(1, 2), chat.new_empty((ng, 1, k)))
    if scale is not None:
        dm = dm.view(n, c).mul_(scale)
    # dx = dy * s + dm / P, then + m (x) dc as a batched rank-1 update, into the scratch.
    dx = buf.view(ng, k, p)
    torch.addcmul(dm.view(ng, k, 1).div_(p), dy.view(ng, k, p), s.view(ng, 1, p), out=dx)
    dx.baddbmm_(m.view(ng, k, 1), dc.view(ng, 1, p))


# ---------------------------------------------------------------------------------------
# Opaque ops: eager calls run the functions above; torch.compile sees one node each.

def _bn(bn_weight, bn_bias, mean, var, eps):
    """The kernels' description of the BN before SGE (None without one)."""
    return None if mean is None else (mean, var, bn_weight, bn_bias, eps)


def _no_autocast(t: Tensor):
    """Autocast would still downcast the matmuls inside the op; entering the context costs
    time on every call, so only when autocast is on."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


# flexible_layout: under torch.compile the ops take their maps in whatever layout Inductor
# gives them (channels_last for CPU convolutions) instead of NCHW copies; their outputs have
# their inputs' layout (empty_like in the fakes), on every path.
_LAYOUT = (torch.Tag.flexible_layout,)


def _forward_impl(z: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                  mean: Optional[Tensor], var: Optional[Tensor], zmean: Optional[Tensor],
                  weight: Tensor, bias: Tensor, residual: Optional[Tensor], groups: int,
                  bn_training: bool, bn_eps: float,
                  keep: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # bn_training is only kept for the backward; keep: whether a backward will run. With a
    # residual the op is the block's whole tail, relu(SGE(BN(z)) + residual). zmean: z's
    # (N, C) channel means when BN's batch statistics came with them (the C++ kernels).
    y, stats = _forward_parts(z, bn_weight, bn_bias, mean, var, zmean, weight, bias, residual,
                              groups, bn_eps, keep)
    if stats is None:  # the Triton kernels kept no statistics; the fake agrees
        return y, *(z.new_empty(0, dtype=torch.float32) for _ in range(3))
    return y, *stats


def _forward_parts(z, bn_weight, bn_bias, mean, var, zmean, weight, bias, residual, groups,
                   bn_eps, keep, overwrite=False, residual_bn=None):
    """``(y, (chat, sigma, m))``, or ``(y, None)`` where the Triton kernels kept no
    statistics (their backward recomputes them). The chunked ones keep theirs as
    ``(empty, (N, G, 2) mean and std of c, (N, C) channel means of z - mean)``.
    ``overwrite`` (only without ``keep``): ``y`` may be written over ``z`` (the C++ kernels
    do, when ``z`` is stored contiguously in its layout; the other paths allocate ``y``).
    ``residual_bn`` (``_bn``'s tuple): the residual's own BN, which the C++ kernels apply
    as they read the residual; only where they run (``_takes_residual_norm``: the module
    calls the BN itself elsewhere)."""
    bn = _bn(bn_weight, bn_bias, mean, var, bn_eps)
    if residual_bn is not None and not _cpu_kernels_run(z, groups):
        raise RuntimeError("sge: the residual's BN is applied by the C++ kernels only")
    # Checked first and outside _no_autocast: the kernels' path runs no autocast-eligible
    # op, and entering the context costs host time on every call.
    if fused_triton.applies(z, groups):  # the residual's add and ReLU included
        out = fused_triton.forward(z, bn, weight, bias, groups, residual, keep)
        if out is None:  # not buildable here (notice given): the same output by PyTorch
            with _no_autocast(z):
                y = sge_forward(z, bn_weight, bn_bias, mean, var, weight, bias, groups,
                                bn_eps, False, residual)[0]
            return y, None
        y, kept = out  # the chunked kernels' statistics: in the (sigma, m) slots
        return y, None if kept is None else (z.new_empty(0, dtype=torch.float32), kept[1],
                                             kept[0])
    with _no_autocast(z):
        if fused_cpu.applies(z):  # outputs in z's layout (NCHW or channels_last)
            out = z if overwrite and not keep and _dense(z) else None
            y, *stats = fused_cpu.forward(z, bn, weight, bias, groups, keep, residual, zmean,
                                          out=out, residual_bn=residual_bn)
        else:
            y, *stats = sge_forward(z, bn_weight, bn_bias, mean, var, weight, bias, groups,
                                    bn_eps, keep, residual)
    return y, stats


def _cpu_kernels_run(z: Tensor, groups: int) -> bool:
    """Whether ``_forward_parts`` takes the C++ kernels' path for ``z`` (Triton first)."""
    return not fused_triton.applies(z, groups) and fused_cpu.applies(z)


def _dense(t: Tensor) -> bool:
    """Whether ``t`` is stored contiguously as NCHW or as channels_last."""
    return t.is_contiguous() or (t.dim() == 4 and
                                 t.is_contiguous(memory_format=torch.channels_last))


_fused_forward = torch.library.custom_op("sge::fused_forward", mutates_args=(),
                                         tags=_LAYOUT)(_forward_impl)


@_fused_forward.register_fake
def _(z, bn_weight, bn_bias, mean, var, zmean, weight, bias, residual, groups, bn_training,
      bn_eps, keep):
    n, c, h, w = z.shape
    ct = _compute_dtype(z.dtype)
    if not keep or fused_triton.applies(z, groups):
        if keep and fused_triton.keeps_statistics(z, groups):  # _forward_parts' layout
            return (torch.empty_like(z), z.new_empty(0, dtype=torch.float32),
                    z.new_empty((n, groups, 2), dtype=torch.float32),
                    z.new_empty((n, c), dtype=torch.float32))
        return (torch.empty_like(z), *(z.new_empty(0, dtype=ct) for _ in range(3)))
    return (torch.empty_like(z), z.new_empty((n, groups, h * w), dtype=ct),
            z.new_empty((n, groups, 1), dtype=ct), z.new_empty((n, groups, c // groups), dtype=ct))


def _backward_impl(dy: Tensor, y: Optional[Tensor], z: Tensor, bn_weight: Optional[Tensor],
                   bn_bias: Optional[Tensor], mean: Optional[Tensor], var: Optional[Tensor],
                   chat: Tensor, sigma: Tensor, m: Tensor, weight: Tensor, bias: Tensor,
                   bn_training: bool, bn_eps: float
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # y: the forward's output when it had a residual (ReLU's backward is done here too).
    # Custom-op outputs cannot be None: empty tensors stand for "no gradient".
    dz, dres, dweight, dbias, dbn_weight, dbn_bias = _backward_parts(
        dy, y, z, bn_weight, bn_bias, mean, var, chat, sigma, m, weight, bias, bn_training,
        bn_eps)
    if dbn_weight is None:
        dbn_weight, dbn_bias = _no_grads(dy)
    return dz, dy.new_empty(0) if dres is None else dres, dweight, dbias, dbn_weight, dbn_bias


def _backward_parts(dy, y, z, bn_weight, bn_bias, mean, var, chat, sigma, m, weight, bias,
                    bn_training, bn_eps):
    """``(dz, dresidual, dweight, dbias, dbn_weight, dbn_bias)``; None for the residual's
    gradient without a residual and for BN's without an affine BN (the C++ kernels' path
    gives empty tensors there). ``chat, sigma, m``: the forward's statistics (from the
    Triton kernels, those of the chunked ones, or none). (A residual's own BN is only ever
    applied by the C++ tail node, ``fused_cpu.tail``, whose backward is in C++ too.)"""
    bn = _bn(bn_weight, bn_bias, mean, var, bn_eps)
    triton = fused_triton.applies(dy, weight.shape[1])
    if not triton and fused_cpu.applies(dy) and z.dtype == dy.dtype:
        with _no_autocast(dy):  # ReLU's backward included; gradients in dy's layout
            return fused_cpu.backward(dy, y, z, bn, bn_training, chat, sigma, m, weight,
                                      bias)[:6]
    dres = None
    if y is not None:  # ReLU's backward; the add passes its gradient to both branches
        dy = dres = _keep_format(torch.ops.aten.threshold_backward(dy, y, 0), dy)
    if triton:  # outside _no_autocast (host time)
        kept = (m, sigma) if m is not None and m.numel() else None  # the chunked kernels'
        grads = fused_triton.backward(dy, z, bn, bn_training, weight, bias, weight.shape[1],
                                      kept)
        if grads is not None:
            return grads[0], dres, *grads[1:]
    with _no_autocast(dy):
        if triton:  # not buildable here (notice given): the PyTorch path's statistics
            _, chat, sigma, m = sge_forward(z, bn_weight, bn_bias, mean, var, weight, bias,
                                            weight.shape[1], bn_eps)
        dz, *grads = sge_backward(dy, z, bn_weight, bn_bias, mean, var, chat, sigma, m, weight,
                                  bias, bn_training, bn_eps)
    return dz, dres, *grads


_fused_backward = torch.library.custom_op("sge::fused_backward", mutates_args=(),
                                          tags=_LAYOUT)(_backward_impl)


@_fused_backward.register_fake
def _(dy, y, z, bn_weight, bn_bias, mean, var, chat, sigma, m, weight, bias, bn_training,
      bn_eps):
    def like(t):
        return torch.empty_like(t) if t is not None and mean is not None else dy.new_empty(0)
    return (torch.empty_like(dy), dy.new_empty(0) if y is None else torch.empty_like(dy),
            torch.empty_like(weight), torch.empty_like(bias), like(bn_weight), like(bn_weight))


def _setup_context(ctx, inputs, output):
    z, bn_weight, bn_bias, mean, var, _, weight, bias, residual, _, bn_training, bn_eps, _ = \
        inputs
    y, chat, sigma, m = output
    # With a residual, ReLU's backward needs the output: the block's output, which the next
    # block's convolution keeps anyway (no extra memory).
    ctx.residual = residual is not None
    ctx.save_for_backward(z, bn_weight, bn_bias, mean, var, chat, sigma, m, weight, bias,
                          y if ctx.residual else None)
    ctx.bn = (bn_training, bn_eps)


def _backward_with(op, ctx, dy):
    """The gradients of the op's 13 inputs (``op``: the custom op, or ``_backward_parts`` in
    eager calls)."""
    z, bn_weight, bn_bias, mean, var, chat, sigma, m, weight, bias, y = ctx.saved_tensors
    dz, dresidual, dweight, dbias, dbn_weight, dbn_bias = op(
        dy, y, z, bn_weight, bn_bias, mean, var, chat, sigma, m, weight, bias, *ctx.bn)
    if dbn_weight is None or dbn_weight.numel() == 0:  # BN without parameters
        dbn_weight = dbn_bias = None
    return (dz, dbn_weight, dbn_bias, None, None, None, dweight, dbias,
            dresidual if ctx.residual else None, None, None, None, None)


def _backward(ctx, dy, *_stat_grads):
    return _backward_with(_fused_backward, ctx, dy)


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerFused(torch.autograd.Function):
    """The ops' forward and backward outside torch.compile, without the custom-op layer,
    where the C++ kernels do not run (the Triton and PyTorch paths; ``fused_cpu.tail`` is
    the C++ kernels' node).

    That layer (schema checks, argument defaults, the alias check of every output, its
    autograd wrapper) held the largest share of host time in a cProfile of eager GPU
    training, whose late stages were launch-bound: the GPU waited for the CPU (cProfile's
    attribution across the C++ dispatcher is rough). Timed on a CPU, a do-nothing op with
    this signature costs 41 us per call through the layer with autograd, 6.5 us as an
    autograd.Function, 11 us through the layer without autograd. On an H100 the late-stage
    block tails took 1.50 and 1.17 ms before, 0.73 and 0.78 ms after (with the kernels'
    changes of the same session). Compiled graphs still see the opaque ops
    (``FusedSpatialGroupEnhance.forward`` picks): AOTAutograd differentiates them, so only
    the layer's cheaper, autograd-free part remains there.

    Its one output is ``y``; the statistics stay in ``ctx``. As outputs (the custom op's
    form) they cost, per block and step, three placeholder tensors in the forward (the
    Triton path keeps no statistics) and three zero-filled gradients that autograd
    materialized for them in the backward (``aten::zeros``, 21 us each in a profile on the
    lent H200 machine). With Triton's launches stubbed on a CPU, the tail's host time
    went from 70 to 56 us (forward) and 203 to 181 us (forward and backward, with the
    backward's single workspace); the whole-model GPU step did not move measurably
    (docs/benchmarks.md, "Fourth GPU session")."""

    @staticmethod
    def forward(ctx, *inputs):  # the custom op's 13 inputs
        z, bn_weight, bn_bias, mean, var, zmean, weight, bias, residual, groups, _, bn_eps, \
            keep = inputs
        y, stats = _forward_parts(z, bn_weight, bn_bias, mean, var, zmean, weight, bias,
                                  residual, groups, bn_eps, keep)
        _setup_context(ctx, inputs, (y, *(stats or (None,) * 3)))
        ctx.channels_last = z.dim() == 4 and not z.is_contiguous() and \
            z.is_contiguous(memory_format=torch.channels_last)
        return y

    @staticmethod
    def backward(ctx, dy):
        # The ops work, and give their gradients, in dy's layout. In a channels_last model
        # the last stage's dy comes NCHW from the head's pooling: taking it as the maps are
        # (one copy of dy) spares copying z and y to NCHW, and keeps the gradients that flow
        # on channels_last.
        if ctx.channels_last and not dy.is_contiguous(memory_format=torch.channels_last):
            dy = dy.contiguous(memory_format=torch.channels_last)
        return _backward_with(_backward_parts, ctx, dy)


# ---------------------------------------------------------------------------------------
# Modules


class DeferredBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d applied by the fused SGE right after it (see ``defer_norm``).

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm2d``; its own forward
    passes the input through unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x


@torch.library.custom_op("sge::batch_stats", mutates_args=(), tags=_LAYOUT)
def _compiled_batch_stats(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """BN's batch mean and biased variance of a float CPU map per channel, one opaque op under
    torch.compile: the C++ kernel's (on channels_last maps, timed alone, 2.96 ms against
    7.64 for Inductor's var_mean over ResNet-50's 16 gated BN inputs at batch 8, 112 px, one
    thread), kept for the backward as it is (Inductor recomputed var_mean from z there for
    some blocks). The compiled step took 0.9925x its time with var_mean (one process, one
    thread, alternating). Third output: each sample's channel means, for the forward."""
    if fused_cpu.stats_apply(z):
        return fused_cpu.batch_stats(z)
    var, mean = torch.var_mean(z, (0, 2, 3), correction=0)
    return mean, var, z.mean((2, 3))


@_compiled_batch_stats.register_fake
def _(z):
    return z.new_empty(z.shape[1]), z.new_empty(z.shape[1]), z.new_empty(z.shape[:2])


def _batch_stats(norm: nn.BatchNorm2d, z: Tensor):
    """``(mean, var, zmean)`` that ``norm(z)`` would use (``var`` biased), updating running
    statistics as ``nn.BatchNorm2d.forward`` does (once per call). ``zmean``: each sample's
    channel means ((N, C)) where the C++ kernels computed the statistics, else None."""
    zmean = None
    if norm.training or not norm.track_running_stats:
        momentum = norm.momentum if norm.momentum is not None else 0.0
        if norm.training and norm.track_running_stats:
            norm.num_batches_tracked.add_(1)
            if norm.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(norm.num_batches_tracked)
        track = norm.training and norm.track_running_stats
        count = z.numel() // z.shape[1]
        if torch.compiler.is_compiling() and count > 1:
            if z.device.type == "cpu" and z.dtype in (torch.float32, torch.float64):
                mean, var, zmean = _compiled_batch_stats(z.detach())
            else:  # Inductor's own reduction, fused with the cast to the compute dtype
                var, mean = torch.var_mean(z.detach().to(_compute_dtype(z.dtype)), (0, 2, 3),
                                           correction=0)
            if track:  # the running variance is unbiased
                norm.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                norm.running_var.mul_(1 - momentum).add_(var, alpha=momentum * count / (count - 1))
        # Asked after is_compiling, so that tracing never enters fused_cpu.applies (its first
        # call builds or loads the kernels).
        elif count > 1 and fused_cpu.stats_apply(z):
            mean, var, zmean = fused_cpu.batch_stats(
                z.detach(), norm.running_mean if track else None,
                norm.running_var if track else None, momentum)
        else:
            mean, var = torch.batch_norm_update_stats(
                z.detach(), norm.running_mean if track else None,
                norm.running_var if track else None,
                momentum)
    else:
        mean, var = norm.running_mean, norm.running_var
    return mean, var, zmean


def _takes_residual_norm(x: Tensor, residual: Tensor, groups: int) -> bool:
    """Whether the op applies the residual's BN itself: in eager calls where the C++ kernels
    run (under torch.compile the BN stays Inductor's; the Triton and PyTorch paths have no
    such pass)."""
    return (not torch.compiler.is_compiling() and residual.dtype == x.dtype
            and _cpu_kernels_run(x, groups))


class FusedSpatialGroupEnhance(SpatialGroupEnhance):
    """The reference layer's parameters, keys and outputs, computed by the fused ops.

    Standalone it saves its input for the backward. After ``defer_norm(block, "bn3")`` it
    applies ``block.bn3`` itself (which becomes a ``DeferredBatchNorm2d``) and saves nothing
    full-size beyond the conv output that BN keeps anyway. If that norm is later replaced
    (e.g. by ``SyncBatchNorm.convert_sync_batchnorm``), the block applies it again and this
    module falls back to the standalone path.
    """

    def __init__(self, channels: int, groups: int = 64, device=None, dtype=None):
        super().__init__(channels, groups, device=device, dtype=dtype)
        # Plain attribute, not a submodule: the norm stays registered (and keyed) in its block.
        self.__dict__["_norm_owner"] = None

    def defer_norm(self, block: nn.Module, name: str) -> None:
        """Take over ``block.<name>``, the BatchNorm2d right before this module."""
        norm = getattr(block, name)
        if type(norm) is not nn.BatchNorm2d or norm.num_features != self.channels:
            raise ValueError(f"can only fuse an nn.BatchNorm2d({self.channels}) before SGE, "
                             f"got {norm!r} at {name!r}")
        deferred = DeferredBatchNorm2d(
            norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
            track_running_stats=norm.track_running_stats, device=norm.running_mean.device,
            dtype=norm.running_mean.dtype)
        deferred.load_state_dict(norm.state_dict())
        deferred.train(norm.training)
        setattr(block, name, deferred)
        self.__dict__["_norm_owner"] = (block, name)

    def _deferred_norm(self) -> Optional[DeferredBatchNorm2d]:
        if self._norm_owner is None:
            return None
        norm = getattr(*self._norm_owner)
        return norm if type(norm) is DeferredBatchNorm2d else None

    def forward(self, x: Tensor, residual: Optional[Tensor] = None,
                overwrite_input: bool = False,
                residual_norm: Optional[nn.BatchNorm2d] = None) -> Tensor:
        """``SGE(x)``; with ``residual``, the block's tail ``relu(SGE(x) + residual)`` in the
        same pass (where ResNet runs BN, the add and the ReLU as three).

        ``residual_norm``: the BatchNorm2d that ends a downsampling shortcut, whose input
        ``residual`` then is: the tail is ``relu(SGE(x) + residual_norm(residual))``. The C++
        kernels apply it as they read the residual and do its backward in theirs, so its
        output is never written (nor its input gradient allocated apart); elsewhere it is
        called here as a module. Its running statistics update once per call either way.

        ``overwrite_input``: ``x`` is the caller's own temporary, which nothing reads
        afterwards; when no gradient is being recorded (``no_grad``, ``inference_mode``) and
        the C++ kernels run, the output is then written over ``x`` and returned: no new
        full-size tensor (no page faults for it), and the next convolution reads memory the
        op has just passed over three times (docs/benchmarks.md, "CPU, fifteenth session").
        Ignored otherwise. ``models/resnet.py``'s blocks pass it when no hook could have
        kept ``x``."""
        if x.shape[1] != self.channels:
            raise ValueError(f"SGE built for {self.channels} channels got {x.shape[1]}")
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"SGE's residual has shape {tuple(residual.shape)}, its input "
                             f"{tuple(x.shape)}: they must match")
        rbn = (None,) * 4 + (False, 0.0)  # the residual's BN, folded into the op
        if residual_norm is not None:
            if residual is None or residual_norm.num_features != self.channels:
                raise ValueError(f"SGE's residual_norm needs a residual of {self.channels} "
                                 f"channels, got {residual_norm!r} for "
                                 f"{None if residual is None else tuple(residual.shape)}")
            if _takes_residual_norm(x, residual, self.groups):
                rmean, rvar, _ = _batch_stats(residual_norm, residual)
                rbn = (residual_norm.weight, residual_norm.bias, rmean, rvar,
                       residual_norm.training or not residual_norm.track_running_stats,
                       residual_norm.eps)
            else:
                residual = residual_norm(residual)
        norm = self._deferred_norm()
        if norm is None:
            bn, stats, bn_args = (None, None), (None, None, None), (False, 0.0)
        else:  # x is the conv output; BN happens inside the op
            bn, stats = (norm.weight, norm.bias), _batch_stats(norm, x)
            bn_args = (norm.training or not norm.track_running_stats, norm.eps)
        # Without a backward to come the op keeps no statistics (inference allocates less).
        keep = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad
            for t in (x, *bn, self.weight, self.bias, residual))
        args = (x, *bn, *stats, self.weight, self.bias, residual, self.groups, *bn_args, keep)
        if torch.compiler.is_compiling():
            return _fused_forward(*args)[0]
        if overwrite_input and not torch.is_grad_enabled():  # no backward: no autograd node
            return _forward_parts(*args[:10], bn_args[1], keep, overwrite=True,
                                  residual_bn=_bn(*rbn[:4], rbn[5]))[0]
        if _cpu_kernels_run(x, self.groups):  # forward and backward as one C++ node
            return fused_cpu.tail(*args, *rbn)
        return _EagerFused.apply(*args)  # (the residual's BN is the C++ kernels' alone)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, norm_fused={self._norm_owner is not None}"
