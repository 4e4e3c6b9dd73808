"""scripts/prepare_imagenet_val.py and scripts/scan_dataset.py on small real image trees.

The scripts' ``main(argv)`` run in-process (a subprocess per call would spend most of the
test budget importing torch); exit codes and ``SystemExit`` messages are checked as a shell
would see them.
"""
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.folder import scan_split

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(script):
    spec = importlib.util.spec_from_file_location(script[:-3], SCRIPTS / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so worker processes can unpickle its functions
    spec.loader.exec_module(module)
    return module


MAINS = {s: _load(s).main for s in ("prepare_imagenet_val.py", "scan_dataset.py")}


@pytest.fixture
def run(capsys):
    def call(script, *args):
        try:
            code, message = MAINS[script]([str(a) for a in args]), ""
        except SystemExit as exc:  # argparse and error exits, as the shell sees them
            code, message = (exc.code, "") if isinstance(exc.code, int) else (1, str(exc.code))
        out = capsys.readouterr()
        return types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err + message)
    return call


def _jpeg(path: Path, seed: int, mode="RGB", fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, fmt, quality=90)


SYNSETS = ["n01440764", "n01443537", "n01484850"]
TRUTH = [0, 2, 1, 0, 2]  # class of ILSVRC2012_val_0000000{1..5}


@pytest.fixture
def flat_val(tmp_path):
    val = tmp_path / "val"
    for i in range(5):
        _jpeg(val / f"ILSVRC2012_val_{i + 1:08d}.JPEG", i)
    return val


def _sorted_tree(val):
    return sorted(str(p.relative_to(val)) for p in val.rglob("*.JPEG"))


EXPECTED = [f"{SYNSETS[c]}/ILSVRC2012_val_{i + 1:08d}.JPEG" for i, c in enumerate(TRUTH)]


@pytest.mark.parametrize("style", ["kaggle", "pairs", "ids"])
def test_prepare_val_from_each_ground_truth_format(run, flat_val, tmp_path, style):
    labels, extra = tmp_path / "labels.txt", []
    if style == "kaggle":
        labels.write_text("ImageId,PredictionString\n" + "".join(
            f"ILSVRC2012_val_{i + 1:08d},{SYNSETS[c]} 1 2 30 40 {SYNSETS[c]} 3 4 5 6\n"
            for i, c in reversed(list(enumerate(TRUTH)))))
    elif style == "pairs":
        labels.write_text("".join(f"ILSVRC2012_val_{i + 1:08d}.JPEG {SYNSETS[c]}\n"
                                  for i, c in enumerate(TRUTH)))
    else:  # devkit ground truth: class ids in image order, synsets by id
        labels.write_text("".join(f"{c + 1}\n" for c in TRUTH))
        (tmp_path / "synsets.txt").write_text("\n".join(SYNSETS) + "\n")
        extra = ["--synsets", tmp_path / "synsets.txt"]
    result = run("prepare_imagenet_val.py", flat_val, labels, *extra)
    assert result.returncode == 0, result.stderr
    assert "5 images -> 3 classes" in result.stdout
    assert sorted(_sorted_tree(flat_val)) == sorted(EXPECTED)
    again = run("prepare_imagenet_val.py", flat_val, labels, *extra)  # idempotent
    assert again.returncode == 0 and "already sorted" in again.stdout


def test_prepare_val_checks_everything_before_moving(run, flat_val, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"ILSVRC2012_val_{i + 1:08d} {SYNSETS[c]}\n"
                              for i, c in enumerate(TRUTH[:4])))
    result = run("prepare_imagenet_val.py", flat_val, labels)
    assert result.returncode != 0 and "ILSVRC2012_val_00000005.JPEG" in result.stderr
    labels.write_text(labels.read_text() + "ILSVRC2012_val_00000005 cat\n")
    result = run("prepare_imagenet_val.py", flat_val, labels)
    assert result.returncode != 0 and "line 5" in result.stderr and "'cat'" in result.stderr
    assert len(list(flat_val.glob("*.JPEG"))) == 5  # nothing moved


def test_prepare_val_into_out_with_symlinks_and_train_check(run, flat_val, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{SYNSETS[c]}\n" for c in TRUTH))
    train = tmp_path / "train"
    for s in SYNSETS[:2]:
        (train / s).mkdir(parents=True)
    out = tmp_path / "sorted"
    result = run("prepare_imagenet_val.py", flat_val, labels, "--out", out, "--mode", "symlink",
                  "--train", train)
    assert result.returncode != 0 and SYNSETS[2] in result.stderr
    (train / SYNSETS[2]).mkdir()
    result = run("prepare_imagenet_val.py", flat_val, labels, "--out", out, "--mode", "symlink",
                  "--train", train)
    assert result.returncode == 0, result.stderr
    assert sorted(_sorted_tree(out)) == sorted(EXPECTED)
    assert all(p.is_symlink() for p in out.rglob("*.JPEG"))
    assert len(list(flat_val.glob("*.JPEG"))) == 5


@pytest.fixture
def messy(tmp_path):
    """A tree with every kind of file scan_dataset must name."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("a", "b"):
            for i in range(3):
                _jpeg(root / split / c / f"{i}.JPEG", i)
    good = (root / "train" / "a" / "0.JPEG").read_bytes()
    (root / "train" / "a" / "trunc.JPEG").write_bytes(good[: len(good) // 2])
    (root / "train" / "a" / "zero.JPEG").write_bytes(b"")
    (root / "train" / "b" / "text.jpeg").write_bytes(b"<html>not found</html>\n" * 9)
    _jpeg(root / "train" / "b" / "cmyk.JPEG", 7, mode="CMYK")
    _jpeg(root / "val" / "a" / "gray.JPEG", 8, mode="L")
    _jpeg(root / "val" / "b" / "png.JPEG", 9, fmt="PNG")
    _jpeg(root / "val" / "zebra" / "0.JPEG", 10)          # a class train never saw
    (root / "train" / "empty").mkdir()
    return root


EXPECTED_KINDS = {"train/a/trunc.JPEG": "truncated", "train/a/zero.JPEG": "unreadable",
                  "train/b/text.jpeg": "unreadable", "train/b/cmyk.JPEG": "cmyk",
                  "val/a/gray.JPEG": "grayscale", "val/b/png.JPEG": "not-jpeg"}


def test_scan_names_every_problem(run, messy, tmp_path):
    result = run("scan_dataset.py", messy, "--workers", "2", "--json", tmp_path / "r.json")
    assert result.returncode == 1
    report = json.loads((tmp_path / "r.json").read_text())
    kinds = {str(Path(r["path"]).relative_to(messy)): r["kind"] for r in report["files"]}
    assert kinds == EXPECTED_KINDS
    for rel, kind in EXPECTED_KINDS.items():
        line = next(ln for ln in result.stdout.splitlines() if rel in ln)
        assert kind in line and (("ERROR" in line) == (kind in ("truncated", "unreadable")))
    assert report["counts"]["train"] == {"a": 5, "b": 5, "empty": 0}
    assert report["val_only_classes"] == ["zebra"]
    assert report["train_without_val"] == ["empty"]
    assert any(ln.startswith("ERROR empty class folder") and "empty" in ln
               for ln in result.stdout.splitlines())
    assert report["moved"] == []


def test_scan_moves_bad_files_aside(run, messy, tmp_path):
    (messy / "val" / "zebra" / "0.JPEG").unlink()
    (messy / "val" / "zebra").rmdir()
    (messy / "train" / "empty").rmdir()
    aside = tmp_path / "aside"
    result = run("scan_dataset.py", messy, "--workers", "1", "--move-bad", aside)
    assert result.returncode == 0, result.stdout
    moved = sorted(str(p.relative_to(aside)) for p in aside.rglob("*") if p.is_file())
    assert moved == ["train/a/trunc.JPEG", "train/a/zero.JPEG", "train/b/text.jpeg"]
    assert (messy / "train" / "b" / "cmyk.JPEG").exists()  # warnings stay without --strict
    _, samples = scan_split(messy, "train")
    assert len(samples) == 7
    strict = run("scan_dataset.py", messy, "--strict", "--move-bad", aside)
    assert strict.returncode == 0
    assert not (messy / "val" / "b" / "png.JPEG").exists()
    assert (aside / "val" / "b" / "png.JPEG").exists()
