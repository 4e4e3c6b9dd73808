"""DDP with gloo on CPU under torchrun: global batch, and evaluation exact across processes.

The val set has 13 images (odd, not a multiple of processes x batch): 2 processes must
report the same images and correct-counts as 1 process and as an image-by-image reference.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import presets
from data.folder import load_rgb, scan_split
from sge import builders, checkpoint, engine
from tests.engine_utils import free_port, make_folder, tiny_config, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(args, *, nnodes=1, node_rank=0, nproc=2, port, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
           f"--node_rank={node_rank}", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", *args]
    # gloo on CPU, also on a machine with GPUs (two processes may outnumber them).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return _finish(proc) if wait else proc


def _finish(proc):
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def two_process_run(folder, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp")
    overrides = tiny_overrides(folder, run_dir, "train.epochs=1", "dist.timeout_s=60")
    config = tmp_path_factory.mktemp("cfg") / "empty.yaml"
    config.write_text("{}\n")
    out = _torchrun(["train.py", "--config", str(config), *overrides], port=free_port())
    return run_dir, out


def test_two_process_training_global_batch(two_process_run):
    run_dir, out = two_process_run
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    train = [r for r in rows if r["split"] == "train"]
    # 24 train images, 2 processes x 4: 3 steps of a global batch of 8, lr 0.4 x 8 / 256.
    assert [(r["step"], r["images"], r["global_batch"]) for r in train] == [(3, 24, 8)]
    assert train[0]["lr"] == pytest.approx(0.4 * 8 / 256)
    assert json.loads((run_dir / "env.json").read_text())["world_size"] == 2
    assert out.count("epoch 1/1") == 1  # one summary line: rank 0 only


def _reference_counts(model, folder):
    """Image by image, outside the loaders and the engine: correct top-1/top-5 and images."""
    _, samples = scan_split(folder, "val")
    preset = presets.ValPreset(32, 32)
    mean = torch.tensor(presets.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(presets.IMAGENET_STD).view(3, 1, 1)
    model.eval()
    correct1 = correct5 = 0
    with torch.no_grad():
        for path, label in samples:
            x = preset(load_rgb(path))
            x = (x.float() / 255 - mean) / std if x.dtype == torch.uint8 else x
            logits = model(x.unsqueeze(0))[0]
            correct1 += int(logits.argmax() == label)
            correct5 += int(label in logits.topk(min(5, logits.numel())).indices)
    return correct1, correct5, len(samples)


def test_eval_exact_one_vs_two_processes(two_process_run, folder, tmp_path):
    run_dir, _ = two_process_run
    last = run_dir / "checkpoints" / "last.pt"
    val = [json.loads(line) for line in open(run_dir / "metrics.jsonl")
           if json.loads(line)["split"] == "val"]
    cfg = tiny_config(folder, tmp_path, "train.resume=never")
    one = engine.evaluate_checkpoint(cfg, last)  # 1 process, in this pytest process
    model = builders.build_model(cfg)
    checkpoint.load_model_weights(model, last)
    assert (one["correct1"], one["correct5"], one["images"]) == _reference_counts(model, folder)
    # The 2-process training run evaluated the same weights (saved right after validation).
    assert (val[0]["images"], val[0]["top1"], val[0]["top5"]) == \
        (13, one["top1"], one["top5"])
    # eval.py as two single-process "nodes" over loopback (torchrun --nnodes=2).
    port = free_port()
    args = ["eval.py", "--config", str(run_dir / "config.yaml"), "--checkpoint", str(last),
            f"output.dir={tmp_path}"]
    nodes = [_torchrun(args, nnodes=2, node_rank=r, nproc=1, port=port, wait=False)
             for r in (0, 1)]
    outputs = [_finish(p) for p in nodes]
    last_line = [line for line in outputs[0].splitlines() if line.startswith("top1=")]
    assert last_line == [f"top1={one['top1']:.3f} top5={one['top5']:.3f} images=13"]
    assert f"correct1={one['correct1']} correct5={one['correct5']}" in outputs[0]
    assert "top1=" not in outputs[1]  # only rank 0 prints
