"""Data layer: folder scanning, sharding, the torchvision and synthetic loaders, quickstart data.

References are independent of the code under test: torchvision's own transforms for the val
pipeline, PIL's own decoding for colour conversions, plain set arithmetic for sharding.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import data
from data import quickstart, sharding
from data.folder import BadImageError, DatasetError, load_rgb, scan_split
from data.presets import IMAGENET_MEAN, IMAGENET_STD, crop_params, sample_rng
from sge.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["ant", "bee", "cat"]


def _jpeg(path: Path, seed: int, size=(40, 30), mode="RGB", fmt="JPEG") -> None:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "CMYK": 4}.get(mode)
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, fmt)


@pytest.fixture
def tree(tmp_path):
    """train: 3 classes x 6 images of mixed sizes; val: 7 images incl. odd colour modes."""
    root = tmp_path / "ds"
    for c, name in enumerate(CLASSES):
        for i in range(6):
            _jpeg(root / "train" / name / f"img{i}.JPEG", 10 * c + i, size=(36 + 3 * i, 30 + 2 * c))
    _jpeg(root / "val" / "ant" / "a0.JPEG", 100)
    _jpeg(root / "val" / "ant" / "a1_gray.JPEG", 101, mode="L")
    _jpeg(root / "val" / "bee" / "b0.jpg", 102, size=(30, 44))
    _jpeg(root / "val" / "bee" / "b1_cmyk.JPEG", 103, mode="CMYK")
    _jpeg(root / "val" / "cat" / "c0_png.JPEG", 104, fmt="PNG")
    _jpeg(root / "val" / "cat" / "c1.png", 105, fmt="PNG")
    _jpeg(root / "val" / "cat" / "c2.jpeg", 106)
    (root / "val" / "cat" / "notes.txt").write_text("not an image, ignored by extension")
    return root


def _cfg(root, *overrides):
    return load_config(None, [f"data.root={root}", "data.backend=torchvision", "data.workers=0",
                              "data.batch_size=4", "data.img_size=16", "data.val_resize=20",
                              "data.val_img_size=16", "model.num_classes=3", *overrides])


def _epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


# ---------------------------------------------------------------- folder scanning

def test_scan_split_sorted_with_train_labels(tree):
    classes, samples = scan_split(tree, "val")
    assert classes == CLASSES
    names = [Path(p).name for p, _ in samples]
    assert names == ["a0.JPEG", "a1_gray.JPEG", "b0.jpg", "b1_cmyk.JPEG", "c0_png.JPEG",
                     "c1.png", "c2.jpeg"]
    assert [CLASSES[y] for _, y in samples] == [Path(p).parent.name for p, _ in samples]
    # A val set holding only some classes keeps the train indices (no label shift).
    for name in ("ant", "bee"):
        for f in (tree / "val" / name).iterdir():
            f.unlink()
        (tree / "val" / name).rmdir()
    assert {y for _, y in scan_split(tree, "val")[1]} == {2}


def test_scan_split_errors_name_the_problem(tree, tmp_path):
    with pytest.raises(DatasetError, match="data root not found: .*nowhere"):
        scan_split(tmp_path / "nowhere", "train")
    (tree / "val" / "dog").mkdir()
    _jpeg(tree / "val" / "dog" / "d.JPEG", 1)
    with pytest.raises(DatasetError, match="not in .*train: dog"):
        scan_split(tree, "val")
    (tree / "train" / "emu").mkdir()
    with pytest.raises(DatasetError, match="empty class folder .*emu"):
        scan_split(tree, "train")
    os.rename(tree / "val", tree / "validation")
    with pytest.raises(DatasetError, match="missing 'val' folder"):
        scan_split(tree, "val")


def test_decoding_converts_every_mode_to_rgb(tree):
    for name, mode in [("ant/a1_gray.JPEG", "L"), ("bee/b1_cmyk.JPEG", "CMYK"),
                       ("cat/c0_png.JPEG", "RGB")]:
        path = tree / "val" / name
        with Image.open(path) as raw:
            assert raw.mode == mode
            expected = np.asarray(raw.convert("RGB"))
        img = load_rgb(str(path))
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), expected)
    with Image.open(tree / "val" / "cat" / "c0_png.JPEG") as raw:
        assert raw.format == "PNG"


# ---------------------------------------------------------------- sharding

@pytest.mark.parametrize("world", [1, 2, 3])
def test_train_sharding(world):
    n, b = 103, 4
    shards = [sharding.train_indices(n, 7, 3, r, world, b) for r in range(world)]
    per_rank = (n // (world * b)) * b
    assert all(len(s) == per_rank for s in shards)
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == len(flat) and set(flat) <= set(range(n))
    assert shards == [sharding.train_indices(n, 7, 3, r, world, b) for r in range(world)]
    assert shards[0] != sharding.train_indices(n, 7, 4, 0, world, b)   # reshuffled per epoch
    assert shards[0] != sharding.train_indices(n, 8, 3, 0, world, b)   # and per seed
    # Global step i reads the same images whatever the world size (W x B = const).
    single = sharding.train_indices(n, 7, 3, 0, 1, world * b)
    for step in range(per_rank // b):
        together = {i for s in shards for i in s[step * b:(step + 1) * b]}
        assert together == set(single[step * world * b:(step + 1) * world * b])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_val_sharding_every_index_once(world):
    n = 101
    shards = [sharding.val_indices(n, r, world) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="rank"):
        sharding.val_indices(n, world, world)


def test_crop_params_within_bounds():
    for index in range(300):
        rng = sample_rng(0, 0, index)
        h_img, w_img = (40, 300) if index % 10 == 0 else (60, 80)  # extreme ratio: fallback
        top, left, h, w = crop_params(h_img, w_img, (0.25, 1.0), rng)
        assert 0 <= top <= h_img - h and 0 <= left <= w_img - w and h > 0 and w > 0
        if index % 10:
            assert 0.25 * 0.9 <= h * w / (h_img * w_img) <= 1.0
            assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


# ---------------------------------------------------------------- torchvision loader

def test_val_loader_matches_torchvision_reference(tree):
    loader = data.build_loader(_cfg(tree), "val")
    assert (len(loader), loader.num_samples, loader.total_samples) == (2, 7, 7)
    assert loader.classes == CLASSES and loader.batch_size == 4
    images, labels = map(torch.cat, zip(*_epoch(loader)))
    assert images.shape == (7, 3, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    ref = T.Compose([T.Resize(20, T.InterpolationMode.BILINEAR, antialias=True), T.CenterCrop(16),
                     T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    _, samples = scan_split(tree, "val")
    for k, (path, label) in enumerate(samples):
        with Image.open(path) as img:
            expected = ref(img.convert("RGB"))
        torch.testing.assert_close(images[k], expected, atol=1e-5, rtol=0)
        assert labels[k] == label == CLASSES.index(Path(path).parent.name)


def test_val_loader_shards_cover_the_set(tree, monkeypatch):
    from sge import distributed
    expected = sorted(y for _, y in scan_split(tree, "val")[1])
    for world in (2, 3):
        got = []
        for rank in range(world):
            monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
            monkeypatch.setattr(distributed, "world_size", lambda w=world: w)
            loader = data.build_loader(_cfg(tree), "val")
            assert loader.total_samples == 7
            shard = [y for _, ys in _epoch(loader) for y in ys.tolist()]
            assert len(shard) == loader.num_samples
            got += shard
        assert sorted(got) == expected


def test_train_loader_contract_and_exact_resume(tree, monkeypatch):
    loader = data.build_loader(_cfg(tree, "seed=5"), "train")
    assert (len(loader), loader.num_samples, loader.total_samples) == (4, 16, 16)
    loader.set_epoch(1)
    full = _epoch(loader)
    assert len(full) == 4
    lo = (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD)
    hi = (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD)
    for x, y in full:
        assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert lo <= x.min() and x.max() <= hi and set(y.tolist()) <= {0, 1, 2}
    loader.set_epoch(2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(full, _epoch(loader)))
    # Each sample's crop RNG is keyed by (seed, epoch, its index), whatever the batch order.
    import data.torchvision_backend as tvb
    keys = []
    monkeypatch.setattr(tvb, "sample_rng", lambda *key: keys.append(key) or sample_rng(*key))
    loader.set_epoch(2)
    _epoch(loader)
    assert sorted(keys) == sorted((5, 2, i) for i in sharding.train_indices(18, 5, 2, 0, 1, 4))
    monkeypatch.undo()
    # Resume at batch 2: the same batches bitwise, and the skipped ones are never decoded.
    decoded = []
    monkeypatch.setattr(tvb, "load_rgb", lambda p: decoded.append(p) or load_rgb(p))
    loader.set_epoch(1, start_batch=2)
    resumed = _epoch(loader)
    assert len(decoded) == 8 and len(resumed) == 2
    for (a, la), (b, lb) in zip(full[2:], resumed):
        assert torch.equal(a, b) and torch.equal(la, lb)
    # Worker processes draw the same crops (per-sample RNG, not worker RNG).
    with_workers = data.build_loader(_cfg(tree, "seed=5", "data.workers=2"), "train")
    with_workers.set_epoch(1)
    for (a, la), (b, lb) in zip(full, _epoch(with_workers)):
        assert torch.equal(a, b) and torch.equal(la, lb)


def _break_files(root: Path) -> dict:
    good = root / "train" / "ant" / "img0.JPEG"
    broken = {"truncated": root / "train" / "bee" / "img0.JPEG",
              "zero": root / "train" / "cat" / "img1.JPEG",
              "text": root / "train" / "cat" / "img2.JPEG"}
    broken["truncated"].write_bytes(good.read_bytes()[:300])
    broken["zero"].write_bytes(b"")
    broken["text"].write_text("this is not an image\n")
    return broken


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_files_error_names_the_path(tree, workers):
    broken = _break_files(tree)
    for name, path in broken.items():
        with pytest.raises(BadImageError, match=f"cannot decode image {path}"):
            load_rgb(str(path))
    loader = data.build_loader(_cfg(tree, f"data.workers={workers}", "data.batch_size=18"), "train")
    with pytest.raises(BadImageError) as info:
        _epoch(loader)
    assert any(str(p) in str(info.value) for p in broken.values())
    assert "data.on_bad_file=skip" in str(info.value)


def test_bad_files_skipped_with_one_warning_each(tree, caplog):
    broken = _break_files(tree)
    loader = data.build_loader(_cfg(tree, "data.on_bad_file=skip", "data.batch_size=6"), "train")
    with caplog.at_level(logging.WARNING):
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            assert sum(len(y) for _, y in loader) == 18 - 3
    warnings = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warnings) == 3 and all(any(str(p) in w for w in warnings) for p in broken.values())


def test_build_loader_rejects_too_few_classes(tree):
    with pytest.raises(ConfigError, match="model.num_classes"):
        data.build_loader(_cfg(tree, "model.num_classes=2"), "val")


# ---------------------------------------------------------------- synthetic backend

def test_synthetic_loader():
    cfg = load_config(None, ["data.backend=synthetic", "data.synthetic_images=20",
                             "data.batch_size=6", "data.img_size=8", "data.val_img_size=12",
                             "model.num_classes=5"])
    train, val = data.build_loader(cfg, "train"), data.build_loader(cfg, "val")
    assert (len(train), train.num_samples, len(val), val.num_samples) == (3, 18, 4, 20)
    train.set_epoch(3)
    full = _epoch(train)
    assert full[0][0].shape == (6, 3, 8, 8) and full[0][1].dtype == torch.int64
    assert abs(float(torch.cat([x for x, _ in full]).std()) - 1) < 0.1
    assert all(0 <= y.min() and y.max() < 5 for _, y in full)
    train.set_epoch(3, start_batch=1)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(full[1:], _epoch(train)))
    train.set_epoch(4)
    assert not torch.equal(full[0][0], next(iter(train))[0])
    assert [x.shape[0] for x, _ in val] == [6, 6, 6, 2]


# ---------------------------------------------------------------- quickstart data

def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_quickstart_deterministic_and_well_formed(tmp_path):
    a = quickstart.ensure_dataset(tmp_path / "a", 3, train_per_class=2, val_images=11,
                                  size=32, progress=False)
    b = quickstart.ensure_dataset(tmp_path / "b", 3, train_per_class=2, val_images=11,
                                  size=32, progress=False)
    c = quickstart.ensure_dataset(tmp_path / "c", 4, train_per_class=2, val_images=11,
                                  size=32, progress=False)
    assert _files(a) == _files(b) and _files(a) != _files(c)
    classes, train = scan_split(a, "train")
    assert classes == sorted(quickstart.CLASSES) and len(train) == 20
    assert len(scan_split(a, "val")[1]) == 11
    with Image.open(train[0][0]) as img:
        assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"
    with pytest.raises(FileExistsError, match="made with"):
        quickstart.ensure_dataset(a, 3, train_per_class=5, val_images=11, size=32)


def test_quickstart_concurrent_generation(tmp_path):
    """Two processes start while the lock is held: both wait, one generates, one reuses."""
    root = tmp_path / "cache" / "qs"
    root.parent.mkdir()
    code = ("import sys; from pathlib import Path; from data import quickstart; "
            "print(quickstart.ensure_dataset(Path(sys.argv[1]), 1, train_per_class=3, "
            "val_images=7, size=32, progress=False))")
    with quickstart._file_lock(root.parent / "qs.lock"):
        procs = [subprocess.Popen([sys.executable, "-c", code, str(root)], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
        assert all("waiting for another process" in p.stdout.readline() for p in procs)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all(o.strip() == str(root) for o in outs)
    serial = quickstart.ensure_dataset(tmp_path / "serial", 1, train_per_class=3, val_images=7,
                                       size=32, progress=False)
    assert _files(root) == _files(serial)
    assert sorted(p.name for p in root.parent.iterdir()) == ["qs", "qs.lock"]  # no temp left
