"""Cases 2-3 of issue 7 under ``torchrun --nproc_per_node=2`` (gloo, CPU).

Preemption: SIGTERM to every worker, or SIGINT to one worker only, stops the whole run at one
step; rank 0 saves it and every process exits 0. A dead peer: SIGKILL of one worker ends the
run with a non-zero exit naming it, long before a default 30-minute collective timeout. After
each, the run resumes and ends bitwise identical to an uninterrupted 2-process run.
"""
import os
import signal

import pytest

from sge import checkpoint
from tests.engine_utils import free_port
from tests.faults.tools import (assert_all_checkpoints_readable, finish, launch, saved_step,
                                train_args, wait_for_step, worker_by_rank)
from tests.test_engine import _assert_same_tensors

# 24 train images, 2 processes x 2: 6 steps per epoch, 12 in all.
EXTRA = ("data.batch_size=2", "train.epochs=2", "train.ckpt_every_steps=1", "dist.timeout_s=30")
TOTAL = 12
PACE = "slow_write:0.2"
BOUND_S = 90  # a lost peer must end the run well within this (dist.timeout_s=30)


def _start(empty_yaml, folder, run_dir, fault=PACE):
    proc = launch(train_args(empty_yaml, folder, run_dir, *EXTRA), fault=fault, nproc=2,
                  port=free_port())
    return proc, worker_by_rank(proc, 2)


@pytest.fixture(scope="module")
def reference(folder, empty_yaml, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp_reference")
    code, _, err = finish(_start(empty_yaml, folder, run_dir, fault=None)[0])
    assert code == 0, err
    return checkpoint.read_checkpoint(run_dir / "checkpoints" / "last.pt")


def _resume_to_end_and_compare(empty_yaml, folder, run_dir, reference):
    proc, _ = _start(empty_yaml, folder, run_dir, fault=None)
    code, out, err = finish(proc)
    assert code == 0, err
    final = checkpoint.read_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert final["global_step"] == TOTAL
    for key in ("model", "optimizer", "schedule"):
        _assert_same_tensors(final[key], reference[key], key)


def test_preemption_signals_stop_every_worker_and_save(folder, empty_yaml, tmp_path, reference):
    last = tmp_path / "checkpoints" / "last.pt"
    # SIGTERM to every worker (what a scheduler's preemption does).
    proc, ranks = _start(empty_yaml, folder, tmp_path)
    seen = wait_for_step(proc, last, 2)
    for pid in ranks.values():
        os.kill(pid, signal.SIGTERM)
    code, out, err = finish(proc, timeout=BOUND_S)
    assert code == 0, err
    first = saved_step(last)
    assert seen <= first < TOTAL
    assert f"stopped by SIGTERM after global step {first}; state saved" in out
    # SIGINT to rank 1 only: rank 0 learns of it with the step's loss all-reduce, so both stop
    # after the same step and rank 0 saves it; nobody is left waiting in a collective.
    proc, ranks = _start(empty_yaml, folder, tmp_path)
    seen = wait_for_step(proc, last, first + 2)
    os.kill(ranks[1], signal.SIGINT)
    code, out, err = finish(proc, timeout=BOUND_S)
    assert code == 0, err
    second = saved_step(last)
    assert seen <= second < TOTAL
    assert f"after global step {second}; state saved" in out
    assert_all_checkpoints_readable(tmp_path / "checkpoints")
    _resume_to_end_and_compare(empty_yaml, folder, tmp_path, reference)


def test_dead_peer_ends_the_run_then_it_resumes(folder, empty_yaml, tmp_path, reference):
    last = tmp_path / "checkpoints" / "last.pt"
    proc, ranks = _start(empty_yaml, folder, tmp_path)
    wait_for_step(proc, last, 3)
    os.kill(ranks[1], signal.SIGKILL)
    code, out, err = finish(proc, timeout=BOUND_S)  # bounded: no wait for a 30-minute timeout
    assert code != 0
    # torchrun names the dead worker and how it died.
    assert f"Signal 9 (SIGKILL) received by PID {ranks[1]}" in err, err[-3000:]
    # Rank 0 says where to resume from (whether its collective failed first or torchrun's
    # SIGTERM reached it first).
    assert f"{last}" in out + err
    killed_at = saved_step(last)
    assert 3 <= killed_at < TOTAL
    assert_all_checkpoints_readable(tmp_path / "checkpoints")
    _resume_to_end_and_compare(empty_yaml, folder, tmp_path, reference)
