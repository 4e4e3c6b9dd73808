"""Data backends behind one contract; ``build_loader(cfg, split)`` is the only builder.

Every loader returned here provides (see also the sharding rule in ``data/sharding.py``):

- ``iter(loader)`` -> ``(images, labels)``: float32 NCHW images normalized with ImageNet
  mean/std (channels_last memory format if ``model.channels_last``) and int64 labels, both
  on the training device (``cuda:<current device>`` when CUDA is available, else cpu);
- ``len(loader)``: batches this process yields per full epoch;
- ``set_epoch(epoch, start_batch=0)``: train reshuffles for ``epoch`` (0-based; the order
  depends on (seed, epoch) only); the next iteration starts at batch ``start_batch``
  without reading the skipped batches (exact mid-epoch resume). The setting holds until
  the next call; val ignores ``epoch``;
- ``num_samples`` (images this process yields per epoch), ``total_samples`` (val: the
  dataset size over all processes; train: images per epoch over all processes),
  ``classes`` (sorted class folder names), ``batch_size`` (per process).
"""
from __future__ import annotations

from pathlib import Path

# Heavy imports (torch, torchvision) wait for build_loader: ``data.quickstart`` is also
# imported on its own, e.g. by processes that only need the dataset's path.
from data.folder import BadImageError, DatasetError, scan_split

__all__ = ["build_loader", "resolve_root", "BadImageError", "DatasetError"]


def resolve_root(cfg) -> Path:
    """``data.root`` as a real folder (``quickstart`` is generated on first use)."""
    from sge.config import QUICKSTART

    if cfg.data.root == QUICKSTART:
        from data.quickstart import quickstart_root
        return quickstart_root(cfg.data.quickstart_seed)
    return Path(cfg.data.root).expanduser()


def _device():
    # sge.distributed.init has already selected this process's GPU (LOCAL_RANK).
    import torch
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def build_loader(cfg, split: str):
    """The loader of ``split`` ("train" | "val") for ``cfg`` (a ``sge.config.Config``)."""
    from data import presets
    from sge import distributed

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    d, train = cfg.data, split == "train"
    common = dict(train=train, batch_size=d.batch_size, seed=cfg.seed,
                  rank=distributed.rank(), world=distributed.world_size(), device=_device(),
                  channels_last=cfg.model.channels_last)
    if d.backend == "synthetic":
        from data.synthetic import SyntheticLoader
        return SyntheticLoader(d.synthetic_images, cfg.model.num_classes,
                               d.img_size if train else d.val_img_size, **common)
    root = resolve_root(cfg)
    classes, samples = scan_split(root, split)
    if len(classes) > cfg.model.num_classes:
        from sge.config import ConfigError
        raise ConfigError(f"config key 'model.num_classes'={cfg.model.num_classes} is smaller "
                          f"than the {len(classes)} classes in {root / 'train'}")
    if d.backend == "dali":
        from data.dali import build_dali_loader
        device = common.pop("device")
        return build_dali_loader(
            samples, classes, split, img_size=d.img_size, val_resize=d.val_resize,
            val_img_size=d.val_img_size, min_scale=d.min_scale, hflip=d.hflip,
            threads=d.workers, device=d.dali_device,
            device_id=device.index if device.type == "cuda" else None,
            on_bad_file=d.on_bad_file, **{k: v for k, v in common.items() if k != "train"})
    from data.torchvision_backend import FolderLoader
    transform = (presets.TrainPreset(d.img_size, d.min_scale, d.hflip) if train
                 else presets.ValPreset(d.val_resize, d.val_img_size))
    return FolderLoader(samples, classes, transform, workers=d.workers,
                        on_bad_file=d.on_bad_file, **common)
