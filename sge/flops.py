"""Multiply-add counts of a model, in the two conventions users compare.

- ``conv_linear_macs``: conv and linear multiply-adds only, from ``torch.utils.flop_counter``
  (its total counts a multiply-add as 2 FLOPs, so we halve it). 4.089 G for R50 and SGE-R50.
- ``paper_macs``: the convention of the paper's table (the one the ptflops package follows):
  conv and linear multiply-adds plus one operation per output element of ReLU, two per
  element of an affine BatchNorm, one per input element of every pooling -- including the
  global average pooling inside each SGE module (it is what lifts SGE-R50 from 4.122 to
  4.127 G in the paper). The sigmoid and SGE's other elementwise work are not counted, as in
  the paper's counter. There is no library that counts this way, hence the hooks below. A
  fused SGE that also runs its block's ReLU (``residual=``, ``models/resnet.py``) counts
  that ReLU, so both SGE implementations count the same.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _is_sge(module: nn.Module) -> bool:
    return type(module).__name__.endswith("SpatialGroupEnhance")


def _paper_ops(module: nn.Module, inputs, kwargs, output) -> int:
    x = inputs[0]
    if isinstance(module, nn.Conv2d):
        per_position = module.kernel_size[0] * module.kernel_size[1] * \
            module.in_channels // module.groups
        ops = output.numel() * per_position
        return ops + (output.numel() if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        return x.numel() * module.out_features + \
            (output.numel() if module.bias is not None else 0)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return x.numel() * (2 if module.affine else 1)
    if isinstance(module, (nn.ReLU, nn.ReLU6)):
        return output.numel()
    if _is_sge(module):  # its per-group spatial average pooling (+ the block's ReLU)
        return x.numel() + (output.numel() if kwargs.get("residual") is not None else 0)
    if isinstance(module, _POOLS):
        return x.numel()
    return 0


@torch.no_grad()
def paper_macs(model: nn.Module, img_size: int = 224) -> int:
    """Multiply-adds for one image, counted as the paper's table counts them."""
    total = 0

    def hook(module, inputs, kwargs, output):
        nonlocal total
        total += _paper_ops(module, inputs, kwargs, output)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()
               if not list(m.children()) or _is_sge(m)]
    try:
        model.eval()(torch.zeros(1, 3, img_size, img_size))
    finally:
        for handle in handles:
            handle.remove()
    return total


@torch.no_grad()
def conv_linear_macs(model: nn.Module, img_size: int = 224) -> int:
    """Conv/linear multiply-adds for one image, from torch.utils.flop_counter."""
    counter = FlopCounterMode(display=False)
    with counter:
        model.eval()(torch.zeros(1, 3, img_size, img_size))
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
