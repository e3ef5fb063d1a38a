"""The epoch loop shared by train, reduce_t and qat: checkpoints, resume, AMP, DDP, NaN guard.

Resume is exact at epoch boundaries: every epoch reseeds the global RNGs and the shuffling
from (seed, epoch), and ``last.pt`` holds optimiser, scheduler and scaler state, so a run
killed mid-epoch restarts that epoch and ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from pipeline.checkpoint import model_payload, read_checkpoint, save_atomic
from pipeline.training.evaluate import evaluate

log = logging.getLogger("pipeline.train")

StepLoss = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class FitConfig:
    epochs: int
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # CUDA float16 autocast + GradScaler
    cpu_bf16: bool = False
    grad_clip: float | None = None
    max_batches: int | None = None
    eval_every: int = 1
    rank: int = 0
    world_size: int = 1
    progress: bool = True
    desc: str = "train"


@dataclass
class FitState:
    epoch: int = 0  # epochs finished
    best_top1: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _autocast(fc: FitConfig) -> contextlib.AbstractContextManager:
    if fc.device == "cuda" and fc.amp:
        return torch.autocast("cuda", dtype=torch.float16)
    if fc.device == "cpu" and fc.cpu_bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _epoch_order(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make this epoch's shuffle a function of (seed, epoch) only."""
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    elif getattr(sampler, "generator", None) is not None:
        sampler.generator.manual_seed(seed * 100003 + epoch)
    elif loader.generator is not None:
        loader.generator.manual_seed(seed * 100003 + epoch)


def fit(model: torch.nn.Module, train_loader: DataLoader, val_loader: DataLoader | None,
        optimizer: torch.optim.Optimizer, scheduler: Any, step_loss: StepLoss, fc: FitConfig,
        ckpt_dir: Path, payload: Callable[[torch.nn.Module], dict[str, Any]],
        writer: Any = None) -> FitState:
    """Train ``model`` for ``fc.epochs`` epochs, resuming from ``ckpt_dir/last.pt`` when present.

    ``payload(model)`` returns the self-describing checkpoint dict (weights + model config);
    ``best.pt`` is written when validation top-1 improves, ``last.pt`` after every epoch.
    """
    ckpt_dir = Path(ckpt_dir)
    is_main = fc.rank == 0
    scaler = torch.amp.GradScaler("cuda", enabled=fc.device == "cuda" and fc.amp)
    state = FitState()
    last = ckpt_dir / "last.pt"
    bare = model.module if hasattr(model, "module") else model
    if last.is_file():
        ck = read_checkpoint(last)
        bare.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if scheduler is not None and ck.get("scheduler") is not None:
            scheduler.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        state.epoch, state.best_top1, state.history = ck["epoch"], ck["best_top1"], ck["history"]
        state.resumed_from = state.epoch
        if is_main:
            log.info("resumed from %s: %d of %d epochs already done", last, state.epoch, fc.epochs)

    for epoch in range(state.epoch, fc.epochs):
        seed_everything(fc.seed * 1009 + epoch)
        _epoch_order(train_loader, fc.seed, epoch)
        model.train()
        n_batches = len(train_loader) if fc.max_batches is None else min(len(train_loader), fc.max_batches)
        seen = correct = 0
        loss_sum = 0.0
        t0 = time.perf_counter()
        bar = tqdm(total=n_batches, desc=f"{fc.desc} {epoch + 1}/{fc.epochs}", disable=not (is_main and fc.progress),
                   leave=False, mininterval=1)
        for i, (x, y) in enumerate(train_loader):
            if i >= n_batches:
                break
            x, y = x.to(fc.device, non_blocking=True), y.to(fc.device, non_blocking=True)
            with _autocast(fc):
                loss, logits = step_loss(model, x, y)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(
                    f"loss became {loss.item()} at epoch {epoch + 1}, batch {i + 1}; the last good checkpoint "
                    f"is kept at {last if last.is_file() else '(none yet)'}; lower the learning rate or set "
                    f"a gradient clip (e.g. --set train.grad_clip=1.0) and run again"
                )
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
            correct += (logits.argmax(1) == y).sum().item()
            loss_sum += loss.item() * y.numel()
            rate = seen * fc.world_size / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}", img_s=f"{rate:.0f}")
            bar.update()
        bar.close()
        wall = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_top1": 100.0 * correct / max(seen, 1),
               "images_per_s": seen * fc.world_size / max(wall, 1e-9), "lr": optimizer.param_groups[0]["lr"],
               "epoch_s": wall}
        do_eval = val_loader is not None and ((epoch + 1) % fc.eval_every == 0 or epoch + 1 == fc.epochs)
        if is_main and do_eval:
            ev = evaluate(bare, val_loader, fc.device, desc="val", progress=fc.progress)
            row.update(val_top1=ev["top1"], val_top5=ev["top5"], val_loss=ev["loss"])
        state.history.append(row)
        state.epoch = epoch + 1
        if is_main:
            log.info("%s epoch %d/%d: loss %.4f train %.2f%% %s(%.0f img/s)", fc.desc, epoch + 1, fc.epochs,
                     row["train_loss"], row["train_top1"],
                     f"val {row['val_top1']:.2f}% " if "val_top1" in row else "", row["images_per_s"])
            if writer is not None:
                for k, v in row.items():
                    if k != "epoch":
                        writer.add_scalar(f"{fc.desc}/{k}", v, epoch + 1)
                writer.flush()
            improved = "val_top1" in row and row["val_top1"] > state.best_top1
            if improved or val_loader is None:
                state.best_top1 = row.get("val_top1", state.best_top1)
                save_atomic(payload(bare) | {"epoch": epoch + 1, "val_top1": row.get("val_top1")}, ckpt_dir / "best.pt")
            save_atomic(payload(bare) | {
                "epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict(), "best_top1": state.best_top1, "history": state.history,
            }, last)
        if fc.world_size > 1:
            torch.distributed.barrier()
    return state


def check_finite_params(model: torch.nn.Module) -> None:
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteLoss(f"non-finite weights in {bad[:5]}; lower the learning rate")


def total_steps(loader: DataLoader, epochs: int, max_batches: int | None) -> int:
    per = len(loader) if max_batches is None else min(len(loader), max_batches)
    return per * epochs


__all__ = ["fit", "FitConfig", "FitState", "NonFiniteLoss", "seed_everything", "total_steps", "model_payload"]
