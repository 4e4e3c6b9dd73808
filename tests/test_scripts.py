"""The user-facing scripts: help, bad arguments, and each one run end to end on tiny inputs.

Independent references: report.py's numbers are checked against the rows the test writes
and against parameter counts from a freshly built model; predict.py's probabilities against
the model's own softmax; visualize_sge.py's gates against the SGE formula via its hooks; the
sweep's eval.txt against the best row train.py logged.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import models

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))
import bench_sge  # noqa: E402
import bench_sge_block  # noqa: E402
import predict  # noqa: E402
import profile_step  # noqa: E402
import report  # noqa: E402
import visualize_sge  # noqa: E402
SHELL = ["train.sh", "train_multinode.sh", "slurm_train.sbatch", "sweep_groups.sh",
         "eval_released.sh", "check_gpu.sh"]
PYTHON = ["report.py", "predict.py", "visualize_sge.py", "bench_sge.py", "bench_sge_block.py",
          "profile_step.py"]
NARROW = dict(channels=(8, 16, 32, 64), groups=4, num_classes=3)


def run(args, cwd=ROOT, env=None, ok=True):
    """Run a script; return (returncode, stdout, stderr); assert the expected outcome."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    if args[0].endswith(".py"):
        args = [sys.executable, str(SCRIPTS / args[0]), *args[1:]]
    elif args[0] in SHELL:
        args = ["bash", str(SCRIPTS / args[0]), *args[1:]]
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=300)
    if ok is not None:
        assert (proc.returncode == 0) == ok, (proc.returncode, proc.stdout, proc.stderr)
    return proc.returncode, proc.stdout, proc.stderr


def tool(module, argv, capsys, ok=True):
    """Run a Python tool's main() in this process (a subprocess costs seconds of imports)."""
    capsys.readouterr()
    try:
        code = module.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    assert (code == 0) == ok, (code, out, err)
    return code, out, err


@pytest.mark.parametrize("script", SHELL + PYTHON)
def test_help(script):
    _, out, _ = run([script, "--help"])
    assert "usage" in out.lower()


@pytest.mark.parametrize("args, message", [
    (["train.sh"], "missing CONFIG"),
    (["train.sh", "no/such.yaml"], "config file not found: no/such.yaml"),
    (["train.sh", "CFG", "epochs"], "'epochs' is not an override"),
    (["train.sh", "--bogus"], "unknown option '--bogus'"),
    (["train_multinode.sh", "CFG"], "number of nodes is not set"),
    (["train_multinode.sh", "--nnodes", "2", "--node-rank", "2", "--master-addr", "h", "CFG"],
     "NODE_RANK=2 must be below NNODES=2"),
    (["train_multinode.sh", "--nnodes", "two", "CFG"], "NNODES must be an integer"),
    (["train_multinode.sh", "--nnodes", "1", "--node-rank", "0", "--master-addr", "h",
      "--master-port", "70000", "CFG"], "MASTER_PORT must be a TCP port"),
    (["slurm_train.sbatch", "CFG"], "not inside a SLURM job"),
    (["sweep_groups.sh", "CFG"], "missing OUT_ROOT"),
    (["sweep_groups.sh", "CFG", "out/x", "2", "four"], "group count G must be an integer"),
    (["sweep_groups.sh", "CFG", "out/x", "0"], "group count G must be an integer >= 1"),
    (["sweep_groups.sh", "CFG", "out/x", "2", "--", "model.groups=8"],
     "the sweep sets model.groups"),
    (["eval_released.sh", "no/such/dir", "."], "checkpoint folder not found: no/such/dir"),
    (["eval_released.sh", "tests", "."], "none of old_resnet50.pth.tar"),
    (["check_gpu.sh", "--bogus"], "unknown option '--bogus'"),
])
def test_shell_scripts_refuse_bad_arguments(args, message, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    args = [str(cfg) if a == "CFG" else a for a in args]
    code, out, err = run(args, ok=False)
    assert code == 2 and message in err, (code, out, err)


def test_check_gpu_runs_the_tools_with_options_they_take(tmp_path):
    """check_gpu.sh's commands, as --dry-run lists them, parse with each tool's own
    argument parser (a renamed option would otherwise show only on a GPU machine), and its
    test steps collect the GPU cases; without a GPU the script stops before running any."""
    _, out, _ = run(["check_gpu.sh", "--dry-run", str(tmp_path / "g")], env={"BATCH": "64"})
    steps = {step: shlex.split(command)[1:] for step, command in
             (line.split(": ", 1) for line in out.splitlines())}
    assert list(steps) == ["kernels", "tests", "cost", "graphs", "profile", "blocks"]
    tools = {"bench_sge.py": bench_sge, "profile_step.py": profile_step,
             "bench_sge_block.py": bench_sge_block}
    for step, words in steps.items():
        if words[:2] == ["-m", "pytest"]:
            continue
        args = tools[Path(words[0]).name].parse_args(words[1:])
        assert args.device == "cuda", step
    assert bench_sge.parse_args(steps["cost"][1:]).batch == 64
    assert bench_sge.parse_args(steps["graphs"][1:]).cuda_graph

    # The test steps select the GPU cases CI skips (collected here, not run).
    def collect(words):
        return subprocess.run([sys.executable, *words, "--collect-only"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout

    kernels, tests = collect(steps["kernels"]), collect(steps["tests"])
    assert "tests/test_fused_triton.py::" in kernels and "deselected" not in kernels
    for case in ("test_cuda_train_step_never_waits_for_the_gpu",
                 "test_fp16_scaler_skipped_steps_counted_on_gpu",
                 "test_bench_sge_cuda_graph_replays_train_and_infer_steps"):
        assert case in tests, case
    if not torch.cuda.is_available():
        code, _, err = run(["check_gpu.sh", str(tmp_path / "g")], ok=False)
        assert code == 2 and "no CUDA GPU is visible" in err
        assert not (tmp_path / "g").exists()


def test_sweep_refuses_a_group_count_that_does_not_divide(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: sge_resnet18, channels: [8, 16, 32, 64]}\n"
                   "data: {backend: synthetic}\n")
    _, _, err = run(["sweep_groups.sh", str(cfg), str(tmp_path / "sw"), "2", "3"], ok=False)
    assert "G=3" in err and "model.groups" in err
    assert not (tmp_path / "sw" / "g2").exists()  # checked before anything trained


def test_launchers_print_the_resolved_command(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    _, out, _ = run(["train.sh", "--dry-run", str(cfg), "train.epochs=3"], env={"NPROC": "2"})
    line = out.strip().splitlines()[-1]
    assert "--standalone" in line and "--nproc_per_node=2" in line
    assert line.endswith(f"train.py --config {cfg} train.epochs=3")
    _, out, _ = run(["train_multinode.sh", "--dry-run", "--nproc-per-node", "4", str(cfg)],
                    env={"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0"})
    for arg in ("--nnodes=2", "--node_rank=1", "--master_addr=node0", "--master_port=29500",
                "--nproc_per_node=4"):
        assert arg in out


def test_slurm_script_launches_one_torchrun_per_node(tmp_path):
    """sbatch's environment and commands stubbed: srun runs the task as node 1 would."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nshift 2\nSLURM_NODEID=1 DRY_RUN=1 exec \"$@\"\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_GPUS_ON_NODE": "8", "SGE_ROOT": str(ROOT)}
    _, out, _ = run(["slurm_train.sbatch", str(cfg), "train.epochs=1"], cwd=tmp_path, env=env)
    assert "2 node(s) x 8 processes, rendezvous gpu-a:29500" in out
    torchrun = out.strip().splitlines()[-1]
    for arg in ("--nnodes=2", "--node_rank=1", "--master_addr=gpu-a", "--nproc_per_node=8",
                f"--config {cfg} train.epochs=1"):
        assert arg in torchrun, out


# ---------------------------------------------------------------- report.py

def _write_run(path: Path, model: dict, val_top1: list, crop: int = 32):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(
        {"model": model, "data": {"val_resize": crop, "val_img_size": crop}}))
    with open(path / "metrics.jsonl", "w") as fh:
        for epoch, top1 in enumerate(val_top1, 1):
            for split in ("train", "val"):
                fh.write(json.dumps({
                    "epoch": epoch, "step": 10 * epoch, "split": split, "weights": "raw",
                    "loss": 3.0 / epoch, "top1": top1 - (split == "train"),
                    "top5": min(100.0, top1 + 20), "images": 50, "lr": 0.1, "img_per_s": 9.0,
                    "time": 0.0}) + "\n")


def test_report_table_and_plots(tmp_path, capsys):
    narrow = {"name": "sge_resnet18", "channels": [8, 16, 32, 64], "num_classes": 10}
    _write_run(tmp_path / "sweep" / "g2", {**narrow, "groups": 2}, [30.0, 55.5, 41.0])
    _write_run(tmp_path / "sweep" / "g4", {**narrow, "groups": 4}, [35.0, 50.25, 60.125])
    _write_run(tmp_path / "paper", {"name": "sge_resnet50", "groups": 64, "num_classes": 1000},
               [70.0, 77.0], crop=224)
    # An earlier run that a fresh start moved aside is not one of the sweep's runs.
    _write_run(tmp_path / "sweep" / "g4" / "previous" / "20261123-000000",
               {**narrow, "groups": 4}, [99.0])
    # A resumed run may log an epoch twice: the later row counts.
    with open(tmp_path / "sweep" / "g4" / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 3, "split": "val", "weights": "raw", "loss": 1.0,
                             "top1": 58.0, "top5": 80.0}) + "\n")
    out_md, plots = tmp_path / "results.md", tmp_path / "plots"
    _, out, _ = tool(report, [tmp_path / "sweep", tmp_path / "paper", "--out", out_md,
                              "--plots", plots], capsys)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in out_md.read_text().splitlines() if line.startswith("| ")}
    assert rows["sweep/g2"][2:] == ["2", "0.19M", rows["sweep/g2"][4], "55.500 (2)", "75.500",
                                    "-", "-"]
    assert rows["sweep/g4"][5:7] == ["58.000 (3)", "80.000"]
    assert sorted(rows) == ["Run", "paper", "sweep/g2", "sweep/g4"]  # header and three runs
    params = sum(p.numel() for p in models.create_model("sge_resnet50").parameters())
    assert params == 25_559_080
    assert rows["paper"][3] == f"{params / 1e6:.2f}M"
    assert rows["paper"][4] == "4.127"  # the paper's count (4.127 G for SGE-R50)
    assert rows["paper"][5:] == ["77.000 (2)", "97.000", "77.584", "-0.584"]
    assert out.startswith(out_md.read_text().splitlines()[0])
    for name in ("curves.png", "groups.png"):
        with Image.open(plots / name) as img:
            assert img.size[0] > 200 and img.size[1] > 200


def test_report_errors(tmp_path, capsys):
    _, _, err = tool(report, [tmp_path / "nothing"], capsys, ok=False)
    assert f"no such run directory: {tmp_path / 'nothing'}" in err
    (tmp_path / "empty").mkdir()
    _, _, err = tool(report, [tmp_path / "empty"], capsys, ok=False)
    assert "holds no run (no metrics.jsonl" in err


# ---------------------------------------------------------------- predict / visualize

@pytest.fixture(scope="module")
def narrow_checkpoint(tmp_path_factory):
    """A narrow SGE-ResNet18 with non-trivial SGE gates, saved as plain weights and as one
    of our checkpoints (with its config, whose data root names the classes)."""
    tmp = tmp_path_factory.mktemp("narrow")
    torch.manual_seed(0)
    model = models.create_model("sge_resnet18", **NARROW).eval()
    for name, p in model.named_parameters():
        if name.endswith("se.weight"):
            p.data.normal_(0, 2)  # gamma=0 at init would make every gate sigmoid(beta)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("apple", "kiwi", "plum"):
            (tmp / "data" / split / cls).mkdir(parents=True)
    image = tmp / "img.png"
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(image)
    config = {"model": {"name": "sge_resnet18", **NARROW, "channels": list(NARROW["channels"])},
              "data": {"root": str(tmp / "data"), "val_resize": 48, "val_img_size": 40}}
    torch.save(model.state_dict(), tmp / "plain.pt")
    torch.save({"model": model.state_dict(), "config": config}, tmp / "ours.pt")
    config["model"]["sge_impl"] = "fused"  # same keys; the fused one hides BN inside itself
    torch.save({"model": model.state_dict(), "config": config}, tmp / "fused.pt")
    return tmp, model, image


def _reference_probs(model, image, resize, crop):
    from data.presets import ValPreset, normalize
    from data.folder import load_rgb
    x = normalize(ValPreset(resize, crop)(load_rgb(str(image)))[None], torch.device("cpu"))
    with torch.no_grad():
        return model(x).softmax(1)[0]


def test_predict_top5_names_and_probabilities(narrow_checkpoint, capsys):
    tmp, model, image = narrow_checkpoint
    probs = _reference_probs(model, image, 48, 40)
    _, out, _ = tool(predict, ["--checkpoint", tmp / "ours.pt", image], capsys)
    lines = out.strip().splitlines()
    assert lines[0] == str(image) and len(lines) == 4  # 3 classes: top-5 clips to 3
    order = probs.argsort(descending=True).tolist()
    for line, idx in zip(lines[1:], order):
        name = ("apple", "kiwi", "plum")[idx]
        assert re.search(rf"{100 * probs[idx]:6.2f}%  {name}  \(class {idx}\)", line), line
    # Plain weights: the architecture from --model and the state dict, default preprocessing
    # (256 -> 224) and generic names.
    probs = _reference_probs(model, image, 256, 224)
    _, out, _ = tool(predict, ["--model", "sge_resnet18", "--checkpoint", tmp / "plain.pt",
                               "--topk", "1", image], capsys)
    idx = int(probs.argmax())
    assert out.strip().splitlines()[1].strip() == f"1. {100 * probs[idx]:6.2f}%  class {idx}"


def test_predict_errors(narrow_checkpoint, capsys):
    tmp, _, image = narrow_checkpoint
    for argv, message in [
        (["--checkpoint", tmp / "plain.pt", image], "stores no config: pass --model NAME"),
        (["--checkpoint", tmp / "missing.pt", image],
         f"checkpoint not found: {tmp / 'missing.pt'}"),
        (["--model", "sge_resnet34", "--checkpoint", tmp / "plain.pt", image],
         "does not fit the model: the file looks like sge_resnet18 (groups=4)"),
        (["--checkpoint", tmp / "ours.pt", "--topk", "0", image], "--topk must be >= 1"),
        (["--checkpoint", tmp / "ours.pt", tmp / "nope.jpg"], f"image not found: {tmp}"),
        (["--checkpoint", tmp / "ours.pt", tmp / "plain.pt"], "cannot decode image"),
    ]:
        _, _, err = tool(predict, argv, capsys, ok=False)
        assert message in err, (argv, err)


def test_visualize_sge_grid_and_gates(narrow_checkpoint, tmp_path, capsys):
    tmp, model, image = narrow_checkpoint
    out, tb = tmp_path / "viz.png", tmp_path / "tb"
    _, stdout, _ = tool(visualize_sge, ["--checkpoint", tmp / "ours.pt", "--image", image,
                                        "--out", out, "--tensorboard", tb], capsys)
    # Independent reference: the gate of layer4[-1] from the SGE formula, written out here.
    from data.presets import ValPreset, normalize
    from data.folder import load_rgb
    x = normalize(ValPreset(48, 40)(load_rgb(str(image)))[None], torch.device("cpu"))
    seen = {}
    se = model.layer4[-1].se
    handle = se.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    f = seen["x"].double()
    n, c, h, w = f.shape
    groups = f.reshape(n, 4, c // 4, h * w)
    dots = (groups * groups.mean(3, keepdim=True)).sum(2)
    dots = (dots - dots.mean(2, keepdim=True)) / (dots.std(2, keepdim=True) + 1e-5)
    gate = torch.sigmoid(dots * se.weight.double().view(1, 4, 1) + se.bias.double().view(1, 4, 1))
    summary = re.search(r"gate mean ([\d.]+) \(min ([\d.]+), max ([\d.]+)\)", stdout)
    assert [float(v) for v in summary.groups()] == pytest.approx(
        [gate.mean().item(), gate.min().item(), gate.max().item()], abs=1.5e-3)
    assert f"4 groups, {h}x{w} positions" in stdout
    # A run trained with the fused SGE: the same maps (the tools hook the reference layer).
    _, fused_out, _ = tool(visualize_sge, ["--checkpoint", tmp / "fused.pt", "--image", image,
                                           "--out", tmp_path / "fused.png"], capsys)
    assert fused_out.splitlines()[0] == stdout.splitlines()[0]
    with Image.open(out) as img:
        assert img.size[0] > 200 and img.size[1] > 400
    assert list(tb.glob("events.out.tfevents.*"))
    # Plain weights need --model; a non-SGE model is refused by name.
    tool(visualize_sge, ["--model", "sge_resnet18", "--checkpoint", tmp / "plain.pt",
                         "--image", image, "--out", tmp_path / "v2.png", "--stage", "2"], capsys)
    plain = models.create_model("resnet18", channels=(8, 16, 32, 64), num_classes=3)
    torch.save(plain.state_dict(), tmp_path / "resnet.pt")
    for argv, message in [
        (["--model", "resnet18", "--checkpoint", tmp_path / "resnet.pt"], "has no SGE module"),
        (["--checkpoint", tmp / "ours.pt", "--block", "5"],
         "--block 5 out of range: layer4 has 2 blocks"),
        (["--checkpoint", tmp / "ours.pt", "--stage", "5"], "invalid choice: 5"),
    ]:
        _, _, err = tool(visualize_sge, [*argv, "--image", image, "--out", tmp_path / "v.png"],
                         capsys, ok=False)
        assert message in err, (argv, err)
    assert not (tmp_path / "v.png").exists()


# ---------------------------------------------------------------- the sweep, end to end

def _tiny_imagefolder(root: Path, classes: int, train_per_class: int, val_total: int):
    rng = np.random.default_rng(1)
    for split, count in (("train", train_per_class * classes), ("val", val_total)):
        for i in range(count):
            cls = root / split / f"c{i % classes}"
            cls.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(
                cls / f"{i}.jpg")


def test_sweep_groups_end_to_end_and_resumable(tmp_path):
    """The quickstart config on a tiny folder: two group counts, one two-step epoch each."""
    data, out_root = tmp_path / "data", tmp_path / "sweep"
    _tiny_imagefolder(data, classes=10, train_per_class=2, val_total=7)
    overrides = ["--", f"data.root={data}", "train.epochs=1", "train.steps_per_epoch=2",
                 "data.batch_size=8", "data.workers=0", "data.img_size=32",
                 "data.val_resize=32", "data.val_img_size=32", "output.tensorboard=false",
                 "train.progress=false"]
    cmd = ["sweep_groups.sh", "configs/quickstart.yaml", str(out_root), "2", "4", *overrides]
    env = {"NPROC": "1"}
    _, out, _ = run(cmd, env=env)
    for g in (2, 4):
        run_dir = out_root / f"g{g}"
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["groups"] == g
        val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["split"] == "val"]
        assert [r["epoch"] for r in val] == [1] and val[0]["images"] == 7
        ev = (run_dir / "eval.txt").read_text().strip().splitlines()[-1]
        assert ev == f"top1={val[0]['top1']:.3f} top5={val[0]['top5']:.3f} images=7"
        assert f"| g{g} | " in (out_root / "summary.md").read_text()
    assert (out_root / "groups.png").is_file() and (out_root / "curves.png").is_file()
    assert out.count("train.py --config") == 2

    _, out, _ = run(cmd, env=env)  # everything recorded: nothing trains or evaluates again
    assert "train.py --config" not in out and "eval.py --config" not in out
    assert out.count("finished earlier") == 2 and out.count("evaluated earlier") == 2


# ---------------------------------------------------------------- released checkpoints

def test_eval_released_on_a_val_folder(tmp_path):
    """A released-format plain ResNet50 (narrowed by an override) on a 1000-class val folder
    without train/: our top-1 beside the paper's, checked against a direct evaluation."""
    torch.manual_seed(0)
    model = models.create_model("resnet50", channels=(8, 16, 32, 64)).eval()
    ckpts = tmp_path / "released"
    ckpts.mkdir()
    torch.save({"epoch": 100, "state_dict": {f"module.{k}": v for k, v in
                                             model.state_dict().items()},
                "best_acc": 0.0, "acc": 0.0, "optimizer": {}}, ckpts / "old_resnet50.pth.tar")
    rng = np.random.default_rng(0)
    val = tmp_path / "val"
    for i in range(1000):
        (val / f"n{i:08d}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
            val / f"n{i:08d}" / "x.png")
    _, out, _ = run(["eval_released.sh", str(ckpts), str(val), "--",
                     "model.channels=[8,16,32,64]", "data.val_resize=16", "data.val_img_size=16",
                     "data.workers=0", "data.batch_size=500"],
                    env={"NPROC": "1", "OUT_DIR": str(tmp_path / "out")})
    from data.folder import load_rgb
    from data.presets import ValPreset, normalize
    x = normalize(torch.stack([ValPreset(16, 16)(load_rgb(str(val / f"n{i:08d}" / "x.png")))
                               for i in range(1000)]), torch.device("cpu"))
    with torch.no_grad():
        top1 = (model(x).argmax(1) == torch.arange(1000)).sum().item() / 10
    row = [line for line in out.splitlines() if line.startswith("| old_resnet50.pth.tar")][0]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[:6] == ["old_resnet50.pth.tar", "resnet50", "1000", f"{top1:.3f}", "76.384",
                         f"{top1 - 76.384:+.3f}"]
    assert (tmp_path / "out" / "summary.md").read_text().count("| old_resnet50") == 1


def test_bench_sge_block_times_every_stage(capsys):
    # Tiny shapes on CPU: every stage gets every case, timed, and the ratio column is
    # the case over ResNet's tail from the same JSON.
    _, out, _ = tool(bench_sge_block, ["--device", "cpu", "--batch", "2", "--img", "32",
                                       "--groups", "4", "--iters", "1", "--rounds", "1"],
                     capsys)
    result = json.loads(out.strip().splitlines()[-1])
    assert list(result["ms"]) == ["256x8x8", "512x4x4", "1024x2x2", "2048x1x1"]
    for figs in result["ms"].values():
        assert set(figs) == {"copy", "resnet fwd", "resnet fwd+bwd", "resnet infer",
                             "fused fwd", "fused fwd+bwd", "fused infer", "reference fwd",
                             "reference fwd+bwd", "reference infer", "fused: batch stats",
                             "fused: op fwd", "fused: op bwd"}
        assert all(t > 0 for t in figs.values())
    figs = result["ms"]["256x8x8"]
    for case in ("fwd+bwd", "infer"):
        row = next(line for line in out.splitlines() if line.startswith(f"fused {case}"))
        assert f"({figs[f'fused {case}'] / figs[f'resnet {case}']:.2f}x)" in row
    # On a CPU the host's time to issue the calls is their wall time: the same figures.
    assert result["host_ms"] == result["ms"]


def test_bench_sge_block_downsample_tail(capsys, kernel_forwards):
    # A downsampling block's tail: the fused SGE gets the shortcut's BN (its C++ path applies
    # it), the other tails run it as a module; every case is timed.
    from sge import fused_cpu
    _, out, _ = tool(bench_sge_block, ["--device", "cpu", "--batch", "2", "--img", "32",
                                       "--groups", "4", "--iters", "1", "--rounds", "1",
                                       "--downsample", "--channels-last"], capsys)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["config"]["downsample"] and "downsample=True" in out
    assert all(t > 0 for figs in result["ms"].values() for t in figs.values())
    assert any(f["residual_bn"] is not None for f in kernel_forwards) == \
        fused_cpu.applies(torch.zeros(1, 1, 1, 1))


def test_gpu_timeline_counts_busy_idle_and_gaps_by_next_kernel():
    # Hand-computed: b overlaps a? no (gap 2); c overlaps b (adds 5); e lies inside c; d
    # follows a 5 us gap. Busy 10 + 8 + 5 + 1, idle 2 + 5, listed gaps >= 3 us only.
    kernels = [("d", 30, 31), ("b", 12, 20), ("a", 0, 10), ("c", 15, 25), ("e", 16, 18)]
    line = profile_step.gpu_timeline(kernels, min_gap_us=3)
    assert (line["busy_us"], line["idle_us"], line["span_us"]) == (24, 7, 31)
    assert line["gaps"] == {"d": [5, 1]}
    assert profile_step.gpu_timeline(kernels)["gaps"] == {"b": [2, 1], "d": [5, 1]}
    assert profile_step.gpu_timeline([])["span_us"] == 0


def test_profile_step_on_cpu_reports_wall_time_and_writes_traces(capsys, tmp_path):
    _, out, _ = tool(profile_step, ["--device", "cpu", "--batch", "2", "--img", "32",
                                    "--amp", "none", "--warmup", "1", "--steps", "1",
                                    "--rounds", "2", "--profile-steps", "1",
                                    "--trace", tmp_path], capsys)
    result = json.loads(out.strip().splitlines()[-1])["models"]
    assert list(result) == ["resnet50", "sge_resnet50_fused"]
    for name, figs in result.items():
        assert figs["wall_ms"] > 0 and figs["kernel_ms"] is None
        assert json.loads((tmp_path / f"{name}.json").read_text())["traceEvents"]
    _, _, err = tool(profile_step, ["--variants", "resnet51"], capsys, ok=False)
    assert "unknown ['resnet51']" in err


def test_ratio_interval_is_a_paired_bootstrap_of_the_median_ratio():
    # A constant ratio per round gives that ratio whatever the resampling draws.
    base = [1.0, 1.3, 0.9, 1.1, 1.2]
    assert bench_sge.ratio_interval(base, [1.5 * t for t in base]) == [1.5, 1.5]
    # Noisy rounds: the interval holds the point ratio, narrows with more rounds of the
    # same spread, and is the same for the same figures (fixed seed).
    rng = np.random.default_rng(0)
    a = list(1 + 0.05 * rng.standard_normal(40))
    b = list(1.02 + 0.05 * rng.standard_normal(40))
    lo, hi = bench_sge.ratio_interval(a, b)
    point = float(np.median(b) / np.median(a))
    assert lo < point < hi
    lo10, hi10 = bench_sge.ratio_interval(a[:10], b[:10])
    assert hi10 - lo10 > hi - lo
    assert bench_sge.ratio_interval(a, b) == [lo, hi]
    # Pairing matters: shuffling one side's rounds breaks the pairs and widens it when
    # both sides share each round's drift.
    drift = list(np.linspace(0.8, 1.2, 40))
    paired = bench_sge.ratio_interval(drift, [1.02 * d + 0.002 * e for d, e in
                                              zip(drift, rng.standard_normal(40))])
    unpaired = bench_sge.ratio_interval(drift, list(rng.permutation([1.02 * d for d in drift])))
    assert paired[1] - paired[0] < (unpaired[1] - unpaired[0]) / 5
    assert bench_sge.ratio_interval([1.0, 1.0], [1.0, 1.0]) is None  # too few rounds
    assert bench_sge.ratio_interval([1.0] * 4, [1.0] * 3) is None    # unpaired


def test_ratio_interval_over_processes_holds_their_spread():
    # Six processes whose ratios differ (0.97 ... 1.12, 3% apart) while rounds agree within
    # each: resampling rounds alone gives an interval about the pooled median; drawing
    # processes first also holds how far the processes spread, and is much wider.
    rng = np.random.default_rng(1)
    base = list(1 + 0.01 * rng.standard_normal(90))
    other = [t * (0.97 + 0.03 * (i // 15)) * (1 + 0.01 * e)
             for i, (t, e) in enumerate(zip(base, rng.standard_normal(90)))]
    process = [i // 15 for i in range(90)]
    lo, hi = bench_sge.ratio_interval(base, other)
    plo, phi = bench_sge.ratio_interval(base, other, process=process)
    assert plo < lo and phi > hi and phi - plo > 2 * (hi - lo)
    assert plo < 1.0 and phi > 1.09
    # One process: the plain bootstrap, draw for draw.
    assert bench_sge.ratio_interval(base, other, process=[0] * 90) == [lo, hi]
    assert bench_sge.ratio_interval(base, other, process=[0] * 89) is None  # unpaired
    assert bench_sge._by_process(base, other, process) == [
        round(float(np.median(other[i:i + 15]) / np.median(base[i:i + 15])), 4)
        for i in range(0, 90, 15)]


def test_bench_sge_pools_rounds_from_several_processes():
    _, out, _ = run(["bench_sge.py", "--batch", "2", "--img", "32", "--repeats", "1",
                     "--steps", "3", "--warmup", "1", "--measure", "infer", "--same-process",
                     "--processes", "2", "--variants", "resnet50,sge_resnet50_fused",
                     "--threads", "1", "--keep-freed-memory"])
    result = json.loads(out.strip().splitlines()[-1])
    assert result["config"]["processes"] == 2
    assert result["config"]["keep_freed_memory"] and "freed memory kept" in out
    figs = result["results"]
    a, b = figs["resnet50"]["infer_time_all"], figs["sge_resnet50_fused"]["infer_time_all"]
    process = figs["resnet50"]["infer_time_process"]
    assert len(a) == len(b) == 6 and process == [0, 0, 0, 1, 1, 1]
    assert result["fused_infer_time_ratio"] == round(float(np.median(b) / np.median(a)), 4)
    by_process = result["fused_infer_time_ratio_by_process"]
    assert by_process == [round(float(np.median(b[i:i + 3]) / np.median(a[i:i + 3])), 4)
                          for i in (0, 3)]
    lo, hi = result["fused_infer_time_ratio_ci"]
    per_round = [q / p for p, q in zip(a, b)]
    assert min(per_round) - 1e-4 <= lo <= hi <= max(per_round) + 1e-4
    assert "bootstrap over processes, then rounds" in out
    assert "ratio in each process: fused infer time " + ", ".join(
        f"{r:.3f}x" for r in by_process) in out


@pytest.mark.parametrize("args, message", [
    (["--processes", "2"], "--processes is for --same-process"),
    (["--same-process", "--processes", "0"], "--processes must be at least 1"),
])
def test_bench_sge_refuses_bad_process_counts(args, message, capsys):
    _, _, err = tool(bench_sge, args, capsys, ok=False)
    assert message in err


def test_bench_sge_same_process_on_cpu_prints_ratios_with_intervals():
    _, out, _ = run(["bench_sge.py", "--batch", "2", "--img", "32", "--repeats", "1",
                     "--steps", "4", "--warmup", "1", "--measure", "infer", "--same-process",
                     "--variants", "resnet50,sge_resnet50_fused,resnet50_control",
                     "--threads", "1"])
    result = json.loads(out.strip().splitlines()[-1])
    figs = result["results"]
    a, b = figs["resnet50"]["infer_time_all"], figs["sge_resnet50_fused"]["infer_time_all"]
    assert len(a) == len(b) == 4 and min(a + b) > 0
    ratio = result["fused_infer_time_ratio"]
    assert ratio == round(float(np.median(b) / np.median(a)), 4)
    # Every round's b >= r a makes every resampled median ratio >= r (order statistics), so
    # the interval lies within the per-round ratios' range (up to its 4-digit rounding).
    lo, hi = result["fused_infer_time_ratio_ci"]
    per_round = [q / p for p, q in zip(a, b)]
    assert min(per_round) - 1e-4 <= lo <= ratio <= hi <= max(per_round) + 1e-4
    assert f"fused infer time {lo:.3f}-{hi:.3f}x" in out
    assert result["fused_train_time_ratio_ci"] is None  # not measured
    # The same-model control: a second ResNet50, with its own ratio and interval.
    c = figs["resnet50_control"]["infer_time_all"]
    assert result["control_infer_time_ratio"] == round(float(np.median(c) / np.median(a)), 4)
    assert result["control_infer_time_ratio_ci"] is not None
    assert result["reference_infer_time_ratio"] is None  # not asked for


@pytest.mark.parametrize("args, message", [
    (["--cuda-graph"], "--cuda-graph needs --device cuda"),
    (["--cuda-graph", "--device", "cuda", "--amp", "float16"], "use --amp bfloat16"),
    (["--cuda-graph", "--device", "cuda", "--measure", "compiled"],
     "--compile-mode reduce-overhead"),
])
def test_bench_sge_refuses_cuda_graphs_where_they_cannot_capture(args, message, capsys):
    _, _, err = tool(bench_sge, args, capsys, ok=False)
    assert message in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_bench_sge_cuda_graph_replays_train_and_infer_steps():
    _, out, _ = run(["bench_sge.py", "--device", "cuda", "--batch", "4", "--img", "64",
                     "--repeats", "1", "--steps", "3", "--measure", "train,infer",
                     "--same-process", "--cuda-graph", "--amp", "bfloat16"])
    result = json.loads(out.strip().splitlines()[-1])
    assert result["config"]["cuda_graph"]
    for figs in result["results"].values():
        assert figs["train_time"] > 0 and figs["infer_time"] > 0
