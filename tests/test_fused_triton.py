"""The Triton kernels of the fused SGE (sge/fused_triton.py) against the reference layer.

On a GPU they run on CUDA tensors. Without one, the same kernels run in Triton's interpreter
on CPU tensors: TRITON_INTERPRET=1 has to be set before Triton is imported, so
``test_kernels_in_interpreter`` runs this file again in a child pytest with it set.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from sge import fused_triton
from sge.fused import FusedSpatialGroupEnhance
from tests import test_fused
from tests.test_fused import _run

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
needs_kernels = pytest.mark.skipif(
    DEVICE is None or fused_triton.triton is None,
    reason="needs a GPU or TRITON_INTERPRET=1 (test_kernels_in_interpreter sets it)")
SHAPES = [(2, 16, 5, 7, 4), (3, 8, 1, 1, 2), (1, 12, 3, 1, 3), (2, 6, 1, 9, 6),
          (9, 8, 3, 2, 4), (2, 32, 7, 7, 8), (2, 8, 64, 64, 4)]


@pytest.fixture(autouse=True)
def _exact_float32():
    """CUDA convolutions default to TF32 (10-bit mantissa), which would swamp float32
    comparisons between two models."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.skipif(DEVICE is not None or fused_triton.triton is None,
                    reason="the kernels run directly here (GPU or interpreter), or no Triton")
def test_kernels_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          __file__], env=env, cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


# Every kernel, with the constexpr combinations the wrappers launch, compiled for a Hopper
# GPU (sm_90) by Triton's own compiler and ptxas: no GPU needed. The interpreter runs the
# same code without compiling it, and accepted a loop variable whose type changed from one
# iteration to the next, which the compiler refuses (found on a lent H100).
_MAPS = ("z_ptr", "res_ptr", "y_ptr", "dy_ptr", "dx_ptr")
_COMPILED = [
    ("_forward_kernel", dict(HAS_BN=True, AFFINE=True, HAS_RES=True, BLOCK_K=4, BLOCK_P=4096)),
    ("_forward_kernel", dict(HAS_BN=False, AFFINE=False, HAS_RES=False, BLOCK_K=32, BLOCK_P=64)),
    ("_backward_kernel", dict(HAS_BN=True, AFFINE=False, BLOCK_K=16, BLOCK_P=256)),
    ("_backward_kernel", dict(HAS_BN=False, AFFINE=False, BLOCK_K=4, BLOCK_P=4096)),
    ("_narrow_forward_kernel", dict(HAS_BN=True, AFFINE=True, HAS_RES=True, KEEP=True,
                                    BLOCK_K=4, GB=16, BLOCK_Q=64)),
    ("_narrow_forward_kernel", dict(HAS_BN=False, AFFINE=False, HAS_RES=False, KEEP=False,
                                    BLOCK_K=8, GB=8, BLOCK_Q=64)),
    ("_narrow_backward_kernel", dict(HAS_BN=True, AFFINE=True, SAVED=True, BLOCK_K=4, GB=16,
                                     BLOCK_Q=128)),
    ("_narrow_backward_kernel", dict(HAS_BN=True, AFFINE=True, SAVED=False, BLOCK_K=4, GB=16,
                                     BLOCK_Q=128)),
    ("_narrow_backward_kernel", dict(HAS_BN=False, AFFINE=False, SAVED=False, BLOCK_K=8, GB=8,
                                     BLOCK_Q=128)),
    # one channel per group (ResNet-18/34's first stage at G=64): groups of size 1 reshaped
    ("_narrow_backward_kernel", dict(HAS_BN=True, AFFINE=True, SAVED=True, BLOCK_K=1, GB=64,
                                     BLOCK_Q=128)),
    ("_finish_kernel", dict(HAS_BN=True, TRAINING=True, AFFINE=True, BLOCK_N=32, BLOCK_C=128)),
    ("_finish_kernel", dict(HAS_BN=False, TRAINING=False, AFFINE=False, BLOCK_N=2, BLOCK_C=64)),
    ("_bn_input_grad_kernel", dict(WIDE=True, BLOCK=1024)),
]


@pytest.mark.skipif(INTERPRET or fused_triton.triton is None,
                    reason="compiles the kernels (not in the interpreter); needs Triton")
@pytest.mark.parametrize("name, constexprs", _COMPILED, ids=lambda v: str(v)[:40])
def test_kernels_compile_for_a_gpu(name, constexprs):
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kernel = getattr(fused_triton, name)
    signature = {}
    for arg in inspect.signature(kernel.fn).parameters:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*bf16" if arg in _MAPS else "*fp32"
        elif arg in ("bn_eps", "eps", "dof", "count"):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    try:
        compiled = fused_triton.triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    except FileNotFoundError as err:  # a Triton build without its bundled ptxas
        pytest.skip(f"no ptxas: {err}")
    assert compiled.asm["cubin"]


def _pair(c, g):
    return tuple(m.to(DEVICE) for m in test_fused._pair(c, g, torch.float32))


@needs_kernels
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "transposed", "mixed"])
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_matches_reference(shape, layout):
    n, c, h, w, g = shape
    ref, fused = _pair(c, g)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(n, c, h, w, generator=gen) * 2 + 0.5).to(DEVICE)
    dy = torch.randn(n, c, h, w, generator=gen).to(DEVICE)
    if layout == "nhwc":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    elif layout == "transposed":  # neither layout: the kernels get a copy
        x, dy = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (x, dy))
    elif layout == "mixed":  # NHWC input, NCHW gradient: the backward copies x to NCHW
        x = x.contiguous(memory_format=torch.channels_last)
    assert fused_triton.applies(x, g)  # what the fused op asks before taking the kernels
    got, expect = _run(fused, x, dy), _run(ref, x, dy)
    for a, b in zip(got, expect):
        assert torch.isfinite(a).all()
        assert_close(a, b, rtol=1e-4, atol=1e-5)
    if layout == "nhwc":
        assert got[0].is_contiguous(memory_format=torch.channels_last)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_keep_float32_statistics(dtype):
    # Half inputs, float32 statistics: only the rounding of the input and output differs
    # from the float32 computation.
    ref, fused = _pair(16, 4)
    x = (torch.randn(3, 16, 6, 5) * 3).to(DEVICE, dtype)
    dy = torch.randn(3, 16, 6, 5).to(DEVICE, dtype)
    got = _run(fused, x, dy)
    expect = _run(ref, x.float(), dy.float())
    assert got[0].dtype == got[1].dtype == dtype
    for a, b in zip(got, expect):
        assert_close(a.float(), b, rtol=2e-2, atol=2e-2)


@needs_kernels
def test_model_train_step_matches_reference():
    # The kernels with the block's last BN folded in (DeferredBatchNorm2d), in a whole model:
    # outputs, every gradient, and BN running statistics updated exactly once.
    ref, fused = (m.to(DEVICE) for m in test_fused._models(torch.float32))
    x = torch.randn(4, 3, 64, 64, device=DEVICE)
    labels = torch.randint(0, 10, (4,), device=DEVICE)
    out_ref, out = (model(x) for model in (ref, fused))
    for logits in (out_ref, out):
        nn.functional.cross_entropy(logits, labels).backward()
    assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=name)
    for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    ref.eval()
    fused.eval()
    assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4)


def _norm_blocks(c, g, affine, training):
    """A reference ``BatchNorm2d -> SpatialGroupEnhance`` and the same BN deferred to the
    fused SGE, with non-trivial BN parameters and running statistics."""
    torch.manual_seed(3)
    ref = nn.Module()
    ref.bn, ref.se = nn.BatchNorm2d(c, affine=affine), test_fused._pair(c, g, torch.float32)[0]
    with torch.no_grad():
        ref.bn.running_mean.normal_()
        ref.bn.running_var.uniform_(0.5, 2.0)
        if affine:
            ref.bn.weight.normal_()
            ref.bn.bias.normal_()
    fused = nn.Module()
    fused.bn, fused.se = nn.BatchNorm2d(c, affine=affine), FusedSpatialGroupEnhance(c, g)
    fused.load_state_dict(ref.state_dict())
    fused.se.defer_norm(fused, "bn")
    return (m.to(DEVICE).train(training) for m in (ref, fused))


@needs_kernels
@pytest.mark.parametrize("groups", [4, 8])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_norm_in_kernels_matches_reference(training, affine, layout, groups):
    # The BN the kernels apply and differentiate themselves (batch statistics in training,
    # running ones in eval mode): every gradient, and the running statistics after one step.
    # The oracle is the reference in float64: at 2 channels per group the float32 reference
    # itself is off by half the tolerance here (BN weight gradient), and a GPU rounds its
    # reductions differently again.
    ref, fused = _norm_blocks(16, groups, affine, training)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = (torch.randn(3, 16, 5, 6) * 2 + 3).to(DEVICE, memory_format=fmt)
    dy = torch.randn(3, 16, 5, 6).to(DEVICE, memory_format=fmt)
    got, expect = _norm_grads(ref, fused, x, dy, torch.float32)
    for a, b in zip(got, expect):
        assert_close(a, b.float(), rtol=1e-4, atol=1e-4)
    y, dz = got[:2]
    assert y.is_contiguous(memory_format=fmt) and dz.is_contiguous(memory_format=fmt)
    for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        assert_close(b, a.to(b.dtype), rtol=1e-5, atol=1e-6, msg=name)


def _norm_grads(ref, fused, x, dy, dtype):
    """Output and gradients (input, then parameters) of the fused block on ``dtype`` maps,
    and of the reference in float64 on the same (rounded) values."""
    ref.double()
    x, dy = x.to(dtype), dy.to(dtype)
    out = []
    for block, t in ((fused, dtype), (ref, torch.float64)):
        z = x.detach().to(t).requires_grad_()
        y = block.se(block.bn(z))
        out.append((y, *torch.autograd.grad(y, [z, *block.parameters()], dy.to(t))))
    return out


@needs_kernels
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False])
def test_residual_tail_matches_reference(training, layout):
    # relu(SGE(BN(z)) + residual), the block's tail as the model calls it, against the
    # float64 reference: output and gradients of z, the residual and every parameter.
    ref, fused = _norm_blocks(16, 4, True, training)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    y = _tail_matches_reference(ref, fused, (3, 16, 5, 6), fmt)
    assert (y == 0).any() and (y > 0).any()
    assert y.is_contiguous(memory_format=fmt)


def _tail_matches_reference(ref, fused, shape, fmt):
    """Check the fused block's tail, relu(SGE(BN(z)) + residual), against the reference in
    float64 on random maps of ``shape`` in format ``fmt``: the output and the gradients of
    z, the residual and every parameter. Returns the fused output."""
    x, residual, dy = (torch.randn(shape).to(DEVICE, memory_format=fmt) for _ in range(3))
    out = []
    for block, t in ((fused, torch.float32), (ref.double(), torch.float64)):
        z, r = (v.detach().to(t).requires_grad_() for v in (x * 2 + 3, residual))
        if block is fused:
            y = block.se(block.bn(z), residual=r)
        else:
            y = torch.relu(block.se(block.bn(z)) + r)
        out.append((y, *torch.autograd.grad(y, [z, r, *block.parameters()], dy.to(t))))
    for a, b in zip(*out):
        assert_close(a, b.float(), rtol=1e-4, atol=1e-4)
    return out[0][0]


@needs_kernels
@pytest.mark.parametrize("positions", [(16, 16), (64, 128)])
@pytest.mark.parametrize("training", [True, False])
def test_narrow_group_kernels_match_reference(monkeypatch, training, positions):
    # channels_last maps whose groups span under 32 bytes take the chunked kernels
    # (_narrow_block): here 4 float32 channels per group, 16 channels per program, 7 x 9
    # positions in chunks of 16 (three whole chunks and a partial one, their statistics
    # merged) or, as the defaults, 64 forward and 128 backward (one partial chunk). The
    # block's tail against the float64 reference.
    forward, backward = positions
    monkeypatch.setattr(fused_triton, "NARROW_FORWARD_POSITIONS", forward)
    monkeypatch.setattr(fused_triton, "NARROW_BACKWARD_POSITIONS", backward)
    monkeypatch.setattr(fused_triton, "NARROW_CHANNELS", 16)
    ref, fused = _norm_blocks(32, 8, True, training)
    shape, fmt = (3, 32, 7, 9), torch.channels_last
    assert fused_triton._narrow_block(torch.empty(shape).to(memory_format=fmt), 8) == 16
    _tail_matches_reference(ref, fused, shape, fmt)
    for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        assert_close(b, a.to(b.dtype), rtol=1e-5, atol=1e-6, msg=name)


@needs_kernels
def test_chunked_kernels_keep_their_statistics_for_the_backward(monkeypatch):
    # With keep, the chunked forward keeps each sample's channel means of z - mean and its
    # groups' mean and std of c; the backward with them gives what it gives recomputing them
    # (float32 rounding apart: the sweeps merge other chunks), and changed ones change it
    # (they are used). The kept std against the reference's std of c, in float64.
    monkeypatch.setattr(fused_triton, "NARROW_CHANNELS", 16)
    torch.manual_seed(5)
    shape, g = (3, 32, 7, 9), 8
    z, res, dy = (torch.randn(shape).to(DEVICE, memory_format=torch.channels_last)
                  for _ in range(3))
    z = z * 2 + 3
    bn = (torch.randn(32, device=DEVICE), torch.rand(32, device=DEVICE) + 0.5,
          torch.randn(32, device=DEVICE), torch.randn(32, device=DEVICE), 1e-5)
    weight, bias = (torch.randn(1, g, 1, 1, device=DEVICE) for _ in range(2))
    assert fused_triton.keeps_statistics(z, g)
    y, kept = fused_triton.forward(z, bn, weight, bias, g, res, keep=True)
    y_only, none = fused_triton.forward(z, bn, weight, bias, g, res)
    assert none is None and torch.equal(y, y_only)
    assert kept[0].shape == (3, 32) and kept[1].shape == (3, g, 2)
    zc = z.double() - bn[0].double().view(1, -1, 1, 1)
    assert_close(kept[0].double(), zc.mean((2, 3)), rtol=1e-5, atol=1e-5)
    x = zc / (bn[1].double() + 1e-5).sqrt().view(1, -1, 1, 1) * bn[2].double().view(
        1, -1, 1, 1) + bn[3].double().view(1, -1, 1, 1)
    xg = x.reshape(3, g, 4, 63)
    c = (xg * xg.mean(3, keepdim=True)).sum(2)
    assert_close(kept[1][..., 1].double(), c.std(2), rtol=1e-4, atol=1e-5)
    with_kept = fused_triton.backward(dy, z, bn, True, weight, bias, g, kept)
    recomputed = fused_triton.backward(dy, z, bn, True, weight, bias, g)
    for a, b in zip(with_kept, recomputed):
        assert_close(a, b, rtol=1e-4, atol=1e-5)
    changed = fused_triton.backward(dy, z, bn, True, weight, bias, g, (kept[0] + 1, kept[1]))
    assert not torch.allclose(changed[0], with_kept[0], rtol=1e-3, atol=1e-3)
    # NCHW maps take the tile kernels, which keep nothing.
    nchw = z.contiguous()
    assert not fused_triton.keeps_statistics(nchw, g)
    assert fused_triton.forward(nchw, bn, weight, bias, g, res.contiguous(), keep=True)[1] \
        is None


@needs_kernels
def test_chunked_kernels_under_compile(monkeypatch):
    # torch.compile traces the ops with their fakes: those must promise the kept statistics'
    # shapes (opcheck compares fake and real outputs; Inductor itself did not notice a
    # wrong one here), and the compiled tail gives the eager one's output and gradients.
    monkeypatch.setattr(fused_triton, "NARROW_CHANNELS", 16)
    _, fused = _norm_blocks(32, 8, True, True)
    x, residual, dy = (torch.randn(3, 32, 7, 9).to(DEVICE, memory_format=torch.channels_last)
                       for _ in range(3))
    bn, se = fused.bn, fused.se
    params = (bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var)
    for keep in (True, False):
        args = (x, *params, None, se.weight.detach(), se.bias.detach(), residual, 8, True,
                bn.eps, keep)
        torch.library.opcheck(torch.ops.sge.fused_forward.default, args,
                              test_utils=("test_faketensor",))
    y, chat, sigma, m = torch.ops.sge.fused_forward(*args[:-1], True)
    assert sigma.shape == (3, 8, 2) and m.shape == (3, 32)
    torch.library.opcheck(
        torch.ops.sge.fused_backward.default,
        (dy, y, x, *params, chat, sigma, m, se.weight.detach(), se.bias.detach(), True, bn.eps),
        test_utils=("test_faketensor",))

    def tail(z, r):
        return fused.se(fused.bn(z), residual=r)
    out = []
    for fn in (tail, torch.compile(tail, fullgraph=True)):
        z = (x * 2 + 3).requires_grad_()
        y = fn(z, residual)
        out.append((y, *torch.autograd.grad(y, [z, *fused.parameters()], dy)))
    for a, b in zip(*out):
        assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("kernel", ["_forward_kernel", "_backward_kernel", "_finish_kernel",
                                    "_bn_input_grad_kernel", "_narrow_forward_kernel",
                                    "_narrow_backward_kernel"])
def test_kernel_that_cannot_be_built_falls_back_with_notice(monkeypatch, kernel):
    # A kernel Triton cannot build on this GPU (an architecture or dtype it lacks, no ptxas,
    # too little shared memory): the op takes its PyTorch path with a one-line notice, its
    # numbers still the reference's, and that kernel is not tried again.
    from triton.runtime.errors import OutOfResources
    attempts = []

    class Unbuildable:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                attempts.append(grid)
                raise OutOfResources(300000, 232448, "shared memory")
            return launch
    monkeypatch.setattr(fused_triton, kernel, Unbuildable())
    monkeypatch.setattr(fused_triton, "_noticed", set())
    monkeypatch.setattr(fused_triton, "_unbuildable", set())
    fmt = torch.channels_last if "narrow" in kernel else torch.contiguous_format
    ref, fused = _norm_blocks(16, 4, True, True)
    with pytest.warns(UserWarning, match=f"could not build {kernel}.*PyTorch path"):
        _tail_matches_reference(ref, fused, (3, 16, 5, 6), fmt)
    _tail_matches_reference(ref, fused, (3, 16, 5, 6), fmt)
    assert len(attempts) == 1


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_in_kernels_half_maps(dtype):
    # Half conv outputs with float32 BN parameters and statistics (autocast's case): only
    # the maps' rounding differs from the float64 reference.
    ref, fused = _norm_blocks(16, 4, True, True)
    x = (torch.randn(3, 16, 5, 6) * 2 + 3).to(DEVICE, memory_format=torch.channels_last)
    dy = torch.randn(3, 16, 5, 6).to(DEVICE, memory_format=torch.channels_last)
    got, expect = _norm_grads(ref, fused, x, dy, dtype)
    assert got[0].dtype == got[1].dtype == dtype
    for a, b in zip(got, expect):
        assert torch.isfinite(a).all()
        assert_close(a.double(), b, rtol=2e-2, atol=2e-2)


@needs_kernels
def test_tile_too_large_falls_back_with_notice():
    # 8 channels per group x 96*96 positions pads to 8 x 16384: over MAX_TILE.
    ref, fused = _pair(16, 2)
    x = torch.randn(1, 16, 96, 96, device=DEVICE)
    fused_triton._noticed.clear()
    with pytest.warns(UserWarning, match="PyTorch path"):
        assert not fused_triton.applies(x, 2)
    with torch.no_grad():
        assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)
