"""ImageFolder scanning shared by every file-reading backend (torchvision, DALI).

``scan_split(root, split)`` returns the class names (sorted train folders) and the sorted
``(path, class_index)`` samples of one split. Labels always come from the *train* class
list, so a val set with a class that training never saw is an error, not a silent shift of
every label after it.
"""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # matched case-insensitively (ImageNet: .JPEG)


class DatasetError(ValueError):
    """A malformed dataset folder; the message names the path."""


class BadImageError(DatasetError):
    """One image file that cannot be decoded; the message names the file."""


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` to an RGB PIL image (grayscale, CMYK, palette, PNG named .JPEG all work).

    Any decoding failure (truncated, zero-byte, not an image, decompression bomb) becomes a
    ``BadImageError`` naming the file, so the caller can stop or skip with one clear line.
    """
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, ... per format
        raise BadImageError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from None


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir)
                  if e.is_dir() and not e.name.startswith("."))


def _images_under(class_dir: Path) -> list[str]:
    """Image files below ``class_dir`` (recursively, like ImageFolder), sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in filenames
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def _split_dir(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise DatasetError(f"data root not found: {root}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetError(f"missing '{split}' folder in data root {root} "
                           f"(expected {root}/train/<class>/... and {root}/val/<class>/...)")
    return split_dir


def scan_classes(root: str | os.PathLike) -> list[str]:
    """Class names: the sorted folder names of ``root/train``."""
    root = Path(root).expanduser()
    classes = _class_dirs(_split_dir(root, "train"))
    if not classes:
        raise DatasetError(f"no class folders in {root / 'train'}")
    return classes


def scan_split(root: str | os.PathLike, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, samples) of ``root/split``; samples sorted by class folder, then path."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(root).expanduser()
    classes = scan_classes(root)
    split_dir = _split_dir(root, split)
    present = _class_dirs(split_dir)
    unknown = [c for c in present if c not in classes]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise DatasetError(f"{split_dir}: class folder(s) not in {root / 'train'}: {shown}")
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for name in present:
        files = _images_under(split_dir / name)
        if not files:
            raise DatasetError(f"empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} files): "
                               f"{split_dir / name}")
        samples += [(f, index[name]) for f in files]
    if not samples:
        raise DatasetError(f"no images in {split_dir}")
    return classes, samples
