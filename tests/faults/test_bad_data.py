"""Case 6 of issue 7: broken data through ``train.py`` in every backend (torchvision with a
worker process; DALI on CPU when it loads). Odd-but-valid files (CMYK, grayscale, PNG named
.JPEG) train as RGB; broken ones (truncated, zero bytes, not an image) stop the run with one
line naming the file, or are skipped with ``data.on_bad_file=skip``; a malformed folder
(empty class, val class not in train, missing root) is one line naming the folder.
"""
import json
import logging
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import train
from data import dali as dali_backend
from tests.engine_utils import tiny_overrides
from tests.faults.tools import one_line_error, run_main

try:
    dali_backend._import_dali()
    BACKENDS = ["torchvision", "dali"]
except dali_backend.DaliUnavailableError:
    BACKENDS = ["torchvision", pytest.param("dali", marks=pytest.mark.skip("DALI unavailable"))]

BROKEN = {"truncated": lambda good: good[: len(good) // 2],
          "zero_bytes": lambda good: b"",
          "not_an_image": lambda good: b"<html>a saved error page, not a JPEG</html>\n" * 8}


@pytest.fixture
def tree(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "ds")


def _replace(tree, split, name, content=None, image=None, fmt="JPEG"):
    """Swap ``split/square/name.jpg`` for ``name.JPEG`` holding ``content`` or ``image``."""
    old = tree / split / "square" / f"{name}.jpg"
    new = old.with_suffix(".JPEG")
    if image is not None:
        image(Image.open(old).convert("RGB")).save(new, fmt)
    else:
        new.write_bytes(content(old.read_bytes()))
    old.unlink()
    return new


def _train(tree, run_dir, backend, capsys, *extra):
    """train.py's main, in this process, for one epoch on ``tree``; (code, stdout, stderr)."""
    config = run_dir.parent / "empty.yaml"
    config.write_text("{}\n")
    argv = ["--config", config, *tiny_overrides(tree, run_dir, "train.epochs=1", "data.workers=1",
                                                f"data.backend={backend}", *extra)]
    return run_main(train.main, argv, capsys)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_file_stops_the_run_naming_it(tree, tmp_path, backend, kind, capsys):
    bad = _replace(tree, "train", "003", content=BROKEN[kind])
    with pytest.raises(Exception):  # the fault is real: PIL cannot decode it either
        Image.open(bad).convert("RGB")
    code, _, err = _train(tree, tmp_path / "run", backend, capsys)
    assert code == 1
    line = one_line_error(err)
    assert str(bad) in line and "data.on_bad_file=skip" in line, line


@pytest.mark.parametrize("backend", BACKENDS)
def test_broken_files_skipped_on_request(tree, tmp_path, backend, capsys, caplog):
    bad = [_replace(tree, "train", f"00{i}", content=damage)
           for i, damage in enumerate(BROKEN.values())]
    with caplog.at_level(logging.WARNING):
        code, _, err = _train(tree, tmp_path / "run", backend, capsys, "data.on_bad_file=skip")
    assert code == 0, err
    for path in bad:
        assert sum(str(path) in r.getMessage() for r in caplog.records) == 1  # warned once
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["split"] == "train" and row["images"] == 24 - len(bad)


ODD = {"cmyk": (lambda img: img.convert("CMYK"), "JPEG", "CMYK"),
       "grayscale": (lambda img: img.convert("L"), "JPEG", "L"),
       "png_named_jpeg": (lambda img: img, "PNG", "RGB")}


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_but_valid_images_train_as_rgb(tree, tmp_path, backend, capsys):
    made = []
    for i, (name, (convert, fmt, mode)) in enumerate(ODD.items()):
        for split in ("train", "val"):
            path = _replace(tree, split, f"00{i}", image=convert, fmt=fmt)
            with Image.open(path) as img:  # really that kind of file
                assert (img.format, img.mode) == (fmt, mode)
                made.append(np.asarray(img.convert("RGB")).shape)
    assert all(shape[2] == 3 for shape in made)
    code, _, err = _train(tree, tmp_path / "run", backend, capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [(r["split"], r["images"]) for r in rows] == [("train", 24), ("val", 13)]


def _empty_class(tree):
    (tree / "train" / "zebra").mkdir()
    return tree / "train" / "zebra", "empty class folder"


def _unknown_val_class(tree):
    shutil.copytree(tree / "val" / "square", tree / "val" / "yak")
    return tree / "val", r"class folder\(s\) not in .*: yak"


def _missing_root(tree):
    shutil.rmtree(tree)
    return tree, "data.root"


def _missing_val(tree):
    shutil.rmtree(tree / "val")
    return tree, "missing 'val' folder"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("damage", [_empty_class, _unknown_val_class, _missing_root,
                                    _missing_val], ids=lambda f: f.__name__.strip("_"))
def test_malformed_folder_is_one_line_naming_it(tree, tmp_path, backend, damage, capsys):
    where, problem = damage(tree)
    code, _, err = _train(tree, tmp_path / "run", backend, capsys)
    assert code == 1
    line = one_line_error(err)
    assert str(where) in line and re.search(problem, line), line
    assert not (tmp_path / "run" / "checkpoints").exists()
