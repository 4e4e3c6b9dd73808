"""Config errors name the key, and the recipes in configs/ resolve to what they promise."""
import math
from pathlib import Path

import pytest
import torch

from sge import builders, optim
from sge.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
PAPER = ["resnet50", "sge_resnet50", "resnet101", "sge_resnet101"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------- errors

def test_unknown_key_in_file_suggests_nearest(tmp_path):
    cfg = _write(tmp_path / "c.yaml", "train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'.*'train.epochs'"):
        load_config(cfg)


def test_unknown_override_suggests_nearest():
    with pytest.raises(ConfigError, match=r"'optim.lr_'.*did you mean 'optim.lr'"):
        load_config(None, ["optim.lr_=0.2"])


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["train.epochs"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"'data.batch_size' expects int, got str"):
        load_config(None, ["data.batch_size=lots"])
    with pytest.raises(ConfigError, match=r"'train.ema' expects bool"):
        load_config(None, ["train.ema=3"])


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-0.1", "optim.lr"),
    ("amp.dtype=float8", "amp.dtype"),
    ("model.groups=48", "model.groups"),          # does not divide 256
    ("sched.milestones=[60,30]", "sched.milestones"),
    ("data.root=/no/such/folder", "data.root"),
    ("model.name=sge_resnet5", "model.name"),
])
def test_impossible_values_name_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_mixup_needs_an_even_batch():
    with pytest.raises(ConfigError, match=r"'data.batch_size'=7 must be even"):
        load_config(None, ["train.mixup=0.2", "data.batch_size=7"])
    load_config(None, ["train.mixup=0.2", "data.batch_size=8"])


def test_choice_error_suggests_nearest():
    with pytest.raises(ConfigError, match="did you mean 'bfloat16'"):
        load_config(None, ["amp.dtype=bfloat61"])


def test_yaml_syntax_error_gives_line(tmp_path):
    cfg = _write(tmp_path / "bad.yaml", "model:\n  name: sge_resnet50\ntrain: [epochs: 3\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error in .*bad\.yaml line \d+"):
        load_config(cfg)


def test_cpu_only_machine_rejects_gpu_options():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only validation")
    for override in ("dist.backend=nccl", "model.sync_bn=true", "amp.dtype=float16"):
        with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
            load_config(None, [override])


def test_base_inheritance_and_override_order(tmp_path):
    _write(tmp_path / "base.yaml", "train:\n  epochs: 7\n  ema: true\noptim:\n  lr: 0.5\n")
    (tmp_path / "sub").mkdir()
    child = _write(tmp_path / "sub" / "child.yaml",
                   "_base_: ../base.yaml\ntrain:\n  epochs: 9\n")
    cfg = load_config(child, ["optim.lr=0.25"])
    assert cfg.train.epochs == 9          # child beats base
    assert cfg.train.ema is True          # untouched base key survives the deep merge
    assert cfg.optim.lr == 0.25           # the command line beats both
    assert cfg.train.label_smoothing == 0.0  # schema default


# ---------------------------------------------------------------- the paper recipe

def _paper(name, *overrides):
    # data.root must exist; the recipe itself is what is under test.
    return load_config(ROOT / "configs" / "imagenet" / f"{name}.yaml", [f"data.root={ROOT}",
                                                                         *overrides])


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_resolve_to_the_recipe(name):
    cfg = _paper(name)
    assert cfg.model.name == name and cfg.model.num_classes == 1000
    if name.startswith("sge_"):
        assert cfg.model.groups == 64
    assert (cfg.train.epochs, cfg.sched.name, cfg.sched.milestones, cfg.sched.gamma) == \
        (100, "step", [30, 60, 90], 0.1)
    assert cfg.sched.warmup_epochs == 0 and cfg.train.label_smoothing == 0
    assert cfg.train.mixup == 0 and cfg.train.cutmix == 0 and not cfg.train.ema
    assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.wd_norm_bias) == \
        (0.9, 1e-4, True)
    assert cfg.data.min_scale == 0.08 and cfg.data.hflip
    assert (cfg.data.img_size, cfg.data.val_resize, cfg.data.val_img_size) == (224, 256, 224)
    assert cfg.amp.dtype == "none" and cfg.data.batch_size == 32
    # 8 GPUs x 32 and 1 GPU x 256 both get lr 0.1 (global batch 256).
    assert builders.global_batch(cfg, world=8) == 256
    assert optim.scaled_lr(cfg.optim.lr, builders.global_batch(cfg, 8), cfg.optim.ref_batch) \
        == pytest.approx(0.1)
    one_gpu = _paper(name, "data.batch_size=256")
    assert optim.scaled_lr(one_gpu.optim.lr, builders.global_batch(one_gpu, 1),
                           one_gpu.optim.ref_batch) == pytest.approx(0.1)


def test_paper_schedule_and_weight_decay_on_all_parameters():
    cfg = _paper("sge_resnet50")
    model = builders.build_model(cfg)
    opt = builders.build_optimizer(cfg, model, world=8)
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["weight_decay"] == 1e-4 and group["momentum"] == 0.9
    assert len(group["params"]) == len(list(model.parameters()))  # BN, biases, SGE too
    steps = 1_281_167 // 256  # 5004 optimizer steps per epoch on ImageNet at batch 256
    sched = builders.build_schedule(cfg, opt, steps)
    for epoch, lr in ((0, 0.1), (29, 0.1), (30, 0.01), (59, 0.01), (60, 1e-3), (90, 1e-4),
                      (99, 1e-4)):
        assert sched.lr_at(epoch * steps) == pytest.approx(lr), epoch
        assert sched.lr_at(epoch * steps + steps - 1) == pytest.approx(lr), epoch


def test_fast_recipe():
    cfg = load_config(ROOT / "configs" / "imagenet" / "sge_resnet50_fast.yaml",
                      [f"data.root={ROOT}"])
    assert (cfg.sched.name, cfg.amp.dtype, cfg.model.channels_last) == ("cosine", "bfloat16", True)
    assert cfg.train.label_smoothing > 0 and cfg.sched.warmup_epochs > 0
    assert cfg.optim.wd_norm_bias is False


# ---------------------------------------------------------------- optimizer and schedules

def test_no_weight_decay_on_bn_bias_and_sge():
    model = builders.build_model(load_config(None, ["model.name=sge_resnet18",
                                                    "model.channels=[8,16,32,64]",
                                                    "model.groups=4", "model.num_classes=10"]))
    groups = optim.param_groups(model, 1e-4, wd_norm_bias=False)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in groups[0]["params"])
    exempt = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    assert all(n.endswith("conv1.weight") or n.endswith("conv2.weight")
               or n.endswith("downsample.0.weight") or n == "fc.weight" for n in decayed)
    assert "layer1.0.se.weight" in exempt and "layer1.0.se.bias" in exempt  # SGE gamma/beta
    assert "bn1.weight" in exempt and "fc.bias" in exempt
    assert len(decayed) + len(exempt) == len(list(model.parameters()))


def test_cosine_with_warmup_formula():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    sched = optim.LrSchedule(opt, 0.4, steps_per_epoch=10, epochs=10, name="cosine",
                             warmup_epochs=2, min_lr=0.004)
    assert sched.lr_at(0) == pytest.approx(0.4 / 20)
    assert sched.lr_at(19) == pytest.approx(0.4)
    for step in (20, 50, 99):
        t = (step - 20) / 80
        assert sched.lr_at(step) == pytest.approx(0.004 + 0.396 * 0.5 * (1 + math.cos(math.pi * t)))
    assert sched.apply(50) == opt.param_groups[0]["lr"]
