"""Accuracy of a model over a loader (top-1, top-5, loss, prediction list for agreement)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from pipeline.console import progress as progress_bar


@torch.no_grad()
def evaluate(predict: Callable[[torch.Tensor], torch.Tensor] | torch.nn.Module, loader: DataLoader,
             device: str = "cpu", desc: str = "eval", keep_logits: bool = False,
             progress: bool = True) -> dict:
    """Run ``predict`` (a module or any callable returning logits) over ``loader``.

    Returns top1/top5 in percent, mean CE loss, the predictions and labels (for agreement and
    paired statistics against a baseline), ``tied_top1`` (images whose largest logit is shared
    by two or more classes) and, on request, every logit row.

    Top-1 is the *first* index of the maximum (``argmax``), what numpy, ONNX ArgMax and a
    deployed application use; ``topk``'s order among equal logits is unspecified, and quantised
    graphs tie often, so a top-1 taken from ``topk`` would depend on the kernel."""
    if isinstance(predict, torch.nn.Module):
        predict.eval()
    correct1 = correct5 = total = tied = 0
    loss_sum = 0.0
    preds, labels, logits_all = [], [], []
    for x, y in progress_bar(loader, desc=desc, enabled=progress, leave=False, mininterval=2):
        x, y = x.to(device), y.to(device)
        logits = predict(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        pred = logits.argmax(1)
        correct1 += (pred == y).sum().item()
        correct5 += top5_hits(logits, y)
        tied += count_tied_top1(logits)
        total += y.numel()
        preds.append(pred.cpu())
        labels.append(y.cpu())
        if keep_logits:
            logits_all.append(logits.cpu())
    empty = torch.empty(0, dtype=torch.long)
    out = {
        "top1": 100.0 * correct1 / max(total, 1),
        "top5": 100.0 * correct5 / max(total, 1),
        "loss": loss_sum / max(total, 1),
        "n": total,
        "tied_top1": tied,
        "preds": torch.cat(preds) if preds else empty,
        "labels": torch.cat(labels) if labels else empty,
    }
    if keep_logits:
        out["logits"] = torch.cat(logits_all) if logits_all else torch.empty(0)
    return out


def top5_hits(logits: torch.Tensor, y: torch.Tensor) -> int:
    """Images whose label is among the 5 largest logits (a label tied with the 5th counts as a hit)."""
    k = min(5, logits.shape[1])
    kth = logits.topk(k, dim=1).values[:, -1:]
    return int((logits.gather(1, y[:, None]) >= kth).sum().item())


def count_tied_top1(logits: torch.Tensor) -> int:
    """Images whose maximum logit is reached by two or more classes (top-1 then rests on tie-breaking)."""
    top = logits.max(1, keepdim=True).values
    return int(((logits == top).sum(1) > 1).sum().item())


def agreement(preds: torch.Tensor, reference: torch.Tensor) -> float:
    """Share (percent) of samples where two models predict the same class."""
    if preds.numel() == 0:
        return 0.0
    return 100.0 * (preds == reference).float().mean().item()
