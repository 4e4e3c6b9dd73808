"""Cases 1-2 of issue 7 on one process: SIGKILL at random steps and mid-checkpoint-write,
SIGTERM/SIGINT preemption; after each fault the run resumes and ends bitwise identical to an
uninterrupted run, and every checkpoint on disk stays readable.

Faults are sent from this test to a real ``python train.py`` process. Steps are paced by the
``slow_write`` hook (every step writes ``last.pt``), so a kill lands at a seeded random moment
of a seeded random step: during the step, or inside a checkpoint write.
"""
import json
import random
import signal
import time

import pytest
import torch

from sge import checkpoint, engine
from tests.engine_utils import tiny_config
from tests.faults.tools import (assert_all_checkpoints_readable, finish, launch, saved_step,
                                   train_args, wait_for_step)
from tests.test_engine import _assert_same_tensors

# 4 epochs x 6 steps; EMA and mixup on, so their state and random numbers must survive too.
EXTRA = ("train.epochs=4", "train.ckpt_every_steps=1", "train.ema=true", "train.ema_decay=0.9",
         "train.mixup=0.4")
TOTAL = 24
PACE = "slow_write:0.15"
# Two seeded chains of faults on one run directory; each fault is followed by a resume.
CHAINS = {0: ["kill", "kill_in_write"], 1: ["sigterm", "kill", "sigint"]}


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """The uninterrupted run, in this process (one thread, like the launched runs)."""
    run_dir = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = engine.fit(tiny_config(folder, run_dir, *EXTRA))
    finally:
        torch.set_num_threads(threads)
    assert result["stopped"] is None and result["global_step"] == TOTAL
    return checkpoint.read_checkpoint(run_dir / "checkpoints" / "last.pt")


def _kill_in_write(proc, ckpt_dir, last, step):
    """SIGKILL while a temp file of ``last.pt`` exists; return the step last.pt held."""
    wait_for_step(proc, last, step)
    deadline = time.time() + 60
    while time.time() < deadline:
        before = saved_step(last)
        temps = list(ckpt_dir.glob(".last.pt.*.tmp"))
        if temps:
            proc.kill()
            proc.wait()
            assert any(t.exists() for t in temps)  # the write really was torn by the kill
            return before
        time.sleep(0.005)
    raise AssertionError("never saw a checkpoint write in progress")


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_faults_then_resume_bitwise_identical(folder, empty_yaml, tmp_path, reference, chain):
    rng = random.Random(chain)
    ckpt_dir = tmp_path / "checkpoints"
    last = ckpt_dir / "last.pt"
    args = train_args(empty_yaml, folder, tmp_path, *EXTRA)
    done = 0
    for fault in CHAINS[chain]:
        step = done + rng.randint(1, 3)
        proc = launch(args, fault=PACE)
        if fault == "kill_in_write":
            kept = _kill_in_write(proc, ckpt_dir, last, step)
            assert proc.returncode == -signal.SIGKILL
            assert saved_step(last) == kept  # the interrupted write left the old last.pt
        elif fault == "kill":
            wait_for_step(proc, last, step)
            time.sleep(rng.uniform(0, 0.2))  # anywhere in a step or a write
            proc.kill()
            code, _, _ = finish(proc)
            assert code == -signal.SIGKILL
        else:
            wait_for_step(proc, last, step)
            proc.send_signal(getattr(signal, fault.upper()))
            code, out, err = finish(proc, timeout=60)
            assert code == 0, err
            stopped = saved_step(last)
            assert f"stopped by {fault.upper()} after global step {stopped}; state saved" in out
            assert step <= stopped < TOTAL
        done = saved_step(last)
        assert done < TOTAL  # the fault came before the end of the run
        assert_all_checkpoints_readable(ckpt_dir)
    code, out, err = finish(launch(args))  # resume (train.resume=auto) and finish
    assert code == 0, err
    assert f"resumed from {last}" in out
    final = checkpoint.read_checkpoint(last)
    assert final["global_step"] == TOTAL
    for key in ("model", "ema", "optimizer", "schedule", "scaler"):
        _assert_same_tensors(final[key], reference[key], key)
    assert_all_checkpoints_readable(ckpt_dir)
    assert not list(ckpt_dir.glob(".*.tmp"))  # torn writes' leftovers are cleaned up
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["epoch"], r["split"], r["weights"]) for r in rows] == \
        [(e, s, w) for e in range(1, 5) for s, w in (("train", "raw"), ("val", "raw"),
                                                     ("val", "ema"))]  # each row once
