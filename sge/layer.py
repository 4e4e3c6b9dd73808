"""The reference Spatial Group-wise Enhance layer: readable, exactly the paper's formula.

Li, Hu, Yang, "Spatial Group-wise Enhance" (arXiv 1905.09646, ACCV 2022), Sec. 3.
For each sample and each of G groups of consecutive channels:

    g     = spatial mean of the group's feature map          (C/G values)
    c     = <g, x(i)> at every position i                     (H*W values)
    c_hat = (c - mean(c)) / (std_unbiased(c) + 1e-5)          (eps on the std, not the var)
    a     = gamma * c_hat + beta                              (gamma=0, beta=1 at init)
    out   = x * sigmoid(a)                                    (broadcast over the group)

The fast implementation lives in ``sge/fused.py``; this one stays the specification.
"""
from __future__ import annotations

import torch
from torch import nn

EPS = 1e-5


def check_groups(channels: int, groups: int) -> None:
    """Raise a ValueError naming both numbers when ``groups`` cannot split ``channels``."""
    if groups < 1 or channels % groups != 0:
        raise ValueError(
            f"SGE groups={groups} must be a positive divisor of channels={channels}")


def sge_gate_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    groups: int) -> torch.Tensor:
    """Return ``a = gamma * c_hat + beta`` with shape (N, G, H, W), computed in float32 or wider.

    Half-precision inputs are promoted: the dot product over C/G channels and the variance
    over H*W positions overflow float16 on real activations.
    """
    n, c, h, w = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    xg = x.to(dtype).reshape(n, groups, c // groups, h * w)
    g = xg.mean(dim=3, keepdim=True)                        # (N, G, C/G, 1)
    dots = (xg * g).sum(dim=2)                              # (N, G, H*W)
    centered = dots - dots.mean(dim=2, keepdim=True)
    # Unbiased variance. With H*W == 1 (or a constant map) the centered values are exactly 0:
    # c_hat is then 0, where torch.std would give NaN. The clamp to the smallest normal
    # number only keeps sqrt's gradient finite there; any real variance is far above it.
    dof = max(h * w - 1, 1)
    var = centered.square().sum(dim=2, keepdim=True) / dof
    std = var.clamp_min(torch.finfo(dtype).tiny).sqrt()
    c_hat = centered / (std + EPS)
    a = c_hat.reshape(n, groups, h, w) * weight.to(dtype) + bias.to(dtype)
    return a


class SpatialGroupEnhance(nn.Module):
    """SGE attention for a (N, C, H, W) feature map; ``groups`` must divide ``channels``.

    Parameters are stored as the released checkpoints store them: ``weight`` (gamma) and
    ``bias`` (beta), each of shape (1, G, 1, 1).
    """

    def __init__(self, channels: int, groups: int = 64, device=None, dtype=None):
        super().__init__()
        check_groups(channels, groups)
        self.channels = channels
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if c != self.channels:
            raise ValueError(f"SGE built for {self.channels} channels got {c}")
        gate = torch.sigmoid(sge_gate_logits(x, self.weight, self.bias, self.groups))
        out = x.reshape(n, self.groups, c // self.groups, h, w) * gate.unsqueeze(2).to(x.dtype)
        return out.reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"
