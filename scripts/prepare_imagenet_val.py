#!/usr/bin/env python
"""Sort the flat ImageNet validation folder into one folder per class (ImageFolder layout).

    python scripts/prepare_imagenet_val.py /data/imagenet/val LOC_val_solution.csv
    python scripts/prepare_imagenet_val.py /data/ILSVRC2012_img_val labels.txt \\
        --out /data/imagenet/val --mode symlink --train /data/imagenet/train

The ground-truth file may be
- Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first word of the
  prediction string is the synset),
- a text/CSV file of ``<file name> <synset>`` lines (space or comma separated; the file
  name with or without extension),
- one label per line in the order of the sorted image names (ILSVRC2012_val_00000001...):
  a synset (``n01440764``), or a devkit class id 1..1000 (``ILSVRC2012_validation_ground_
  truth.txt``), which needs ``--synsets`` (a text file, the synset of id i on line i, or
  the devkit's ``meta.mat``, read with scipy).

Everything is checked before the first file moves: every image needs a label and every
labelled file must exist; with ``--train`` every val class must be a train class folder.
Running it again on a sorted folder is a no-op.
"""
from __future__ import annotations

import argparse
import collections
import csv
import os
import re
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.folder import IMAGE_EXTENSIONS  # noqa: E402

SYNSET = re.compile(r"^n\d{8}$")


def read_synsets(path: Path) -> list[str]:
    """Synsets by devkit class id (index 0 = id 1), from a text file or the devkit meta.mat."""
    if path.suffix == ".mat":
        try:
            from scipy.io import loadmat
        except ImportError:
            raise SystemExit("error: reading meta.mat needs scipy (pip install scipy), or pass "
                             "a text file with the synset of class id i on line i") from None
        rows = loadmat(str(path), squeeze_me=True)["synsets"]
        by_id = {int(r["ILSVRC2012_ID"]): str(r["WNID"]) for r in rows}
        return [by_id[i] for i in range(1, 1001)]
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def read_labels(path: Path, images: list[str], synsets: list[str] | None) -> dict[str, str]:
    """{image file name: synset}; errors name the line of ``path``."""
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [(n, ln) for n, ln in enumerate(lines, 1) if ln]
    if lines and lines[0][1].lower().startswith("imageid,"):  # Kaggle LOC_val_solution.csv
        rows = list(csv.reader([ln for _, ln in lines[1:]]))
        pairs = [(n, r[0], r[1].split()[0] if len(r) > 1 and r[1].split() else "")
                 for (n, _), r in zip(lines[1:], rows)]
    elif all(len(re.split(r"[,\s]+", ln)) == 1 for _, ln in lines):  # one label per line
        if len(lines) != len(images):
            raise SystemExit(f"error: {path} has {len(lines)} labels for {len(images)} images "
                             f"(one label per line must match the sorted image names)")
        pairs = [(n, name, _synset_of(ln, synsets, path, n))
                 for (n, ln), name in zip(lines, images)]
    else:
        pairs = [(n, *re.split(r"[,\s]+", ln)[:2]) for n, ln in lines]
    stems = {Path(name).stem: name for name in images}
    labels = {}
    for n, key, synset in pairs:
        if not SYNSET.match(synset):
            raise SystemExit(f"error: {path} line {n}: {synset!r} is not a synset like n01440764")
        name = key if key in images else stems.get(Path(key).stem if "." in key else key)
        if name is None:
            raise SystemExit(f"error: {path} line {n}: no image {key!r} in the folder")
        labels[name] = synset
    return labels


def _synset_of(token: str, synsets: list[str] | None, path: Path, line: int) -> str:
    if not token.isdigit():
        return token
    if synsets is None:
        raise SystemExit(f"error: {path} holds class ids (line {line}: {token}); pass "
                         f"--synsets (a synset per id, or the devkit meta.mat)")
    if not 1 <= int(token) <= len(synsets):
        raise SystemExit(f"error: {path} line {line}: class id {token} outside 1..{len(synsets)}")
    return synsets[int(token) - 1]


def place(src: Path, dst: Path, mode: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "move":
        os.replace(src, dst)
    elif mode == "copy":
        shutil.copy2(src, dst)
    else:
        dst.symlink_to(src.resolve())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("val_dir", type=Path, help="the flat folder of validation images")
    parser.add_argument("labels", type=Path, help="ground-truth file (see --help text)")
    parser.add_argument("--out", type=Path, help="where the class folders go (default: val_dir)")
    parser.add_argument("--mode", choices=("move", "copy", "symlink"), default="move")
    parser.add_argument("--synsets", type=Path, help="synset per devkit class id (txt or meta.mat)")
    parser.add_argument("--train", type=Path, help="train folder: every val class must be there")
    parser.add_argument("--dry-run", action="store_true", help="check and report, move nothing")
    args = parser.parse_args(argv)
    val_dir, out = args.val_dir.expanduser(), (args.out or args.val_dir).expanduser()
    for path in (val_dir, args.labels):
        if not path.exists():
            raise SystemExit(f"error: not found: {path}")
    images = sorted(e.name for e in os.scandir(val_dir)
                    if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
    if not images:
        sorted_already = any(e.is_dir() for e in os.scandir(val_dir))
        print(f"{val_dir}: no flat images" + (" (already sorted into class folders)"
                                             if sorted_already else ""))
        return 0 if sorted_already else 1
    synsets = read_synsets(args.synsets) if args.synsets else None
    labels = read_labels(args.labels, images, synsets)
    unlabelled = [name for name in images if name not in labels]
    if unlabelled:
        raise SystemExit(f"error: {len(unlabelled)} images have no label in {args.labels}, "
                         f"e.g. {', '.join(unlabelled[:3])}")
    counts = collections.Counter(labels[name] for name in images)
    if args.train:
        train = {e.name for e in os.scandir(args.train.expanduser()) if e.is_dir()}
        missing = sorted(set(counts) - train)
        if missing:
            raise SystemExit(f"error: {len(missing)} val classes are not folders of "
                             f"{args.train}: {', '.join(missing[:5])}")
    print(f"{len(images)} images -> {len(counts)} classes "
          f"({min(counts.values())}..{max(counts.values())} per class) under {out}")
    if args.dry_run:
        return 0
    for name in tqdm(images, desc=args.mode, unit="img", file=sys.stderr):
        place(val_dir / name, out / labels[name] / name, args.mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
