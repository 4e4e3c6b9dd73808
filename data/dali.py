"""The DALI backend: the only file that imports NVIDIA DALI (lazily, on first use).

One pipeline definition serves both devices: on a GPU the JPEGs are decoded by the "mixed"
(nvJPEG) decoder and every later op runs on the GPU; without one the same graph runs on CPU
operators with ``device_id=None``. The graph is fed by ``fn.external_source`` with the encoded
bytes of the samples this rank reads, in the order of ``data/sharding.py``, so DALI sees the
same per-epoch order, the same val split over ranks (every image exactly once, last batch
partial) and the same exact mid-epoch resume as the torchvision backend.

Crop windows and flips are computed here, in Python, from the image header and the same
per-sample RNG as the torchvision preset (``presets.sample_rng`` / ``presets.crop_params``):
a resumed epoch reproduces its crops, and DALI and torchvision crop the same windows.
``decoders.image_slice`` then decodes only the crop (ROI decoding). For val, the
torchvision geometry (short side -> ``val_resize`` with ``int()`` truncation of the long
side, ``round()``-ed center crop) is mapped back onto the source image and handed to
``fn.resize`` as a fractional ROI with antialiased linear filtering, which is what PIL's
bilinear resize computes: the val tensors agree with torchvision to ~0.003 in normalized
units (tests/test_dali.py pins it). Train resizes its crop with plain (not antialiased)
linear interpolation unless ``train_antialias`` (see ``_define_graph``).

Bad files: a header that does not parse is caught while feeding; a decode failure surfaces
as a pipeline error, after which every file still in flight is decoded alone to find the
culprit. ``on_bad_file="error"`` raises ``BadImageError`` naming it; ``"skip"`` drops it
(warning once), rebuilds the pipeline and continues from the batch that failed.
"""
from __future__ import annotations

import collections
import io
import logging
import math

import numpy as np
import torch
from PIL import Image

from data.folder import BadImageError, DatasetError
from data.presets import IMAGENET_MEAN, IMAGENET_STD, crop_params, sample_rng
from data.sharding import train_batches, train_indices, val_indices
from sge.config import ConfigError

log = logging.getLogger(__name__)

INSTALL_HINT = ("install it with `pip install nvidia-dali-cuda130` (CUDA 13 drivers; "
                "`nvidia-dali-cuda120` for CUDA 12 drivers), or use data.backend=torchvision")


class DaliUnavailableError(ConfigError):
    """data.backend=dali, but DALI is not installed or failed to load (names the package)."""


def _import_dali():
    """(fn, types, Pipeline, feed_ndarray), or DaliUnavailableError naming the package."""
    try:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except Exception as exc:  # ImportError, or OSError/RuntimeError from its native libraries
        raise DaliUnavailableError(f"data.backend=dali needs NVIDIA DALI, which could not be "
                                   f"imported ({type(exc).__name__}: {exc}); "
                                   f"{INSTALL_HINT}") from None
    return fn, types, Pipeline, feed_ndarray


def resolve_device(dali_device: str) -> str:
    """data.dali_device -> "gpu" | "cpu" (auto: gpu when CUDA is available)."""
    if dali_device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if dali_device not in ("gpu", "cpu"):
        raise ValueError(f"dali device must be auto, gpu or cpu, got {dali_device!r}")
    return dali_device


# ---------------------------------------------------------------- geometry (pure Python)

def read_encoded(path: str) -> tuple[np.ndarray, int, int]:
    """(encoded bytes, height, width) of ``path``; only the header is parsed (by PIL)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception as exc:  # OSError, PIL.UnidentifiedImageError, SyntaxError, ...
        raise BadImageError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from None
    return np.frombuffer(data, dtype=np.uint8), height, width


def val_roi(height: int, width: int, resize: int, crop: int) -> tuple[list, list]:
    """torchvision's Resize(resize) + CenterCrop(crop), as a (y, x) ROI of the source image.

    Resize scales the short side to ``resize`` and the long side to ``int(resize*long/short)``;
    CenterCrop starts at ``round((size - crop) / 2)``. Resizing that ROI straight to
    ``crop x crop`` samples the same source points with the same filter scale.
    """
    if width <= height:
        out_w, out_h = resize, int(resize * height / width)
    else:
        out_h, out_w = resize, int(resize * width / height)
    top, left = int(round((out_h - crop) / 2.0)), int(round((out_w - crop) / 2.0))
    sy, sx = height / out_h, width / out_w
    return [top * sy, left * sx], [(top + crop) * sy, (left + crop) * sx]


def train_window(height: int, width: int, min_scale: float, hflip: bool, seed: int,
                 epoch: int, index: int) -> tuple[list, list, bool]:
    """(anchor (y, x), shape (h, w), flip) of sample ``index``: the torchvision preset's draws."""
    rng = sample_rng(seed, epoch, index)
    top, left, h, w = crop_params(height, width, (min_scale, 1.0), rng)
    flip = hflip and rng.random() < 0.5  # same draw order as presets.TrainPreset
    return [top, left], [h, w], flip


# ---------------------------------------------------------------- the pipeline

def _define_graph(fn, types, source, train: bool, device: str, out_size: int, dtype,
                  layout: str, train_antialias: bool):
    """The one graph; ``device`` ("gpu"|"cpu") only picks the operators' backends."""
    decoder = "mixed" if device == "gpu" else "cpu"
    # jpeg_fancy_upsampling: nvJPEG's chroma upsampling made equal to libjpeg's (PIL, CPU);
    # adjust_orientation off: torchvision/PIL ignore EXIF orientation too.
    opts = dict(device=decoder, output_type=types.RGB, adjust_orientation=False,
                jpeg_fancy_upsampling=True)
    # Val is antialiased (PIL's filter: top-1 must agree with torchvision). Train skips the
    # antialias by default, as NVIDIA's DALI ImageNet recipe does: it is a random
    # augmentation, and the antialiased CPU resize is DALI's costliest op (~20% of the CPU
    # time per image on 2 cores, docs/benchmarks.md); the crop windows stay torchvision's.
    resize = dict(size=[out_size, out_size], interp_type=types.INTERP_LINEAR,
                  antialias=train_antialias or not train)
    if train:
        jpegs, labels, anchor, shape, flip = fn.external_source(source, num_outputs=5,
                                                                batch=True)
        images = fn.decoders.image_slice(jpegs, anchor, shape, axis_names="HW",
                                         normalized_anchor=False, normalized_shape=False,
                                         **opts)
        images = fn.resize(images, device=device, **resize)
    else:
        jpegs, labels, roi_start, roi_end = fn.external_source(source, num_outputs=4,
                                                               batch=True)
        images = fn.decoders.image(jpegs, **opts)
        images = fn.resize(images, device=device, roi_start=roi_start, roi_end=roi_end,
                           **resize)
        flip = 0
    images = fn.crop_mirror_normalize(
        images, device=device, dtype=dtype, output_layout=layout, mirror=flip,
        mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD])
    return images, (labels.gpu() if device == "gpu" else labels)


class _Feeder:
    """external_source callback: batch k of the plan -> encoded bytes, labels, geometry.

    ``inflight`` remembers the files of every batch handed to DALI and not yet consumed,
    so a pipeline error can be traced to a file.
    """

    def __init__(self, loader: "DaliLoader", plan: list[list[int]], first: int):
        self.loader, self.plan, self.next = loader, plan, first
        self.inflight: collections.deque = collections.deque()

    def __call__(self):
        ld = self.loader
        while self.next < len(self.plan):
            k, self.next = self.next, self.next + 1
            cols = [[] for _ in range(5 if ld.train else 4)]
            paths = []
            for i in self.plan[k]:
                path, label = ld.samples[i]
                if path in ld.bad_files:
                    continue
                try:
                    data, h, w = read_encoded(path)
                except BadImageError as exc:
                    ld.bad_file(path, exc)  # raises in "error" mode
                    continue
                if ld.train:
                    anchor, shape, flip = train_window(h, w, ld.min_scale, ld.hflip, ld.seed,
                                                       ld.epoch, i)
                    extra = [np.float32(anchor), np.float32(shape), np.int32(flip)]
                else:
                    extra = [np.float32(v) for v in val_roi(h, w, ld.val_resize, ld.out_size)]
                for col, value in zip(cols, [data, np.int64(label)] + extra):
                    col.append(np.asarray(value))
                paths.append(path)
            if paths:  # a batch whose files were all skipped is dropped
                self.inflight.append((k, paths))
                return tuple(cols)
        raise StopIteration


class DaliLoader:
    """The data-loader contract (see data/__init__.py) on a DALI pipeline.

    A fresh pipeline is built per pass (cheap next to an epoch): breaking out of a pass
    early (steps_per_epoch) then leaves no stale prefetched batches behind.
    """

    def __init__(self, samples, classes, *, train: bool, batch_size: int, out_size: int,
                 val_resize: int, min_scale: float, hflip: bool, threads: int, seed: int,
                 rank: int, world: int, device: str, device_id: int | None,
                 dtype: torch.dtype, channels_last: bool, on_bad_file: str,
                 train_antialias: bool):
        self.samples, self.classes, self.train = samples, list(classes), train
        self.batch_size, self.out_size, self.val_resize = batch_size, out_size, val_resize
        self.min_scale, self.hflip, self.threads, self.seed = min_scale, hflip, threads, seed
        self.rank, self.world, self.device, self.device_id = rank, world, device, device_id
        self.dtype, self.channels_last, self.on_bad_file = dtype, channels_last, on_bad_file
        self.train_antialias = train_antialias
        self.epoch, self.start_batch = 0, 0
        self.bad_files: set[str] = set()
        self.out_device = torch.device("cpu" if device_id is None else f"cuda:{device_id}")
        n = len(samples)
        if train and train_batches(n, world, batch_size) == 0:
            raise ValueError(f"train split has {n} images, fewer than one global batch "
                             f"({world} processes x {batch_size}); lower data.batch_size")
        if train:
            self.num_samples = train_batches(n, world, batch_size) * batch_size
            self.total_samples = self.num_samples * world
        else:
            self.num_samples = len(val_indices(n, rank, world))
            self.total_samples = n

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _plan(self) -> list[list[int]]:
        n = len(self.samples)
        if self.train:
            order = train_indices(n, self.seed, self.epoch, self.rank, self.world,
                                  self.batch_size)
        else:
            order = val_indices(n, self.rank, self.world)
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def bad_file(self, path: str, exc: Exception) -> None:
        if self.on_bad_file == "error":
            raise BadImageError(f"{exc} (set data.on_bad_file=skip to skip such files)") \
                from None
        if path not in self.bad_files:
            self.bad_files.add(path)
            log.warning("skipping unreadable image %s", path)

    def _pipeline(self, feeder: _Feeder):
        fn, types, Pipeline, _ = _import_dali()
        dtype = types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.threads,
                        device_id=self.device_id, prefetch_queue_depth=2)
        with pipe:
            pipe.set_outputs(*_define_graph(fn, types, feeder, self.train, self.device,
                                            self.out_size, dtype,
                                            "HWC" if self.channels_last else "CHW",
                                            self.train_antialias))
        pipe.build()
        return pipe

    def __iter__(self):
        feeder = _Feeder(self, self._plan(), self.start_batch)
        pipe = self._pipeline(feeder)
        while True:
            try:
                outputs = pipe.run()
            except StopIteration:
                return
            except BadImageError:
                raise
            except RuntimeError as exc:  # a decode failure somewhere in the batches in flight
                first = feeder.inflight[0][0] if feeder.inflight else feeder.next
                self._trace_failure(feeder.inflight, exc)
                del pipe
                feeder = _Feeder(self, feeder.plan, first)
                pipe = self._pipeline(feeder)
                continue
            feeder.inflight.popleft()
            yield self._to_torch(outputs)

    def _trace_failure(self, inflight, exc: RuntimeError) -> None:
        """Find the file(s) DALI failed on among ``inflight``; raise or mark them skipped."""
        paths = [p for _, batch in inflight for p in batch]
        culprits = {p: why for p in paths if (why := decode_error(p)) is not None}
        if not culprits:
            where = (f"the {len(paths)} files from {paths[0]} to {paths[-1]}, each of which "
                     f"decodes alone on the CPU" if paths else "no file in flight")
            raise DatasetError(f"DALI pipeline failed ({where}): {dali_reason(exc)}") from None
        for path, why in culprits.items():
            self.bad_file(path, BadImageError(f"cannot decode image {path}: {why}"))

    def _to_torch(self, outputs):
        _, _, _, feed_ndarray = _import_dali()
        on_gpu = self.device == "gpu"
        where = self.out_device if on_gpu else torch.device("cpu")
        stream = torch.cuda.current_stream(where) if on_gpu else None
        images, labels = (out.as_tensor() for out in outputs)
        image_dtype = torch.float16 if self.dtype == torch.float16 else torch.float32
        result = []
        for dense, dtype in ((images, image_dtype), (labels, torch.int64)):
            tensor = torch.empty(dense.shape(), dtype=dtype, device=where)
            feed_ndarray(dense, tensor, cuda_stream=stream)
            result.append(tensor)
        images, labels = result
        if self.channels_last:  # HWC from DALI: an NCHW view with channels_last strides
            images = images.permute(0, 3, 1, 2)
        images = images.to(self.out_device, self.dtype, non_blocking=True)
        return images, labels.to(self.out_device, non_blocking=True)


_checker = None


def decode_error(path: str) -> str | None:
    """Why DALI's CPU decoder cannot decode ``path`` (None when it can): the file-alone check."""
    global _checker
    fn, types, Pipeline, _ = _import_dali()
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    if _checker is None:
        _checker = Pipeline(batch_size=1, num_threads=1, device_id=None,
                            prefetch_queue_depth=1)
        with _checker:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            _checker.set_outputs(fn.decoders.image(encoded, device="cpu",
                                                   output_type=types.RGB))
        _checker.build()
    try:
        _checker.feed_input("encoded", [data])
        _checker.run()
    except RuntimeError as exc:
        _checker = None  # a failed pipeline is not reused
        return dali_reason(exc)
    return None


def dali_reason(exc: Exception) -> str:
    """The operator's own message out of a DALI pipeline error (it follows "encountered:")."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1:]
    reason = [ln for ln in lines if ln and not ln.startswith(("C++ context", "Current pipeline",
                                                              "Critical error"))]
    return " ".join(reason[:2]) or str(exc)


def build_dali_loader(samples, classes, split: str, batch_size: int, img_size: int = 224,
                      val_resize: int = 256, val_img_size: int = 224, min_scale: float = 0.08,
                      hflip: bool = True, threads: int = 4, seed: int = 0, rank: int = 0,
                      world: int = 1, device: str = "auto", device_id: int | None = None,
                      dtype: torch.dtype = torch.float32, channels_last: bool = False,
                      on_bad_file: str = "error", train_antialias: bool = False) -> DaliLoader:
    """A DALI loader over ``samples`` ((path, label) of this split, sorted) for this rank.

    ``train_antialias``: antialias the train resize as PIL/torchvision do (the same tensors
    up to rounding); off by default, see ``_define_graph``.

    ``device``: "gpu" (mixed decode, GPU ops on ``device_id``), "cpu" (CPU ops; the output
    goes to cuda:``device_id`` when given, else stays on the CPU) or "auto".
    """
    _import_dali()  # fail early with the install hint, before any work
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if on_bad_file not in ("error", "skip"):
        raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
    device = resolve_device(device)
    if device == "gpu" and device_id is None:
        device_id = torch.cuda.current_device()
    train = split == "train"
    return DaliLoader(samples, classes, train=train, batch_size=batch_size,
                      out_size=img_size if train else val_img_size, val_resize=val_resize,
                      min_scale=min_scale, hflip=hflip, threads=max(1, threads), seed=seed,
                      rank=rank, world=world, device=device, device_id=device_id, dtype=dtype,
                      channels_last=channels_last, on_bad_file=on_bad_file,
                      train_antialias=train_antialias)
