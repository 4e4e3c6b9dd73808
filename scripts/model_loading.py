"""What the user-facing tools share: a model, its input preprocessing and its class names
rebuilt from any checkpoint the project accepts.

The architecture comes, in this order, from ``--config`` (a YAML recipe or a run's
``config.yaml``), from the resolved config stored inside our checkpoints, or from
``--model`` plus what the state dict itself says (group count, class count, stage widths,
stem width), so narrow models and released PytorchInsight files load without a config.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the tools run as `python scripts/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import models  # noqa: E402
from data.folder import DatasetError, load_rgb, scan_classes  # noqa: E402
from data.presets import IMAGENET_MEAN, IMAGENET_STD, ValPreset, normalize  # noqa: E402,F401
from sge.checkpoint import (CheckpointError, extract_state_dict, load_model_weights,  # noqa: E402
                            normalize_keys, read_checkpoint)
from sge.builders import build_model  # noqa: E402
from sge.config import ConfigError, from_dict, load_config  # noqa: E402


class ToolError(RuntimeError):
    """A bad argument or input of a tool; the message names it."""


def _infer_kwargs(name: str, state: dict) -> dict:
    """Model arguments that the state dict pins: groups, classes and stage widths."""
    kwargs = {}
    if "fc.weight" in state:
        kwargs["num_classes"] = int(state["fc.weight"].shape[0])
    if models.is_sge(name) and "layer1.0.se.weight" in state:
        kwargs["groups"] = int(state["layer1.0.se.weight"].shape[1])
    widths = [state.get(f"layer{i}.0.conv1.weight") for i in range(1, 5)]
    if all(w is not None for w in widths):
        kwargs["channels"] = tuple(int(w.shape[0]) for w in widths)
    return kwargs


def config_from_checkpoint(raw) -> dict | None:
    """The resolved config dict our checkpoints store, or None (released/plain files)."""
    cfg = raw.get("config") if isinstance(raw, dict) else None
    return cfg if isinstance(cfg, dict) else None


def model_only_config(cfg_dict: dict):
    """A Config with just the run's model section: the data root, GPUs or AMP of the
    machine that trained need not exist here to rebuild its model.

    SGE is always the reference implementation here: the tools run a few images on a CPU,
    the weights are the same for both, and the fused one applies the block's last BN
    inside itself, so a hook on it would see the conv output instead of SGE's real input.
    """
    model = dict(cfg_dict.get("model", {}), sync_bn=False, compile=False, sge_impl="reference")
    return from_dict({"model": model})


def load_model(checkpoint: str, model_name: str | None = None, config: str | None = None,
               overrides=()):
    """Return ``(model in eval mode, config dict or None)`` for ``checkpoint``.

    Raises ToolError naming the problem (missing file, no architecture, mismatching weights).
    """
    path = Path(checkpoint)
    try:
        raw = read_checkpoint(path)
        cfg_dict = None
        if config is not None:
            cfg_dict = load_config(config, overrides).to_dict()
        elif config_from_checkpoint(raw) is not None:
            cfg_dict = config_from_checkpoint(raw)
        if cfg_dict is not None:
            cfg = model_only_config(cfg_dict)
            if model_name and model_name != cfg.model.name:
                raise ToolError(f"--model {model_name} contradicts the config's model.name "
                                f"{cfg.model.name} (drop --model, or pass another --config)")
            model = build_model(cfg)
        elif model_name:
            kwargs = _infer_kwargs(model_name, normalize_keys(extract_state_dict(raw, path)))
            model = models.create_model(model_name, **kwargs)
        else:
            raise ToolError(f"checkpoint {path} stores no config: pass --model NAME "
                            f"(one of {', '.join(models.list_models())}) or --config FILE")
        load_model_weights(model, path)
    except (CheckpointError, ConfigError, ValueError) as exc:
        raise ToolError(str(exc)) from None
    return model.eval(), cfg_dict


def class_names(num_classes: int, cfg_dict: dict | None, classes_file: str | None = None):
    """Names for the model's outputs: a file, the training folders, or ImageNet's.

    A 1000-class model without a known class folder gets ImageNet-1k's names in synset
    order (torchvision's metadata, no download); otherwise ``class <i>``.
    """
    if classes_file:
        names = [ln.strip() for ln in Path(classes_file).read_text().splitlines() if ln.strip()]
        if len(names) != num_classes:
            raise ToolError(f"--classes {classes_file} lists {len(names)} names, the model "
                            f"has {num_classes} outputs")
        return names
    root = (cfg_dict or {}).get("data", {}).get("root")
    if root:
        try:
            names = scan_classes(root)  # label order = sorted train folders, as in training
        except DatasetError:
            names = []  # e.g. the run's data lives on another machine
        if len(names) == num_classes:
            return names
    if num_classes == 1000:
        from torchvision.models import ResNet50_Weights
        return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    return [f"class {i}" for i in range(num_classes)]


def preprocess(images, cfg_dict: dict | None):
    """PIL images -> the normalized batch the run's validation saw (short side, center crop)."""
    import torch
    data = (cfg_dict or {}).get("data", {})
    preset = ValPreset(int(data.get("val_resize", 256)), int(data.get("val_img_size", 224)))
    return normalize(torch.stack([preset(img) for img in images]), torch.device("cpu"))


def open_image(path: str):
    if not Path(path).is_file():
        raise ToolError(f"image not found: {path}")
    try:
        return load_rgb(path)
    except DatasetError as exc:
        raise ToolError(str(exc)) from None


def set_threads() -> None:
    # Interactive tools on shared machines: a couple of threads is plenty for one image.
    torch.set_num_threads(min(4, torch.get_num_threads()))
