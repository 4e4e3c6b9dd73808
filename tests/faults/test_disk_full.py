"""Case 4 of issue 7: a checkpoint write that fails (disk full, file too large) leaves the
previous checkpoint intact and stops the run with one line saying what failed and where.

The tests run as root, so a read-only folder would not stop a write. Instead: ENOSPC injected
into the write in-process, and a real kernel EFBIG from ``RLIMIT_FSIZE`` in a subprocess.
"""
import errno
import io
import os
import resource
import signal

import pytest
import torch

import train
from sge import checkpoint
from tests.engine_utils import tiny_overrides
from tests.faults.tools import finish, launch, one_line_error, run_main, train_args


def test_disk_full_mid_write_keeps_previous_checkpoint(folder, empty_yaml, tmp_path, monkeypatch,
                                                       capsys):
    real_save = torch.save
    calls = []

    def save_until_disk_full(obj, fh, *args, **kwargs):
        calls.append(getattr(fh, "name", fh))
        if len(calls) < 2:
            return real_save(obj, fh, *args, **kwargs)
        fh.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the disk, then none fit
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_until_disk_full)
    argv = ["--config", empty_yaml,
            *tiny_overrides(folder, tmp_path, "train.epochs=1", "train.ckpt_every_steps=2")]
    code, _, err = run_main(train.main, argv, capsys)
    monkeypatch.undo()
    assert len(calls) == 2  # the fault happened: the second checkpoint write hit a full disk
    last = tmp_path / "checkpoints" / "last.pt"
    assert code == 1
    line = one_line_error(err)
    assert f"could not write checkpoint {last}: No space left on device" in line
    assert checkpoint.read_checkpoint(last)["global_step"] == 2  # the previous one, intact
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]  # no temp file left


@pytest.mark.parametrize("room", [0, 100, 5000])
def test_write_failing_inside_torch_save(tmp_path, monkeypatch, room):
    # The real torch.save into a file that takes `room` bytes, then fails with EFBIG. Past
    # the first bytes, torch's zip writer raises a RuntimeError over the OSError on clean-up
    # (seen in CI under RLIMIT_FSIZE): either way one CheckpointError naming path and cause.
    target = tmp_path / "last.pt"
    checkpoint.write_atomic({"step": 1}, target)
    before = target.read_bytes()
    real_fdopen = os.fdopen

    class Limited(io.FileIO):
        def write(self, data):
            if self.tell() + len(data) > room:
                raise OSError(errno.EFBIG, "File too large")
            return super().write(data)

    def fdopen(fd, mode="r", *args, **kwargs):
        if "w" not in mode:
            return real_fdopen(fd, mode, *args, **kwargs)
        return io.BufferedWriter(Limited(fd, "w"))

    monkeypatch.setattr(checkpoint.os, "fdopen", fdopen)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.write_atomic({"weights": torch.zeros(3000), "config": "x" * 3000}, target)
    monkeypatch.undo()
    assert str(info.value) == (f"could not write checkpoint {target}: File too large; "
                               "the previous checkpoint there is left intact")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit fails: EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))


def test_file_size_limit_from_the_kernel(folder, empty_yaml, tmp_path, capsys):
    # Epoch 1 without limits, then epoch 2 resumed where no file may exceed 16 KiB: the run
    # dir's small files still fit, a checkpoint (~200 KiB) does not.
    argv = ["--config", empty_yaml, *tiny_overrides(folder, tmp_path, "train.epochs=1")]
    assert run_main(train.main, argv, capsys)[0] == 0
    ckpt_dir = tmp_path / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}
    assert checkpoint.read_checkpoint(ckpt_dir / "last.pt")["global_step"] == 6
    proc = launch(train_args(empty_yaml, folder, tmp_path, "train.epochs=2"),
                  preexec_fn=_limit_file_size)
    code, out, err = finish(proc)
    assert code == 1 and "resumed from" in out
    line = one_line_error(err)
    assert "File too large" in line and f"could not write checkpoint {ckpt_dir}/" in line, line
    after = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}
    assert after == before  # every previous checkpoint intact, no temp file left


def test_failed_safetensors_export_keeps_previous_best(tmp_path, monkeypatch):
    weights = {"fc.weight": torch.ones(2, 3)}
    checkpoint.save_best(weights, tmp_path, which="raw", top1=50.0, epoch=1, global_step=1,
                         config={})
    before = (tmp_path / "best.safetensors").read_bytes()

    import safetensors.torch

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a header")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    try:
        checkpoint.save_best({"fc.weight": torch.zeros(2, 3)}, tmp_path, which="raw",
                             top1=60.0, epoch=2, global_step=2, config={})
    except checkpoint.CheckpointError as exc:
        assert f"could not write {tmp_path / 'best.safetensors'}: No space left" in str(exc)
    else:
        raise AssertionError("the failed export was not reported")
    assert (tmp_path / "best.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "best.safetensors"]
