"""Case 5 of issue 7: hostile and broken checkpoints through the real entry points, ``eval.py
--checkpoint`` and ``train.py train.resume=<path>``: each is refused with one error naming the
file and the problem (exit 1, no traceback), and a pickle that would run code never runs it.
"""
import random
import re

import pytest
import torch

import eval as eval_cli
import train
from sge import checkpoint, engine
from tests.engine_utils import tiny_config, tiny_overrides
from tests.faults.tools import one_line_error, run_main


class _RunsCode:
    """Unpickling this (without weights_only) runs a shell command creating ``marker``."""
    marker = None

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained")
    assert engine.fit(tiny_config(folder, run_dir, "train.epochs=1"))["stopped"] is None
    return run_dir / "checkpoints" / "last.pt"


def _training_checkpoint(folder, path, *overrides):
    """A real (untrained) training checkpoint of another model config."""
    cfg = tiny_config(folder, path.parent, *overrides)
    parts = engine.setup(cfg, torch.device("cpu"), num_steps=6)
    state = checkpoint.training_state(
        model=parts.plain, optimizer=parts.optimizer, schedule=parts.schedule,
        scaler=parts.scaler, ema=parts.ema, epoch=0, step_in_epoch=0, global_step=0,
        config=cfg.to_dict(), best={}, counters={})
    torch.save(state, path)


def _make(kind, entry, trained, folder, path):
    """Write the broken file; return the problem its error must state."""
    good = trained.read_bytes()
    if kind == "pickle_runs_code":
        _RunsCode.marker = path.parent / "code_ran"
        torch.save({"format": "sge-imagenet-train/1", "model": _RunsCode()}, path)
        return r"refused: it holds a pickled posix\.system, which could run code"
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
        return "is truncated or corrupt"
    if kind == "zero_bytes":
        path.write_bytes(b"")
        return r"is empty \(0 bytes\)"
    if kind == "random_bytes":
        path.write_bytes(random.Random(0).randbytes(8192))
        return "refused|corrupt or not a PyTorch checkpoint"
    if kind == "nan_weights":
        state = checkpoint.read_checkpoint(trained)
        state["model"]["fc.weight"][0, 0] = float("nan")
        torch.save(state, path)
        return r"non-finite \(NaN/inf\) values in 1 tensors, first fc\.weight"
    overrides = {"other_groups": ("model.groups=8",), "other_arch": ("model.name=resnet18",)}
    _training_checkpoint(folder, path, *overrides[kind])
    if entry == "train":
        key = "groups: checkpoint 8" if kind == "other_groups" else "name: checkpoint 'resnet18'"
        return rf"changes the model \(model\.{key}"
    what = "sge_resnet18 \\(groups=8\\)" if kind == "other_groups" else "resnet18, 3 classes"
    return rf"does not fit the model: the file looks like {what}"


KINDS = ["pickle_runs_code", "truncated", "zero_bytes", "random_bytes", "nan_weights",
         "other_groups", "other_arch"]


@pytest.mark.parametrize("entry", ["eval", "train"])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_checkpoint_is_one_clear_error(kind, entry, trained, folder, empty_yaml, tmp_path,
                                           capsys):
    path = tmp_path / f"{kind}.pt"
    problem = _make(kind, entry, trained, folder, path)
    run_dir = tmp_path / "run"
    if entry == "eval":
        argv = ["--config", empty_yaml, "--checkpoint", path, *tiny_overrides(folder, run_dir)]
        code, out, err = run_main(eval_cli.main, argv, capsys)
    else:
        argv = ["--config", empty_yaml,
                *tiny_overrides(folder, run_dir, f"train.resume={path}")]
        code, out, err = run_main(train.main, argv, capsys)
    assert code == 1 and "top1=" not in out
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert str(path) in errors[0] and re.search(problem, errors[0]), err
    assert not (run_dir / "checkpoints" / "last.pt").exists()  # nothing trained or saved
    if kind == "pickle_runs_code":
        assert not _RunsCode.marker.exists()  # refused, and its code did not run
        torch.load(path, weights_only=False)  # the fault is real: an unsafe load runs it
        assert _RunsCode.marker.exists()


@pytest.mark.parametrize("kind", ["weights_only", "incomplete"])
def test_resume_needs_a_complete_training_checkpoint(kind, trained, folder, empty_yaml, tmp_path,
                                                     capsys):
    state = checkpoint.read_checkpoint(trained)
    path = tmp_path / f"{kind}.pt"
    if kind == "weights_only":
        torch.save(state["model"], path)
        problem = "is not a training checkpoint of this project"
    else:
        del state["optimizer"]
        torch.save(state, path)
        problem = r"incomplete or damaged training checkpoint \(missing or malformed: optimizer\)"
    # The weights in it are fine (eval.py takes them); resuming needs the whole training state.
    argv = ["--config", empty_yaml, "--checkpoint", path, *tiny_overrides(folder, tmp_path / "e")]
    code, out, _ = run_main(eval_cli.main, argv, capsys)
    assert code == 0 and "images=13" in out
    argv = ["--config", empty_yaml, *tiny_overrides(folder, tmp_path / "t", f"train.resume={path}")]
    code, _, err = run_main(train.main, argv, capsys)
    assert code == 1
    line = one_line_error(err)
    assert str(path) in line and re.search(problem, line), line
