#!/usr/bin/env python
"""Collect run directories into the paper's results table (Markdown) and draw the plots.

    python scripts/report.py runs/resnet50 runs/sge_resnet50 --out runs/results.md --plots runs/
    python scripts/report.py runs/sweep            # every run dir below it (a group sweep)

Runs that a fresh start moved to a run directory's ``previous/`` are left out of a search
below a folder; name one to report it.

A run directory holds ``config.yaml`` and ``metrics.jsonl`` (DESIGN.md). Per run: model,
SGE groups, parameters, GFLOPs (multiply-adds per image at the run's validation crop,
counted as the paper's table counts them: sge/flops.py), the best validation top-1 and its
epoch (the paper reports the best epoch), top-5 at that epoch, and for the paper's own
settings (1000 classes, full width, G=64) the published top-1 and our difference. When
``eval.txt`` (the output of eval.py, as the group sweep writes it) exists, its numbers are
shown too.

Plots (``--plots DIR``): ``curves.png``, validation top-1 and loss per epoch of each run
drawn over the published per-epoch curves of the paper's ResNet and SGE-ResNet runs
(docs/reference/, for 1000-class runs or with --reference always); and, when the runs differ
in their SGE group count, ``groups.png``: best top-1 against the number of groups.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import model_loading as ml  # also puts the repository on sys.path
import yaml
from model_info import PAPER  # the published numbers, kept in one place

import models
from sge.flops import count_params, paper_macs
from sge.runlog import PREVIOUS

REFERENCE = ml.ROOT / "docs" / "reference"
EVAL_LINE = re.compile(r"top1=([\d.]+) top5=([\d.]+) images=(\d+)")


@dataclass
class Run:
    dir: Path
    config: dict
    val: list = field(default_factory=list)      # val rows, one per (epoch, weights)
    train: list = field(default_factory=list)    # train rows, one per epoch
    eval: tuple | None = None                    # (top1, top5, images) from eval.txt

    @property
    def model(self) -> dict:
        return self.config.get("model", {})

    @property
    def groups(self):
        return self.model.get("groups") if models.is_sge(self.model.get("name", "")) else None

    def best(self):
        """The best val row; on a tie the earliest epoch, as best.pt keeps it."""
        best = None
        for row in self.val:
            if best is None or row["top1"] > best["top1"]:
                best = row
        return best


class ReportError(RuntimeError):
    pass


def _last_per_key(rows, key):
    """Keep the last row per key: a run resumed from a checkpoint older than the row count
    that ``last.pt`` records may have logged an epoch twice."""
    out = {}
    for row in rows:
        out[key(row)] = row
    return sorted(out.values(), key=lambda r: r["epoch"])


def load_run(path: Path) -> Run:
    cfg_file, metrics = path / "config.yaml", path / "metrics.jsonl"
    if not cfg_file.is_file():
        raise ReportError(f"run directory {path} has no config.yaml")
    config = yaml.safe_load(cfg_file.read_text()) or {}
    rows, lines = [], metrics.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # The last line of a killed run can be torn; anything else is corruption.
            if n == len(lines):
                continue
            raise ReportError(f"{metrics} line {n} is not JSON: {line[:80]!r}") from None
    run = Run(path, config)
    run.val = _last_per_key([r for r in rows if r.get("split") == "val"],
                            lambda r: (r["epoch"], r.get("weights", "raw")))
    run.train = _last_per_key([r for r in rows if r.get("split") == "train"],
                              lambda r: r["epoch"])
    eval_file = path / "eval.txt"
    if eval_file.is_file():
        found = EVAL_LINE.findall(eval_file.read_text())
        if found:
            top1, top5, images = found[-1]
            run.eval = (float(top1), float(top5), int(images))
    return run


def find_runs(paths) -> list[Run]:
    runs = []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"no such run directory: {p}")
        # Below p, not the earlier runs that a fresh start moved aside (runlog.set_aside):
        # those are reported when their folder is named.
        dirs = [p] if (p / "metrics.jsonl").is_file() else \
            sorted(m.parent for m in p.rglob("metrics.jsonl")
                   if PREVIOUS not in m.relative_to(p).parts)
        if not dirs:
            raise ReportError(f"{p} holds no run (no metrics.jsonl in it or below it)")
        runs += [load_run(d) for d in dirs]
    return runs


@functools.lru_cache(maxsize=None)
def _cost(model_json: str, img_size: int):
    cfg = ml.model_only_config({"model": json.loads(model_json)})
    model = ml.build_model(cfg)
    return count_params(model), paper_macs(model, img_size) / 1e9


def cost(run: Run):
    """(params, GMACs at the run's val crop) of the run's model."""
    crop = int(run.config.get("data", {}).get("val_img_size", 224))
    return (*_cost(json.dumps(run.model, sort_keys=True), crop), crop)


def published(run: Run):
    """The paper's (top-1, top-5) when the run has the paper's settings, else None."""
    m = run.model
    paper_like = m.get("num_classes") == 1000 and not m.get("channels") and \
        run.groups in (None, 64)
    ref = PAPER.get(m.get("name")) if paper_like else None
    return (ref[2], ref[3]) if ref else None


def labels(runs) -> dict:
    """Short run names: paths relative to the runs' common parent folder."""
    dirs = [r.dir.resolve() for r in runs]
    parent = Path(os.path.commonpath(dirs)) if len(dirs) > 1 else dirs[0].parent
    if parent in dirs:
        parent = parent.parent
    return {r.dir: str(d.relative_to(parent)) for r, d in zip(runs, dirs)}


def table(runs) -> str:
    names = labels(runs)
    with_eval = any(r.eval for r in runs)
    head = ["Run", "Model", "G", "Params", "GFLOPs", "Top-1 % (epoch)", "Top-5 %",
            "Paper top-1 %", "Diff"] + (["eval.py top-1 / top-5"] if with_eval else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        params, gmacs, crop = cost(run)
        best, ref = run.best(), published(run)
        if best is None:
            top1, top5 = "no val yet", "-"
        else:
            ema = " EMA" if best.get("weights") == "ema" else ""
            top1, top5 = f"{best['top1']:.3f} ({best['epoch']}{ema})", f"{best['top5']:.3f}"
        cells = [names[run.dir], run.model.get("name", "?"),
                 str(run.groups) if run.groups else "-", f"{params / 1e6:.2f}M",
                 f"{gmacs:.3f}" + ("" if crop == 224 else f" @{crop}px"), top1, top5,
                 f"{ref[0]:.3f}" if ref else "-",
                 f"{best['top1'] - ref[0]:+.3f}" if ref and best else "-"]
        if with_eval:
            cells.append(f"{run.eval[0]:.3f} / {run.eval[1]:.3f}" if run.eval else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_reference(name: str) -> dict:
    """A published curve: {'epoch', 'Valid Acc.', 'Train Loss', 'Valid Loss', ...} lists."""
    with open(REFERENCE / f"paper_curve_{name}.tsv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t")]
    cols = {k: [float(r[k]) for r in rows] for k in rows[0] if k}
    cols["epoch"] = list(range(1, len(rows) + 1))
    return cols


def _references(runs, mode: str):
    if mode == "never" or (mode == "auto" and not any(r.model.get("num_classes") == 1000
                                                      for r in runs)):
        return []
    depth = "101" if any(r.model.get("name", "").endswith("101") for r in runs) else "50"
    return [(f"paper {n}", read_reference(n)) for n in (f"resnet{depth}", f"sge_resnet{depth}")]


def plot_curves(runs, out: Path, reference: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for name, ref in _references(runs, reference):
        style = dict(color="0.55" if "sge" not in name else "0.3", lw=1)
        acc.plot(ref["epoch"], ref["Valid Acc."], ls="--", label=f"{name} val", **style)
        loss.plot(ref["epoch"], ref["Valid Loss"], ls="--", label=f"{name} val", **style)
        loss.plot(ref["epoch"], ref["Train Loss"], ls=":", label=f"{name} train", **style)
    names = labels(runs)
    for run in runs:
        label = names[run.dir]
        raw = [r for r in run.val if r.get("weights", "raw") == "raw"]
        line, = acc.plot([r["epoch"] for r in raw], [r["top1"] for r in raw], marker=".",
                         label=label)
        loss.plot([r["epoch"] for r in raw], [r["loss"] for r in raw], marker=".",
                  color=line.get_color(), label=f"{label} val")
        loss.plot([r["epoch"] for r in run.train], [r["loss"] for r in run.train], ls=":",
                  color=line.get_color(), label=f"{label} train")
    acc.set(xlabel="epoch", ylabel="val top-1 %", title="Validation top-1")
    loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    for ax in (acc, loss):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def plot_groups(runs, out: Path) -> bool:
    """Best top-1 against G for the SGE runs; False when there is no sweep to draw."""
    points = sorted((r.groups, r.best()["top1"], r.model["name"]) for r in runs
                    if r.groups and r.best())
    if len({g for g, _, _ in points}) < 2:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5), layout="constrained")
    for name in sorted({n for _, _, n in points}):
        xs = [g for g, _, n in points if n == name]
        ax.plot(xs, [t for _, t, n in points if n == name], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({g for g, _, _ in points}), [str(g) for g in sorted({g for g, _, _ in points})])
    ax.set(xlabel="SGE groups G", ylabel="best val top-1 %", title="Top-1 against groups")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("runs", nargs="+", help="run directories, or folders holding run directories")
    p.add_argument("--out", help="also write the Markdown table to this file")
    p.add_argument("--plots", metavar="DIR", help="write curves.png (and groups.png) here")
    p.add_argument("--reference", choices=("auto", "always", "never"), default="auto",
                   help="draw the paper's curves: for 1000-class runs (auto), always, never")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ml.set_threads()
    try:
        runs = find_runs(args.runs)
    except (ReportError, OSError, yaml.YAMLError) as exc:
        print(f"report.py: error: {exc}", file=sys.stderr)
        return 2
    text = table(runs) + (
        "\n\nGFLOPs: multiply-adds per image at the validation crop, counted as the paper "
        "counts them (BN, ReLU and pooling included). Top-1: the best epoch; top-5 at that "
        "epoch.\n")
    print(text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if args.plots:
        plots = Path(args.plots)
        plots.mkdir(parents=True, exist_ok=True)
        plot_curves(runs, plots / "curves.png", args.reference)
        written = ["curves.png"] + (["groups.png"] if plot_groups(runs, plots / "groups.png")
                                    else [])
        print(f"wrote {', '.join(str(plots / w) for w in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
