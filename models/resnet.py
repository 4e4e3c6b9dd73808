"""The ResNet family with an attention slot: plain, SGE and SE, all on timm's ResNet.

Paper defaults (DESIGN.md): ResNet v1.5 (stride in the 3x3 conv, timm's default), no
zero-init of the last BN gamma, the attention module after the block's last BN and before
the residual add (timm's ``attn_layer`` slot sits exactly there, stored as ``.se``).
"""
from __future__ import annotations

from functools import partial

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from sge import sge_layer
from sge.fused import FusedSpatialGroupEnhance

DEFAULT_SGE_IMPL = "fused"  # equal to the reference (tests/test_fused.py), cheaper (issue 5)

LAYERS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def _folds_tail(block, x) -> bool:
    """Whether ``block``'s fused SGE also does its residual add and ReLU: in eager mode, and
    under ``torch.compile`` on CPU, where the C++ kernels take Inductor's channels_last maps
    as they are and write the block's output directly. Under compile on GPUs Inductor fuses
    the add and ReLU into one pass of its own; the Triton forward kernel now does them in
    its write too (faster than its former add_ and relu_ in eager mode), but folding them
    there under compile has not been timed on a GPU, so it stays Inductor's."""
    act = block.act3 if isinstance(block, Bottleneck) else block.act2
    return (isinstance(block.se, FusedSpatialGroupEnhance) and block.drop_path is None
            and type(act) is nn.ReLU
            and (not torch.compiler.is_compiling() or x.device.type == "cpu"))


def _unhooked(*modules: nn.Module) -> bool:
    """Whether no forward hook or pre-hook is set on ``modules`` or globally (torch's private
    names: missing means "maybe")."""
    hooks = nn.modules.module
    if getattr(hooks, "_global_forward_hooks", True) or \
            getattr(hooks, "_global_forward_pre_hooks", True):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _may_overwrite(*producers: nn.Module) -> bool:
    """Whether a block may let its fused SGE write the output over its input (the block's
    own temporary, made by ``producers``: the last conv and BN, then the SGE module): only
    when no gradient is being recorded, and when no hook could have kept a reference to that
    tensor."""
    return not torch.is_grad_enabled() and _unhooked(*producers)


def _shortcut(downsample, x):
    """``(shortcut, norm)``: a downsampling shortcut ending in a plain BatchNorm2d (timm's
    ``Sequential(conv, bn)``, with an average pool first in ResNet-D) is run up to that BN,
    which is returned for the fused SGE to apply as it reads the shortcut (its output is
    then never written). Not when a hook on the shortcut or its BN would miss the call."""
    if downsample is None:
        return x, None
    if type(downsample) is not nn.Sequential or len(downsample) < 2 or \
            type(downsample[-1]) is not nn.BatchNorm2d or \
            not _unhooked(downsample, downsample[-1]):
        return downsample(x), None
    for module in list(downsample)[:-1]:
        x = module(x)
    return x, downsample[-1]


class SGEBottleneck(Bottleneck):
    """timm's Bottleneck, whose fused SGE also does the residual add and the ReLU (and a
    downsampling shortcut's BN): the block's output is written in one pass where ResNet
    makes three (BN, add, ReLU). Same modules, keys and outputs; other SGE blocks
    (reference, drop path) run timm's forward."""

    def forward(self, x):
        if not _folds_tail(self, x):
            return super().forward(x)
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        shortcut, norm = _shortcut(self.downsample, shortcut)
        return self.se(x, residual=shortcut, residual_norm=norm,
                       overwrite_input=_may_overwrite(self.conv3, self.bn3, self.se))


class SGEBasicBlock(BasicBlock):
    """timm's BasicBlock with the tail folded as in ``SGEBottleneck``."""

    def forward(self, x):
        if not _folds_tail(self, x):
            return super().forward(x)
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        shortcut, norm = _shortcut(self.downsample, shortcut)
        return self.se(x, residual=shortcut, residual_norm=norm,
                       overwrite_input=_may_overwrite(self.conv2, self.bn2, self.se))


def _cfg(**kwargs):
    # The paper's evaluation: short side 256, center crop 224 (crop_pct 0.875), bilinear.
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1", "classifier": "fc", "license": "apache-2.0", **kwargs,
    }


def _attn_layer(attn: str, groups: int, sge_impl: str):
    if attn == "sge":
        return partial(sge_layer(sge_impl), groups=groups)
    if attn == "se":
        return "se"  # timm's SEModule: reduction 16, the SE-ResNet paper's block
    if attn == "none":
        return None
    raise ValueError(f"unknown attention {attn!r}; expected sge, se or none")


def build_resnet(depth: int, attn: str = "none", groups: int = 64,
                 sge_impl: str = DEFAULT_SGE_IMPL, variant: str | None = None,
                 pretrained: bool = False, **kwargs) -> ResNet:
    """Build a ResNet-``depth`` with ``attn`` in every block's slot.

    ``groups`` and ``sge_impl`` apply to SGE only; other keyword arguments go to timm's
    ``ResNet`` (``num_classes``, ``channels``, ``features_only``, ...).
    """
    if depth not in LAYERS:
        raise ValueError(f"ResNet depth {depth} is not one of {sorted(LAYERS)}")
    if pretrained:
        raise ValueError("no downloadable weights: load a checkpoint with "
                         "sge.checkpoint.load_model_weights(model, path)")
    block, layers = LAYERS[depth]
    if attn == "sge":
        block = SGEBottleneck if block is Bottleneck else SGEBasicBlock
    block_args = dict(kwargs.pop("block_args", None) or {})
    block_args["attn_layer"] = _attn_layer(attn, groups, sge_impl)
    kwargs.setdefault("zero_init_last", False)
    name = variant or (f"{attn}_resnet{depth}" if attn != "none" else f"resnet{depth}")
    # timm.create_model passes the registered cfg; our own registry passes none.
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or _cfg()
    model = build_model_with_cfg(
        ResNet, name, pretrained=False, block=block, layers=layers, block_args=block_args,
        **kwargs)
    if attn == "sge" and sge_impl == "fused":
        _defer_last_norms(model)
    return model


def _defer_last_norms(model) -> None:
    """Let each fused SGE apply the BN right before it (bn3, or bn2 in a basic block).

    That BN's output is what SGE gates; owning it lets SGE's backward recompute it instead
    of keeping a full tensor per block (issue 5). Keys stay ``...bn3.*`` and ``...se.*``.
    """
    for block in model.modules():
        if isinstance(block, (BasicBlock, Bottleneck)) and block.se is not None:
            block.se.defer_norm(block, "bn3" if isinstance(block, Bottleneck) else "bn2")


# Registered in timm's registry too (complete pretrained cfgs): sge_* and se_* only.
# Plain resnet* stay in our registry so importing us never shadows timm's own models.
default_cfgs = generate_default_cfgs({
    f"{attn}_resnet{depth}.paper": _cfg()
    for attn, depths in (("sge", (18, 34, 50, 101, 152)), ("se", (50, 101)))
    for depth in depths
})


@register_model
def sge_resnet18(pretrained=False, **kwargs):
    return build_resnet(18, "sge", variant="sge_resnet18", pretrained=pretrained, **kwargs)


@register_model
def sge_resnet34(pretrained=False, **kwargs):
    return build_resnet(34, "sge", variant="sge_resnet34", pretrained=pretrained, **kwargs)


@register_model
def sge_resnet50(pretrained=False, **kwargs):
    return build_resnet(50, "sge", variant="sge_resnet50", pretrained=pretrained, **kwargs)


@register_model
def sge_resnet101(pretrained=False, **kwargs):
    return build_resnet(101, "sge", variant="sge_resnet101", pretrained=pretrained, **kwargs)


@register_model
def sge_resnet152(pretrained=False, **kwargs):
    return build_resnet(152, "sge", variant="sge_resnet152", pretrained=pretrained, **kwargs)


@register_model
def se_resnet50(pretrained=False, **kwargs):
    return build_resnet(50, "se", variant="se_resnet50", pretrained=pretrained, **kwargs)


@register_model
def se_resnet101(pretrained=False, **kwargs):
    return build_resnet(101, "se", variant="se_resnet101", pretrained=pretrained, **kwargs)


def plain_resnet(depth: int):
    """Our-registry-only builder for the plain baseline ResNet-``depth``."""
    def build(pretrained=False, **kwargs):
        return build_resnet(depth, "none", pretrained=pretrained, **kwargs)
    build.__name__ = f"resnet{depth}"
    return build
