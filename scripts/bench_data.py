#!/usr/bin/env python
"""Images/s of the data pipelines: DALI (CPU, N threads) vs torchvision (N DataLoader workers).

    python scripts/bench_data.py                       # generated ImageNet-like JPEGs
    python scripts/bench_data.py --data /data/imagenet --workers 8 --repeats 5

Both backends are built exactly as training builds them (``data.build_loader`` with
data.backend=torchvision or dali, data.workers=N, on the CPU): torchvision is ImageFolder-style
files + PIL + ``DataLoader(num_workers=N, persistent_workers=True)`` whose workers return
uint8 crops that are normalized once per batch; DALI runs ``data/dali.py`` on CPU operators
with N threads. Train: RandomResizedCrop(224)+flip; val: Resize(256)+CenterCrop(224);
normalized float32 NCHW batches. For context, a third kind is the textbook torchvision recipe
(``ToTensor()+Normalize`` inside the workers, as in torchvision's ImageNet example), which is
not what our backend does. Without ``--data`` a folder of ImageNet-like JPEGs (500x375 and
375x500, quality 90, ~75 KB each) is generated once under .cache/bench_data/.

Each measurement runs in its own subprocess (the loaders' processes and threads do not
meet); the kinds are interleaved over ``--repeats`` rounds and the median is reported; a
measurement that exceeds ``--cap`` seconds is recorded as null. Images/s and CPU time cover
the same window: from the ``--warmup``-th batch (worker start-up and pipeline build excluded)
to the last batch of ``--epochs`` epochs. The last line of output is one JSON object with
every figure, including ``dali_train_speedup`` and ``dali_val_speedup`` (DALI over our
torchvision backend, images/s).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
KINDS = ("torchvision_train", "dali_train", "classic_train", "torchvision_val", "dali_val",
         "classic_val")
METRICS = ("img_per_s", "cpu_ms_per_img", "cores_busy")


def _photo(rng: np.random.Generator, width: int, height: int):
    """Smooth colour fields at three scales plus sensor-like noise: photo-sized JPEGs."""
    from PIL import Image

    img = np.full((height, width, 3), 128.0, np.float32)
    for cells, amplitude in ((4, 120), (16, 60), (64, 40)):
        field = rng.random((max(1, cells * height // width), cells, 3))
        up = Image.fromarray((field * 255).astype(np.uint8)).resize((width, height),
                                                                    Image.BICUBIC)
        img += (np.asarray(up, np.float32) / 255 - 0.5) * amplitude
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_dataset(root: Path, train: int, val: int, classes: int = 8) -> Path:
    """ImageNet-like tree (train/ and val/, ``classes`` folders) under ``root``; made once."""
    done = root / ".complete"
    if done.exists():
        return root
    from tqdm import tqdm

    rng = np.random.default_rng(0)
    jobs = [(split, i) for split, n in (("train", train), ("val", val)) for i in range(n)]
    for split, i in tqdm(jobs, desc=f"generating {root}", unit="img", file=sys.stderr):
        folder = root / split / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        size = (375, 500) if i % 5 == 0 else (500, 375)  # ImageNet's two common shapes
        _photo(rng, *size).save(folder / f"{split}_{i:05d}.JPEG", "JPEG", quality=90)
    done.touch()
    return root


def _classic_loader(root: Path, split: str, workers: int, batch: int):
    """The textbook recipe (torchvision's ImageNet example): float tensors made in the workers."""
    import torch
    from torchvision import datasets, transforms

    from data.presets import IMAGENET_MEAN, IMAGENET_STD

    crop = ([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()]
            if split == "train" else [transforms.Resize(256), transforms.CenterCrop(224)])
    tf = transforms.Compose(crop + [transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = datasets.ImageFolder(str(root / split), tf)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=split == "train",
                                       num_workers=workers, drop_last=split == "train")


def _backend_loader(backend: str, root: Path, split: str, workers: int, batch: int):
    """Our data.backend=torchvision|dali loader, built as train.py builds it (data.build_loader)."""
    from data import build_loader
    from sge.config import load_config

    cfg = load_config(None, [f"data.root={root}", f"data.backend={backend}",
                             "data.dali_device=cpu", f"data.workers={workers}",
                             f"data.batch_size={batch}"])
    return build_loader(cfg, split)


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def loader_cpu_seconds() -> float | None:
    """User+system CPU seconds of this process (all threads) and of every descendant, live or
    exited (None without Linux /proc).

    Live processes are read from /proc, so worker processes count while they run (a
    difference over a window then covers exactly that window); exited, reaped ones come from
    RUSAGE_CHILDREN. A worker live at the start and reaped by the end is counted by /proc
    first and by rusage (its whole life) later: the difference is its time in the window.
    """
    import resource

    total, todo, seen = 0, [os.getpid()], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (ticks), all threads
            for task in os.listdir(f"/proc/{pid}/task"):
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text()
                         .split()]
        except FileNotFoundError:  # exited meanwhile: rusage has it once it is reaped
            if pid == os.getpid():
                return None
        except (OSError, ValueError):
            return None
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return total / _TICKS + reaped.ru_utime + reaped.ru_stime


def measure(kind: str, root: Path, workers: int, batch: int, warmup: int, epochs: int) -> dict:
    """``epochs`` epochs of one loader; images/s and CPU over the same window.

    The window runs from the ``warmup``-th batch of the first epoch (worker start-up and
    pipeline build excluded) to the last batch of the last epoch (later epochs' start-up
    included, as in training). CPU time is this process's (DALI's threads included) plus its
    worker processes', read at both ends of the window (``loader_cpu_seconds``);
    ``cores_busy`` = CPU seconds / wall seconds, at most the machine's core count.
    """
    import torch

    torch.set_num_threads(1)  # the loaders' own workers/threads do the work being measured
    backend, split = kind.split("_")
    if backend == "dali":
        from data.dali import _import_dali
        _import_dali()  # loading the library is not part of the figures
    if backend == "classic":
        loader = _classic_loader(root, split, workers, batch)
    else:
        loader = _backend_loader(backend, root, split, workers, batch)
    timed = 0
    for epoch in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for step, (x, y) in enumerate(loader, 1):
            assert x.shape[1:] == (3, 224, 224) and x.dtype == torch.float32
            assert len(y) == len(x)
            if epoch == 0 and step == warmup:
                start, cpu0 = time.perf_counter(), loader_cpu_seconds()
            elif epoch > 0 or step > warmup:
                timed += len(x)
            if epoch == epochs - 1 and step == len(loader):  # before workers shut down
                wall, cpu1 = time.perf_counter() - start, loader_cpu_seconds()
    cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return {"img_per_s": timed / wall, "images": timed,
            "cpu_ms_per_img": None if cpu is None else 1000 * cpu / timed,
            "cores_busy": None if cpu is None else cpu / wall}


def agreement(root: Path, images: int) -> dict:
    """DALI vs the torchvision presets on the same files: |difference| in normalized units.

    Train compares the same crop windows and flips (both draw them from (seed, epoch,
    index)), so what is left is decoder and resampler rounding, plus, in DALI's default
    train pipeline, the missing antialias ("train"); "train_antialiased" is DALI with
    ``train_antialias=True``, PIL's filter.
    """
    import torch

    from data.dali import build_dali_loader
    from data.folder import load_rgb, scan_split
    from data.presets import (IMAGENET_MEAN, IMAGENET_STD, TrainPreset, ValPreset,
                              sample_rng)
    from data.sharding import train_indices

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    result = {}
    for name, split, antialias in (("train", "train", False),
                                   ("train_antialiased", "train", True), ("val", "val", True)):
        preset = TrainPreset(224) if split == "train" else ValPreset(256, 224)
        classes, samples = scan_split(root, split)
        samples = samples[:images]
        loader = build_dali_loader(samples, classes, split, 32, threads=2, device="cpu",
                                   train_antialias=antialias)
        dali = torch.cat([x for x, _ in loader])
        order = (train_indices(len(samples), 0, 0, 0, 1, 32) if split == "train"
                 else range(len(samples)))
        ref = torch.stack([preset(load_rgb(samples[i][0]), sample_rng(0, 0, i))
                           for i in order]).float()
        diff = (dali - (ref - mean) / std).abs()
        result[f"dali_{name}_mean_abs_diff"] = round(diff.mean().item(), 5)
        result[f"dali_{name}_max_abs_diff"] = round(diff.max().item(), 4)
        result[f"dali_{name}_images_compared"] = len(dali)
    return result


def _child(kind: str, args) -> dict | None:
    cmd = [sys.executable, __file__, "--measure", kind, "--data", str(args.data),
           "--workers", str(args.workers), "--batch", str(args.batch),
           "--warmup", str(args.warmup), "--epochs", str(args.epochs),
           "--agreement", str(args.agreement)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cap, cwd=REPO)
    except subprocess.TimeoutExpired:
        print(f"  {kind}: over the {args.cap:g} s cap -> null", file=sys.stderr)
        return None
    if done.returncode != 0:
        print(f"  {kind} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "img_per_s" in result:
        print(f"  {kind}: {result['img_per_s']:.1f} img/s, {result['cpu_ms_per_img']} CPU "
              f"ms/img, {result['cores_busy']} cores busy", file=sys.stderr)
    return result


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def summarize(runs: dict, args) -> dict:
    """Medians per kind and metric, the DALI/torchvision ratios, and every raw run."""
    result = {"data": str(args.data), "workers": args.workers, "batch": args.batch,
              "epochs": args.epochs, "repeats": args.repeats, "cpu": _cpu_model(),
              "cpu_count": os.cpu_count(), "runs": {}}
    for metric in METRICS:
        for kind, measured in runs.items():
            values = [None if r is None or r[metric] is None else round(r[metric], 2)
                      for r in measured]
            result["runs"][f"{kind}_{metric}"] = values
            result[f"{kind}_{metric}"] = (round(statistics.median(values), 2)
                                          if values and None not in values else None)
    for split in ("train", "val"):
        tv, dali = f"torchvision_{split}", f"dali_{split}"
        result[f"dali_{split}_speedup"] = _ratio(result.get(f"{dali}_img_per_s"),
                                                 result.get(f"{tv}_img_per_s"))
        result[f"dali_{split}_cpu_saving"] = _ratio(result.get(f"{tv}_cpu_ms_per_img"),
                                                    result.get(f"{dali}_cpu_ms_per_img"))
        result[f"dali_{split}_speedup_over_classic"] = _ratio(
            result.get(f"{dali}_img_per_s"), result.get(f"classic_{split}_img_per_s"))
    return result


LABELS = {"torchvision": "torchvision (our backend)", "dali": "DALI CPU (our backend)",
          "classic": "torchvision textbook recipe"}


def print_table(result: dict) -> None:
    print(f"\n{result['workers']} DataLoader workers = DALI threads, batch {result['batch']}, "
          f"{result['epochs']} epochs per run, {result['cpu']} ({result['cpu_count']} CPUs); "
          f"median of {result['repeats']} interleaved runs")
    print(f"{'loader':<34}{'img/s':>9}{'CPU ms/img':>12}{'cores busy':>12}")
    for split in ("train", "val"):
        for backend, label in LABELS.items():
            if f"{backend}_{split}_img_per_s" in result:
                row = ["null" if (v := result[f"{backend}_{split}_{m}"]) is None else v
                       for m in METRICS]
                print(f"{split + ' ' + label:<34}{row[0]:>9}{row[1]:>12}{row[2]:>12}")
    for split in ("train", "val"):
        print(f"{split}: DALI / torchvision backend {result[f'dali_{split}_speedup']}x images/s, "
              f"{result[f'dali_{split}_cpu_saving']}x less CPU per image; DALI / textbook "
              f"recipe {result[f'dali_{split}_speedup_over_classic']}x images/s")
    for split in ("train", "train_antialiased", "val"):
        if f"dali_{split}_mean_abs_diff" in result:
            print(f"{split} tensors, DALI vs torchvision on the same "
                  f"{result[f'dali_{split}_images_compared']} files: mean |diff| "
                  f"{result[f'dali_{split}_mean_abs_diff']}, max "
                  f"{result[f'dali_{split}_max_abs_diff']} (normalized units)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="ImageFolder root with train/ and val/ "
                        "(default: generate under .cache/bench_data)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="DataLoader workers = DALI threads")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="batches not timed")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--cap", type=float, default=300, help="seconds per measurement")
    parser.add_argument("--generate", type=int, nargs=2, default=(640, 640),
                        metavar=("TRAIN", "VAL"), help="images to generate per split")
    parser.add_argument("--agreement", type=int, default=128,
                        help="images compared DALI vs torchvision per split (0: skip)")
    parser.add_argument("--measure", choices=KINDS + ("agreement",),
                        help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.epochs < 1:
        parser.error("--warmup and --epochs must be at least 1")
    sys.path.insert(0, str(REPO))
    if args.measure == "agreement":
        print(json.dumps(agreement(args.data, args.agreement)))
        return 0
    if args.measure:
        print(json.dumps(measure(args.measure, args.data, args.workers, args.batch,
                                 args.warmup, args.epochs)))
        return 0
    if args.data is None:
        args.data = make_dataset(REPO / ".cache" / "bench_data" /
                                 f"imagenet_like_{args.generate[0]}_{args.generate[1]}",
                                 *args.generate)
    args.data = args.data.expanduser().resolve()
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(KINDS):
        parser.error(f"--kinds: choose from {','.join(KINDS)}, got {args.kinds!r}")
    runs = {kind: [] for kind in kinds}
    for r in range(args.repeats):
        print(f"round {r + 1}/{args.repeats}", file=sys.stderr)
        for kind in kinds:
            runs[kind].append(_child(kind, args))
    result = summarize(runs, args)
    if args.agreement:
        result.update(_child("agreement", args) or {})
    print_table(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
