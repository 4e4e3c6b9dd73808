"""The run directory's records: resolved config, environment, metrics.jsonl, TensorBoard,
the rank-0 progress bar and the one-line epoch summaries.

Only rank 0 writes; other ranks get a RunLog whose methods do nothing, so callers need no
rank checks.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from sge.config import QUICKSTART, Config


def resolved_config(cfg: Config) -> dict:
    """``cfg`` as a dict with reserved values made real (``data.root: quickstart`` -> path)."""
    data = cfg.to_dict()
    if cfg.data.root == QUICKSTART and cfg.data.backend != "synthetic":
        from data import resolve_root  # generates the dataset on first use
        data["data"]["root"] = str(resolve_root(cfg))
    return data


def environment(world_size: int) -> dict:
    """Git commit, library versions, hardware and world size of this run."""
    import numpy
    import timm
    import torchvision
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=root, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"git_commit": commit, "git_dirty": dirty, "python": sys.version.split()[0],
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "numpy": numpy.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if gpus else None,
            "hostname": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "gpus": gpus, "world_size": world_size,
            "argv": sys.argv, "time": time.time()}


# What a run leaves in its directory; a run that starts afresh there moves an earlier run's
# records aside (``set_aside``) rather than appending to them or overwriting them.
RECORDS = ("metrics.jsonl", "tb", "checkpoints", "config.yaml", "env.json")
PREVIOUS = "previous"


def set_aside(run_dir: Path) -> Path | None:
    """Move an earlier run's records (``RECORDS``) from ``run_dir`` into
    ``run_dir/previous/<UTC time>/`` and return that folder; None when there are none.

    A run that starts afresh (``train.resume=never``, a checkpoint from elsewhere, or
    ``auto`` with no ``last.pt``: a run killed before its first checkpoint) would otherwise
    append its rows after the old ones, mix its TensorBoard events with theirs and overwrite
    their checkpoints. Nothing is deleted."""
    def kept(name: str) -> bool:  # config.yaml and env.json alone are a run that did nothing
        path = run_dir / name
        return path.is_dir() and any(path.iterdir()) or path.is_file() and path.stat().st_size > 0
    if not any(kept(name) for name in ("metrics.jsonl", "tb", "checkpoints")):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = run_dir / PREVIOUS / stamp
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir / PREVIOUS / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for name in RECORDS:
        if (run_dir / name).exists():
            os.replace(run_dir / name, dest / name)
    return dest


class RunLog:
    def __init__(self, out_dir: str, active: bool, tensorboard: bool = True,
                 fresh: bool = False):
        """``fresh``: the run does not continue from this directory's own checkpoint, so
        an earlier run's records there are moved aside (``set_aside``) first."""
        self.dir = Path(out_dir)
        self.active = active
        self.writer = None
        self.rows = 0  # rows in metrics.jsonl: a checkpoint records it, a resume rewinds to it
        if not active:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            moved = set_aside(self.dir)
            if moved is not None:
                self.info(f"{self.dir} held an earlier run's records and this run starts "
                          f"afresh: they were moved to {moved}")
        if (self.dir / "metrics.jsonl").exists():
            self.rows = (self.dir / "metrics.jsonl").read_bytes().count(b"\n")
        self.tensorboard = tensorboard
        self._open_tensorboard()

    def _open_tensorboard(self, purge_step: int | None = None) -> None:
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.dir / "tb"), purge_step=purge_step)

    def rewind(self, rows: int | None, step: int) -> None:
        """Forget what was logged after the checkpoint being resumed, taken at global
        ``step`` when metrics.jsonl had ``rows`` rows (None: not recorded): the resumed run
        logs it again. TensorBoard drops its events from the first step logged again."""
        if not self.active:
            return
        purge = step + 1
        path = self.dir / "metrics.jsonl"
        lines = path.read_bytes().split(b"\n") if path.exists() else [b""]
        # lines[-1]: what follows the last newline, a row torn by a kill mid-write if not empty
        if rows is not None and (rows < self.rows or lines[-1]):
            rows = min(rows, self.rows)
            dropped = [line for line in lines[rows:] if line.strip()]
            purge = min([purge] + [_step_of(line) for line in dropped])
            tmp = path.with_name(".metrics.jsonl.tmp")
            tmp.write_bytes(b"".join(line + b"\n" for line in lines[:rows]))
            os.replace(tmp, path)
            self.info(f"metrics.jsonl: dropped {len(dropped)} row(s) logged after the "
                      f"checkpoint")
            self.rows = rows
        if self.writer is not None:
            self.writer.close()
            self._open_tensorboard(purge_step=purge)

    def write_setup(self, config: dict, env: dict) -> None:
        if self.active:
            (self.dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            (self.dir / "env.json").write_text(json.dumps(env, indent=2) + "\n")

    def metrics(self, row: dict) -> None:
        """Append one row to metrics.jsonl and its numbers to TensorBoard."""
        if not self.active:
            return
        row = {**row, "time": time.time()}
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.rows += 1
        if self.writer is not None:
            prefix = row["split"] if row["split"] == "train" else f"{row['split']}_{row['weights']}"
            for key in ("loss", "top1", "top5", "img_per_s", "lr", "data_wait",
                        "skipped_nonfinite", "scaler_skipped"):
                if row.get(key) is not None:
                    self.writer.add_scalar(f"{prefix}/{key}", row[key], row["step"])
            self.writer.flush()

    def scalars(self, step: int, values: dict) -> None:
        """Per-step TensorBoard scalars (not in metrics.jsonl)."""
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def progress(self, total: int, initial: int, desc: str, enabled: bool):
        """A tqdm bar with ETA on rank 0 (stderr), else a stand-in with the same methods."""
        if self.active and enabled:
            from tqdm import tqdm
            return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                        leave=False, file=sys.stderr)
        return _NoBar()

    def info(self, message: str) -> None:
        if self.active:
            print(message, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _step_of(line: bytes) -> int:
    """A metrics row's global step (a row torn by a kill counts as infinitely late)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 2**62


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass
