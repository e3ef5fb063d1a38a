"""Optimiser and a per-iteration warm-up + cosine schedule."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch


def build_optimizer(params, cfg: Mapping[str, Any], lr: float | None = None,
                    device: str | None = None) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW from the train recipe; ``lr`` overrides ``cfg["lr"]``.

    On CUDA the fused kernels are used: one kernel for the whole update, and with a GradScaler
    the inf/NaN check stays on the GPU (no ``found_inf.item()`` sync per step). On the CPU the
    default implementation is kept, so CPU results stay bit-identical across versions.
    """
    lr = cfg["lr"] if lr is None else lr
    fused = {"fused": True} if device is not None and str(device).startswith("cuda") else {}
    if cfg.get("optimizer", "sgd") == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg["weight_decay"], **fused)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.get("momentum", 0.9), weight_decay=cfg["weight_decay"],
                           nesterov=False, **fused)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to zero, stepped every iteration."""
    total_steps = max(total_steps, 1)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
