"""The training loop on CPU: exact resume, checkpoint round trip, non-finite losses, AMP, EMA/best.

Runs use a 3-class folder of 36 px JPEGs and a narrow SGE-ResNet18 (seconds each).
"""
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import data
from sge import checkpoint, engine, runlog
from sge.checkpoint import CheckpointError
from tests.engine_utils import make_folder, tiny_config

# accum 2 -> 3 optimizer steps per epoch; checkpoints every 2 steps (and a per-epoch copy);
# EMA and mixup on, so their state and random numbers must survive a resume too.
RESUME = ("train.accum_steps=2", "train.ckpt_every_steps=2", "train.ema=true",
          "train.ema_decay=0.9", "train.mixup=0.4", "train.keep_epoch_ckpts=1")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"))


class _Killed(Exception):
    """Stands in for SIGKILL: the run ends mid-step, without saving."""


def _intercept_train_batches(monkeypatch, action):
    """Make ``action(n, images)`` see the n-th train batch (1-based, over all epochs)."""
    real = data.build_loader
    seen = [0]

    class Loader:
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def set_epoch(self, epoch, start_batch=0):
            self.inner.set_epoch(epoch, start_batch)

        def __iter__(self):
            for images, labels in self.inner:
                seen[0] += 1
                yield action(seen[0], images), labels

    monkeypatch.setattr(data, "build_loader",
                        lambda cfg, split: Loader(real(cfg, split)) if split == "train"
                        else real(cfg, split))


def _rows(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def _final_state(run_dir):
    return checkpoint.read_checkpoint(run_dir / "checkpoints" / "last.pt")


def _assert_same_tensors(a, b, where=""):
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = engine.fit(tiny_config(folder, run_dir, *RESUME))
    assert result["stopped"] is None and result["global_step"] == 6
    return run_dir


@pytest.mark.parametrize("how, at_batch", [("kill", 11), ("sigterm", 4)])
def test_kill_and_resume_is_bitwise_identical(folder, tmp_path, monkeypatch, uninterrupted,
                                              how, at_batch):
    def fault(n, images):
        if n == at_batch:
            if how == "kill":
                raise _Killed
            os.kill(os.getpid(), signal.SIGTERM)  # the step finishes, then state is saved
        return images

    _intercept_train_batches(monkeypatch, fault)
    cfg = tiny_config(folder, tmp_path, *RESUME)
    if how == "kill":
        with pytest.raises(_Killed):
            engine.fit(cfg)
    else:
        stopped = engine.fit(cfg)
        assert stopped["stopped"] == "SIGTERM" and stopped["global_step"] == at_batch // 2
    interrupted_at = _final_state(tmp_path)["global_step"]
    assert interrupted_at < 6  # the fault really happened before the end
    monkeypatch.undo()
    # Disturb the global RNGs: the resumed run must not depend on them.
    random.random(), np.random.rand(), torch.rand(3)
    result = engine.fit(tiny_config(folder, tmp_path, *RESUME))  # train.resume=auto
    assert result["stopped"] is None and result["global_step"] == 6
    resumed, reference = _final_state(tmp_path), _final_state(uninterrupted)
    for key in ("model", "ema", "optimizer", "schedule", "scaler"):
        _assert_same_tensors(resumed[key], reference[key], key)
    _assert_same_log(tmp_path, uninterrupted)


def _assert_same_log(run_dir, reference_dir):
    """metrics.jsonl has the uninterrupted run's rows, each once, with the same validation."""
    rows, ref = _rows(run_dir), _rows(reference_dir)
    key = ("epoch", "step", "split", "weights")
    assert [tuple(r[k] for k in key) for r in rows] == [tuple(r[k] for k in key) for r in ref]
    val = ("loss", "top1", "top5", "images")
    assert [tuple(r[k] for k in val) for r in rows if r["split"] == "val"] == \
        [tuple(r[k] for k in val) for r in ref if r["split"] == "val"]


@pytest.mark.parametrize("fault", ["kill_at_end_of_epoch_1", "kill_at_end_of_epoch_2",
                                   "sigterm_in_validation"])
def test_interrupted_validation_logs_each_row_once(folder, tmp_path, monkeypatch, uninterrupted,
                                                   fault):
    """Killed after an epoch's rows are logged but before its epoch-end checkpoint, or
    stopped while validating: the resumed run logs the epoch's rows again (validation), and
    metrics.jsonl and TensorBoard have each row and step once."""
    run = RESUME + ("output.tensorboard=true",)
    if fault == "sigterm_in_validation":
        real, calls = engine.evaluate, [0]

        def evaluate(*args, **kwargs):  # the stop comes while the EMA weights are evaluated
            calls[0] += 1
            if calls[0] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*args, **kwargs)

        monkeypatch.setattr(engine, "evaluate", evaluate)
        assert engine.fit(tiny_config(folder, tmp_path, *run))["stopped"] == "SIGTERM"
        saved, logged = 3, ["train"]  # saved after training, validation pending
    else:
        epoch, real_save = int(fault[-1]), checkpoint.save_last

        def save_last(state, ckpt_dir, keep_epoch_copies=0, epoch_end=False):
            if epoch_end and state["epoch"] == epoch:  # the 0-based epoch to come
                raise _Killed
            return real_save(state, ckpt_dir, keep_epoch_copies, epoch_end)

        monkeypatch.setattr(checkpoint, "save_last", save_last)
        with pytest.raises(_Killed):
            engine.fit(tiny_config(folder, tmp_path, *run))
        saved, logged = 2 * epoch, ["train", "val", "val"]  # logged, then killed
    monkeypatch.undo()
    last_epoch = max(r["epoch"] for r in _rows(tmp_path))
    assert [r["split"] for r in _rows(tmp_path) if r["epoch"] == last_epoch] == logged
    assert _final_state(tmp_path)["global_step"] == saved
    result = engine.fit(tiny_config(folder, tmp_path, *run))
    assert result["stopped"] is None and result["global_step"] == 6
    _assert_same_log(tmp_path, uninterrupted)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()  # a resumed writer's purge event drops what the killed run logged later
    assert [e.step for e in events.Scalars("train/loss_step")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("val_raw/top1")] == [3, 6]


def test_rewind_drops_later_and_torn_rows(tmp_path, capsys):
    # A row torn by a kill mid-write (no newline) goes too, so the next row starts a line.
    rows = [json.dumps({"epoch": e, "step": 3 * e, "split": "train"}) for e in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"epoch": 4, "st')
    log = runlog.RunLog(str(tmp_path), active=True, tensorboard=False)
    assert log.rows == 3
    log.rewind(3, step=9)  # the torn row alone
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(rows) + "\n"
    log.rewind(1, step=3)
    assert _rows(tmp_path) == [json.loads(rows[0])] and log.rows == 1
    out = capsys.readouterr().out
    assert "dropped 1 row(s)" in out and "dropped 2 row(s)" in out
    log.metrics({"epoch": 2, "step": 6, "split": "train"})
    assert [r["epoch"] for r in _rows(tmp_path)] == [1, 2] and log.rows == 2


@pytest.mark.parametrize("earlier", ["orphan_rows", "finished_run"])
def test_fresh_start_moves_earlier_records_aside(folder, tmp_path, uninterrupted, earlier):
    """A run that starts afresh in a directory holding an earlier run's records (rows of a
    run killed before its first checkpoint, with resume=auto; a finished run, with
    resume=never) moves them to previous/<time>/ unchanged, and logs only its own rows."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    if earlier == "orphan_rows":
        shutil.rmtree(run_dir / "checkpoints")
        (run_dir / "metrics.jsonl").write_text("".join(
            line for line in open(uninterrupted / "metrics.jsonl") if '"epoch": 1' in line))
    before = {name: (run_dir / name).read_bytes()
              for name in ("metrics.jsonl", "config.yaml", "checkpoints/last.pt",
                           "checkpoints/best.pt") if (run_dir / name).exists()}
    resume = "train.resume=never" if earlier == "finished_run" else "train.resume=auto"
    result = engine.fit(tiny_config(folder, run_dir, *RESUME, "train.epochs=1", resume))
    assert result["stopped"] is None and result["global_step"] == 3  # from the start
    moved = list((run_dir / runlog.PREVIOUS).iterdir())
    assert len(moved) == 1
    assert {name: (moved[0] / name).read_bytes() for name in before} == before
    rows = _rows(run_dir)
    assert [(r["epoch"], r["split"]) for r in rows] == [(1, "train"), (1, "val"), (1, "val")]
    assert [r["step"] for r in rows] == [3, 3, 3]
    assert _final_state(run_dir)["global_step"] == 3
    # Run again: it resumes from its own last.pt (finished), so nothing more is moved.
    engine.fit(tiny_config(folder, run_dir, *RESUME, "train.epochs=1"))
    assert list((run_dir / runlog.PREVIOUS).iterdir()) == moved and _rows(run_dir) == rows


def test_set_aside_keeps_what_is_not_a_record(tmp_path):
    assert runlog.set_aside(tmp_path) is None  # nothing there
    (tmp_path / "config.yaml").write_text("a run that died in its set-up\n")
    (tmp_path / "checkpoints").mkdir()
    assert runlog.set_aside(tmp_path) is None  # an empty folder and a config: no records
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoints").is_dir()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "notes.txt").write_text("the user's own file\n")
    first = runlog.set_aside(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 2}\n')
    second = runlog.set_aside(tmp_path)  # within the same second: a distinct folder
    assert first != second and first.parent == second.parent == tmp_path / runlog.PREVIOUS
    assert sorted(p.name for p in first.iterdir()) == ["checkpoints", "config.yaml",
                                                       "metrics.jsonl"]
    assert (second / "metrics.jsonl").read_text() == '{"step": 2}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", runlog.PREVIOUS]


def test_run_dir_best_checkpoint_and_eval_reproduce(folder, uninterrupted):
    rows = _rows(uninterrupted)
    for row in rows:
        assert {"epoch", "step", "split", "weights", "loss", "top1", "top5", "images", "lr",
                "img_per_s", "time"} <= row.keys()
    train = [r for r in rows if r["split"] == "train"]
    assert [(r["epoch"], r["step"], r["images"]) for r in train] == [(1, 3, 24), (2, 6, 24)]
    val = [r for r in rows if r["split"] == "val"]
    assert [(r["epoch"], r["weights"], r["images"]) for r in val] == \
        [(1, "raw", 13), (1, "ema", 13), (2, "raw", 13), (2, "ema", 13)]
    best_row = max(val, key=lambda r: r["top1"])  # first of equals wins, as in the engine
    best = checkpoint.read_checkpoint(uninterrupted / "checkpoints" / "best.pt")
    assert best["weights"] == best_row["weights"] and best["top1"] == best_row["top1"]
    exported = checkpoint.read_checkpoint(uninterrupted / "checkpoints" / "best.safetensors")
    _assert_same_tensors(exported, best["model"])
    cfg = tiny_config(folder, uninterrupted, "train.resume=never")
    again = engine.evaluate_checkpoint(cfg, uninterrupted / "checkpoints" / "best.pt")
    assert (again["top1"], again["images"]) == (best_row["top1"], 13)
    copies = sorted(p.name for p in (uninterrupted / "checkpoints").glob("epoch_*.pt"))
    assert copies == ["epoch_0002.pt"]  # keep_epoch_ckpts=1: epoch 1's copy was removed
    assert checkpoint.read_checkpoint(uninterrupted / "checkpoints" / copies[0])["global_step"] == 6
    saved = (uninterrupted / "config.yaml").read_text()
    assert f"root: {folder}" in saved and "groups: 4" in saved
    assert json.loads((uninterrupted / "env.json").read_text())["world_size"] == 1


def test_checkpoint_round_trip(folder, tmp_path):
    cfg = tiny_config(folder, tmp_path, "train.ema=true", "train.ema_decay=0.5")
    parts = engine.setup(cfg, torch.device("cpu"), num_steps=3)
    # A real (CPU) grad scaler whose scale changes, so its state is not the default.
    parts.scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1)
    loader = data.build_loader(cfg, "train")
    loader.set_epoch(0)
    batches = iter(loader)
    progress = engine.Progress()
    for _ in range(2):
        engine.train_step(parts, batches, progress)
        progress.global_step += 1
        progress.step_in_epoch += 1
    progress.best = {"top1": 12.5, "weights": "ema", "epoch": 1}
    state = checkpoint.training_state(
        model=parts.plain, optimizer=parts.optimizer, schedule=parts.schedule,
        scaler=parts.scaler, ema=parts.ema, epoch=0, step_in_epoch=2, global_step=2,
        config=cfg.to_dict(), best=progress.best, counters=progress.counters)
    checkpoint.write_atomic(state, tmp_path / "state.pt")
    expected = (random.random(), np.random.rand(), torch.rand(4))

    torch.manual_seed(123)  # a differently initialised model to load into
    fresh = engine.setup(cfg, torch.device("cpu"), num_steps=3)
    fresh.scaler = torch.amp.GradScaler("cpu")
    got = checkpoint.load_training_state(
        tmp_path / "state.pt", model=fresh.plain, optimizer=fresh.optimizer,
        schedule=fresh.schedule, scaler=fresh.scaler, ema=fresh.ema, config=cfg.to_dict())
    _assert_same_tensors(fresh.plain.state_dict(), parts.plain.state_dict(), "model")
    _assert_same_tensors(fresh.ema.module.state_dict(), parts.ema.module.state_dict(), "ema")
    _assert_same_tensors(fresh.optimizer.state_dict(), parts.optimizer.state_dict(), "optim")
    assert fresh.scaler.state_dict() == parts.scaler.state_dict() != \
        torch.amp.GradScaler("cpu").state_dict()
    assert fresh.schedule.state_dict() == parts.schedule.state_dict()
    assert fresh.schedule.last_step == 1
    assert (got["epoch"], got["step_in_epoch"], got["global_step"]) == (0, 2, 2)
    assert got["best"] == progress.best
    checkpoint.set_rng_state(got["rng"])
    drawn = (random.random(), np.random.rand(), torch.rand(4))
    assert drawn[:2] == expected[:2] and torch.equal(drawn[2], expected[2])


def test_resume_with_another_model_is_an_error(folder, tmp_path, uninterrupted):
    cfg = tiny_config(folder, tmp_path, "model.groups=8",
                      f"train.resume={uninterrupted / 'checkpoints' / 'last.pt'}")
    with pytest.raises(CheckpointError, match=r"changes the model \(model\.groups: checkpoint 4"):
        engine.fit(cfg)


def test_resume_with_another_epoch_length_is_an_error(folder, tmp_path, uninterrupted):
    # uninterrupted: 24 images / batch 4 / 2 accumulated = 3 steps per epoch; capped to 2 here.
    last = uninterrupted / "checkpoints" / "last.pt"
    cfg = tiny_config(folder, tmp_path, *RESUME, "train.steps_per_epoch=2",
                      f"train.resume={last}")
    with pytest.raises(CheckpointError, match="written with 3 optimizer steps per epoch, this "
                                              "config gives 2"):
        engine.fit(cfg)
    assert not (tmp_path / "checkpoints").exists()  # refused before anything was written


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss(folder, tmp_path, monkeypatch, policy):
    _intercept_train_batches(monkeypatch, lambda n, images: images * math.nan if n == 4 else images)
    cfg = tiny_config(folder, tmp_path, f"train.nonfinite={policy}", "train.ckpt_every_steps=1",
                      "train.epochs=1")
    last = tmp_path / "checkpoints" / "last.pt"
    if policy == "stop":
        with pytest.raises(engine.NonFiniteLossError, match="global step 3"):
            engine.fit(cfg)
        kept = checkpoint.read_checkpoint(last)  # the last good state, before the bad step
        assert kept["global_step"] == 3
        assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
        return
    result = engine.fit(cfg)
    assert result["counters"]["skipped_nonfinite"] == 1
    assert _rows(tmp_path)[0]["skipped_nonfinite"] == 1
    final = checkpoint.read_checkpoint(last)
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())


def test_bf16_autocast_steps_on_cpu(folder, tmp_path):
    cfg = tiny_config(folder, tmp_path, "amp.dtype=bfloat16", "model.channels_last=true",
                      "sched.name=cosine", "sched.warmup_epochs=0.5", "train.label_smoothing=0.1",
                      "optim.wd_norm_bias=false")
    parts = engine.setup(cfg, torch.device("cpu"), num_steps=6)
    dtypes = []
    parts.plain.fc.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    loader = data.build_loader(cfg, "train")
    loader.set_epoch(0)
    batches = iter(loader)
    before = parts.plain.fc.weight.detach().clone()
    progress = engine.Progress()
    for _ in range(3):
        out = engine.train_step(parts, batches, progress)
        progress.global_step += 1
        assert math.isfinite(out["loss"])
    assert dtypes == [torch.bfloat16] * 3
    assert parts.plain.fc.weight.dtype == torch.float32  # autocast, not a bf16 model
    assert not torch.equal(before, parts.plain.fc.weight)
    assert all(torch.isfinite(p).all() for p in parts.plain.parameters())


def test_compiled_model_trains_checkpoints_and_resumes_eagerly(folder, tmp_path, monkeypatch):
    # model.compile=true: torch.compile around the trained module (fused SGE ops included).
    # Its first step matches the eager one's; its checkpoints hold the bare module's keys, so
    # the run resumes without compile; and it resumes with it.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    losses = []
    for compiled in (True, False):
        cfg = tiny_config(folder, tmp_path / "step", f"model.compile={str(compiled).lower()}")
        engine.seed_step(cfg.seed, 0, -1)
        parts = engine.setup(cfg, torch.device("cpu"), num_steps=6)
        assert isinstance(parts.model, torch._dynamo.eval_frame.OptimizedModule) == compiled
        loader = data.build_loader(cfg, "train")
        loader.set_epoch(0)
        losses.append(engine.train_step(parts, iter(loader), engine.Progress())["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)

    run = tmp_path / "run"
    assert engine.fit(tiny_config(folder, run, "model.compile=true",
                                  "train.epochs=1"))["global_step"] == 6
    keys = set(_final_state(run)["model"])
    assert keys == set(parts.plain.state_dict()) and not any("_orig_mod" in k for k in keys)
    assert engine.fit(tiny_config(folder, run, "train.epochs=2"))["global_step"] == 12
    assert engine.fit(tiny_config(folder, run, "model.compile=true",
                                  "train.epochs=3"))["global_step"] == 18
    assert [r["epoch"] for r in _rows(run) if r["split"] == "train"] == [1, 2, 3]


_FAULTS = """
import resource, sys, torch
from sge import builders
from sge.config import load_config
kept = builders.keep_freed_memory(load_config(None, sys.argv[2:]), torch.device(sys.argv[1]))
faults = []
for _ in range(4):  # a 64 MB map, filled and freed, as a step's feature maps are
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, min(faults[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt")
def test_keep_freed_memory():
    """On CPU runs a freed feature map's memory stays in the process: the next one of the same
    size takes (almost) no page faults, where glibc's default maps it anew and faults it in
    again (16,385 faults of 4 KB pages here). Off, or on a GPU run, the allocator is left
    alone."""
    def run(device, keep):
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS, device, f"train.keep_freed_memory={keep}"],
            capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.dirname(__file__))).stdout.split()
        return out[0], int(out[1])

    (kept, faults), (off, default), (gpu, gpu_faults) = (
        run("cpu", "true"), run("cpu", "false"), run("cuda", "true"))
    assert (kept, off, gpu) == ("True", "False", "False")
    assert default > 10 and gpu_faults > default // 2, (default, gpu_faults)
    assert faults * 10 < default, (faults, default)
