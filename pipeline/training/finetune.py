"""The fine-tune that reduce_t and qat share: an upstream model, a few epochs of ``fit``, its best weights.

Both stages start from a trained model (carried to fewer steps, or NNCF-quantised), train it
for ``epochs`` with the train recipe's optimiser at their own learning rate and a cosine decay
with no warm-up, checkpoint into a folder of the stage (resumable), log TensorBoard scalars into
the stage's ``tb/``, and continue with the best validation epoch. What differs is a setting of
:class:`FineTune`: the step loss (a teacher's distillation or the task loss), which parameters
skip weight decay (QAT's quantiser scales), mixed precision, the seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch.utils.data import DataLoader

from pipeline.checkpoint import read_checkpoint
from pipeline.data import DataBundle, eval_loader, train_loader
from pipeline.training.tb import tensorboard_writer
from pipeline.training.loop import Checkpoints, FitConfig, NonFiniteLoss, StepLoss, fit, total_steps
from pipeline.training.losses import classification_loss
from pipeline.training.optim import build_optimizer, warmup_cosine

NoDecay = Callable[[str, torch.nn.Parameter], bool]
FINE_TUNE_LINES = 2  # console epoch lines per fine-tune (first, last): the stage's "after" line sums it up


@dataclass
class FineTune:
    """What one fine-tune does; the rest (optimiser kind, weight decay, clip, loss kind) is the train recipe."""

    desc: str  # "reduce_t T=2", "qat": log lines, TensorBoard tags, error messages
    epochs: int
    lr: float
    lr_key: str  # the config key a diverging loss points at ("reduce_t.lr")
    seed: int
    max_batches: int | None = None
    amp: bool = True
    cpu_bf16: bool = False
    step_loss: StepLoss | None = None  # None: the task loss of the train recipe (train.loss, label smoothing)
    no_decay: NoDecay | None = None  # parameters to train without weight decay (None: one group, all decay)
    loader: DataLoader | None = None  # None: the run's training loader over bundle.train


def fine_tune(model: torch.nn.Module, ft: FineTune, cfg: Mapping[str, Any], bundle: DataBundle, device: str,
              ckpt: Checkpoints, payload: Callable[[torch.nn.Module], dict[str, Any]],
              stage_dir: Path | None = None) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """Fine-tune ``model`` (in place) and return it with its best validation weights, in eval mode,
    and the per-epoch history. Resumes from ``ckpt.last_path``. Raises :class:`NonFiniteLoss`
    whose message names ``ft.desc`` and ``ft.lr_key``. ``stage_dir``: TensorBoard scalars go to its ``tb/``."""
    t = cfg["train"]
    loader = ft.loader if ft.loader is not None else train_loader(cfg, bundle)
    val = eval_loader(cfg, bundle.val) if len(bundle.val) else None
    opt = build_optimizer(_param_groups(model, ft.no_decay), t, lr=ft.lr)  # the train recipe's optimiser
    sched = warmup_cosine(opt, total_steps(loader, ft.epochs, ft.max_batches), 0)
    step_loss = ft.step_loss or _task_loss(t["loss"], t["label_smoothing"])
    fc = FitConfig(epochs=ft.epochs, seed=ft.seed, device=device, amp=ft.amp, cpu_bf16=ft.cpu_bf16,
                   grad_clip=t["grad_clip"], max_batches=ft.max_batches, desc=ft.desc, console_lines=FINE_TUNE_LINES)
    Path(ckpt.folder).mkdir(exist_ok=True)
    writer = tensorboard_writer(stage_dir) if stage_dir is not None else None
    try:
        state = fit(model, loader, val, opt, sched, step_loss, fc, ckpt, payload=payload, writer=writer)
    except NonFiniteLoss as exc:
        raise NonFiniteLoss(f"{ft.desc}: {exc} (the learning rate is {ft.lr_key})") from exc
    finally:
        if writer is not None:
            writer.close()
    model.load_state_dict(read_checkpoint(ckpt.best_path)["model"])
    return model.eval(), state.history


def _param_groups(model: torch.nn.Module, no_decay: NoDecay | None) -> Any:
    if no_decay is None:
        return model.parameters()
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if no_decay(name, p) else decay).append(p)
    return [{"params": decay}, {"params": keep, "weight_decay": 0.0}]


def _task_loss(kind: str, label_smoothing: float) -> StepLoss:
    def step_loss(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return classification_loss(m, x, y, kind, label_smoothing)

    return step_loss


__all__ = ["FineTune", "fine_tune"]
