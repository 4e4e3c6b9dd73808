"""Case 8 of issue 7: numerical faults through ``train.py``.

A NaN/inf loss (injected into the loss of one step) stops the run naming the step with the last
good checkpoint intact (``train.nonfinite=stop``) or skips that step (``skip``). Overflowing
gradients under a loss scaler are skipped by the scaler and counted in ``metrics.jsonl``: real
fp16 needs CUDA (a GPU test); the counting is also checked on CPU with an enabled CPU scaler.
"""
import json
import math

import pytest
import torch

import train
from sge import builders, checkpoint
from tests.engine_utils import tiny_overrides
from tests.faults.tools import one_line_error, run_main

BAD_STEP = 3  # 0-based global step whose loss is corrupted (epoch 1, its 4th step)


def _corrupt_loss_at(monkeypatch, step, fault):
    """The train loss of optimizer step ``step`` becomes ``fault(loss)``; returns the calls."""
    real = builders.build_train_loss
    calls = []

    def build(cfg):
        loss_fn = real(cfg)

        def corrupted(logits, targets):
            loss = loss_fn(logits, targets)
            calls.append(len(calls))
            return fault(loss) if len(calls) - 1 == step else loss
        return corrupted

    monkeypatch.setattr(builders, "build_train_loss", build)
    return calls


def _train(folder, run_dir, capsys, *extra):
    config = run_dir.parent / "empty.yaml"
    config.write_text("{}\n")
    argv = ["--config", config, *tiny_overrides(folder, run_dir, "train.epochs=1",
                                                "train.ckpt_every_steps=1", *extra)]
    return run_main(train.main, argv, capsys)


def _finite(state):
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss(folder, tmp_path, monkeypatch, capsys, value, policy):
    calls = _corrupt_loss_at(monkeypatch, BAD_STEP, lambda loss: loss * 0 + value)
    run_dir = tmp_path / "run"
    code, out, err = _train(folder, run_dir, capsys, f"train.nonfinite={policy}")
    assert len(calls) > BAD_STEP  # the corrupted step really ran
    last = checkpoint.read_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert _finite(last["model"])
    if policy == "stop":
        assert code == 1
        line = one_line_error(err)
        assert f"non-finite training loss ({value}) at global step {BAD_STEP}" in line, line
        assert last["global_step"] == BAD_STEP  # the last good step, saved before the fault
        return
    assert code == 0, err
    assert f"skipped global step {BAD_STEP}: non-finite loss ({value})" in out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert rows[0]["split"] == "train" and rows[0]["skipped_nonfinite"] == 1
    assert last["global_step"] == 6 and last["counters"]["skipped_nonfinite"] == 1


def _scaler_overflow_run(folder, tmp_path, monkeypatch, capsys, *extra):
    """Scale the loss of step BAD_STEP to 1e38: finite, but its scaled gradients overflow."""
    calls = _corrupt_loss_at(monkeypatch, BAD_STEP, lambda loss: loss * 1e38)
    code, out, err = _train(folder, tmp_path / "run", capsys, *extra)
    assert code == 0, err
    assert len(calls) > BAD_STEP
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    last = checkpoint.read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    return rows, last


def test_scaler_skipped_steps_counted_on_cpu(folder, tmp_path, monkeypatch, capsys):
    # fp16 autocast needs CUDA; the counting around GradScaler is the same with a CPU scaler.
    monkeypatch.setattr(builders, "build_scaler",
                        lambda cfg, device: torch.amp.GradScaler("cpu", init_scale=2.0 ** 16))
    rows, last = _scaler_overflow_run(folder, tmp_path, monkeypatch, capsys)
    assert last["scaler"]["scale"] == 2.0 ** 15  # the scaler saw inf gradients and backed off
    assert rows[0]["split"] == "train" and rows[0]["scaler_skipped"] == 1
    assert rows[0]["skipped_nonfinite"] == 0 and _finite(last["model"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast needs a CUDA GPU")
def test_fp16_scaler_skipped_steps_counted_on_gpu(folder, tmp_path, monkeypatch, capsys):
    rows, last = _scaler_overflow_run(folder, tmp_path, monkeypatch, capsys, "amp.dtype=float16")
    assert last["scaler"]["scale"] < 2.0 ** 16
    assert rows[0]["split"] == "train" and rows[0]["scaler_skipped"] >= 1
    assert rows[0]["skipped_nonfinite"] == 0 and _finite(last["model"])
