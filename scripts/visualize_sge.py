#!/usr/bin/env python
"""The paper's qualitative figure: what SGE does to each group of one stage, on one image.

    python scripts/visualize_sge.py --checkpoint runs/quickstart/checkpoints/best.pt \\
        --image cat.jpg --out out/cat_sge.png [--stage 4] [--tensorboard runs/viz]
    python scripts/visualize_sge.py --model sge_resnet50 --checkpoint sge_resnet50.pth.tar \\
        --image cat.jpg --out out/cat_sge.png

For every group of the chosen block (default: the last block of the last stage) the grid
shows, over the input image, three maps: the norm of the group's sub-feature vector at
every position before SGE, the same after SGE, and the SGE gate sigmoid(a) itself (the
paper, Fig. 1 and Sec. 4.4: the gate should light up the object and damp the background).
Runs on CPU; forward hooks on the blocks' ``.se`` modules, so any registered SGE model
works, narrow ones included (their architecture comes from the checkpoint or --config).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import model_loading as ml  # also puts the repository on sys.path

ROWS = ("before SGE\n|x_g|", "after SGE\n|x_g * gate|", "gate\nsigmoid(a)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", required=True, help="checkpoint file (ours, released, plain)")
    p.add_argument("--image", required=True, help="input image")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--model", help="model name when the checkpoint stores no config")
    p.add_argument("--config", help="YAML config giving the architecture and preprocessing")
    p.add_argument("--stage", type=int, default=4, choices=(1, 2, 3, 4),
                   help="ResNet stage (layer1..layer4; default 4, the last)")
    p.add_argument("--block", type=int, default=-1,
                   help="block index within the stage (default -1, the stage's last block)")
    p.add_argument("--max-groups", type=int, default=64,
                   help="show at most this many groups, evenly spaced (default 64)")
    p.add_argument("--cols", type=int, default=8, help="groups per row of the grid (default 8)")
    p.add_argument("--scale", choices=("tile", "absolute"), default="tile",
                   help="colour ranges: each tile its own (default: shows where within the "
                        "map), or absolute (a group's before/after share one range, the gate "
                        "spans 0..1: shows how much SGE scales)")
    p.add_argument("--dpi", type=int, default=80, help="PNG resolution (default 80)")
    p.add_argument("--tensorboard", metavar="DIR", help="also log the grid and maps there")
    args = p.parse_args(argv)
    for name in ("max_groups", "cols", "dpi"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if Path(args.out).suffix.lower() != ".png":
        p.error(f"--out must name a .png file, got {args.out}")
    return args


def sge_module(model, stage: int, block: int):
    """The SGE module of ``layer<stage>[block]``; ToolError when there is none."""
    layer = getattr(model, f"layer{stage}", None)
    if layer is None:
        raise ml.ToolError(f"the model has no layer{stage}")
    if not -len(layer) <= block < len(layer):
        raise ml.ToolError(f"--block {block} out of range: layer{stage} has {len(layer)} blocks")
    se = getattr(layer[block], "se", None)
    if se is None or not all(hasattr(se, a) for a in ("weight", "bias", "groups")):
        raise ml.ToolError(f"layer{stage}[{block}] has no SGE module: is the model an "
                           f"sge_* model? (its attention slot holds {type(se).__name__})")
    return se


def capture(model, se, image):
    """Run ``model`` on one image; return (before, after, gate), each (G, H, W), and logits."""
    import torch

    from sge.layer import sge_gate_logits
    seen = {}

    def hook(module, inputs, output):
        seen["x"], seen["y"] = inputs[0].detach(), output.detach()

    handle = se.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            logits = model(image.unsqueeze(0))
    finally:
        handle.remove()
    x, y, g = seen["x"].float(), seen["y"].float(), se.groups
    n, c, h, w = x.shape
    with torch.inference_mode():
        gate = torch.sigmoid(sge_gate_logits(x, se.weight, se.bias, g))[0]
    before = x.reshape(g, c // g, h, w).norm(dim=1)
    after = y.reshape(g, c // g, h, w).norm(dim=1)
    return before, after, gate, logits[0]


def _upsample(maps, size):
    import torch.nn.functional as F
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear",
                         align_corners=False).squeeze(1)


def draw(rgb, before, after, gate, shown, cols, scale, title):
    """One figure: the input, then for each row of groups the before/after/gate tiles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = rgb.shape[:2]
    maps = [_upsample(m[shown], size).numpy() for m in (before, after, gate)]
    cols = min(cols, len(shown))
    chunks = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(1 + 3 * chunks, cols, squeeze=False, layout="constrained",
                             figsize=(0.4 + 1.2 * cols, 0.6 + 1.2 * (1 + 3 * chunks)))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    fig.suptitle(title, fontsize=8, x=0.02, ha="left")
    axes[0, 0].imshow(rgb)
    axes[0, 0].set_ylabel("input", fontsize=7)
    for k, group in enumerate(shown):
        chunk, col = divmod(k, cols)
        lim = max(maps[0][k].max(), maps[1][k].max())
        for r in range(3):
            ax = axes[1 + 3 * chunk + r, col]
            if scale == "tile":
                vmin, vmax = maps[r][k].min(), maps[r][k].max()
            elif r == 2:
                vmin, vmax = 0.0, 1.0  # the gate is a probability
            else:
                vmin, vmax = 0.0, lim
            ax.imshow(rgb.mean(axis=2), cmap="gray")
            ax.imshow(maps[r][k], cmap="jet", alpha=0.55, vmin=vmin, vmax=vmax)
            if r == 0:
                ax.set_title(f"group {group}", fontsize=7)
            if col == 0:
                ax.set_ylabel(ROWS[r], fontsize=6)
    return fig


def to_rgb(tensor):
    """Undo the normalization of the model input, for display (H, W, 3) in [0, 1]."""
    import torch
    mean = torch.tensor(ml.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(ml.IMAGENET_STD).view(3, 1, 1)
    return (tensor * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def log_tensorboard(logdir, tag, fig, before, after, gate):
    from torch.utils.tensorboard import SummaryWriter

    def unit(m):  # one image per group, each stretched to [0, 1]
        lo = m.amin(dim=(1, 2), keepdim=True)
        hi = m.amax(dim=(1, 2), keepdim=True)
        return ((m - lo) / (hi - lo).clamp_min(1e-12)).unsqueeze(1)

    with SummaryWriter(logdir) as writer:
        writer.add_figure(f"{tag}/grid", fig, close=False)
        writer.add_images(f"{tag}/norm_before", unit(before))
        writer.add_images(f"{tag}/norm_after", unit(after))
        writer.add_images(f"{tag}/gate", gate.unsqueeze(1))


def main(argv=None) -> int:
    args = parse_args(argv)
    ml.set_threads()
    try:
        model, cfg = ml.load_model(args.checkpoint, args.model, args.config)
        se = sge_module(model, args.stage, args.block)
        image = ml.preprocess([ml.open_image(args.image)], cfg)[0]
    except ml.ToolError as exc:
        print(f"visualize_sge.py: error: {exc}", file=sys.stderr)
        return 2
    before, after, gate, logits = capture(model, se, image)
    g, h, w = gate.shape
    count = min(args.max_groups, g)
    shown = sorted({round(i * (g - 1) / max(count - 1, 1)) for i in range(count)})
    block = args.block % len(getattr(model, f"layer{args.stage}"))
    names = ml.class_names(model.num_classes, cfg)
    top = int(logits.argmax())
    title = (f"layer{args.stage}[{block}].se: {g} groups, {h}x{w} positions\n"
             f"gate mean {gate.mean():.3f} (min {gate.min():.3f}, max {gate.max():.3f})\n"
             f"prediction: {names[top]} ({100 * logits.softmax(0)[top]:.1f}%)")
    fig = draw(to_rgb(image), before, after, gate, shown, args.cols, args.scale, title)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=args.dpi)
    if args.tensorboard:
        log_tensorboard(args.tensorboard, f"sge/layer{args.stage}.{block}", fig, before, after,
                        gate)
    print(title.replace("\n", "; "))
    print(f"wrote {out}" + (f" and TensorBoard images under {args.tensorboard}"
                            if args.tensorboard else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
