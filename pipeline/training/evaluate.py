"""Accuracy of a model over a loader (top-1, top-5, loss, prediction list for agreement)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm


@torch.no_grad()
def evaluate(predict: Callable[[torch.Tensor], torch.Tensor] | torch.nn.Module, loader: DataLoader,
             device: str = "cpu", desc: str = "eval", keep_logits: bool = False,
             progress: bool = True) -> dict:
    """Run ``predict`` (a module or any callable returning logits) over ``loader``.

    Returns top1/top5 in percent, mean CE loss, the predictions (for agreement against a
    baseline) and, on request, every logit row."""
    if isinstance(predict, torch.nn.Module):
        predict.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    preds, logits_all = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, mininterval=2):
        x, y = x.to(device), y.to(device)
        logits = predict(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(1).sum().item()
        total += y.numel()
        preds.append(top[:, 0].cpu())
        if keep_logits:
            logits_all.append(logits.cpu())
    out = {
        "top1": 100.0 * correct1 / max(total, 1),
        "top5": 100.0 * correct5 / max(total, 1),
        "loss": loss_sum / max(total, 1),
        "n": total,
        "preds": torch.cat(preds) if preds else torch.empty(0, dtype=torch.long),
    }
    if keep_logits:
        out["logits"] = torch.cat(logits_all) if logits_all else torch.empty(0)
    return out


def agreement(preds: torch.Tensor, reference: torch.Tensor) -> float:
    """Share (percent) of samples where two models predict the same class."""
    if preds.numel() == 0:
        return 0.0
    return 100.0 * (preds == reference).float().mean().item()
