#!/usr/bin/env python
"""Images/s of the data pipelines: DALI (CPU, N threads) vs torchvision (N DataLoader workers).

    python scripts/bench_data.py                       # generated ImageNet-like JPEGs
    python scripts/bench_data.py --data /data/imagenet --workers 8 --repeats 5

The reference is the classic torchvision set-up: ``ImageFolder`` + PIL +
``DataLoader(num_workers=N)`` with RandomResizedCrop(224)+flip (train) or
Resize(256)+CenterCrop(224) (val), normalized float NCHW batches. DALI is
``data.dali.build_dali_loader`` on CPU operators with N threads, the same outputs.
Without ``--data`` a folder of ImageNet-like JPEGs (500x375 and 375x500, quality 90,
~75 KB each) is generated once under .cache/bench_data/.

Each measurement runs in its own subprocess (the loaders' processes and threads do not
meet); the kinds are interleaved over ``--repeats`` rounds and the median is reported; a
measurement that exceeds ``--cap`` seconds is recorded as null. Images/s counts the
batches after the first ``--warmup`` ones (worker start-up and pipeline build excluded).
The last line of output is one JSON object with every figure, including
``dali_train_speedup`` and ``dali_val_speedup`` (DALI over torchvision images/s).
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
KINDS = ("torchvision_train", "dali_train", "torchvision_val", "dali_val")


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


def _torchvision_loader(root: Path, split: str, workers: int, batch: int):
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


def _dali_loader(root: Path, split: str, workers: int, batch: int):
    from data.dali import build_dali_loader
    from data.folder import scan_split

    classes, samples = scan_split(root, split)
    return build_dali_loader(samples, classes, split, batch, threads=max(1, workers),
                             device="cpu")


def measure(kind: str, root: Path, workers: int, batch: int, warmup: int) -> dict:
    """One epoch of one loader: images/s after ``warmup`` batches, CPU ms per image overall.

    CPU time counts this process (DALI's threads included) and the DataLoader's worker
    processes (once they have exited), from just before the loader is built: under a
    loaded machine it moves far less than wall-clock throughput.
    """
    import resource

    import torch

    torch.set_num_threads(1)  # the loaders' own workers/threads do the work being measured
    backend, split = kind.split("_")
    if backend == "dali":
        from data.dali import _import_dali
        _import_dali()  # loading the library is not part of the figures
        build = _dali_loader
    else:
        build = _torchvision_loader
    cpu0 = time.process_time()
    loader = build(root, split, workers, batch)
    images = timed = 0
    for step, (x, y) in enumerate(loader, 1):
        assert x.shape[1:] == (3, 224, 224) and x.dtype == torch.float32 and len(y) == len(x)
        images += len(x)
        if step == warmup:
            start = time.perf_counter()
        elif step > warmup:
            timed += len(x)
    wall = time.perf_counter() - start
    del loader, x, y  # DataLoader workers exit and are reaped: their CPU time becomes visible
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - cpu0 + children.ru_utime + children.ru_stime
    return {"img_per_s": timed / wall, "cpu_ms_per_img": 1000 * cpu / images, "images": timed}


def agreement(root: Path, images: int) -> dict:
    """DALI vs the torchvision presets on the same files: |difference| in normalized units.

    Train compares the same crop windows and flips (both draw them from (seed, epoch,
    index)), so what is left in either split is decoder and resampler rounding.
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
    for split, preset in (("train", TrainPreset(224)), ("val", ValPreset(256, 224))):
        classes, samples = scan_split(root, split)
        samples = samples[:images]
        loader = build_dali_loader(samples, classes, split, 32, threads=2, device="cpu")
        dali = torch.cat([x for x, _ in loader])
        order = (train_indices(len(samples), 0, 0, 0, 1, 32) if split == "train"
                 else range(len(samples)))
        ref = torch.stack([preset(load_rgb(samples[i][0]), sample_rng(0, 0, i))
                           for i in order]).float()
        diff = (dali - (ref - mean) / std).abs()
        result[f"dali_{split}_mean_abs_diff"] = round(diff.mean().item(), 5)
        result[f"dali_{split}_max_abs_diff"] = round(diff.max().item(), 4)
        result[f"dali_{split}_images_compared"] = len(dali)
    return result


def _child(kind: str, args) -> dict | None:
    cmd = [sys.executable, __file__, "--measure", kind, "--data", str(args.data),
           "--workers", str(args.workers), "--batch", str(args.batch),
           "--warmup", str(args.warmup), "--agreement", str(args.agreement)]
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
        print(f"  {kind}: {result['img_per_s']:.1f} img/s, "
              f"{result['cpu_ms_per_img']:.1f} CPU ms/img", file=sys.stderr)
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
              "repeats": args.repeats, "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
              "runs": {}}
    for metric in ("img_per_s", "cpu_ms_per_img"):
        for kind, measured in runs.items():
            values = [None if r is None else round(r[metric], 2) for r in measured]
            result["runs"][f"{kind}_{metric}"] = values
            result[f"{kind}_{metric}"] = (round(statistics.median(values), 2)
                                          if values and None not in values else None)
    for split in ("train", "val"):
        tv, dali = f"torchvision_{split}", f"dali_{split}"
        result[f"dali_{split}_speedup"] = _ratio(result[f"{dali}_img_per_s"],
                                                 result[f"{tv}_img_per_s"])
        result[f"dali_{split}_cpu_saving"] = _ratio(result[f"{tv}_cpu_ms_per_img"],
                                                    result[f"{dali}_cpu_ms_per_img"])
    return result


def print_table(result: dict) -> None:
    print(f"\n{result['workers']} DataLoader workers = DALI threads, batch {result['batch']}, "
          f"{result['cpu']} ({result['cpu_count']} CPUs); median of {result['repeats']} "
          f"interleaved runs")
    print(f"{'':<6}{'img/s torchvision':>18}{'img/s DALI':>12}{'speedup':>9}"
          f"{'CPU ms/img tv':>15}{'CPU ms/img DALI':>17}{'CPU saving':>12}")
    for split in ("train", "val"):
        row = [result[f"torchvision_{split}_img_per_s"], result[f"dali_{split}_img_per_s"],
               result[f"dali_{split}_speedup"], result[f"torchvision_{split}_cpu_ms_per_img"],
               result[f"dali_{split}_cpu_ms_per_img"], result[f"dali_{split}_cpu_saving"]]
        row = ["null" if v is None else v for v in row]
        print(f"{split:<6}{row[0]:>18}{row[1]:>12}{row[2]:>9}{row[3]:>15}{row[4]:>17}"
              f"{row[5]:>12}")
    for split in ("train", "val"):
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
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--cap", type=float, default=300, help="seconds per measurement")
    parser.add_argument("--generate", type=int, nargs=2, default=(640, 640),
                        metavar=("TRAIN", "VAL"), help="images to generate per split")
    parser.add_argument("--agreement", type=int, default=128,
                        help="images compared DALI vs torchvision per split (0: skip)")
    parser.add_argument("--measure", choices=KINDS + ("agreement",),
                        help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.measure == "agreement":
        print(json.dumps(agreement(args.data, args.agreement)))
        return 0
    if args.measure:
        print(json.dumps(measure(args.measure, args.data, args.workers, args.batch,
                                 args.warmup)))
        return 0
    if args.data is None:
        args.data = make_dataset(REPO / ".cache" / "bench_data" /
                                 f"imagenet_like_{args.generate[0]}_{args.generate[1]}",
                                 *args.generate)
    args.data = args.data.expanduser().resolve()
    runs = {kind: [] for kind in KINDS}
    for r in range(args.repeats):
        print(f"round {r + 1}/{args.repeats}", file=sys.stderr)
        for kind in KINDS:
            runs[kind].append(_child(kind, args))
    result = summarize(runs, args)
    if args.agreement:
        result.update(_child("agreement", args) or {})
    print_table(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
