"""The reference SGE layer against an independent per-group loop (DESIGN.md's formula)."""
import math

import pytest
import torch

from sge import SpatialGroupEnhance


def per_group_loop(x, weight, bias, groups):
    """SGE written from the paper's text, one sample and one group at a time, in float64."""
    x = x.double()
    n, c, h, w = x.shape
    cg = c // groups
    out = torch.empty_like(x)
    for i in range(n):
        for k in range(groups):
            feat = x[i, k * cg:(k + 1) * cg]                 # (C/G, H, W)
            g = feat.mean(dim=(1, 2))                        # (C/G,)
            dots = torch.einsum("c,chw->hw", g, feat).flatten()
            centered = dots - dots.mean()
            std = math.sqrt(float((centered ** 2).sum()) / (h * w - 1)) if h * w > 1 else 0.0
            c_hat = centered / (std + 1e-5)
            a = weight.double()[0, k, 0, 0] * c_hat + bias.double()[0, k, 0, 0]
            out[i, k * cg:(k + 1) * cg] = feat * torch.sigmoid(a).reshape(1, h, w)
    return out


@pytest.mark.parametrize("shape,groups", [
    ((2, 8, 5, 7), 4), ((1, 16, 1, 1), 8), ((3, 12, 1, 6), 3), ((4, 64, 9, 9), 64),
    ((2, 6, 2, 1), 1), ((5, 32, 14, 14), 16),
])
def test_matches_per_group_loop(shape, groups):
    torch.manual_seed(sum(shape) + groups)
    layer = SpatialGroupEnhance(shape[1], groups).double()
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(shape, dtype=torch.float64) * 3
    torch.testing.assert_close(layer(x), per_group_loop(x, layer.weight, layer.bias, groups))


def test_init_output_is_x_times_sigmoid_one():
    layer = SpatialGroupEnhance(32, 8)
    assert torch.equal(layer.weight, torch.zeros(1, 8, 1, 1))
    assert torch.equal(layer.bias, torch.ones(1, 8, 1, 1))
    x = torch.randn(2, 32, 7, 5)
    torch.testing.assert_close(layer(x), x * torch.sigmoid(torch.tensor(1.0)))


def test_gradcheck_float64():
    torch.manual_seed(0)
    layer = SpatialGroupEnhance(8, 4).double()
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    from sge.layer import sge_gate_logits
    assert torch.autograd.gradcheck(lambda t, ww, bb: sge_gate_logits(t, ww, bb, 4),
                                    (x, w, b))


def test_one_by_one_map_is_finite_and_normalizes_to_zero():
    layer = SpatialGroupEnhance(16, 4)
    with torch.no_grad():
        layer.weight.fill_(5.0)
        layer.bias.fill_(-0.5)
    x = torch.randn(3, 16, 1, 1, requires_grad=True)
    y = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, x * torch.sigmoid(torch.tensor(-0.5)))
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()


def test_groups_must_divide_channels():
    with pytest.raises(ValueError, match=r"groups=3.*channels=16"):
        SpatialGroupEnhance(16, 3)
    with pytest.raises(ValueError, match="groups=0"):
        SpatialGroupEnhance(16, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_half_is_finite_and_close(dtype):
    torch.manual_seed(1)
    layer = SpatialGroupEnhance(64, 8)
    with torch.no_grad():
        layer.weight.normal_()
    # Large activations: the dot product over C/G channels overflows float16 if done there.
    x = torch.randn(2, 64, 8, 8) * 60
    ref = layer(x)
    y = layer(x.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(x)
    assert torch.isfinite(z).all()


def test_channels_last_input():
    layer = SpatialGroupEnhance(32, 8)
    with torch.no_grad():
        layer.weight.normal_()
    x = torch.randn(2, 32, 6, 6)
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), layer(x))
