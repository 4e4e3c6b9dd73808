"""Shared by the engine and distributed tests: a tiny ImageFolder and a tiny run config."""
import socket
from pathlib import Path

import numpy as np
from PIL import Image

from sge.config import load_config

CLASSES = ("circle", "square", "stripe")


def make_folder(root: Path, train_per_class: int = 8, val_counts=(5, 4, 4)) -> Path:
    """Random 36x36 RGB JPEGs, tinted per class; val has an odd total (13 by default)."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", [train_per_class] * len(CLASSES)), ("val", val_counts)):
        for c, (name, n) in enumerate(zip(CLASSES, counts)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 120, (36, 36, 3), dtype=np.uint8)
                pixels[..., c] += 120
                Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    return root


def tiny_overrides(data_root: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        "model.name=sge_resnet18", "model.channels=[8,16,32,64]",
        "model.groups=4", "model.num_classes=3",
        "data.backend=torchvision", f"data.root={data_root}", "data.batch_size=4",
        "data.workers=0", "data.img_size=32", "data.val_resize=32", "data.val_img_size=32",
        "train.epochs=2", "train.progress=false", "train.log_every=1",
        "optim.lr=0.4", "output.tensorboard=false", f"output.dir={out_dir}", *extra]


def tiny_config(data_root: Path, out_dir: Path, *extra: str):
    return load_config(None, tiny_overrides(data_root, out_dir, *extra))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
