#!/usr/bin/env python
"""Print parameters and multiply-adds of registered models beside the paper's numbers.

    python scripts/model_info.py sge_resnet50 resnet50 [--img-size 224] [--groups 64]

"GMACs (paper)" counts as the paper's table does (BN, ReLU and pooling included, SGE's
pooling too); "GMACs (conv/linear)" is torch.utils.flop_counter's total / 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from sge.flops import conv_linear_macs, count_params, paper_macs  # noqa: E402

# DESIGN.md's table: params (as published), GMACs as the paper counts them, top-1, top-5.
PAPER = {
    "resnet50": ("25,557,032", 4.122, 76.384, 92.908),
    "sge_resnet50": ("25,559,080", 4.127, 77.584, 93.664),
    "resnet101": ("44,549,160", 7.849, 78.200, 93.906),
    "sge_resnet101": ("44,553,384", 7.858, 78.798, 94.368),
    "se_resnet50": ("28.09M", 4.130, 77.184, 93.672),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=["resnet50", "sge_resnet50"],
                        help=f"model names (default: resnet50 sge_resnet50); one of "
                             f"{', '.join(models.list_models())}")
    parser.add_argument("--img-size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--groups", type=int, default=None, help="SGE group count override")
    args = parser.parse_args(argv)
    if args.img_size < 32:
        parser.error(f"--img-size must be at least 32, got {args.img_size}")
    unknown = [n for n in args.names if n not in models.list_models()]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; available: "
                     f"{', '.join(models.list_models())}")

    header = (f"{'model':<16}{'params':>14}{'GMACs (paper)':>15}{'GMACs (conv/lin)':>18}"
              f"{'paper params':>15}{'paper GMACs':>13}{'paper top-1':>13}")
    print(f"input {args.img_size}x{args.img_size}, 1 image")
    print(header)
    print("-" * len(header))
    for name in args.names:
        kwargs = {"groups": args.groups} if args.groups and models.is_sge(name) else {}
        model = models.create_model(name, **kwargs)
        params = count_params(model)
        ours, conv = paper_macs(model, args.img_size) / 1e9, conv_linear_macs(model, args.img_size) / 1e9
        ref = PAPER.get(name) if args.img_size == 224 and not kwargs else None
        ref_cols = (f"{ref[0]:>15}{ref[1]:>13.3f}{ref[2]:>13.3f}" if ref
                    else f"{'-':>15}{'-':>13}{'-':>13}")
        print(f"{name:<16}{params:>14,}{ours:>15.3f}{conv:>18.3f}{ref_cols}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
