"""The one config schema: every key, its type, default and a one-line comment.

YAML files hold only what they change and may inherit with a top-level ``_base_: <path>``
(relative to the file). Overrides are ``dotted.key=value`` strings parsed as YAML scalars.
Unknown keys, wrong types and impossible values raise ``ConfigError`` naming the key (and
suggesting the nearest valid one) before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

QUICKSTART = "quickstart"  # reserved data.root: the generated quickstart dataset


class ConfigError(ValueError):
    """A bad config key, value or type; the message names the key."""


def _f(default, help: str, choices=None, min=None, max=None):
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelCfg:
    name: str = _f("sge_resnet50", "registry name (models.list_models())")
    groups: int = _f(64, "SGE group count G; must divide every block's output channels", min=1)
    num_classes: int = _f(1000, "classifier outputs", min=1)
    sge_impl: str = _f("fused", "SGE implementation", choices=("reference", "fused"))
    channels: list = _f([], "per-stage base widths for narrow models; [] = (64,128,256,512)")
    channels_last: bool = _f(False, "use the channels_last memory format (shapes stay NCHW)")
    sync_bn: bool = _f(False, "SyncBatchNorm across processes (GPU only)")
    compile: bool = _f(False, "wrap the model in torch.compile")


@dataclass
class DataCfg:
    backend: str = _f("torchvision", "data backend", choices=("dali", "torchvision", "synthetic"))
    root: str = _f(QUICKSTART, "folder with train/ and val/ (ImageFolder), or 'quickstart'")
    batch_size: int = _f(32, "images per process per step", min=1)
    workers: int = _f(4, "loader worker processes (DALI: CPU threads)", min=0)
    img_size: int = _f(224, "train crop size", min=8)
    val_resize: int = _f(256, "val: resize the short side to this", min=8)
    val_img_size: int = _f(224, "val: center crop size", min=8)
    min_scale: float = _f(0.08, "RandomResizedCrop minimum area fraction", min=0.0, max=1.0)
    hflip: bool = _f(True, "random horizontal flip in training")
    dali_device: str = _f("auto", "where DALI decodes", choices=("auto", "gpu", "cpu"))
    on_bad_file: str = _f("error", "unreadable image: stop naming it, or skip it",
                          choices=("error", "skip"))
    synthetic_images: int = _f(1024, "images per epoch of the synthetic backend", min=1)
    quickstart_seed: int = _f(0, "seed of the generated quickstart dataset")


@dataclass
class TrainCfg:
    epochs: int = _f(100, "epochs to train", min=1)
    resume: str = _f("auto", "auto (run dir's last.pt), never, or a checkpoint path")
    nonfinite: str = _f("stop", "on a NaN/inf loss: stop the run, or skip the step",
                        choices=("stop", "skip"))
    accum_steps: int = _f(1, "micro-batches per optimizer step (gradient accumulation)", min=1)
    label_smoothing: float = _f(0.0, "cross-entropy label smoothing", min=0.0, max=1.0)
    mixup: float = _f(0.0, "mixup alpha (0 = off)", min=0.0)
    cutmix: float = _f(0.0, "cutmix alpha (0 = off)", min=0.0)
    ema: bool = _f(False, "keep an EMA of the weights and evaluate it too")
    ema_decay: float = _f(0.9999, "EMA decay per optimizer step", min=0.0, max=1.0)
    val_every: int = _f(1, "validate every N epochs (and always after the last)", min=1)
    ckpt_every_steps: int = _f(0, "also write last.pt every N optimizer steps (0 = epoch end only)",
                               min=0)
    keep_epoch_ckpts: int = _f(0, "keep per-epoch copies, this many most recent (0 = none)", min=0)
    steps_per_epoch: int = _f(0, "cap optimizer steps per epoch (0 = the whole epoch)", min=0)
    log_every: int = _f(20, "log train metrics every N optimizer steps", min=1)
    progress: bool = _f(True, "progress bar with ETA on rank 0")
    threads: int = _f(0, "CPU threads per process for torch ops (0 = torch's default)", min=0)
    keep_freed_memory: bool = _f(True, "CPU runs on glibc: keep freed memory for reuse, not "
                                 "return it to the OS (faster steps, more RSS)")


@dataclass
class OptimCfg:
    lr: float = _f(0.1, "learning rate for the reference batch; scaled by global batch", min=0.0)
    ref_batch: int = _f(256, "reference global batch of optim.lr (linear scaling rule)", min=1)
    momentum: float = _f(0.9, "SGD momentum", min=0.0, max=1.0)
    nesterov: bool = _f(False, "Nesterov momentum")
    weight_decay: float = _f(1e-4, "weight decay", min=0.0)
    wd_norm_bias: bool = _f(True, "decay BN/bias/SGE parameters too (the paper: yes)")


@dataclass
class SchedCfg:
    name: str = _f("step", "lr schedule, stepped per iteration", choices=("step", "cosine"))
    milestones: list = _f([30, 60, 90], "step: epochs at which lr is multiplied by gamma")
    gamma: float = _f(0.1, "step: lr factor at each milestone", min=0.0)
    warmup_epochs: float = _f(0.0, "linear warmup from 0 over this many epochs", min=0.0)
    min_lr: float = _f(0.0, "cosine: final lr (absolute)", min=0.0)


@dataclass
class AmpCfg:
    dtype: str = _f("none", "autocast dtype", choices=("none", "float16", "bfloat16"))


@dataclass
class DistCfg:
    backend: str = _f("auto", "process group backend (auto: nccl on GPU, gloo on CPU)",
                      choices=("auto", "nccl", "gloo"))
    timeout_s: int = _f(120, "collective timeout: a dead peer ends the run after this", min=1)


@dataclass
class OutputCfg:
    dir: str = _f("runs/default", "run directory")
    tensorboard: bool = _f(True, "write TensorBoard logs under <dir>/tb")


@dataclass
class Config:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    sched: SchedCfg = field(default_factory=SchedCfg)
    amp: AmpCfg = field(default_factory=AmpCfg)
    dist: DistCfg = field(default_factory=DistCfg)
    output: OutputCfg = field(default_factory=OutputCfg)
    seed: int = _f(0, "global seed")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading and merging

def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"YAML syntax error in {path}{where}: "
                          f"{getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    merged = _read_yaml((path.parent / base).resolve())
    _deep_update(merged, data)
    return merged


def _deep_update(dst: dict, src: dict) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_update(dst[key], value)
        else:
            dst[key] = value


def _all_keys(cls=Config, prefix="") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, default: Any, meta: dict) -> Any:
    kind = type(default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        # YAML 1.1 reads "5e-5" (no dot) as a string; accept what float() parses.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is list:
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"config key '{key}' expects {kind.__name__}, got "
                          f"{type(value).__name__} {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        near = difflib.get_close_matches(str(value), meta["choices"], n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"config key '{key}' must be one of {list(meta['choices'])}, "
                          f"got {value!r}{hint}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"config key '{key}' must be >= {meta['min']}, got {value!r}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"config key '{key}' must be <= {meta['max']}, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown(prefix + key)
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], data[name], prefix + name + ".")
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            kwargs[name] = _coerce(prefix + name, data[name], default, f.metadata)
    return cls(**kwargs)


def _apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like dotted.key=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    if key not in _all_keys():
        raise _unknown(key)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):  # e.g. the file says `model: 5`
            raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' must be a mapping, "
                              f"got {type(node).__name__} {node!r}")
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None, overrides=()) -> Config:
    """Load ``path`` (or the defaults when None), apply overrides, validate, return Config."""
    data = _read_yaml(Path(path)) if path is not None else {}
    for override in overrides:
        _apply_override(data, override)
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def from_dict(data: dict) -> Config:
    """Rebuild a validated Config from ``Config.to_dict()`` (e.g. stored in a checkpoint)."""
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- cross-key validation

def _stage_out_channels(cfg: Config) -> list[int]:
    base = cfg.model.channels or [64, 128, 256, 512]
    depth = "".join(ch for ch in cfg.model.name.rsplit("resnet", 1)[-1] if ch.isdigit())
    expansion = 4 if depth and int(depth) >= 50 else 1
    return [c * expansion for c in base]


def validate(cfg: Config) -> None:
    """Checks that involve several keys or the machine; raise ConfigError naming the key."""
    import torch  # deferred: config errors should not wait for torch where avoidable

    import models
    if cfg.model.name not in models.list_models():
        near = difflib.get_close_matches(cfg.model.name, models.list_models(), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"config key 'model.name': unknown model {cfg.model.name!r}{hint}")
    if cfg.model.channels and (len(cfg.model.channels) != 4
                               or any(not isinstance(c, int) or c < 1 for c in cfg.model.channels)):
        raise ConfigError(f"config key 'model.channels' must be 4 positive ints, "
                          f"got {cfg.model.channels}")
    if models.is_sge(cfg.model.name):
        for c in _stage_out_channels(cfg):
            if c % cfg.model.groups:
                raise ConfigError(f"config key 'model.groups'={cfg.model.groups} does not "
                                  f"divide the block output channels {c}")
    if any(not isinstance(m, int) or m < 0 for m in cfg.sched.milestones) or \
            cfg.sched.milestones != sorted(cfg.sched.milestones):
        raise ConfigError(f"config key 'sched.milestones' must be increasing non-negative "
                          f"ints, got {cfg.sched.milestones}")
    if (cfg.train.mixup > 0 or cfg.train.cutmix > 0) and cfg.data.batch_size % 2:
        raise ConfigError(f"config key 'data.batch_size'={cfg.data.batch_size} must be even "
                          f"with mixup/cutmix (timm pairs each image with its mirror)")
    if cfg.data.val_img_size > cfg.data.val_resize:
        raise ConfigError(f"config key 'data.val_img_size'={cfg.data.val_img_size} exceeds "
                          f"'data.val_resize'={cfg.data.val_resize}")
    if cfg.data.backend != "synthetic" and cfg.data.root != QUICKSTART:
        root = Path(cfg.data.root).expanduser()
        if not root.is_dir():
            raise ConfigError(f"config key 'data.root': folder not found: {root}")
    gpu = torch.cuda.is_available()
    if cfg.dist.backend == "nccl" and not gpu:
        raise ConfigError("config key 'dist.backend'=nccl needs a CUDA GPU; none is visible "
                          "(use 'auto' or 'gloo')")
    if cfg.model.sync_bn and not gpu:
        raise ConfigError("config key 'model.sync_bn' needs CUDA GPUs; set it to false on CPU")
    if cfg.data.backend == "dali" and cfg.data.dali_device == "gpu" and not gpu:
        raise ConfigError("config key 'data.dali_device'=gpu needs a CUDA GPU; use 'auto' or 'cpu'")
    if cfg.amp.dtype == "float16" and not gpu:
        raise ConfigError("config key 'amp.dtype'=float16 needs a CUDA GPU; "
                          "use bfloat16 on CPU")
    resume = cfg.train.resume
    if resume not in ("auto", "never") and not Path(resume).expanduser().is_file():
        raise ConfigError(f"config key 'train.resume': checkpoint not found: {resume}")
