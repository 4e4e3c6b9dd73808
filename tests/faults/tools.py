"""Launchers, signals and checks shared by the fault-injection tests (see conftest.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sge import checkpoint
from tests.engine_utils import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


def launch(args, *, fault: str | None = None, nproc: int = 0, port: int | None = None,
           preexec_fn=None) -> subprocess.Popen:
    """Start ``python ARGS`` (or ``torchrun --nproc_per_node=NPROC ARGS``) from the repo root.

    One intra-op thread per process: runs launched here and in-process references then sum in
    the same order, so their weights compare bitwise.
    """
    cmd = [sys.executable]
    if nproc:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1", f"--master_port={port}"]
    # gloo on CPU, also on a machine with GPUs (two processes may outnumber them).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "CUDA_VISIBLE_DEVICES": ""}
    env.pop("SGE_TEST_FAULT", None)
    if fault:
        env["SGE_TEST_FAULT"] = fault
    return subprocess.Popen(cmd + [str(a) for a in args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec_fn)


def train_args(config, folder, out_dir, *extra) -> list:
    return ["train.py", "--config", config, *tiny_overrides(folder, out_dir, *extra)]


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    """Wait for ``proc`` (a hang fails the test after ``timeout``); (returncode, out, err)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        pytest.fail(f"process still running after {timeout}s:\n{out[-2000:]}\n{err[-2000:]}")
    return proc.returncode, out, err


def kill_tree(proc: subprocess.Popen) -> None:
    for pid in children(proc.pid):
        _signal(pid, signal.SIGKILL)
    _signal(proc.pid, signal.SIGKILL)


def _signal(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def children(pid: int) -> list[int]:
    """Direct child pids (torchrun's workers) from /proc."""
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                kids += [int(k) for k in fh.read().split()]
        except OSError:  # the thread ended meanwhile
            pass
    return kids


def worker_by_rank(proc: subprocess.Popen, nproc: int) -> dict[int, int]:
    """{rank: pid} of torchrun's workers (read from each worker's RANK variable)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        ranks = {}
        for pid in children(proc.pid):
            try:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
            except OSError:  # a short-lived helper process that is already gone
                continue
            if b"RANK" in env:
                ranks[int(env[b"RANK"])] = pid
        if len(ranks) == nproc:
            return ranks
        time.sleep(0.1)
    raise AssertionError("torchrun workers not found")


def saved_step(last: Path) -> int | None:
    """global_step of ``last`` (None while it does not exist)."""
    if not last.exists():
        return None
    return checkpoint.read_checkpoint(last)["global_step"]


def wait_for_step(proc: subprocess.Popen, last: Path, step: int, timeout: float = 180) -> int:
    """Poll ``last`` until it holds global step >= ``step``; the run must still be going."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"run ended before step {step}: {finish(proc)}"
        got = saved_step(last)
        if got is not None and got >= step:
            return got
        time.sleep(0.02)
    kill_tree(proc)
    raise AssertionError(f"no checkpoint of step {step} after {timeout}s")


def assert_all_checkpoints_readable(ckpt_dir: Path) -> None:
    """Every checkpoint file on disk loads (temp files of torn writes are not checkpoints)."""
    files = sorted(p for p in ckpt_dir.iterdir() if p.suffix in (".pt", ".safetensors")
                   and not p.name.startswith("."))
    assert files, f"no checkpoints in {ckpt_dir}"
    for path in files:
        checkpoint.read_checkpoint(path)


def run_main(main, argv, capsys) -> tuple[int, str, str]:
    """Call an entry point's ``main(argv)`` in-process; (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    """stderr must end in one ``error: ...`` line and hold no traceback; return that line."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    return lines[-1]
