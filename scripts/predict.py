#!/usr/bin/env python
"""Top-k classes, with names and probabilities, for one or more images and any checkpoint.

    python scripts/predict.py --checkpoint runs/quickstart/checkpoints/best.pt img1.jpg img2.png
    python scripts/predict.py --model sge_resnet50 --checkpoint sge_resnet50.pth.tar dog.jpg

Our checkpoints carry their config (architecture, preprocessing, class folder); released
PytorchInsight files and plain state dicts need ``--model``. Names: ``--classes FILE`` (one
per line), else the run's class folders, else ImageNet-1k's for 1000-class models.
"""
from __future__ import annotations

import argparse
import sys

import model_loading as ml  # also puts the repository on sys.path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("images", nargs="+", help="image files (JPEG/PNG/...)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file (ours, released, plain)")
    p.add_argument("--model", help="model name when the checkpoint stores no config")
    p.add_argument("--config", help="YAML config giving the architecture and preprocessing")
    p.add_argument("--classes", help="text file with one class name per line, in label order")
    p.add_argument("--topk", type=int, default=5, help="classes to print per image (default 5)")
    args = p.parse_args(argv)
    if args.topk < 1:
        p.error(f"--topk must be >= 1, got {args.topk}")
    return args


def predict(model, batch, topk: int):
    import torch
    with torch.inference_mode():
        probs = model(batch).float().softmax(dim=1)
    return probs.topk(min(topk, probs.shape[1]), dim=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    ml.set_threads()
    try:
        model, cfg = ml.load_model(args.checkpoint, args.model, args.config)
        names = ml.class_names(model.num_classes, cfg, args.classes)
        batch = ml.preprocess([ml.open_image(path) for path in args.images], cfg)
    except ml.ToolError as exc:
        print(f"predict.py: error: {exc}", file=sys.stderr)
        return 2
    values, indices = predict(model, batch, args.topk)
    for path, probs, idx in zip(args.images, values.tolist(), indices.tolist()):
        print(path)
        for rank, (p, i) in enumerate(zip(probs, idx), 1):
            label = names[i] if names[i] == f"class {i}" else f"{names[i]}  (class {i})"
            print(f"  {rank}. {100 * p:6.2f}%  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
