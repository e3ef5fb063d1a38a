"""The epoch loop shared by train, reduce_t and qat: checkpoints, resume, AMP, DDP, NaN guard.

Resume is exact at epoch boundaries on the CPU (with ``data.workers: 0``): every epoch reseeds
the global RNGs and the shuffling from (seed, epoch), and ``last.pt`` holds optimiser, scheduler
and scaler state, so a run killed mid-epoch restarts that epoch and ends with the same weights
as an uninterrupted one. On a GPU the resumed run continues the same schedule but is not
bit-identical (cuDNN kernel choice, atomics): see docs/gpu.md.

Host-device syncs per step (what makes a small CUDA step wait for the GPU): none in the steady
state. Loss and accuracy are summed on the device; the non-finite-loss check reads the device
flag every ``check_every`` steps (every step on the CPU, where a sync costs nothing; shared
across ranks under DDP so every rank stops at the same step); the progress line is refreshed
at most every ``postfix_s`` seconds; bf16 needs no GradScaler, and with fp16 the fused
optimisers keep GradScaler's inf check on the GPU.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from pipeline.checkpoint import CheckpointError, model_payload, read_checkpoint, save_atomic
from pipeline.console import LOG_ONLY
from pipeline.console import progress as progress_bar
from pipeline.distributed import any_rank, barrier
from pipeline.precision import amp_dtype, autocast, device_type, needs_grad_scaler, training_precision
from pipeline.training.evaluate import evaluate
from pipeline.training.tb import tb_tag

log = logging.getLogger("pipeline.train")

StepLoss = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
CUDA_CHECK_EVERY = 50  # steps between non-finite checks on a GPU (each check is one host sync)
CONSOLE_EPOCH_LINES = 3  # epoch lines a fit shows on the console: first, evenly spaced, last (the log has all)
CONSOLE_HEARTBEAT_S = 600.0  # ... plus any epoch ending this long after the last one shown (long runs)


@dataclass(frozen=True)
class Checkpoints:
    """Where a fit keeps its checkpoints: ``folder/best`` (best validation epoch) and ``folder/last``
    (resumable state). The stage names them (the train stage's outputs; fine-tunes use the same names,
    so the runner recognises a resumable folder), so this library knows no pipeline file names."""

    folder: Path
    best: str
    last: str

    @property
    def best_path(self) -> Path:
        return Path(self.folder) / self.best

    @property
    def last_path(self) -> Path:
        return Path(self.folder) / self.last


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ResumeFailed(RuntimeError):
    """An interrupted run's ``last.pt`` cannot be resumed from (damaged, or from another model); the
    runner turns it into one message that says how to start afresh."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"cannot resume the interrupted run from {path}: {why}")
        self.path = path


@dataclass
class FitConfig:
    epochs: int
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # CUDA mixed precision (bf16 where supported, else fp16 + GradScaler)
    cpu_bf16: bool = False
    precision: str = "auto"  # "auto" | "fp32" | "bf16" | "fp16" (see pipeline.precision.amp_dtype)
    grad_clip: float | None = None
    max_batches: int | None = None
    eval_every: int = 1
    rank: int = 0
    world_size: int = 1
    progress: bool = True
    desc: str = "train"
    check_every: int | None = None  # steps between non-finite checks; None: 1 on the CPU, 50 on CUDA
    postfix_s: float = 2.0  # seconds between progress-postfix refreshes (each is one host sync)
    console_lines: int = CONSOLE_EPOCH_LINES  # see on_console


@dataclass
class FitState:
    epoch: int = 0  # epochs finished
    best_top1: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None
    shown_at: float = field(default_factory=time.monotonic)  # when an epoch line last reached the console


def on_console(epoch: int, epochs: int, lines: int = CONSOLE_EPOCH_LINES) -> bool:
    """Whether epoch ``epoch`` (1-based) of ``epochs`` gets a console line: the first, the last and
    every k-th so that about ``lines`` show (15 epochs: 1, 8, 15). Every epoch is in stage.log."""
    if epoch in (1, epochs) or lines <= 0:
        return lines > 0
    step = math.ceil(epochs / max(lines - 1, 1))
    return epoch % step == 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain network inside DDP (``.module``), torch.compile (``._orig_mod``) and adapters."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """Store every 4-D conv weight channels-last (NHWC), in place; other parameters stay as they are.

    ``Module.to(memory_format=...)`` refuses models with 5-D parameters (STAA's PE is
    ``[T, 1, C, 1, 1]``), so the conv weights are converted one by one. Returns ``model``.
    """
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return model


def _epoch_order(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make this epoch's shuffle a function of (seed, epoch) only."""
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    elif getattr(sampler, "generator", None) is not None:
        sampler.generator.manual_seed(seed * 100003 + epoch)
    elif loader.generator is not None:
        loader.generator.manual_seed(seed * 100003 + epoch)


def _check_every(fc: FitConfig) -> int:
    if fc.check_every is not None:
        return max(int(fc.check_every), 1)
    return CUDA_CHECK_EVERY if device_type(fc.device) == "cuda" else 1


def _resume(last: Path, bare: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
            scaler: torch.amp.GradScaler, state: "FitState") -> None:
    """Restore weights, optimiser, scheduler, scaler and history from ``last.pt`` (any device)."""
    ck = read_checkpoint(last)
    bare.load_state_dict(ck["model"])
    # the implementation (fused on CUDA, default on the CPU) follows this run's device, not the saved one
    impl = {k: optimizer.defaults[k] for k in ("fused", "foreach") if k in optimizer.defaults}
    optimizer.load_state_dict(ck["optimizer"])  # moves the state to the parameters' device
    for group in optimizer.param_groups:
        group.update(impl)
    _place_steps(optimizer)
    if scheduler is not None and ck.get("scheduler") is not None:
        scheduler.load_state_dict(ck["scheduler"])
    # a scaler state exists only for fp16 runs: a run resumed in another precision starts a fresh one
    if ck.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ck["scaler"])
    state.epoch, state.best_top1, state.history = ck["epoch"], ck["best_top1"], ck["history"]
    state.resumed_from = state.epoch


def _place_steps(optimizer: torch.optim.Optimizer) -> None:
    """Put each ``step`` counter where this optimiser's kernels expect it: on the parameter's device
    (float32) for fused/capturable ones, on the CPU otherwise (torch keeps the saved placement)."""
    for group in optimizer.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                optimizer.state[p]["step"] = step.to(device=p.device if on_device else "cpu", dtype=torch.float32)


def fit(model: torch.nn.Module, train_loader: DataLoader, val_loader: DataLoader | None,
        optimizer: torch.optim.Optimizer, scheduler: Any, step_loss: StepLoss, fc: FitConfig,
        ckpt: Checkpoints, payload: Callable[[torch.nn.Module], dict[str, Any]],
        writer: Any = None) -> FitState:
    """Train ``model`` for ``fc.epochs`` epochs, resuming from ``ckpt.last_path`` when present.

    ``payload(model)`` returns the self-describing checkpoint dict (weights + model config);
    ``ckpt.best_path`` is written when validation top-1 improves, ``ckpt.last_path`` after every epoch.
    ``model`` may be wrapped (DDP, torch.compile): checkpoints and evaluation use the plain network.
    """
    is_main = fc.rank == 0
    dtype = amp_dtype(fc.device, fc.precision, fc.amp, fc.cpu_bf16)
    scaler = torch.amp.GradScaler(device_type(fc.device), enabled=needs_grad_scaler(fc.device, dtype))
    state = FitState()
    last = ckpt.last_path
    bare = unwrap(model)
    if last.is_file():
        try:
            _resume(last, bare, optimizer, scheduler, scaler, state)
        except (CheckpointError, RuntimeError, KeyError, ValueError, TypeError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if isinstance(exc, CheckpointError) and "damaged" in why:
                why = "it is damaged or not a torch file"
            raise ResumeFailed(last, why) from exc
        if is_main:
            log.info("resumed from %s: %d of %d epochs already done", last, state.epoch, fc.epochs)
    if is_main and state.epoch < fc.epochs:  # worth a console line only when mixed precision is on
        log.info("%s on %s: autocast %s%s", fc.desc, fc.device, str(dtype).replace("torch.", "") if dtype else "off",
                 ", GradScaler" if scaler.is_enabled() else "", extra=None if dtype else LOG_ONLY)

    with training_precision(fc.device):
        for epoch in range(state.epoch, fc.epochs):
            row = _train_epoch(model, train_loader, optimizer, scheduler, scaler, step_loss, fc, dtype, epoch, last)
            do_eval = val_loader is not None and ((epoch + 1) % fc.eval_every == 0 or epoch + 1 == fc.epochs)
            if is_main and do_eval:
                ev = evaluate(bare, val_loader, fc.device, desc="val", progress=fc.progress)
                row.update(val_top1=ev["top1"], val_top5=ev["top5"], val_loss=ev["loss"])
            state.history.append(row)
            state.epoch = epoch + 1
            if is_main:
                _end_of_epoch(bare, row, state, fc, optimizer, scheduler, scaler, payload, ckpt, writer,
                              has_val=val_loader is not None)
            if fc.world_size > 1:
                barrier()  # rank 0 has written its checkpoints
    return state


def _train_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler: Any,
                 scaler: torch.amp.GradScaler, step_loss: StepLoss, fc: FitConfig, dtype: torch.dtype | None,
                 epoch: int, last: Path) -> dict[str, Any]:
    """One epoch; returns its history row (loss, accuracy, images/s, lr, seconds)."""
    seed_everything(fc.seed * 1009 + epoch)
    _epoch_order(loader, fc.seed, epoch)
    model.train()
    n_batches = len(loader) if fc.max_batches is None else min(len(loader), fc.max_batches)
    every = _check_every(fc)
    dev = fc.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)  # running sums stay on the device
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    bad = torch.zeros((), dtype=torch.bool, device=dev)  # a non-finite loss since the last check
    seen, checked = 0, 0
    t0 = last_post = time.perf_counter()
    bar = progress_bar(total=n_batches, desc=f"{fc.desc} {epoch + 1}/{fc.epochs}",
                       enabled=fc.rank == 0 and fc.progress, leave=False, mininterval=1)
    for i, (x, y) in enumerate(loader):
        if i >= n_batches:
            break
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with autocast(dev, dtype):
            loss, logits = step_loss(model, x, y)
        bad |= ~torch.isfinite(loss.detach())
        if (i + 1) % every == 0 or i + 1 == n_batches:  # before backward: a bad loss never updates the weights
            if any_rank(bad):
                raise NonFiniteLoss(
                    f"loss became non-finite (nan or inf) at epoch {epoch + 1}, batch {checked + 1}-{i + 1} "
                    f"(checked every {every} batches); the last good checkpoint is kept at "
                    f"{last if last.is_file() else '(none yet)'}; lower the learning rate or set a gradient "
                    f"clip (e.g. --set train.grad_clip=1.0) and run again")
            checked = i + 1
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if fc.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), fc.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        seen += y.numel()
        correct += (logits.detach().argmax(1) == y).sum()
        loss_sum += loss.detach().double() * y.numel()
        bar.update()
        now = time.perf_counter()
        if now - last_post >= fc.postfix_s:  # the only sync of the progress display
            last_post = now
            rate = seen * fc.world_size / max(now - t0, 1e-9)
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100 * correct.item() / seen:.1f}",
                            img_s=f"{rate:.0f}", refresh=False)
    bar.close()
    if device_type(dev) == "cuda":
        torch.cuda.synchronize(dev)  # the epoch's wall time includes its queued kernels
    wall = time.perf_counter() - t0
    return {"epoch": epoch + 1, "train_loss": loss_sum.item() / max(seen, 1),
            "train_top1": 100.0 * correct.item() / max(seen, 1),
            "images_per_s": seen * fc.world_size / max(wall, 1e-9), "lr": optimizer.param_groups[0]["lr"],
            "epoch_s": wall}


def _end_of_epoch(bare: torch.nn.Module, row: dict[str, Any], state: FitState, fc: FitConfig,
                  optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
                  payload: Callable[[torch.nn.Module], dict[str, Any]], ckpt: Checkpoints, writer: Any,
                  has_val: bool) -> None:
    """Log the epoch (console: see :func:`on_console`), write TensorBoard scalars, ``best.pt`` (on
    improvement) and ``last.pt`` (rank 0)."""
    now = time.monotonic()
    shown = on_console(row["epoch"], fc.epochs, fc.console_lines) or now - state.shown_at >= CONSOLE_HEARTBEAT_S
    if shown:
        state.shown_at = now
    log.info("%s epoch %d/%d: loss %.4f train %.2f%% %s(%.0f img/s, %.1f s)", fc.desc, row["epoch"], fc.epochs,
             row["train_loss"], row["train_top1"], f"val {row['val_top1']:.2f}% " if "val_top1" in row else "",
             row["images_per_s"], row["epoch_s"], extra=None if shown else LOG_ONLY)
    if writer is not None:
        tag = tb_tag(fc.desc)
        for k, v in row.items():
            if k != "epoch":
                writer.add_scalar(f"{tag}/{k}", v, row["epoch"])
        writer.flush()
    improved = "val_top1" in row and row["val_top1"] > state.best_top1
    if improved or not has_val:
        state.best_top1 = row.get("val_top1", state.best_top1)
        save_atomic(payload(bare) | {"epoch": row["epoch"], "val_top1": row.get("val_top1")}, ckpt.best_path)
    save_atomic(payload(bare) | {
        "epoch": row["epoch"], "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict(), "best_top1": state.best_top1, "history": state.history,
    }, ckpt.last_path)


def total_steps(loader: DataLoader, epochs: int, max_batches: int | None) -> int:
    per = len(loader) if max_batches is None else min(len(loader), max_batches)
    return per * epochs


__all__ = ["Checkpoints", "fit", "FitConfig", "FitState", "NonFiniteLoss", "seed_everything", "total_steps", "model_payload",
           "unwrap", "to_channels_last", "on_console"]
