"""Transform presets: ImageNet mean/std, the train and val pipelines, device-side normalize.

Train: RandomResizedCrop(img_size, scale=(min_scale, 1), ratio=(3/4, 4/3)) + horizontal
flip, bilinear with antialias (the recipe of the paper's released code). Val: resize the
short side to ``val_resize``, center crop ``val_img_size`` (256 -> 224 in the paper's table).

Crop and flip parameters are drawn from a ``random.Random`` seeded by (seed, epoch, sample
index) instead of torchvision's ``get_params`` (which reads the global torch RNG): the
crops of an epoch then do not depend on worker count, worker scheduling or what ran before,
so a resumed epoch reproduces them bitwise. The presets return uint8 CHW tensors; the
float conversion and normalization run once per batch on the training device
(``normalize``), which moves 4x fewer bytes between processes and to the GPU.
"""
from __future__ import annotations

import math
import random

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

IMAGENET_MEAN = IMAGENET_DEFAULT_MEAN  # the models' pretrained cfgs use the same constants
IMAGENET_STD = IMAGENET_DEFAULT_STD
CROP_RATIO = (3 / 4, 4 / 3)
_BILINEAR = InterpolationMode.BILINEAR
_MASK64 = (1 << 64) - 1


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The augmentation RNG of one sample in one epoch (int seeding is stable across Pythons)."""
    return random.Random(((seed & _MASK64) << 128) | ((epoch & _MASK64) << 64) | (index & _MASK64))


def crop_params(height: int, width: int, scale: tuple[float, float], rng: random.Random,
                ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop; torchvision's algorithm, our RNG."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # Fallback after 10 misses (extreme aspect ratios): the largest central crop in range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


class TrainPreset:
    """PIL RGB image + per-sample RNG -> uint8 CHW random resized crop (+ flip)."""

    def __init__(self, img_size: int, min_scale: float = 0.08, hflip: bool = True):
        self.img_size, self.scale, self.hflip = img_size, (min_scale, 1.0), hflip

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        top, left, h, w = crop_params(img.height, img.width, self.scale, rng)
        img = F.resized_crop(img, top, left, h, w, [self.img_size, self.img_size],
                             _BILINEAR, antialias=True)
        if self.hflip and rng.random() < 0.5:
            img = F.hflip(img)
        return F.pil_to_tensor(img)


class ValPreset:
    """PIL RGB image -> uint8 CHW: resize short side, center crop (deterministic)."""

    def __init__(self, resize: int, img_size: int):
        self.resize, self.img_size = resize, img_size

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        img = F.resize(img, self.resize, _BILINEAR, antialias=True)
        return F.pil_to_tensor(F.center_crop(img, [self.img_size, self.img_size]))


def normalize(images: torch.Tensor, device: torch.device, channels_last: bool = False,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NCHW batch -> normalized ``dtype`` NCHW on ``device`` (ImageNet mean/std)."""
    images = images.to(device, non_blocking=True).to(dtype)
    mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(1, 3, 1, 1) * 255
    images = images.sub_(mean).div_(std)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images
