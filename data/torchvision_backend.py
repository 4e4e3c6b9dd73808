"""The torchvision backend: ImageFolder files, PIL decode, presets, a torch DataLoader.

Workers only decode and crop (uint8); batches are normalized on the training device. The
DataLoader is driven by a batch sampler that hands out ``(index, epoch)`` keys, so each
sample's crop comes from (seed, epoch, index) and never from worker RNG state, and
``set_epoch(epoch, start_batch)`` resumes mid-epoch by not scheduling the first batches at
all (nothing is decoded for them). Unreadable files never surface as a worker traceback:
the worker reports them with the batch and the main process stops (``on_bad_file=error``)
or drops them with one warning per file (``skip``; that batch is then smaller, and a batch
whose images are all unreadable is left out).
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from data import sharding
from data.folder import BadImageError, load_rgb
from data.presets import normalize, sample_rng

log = logging.getLogger(__name__)


class _FolderDataset(Dataset):
    """samples[index] -> (uint8 CHW or None, label, error message or None)."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, seed: int):
        self.samples, self.transform, self.seed = samples, transform, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        path, label = self.samples[index]
        try:
            img = load_rgb(path)
        except BadImageError as exc:
            return None, label, str(exc)
        return self.transform(img, sample_rng(self.seed, epoch, index)), label, None


def _collate(items):
    good = [(img, label) for img, label, _ in items if img is not None]
    errors = [err for img, _, err in items if img is None]
    if not good:
        return None, None, errors
    return (torch.stack([img for img, _ in good]),
            torch.tensor([label for _, label in good], dtype=torch.int64), errors)


class _EpochBatches:
    """Batch sampler over a fixed list of indices, starting at a given batch."""

    def __init__(self, batch_size: int):
        self.batch_size, self.indices, self.epoch, self.start_batch = batch_size, [], 0, 0

    def __len__(self) -> int:
        return max(0, math.ceil(len(self.indices) / self.batch_size) - self.start_batch)

    def __iter__(self):
        b = self.batch_size
        for start in range(self.start_batch * b, len(self.indices), b):
            yield [(i, self.epoch) for i in self.indices[start:start + b]]


class FolderLoader:
    """The data contract over an ImageFolder split (see notes in data/__init__.py)."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform: Callable,
                 *, train: bool, batch_size: int, seed: int, rank: int, world: int,
                 workers: int, device: torch.device, channels_last: bool = False,
                 on_bad_file: str = "error"):
        if train and sharding.train_batches(len(samples), world, batch_size) == 0:
            raise ValueError(f"train split has {len(samples)} images, fewer than one global "
                             f"batch ({world} processes x {batch_size}); lower data.batch_size")
        self.classes, self.batch_size, self.train = classes, batch_size, train
        self.seed, self.rank, self.world = seed, rank, world
        self.device, self.channels_last, self.on_bad_file = device, channels_last, on_bad_file
        self._n = len(samples)
        self._warned: set[str] = set()
        self._batches = _EpochBatches(batch_size)
        self._loader = DataLoader(
            _FolderDataset(samples, transform, seed), batch_sampler=self._batches,
            num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0)
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Train: reshuffle for ``epoch``. Both: the next iteration starts at ``start_batch``."""
        if self.train:
            self._batches.indices = sharding.train_indices(
                self._n, self.seed, epoch, self.rank, self.world, self.batch_size)
        elif not self._batches.indices:
            self._batches.indices = sharding.val_indices(self._n, self.rank, self.world)
        self._batches.epoch, self._batches.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self._batches.indices)

    @property
    def total_samples(self) -> int:
        if self.train:
            return sharding.train_batches(self._n, self.world, self.batch_size) * \
                self.world * self.batch_size
        return self._n

    def __iter__(self):
        for images, labels, errors in self._loader:
            self._report(errors)
            if images is None:
                continue
            yield (normalize(images, self.device, self.channels_last),
                   labels.to(self.device, non_blocking=True))

    def _report(self, errors: list[str]) -> None:
        if errors and self.on_bad_file == "error":
            raise BadImageError(f"{errors[0]} (set data.on_bad_file=skip to skip such files)")
        for err in errors:
            if err not in self._warned:
                self._warned.add(err)
                log.warning("skipping unreadable image: %s", err)
