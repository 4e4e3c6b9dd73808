"""The quickstart dataset: 10 classes of drawn shapes on cluttered backgrounds, as JPEGs.

``data.root=quickstart`` resolves to ``quickstart_root(data.quickstart_seed)``: an
ImageFolder tree (``train/<class>/*.jpg``, ``val/<class>/*.jpg``) generated on first use
under ``$SGE_CACHE_DIR`` or ``<repo>/.cache``. Every image is drawn from its own RNG seeded
by (seed, split, index), so the files are the same on every machine with the same
Pillow/libjpeg. Several processes may start at once (torchrun): one generates into a
temporary folder under a file lock and renames it into place atomically; the others wait
on the lock and reuse the result. A crash mid-way never leaves a half-written dataset at
the final path.

The val set has 501 images: not a multiple of any common batch size x 2 processes, so
exact-evaluation checks (every image counted once) are meaningful on it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

VERSION = 2  # bump when the drawing changes: the cache folder name carries it
CLASSES = ("arrow", "circle", "crescent", "cross", "heart", "hourglass", "ring", "square",
           "star", "triangle")  # sorted, so folder order == class index
TRAIN_PER_CLASS = 300
VAL_IMAGES = 501
IMAGE_SIZE = 64
_SUPERSAMPLE = 3  # draw at 3x and downsample: antialiased edges at small sizes


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> list:
    return [(radius * math.cos(phase + 2 * math.pi * k / n),
             radius * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star() -> list:
    outer, inner = _regular(5, 1.0, -math.pi / 2), _regular(5, 0.42, -math.pi / 2 + math.pi / 5)
    return [p for pair in zip(outer, inner) for p in pair]


def _heart() -> list:
    ts = np.linspace(0, 2 * math.pi, 60, endpoint=False)
    xs = 16 * np.sin(ts) ** 3
    ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
    return list(zip(xs / 17, (ys + 2) / 17))


# Each shape: a list of (polygon, fill) in unit coordinates; fill 0 cuts a hole.
_SHAPES = {
    "arrow": [([(-1, -.28), (.15, -.28), (.15, -.7), (1, 0), (.15, .7), (.15, .28), (-1, .28)], 255)],
    "circle": [(_regular(48), 255)],
    "crescent": [(_regular(48), 255), ([(x + .45, y - .2) for x, y in _regular(48, .85)], 0)],
    "cross": [([(-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1), (-.3, 1),
                (-.3, .3), (-1, .3), (-1, -.3), (-.3, -.3)], 255)],
    "heart": [(_heart(), 255)],
    "hourglass": [([(-.8, -1), (.8, -1), (0, 0)], 255), ([(-.8, 1), (.8, 1), (0, 0)], 255)],
    "ring": [(_regular(48), 255), (_regular(48, .55), 0)],
    "square": [([(-.8, -.8), (.8, -.8), (.8, .8), (-.8, .8)], 255)],
    "star": [(_star(), 255)],
    "triangle": [(_regular(3, 1.0, -math.pi / 2), 255)],
}


def _color(rng: np.random.Generator) -> tuple:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A two-colour gradient with faint random strokes and dots (clutter, never a class shape)."""
    a, b = np.array(_color(rng), float), np.array(_color(rng), float)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size
    t = np.clip(0.5 + (xx - .5) * math.cos(angle) + (yy - .5) * math.sin(angle), 0, 1)[..., None]
    img = Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))
    mid = (a + b) / 2

    def faint():  # clutter half-blended into the background: visible, but weaker than the object
        return tuple(int(v) for v in (np.array(_color(rng)) + mid) / 2)

    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, 4))
        draw.line([(x0, y0), (x1, y1)], fill=faint(), width=int(rng.integers(1, size // 32 + 2)))
    for _ in range(int(rng.integers(2, 6))):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(size * .015, size * .04)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=faint())
    return img


def draw_image(label: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """One RGB image of class ``CLASSES[label]`` drawn from ``rng``."""
    big = size * _SUPERSAMPLE
    img = _background(rng, big)
    mean = np.asarray(img, float).reshape(-1, 3).mean(0)
    color = _color(rng)
    while np.abs(np.array(color) - mean).sum() < 240:  # keep the object clearly visible
        color = _color(rng)
    radius = rng.uniform(.28, .44) * big
    cx, cy = rng.uniform(radius * .8, big - radius * .8, 2)
    theta = rng.uniform(0, 2 * math.pi)
    sx, sy = rng.uniform(.85, 1.15, 2) * radius
    cos, sin = math.cos(theta), math.sin(theta)
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for poly, fill in _SHAPES[CLASSES[label]]:
        pts = [(cx + x * sx * cos - y * sy * sin, cy + x * sx * sin + y * sy * cos) for x, y in poly]
        draw.polygon(pts, fill=fill)
    img.paste(Image.new("RGB", (big, big), color), (0, 0), mask.filter(ImageFilter.SMOOTH))
    return img.resize((size, size), Image.Resampling.LANCZOS)


def generate(dest: Path, seed: int, train_per_class: int, val_images: int,
             size: int = IMAGE_SIZE, progress: bool = True) -> None:
    """Write the dataset into ``dest`` (which must not exist)."""
    from tqdm import tqdm

    jobs = [("train", i) for i in range(train_per_class * len(CLASSES))]
    jobs += [("val", i) for i in range(val_images)]
    for split in ("train", "val"):
        for name in CLASSES:
            (dest / split / name).mkdir(parents=True)
    for split, i in tqdm(jobs, desc=f"generating quickstart data in {dest.parent}",
                         disable=not progress, unit="img", mininterval=1.0):
        label = i % len(CLASSES)
        rng = np.random.default_rng([seed & (2**64 - 1), split == "val", i])
        draw_image(label, rng, size).save(dest / split / CLASSES[label] / f"{i:05d}.jpg",
                                          quality=90)


def _cache_dir() -> Path:
    env = os.environ.get("SGE_CACHE_DIR")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[1] / ".cache"


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to finish generating {path.with_suffix('')}",
                  flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_dataset(root: Path, seed: int, train_per_class: int = TRAIN_PER_CLASS,
                   val_images: int = VAL_IMAGES, size: int = IMAGE_SIZE,
                   progress: bool = True) -> Path:
    """Generate the dataset at ``root`` unless it is already there; safe across processes."""
    root = Path(root)
    info = {"version": VERSION, "seed": seed, "train_per_class": train_per_class,
            "val_images": val_images, "size": size}
    marker = root / "quickstart.json"
    if marker.is_file():
        return _checked(root, marker, info)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(root.parent / f"{root.name}.lock"):
        if marker.is_file():  # another process made it while we waited
            return _checked(root, marker, info)
        if root.exists():
            raise FileExistsError(f"{root} exists but is not a complete quickstart dataset "
                                  f"(no {marker.name}); delete it to regenerate")
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            generate(tmp, seed, train_per_class, val_images, size, progress)
            (tmp / marker.name).write_text(json.dumps(info, indent=1) + "\n")
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root


def _checked(root: Path, marker: Path, info: dict) -> Path:
    found = json.loads(marker.read_text())
    if found != info:
        raise FileExistsError(f"{root} holds a quickstart dataset made with {found}, "
                              f"not {info}; delete it or use another folder")
    return root


def quickstart_root(seed: int = 0) -> Path:
    """The quickstart dataset's folder for ``seed`` (generated on first use)."""
    return ensure_dataset(_cache_dir() / f"quickstart-v{VERSION}-seed{seed}", seed)
