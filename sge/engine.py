"""Training and evaluation: plain functions, read top to bottom.

``fit(cfg)`` sets up (builders), resumes (checkpoint), then loops epochs: ``train_epoch``
runs optimizer steps, ``evaluate`` measures top-1/top-5 exactly, checkpoints are written by
rank 0. ``evaluate`` is also what ``eval.py`` calls.

Exact resume rests on three things: checkpoints at optimizer-step granularity
(``step_in_epoch``), a data order that is a function of (seed, epoch) with ``start_batch``
skipping the batches already trained on, and random numbers drawn inside a step coming from
generators re-seeded from (seed, rank, global step) at the start of every step (fairseq's
approach: every rank resumes exactly without gathering RNG states from the other ranks).
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import data
from sge import builders, checkpoint, distributed, runlog
from sge.config import Config, ConfigError
from sge.metrics import EvalCounts, topk_correct
from sge.preemption import StopFlag


class NonFiniteLossError(RuntimeError):
    """A NaN/inf loss with ``train.nonfinite=stop``; the message names the step."""


@dataclass
class Parts:
    """The objects one optimizer step uses (built once by ``setup``)."""
    model: nn.Module            # what is trained: DDP and/or compiled around ``plain``
    plain: nn.Module            # the bare module: evaluation, checkpoints, EMA
    optimizer: torch.optim.Optimizer
    schedule: object
    scaler: torch.amp.GradScaler
    ema: object                 # timm ModelEmaV3 or None
    mixup: object               # timm Mixup or None
    loss_fn: nn.Module
    autocast: Callable
    memory_format: torch.memory_format
    accum_steps: int
    nonfinite: str
    seed: int


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint."""
    epoch: int = 0              # 0-based epoch in progress
    step_in_epoch: int = 0      # optimizer steps of it done
    global_step: int = 0
    counters: dict = field(default_factory=lambda: {"skipped_nonfinite": 0, "scaler_skipped": 0})
    best: dict = field(default_factory=lambda: {"top1": None, "weights": None, "epoch": None})


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed python/numpy/torch from (seed, rank, step): mixup, dropout etc. resume exactly."""
    value = (seed * 1_000_003 + rank) * 1_000_003 + step
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, loader, autocast=contextlib.nullcontext,
             memory_format=torch.contiguous_format, stop: StopFlag | None = None):
    """Top-1/top-5/loss over the whole val set, exact across processes.

    ``model`` must be the bare module: every rank walks its own shard (shards may differ in
    length), so nothing inside the loop may be a collective; the counts are summed once at
    the end. Returns None when a stop was requested mid-way.
    """
    model.eval()
    device = next(model.parameters()).device
    counts = EvalCounts(device)
    start = time.perf_counter()
    for images, labels in loader:
        with autocast():
            logits = model(images.contiguous(memory_format=memory_format))
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        counts.update(logits.float(), labels, loss_sum)
        if stop is not None and stop.requested:
            return None
    distributed.sum_tensor(counts.sums)
    result = counts.summary()
    result["img_per_s"] = result["images"] / max(1e-9, time.perf_counter() - start)
    return result


# ---------------------------------------------------------------- training

def train_step(parts: Parts, batches, progress: Progress, stop: StopFlag | None = None) -> dict:
    """One optimizer step over ``accum_steps`` micro-batches; returns local sums and timings,
    and ``stop``: whether any process had been asked to stop (the same answer on every rank)."""
    step = progress.global_step
    lr = parts.schedule.apply(step)
    seed_step(parts.seed, distributed.rank(), step)
    # A skipped step must not leave NaN in BN running statistics (updated by the forward).
    saved_buffers = [b.detach().clone() for b in parts.plain.buffers()] \
        if parts.nonfinite == "skip" else None
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = None
    images_seen, wait = 0, 0.0
    for micro in range(parts.accum_steps):
        t0 = time.perf_counter()
        images, labels = next(batches)
        wait += time.perf_counter() - t0
        images = images.contiguous(memory_format=parts.memory_format)
        targets = labels
        if parts.mixup is not None:
            images, targets = parts.mixup(images, labels)
        last_micro = micro == parts.accum_steps - 1
        # Skip DDP's gradient all-reduce on all but the last micro-batch.
        with (distributed.no_sync(parts.model) if not last_micro else contextlib.nullcontext()):
            with parts.autocast():
                logits = parts.model(images)
                loss = parts.loss_fn(logits, targets)
            parts.scaler.scale(loss / parts.accum_steps).backward()
        loss_sum = loss_sum.to(loss.device) + loss.detach().double() * labels.shape[0]
        hits = topk_correct(logits.detach(), labels)
        correct = hits if correct is None else correct + hits
        images_seen += labels.shape[0]
    # One small all-reduce so every rank sees the same loss and the same stop request and
    # takes the same decisions: a rank that stopped a step before the others (a signal to one
    # worker, or one landing between two ranks' checks) would leave them blocked in a collective.
    asked = float(stop is not None and stop.requested is not None)
    totals = distributed.sum_tensor(torch.stack([loss_sum, loss_sum.new_tensor(asked)]))
    mean_loss = totals[0].item() / (images_seen * distributed.world_size())
    any_stop = totals[1].item() > 0
    if not math.isfinite(mean_loss):
        parts.optimizer.zero_grad(set_to_none=True)
        if parts.nonfinite == "stop":
            raise NonFiniteLossError(f"non-finite training loss ({mean_loss}) at global step "
                                     f"{step} (epoch {progress.epoch + 1}, step "
                                     f"{progress.step_in_epoch + 1} of it)")
        progress.counters["skipped_nonfinite"] += 1
        print(f"warning: skipped global step {step}: non-finite loss ({mean_loss})", flush=True)
        for buffer, saved in zip(parts.plain.buffers(), saved_buffers):
            buffer.copy_(saved)
    else:
        scale = parts.scaler.get_scale() if parts.scaler.is_enabled() else None
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        if scale is not None and parts.scaler.get_scale() < scale:
            progress.counters["scaler_skipped"] += 1  # inf/NaN gradients: fp16 overflow
        parts.optimizer.zero_grad(set_to_none=True)
        if parts.ema is not None:
            parts.ema.update(parts.plain, step=step + 1)
    return {"loss_sum": loss_sum, "correct": correct, "images": images_seen, "lr": lr,
            "loss": mean_loss, "wait": wait, "stop": any_stop}


def train_epoch(parts: Parts, batches, num_steps: int, progress: Progress, log: runlog.RunLog,
                stop: StopFlag, save_every: int, save: Callable, show_bar: bool,
                log_every: int) -> dict | None:
    """Optimizer steps ``progress.step_in_epoch .. num_steps-1`` of ``progress.epoch``.

    Returns the epoch's train metrics (global), or None when stopped by a signal (the
    caller saves; no collective is made, so this works with a dead peer).
    """
    parts.model.train()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, correct1, correct5, images
    wait = 0.0
    start = time.perf_counter()
    bar = log.progress(num_steps, progress.step_in_epoch, f"epoch {progress.epoch + 1}", show_bar)
    while progress.step_in_epoch < num_steps:
        t0 = time.perf_counter()
        out = train_step(parts, batches, progress, stop)
        sums += torch.stack([out["loss_sum"].cpu(), *out["correct"].cpu().double(),
                             torch.tensor(float(out["images"]), dtype=torch.float64)])
        wait += out["wait"]
        progress.step_in_epoch += 1
        progress.global_step += 1
        bar.update()
        bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.4g}")
        if progress.global_step % log_every == 0:
            step_time = time.perf_counter() - t0
            log.scalars(progress.global_step, {
                "train/loss_step": out["loss"], "train/lr": out["lr"],
                "train/img_per_s_step": out["images"] * distributed.world_size() / step_time,
                "train/data_wait_step": out["wait"] / step_time})
        # Several processes stop on the agreed answer only; one also on a late signal.
        if out["stop"] or (stop.requested and distributed.world_size() == 1):
            stop.requested = stop.requested or "a signal to another process"
            bar.close()
            return None
        if save_every and progress.global_step % save_every == 0 and \
                progress.step_in_epoch < num_steps:
            save(epoch_end=False)
    bar.close()
    elapsed = time.perf_counter() - start
    local_images = sums[3].item()
    distributed.sum_tensor(sums)
    loss_sum, correct1, correct5, images = sums.tolist()
    n = max(1.0, images)
    return {"loss": loss_sum / n, "top1": 100 * correct1 / n, "top5": 100 * correct5 / n,
            "images": int(images), "img_per_s": images / max(1e-9, elapsed),
            "data_wait": wait / max(1e-9, elapsed), "local_images": local_images}


# ---------------------------------------------------------------- the run

def steps_per_epoch(loader_batches: int, accum_steps: int, cap: int) -> int:
    steps = loader_batches // accum_steps
    if steps == 0:
        raise ConfigError(f"the train loader yields {loader_batches} batches per process per "
                         f"epoch, fewer than train.accum_steps={accum_steps}: lower "
                         f"data.batch_size or use more data")
    return min(steps, cap) if cap else steps


def setup(cfg: Config, device: torch.device, num_steps: int) -> Parts:
    """Build every training object from the config (all through ``sge.builders``)."""
    plain = builders.place_model(cfg, builders.build_model(cfg), device)
    optimizer = builders.build_optimizer(cfg, plain, distributed.world_size())
    return Parts(
        model=builders.wrap_for_training(cfg, plain, device), plain=plain, optimizer=optimizer,
        schedule=builders.build_schedule(cfg, optimizer, num_steps),
        scaler=builders.build_scaler(cfg, device), ema=builders.build_ema(cfg, plain),
        mixup=builders.build_mixup(cfg), loss_fn=builders.build_train_loss(cfg),
        autocast=builders.autocast(cfg, device), memory_format=builders.memory_format(cfg),
        accum_steps=cfg.train.accum_steps, nonfinite=cfg.train.nonfinite, seed=cfg.seed)


def resume_path(cfg: Config) -> Path | None:
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        last = Path(cfg.output.dir) / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    return Path(cfg.train.resume).expanduser()


def validate_epoch(cfg: Config, parts: Parts, val_loader, progress: Progress,
                   log: runlog.RunLog, stop: StopFlag, config: dict) -> list[dict] | None:
    """Evaluate the raw weights (and the EMA's), update best.pt, log rows; None if stopped.

    Rows are logged once every candidate is evaluated: a stop midway saves a checkpoint
    whose validation is pending, and the resumed run logs them all."""
    candidates = [("raw", parts.plain)] + ([("ema", parts.ema.module)] if parts.ema else [])
    rows = []
    for which, module in candidates:
        # DDP keeps parameters equal but BN statistics are per rank: evaluate rank 0's.
        distributed.broadcast_buffers(module)
        # Validation has no collective until its end, so several processes could not agree
        # on stopping midway: there a stop waits for the epoch-end check in ``_fit``.
        result = evaluate(module, val_loader, parts.autocast, parts.memory_format,
                          stop if distributed.world_size() == 1 else None)
        if result is None:
            return None
        row = {"epoch": progress.epoch + 1, "step": progress.global_step, "split": "val",
               "weights": which, "loss": result["loss"], "top1": result["top1"],
               "top5": result["top5"], "images": result["images"],
               "lr": parts.optimizer.param_groups[0]["lr"], "img_per_s": result["img_per_s"]}
        rows.append(row)
        best = progress.best
        if best["top1"] is None or result["top1"] > best["top1"]:
            progress.best = {"top1": result["top1"], "weights": which, "epoch": progress.epoch + 1}
            if distributed.is_main():
                checkpoint.save_best(module.state_dict(), Path(cfg.output.dir) / "checkpoints",
                                     which=which, top1=result["top1"], epoch=progress.epoch + 1,
                                     global_step=progress.global_step, config=config)
    for row in rows:
        log.metrics(row)
    return rows


def fit(cfg: Config) -> dict:
    """Train per ``cfg`` (resuming per ``train.resume``); return the final summary.

    The summary has ``stopped`` (a signal name, or None), ``best`` and the last ``val`` rows.
    """
    device = builders.init_process(cfg)
    with StopFlag() as stop:
        try:
            result = _fit(cfg, device, stop)
        except Exception as exc:
            if not distributed.is_peer_failure(exc):
                raise
            if stop.requested:
                # A peer left first (it died, and torchrun is stopping us; or it honoured a
                # signal at an epoch end or in validation): this step was not finished and
                # not saved, so say where the last saved state is.
                print(f"[rank {distributed.rank()}] stopped by {stop.requested}; another "
                      f"process left first, the last saved state is in "
                      f"{Path(cfg.output.dir) / 'checkpoints' / 'last.pt'}", flush=True)
                return {"stopped": stop.requested, "best": None, "val": None}
            first = str(exc).strip().splitlines()[0][:300]
            raise distributed.PeerLostError(
                f"[rank {distributed.rank()}] lost another process of the run (it died or hung "
                f"longer than dist.timeout_s={cfg.dist.timeout_s}s): {first}; resume from "
                f"{Path(cfg.output.dir) / 'checkpoints' / 'last.pt'}") from None
    distributed.cleanup()
    return result


def _fit(cfg: Config, device: torch.device, stop: StopFlag) -> dict:
    main = distributed.is_main()
    seed_step(cfg.seed, distributed.rank(), -1)
    ckpt_dir = Path(cfg.output.dir) / "checkpoints"
    path = resume_path(cfg)
    own = path is not None and path.resolve().parent == ckpt_dir.resolve()
    log = runlog.RunLog(cfg.output.dir, main, cfg.output.tensorboard, fresh=not own)
    config = runlog.resolved_config(cfg)
    log.write_setup(config, runlog.environment(distributed.world_size()))
    train_loader, val_loader = data.build_loader(cfg, "train"), data.build_loader(cfg, "val")
    num_steps = steps_per_epoch(len(train_loader), cfg.train.accum_steps,
                                cfg.train.steps_per_epoch)
    parts = setup(cfg, device, num_steps)
    progress, rng = Progress(), None
    if path is not None:
        state = checkpoint.load_training_state(
            path, model=parts.plain, optimizer=parts.optimizer, schedule=parts.schedule,
            scaler=parts.scaler, ema=parts.ema, config=config, steps_per_epoch=num_steps)
        progress = Progress(state["epoch"], state["step_in_epoch"], state["global_step"],
                            state["counters"], state["best"])
        rng = state["rng"]
        log.info(f"resumed from {path}: epoch {progress.epoch + 1}, step "
                 f"{progress.step_in_epoch}/{num_steps} of it, global step {progress.global_step}")
        if own:  # this run's own checkpoint
            log.rewind(state["metrics_rows"], progress.global_step)

    def save(epoch_end: bool) -> Path | None:
        if not main:
            return None
        state = checkpoint.training_state(
            model=parts.plain, optimizer=parts.optimizer, schedule=parts.schedule,
            scaler=parts.scaler, ema=parts.ema, epoch=progress.epoch,
            step_in_epoch=progress.step_in_epoch, global_step=progress.global_step,
            config=config, best=progress.best, counters=progress.counters,
            steps_per_epoch=num_steps, metrics_rows=log.rows)
        return checkpoint.save_last(state, ckpt_dir, cfg.train.keep_epoch_ckpts, epoch_end)

    log.info(f"training {cfg.model.name} on {distributed.world_size()} process(es) "
             f"({device.type}), global batch {builders.global_batch(cfg, distributed.world_size())}"
             f", {num_steps} steps/epoch, lr {parts.optimizer.defaults['lr']:.4g}, "
             f"run dir {cfg.output.dir}")
    val_rows = None
    while progress.epoch < cfg.train.epochs:
        epoch = progress.epoch
        train_loader.set_epoch(epoch, start_batch=progress.step_in_epoch * cfg.train.accum_steps)
        batches = iter(train_loader)
        if rng is not None:  # after iter(): creating a DataLoader iterator draws from the RNG
            checkpoint.set_rng_state(rng)
            rng = None
        train = train_epoch(parts, batches, num_steps, progress, log, stop,
                            cfg.train.ckpt_every_steps, save, cfg.train.progress,
                            cfg.train.log_every)
        if train is None:
            return _stopped(stop, save(epoch_end=False), progress, log)
        lr = parts.optimizer.param_groups[0]["lr"]
        if train["images"]:  # zero when resumed after the epoch's last step
            log.metrics({"epoch": epoch + 1, "step": progress.global_step, "split": "train",
                         "weights": "raw", "loss": train["loss"], "top1": train["top1"],
                         "top5": train["top5"], "images": train["images"], "lr": lr,
                         "img_per_s": train["img_per_s"], "data_wait": train["data_wait"],
                         "global_batch": builders.global_batch(cfg, distributed.world_size()),
                         **progress.counters})
        summary = (f"epoch {epoch + 1}/{cfg.train.epochs} step {progress.global_step}: "
                   f"train loss {train['loss']:.4f} top1 {train['top1']:.2f} "
                   f"{train['img_per_s']:.1f} img/s (data wait {100 * train['data_wait']:.0f}%)")
        if (epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs:
            val_rows = validate_epoch(cfg, parts, val_loader, progress, log, stop, config)
            if val_rows is None:
                return _stopped(stop, save(epoch_end=False), progress, log)
            summary += "".join(f" | val[{r['weights']}] loss {r['loss']:.4f} top1 "
                               f"{r['top1']:.3f} top5 {r['top5']:.3f}" for r in val_rows)
        progress.epoch, progress.step_in_epoch = epoch + 1, 0
        path = save(epoch_end=True)
        log.info(summary)
        if stop.agreed():
            return _stopped(stop, path, progress, log)
    best = progress.best
    if best["top1"] is not None:
        log.info(f"done: best top1={best['top1']:.3f} ({best['weights']} weights, epoch "
                 f"{best['epoch']}) in {ckpt_dir / 'best.pt'}")
    log.close()
    return {"stopped": None, "best": progress.best, "val": val_rows,
            "global_step": progress.global_step, "counters": progress.counters}


def _stopped(stop: StopFlag, path, progress: Progress, log: runlog.RunLog) -> dict:
    saved = f"; state saved to {path}" if path else ""
    log.info(f"stopped by {stop.requested} after global step {progress.global_step}{saved}")
    log.close()
    return {"stopped": stop.requested, "best": progress.best, "val": None,
            "global_step": progress.global_step, "counters": progress.counters}


def evaluate_checkpoint(cfg: Config, path) -> dict:
    """Evaluate the weights in ``path`` (ours, released or plain) on ``cfg``'s val set."""
    device = builders.init_process(cfg)
    model = builders.build_model(cfg)
    checkpoint.load_model_weights(model, path)
    model = builders.place_model(cfg, model, device)
    result = evaluate(model, data.build_loader(cfg, "val"), builders.autocast(cfg, device),
                      builders.memory_format(cfg))
    return result
