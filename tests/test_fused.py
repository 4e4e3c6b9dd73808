"""The fused SGE (sge/fused.py) against the reference layer and the reference model.

The reference ``SpatialGroupEnhance`` (plain autograd through the paper's formula) is the
independent oracle; H*W == 1 is also checked against the closed form y = x * sigmoid(beta).
"""
import pytest
import torch
from torch import nn
from torch.testing import assert_close

import models
from sge import SpatialGroupEnhance, fused_cpu
from sge.fused import DeferredBatchNorm2d, FusedSpatialGroupEnhance

# (N, C, H, W, G): odd sizes, H*W == 1, one channel per group, a large batch.
SHAPES = [(2, 16, 5, 7, 4), (3, 8, 1, 1, 2), (1, 12, 3, 1, 3), (2, 6, 1, 9, 6),
          (67, 8, 3, 2, 4), (2, 32, 7, 7, 8)]
NARROW = dict(channels=(8, 16, 32, 64), groups=4, num_classes=10)
# The same checks on a CUDA GPU when there is one (CI has none; a GPU machine runs them all).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _pair(c, g, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ref = SpatialGroupEnhance(c, g).to(dtype)
    with torch.no_grad():  # non-trivial gamma/beta (gamma=0 at init would hide the path)
        ref.weight.copy_(torch.randn(ref.weight.shape, generator=gen, dtype=dtype))
        ref.bias.copy_(torch.randn(ref.bias.shape, generator=gen, dtype=dtype))
    fused = FusedSpatialGroupEnhance(c, g).to(dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _run(module, x, dy):
    x = x.detach().requires_grad_()
    y = module(x)
    grads = torch.autograd.grad(y, [x, module.weight, module.bias], dy)
    return (y, *grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_matches_reference(shape, dtype, device):
    n, c, h, w, g = shape
    ref, fused = (m.to(device) for m in _pair(c, g, dtype))
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(n, c, h, w, generator=gen, dtype=dtype) * 2 + 0.5).to(device)
    dy = torch.randn(n, c, h, w, generator=gen, dtype=dtype).to(device)
    tol = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for a, b in zip(_run(fused, x, dy), _run(ref, x, dy)):
        assert torch.isfinite(a).all()
        assert_close(a, b, **tol)


def test_single_position_is_closed_form():
    # H*W == 1: c - mean(c) == 0, so c_hat = 0 and y = x * sigmoid(beta), whatever gamma.
    _, fused = _pair(8, 4, torch.float64)
    x = torch.randn(5, 8, 1, 1, dtype=torch.float64)
    dy = torch.randn_like(x)
    y, dx, dgamma, dbeta = _run(fused, x, dy)
    s = torch.sigmoid(fused.bias.detach()).repeat_interleave(2, dim=1)
    assert_close(y, x * s)
    assert_close(dx, dy * s)
    assert_close(dgamma, torch.zeros_like(dgamma))
    expect = (dy * x * s * (1 - s)).reshape(5, 4, 2).sum((0, 2)).view(1, 4, 1, 1)
    assert_close(dbeta, expect)


def _bound(c=6, g=3, training=True):
    """A BatchNorm2d + fused SGE pair in float64, with non-trivial BN parameters."""
    block = nn.Module()
    block.bn = nn.BatchNorm2d(c).double()
    block.se = FusedSpatialGroupEnhance(c, g).double()
    with torch.no_grad():
        for p in (block.bn.weight, block.bn.bias, block.se.weight, block.se.bias,
                  block.bn.running_mean):
            p.copy_(torch.randn_like(p))
        block.bn.running_var.uniform_(0.5, 2.0)
    block.se.defer_norm(block, "bn")
    return block.train(training)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(training):
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    _, solo = _pair(6, 3, torch.float64)
    assert torch.autograd.gradcheck(solo, (x,))
    block = _bound(training=training)
    params = (block.bn.weight, block.bn.bias, block.se.weight, block.se.bias)

    def fn(x, *_params):  # gradcheck perturbs the parameters in place: the module sees it
        return block.se(block.bn(x))
    assert torch.autograd.gradcheck(fn, (x, *params))
    # The block's whole tail, relu(SGE(BN(x)) + residual): ReLU's kink is met with
    # probability 0 by these random values.
    residual = torch.randn_like(x, requires_grad=True)

    def tail(x, residual, *_params):
        return block.se(block.bn(x), residual=residual)
    assert torch.autograd.gradcheck(tail, (x, residual, *params))


def _models(dtype=torch.float64):
    torch.manual_seed(0)
    ref = models.create_model("sge_resnet18", sge_impl="reference", **NARROW).to(dtype)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("se.weight", "se.bias")):
                p.copy_(torch.randn_like(p))
    fused = models.create_model("sge_resnet18", sge_impl="fused", **NARROW).to(dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _train_step(model, x, labels):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = model(x)
    nn.functional.cross_entropy(out, labels).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return out, grads


@pytest.mark.parametrize("device", DEVICES)
def test_model_train_step_matches_reference(device):
    ref, fused = (m.to(device) for m in _models())
    assert list(ref.state_dict()) == list(fused.state_dict())  # checkpoint keys unchanged
    assert isinstance(fused.layer1[0].bn2, DeferredBatchNorm2d)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64).to(device)
    labels = torch.randint(0, 10, (4,)).to(device)
    out_r, grads_r = _train_step(ref, x, labels)
    folded = _count_folded_tails(fused)
    out_f, grads_f = _train_step(fused, x, labels)
    assert folded == [True] * 8  # every block's SGE did its add and ReLU too
    assert_close(out_f, out_r)
    for name in grads_r:
        assert_close(grads_f[name], grads_r[name], msg=name)
    # BN running statistics updated exactly once, like the reference; parameters equal.
    state_r, state_f = ref.state_dict(), fused.state_dict()
    for key in state_r:
        assert_close(state_f[key], state_r[key], msg=key)
    assert int(state_f["layer1.0.bn2.num_batches_tracked"]) == 1
    # Eval mode uses the running statistics.
    ref.eval()
    fused.eval()
    assert_close(fused(x), ref(x))


def _count_folded_tails(model) -> list:
    """A list that fills, per SGE call, with whether the call got the block's residual."""
    seen = []
    for block in model.modules():
        if isinstance(block, FusedSpatialGroupEnhance):
            block.register_forward_pre_hook(
                lambda _m, _args, kwargs: seen.append(kwargs.get("residual") is not None),
                with_kwargs=True)
    return seen


def test_drop_path_blocks_keep_timm_tail():
    # With drop path the residual add is not SGE's to do: those blocks run timm's forward.
    torch.manual_seed(0)
    kw = dict(NARROW, drop_path_rate=0.2)
    ref = models.create_model("sge_resnet18", sge_impl="reference", **kw).double().eval()
    fused = models.create_model("sge_resnet18", sge_impl="fused", **kw).double().eval()
    fused.load_state_dict(ref.state_dict())
    folded = _count_folded_tails(fused)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_close(fused(x), ref(x))
    assert folded == [True] + [False] * 7  # only the first block has no drop path (rate 0)


def test_residual_shape_is_checked():
    with pytest.raises(ValueError, match="residual has shape"):
        FusedSpatialGroupEnhance(16, 4)(torch.randn(2, 16, 3, 3), residual=torch.randn(2, 16, 3))


def test_replaced_norm_falls_back():
    # E.g. SyncBatchNorm.convert_sync_batchnorm swaps the deferred BN for a real one: the
    # block then applies it and SGE must not apply it a second time.
    ref, fused = _models()
    block = fused.layer2[1]
    plain = nn.BatchNorm2d(block.bn2.num_features).double()
    plain.load_state_dict(block.bn2.state_dict())
    block.bn2 = plain
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_close(fused(x), ref(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_autocast_close_to_float32(amp, device):
    ref, fused = (m.to(device) for m in _models(torch.float32))
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        expect = ref(x)
    try:  # only the reference may skip: an error of the fused model is a failure
        with torch.autocast(device, dtype=amp), torch.no_grad():
            out_ref = ref(x)
    except RuntimeError as err:  # fp16 autocast on CPU needs a recent oneDNN
        pytest.skip(f"{amp} autocast unsupported on this CPU build: {err}")
    with torch.autocast(device, dtype=amp):
        out = fused(x)
    out.float().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters())
    # Half-precision convs alone move these logits by ~0.4 (bf16): no worse than the reference.
    ref_err = (out_ref.float() - expect).abs().max()
    assert (out.float() - expect).abs().max() <= 1.5 * ref_err + 0.02
    # The layer itself: statistics in float32, so only the output rounding differs.
    _, layer = _pair(16, 4, torch.float32)
    layer = layer.to(device)
    x16 = (torch.randn(3, 16, 6, 5, device=device) * 3).to(amp)
    with torch.autocast(device, dtype=amp):
        y16 = layer(x16)
    assert y16.dtype == amp
    assert_close(y16.float(), layer(x16.float()), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last(device):
    ref, fused = (m.to(device) for m in _models())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, device=device)
    fused = fused.to(memory_format=torch.channels_last)
    x_cl = x.clone().requires_grad_()
    out = fused(x_cl.contiguous(memory_format=torch.channels_last))
    assert_close(out, ref(x))
    sge = FusedSpatialGroupEnhance(16, 4).double().to(device)
    y = sge(torch.randn(2, 16, 5, 5, dtype=torch.float64, device=device)
            .to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    out.sum().backward()
    assert torch.isfinite(x_cl.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_train_step_never_waits_for_the_gpu(channels_last):
    """A fused SGE-ResNet50's bf16 train step (forward, backward, SGD) makes no call that
    waits for the GPU (``.item()``, a copy from pageable memory, ``nonzero``, ...): with
    one per step the host could not queue work ahead, and the GPU would idle wherever the
    host is the slower (the H200's fused step idled 12.5 ms of 44.5; docs/benchmarks.md,
    "Fourth GPU session"). PyTorch's sync debug mode raises at such a call, naming it. The
    first step (Triton's and cuDNN's first calls) runs before the check."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = models.create_model("sge_resnet50", channels=(8, 16, 32, 64), groups=4,
                                num_classes=10).cuda().to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=fmt)
    labels = torch.randint(0, 10, (8,), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        return loss

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


def _compiled_matches_reference(x, **compile_kwargs):
    """The fused model under ``torch.compile(**compile_kwargs)`` against the eager reference
    model: output and every parameter's gradient, float64."""
    ref, fused = _models()
    out = torch.compile(fused, **compile_kwargs)(x)
    out.sum().backward()
    out_ref = ref(x)
    out_ref.sum().backward()
    assert_close(out, out_ref)
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        assert_close(q.grad, p.grad, msg=name)
    for (name, b), c in zip(ref.named_buffers(), fused.buffers()):  # BN's running statistics
        assert_close(c, b, msg=name)


def test_traces_as_one_graph():
    # fullgraph: no graph break; aot_eager runs AOTAutograd on the custom ops (no codegen).
    _compiled_matches_reference(torch.randn(2, 3, 32, 32, dtype=torch.float64),
                                backend="aot_eager", fullgraph=True)


def test_eager_calls_skip_the_custom_op_layer(monkeypatch):
    # Eager calls run the ops' code through an autograd.Function: through the custom-op
    # layer, with autograd, a call cost 41 us of host time against 6.5 (a do-nothing op, on
    # a CPU), and the late stages of eager GPU training wait on the host. Where the C++
    # kernels run, the node is theirs (no Python in the forward's node or its backward).
    # torch.compile still sees the opaque ops.
    block = _bound(training=True)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    node = block.se(block.bn(x)).grad_fn
    if fused_cpu.applies(x):
        assert node.name() == "torch::autograd::CppNode<(anonymous namespace)::Tail>"
        monkeypatch.setattr(fused_cpu, "ENABLED", False)
        node = block.se(block.bn(x)).grad_fn
    assert type(node).__name__ == "_EagerFusedBackward"
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm
    torch.compile(lambda x: block.se(block.bn(x)), backend=backend, fullgraph=True)(x)
    assert any("sge.fused_forward" in t for t in seen), seen


def test_inductor_compiles_the_model(monkeypatch, tmp_path):
    # Whole-model Inductor, its CPU code generation included; float64, so that Inductor's
    # reordered sums stay far inside the tolerance (in float32 they move this tiny net's
    # gradients by ~1e-3 relative, without SGE too). The input is NCHW, but Inductor lays
    # CPU convolutions out channels_last: the ops still get and return the strides they
    # promise.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # no stale cached graph
    seen, stats = [], []
    if fused_cpu.applies(torch.zeros(1, 1, 1, 1)):
        real, real_stats = fused_cpu.forward, fused_cpu.batch_stats

        def spy(z, bn, weight, bias, groups, keep, residual, zmean, out=None,
                residual_bn=None):
            seen.append((z.is_contiguous(memory_format=torch.channels_last),
                         residual is not None, zmean is not None, residual_bn is None))
            return real(z, bn, weight, bias, groups, keep, residual, zmean, out, residual_bn)

        def stats_spy(z, *args):
            stats.append(z.is_contiguous(memory_format=torch.channels_last))
            return real_stats(z, *args)
        monkeypatch.setattr(fused_cpu, "forward", spy)
        monkeypatch.setattr(fused_cpu, "batch_stats", stats_spy)
    _compiled_matches_reference(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    # With the C++ kernels, every block's op got Inductor's channels_last maps as they are
    # (no copies to NCHW around it) and did the block's residual add and ReLU; BN's batch
    # statistics were the kernel's too (sge::batch_stats, saved for the backward), with the
    # per-sample channel means the forward then skips computing. A downsampling shortcut's
    # BN stays Inductor's (the op applies it only in eager calls).
    assert seen == [] or seen == [(True, True, True, True)] * 8
    assert stats == [True] * len(seen)


def test_inductor_compiles_the_residual_tail(monkeypatch, tmp_path):
    # The op with a residual under compile alone (on GPUs the models fold it only in eager
    # mode): output and gradients (input, residual, BN's and SGE's parameters) equal to
    # eager, with channels_last inputs (the op's outputs keep the strides its fake promises).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    block = _bound(8, 4)
    params = list(block.parameters())
    x, residual, dy = (torch.randn(3, 8, 5, 6, dtype=torch.float64)
                       .contiguous(memory_format=torch.channels_last) for _ in range(3))

    def tail(x, residual):
        return block.se(block.bn(x), residual=residual)
    results = []
    for fn in (tail, torch.compile(tail, fullgraph=True)):
        xi, ri = x.clone().requires_grad_(), residual.clone().requires_grad_()
        y = fn(xi, ri)
        results.append((y, *torch.autograd.grad(y, [xi, ri, *params], dy)))
    for a, b in zip(*results):
        assert_close(a, b)


def test_inductor_compiles_on_the_pytorch_path(monkeypatch, tmp_path):
    # Without the C++ kernels (no compiler), the PyTorch path under compile: its outputs keep
    # the strides the fakes promise for the layouts Inductor passes (64 px: an NCHW dy at the
    # last stage beside channels_last maps).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fused_cpu, "ENABLED", False)
    _compiled_matches_reference(torch.randn(2, 3, 64, 64, dtype=torch.float64))


def test_inductor_compiles_under_cpu_autocast(monkeypatch, tmp_path):
    # bf16 autocast under compile on CPU: half maps take the ops' PyTorch path, whose outputs
    # must have the strides the fakes promise for every layout Inductor passes (at 64 px the
    # head's average-pool backward gives the last stage an NCHW dy beside channels_last
    # maps; the residual's gradient once came back channels_last there).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    ref, fused = _models(torch.float32)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expect = ref(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.compile(fused)(x)
    out.float().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters())
    assert (out.float() - expect).abs().max() <= 0.1 * expect.abs().max() + 0.05


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="groups=5"):
        FusedSpatialGroupEnhance(16, 5)
    with pytest.raises(ValueError, match="16 channels got 8"):
        FusedSpatialGroupEnhance(16, 4)(torch.randn(1, 8, 2, 2))
    block = nn.Module()
    block.norm = nn.GroupNorm(2, 16)
    with pytest.raises(ValueError, match="BatchNorm2d"):
        FusedSpatialGroupEnhance(16, 4).defer_norm(block, "norm")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("per_chunk", [1, 2])
def test_cpu_chunks_match_reference(monkeypatch, training, per_chunk):
    # On CPU the op goes through the batch a few samples at a time (cache-sized chunks;
    # ResNet-sized maps split, these tiny ones would not): a batch of 5 in chunks of 1, or 2
    # with a remainder, must still give BN + reference SGE's output, gradients and stats.
    import sge.fused as fused_mod
    n, c, g, h, w = 5, 6, 3, 4, 3
    monkeypatch.setattr(fused_mod, "_CPU_CHUNK_BYTES", per_chunk * c * h * w * 8)
    block = _bound(c, g, training)
    bn = nn.BatchNorm2d(c).double()
    bn.load_state_dict(block.bn.state_dict())
    ref = SpatialGroupEnhance(c, g).double()
    ref.load_state_dict(block.se.state_dict())
    bn.train(training)
    x = torch.randn(n, c, h, w, dtype=torch.float64) * 2 + 0.5
    dy = torch.randn_like(x)
    results = []
    for norm, sge in ((block.bn, block.se), (bn, ref)):
        xi = x.clone().requires_grad_()
        y = sge(norm(xi))
        grads = torch.autograd.grad(y, [xi, norm.weight, norm.bias, sge.weight, sge.bias], dy)
        results.append((y, *grads, norm.running_mean.clone(), norm.running_var.clone()))
        with torch.no_grad():  # inference keeps no statistics: same output
            assert_close(sge(norm(x)), y.detach())
    for a, b in zip(*results):
        assert_close(a, b)


def test_half_maps_convert_in_slices(monkeypatch):
    # bfloat16 maps: the products convert a slice at a time to float32 (no full-size float32
    # copy); one matrix per slice must give what one slice for all gives.
    import sge.fused as fused_mod
    _, layer = _pair(16, 4, torch.float32)
    x = (torch.randn(3, 16, 6, 5) * 3).to(torch.bfloat16)
    dy = torch.randn_like(x)
    whole = _run(layer, x, dy)
    monkeypatch.setattr(fused_mod, "_CONVERT", 1)
    for a, b in zip(_run(layer, x, dy), whole):
        assert_close(a, b)
