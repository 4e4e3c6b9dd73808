"""Where a train step's time goes on a GPU: wall time against GPU kernel time, and where the
GPU waits.

    python scripts/profile_step.py --device cuda --batch 128 --amp bfloat16 --channels-last
    python scripts/profile_step.py --device cuda --variants sge_resnet50_fused --trace runs/prof
    python scripts/profile_step.py --batch 2 --img 32 --steps 2 --rounds 1   # CPU smoke

For each model (``bench_sge.py``'s variants and train step: random data, SGD): the step
time with steps queued back to back as in training (no synchronization between them;
median over ``--rounds``), then ``torch.profiler`` over ``--profile-steps`` steps: the GPU's
kernel time per step, its idle time (the profiled span minus the time any kernel ran), the
kernels that cost most, and the idle gaps grouped by the kernel that ends each one (what the
GPU was waiting to be given). A step whose idle time is large waits on the host; the gaps
say in which part of the step. ``--trace`` also writes each model's timeline for
chrome://tracing or Perfetto. On a CPU there is no kernel timeline: wall time only.

Why (docs/benchmarks.md, "Fourth GPU session"): on an H200, SGE-ResNet50's kernels took 1.12x
ResNet50's time per step, its step 1.51x. Last line: one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_sge  # noqa: E402  (the same models and train step as the SGE benchmark)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="resnet50,sge_resnet50_fused",
                    help=f"comma-separated subset of {','.join(bench_sge.VARIANTS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--amp", default="bfloat16", choices=("none", "bfloat16", "float16"))
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per model")
    ap.add_argument("--steps", type=int, default=20, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds, models alternating")
    ap.add_argument("--profile-steps", type=int, default=5, help="steps under the profiler")
    ap.add_argument("--top", type=int, default=12, help="rows per table")
    ap.add_argument("--min-gap-us", type=float, default=1.0,
                    help="idle stretches shorter than this are not listed (still counted)")
    ap.add_argument("--trace", type=Path, help="folder for <model>.json timelines")
    args = ap.parse_args(argv)
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in bench_sge.VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {','.join(bench_sge.VARIANTS)}")
    return args


def gpu_timeline(intervals, min_gap_us: float = 1.0) -> dict:
    """Busy and idle time of one GPU stream from its kernels' ``(name, start_us, end_us)``:
    ``busy_us`` (union of the intervals), ``span_us`` (first start to last end), ``idle_us``
    (their difference), ``gaps``: ``{name: [idle us, count]}`` of the idle stretches of at
    least ``min_gap_us`` before each kernel, by that kernel's name."""
    busy = idle = 0.0
    gaps: dict = defaultdict(lambda: [0.0, 0])
    order = sorted(intervals, key=lambda k: (k[1], k[2]))
    end = None
    for name, start, stop in order:
        if end is None or start >= end:
            if end is not None:
                idle += start - end
                if start - end >= min_gap_us:
                    gaps[name][0] += start - end
                    gaps[name][1] += 1
            busy += stop - start
            end = stop
        elif stop > end:  # overlaps the busy stretch: only its tail is new
            busy += stop - end
            end = stop
    span = (end - order[0][1]) if order else 0.0
    return {"busy_us": busy, "idle_us": idle, "span_us": span, "gaps": dict(gaps)}


def _profile(step, steps: int, cuda: bool, sync, trace: Path | None,
             min_gap_us: float) -> dict | None:
    """Kernel timeline figures per step (None without CUDA), the trace written if asked."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync()
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    if not cuda:
        return None
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    line = gpu_timeline(kernels, min_gap_us)
    by_name: dict = defaultdict(lambda: [0.0, 0])
    for name, start, stop in kernels:
        by_name[name][0] += stop - start
        by_name[name][1] += 1
    per = 1e3 * steps  # us over all steps -> ms per step
    return {"kernel_ms": line["busy_us"] / per, "idle_ms": line["idle_us"] / per,
            "kernels": sorted(([n, t / per, c / steps] for n, (t, c) in by_name.items()),
                              key=lambda r: -r[1]),
            "gaps": sorted(([n, t / per, c / steps] for n, (t, c) in line["gaps"].items()),
                           key=lambda r: -r[1])}


def _table(title: str, rows, top: int) -> None:
    print(f"  {title}")
    for name, ms, count in rows[:top]:
        print(f"    {ms:8.3f} ms {count:7.1f}x  {name[:90]}")


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = {"measure": "train", "threads": torch.get_num_threads(), "device": args.device,
            "batch": args.batch, "img": args.img, "amp": args.amp,
            "channels_last": args.channels_last}
    env = bench_sge._setup(spec)
    device, sync = env.device, env.sync
    cuda = device.type == "cuda"
    steps = {name: bench_sge._step_fn(spec, name, env) for name in args.variants}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    walls: dict = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync()
            walls[name].append((time.perf_counter() - t0) * 1e3 / args.steps)
    result = {}
    print(f"batch {args.batch}, {args.img} px, {device}, amp={args.amp}, channels_last="
          f"{args.channels_last}; wall: median of {args.rounds} rounds of {args.steps} steps "
          f"queued back to back; profile: {args.profile_steps} steps")
    for name, step in steps.items():
        trace = args.trace / f"{name}.json" if args.trace else None
        timeline = None  # on a CPU the profiler runs only to write the trace
        if cuda or trace is not None:
            timeline = _profile(step, args.profile_steps, cuda, sync, trace, args.min_gap_us)
        figs = {"wall_ms": statistics.median(walls[name]),
                **(timeline or {"kernel_ms": None, "idle_ms": None, "kernels": [], "gaps": []})}
        result[name] = figs
        if figs["kernel_ms"] is None:
            print(f"{name}: wall {figs['wall_ms']:.2f} ms/step (no GPU kernel timeline on "
                  f"{device.type})")
            continue
        print(f"{name}: wall {figs['wall_ms']:.2f} ms/step, GPU kernels "
              f"{figs['kernel_ms']:.2f} ms/step, GPU idle {figs['idle_ms']:.2f} ms/step")
        _table("kernels (ms per step, calls per step):", figs["kernels"], args.top)
        _table("GPU idle before (ms per step, stretches per step):", figs["gaps"], args.top)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(json.dumps({"config": config, "models": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
