"""The synthetic backend: random normalized images and labels made on the device.

For speed runs that should measure the model, not the input pipeline. Each batch is drawn
from a generator seeded by (seed, split, epoch, batch, rank), so runs repeat exactly and
``set_epoch(epoch, start_batch)`` skips batches by not generating them. It follows the same
sharding arithmetic as the file backends: train ``floor(N / (W*B))`` full batches per rank,
val a disjoint block of the N images per rank.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from data import sharding


class SyntheticLoader:
    def __init__(self, num_images: int, num_classes: int, img_size: int, *, train: bool,
                 batch_size: int, seed: int, rank: int, world: int, device: torch.device,
                 channels_last: bool = False):
        if train and sharding.train_batches(num_images, world, batch_size) == 0:
            raise ValueError(f"data.synthetic_images={num_images} is fewer than one global "
                             f"batch ({world} processes x {batch_size})")
        self.classes = [f"class{i:04d}" for i in range(num_classes)]
        self.batch_size, self.train, self.seed, self.rank, self.world = \
            batch_size, train, seed, rank, world
        self.img_size, self.device, self.channels_last = img_size, device, channels_last
        self._n = num_images
        self.num_samples = (sharding.train_batches(num_images, world, batch_size) * batch_size
                            if train else len(sharding.val_indices(num_images, rank, world)))
        self.total_samples = self.num_samples * world if train else num_images
        self._epoch, self._start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self._epoch, self._start = (epoch if self.train else 0), start_batch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self):
        gen = torch.Generator(device=self.device)
        for b in range(self._start, len(self)):
            n = min(self.batch_size, self.num_samples - b * self.batch_size)
            key = [self.seed & (2**64 - 1), int(self.train), self._epoch, b, self.rank]
            gen.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))
            images = torch.randn(n, 3, self.img_size, self.img_size, device=self.device,
                                 generator=gen)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = torch.randint(len(self.classes), (n,), device=self.device, generator=gen)
            yield images, labels
