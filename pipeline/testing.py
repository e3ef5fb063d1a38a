"""Models that fire, for testing and benchmarking deployment code without a trained checkpoint (like
``torch.testing``: the tests and bench/deploy_speed.py use it, the pipeline never does).

A freshly initialised SNN barely fires past its first layers, so its logits are the classifier
bias and every parity test would pass trivially. :func:`firing_model` calibrates BN on real
images so that every layer fires (a few to tens of percent), which makes spike flips, logit
drift and streaming-state bugs visible.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from pipeline.data import build_datasets
from pipeline.models import build_model, set_tsrd_p


@torch.no_grad()
def firing_model(model_cfg: Mapping[str, Any], x: torch.Tensor, bias: float = 1.0, pe_std: float = 0.3,
                 seed: int = 0) -> nn.Module:
    """``build_model(model_cfg)`` with BN statistics from ``x`` and shifted BN biases (eval mode).

    BN running statistics are set from ``x`` (cumulative average, one pass in train mode with
    TSRD off), BN weights to 1 and biases to ``bias``, so every conv output entering a neuron
    is about ``N(bias, 1)``; position encodings get random values (``pe_std``) so that
    per-step constants matter.
    """
    torch.manual_seed(seed)
    model = build_model(dict(model_cfg))
    set_tsrd_p(model, 0.0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
        if hasattr(m, "pe") and isinstance(getattr(m, "pe"), nn.Parameter):
            m.pe.normal_(0.0, pe_std)
    model.train()
    model(x)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.fill_(1.0)
            m.bias.fill_(bias)
            m.momentum = 0.1
    return model.eval()


def real_images(dataset: str = "digits", n: int = 16, T: int = 2, **data: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The first ``n`` test images (normalised, as the pipeline feeds them), labels and the bundle."""
    cfg = {"dataset": dataset, "limit_test": n, **data}
    if dataset == "digits":
        cfg.setdefault("image_size", 16)
    bundle = build_datasets(cfg, T)
    xs, ys = zip(*(bundle.test[i] for i in range(min(n, len(bundle.test)))))
    return torch.stack(xs), torch.tensor(ys), bundle
