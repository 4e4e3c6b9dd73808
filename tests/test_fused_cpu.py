"""The C++ CPU kernels of the fused SGE (sge/fused_cpu.py) against the reference layer and
BatchNorm2d + reference; the PyTorch path they replace on CPU is kept covered here too (the
kernels switched off, and a failed build)."""
import copy
import shutil
import warnings

import pytest
import torch
import torch.utils.checkpoint
from torch import nn
from torch.testing import assert_close

import models
from models import resnet
from sge import SpatialGroupEnhance, fused_cpu
from sge import fused as fused_mod
from sge.fused import FusedSpatialGroupEnhance
from tests import test_fused

# (N, C, H, W, G): odd sizes, H*W == 1, one channel per group, a large batch.
SHAPES = [(2, 16, 5, 7, 4), (3, 8, 1, 1, 2), (1, 12, 3, 1, 3), (2, 6, 1, 9, 6),
          (67, 8, 3, 2, 4), (2, 32, 7, 7, 8), (2, 8, 1, 13, 8)]
HAS_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None


def _tol(dtype):
    return {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


@pytest.fixture
def tail_backwards():
    """``tail_backwards()``: for each backward of the C++ tail node (eager training's op)
    since the test began, whether it wrote over its incoming gradient
    (``fused_cpu.grad_reuse``) and whether it did the residual BN's backward."""
    seen = []

    def log():
        if HAS_COMPILER:
            seen.extend(fused_cpu.tail_backwards(True))
        return seen
    log()
    yield log
    if HAS_COMPILER:
        fused_cpu.tail_backwards(False)


@pytest.fixture
def over_dy(tail_backwards):
    """``over_dy()``: whether each tail backward since the test began wrote over dy."""
    return lambda: [over for over, _ in tail_backwards()]


class _Calls:
    """The kernels' calls by name: forward (from Python or a tail node's), backward (from
    Python, or a tail node's, read from its log)."""

    def __init__(self, forwards, backwards, tail_log):
        self.forwards, self.backwards, self.tail_log = forwards, backwards, tail_log

    def __getitem__(self, name):
        if name == "forward":
            return len(self.forwards)
        return len(self.backwards) + len(self.tail_log())


@pytest.fixture
def calls(kernel_forwards, kernel_backwards, tail_backwards):
    """Counts the kernels' calls, so a test can tell they ran (not the PyTorch path)."""
    return _Calls(kernel_forwards, kernel_backwards, tail_backwards)


@pytest.fixture
def pytorch_path(monkeypatch):
    monkeypatch.setattr(fused_cpu, "ENABLED", False)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the PyTorch path is used")
def test_kernels_build():
    assert fused_cpu.applies(torch.zeros(1, 2, 1, 1))
    assert not fused_cpu.applies(torch.zeros(1, 2, 1, 1, dtype=torch.bfloat16))
    # Built for this CPU's vector level, in that level's own folder (never another's code).
    isa = torch.backends.cpu.get_cpu_capability()
    assert (fused_cpu._CACHE / f"sge_cpu_{isa.lower()}" / "sge_cpu.so").is_file()


def _layer_case(shape, dtype, channels_last):
    n, c, h, w, g = shape
    ref, fused = test_fused._pair(c, g, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype) * 2 + 0.5
    dy = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    if channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    return ref, fused, x, dy


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_matches_reference(shape, dtype, channels_last, calls):
    ref, fused, x, dy = _layer_case(shape, dtype, channels_last)
    out = test_fused._run(fused, x, dy)
    for a, b in zip(out, test_fused._run(ref, x, dy)):
        assert torch.isfinite(a).all()
        assert_close(a, b, **_tol(dtype))
    if channels_last:
        assert out[0].is_contiguous(memory_format=torch.channels_last)
    if HAS_COMPILER:  # the kernels ran, not the PyTorch path
        assert calls["forward"] == 1 and calls["backward"] == 1


def _bn_pair(c, g, dtype, training, affine=True):
    """(BatchNorm2d + fused SGE deferring to it, BatchNorm2d + reference SGE), equal."""
    gen = torch.Generator().manual_seed(2)
    bn = nn.BatchNorm2d(c, affine=affine).to(dtype)
    ref = SpatialGroupEnhance(c, g).to(dtype)
    with torch.no_grad():
        for p in (*bn.parameters(), ref.weight, ref.bias, bn.running_mean):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
        bn.running_var.uniform_(0.5, 2.0, generator=gen)
    block = nn.Module()
    block.bn = nn.BatchNorm2d(c, affine=affine).to(dtype)
    block.bn.load_state_dict(bn.state_dict())
    block.se = FusedSpatialGroupEnhance(c, g).to(dtype)
    block.se.load_state_dict(ref.state_dict())
    block.se.defer_norm(block, "bn")
    return (block.bn.train(training), block.se), (bn.train(training), ref)


def _bn_grid(test):
    """Every shape and dtype, train and eval, NCHW and channels_last, affine BN or not."""
    for name, values in (("affine", [True, False]), ("channels_last", [False, True]),
                         ("training", [True, False]), ("shape", SHAPES),
                         ("dtype", [torch.float64, torch.float32])):
        test = pytest.mark.parametrize(name, values)(test)
    return test


@_bn_grid
def test_with_batchnorm_matches_reference(shape, dtype, training, channels_last, affine,
                                          calls):
    n, c, h, w, g = shape
    if training and n == 1 and not affine:
        # Batch statistics of one sample make every channel's spatial mean 0, so SGE's
        # c = <g, x> is rounding noise: ill-conditioned in float32, for the reference too.
        pytest.skip("one sample, batch statistics and no BN affine: c == 0")
    _, _, x, dy = _layer_case(shape, dtype, channels_last)
    results = []
    for norm, sge in _bn_pair(c, g, dtype, training, affine):
        xi = x.clone().requires_grad_()
        y = sge(norm(xi))
        params = [xi, sge.weight, sge.bias] + ([norm.weight, norm.bias] if affine else [])
        grads = torch.autograd.grad(y, params, dy)
        results.append((y, *grads, norm.running_mean.clone(), norm.running_var.clone()))
        with torch.no_grad():  # inference keeps no statistics: same output
            assert_close(sge(norm(x)), y.detach(), **_tol(dtype))
    for a, b in zip(*results):
        assert_close(a, b, **_tol(dtype))
    if HAS_COMPILER:
        assert calls["forward"] == 2 and calls["backward"] == 1


def _tail_results(pair, x, residual, dy, fused):
    """``relu(SGE(BN(x)) + residual)`` by the fused SGE's residual argument, or by the
    reference and plain ops: output, gradients (x, residual, SGE's and BN's parameters),
    running statistics."""
    norm, sge = pair
    xi, ri = x.clone().requires_grad_(), residual.clone().requires_grad_()
    y = sge(norm(xi), residual=ri) if fused else torch.relu(sge(norm(xi)) + ri)
    grads = torch.autograd.grad(y, [xi, ri, sge.weight, sge.bias, *norm.parameters()], dy)
    return y, *grads, norm.running_mean.clone(), norm.running_var.clone()


def _check_tail(shape, dtype, training, calls_expected, calls, channels_last=False):
    n, c, h, w, g = shape
    _, _, x, dy = _layer_case(shape, dtype, channels_last)
    residual = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    if channels_last:
        residual = residual.contiguous(memory_format=torch.channels_last)
    (norm, sge), reference = _bn_pair(c, g, dtype, training)
    got = _tail_results((norm, sge), x, residual, dy, fused=True)
    expect = _tail_results(reference, x, residual, dy, fused=False)
    assert (got[0] == 0).any() and (got[0] > 0).any()  # both sides of the ReLU are taken
    for a, b in zip(got, expect):
        assert_close(a, b, **_tol(dtype))
    if channels_last:  # taken and given back as channels_last (no copies around the op)
        assert all(t.is_contiguous(memory_format=torch.channels_last) for t in got[:3])
    with torch.no_grad():  # inference: no statistics kept, same output
        assert_close(sge(norm(x), residual=residual), got[0].detach(), **_tol(dtype))
    assert calls["forward"] == calls["backward"] * 2 == calls_expected * 2


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_residual_tail_matches_reference(shape, dtype, training, channels_last, calls):
    # The block's tail in one kernel: BN, SGE, the residual add and the ReLU.
    _check_tail(shape, dtype, training, 1 if HAS_COMPILER else 0, calls, channels_last)


@pytest.fixture
def four_threads():
    """More threads than samples: the channels_last kernels cut each sample into strips."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(2, 64, 40, 40, 16), (2, 96, 40, 33, 32),
                                   (2, 256, 12, 10, 64)])
def test_channels_last_strips(shape, calls, four_threads):
    # Larger maps, and a small batch for the threads: a channels_last sample is cut into
    # strips of whole groups, one task each (here 4 channels per group: strips of 16
    # channels; 3 per group: of 48, not a whole number of 8-float vectors; 256 channels:
    # strips of 64, which float32 works on in 512-bit registers), and 1320 positions.
    # float64: equal to the reference; float32: within rounding of the float64 result (BN's
    # sums here run over thousands of values, so elementwise rtol 1e-4 is too tight for
    # either implementation).
    _check_tail(shape, torch.float64, True, 1 if HAS_COMPILER else 0, calls, channels_last=True)
    n, c, h, w, g = shape
    _, _, x, dy = _layer_case(shape, torch.float64, True)
    residual = torch.randn(x.shape, generator=torch.Generator().manual_seed(5),
                           dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    pair, _ = _bn_pair(c, g, torch.float64, training=True)
    args = (x, residual, dy)
    # Copied together (the SGE refers to its norm) and before the running statistics move.
    pair32 = [m.float() for m in copy.deepcopy(list(pair))]
    truth = _tail_results(pair, *args, fused=True)
    got = _tail_results(pair32, *(t.float() for t in args), fused=True)
    for a, b in zip(got, truth):
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


# Channels per group K: the channels_last kernels sum and expand groups of 4 and of
# multiples of 8 in vector registers, 8 or 4 groups at a time, the rest one by one: K = 4
# with 10 groups (8 + 2), 8 with 9 (4 x 2 + 1), 16 with 4, 32 with 5, and 5 and 2 (none).
@pytest.mark.parametrize("shape", [(2, 40, 6, 5, 10), (3, 72, 4, 5, 9), (2, 64, 5, 3, 4),
                                   (2, 160, 3, 3, 5), (2, 15, 4, 4, 3), (2, 12, 3, 5, 6)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channels_last_group_sizes(shape, dtype, calls):
    _check_tail(shape, dtype, True, 1 if HAS_COMPILER else 0, calls, channels_last=True)


# Rows of whole 64-channel chunks with K = 4, 8, 16 and 32 (64, 16, 8 and 4 groups): on an
# AVX-512 CPU float32 works on them in 512-bit registers (LaneOps), summing and spreading
# the groups' lanes by permutes; float64 and other CPUs through row buffers.
@pytest.mark.parametrize("shape", [(2, 256, 5, 3, 64), (3, 128, 4, 3, 16), (2, 128, 3, 3, 8),
                                   (2, 128, 2, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channels_last_group_lanes(shape, dtype, calls):
    _check_tail(shape, dtype, True, 1 if HAS_COMPILER else 0, calls, channels_last=True)


@pytest.mark.parametrize("channels_last", [False, True])
def test_nan_propagates_as_in_reference(channels_last):
    # A NaN in the map makes its group's statistics NaN: the block's output keeps it through
    # the ReLU (torch.relu keeps NaN), and ReLU's backward passes dy where the output is NaN
    # (threshold_backward zeroes only where y <= 0), in every kernel as in the reference.
    shape = (2, 256, 4, 4, 64)
    _, _, x, dy = _layer_case(shape, torch.float32, channels_last)
    x[1, 9, 2, 3] = float("nan")
    residual = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    residual = residual.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    (norm, sge), reference = _bn_pair(256, 64, torch.float32, training=False)
    got = _tail_results((norm, sge), x, residual, dy, fused=True)
    expect = _tail_results(reference, x, residual, dy, fused=False)
    assert torch.isnan(expect[0][1, 8:12]).all() and not torch.isnan(expect[0][0]).any()
    for a, b in zip(got[:3], expect[:3]):  # output, the map's and the residual's gradients
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        assert_close(a.nan_to_num(), b.nan_to_num(), **_tol(torch.float32))


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the PyTorch path is used")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batch_stats_match_float64(dtype):
    # BN's batch mean and biased variance per channel, NCHW and channels_last, against
    # float64 sums; the offset of 100 (std 3) would cost a float32 E[z^2] - E[z]^2 about
    # 1e-2 relative.
    gen = torch.Generator().manual_seed(3)
    for shape in [(2, 16, 5, 7), (67, 8, 3, 2), (3, 4, 1, 1), (1, 6, 1, 9), (2, 24, 40, 33)]:
        z = torch.randn(shape, generator=gen, dtype=dtype) * 3 + 100
        ref = z.double()
        for layout in (torch.contiguous_format, torch.channels_last):
            mean, var, zmean = fused_cpu.batch_stats(z.contiguous(memory_format=layout))
            assert_close(mean, ref.mean((0, 2, 3)).to(dtype), **_tol(dtype))
            assert_close(var, ref.var((0, 2, 3), correction=0).to(dtype), **_tol(dtype))
            assert_close(zmean, ref.mean((2, 3)).to(dtype), **_tol(dtype))  # per sample


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the PyTorch path is used")
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_as_batchnorm(momentum, monkeypatch):
    # Three training steps: the kernel's statistics update the running ones exactly as
    # nn.BatchNorm2d does (momentum None: cumulative average), once per forward.
    stats_calls = []
    real = fused_cpu.batch_stats
    monkeypatch.setattr(fused_cpu, "batch_stats",
                        lambda *args: stats_calls.append(1) or real(*args))
    (norm, sge), (bn, ref) = _bn_pair(16, 4, torch.float64, training=True)
    norm.momentum = bn.momentum = momentum
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        x = torch.randn(4, 16, 5, 5, generator=gen, dtype=torch.float64) + 2
        assert_close(sge(norm(x)), ref(bn(x)))
    assert len(stats_calls) == 3
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(norm, name), getattr(bn, name), msg=name)


def test_traces_as_one_graph_before_the_kernels_load(monkeypatch):
    # A fresh process may compile before any eager call has loaded the kernels: tracing must
    # not enter their loading (a graph break, an error under fullgraph).
    monkeypatch.setattr(fused_cpu, "_state", {})
    test_fused.test_traces_as_one_graph()


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(training, calls):
    test_fused.test_gradcheck(training)
    assert calls["backward"] > 0 or not HAS_COMPILER


def test_model_train_step(calls):
    test_fused.test_model_train_step_matches_reference("cpu")
    assert calls["backward"] > 0 or not HAS_COMPILER


# The PyTorch path (half-precision maps on CPU, and every map where the kernels cannot be
# built) against the same references.

@pytest.mark.parametrize("shape", SHAPES[:4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pytorch_path_matches_reference(shape, dtype, pytorch_path, calls):
    test_fused.test_layer_matches_reference(shape, dtype, "cpu")
    assert calls["forward"] == calls["backward"] == 0


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("per_chunk", [1, 2])
def test_pytorch_path_chunks(monkeypatch, training, per_chunk, pytorch_path, calls):
    test_fused.test_cpu_chunks_match_reference(monkeypatch, training, per_chunk)
    test_fused.test_gradcheck(training)
    assert calls["forward"] == calls["backward"] == 0


@pytest.mark.parametrize("affine", [True, False])
def test_pytorch_path_with_batchnorm(affine, pytorch_path, calls):
    # Without BN parameters the PyTorch path once returned one empty tensor for both of their
    # gradients, which the custom op refuses (its outputs may not alias each other).
    n, c, h, w, g = SHAPES[0]
    _, _, x, dy = _layer_case(SHAPES[0], torch.float64, False)
    results = []
    for norm, sge in _bn_pair(c, g, torch.float64, True, affine):
        xi = x.clone().requires_grad_()
        y = sge(norm(xi))
        results.append((y, *torch.autograd.grad(y, [xi, sge.weight, sge.bias], dy)))
    for a, b in zip(*results):
        assert_close(a, b)
    assert calls["forward"] == calls["backward"] == 0


@pytest.mark.parametrize("per_chunk", [1, 2, 100])
@pytest.mark.parametrize("training", [True, False])
def test_pytorch_path_residual_tail(monkeypatch, training, per_chunk, pytorch_path, calls):
    # The add and ReLU run per chunk of samples there (a batch of 5: chunks of 1, 2 + a
    # remainder, or one chunk).
    import sge.fused as fused_mod
    n, c, h, w, g = shape = (5, 8, 3, 4, 4)
    monkeypatch.setattr(fused_mod, "_CPU_CHUNK_BYTES", per_chunk * c * h * w * 8)
    _check_tail(shape, torch.float64, training, 0, calls)


def test_failed_build_falls_back_with_one_notice(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'sge_cpu'")
    monkeypatch.setattr(fused_cpu, "_state", {})
    monkeypatch.setattr("torch.utils.cpp_extension.load_inline", broken)
    ref, fused, x, dy = _layer_case(SHAPES[0], torch.float64, False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = test_fused._run(fused, x, dy)
        test_fused._run(fused, x, dy)
    notices = [w for w in caught if "C++ CPU kernels could not be built" in str(w.message)]
    assert len(notices) == 1, [str(w.message) for w in caught]
    assert "PyTorch path" in str(notices[0].message)
    for a, b in zip(out, test_fused._run(ref, x, dy)):
        assert_close(a, b)


@pytest.mark.parametrize("built", [False, True])
def test_first_build_says_so(built, monkeypatch, tmp_path, capsys):
    # The first forward on a CPU builds the kernels (about half a minute, the quickstart's
    # first epoch): one line says so, where nothing was built yet.
    isa = torch.backends.cpu.get_cpu_capability().lower()
    if built:
        (tmp_path / f"sge_cpu_{isa}").mkdir()
        (tmp_path / f"sge_cpu_{isa}" / "sge_cpu.so").touch()
    monkeypatch.setattr(fused_cpu, "_state", {})
    monkeypatch.setattr(fused_cpu, "_CACHE", tmp_path)
    builds = []
    monkeypatch.setattr("torch.utils.cpp_extension.load_inline",
                        lambda *args, **kw: builds.append(kw["build_directory"]))
    fused_cpu._ops()
    assert builds == [str(tmp_path / f"sge_cpu_{isa}")]
    err = capsys.readouterr().err
    assert ("building the fused SGE's C++ CPU kernels, once" in err) != built, err


def test_half_maps_use_pytorch_path(calls):
    _, layer = test_fused._pair(16, 4, torch.float32)
    x = (torch.randn(3, 16, 6, 5) * 3).to(torch.bfloat16)
    assert_close(layer(x).float(), layer(x.float()), rtol=1e-2, atol=1e-2)
    assert calls["forward"] == (1 if HAS_COMPILER else 0)  # the float32 call only


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the PyTorch path is used")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_takes_the_channel_means_of_batch_stats(dtype, channels_last, request):
    # batch_stats' per-sample channel means spare the forward its own pass for them: same
    # outputs as the forward computing them, and the eager module in training passes them.
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for n, c, h, w, g in SHAPES:
        gen = torch.Generator().manual_seed(7)
        z = (torch.randn(n, c, h, w, generator=gen, dtype=dtype) * 3 + 10).contiguous(
            memory_format=layout)
        mean, var, zmean = fused_cpu.batch_stats(z)
        bn = (mean, var, torch.rand(c, generator=gen, dtype=dtype) + 0.5,
              torch.randn(c, generator=gen, dtype=dtype), 1e-5)
        weight, bias = (torch.randn(1, g, 1, 1, generator=gen, dtype=dtype) for _ in range(2))
        own = fused_cpu.forward(z, bn, weight, bias, g, True)
        given = fused_cpu.forward(z, bn, weight, bias, g, True, None, zmean)
        for a, b in zip(given, own):
            assert_close(a, b, **_tol(dtype))
        if h * w > 1:  # the means are used, not recomputed: wrong ones change the output
            assert not torch.allclose(
                fused_cpu.forward(z, bn, weight, bias, g, True, None, zmean + 1)[0], own[0])
    forwards = request.getfixturevalue("kernel_forwards")  # from here on
    n, c, h, w, g = SHAPES[0]
    for training in (True, False):
        norm, sge = _bn_pair(c, g, dtype, training)[0]
        sge(norm(torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=layout)))
    # The running statistics in eval mode come without them.
    assert [f["zmean"] is not None for f in forwards] == [True, False]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nchw_gradient_of_a_channels_last_block(dtype, calls):
    # In a channels_last model the head's pooling hands the last stage an NCHW gradient.
    # The op takes it in the maps' layout: the gradients it gives (input, residual) are
    # channels_last, equal to the reference's.
    n, c, h, w, g = 2, 32, 4, 4, 8
    _, _, x, _ = _layer_case((n, c, h, w, g), dtype, channels_last=True)
    gen = torch.Generator().manual_seed(5)
    residual = torch.randn(x.shape, generator=gen, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=gen, dtype=dtype)
    assert dy.is_contiguous() and not dy.is_contiguous(memory_format=torch.channels_last)
    fused_pair, reference = _bn_pair(c, g, dtype, training=True)
    got = _tail_results(fused_pair, x, residual, dy, fused=True)
    expect = _tail_results(reference, x, residual, dy, fused=False)
    for a, b in zip(got, expect):
        assert_close(a, b, **_tol(dtype))
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in got[1:3])
    assert calls["backward"] == (1 if HAS_COMPILER else 0)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the PyTorch path is used")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inference_writes_over_its_input_when_allowed(dtype, training, channels_last):
    # overwrite_input: without a gradient being recorded the tail is written over its input
    # (the block's conv output): the same numbers, no new tensor. With a gradient being
    # recorded, or without the flag, the input stays as it was.
    n, c, h, w, g = SHAPES[0]
    _, _, z, _ = _layer_case((n, c, h, w, g), dtype, channels_last)
    residual = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    norm, sge = _bn_pair(c, g, dtype, training)[0]
    expect = sge(norm(z), residual=residual).detach()  # the autograd path
    for overwrite, grad in ((False, False), (True, True), (True, False)):
        norm, sge = _bn_pair(c, g, dtype, training)[0]  # fresh running statistics each time
        zi = z.clone()
        with torch.set_grad_enabled(grad):
            y = sge(norm(zi), residual=residual, overwrite_input=overwrite)
        assert_close(y.detach(), expect, rtol=0, atol=0)
        written_over = overwrite and not grad
        assert (y.data_ptr() == zi.data_ptr()) == written_over
        assert torch.equal(zi, y) if written_over else torch.equal(zi, z)
        if channels_last:
            assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the PyTorch path is used")
def test_out_is_checked():
    z = torch.randn(2, 8, 3, 3)
    weight, bias = torch.randn(1, 4, 1, 1), torch.randn(1, 4, 1, 1)
    for bad in (torch.empty(2, 8, 3, 4), torch.empty(2, 8, 3, 3, dtype=torch.float64),
                torch.empty(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)):
        with pytest.raises(RuntimeError, match="out must have the input's shape, type and layout"):
            fused_cpu.forward(z, None, weight, bias, 4, False, out=bad)
    out = torch.empty_like(z)
    y = fused_cpu.forward(z, None, weight, bias, 4, False, out=out)[0]
    assert y is out and torch.equal(out, fused_cpu.forward(z, None, weight, bias, 4, False)[0])


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the PyTorch path is used")
@pytest.mark.parametrize("channels_last", [False, True])
def test_model_inference_overwrites_only_unhooked_conv_outputs(channels_last, monkeypatch,
                                                              kernel_forwards):
    # In a model's inference every SGE block writes its output over its conv output, with the
    # same numbers as with a gradient recorded; a forward hook that may have kept that
    # tensor (on the conv, the deferred BN or the SGE module, or a global one) turns it off
    # for its block and keeps what the hook saw intact.
    model = models.create_model("sge_resnet50", **test_fused.NARROW).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    def outs():
        return [f["out"] is not None for f in kernel_forwards]
    expect = model(x).detach()
    assert len(outs()) == 16 and not any(outs())  # gradient recorded: never
    kernel_forwards.clear()
    with torch.no_grad():
        assert_close(model(x), expect, rtol=0, atol=0)
    assert outs() == [True] * 16
    block = model.layer1[0]

    def conv3_output():
        with torch.no_grad():
            return block.conv3(block.act2(block.bn2(block.conv2(block.act1(block.bn1(
                block.conv1(model.maxpool(model.act1(model.bn1(model.conv1(x)))))))))))

    for module in (block.conv3, block.bn3, block.se):
        kept = []
        handle = module.register_forward_hook(
            lambda m, args, out: kept.append(args[0] if m is block.se else out))
        kernel_forwards.clear()
        with torch.no_grad():
            assert_close(model(x), expect, rtol=0, atol=0)
        handle.remove()
        assert outs() == [False] + [True] * 15
        assert_close(kept[0], conv3_output(), rtol=0, atol=0)
    kept = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, args, out: kept.append(out) if m is block.conv3 else None)
    kernel_forwards.clear()
    with torch.no_grad():
        model(x)
    handle.remove()
    assert not any(outs()) and torch.equal(kept[0], conv3_output())
    # Without the hook check, the hook's tensor would have been written over.
    monkeypatch.setattr(resnet, "_may_overwrite", lambda *m: not torch.is_grad_enabled())
    kept = []
    handle = block.conv3.register_forward_hook(lambda m, args, out: kept.append(out))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert not torch.equal(kept[0], conv3_output())


# A downsampling shortcut's BN (residual_norm): the kernels apply it as they read the
# residual and do its backward too.

def _shortcut_norm(c, dtype, training, affine, seed=7):
    gen = torch.Generator().manual_seed(seed)
    norm = nn.BatchNorm2d(c, affine=affine).to(dtype)
    with torch.no_grad():
        for p in (*norm.parameters(), norm.running_mean):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
        norm.running_var.uniform_(0.5, 2.0, generator=gen)
    return norm.train(training)


def _check_shortcut_norm(shape, dtype, training, channels_last, affine):
    """The fused tail with ``residual_norm`` against BN + reference SGE + BN(residual), add and
    ReLU: output, gradients (x, the residual, SGE's and both BNs' parameters), both BNs'
    running statistics, and the no-grad output."""
    n, c, h, w, g = shape
    _, _, x, dy = _layer_case(shape, dtype, channels_last)
    zr = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=dtype) * 3 + 1
    if channels_last:
        zr = zr.contiguous(memory_format=torch.channels_last)
    results = []
    for fused, ((norm, sge), rnorm) in enumerate(
            [(_bn_pair(c, g, dtype, training)[1], _shortcut_norm(c, dtype, training, affine)),
             (_bn_pair(c, g, dtype, training)[0], _shortcut_norm(c, dtype, training, affine))]):
        xi, ri = x.clone().requires_grad_(), zr.clone().requires_grad_()
        if fused:
            y = sge(norm(xi), residual=ri, residual_norm=rnorm)
        else:
            y = torch.relu(sge(norm(xi)) + rnorm(ri))
        params = [xi, ri, sge.weight, sge.bias, *norm.parameters(), *rnorm.parameters()]
        grads = torch.autograd.grad(y, params, dy)
        stats = [t.clone() for t in (*norm.buffers(), *rnorm.buffers())]
        with torch.no_grad():
            y_infer = sge(norm(x), residual=zr, residual_norm=rnorm) if fused else \
                torch.relu(sge(norm(x)) + rnorm(zr))
        results.append((y, *grads, *stats, y_infer))
        if fused and channels_last:
            assert all(t.is_contiguous(memory_format=torch.channels_last)
                       for t in (y, grads[0], grads[1]))
    got, expect = results[1], results[0]
    assert (got[0] == 0).any() and (got[0] > 0).any()  # both sides of the ReLU are taken
    for a, b in zip(got, expect):
        assert_close(a, b, **_tol(dtype))


@pytest.fixture
def residual_bns(kernel_forwards, kernel_backwards, tail_backwards):
    """Records, per call of the kernels' forward and backward (a tail node's too), whether it
    got the residual's BN."""
    def seen():
        return {"forward": [f["residual_bn"] is not None for f in kernel_forwards],
                "backward": [b["residual_bn"] is not None for b in kernel_backwards]
                + [rbn for _, rbn in tail_backwards()]}
    return seen


@_bn_grid
def test_shortcut_norm_matches_reference(shape, dtype, training, channels_last, affine,
                                         residual_bns):
    _check_shortcut_norm(shape, dtype, training, channels_last, affine)
    # The kernels applied it (forward with a gradient, then without), and did its backward.
    expect = [True] if HAS_COMPILER else []
    assert residual_bns() == {"forward": expect * 2, "backward": expect}


@pytest.mark.parametrize("training", [True, False])
def test_shortcut_norm_on_the_pytorch_path(training, pytorch_path, residual_bns):
    # Without the kernels the module applies the shortcut's BN itself, as a module call.
    _check_shortcut_norm(SHAPES[0], torch.float64, training, False, True)
    assert residual_bns() == {"forward": [], "backward": []}


@pytest.mark.parametrize("training", [True, False])
def test_shortcut_norm_gradcheck(training):
    block = test_fused._bound(training=training)
    rnorm = _shortcut_norm(6, torch.float64, training, True)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    # A residual far from the ReLU's kink at 0 for gradcheck's finite differences.
    zr = (torch.randn(2, 6, 3, 4, dtype=torch.float64) + 4).requires_grad_()
    with torch.no_grad():
        rnorm.weight.uniform_(0.5, 1.0)
        rnorm.bias.fill_(6.0)

    def fn(x, zr, *_params):  # gradcheck perturbs the parameters in place
        return block.se(block.bn(x), residual=zr, residual_norm=rnorm)
    params = (block.se.weight, block.se.bias, rnorm.weight, rnorm.bias)
    assert torch.autograd.gradcheck(fn, (x, zr, *params))


def test_shortcut_norm_is_checked():
    block = test_fused._bound()
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="residual_norm needs a residual of 6 channels"):
        block.se(block.bn(x), residual_norm=nn.BatchNorm2d(6).double())
    with pytest.raises(ValueError, match="residual_norm needs a residual of 6 channels"):
        block.se(block.bn(x), residual=x, residual_norm=nn.BatchNorm2d(5).double())
    if HAS_COMPILER:
        weight, bias = torch.randn(1, 3, 1, 1), torch.randn(1, 3, 1, 1)
        z, stats = torch.randn(2, 6, 3, 4), (torch.zeros(5), torch.ones(5), None, None, 1e-5)
        with pytest.raises(RuntimeError, match="residual's BN needs the residual and its 6"):
            fused_cpu.forward(z, None, weight, bias, 3, False, z, residual_bn=stats)
        with pytest.raises(RuntimeError, match="residual's BN needs the residual and its 6"):
            fused_cpu.forward(z, None, weight, bias, 3, False, residual_bn=stats[:2] * 2 +
                              (1e-5,))


def _train_step_matches_reference(channels_last, before=None):
    """One train step of tests/test_fused.py's reference and fused sge_resnet18 (NCHW or
    channels_last), checked equal (outputs, gradients); ``before(fused)`` may return a hook
    handle, removed after the step. Returns ``(ref, fused, x)``."""
    ref, fused = test_fused._models()
    if channels_last:
        ref, fused = (m.to(memory_format=torch.channels_last) for m in (ref, fused))
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    labels = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(0))
    handle = before(fused) if before is not None else None
    out_r, grads_r = test_fused._train_step(ref, x, labels)
    out_f, grads_f = test_fused._train_step(fused, x, labels)
    if handle is not None:
        handle.remove()
    assert_close(out_f, out_r)
    for name in grads_r:
        assert_close(grads_f[name], grads_r[name], msg=name)
    return ref, fused, x


@pytest.mark.parametrize("channels_last", [False, True])
def test_model_folds_unhooked_shortcut_norms(channels_last, residual_bns, kernel_forwards):
    # In a model's train step each downsampling block's SGE applies the shortcut's BN (4 of
    # ResNet-50's 16 blocks), and the step matches the reference model (outputs, gradients,
    # running statistics: tests/test_fused.py). A forward hook on the shortcut or its BN turns
    # the fold off for that block, and sees the BN's real output.
    kept = []

    def hook(fused):
        return fused.layer2[0].downsample[1].register_forward_hook(
            lambda m, args, out: kept.append(
                (args[0], out, m.weight.detach().clone(), m.bias.detach().clone())))
    ref, fused, x = _train_step_matches_reference(channels_last, before=hook)
    # This sge_resnet18's blocks 0, 2, 4 and 6 (of 0-7) downsample (the stem's 64 channels to
    # 8 in the first); block 2's BN has the hook.
    expect = [i in (0, 4, 6) for i in range(8)] if HAS_COMPILER else []
    assert residual_bns() == {"forward": expect, "backward": expect[::-1]}
    for (key, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        assert_close(b, a, msg=key)  # both BNs' running statistics updated once
    (inp, out, weight, bias), = kept  # (the train step has updated the parameters since)
    assert_close(out, nn.functional.batch_norm(inp, None, None, weight, bias, True))
    kernel_forwards.clear()
    with torch.no_grad():
        assert_close(fused.eval()(x), ref.eval()(x))
    assert residual_bns()["forward"] == ([i in (0, 2, 4, 6) for i in range(8)] if HAS_COMPILER
                                         else [])


# The backward writes its first map gradient (the residual's, else dz) over its incoming
# gradient dy when nothing else holds dy (the C++ tail's grad_reuse).

def _backward_case(dtype, channels_last, residual, seed=3):
    """``(dy, backward args, backward kwargs)`` of a forward with BN in training mode and no
    residual, a residual, or a residual with its own BN ("bn")."""
    n, c, h, w, g = 3, 16, 5, 7, 4
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).contiguous(memory_format=fmt) \
            if len(shape) == 4 else torch.randn(*shape, generator=gen, dtype=dtype)
    z, dy, r = rand(n, c, h, w), rand(n, c, h, w), rand(n, c, h, w)
    weight, bias = rand(1, g, 1, 1), rand(1, g, 1, 1)
    mean, var, zmean = fused_cpu.batch_stats(z)
    bn = (mean, var, rand(c), rand(c), 1e-5)
    rbn = (r.mean((0, 2, 3)), r.var((0, 2, 3)), rand(c), rand(c), 1e-5) if residual == "bn" \
        else None
    res = r if residual else None
    y, chat, sigma, m = fused_cpu.forward(z, bn, weight, bias, g, True, residual=res,
                                          zmean=zmean, residual_bn=rbn)
    return dy, (y if residual else None, z, bn, True, chat, sigma, m, weight, bias), \
        dict(residual=res, residual_bn=rbn, residual_bn_training=True)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the PyTorch path is used")
@pytest.mark.parametrize("residual", [None, "plain", "bn"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_writes_over_dy_when_told(dtype, channels_last, residual):
    dy, args, kw = _backward_case(dtype, channels_last, residual)
    dy_before = dy.clone()
    expect = fused_cpu.backward(dy, *args, **kw)
    assert torch.equal(dy, dy_before)  # without out, dy is only read
    slot = 1 if residual else 0
    assert expect[slot].data_ptr() != dy.data_ptr()
    got = fused_cpu.backward(dy, *args, **kw, out=dy)
    assert got[slot] is dy  # the gradient written over dy, the same numbers to the bit
    for a, b in zip(got, expect):
        assert torch.equal(a, b)
    assert not torch.equal(dy, dy_before)
    # A dy of another dtype is copied, and the kernels write into their copy: dy stays.
    wide = dy_before.to(torch.float64 if dtype == torch.float32 else torch.float32)
    wide_before = wide.clone()
    got = fused_cpu.backward(wide, *args, **kw)
    assert torch.equal(wide, wide_before)
    assert_close(got[slot], expect[slot], **_tol(torch.float32))


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the PyTorch path is used")
def test_backward_out_is_checked():
    dy, args, kw = _backward_case(torch.float32, False, "plain")
    for bad in (torch.empty(3, 16, 5, 6), torch.empty_like(dy, dtype=torch.float64),
                torch.empty_like(dy, memory_format=torch.channels_last)):
        with pytest.raises(RuntimeError, match="out must have dy's shape, type and layout"):
            fused_cpu.backward(dy, *args, **kw, out=bad)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the PyTorch path is used")
def test_kernels_refuse_empty_maps():
    # (The module never hands them one: fused_cpu.applies takes non-empty maps only.) Their
    # per-channel sums are written by the first block of rows, which an empty map lacks.
    empty = torch.zeros(2, 4, 0, 3)
    weight, bias = torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)
    for call in (lambda: fused_cpu.batch_stats(empty),
                 lambda: fused_cpu.forward(empty, None, weight, bias, 2, True)):
        with pytest.raises(RuntimeError, match="takes non-empty 4-d maps"):
            call()


def _tail(dtype=torch.float64, seed=0):
    """A fused tail (BN + fused SGE, residual) with its reference, and an input pair."""
    n, c, h, w, g = SHAPES[0]
    fused, ref = _bn_pair(c, g, dtype, True)
    gen = torch.Generator().manual_seed(seed)
    x, r, weight = (torch.randn(n, c, h, w, generator=gen, dtype=dtype) for _ in range(3))
    return fused, ref, x, r, weight


def _tail_output(pair, x, r, fused):
    """``(y, x, r)``: the tail's output of fresh leaves x and r (the fused op's or the
    reference's)."""
    norm, sge = pair
    xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
    return (sge(norm(xi), residual=ri) if fused else torch.relu(sge(norm(xi)) + ri)), xi, ri


def _tail_grads(pair, x, r, weight, fused, use=None):
    """``(y, grads of x and r)`` of ``sum(tail(x, r) * weight)``: the tail's dy is the
    product's fresh gradient, ``weight``. ``use(y)`` may hold on to y's gradient first."""
    y, xi, ri = _tail_output(pair, x, r, fused)
    if use is not None:
        use(y)
    (y * weight).sum().backward()
    return y, xi.grad, ri.grad


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the PyTorch path is used")
@pytest.mark.parametrize("policy", ["check", "never"])
def test_free_gradient_is_written_over(policy, over_dy, request):
    # The product's gradient reaches the tail's backward held by autograd alone: the residual's
    # gradient is written over it, with the reference's results. "never" (for A/B timing):
    # the same gradients, each from a fresh map.
    assert fused_cpu.grad_reuse(policy)[0] == "check"
    request.addfinalizer(lambda: fused_cpu.grad_reuse("check"))
    fused, ref, x, r, weight = _tail()
    got = _tail_grads(fused, x, r, weight, True)
    expect = _tail_grads(ref, x, r, weight, False)
    assert over_dy() == [policy == "check"]
    for a, b in zip(got, expect):
        assert_close(a, b)


def test_gradient_reuse_policy_is_checked():
    with pytest.raises(ValueError, match="policy must be one of"):
        fused_cpu.grad_reuse("sometimes")


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the PyTorch path is used")
def test_tail_node_under_autocast_keeps_float32(over_dy):
    # A float32 map reaching the tail under CPU autocast (a model part autocast leaves in
    # float32), its backward called there too: the node runs the kernels in float32, bitwise
    # as without autocast.
    fused, _, x, r, weight = _tail(torch.float32)
    plain = _tail_grads(fused, x, r, weight, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the backward inside it too
        y, xi, ri = _tail_output(fused, x, r, True)
        (y * weight).sum().backward()
    assert y.dtype == torch.float32 and over_dy() == [True, True]
    for a, b in zip((y, xi.grad, ri.grad), plain):
        assert torch.equal(a, b)


def _holders():
    """Ways to hold on to the tail's incoming gradient: ``(name, use(y, kept))``, each
    keeping what it saw (the gradient, at the time autograd gave it) in ``kept``."""
    def tensor_hook(y, kept):
        y.register_hook(kept.append)

    def post_hook(y, kept):
        y.grad_fn.register_hook(lambda grad_inputs, grad_outputs: kept.append(grad_outputs[0]))

    def retain_grad(y, kept):
        y.retain_grad()
        kept.append(y)  # y.grad, read after the backward

    return {"tensor_hook": tensor_hook, "post_hook": post_hook, "retain_grad": retain_grad}


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the PyTorch path is used")
@pytest.mark.parametrize("holder", sorted(_holders()))
def test_held_gradient_is_not_written_over(holder, over_dy):
    fused, ref, x, r, weight = _tail()
    kept = []
    got = _tail_grads(fused, x, r, weight, True, use=lambda y: _holders()[holder](y, kept))
    expect = _tail_grads(ref, x, r, weight, False)
    seen = kept[0].grad if holder == "retain_grad" else kept[0]
    assert torch.equal(seen, weight)  # what the holder saw is dy, as it was
    assert over_dy() == [holder == "retain_grad"]  # retain_grad keeps its own copy
    for a, b in zip(got, expect):
        assert_close(a, b)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the PyTorch path is used")
def test_held_gradient_check_is_what_keeps_it(over_dy, request):
    # The same hook, with the policy set to "always": the kept gradient is overwritten
    # with ReLU's gradient (zeros where the tail's output is 0), so the check above is the
    # protection, not an accident of the calls.
    fused_cpu.grad_reuse("always")
    request.addfinalizer(lambda: fused_cpu.grad_reuse("check"))
    fused, _, x, r, weight = _tail()
    kept = []
    y, *_ = _tail_grads(fused, x, r, weight, True, use=lambda y: y.register_hook(kept.append))
    assert over_dy() == [True]
    assert not torch.equal(kept[0], weight)
    assert torch.equal(kept[0], torch.where(y > 0, weight, 0))


def _shared_or_captured():
    """Ways autograd itself shares or keeps the tail's incoming gradient: ``(name,
    grads(y, other, x, r, w))`` with the gradients of a loss whose gradient at y is w (y's
    own where captured)."""
    def views(y, other, x, r, w):  # torch.cat's backward: y's and other's are views of one
        loss = (torch.cat([y, other]) * torch.cat([w, w * 2])).sum()
        return torch.autograd.grad(loss, [other, x, r])

    def captured(y, other, x, r, w):  # torch.autograd.grad keeps y's gradient to return it
        return torch.autograd.grad((y * w).sum(), [y, x, r])

    def create_graph(y, other, x, r, w):  # dy may be part of the new graph
        return torch.autograd.grad((y * w).sum(), [x, r], create_graph=True)
    return {"views": views, "captured": captured, "create_graph": create_graph}


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the PyTorch path is used")
@pytest.mark.parametrize("case", sorted(_shared_or_captured()))
def test_shared_or_captured_gradient_is_not_written_over(case, over_dy):
    fused, ref, x, r, weight = _tail()
    results = []
    for pair, is_fused in ((fused, True), (ref, False)):
        y, xi, ri = _tail_output(pair, x, r, is_fused)
        other = torch.ones_like(y, requires_grad=True)
        results.append(_shared_or_captured()[case](y, other, xi, ri, weight))
    assert over_dy() == [False]
    got, expect = results
    if case == "views":
        assert torch.equal(got[0], weight * 2)  # the other view intact
    if case == "captured":
        assert torch.equal(got[0], weight)  # y's gradient as autograd gave it
    for a, b in zip(got, expect):
        assert_close(a, b)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the PyTorch path is used")
@pytest.mark.parametrize("channels_last", [False, True])
def test_model_writes_over_every_blocks_gradient(channels_last, over_dy):
    # A train step's gradients reach each block's tail held by autograd alone (channels_last:
    # the last block's comes NCHW from the pooling and is copied to channels_last first, the
    # copy its own): every block writes over it, with the reference model's results.
    _train_step_matches_reference(channels_last)
    assert over_dy() == [True] * 8


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the PyTorch path is used")
def test_inference_mode_calls_need_no_calibration():
    # The calibration is a small backward: only taken where a backward is to come.
    fused_cpu.grad_reuse(recalibrate=True)
    n, c, h, w, g = SHAPES[0]
    fused = _tail()[0][1]
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    with torch.inference_mode():
        assert fused(x).shape == x.shape
    assert fused_cpu.grad_reuse() == ("check", None)
    fused(x.requires_grad_()).sum().backward()
    policy, counts = fused_cpu.grad_reuse()
    assert policy == "check" and counts is not None


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the PyTorch path is used")
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_with_gradients_written_over(reentrant, over_dy):
    # Each stage under torch.utils.checkpoint: the gradients equal the reference model's
    # without it. Non-reentrant checkpointing hands every block's gradient over as autograd's
    # own; the reentrant kind passes each stage's last block the gradient it was given
    # (held by its backward), which stays untouched.
    ref, fused = test_fused._models()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    labels = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(0))

    def loss(model, checkpointed):
        y = model.maxpool(model.act1(model.bn1(model.conv1(x))))
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            y = torch.utils.checkpoint.checkpoint(stage, y, use_reentrant=reentrant) \
                if checkpointed else stage(y)
        return nn.functional.cross_entropy(model.forward_head(y), labels)
    loss(ref, False).backward()
    loss(fused, True).backward()
    assert over_dy() == ([False, True] * 4 if reentrant else [True] * 8)
    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        assert_close(b.grad, a.grad, msg=name)
