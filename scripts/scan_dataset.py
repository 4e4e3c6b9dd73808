#!/usr/bin/env python
"""Scan an ImageFolder dataset (ROOT/train, ROOT/val) for files that break or bend training.

    python scripts/scan_dataset.py /data/imagenet                     # report only
    python scripts/scan_dataset.py /data/imagenet --move-bad /data/imagenet-bad
    python scripts/scan_dataset.py /data/imagenet --strict --move-bad DIR --json scan.json

Every image is fully decoded with PIL (the reference decoder of the torchvision backend),
in ``--workers`` processes. Reported per file:

- errors (training stops on them with data.on_bad_file=error): ``unreadable`` (zero bytes,
  not an image, unknown format) and ``truncated`` (the header parses, the data ends early);
- warnings (both backends decode them to RGB; ``--strict`` treats them as errors):
  ``cmyk`` and ``grayscale`` JPEGs, and ``not-jpeg`` (e.g. a PNG named .JPEG, as ImageNet's
  train set holds).

Also reported: images per class (summary, ``--counts`` for the full table), empty class
folders, val classes missing from train (an error: labels would be wrong) and train classes
without val images. ``--move-bad DIR`` moves the error files to DIR/<split>/<class>/<file>,
so they can be inspected or put back. Exit status 1 while anything that stops training
remains, else 0.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from multiprocessing import Pool
from pathlib import Path

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.folder import IMAGE_EXTENSIONS  # noqa: E402  (the loaders' own extension list)

ERRORS = ("unreadable", "truncated")
WARNINGS = ("cmyk", "grayscale", "not-jpeg")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def check_image(path: str) -> list[tuple[str, str]]:
    """[(kind, detail)] of the problems of one file; [] for a clean RGB JPEG (or PNG)."""
    try:
        with Image.open(path) as img:
            fmt, mode = img.format, img.mode
            img.load()  # full decode: truncation only shows here
    except Exception as exc:  # OSError, UnidentifiedImageError, SyntaxError, ValueError, ...
        kind = "truncated" if "truncated" in str(exc) else "unreadable"
        return [(kind, f"{type(exc).__name__}: {exc}")]
    problems = []
    if path.lower().endswith((".jpg", ".jpeg")) and fmt != "JPEG":
        problems.append(("not-jpeg", f"{fmt} data named {Path(path).suffix}"))
    if mode == "CMYK":
        problems.append(("cmyk", "CMYK colour space"))
    elif mode in GRAY_MODES:
        problems.append(("grayscale", f"mode {mode}"))
    return problems


def _check(path: str):
    return path, check_image(path)


def list_split(split_dir: Path) -> tuple[dict[str, list[str]], list[str]]:
    """({class: sorted image paths}, [non-image files]) below ``split_dir``."""
    classes, others = {}, []
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        files = []
        for dirpath, dirnames, filenames in os.walk(entry.path, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                (files if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(path)
        classes[entry.name] = files
    return classes, others


def count_summary(counts: dict[str, int]) -> str:
    values = list(counts.values())
    if not values:
        return "no class folders"
    smallest = sorted(counts, key=lambda c: (counts[c], c))[:3]
    return (f"{len(values)} classes, {sum(values)} images; per class min {min(values)} "
            f"median {statistics.median(values):g} max {max(values)}; fewest: "
            + ", ".join(f"{c} ({counts[c]})" for c in smallest))


def move_aside(path: str, root: Path, dest: Path) -> Path:
    target = dest / Path(path).relative_to(root)
    if target.exists():
        raise SystemExit(f"error: will not overwrite {target} (moving {path})")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, target)
    return target


def scan(root: Path, splits, workers: int, strict: bool, move_bad: Path | None,
         show_counts: bool) -> dict:
    bad_kinds = ERRORS + (WARNINGS if strict else ())
    report = {"root": str(root), "files": [], "moved": [], "counts": {}, "empty_classes": [],
              "non_image_files": [], "val_only_classes": [], "train_without_val": []}
    per_split = {}
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            raise SystemExit(f"error: missing split folder {split_dir}")
        classes, others = list_split(split_dir)
        per_split[split] = classes
        report["non_image_files"] += others
        paths = [p for files in classes.values() for p in files]
        pool = Pool(workers) if workers > 1 else None
        results = pool.imap_unordered(_check, paths, chunksize=64) if pool else map(_check, paths)
        for path, problems in tqdm(results, total=len(paths), desc=f"scan {split}",
                                   unit="img", file=sys.stderr):
            for kind, detail in problems:
                report["files"].append({"path": path, "kind": kind, "detail": detail})
        if pool:
            pool.close()
            pool.join()
        report["files"].sort(key=lambda r: (r["path"], r["kind"]))
        inside = str(split_dir) + os.sep
        bad = sorted({r["path"] for r in report["files"]
                      if r["kind"] in bad_kinds and r["path"].startswith(inside)})
        if move_bad is not None:
            for path in bad:
                report["moved"].append([path, str(move_aside(path, root, move_bad))])
                classes[Path(path).relative_to(split_dir).parts[0]].remove(path)
        report["counts"][split] = {c: len(files) for c, files in classes.items()}
        report["empty_classes"] += [str(split_dir / c) for c, n in
                                    report["counts"][split].items() if n == 0]
    if "train" in per_split and "val" in per_split:
        train, val = set(per_split["train"]), set(per_split["val"])
        report["val_only_classes"] = sorted(val - train)
        report["train_without_val"] = sorted(train - val)
    _print_report(report, bad_kinds, show_counts)
    return report


def _print_report(report: dict, bad_kinds, show_counts: bool) -> None:
    for r in report["files"]:
        tag = "ERROR" if r["kind"] in bad_kinds else "warn "
        print(f"{tag} {r['kind']:<10} {r['path']}  ({r['detail']})")
    for src, dst in report["moved"]:
        print(f"moved {src} -> {dst}")
    for path in report["non_image_files"]:
        print(f"note  ignored    {path}  (not {'/'.join(IMAGE_EXTENSIONS)}; loaders skip it)")
    for split, counts in report["counts"].items():
        print(f"{split}: {count_summary(counts)}")
        if show_counts:
            for name, n in counts.items():
                print(f"  {name} {n}")
    for path in report["empty_classes"]:
        print(f"ERROR empty class folder {path}")
    if report["val_only_classes"]:
        print(f"ERROR val classes not in train: {', '.join(report['val_only_classes'])}")
    if report["train_without_val"]:
        print(f"warn  train classes without val images: "
              f"{', '.join(report['train_without_val'])}")
    kinds = {}
    for r in report["files"]:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    print("summary: " + (", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or
                         "no problem files") + f"; {len(report['moved'])} moved")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="dataset root holding train/ and val/")
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--move-bad", type=Path, metavar="DIR",
                        help="move error files to DIR/<split>/<class>/<file>")
    parser.add_argument("--strict", action="store_true",
                        help="treat CMYK, grayscale and non-JPEG data as errors too")
    parser.add_argument("--counts", action="store_true", help="print images per class")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report")
    args = parser.parse_args(argv)
    root = args.root.expanduser()
    if not root.is_dir():
        raise SystemExit(f"error: dataset root not found: {root}")
    report = scan(root, args.splits, max(1, args.workers), args.strict,
                  args.move_bad.expanduser() if args.move_bad else None, args.counts)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    bad_kinds = ERRORS + (WARNINGS if args.strict else ())
    moved = {src for src, _ in report["moved"]}
    left = [r for r in report["files"] if r["kind"] in bad_kinds and r["path"] not in moved]
    if left:
        print(f"{len(left)} file(s) would stop training: move them aside with --move-bad DIR, "
              f"or train with data.on_bad_file=skip")
    return 1 if left or report["empty_classes"] or report["val_only_classes"] else 0


if __name__ == "__main__":
    sys.exit(main())
