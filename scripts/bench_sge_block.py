"""What SGE adds to one bottleneck block's tail, per ResNet-50 stage, side by side.

    python scripts/bench_sge_block.py --device cuda --batch 128 --dtype bfloat16 --channels-last
    python scripts/bench_sge_block.py --batch 4 --img 64 --iters 5      # CPU
    python scripts/bench_sge_block.py --batch 16 --img 112 --channels-last --downsample

A block ends ``relu(bn3(conv3) + identity)``; with SGE, ``relu(sge(bn3(conv3)) + identity)``,
which the fused SGE computes in one op (BN, SGE, the add and the ReLU). This times that
tail alone, forward and forward+backward in training mode and inference (eval mode, BN's
running statistics, no_grad; the fused tail writes over its input there, as in the models),
on each stage's shape (224 px: 256 x 56 x 56 ... 2048 x 7 x 7) for ResNet (BN), the fused
SGE and the reference SGE, all in one process, alternating. Beside them: one copy of the
conv output (read + write), the floor a memory-bound pass costs, and the fused op's own
forward and backward kernels.
The backward gets the caller's gradient (``backward(dy)``), which the fused op must leave
intact: in a model's train step autograd alone holds each block's, and the op writes the
residual's gradient over it instead of a new map (one fresh map less than timed here).
``--downsample`` times a downsampling block's tail instead, whose shortcut ends with its own
BN: ``relu(bn3(conv3) + bn_ds(shortcut conv))``, where the fused SGE applies ``bn_ds`` too
on its C++ path (``residual_norm``). Whole-model figures are ``scripts/bench_sge.py``'s;
this says which stage and which pass the difference comes from.

Prints one table (milliseconds per call, medians of ``--rounds`` rounds of ``--iters``
calls; ratios to ResNet's tail), on a GPU a second one with the host's time to issue the
same calls (where it equals the GPU time, the stage is bound by host time), and one JSON
line (``ms``, ``host_ms``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sge.fused import FusedSpatialGroupEnhance, _batch_stats  # noqa: E402
from sge.layer import SpatialGroupEnhance  # noqa: E402

STAGES = ((256, 4), (512, 8), (1024, 16), (2048, 32))  # channels, downsampling from img


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=20, help="calls per timed round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (medians)")
    ap.add_argument("--downsample", action="store_true",
                    help="a downsampling block's tail: the shortcut ends with its own BN")
    return ap.parse_args(argv)


class Tail(nn.Module):
    """``relu(sge(bn(z)) + identity)``, as the models run it; ``sge`` None: ResNet's tail.
    ``downsample``: the shortcut's BN, ``relu(sge(bn(z)) + shortcut_bn(identity))``."""

    def __init__(self, channels: int, sge: str | None, groups: int, downsample: bool = False):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.shortcut_bn = nn.BatchNorm2d(channels) if downsample else None
        self.sge = None
        if sge == "fused":
            self.sge = FusedSpatialGroupEnhance(channels, groups)
            self.sge.defer_norm(self, "bn")
        elif sge == "reference":
            self.sge = SpatialGroupEnhance(channels, groups)
        if self.sge is not None:  # the checkpoints' values: gating is not the identity
            nn.init.normal_(self.sge.weight, std=0.5)
            nn.init.normal_(self.sge.bias, std=0.5)

    def forward(self, z, identity):
        x = self.bn(z)
        if isinstance(self.sge, FusedSpatialGroupEnhance):
            # As the models' blocks (no hooks here): written over z when no gradient is
            # being recorded, the shortcut's BN applied by the op
            return self.sge(x, residual=identity, overwrite_input=True,
                            residual_norm=self.shortcut_bn)
        if self.shortcut_bn is not None:
            identity = self.shortcut_bn(identity)
        if self.sge is not None:
            x = self.sge(x)
        x += identity  # in place, as timm's blocks: no fresh tensors (page faults on a CPU)
        return x.relu_()


def _timer(device):
    """``timed(fn, iters)`` -> ``(ms per call, host ms per call)``: on CUDA the first from
    events (GPU time), the second the time the host took to issue the calls; where that is
    as long as the GPU time, the calls are bound by host time. On a CPU both are wall time."""
    if device.type == "cuda":
        def timed(fn, iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            host = (time.perf_counter() - t0) * 1e3 / iters
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / iters, host
    else:
        def timed(fn, iters):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            ms = (time.perf_counter() - t0) * 1e3 / iters
            return ms, ms
    return timed


def stage_cases(args, channels, side, device, dtype, fmt):
    """``{name: zero-argument call}`` for one stage's shape."""
    n = args.batch
    z = torch.randn(n, channels, side, side, device=device).to(dtype, memory_format=fmt)
    identity, dy = torch.randn_like(z), torch.randn_like(z)
    z.requires_grad_(True)
    identity.requires_grad_(args.downsample)  # a shortcut conv's output
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    cases = {"copy": lambda: z.detach().clone()}
    tails = {}
    for kind in (None, "fused", "reference"):
        tail = tails[kind] = Tail(channels, kind, args.groups, args.downsample).to(
            device, memory_format=fmt)
        tail.train()
        name = kind or "resnet"

        def fwd(tail=tail):
            with autocast:
                return tail(z, identity)

        def fwd_bwd(fwd=fwd):
            fwd().backward(dy)
        cases[f"{name} fwd"], cases[f"{name} fwd+bwd"] = fwd, fwd_bwd
        # Inference: another tail in eval mode (BN's running statistics), under no_grad.
        frozen = Tail(channels, kind, args.groups, args.downsample).to(
            device, memory_format=fmt).eval()
        for norm in (frozen.bn, frozen.shortcut_bn):
            if norm is not None:
                norm.running_mean.normal_(0, 0.1)
                norm.running_var.uniform_(0.5, 1.5)

        # The fused tail writes its output over its input there (on the C++ path): its own
        # copy of z, overwritten call after call.
        z_own = z.detach().clone() if kind == "fused" else z

        def infer(tail=frozen, z_own=z_own):
            with torch.no_grad(), autocast:
                return tail(z_own, identity)
        cases[f"{name} infer"] = infer
    # The fused tail's op alone, with the statistics that tail uses (without a shortcut BN).
    bn, sge = tails["fused"].bn, tails["fused"].sge
    mean, var, zmean = _batch_stats(bn, z.detach())
    op_args = (z.detach(), bn.weight.detach(), bn.bias.detach(), mean, var, zmean,
               sge.weight.detach(), sge.bias.detach(), identity.detach(), args.groups, True,
               bn.eps)
    y, chat, sigma, m = torch.ops.sge.fused_forward(*op_args, True)
    cases["fused: batch stats"] = lambda: _batch_stats(bn, z.detach())
    cases["fused: op fwd"] = lambda: torch.ops.sge.fused_forward(*op_args, True)
    cases["fused: op bwd"] = lambda: torch.ops.sge.fused_backward(
        dy, y, z.detach(), bn.weight.detach(), bn.bias.detach(), mean, var, chat, sigma, m,
        sge.weight.detach(), sge.bias.detach(), True, bn.eps)
    return cases


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    timed = _timer(device)
    results, host = {}, {}
    for channels, down in STAGES:
        side = max(1, args.img // down)
        cases = stage_cases(args, channels, side, device, dtype, fmt)
        for fn in cases.values():  # warm-up: kernels' first load and autotuning
            fn()
        times = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                times[name].append(timed(fn, args.iters))
        stage = f"{channels}x{side}x{side}"
        results[stage] = {k: statistics.median(t for t, _ in v) for k, v in times.items()}
        host[stage] = {k: statistics.median(h for _, h in v) for k, v in times.items()}
    print(f"batch {args.batch}, {args.dtype}, channels_last={args.channels_last}, "
          f"downsample={args.downsample}, {args.device}, G={args.groups}; ms per call, "
          f"medians of {args.rounds} x {args.iters}; (ratio to resnet's tail)")
    _print_table(results)
    if device.type == "cuda":
        print("host ms per call (the time to issue the calls; as long as the GPU time above: "
              "bound by host time)")
        _print_table(host)
    print(json.dumps({"config": vars(args), "ms": results, "host_ms": host}))
    return 0


def _print_table(results: dict) -> None:
    """One row per case, one column per stage; SGE cases with their ratio to ResNet's."""
    print(f"{'':<22}" + "".join(f"{stage:>20}" for stage in results))
    for name in next(iter(results.values())):
        kind, _, part = name.partition(" ")
        cells = []
        for figs in results.values():
            ratio = (f" ({figs[name] / figs['resnet ' + part]:.2f}x)"
                     if kind in ("fused", "reference") else "")
            cells.append(f"{figs[name]:.3f}{ratio}".rjust(20))
        print(f"{name:<22}" + "".join(cells))


if __name__ == "__main__":
    sys.exit(main())
