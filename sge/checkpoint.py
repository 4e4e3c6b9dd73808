"""Every checkpoint read and write of the project.

Reads always use ``torch.load(weights_only=True)``: a checkpoint is data and can never run
code. Writes are atomic (temp file in the same folder + fsync + rename), by rank 0 only
(the caller decides the rank). Accepted for model weights:

- this project's checkpoints: a dict with ``model`` (a state dict without prefixes);
- released PytorchInsight ``*.pth.tar``: a dict with ``state_dict`` whose keys carry the
  DataParallel ``module.`` prefix and name SGE's gamma/beta ``...sge.weight``/``...sge.bias``;
- plain state dicts (torchvision / timm ResNet weights), also ``torch.compile``'s
  ``_orig_mod.`` prefix;
- ``.safetensors`` files.
"""
from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit; the message names the file."""


# ---------------------------------------------------------------- raw reading/writing

def read_checkpoint(path: str | os.PathLike, map_location="cpu"):
    """Read a checkpoint file as plain data; any failure is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device=str(map_location))
        except Exception as exc:  # safetensors raises several types for a bad header
            raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: "
                                  f"{exc}") from None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        text = str(exc)
        code = re.search(r"GLOBAL ([\w.]+)", text)  # weights_only met a class or function
        if code:
            reason = (f"refused: it holds a pickled {code.group(1)}, which could run code when "
                      f"loaded (only tensors and plain data are accepted)")
        elif isinstance(exc, (EOFError, RuntimeError)) and ("zip" in text or "EOF" in text
                                                            or "central directory" in text):
            reason = "is truncated or corrupt"
        elif "Weights only load failed" in text:  # opcodes it does not run: garbage or objects
            reason = ("refused: its pickle data is not just tensors and plain data (a corrupt "
                      "file, or objects that could run code when loaded)")
        else:
            reason = (f"is corrupt or not a PyTorch checkpoint ({type(exc).__name__}: "
                      f"{(text.splitlines() or [''])[0][:200]})")
        raise CheckpointError(f"checkpoint {path} {reason}") from None


def write_atomic(obj, path: str | os.PathLike) -> None:
    """Save ``obj`` with torch.save to ``path`` atomically: a torn write leaves the old file.

    Raises CheckpointError naming the path when the write fails (disk full, no permission);
    the previous file at ``path`` is then untouched.
    """
    path = Path(path)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Writes are synchronous and by one process: an existing temp file of this target is
        # what a process killed mid-write left behind (possibly as large as a checkpoint).
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            _test_fault_pause()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError) as exc:
        # When a write fails inside torch.save's zip writer, the writer's clean-up can raise
        # a RuntimeError ("unexpected pos") over it: the OSError is then that one's context.
        cause = exc if isinstance(exc, OSError) else exc.__context__
        if not isinstance(cause, OSError):
            raise
        raise CheckpointError(f"could not write checkpoint {path}: {cause.strerror or cause}; "
                              f"the previous checkpoint there is left intact") from None
    finally:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _test_fault_pause() -> None:
    """Test hook (tests/faults/conftest.py lists every hook): ``SGE_TEST_FAULT=slow_write:S``
    sleeps S seconds with the temp file written but not renamed, so a test can SIGKILL the
    process mid-write. Without the variable (production) it does nothing."""
    fault = os.environ.get("SGE_TEST_FAULT", "")
    if fault.startswith("slow_write:"):
        import time
        time.sleep(float(fault.split(":", 1)[1]))


# ---------------------------------------------------------------- model weights

_PREFIXES = ("module.", "_orig_mod.")


def extract_state_dict(obj, path) -> dict:
    """Find the model state dict inside any supported checkpoint layout."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or \
            not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise CheckpointError(f"checkpoint {path} holds no model state dict "
                              f"(expected tensors by name, or a dict with 'model'/'state_dict')")
    return obj


def normalize_keys(state: dict) -> dict:
    """Strip DataParallel/compile prefixes; map PytorchInsight's ``.sge.`` to our ``.se.`` slot."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
            key = key.replace("._orig_mod.", ".")
        key = re.sub(r"^(layer\d+\.\d+)\.sge\.", r"\1.se.", key)
        out[key] = value
    return out


def describe_state(state: dict) -> str:
    """Guess which model a (normalized) state dict belongs to, in words."""
    blocks = Counter()
    for key in state:
        m = re.match(r"layer(\d)\.(\d+)\.", key)
        if m:
            blocks[int(m.group(1))] = max(blocks[int(m.group(1))], int(m.group(2)) + 1)
    layers = tuple(blocks[i] for i in range(1, 5))
    bottleneck = any(".conv3." in k for k in state)
    depth = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
             ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}.get((layers, bottleneck))
    arch = f"resnet{depth}" if depth else f"a ResNet with blocks {layers}"
    sge = state.get("layer1.0.se.weight")
    if sge is not None and sge.dim() == 4:
        arch = f"sge_{arch} (groups={sge.shape[1]})" if depth else f"SGE {arch} (groups={sge.shape[1]})"
    elif any(".se.fc1." in k for k in state):
        arch = f"se_{arch}" if depth else f"SE {arch}"
    fc = state.get("fc.weight")
    if fc is not None:
        arch += f", {fc.shape[0]} classes"
    return arch


def check_finite(state: dict, path) -> None:
    """NaN/inf weights are an error naming the file (they would only train or predict NaN)."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
           and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"checkpoint {path} has non-finite (NaN/inf) values in "
                              f"{len(bad)} tensors, first {bad[0]}")


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike) -> dict:
    """Load any supported checkpoint into ``model`` strictly; return the raw checkpoint.

    A mismatch (another model, group count or class count; missing or unexpected keys) is
    a CheckpointError that says what the file looks like and lists the first differences.
    """
    raw = read_checkpoint(path)
    state = normalize_keys(extract_state_dict(raw, path))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        lines = [f"checkpoint {path} does not fit the model: the file looks like "
                 f"{describe_state(state)}, the model is {describe_state(own)}"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", shapes)):
            if items:
                more = f" ... (+{len(items) - 5} more)" if len(items) > 5 else ""
                lines.append(f"  {title} ({len(items)}): {', '.join(items[:5])}{more}")
        raise CheckpointError("\n".join(lines))
    check_finite(state, path)
    model.load_state_dict(state, strict=True)
    return raw if isinstance(raw, dict) else {}


# ---------------------------------------------------------------- full training state

# Config keys that change the model's weights; resuming with another value is an error.
# (sge_impl, channels_last, sync_bn and compile change how the same weights are computed.)
MODEL_KEYS = ("name", "groups", "num_classes", "channels")


def rng_state() -> dict:
    """Python, numpy, torch and CUDA generator states as plain data (weights_only-safe)."""
    import random

    import numpy as np
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(*, model, optimizer, schedule, scaler, ema, epoch: int, step_in_epoch: int,
                   global_step: int, config: dict, best: dict, counters: dict,
                   steps_per_epoch: int | None = None, metrics_rows: int | None = None) -> dict:
    """Everything needed to continue exactly. ``epoch`` is the 0-based epoch in progress and
    ``step_in_epoch`` the optimizer steps of it already done (an epoch whose training is done
    but whose validation is pending has ``step_in_epoch`` = its number of steps).
    ``metrics_rows``: rows in the run's metrics.jsonl when saved (a resume drops later ones)."""
    return {
        "steps_per_epoch": steps_per_epoch,
        "format": "sge-imagenet-train/1",
        "model": normalize_keys(model.state_dict()),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": normalize_keys(ema.module.state_dict()) if ema is not None else None,
        "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
        "rng": rng_state(),
        "config": config,
        "best": dict(best),
        "counters": dict(counters),
        "metrics_rows": metrics_rows,
    }


def check_same_model(path, saved_config: dict, config: dict) -> None:
    """Resuming with a config that changes the model is an error naming the keys."""
    old, new = saved_config.get("model", {}), config["model"]
    diff = [f"model.{k}: checkpoint {old.get(k)!r} vs config {new[k]!r}"
            for k in MODEL_KEYS if old.get(k) != new[k]]
    if diff:
        raise CheckpointError(f"cannot resume from {path}: the config changes the model "
                              f"({'; '.join(diff)}); use another output.dir or "
                              f"train.resume=never")


_TRAINING_KEYS = ("model", "optimizer", "schedule", "scaler", "ema", "epoch", "step_in_epoch",
                  "global_step", "rng", "config", "best", "counters")


def check_same_epoch_length(path, saved: int | None, steps_per_epoch: int | None) -> None:
    """An epoch of another length would resume mid-epoch at a meaningless position (the
    schedule, the sample order and ``step_in_epoch`` all count steps of the old length)."""
    if saved is not None and steps_per_epoch is not None and saved != steps_per_epoch:
        raise CheckpointError(
            f"cannot resume from {path}: it was written with {saved} optimizer steps per epoch, "
            f"this config gives {steps_per_epoch} (data.batch_size, the number of processes, "
            f"train.accum_steps or train.steps_per_epoch changed); resume with the original "
            f"values, or use another output.dir or train.resume=never")


def load_training_state(path, *, model, optimizer, schedule, scaler, ema, config: dict,
                        steps_per_epoch: int | None = None) -> dict:
    """Restore every training object from ``path``; return epoch/step/best/counters.

    RNG states are returned (under ``"rng"``), not applied: the caller applies them once the
    epoch's data iterator exists, since creating a DataLoader iterator draws from the torch RNG.
    """
    state = read_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != "sge-imagenet-train/1":
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint of this project "
                              f"(to start from its weights, evaluate it or train with "
                              f"train.resume=never)")
    missing = [k for k in _TRAINING_KEYS if k not in state]
    if missing or not isinstance(state["model"], dict) or not isinstance(state["config"], dict):
        what = ", ".join(missing) or "model/config"
        raise CheckpointError(f"checkpoint {path} is an incomplete or damaged training "
                              f"checkpoint (missing or malformed: {what})")
    check_same_model(path, state["config"], config)
    check_same_epoch_length(path, state.get("steps_per_epoch"), steps_per_epoch)
    check_finite(state["model"], path)
    try:
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state["ema"] is not None:
            ema.module.load_state_dict(state["ema"], strict=True)
        elif ema is not None:  # EMA switched on mid-run: start it from the current weights
            ema.module.load_state_dict(state["model"], strict=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this run: "
                              f"{str(exc).splitlines()[0][:300]}") from None
    return {**{k: state[k] for k in ("epoch", "step_in_epoch", "global_step", "best",
                                     "counters", "rng")},
            "metrics_rows": state.get("metrics_rows")}  # None in checkpoints before it


def save_last(state: dict, ckpt_dir, keep_epoch_copies: int = 0, epoch_end: bool = False) -> Path:
    """Write ``last.pt`` (and at an epoch end, with retention, ``epoch_NNNN.pt``)."""
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / "last.pt"
    write_atomic(state, last)
    if epoch_end and keep_epoch_copies > 0:
        write_atomic(state, ckpt_dir / f"epoch_{state['epoch']:04d}.pt")
        copies = sorted(ckpt_dir.glob("epoch_[0-9][0-9][0-9][0-9].pt"))
        for old in copies[:-keep_epoch_copies]:
            old.unlink()
    return last


def save_best(weights: dict, ckpt_dir, *, which: str, top1: float, epoch: int,
              global_step: int, config: dict) -> Path:
    """Write ``best.pt`` (the best weights, raw or EMA, and which) and ``best.safetensors``."""
    from safetensors.torch import save_file
    ckpt_dir = Path(ckpt_dir)
    weights = {k: v.detach().cpu().contiguous() for k, v in normalize_keys(weights).items()}
    best = ckpt_dir / "best.pt"
    write_atomic({"format": "sge-imagenet-best/1", "model": weights, "weights": which,
                  "top1": top1, "epoch": epoch, "global_step": global_step, "config": config},
                 best)
    tmp = ckpt_dir / ".best.safetensors.tmp"
    try:
        save_file(weights, str(tmp), metadata={"weights": which, "top1": f"{top1:.3f}",
                                               "epoch": str(epoch)})
        os.replace(tmp, ckpt_dir / "best.safetensors")
    except OSError as exc:
        tmp.unlink(missing_ok=True)  # the previous best.safetensors stays as it was
        raise CheckpointError(f"could not write {ckpt_dir / 'best.safetensors'}: "
                              f"{exc.strerror or exc}") from None
    return best
