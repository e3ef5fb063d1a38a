"""The model can learn: a tiny STAA-SNN fits 64 real CIFAR-10 images (digits where absent)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.models import build_model

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10_train_subset.npz"


def load_64() -> tuple[torch.Tensor, torch.Tensor, str]:
    """64 class-balanced images, normalised per channel: real CIFAR-10, else sklearn digits at 16x16."""
    if SHARED.exists():
        with np.load(SHARED) as d:
            x = torch.from_numpy(d["images"][:64]).permute(0, 3, 1, 2).float() / 255
            y = torch.from_numpy(d["labels"][:64])
        source = "cifar10"
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = F.interpolate(torch.tensor(d.images[:64], dtype=torch.float32).unsqueeze(1) / 16, size=16,
                          mode="bilinear", align_corners=False)
        y = torch.tensor(d.target[:64], dtype=torch.int64)
        source = "digits"
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    return x, y, source


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Replace BN running statistics by the statistics of ``x`` (one pass), so eval sees what training saw."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    model(x)


@pytest.mark.slow
def test_tiny_model_fits_64_real_images():
    threads = torch.get_num_threads()
    # One thread: on the shared 2-core machine two threads spin-wait and ran 4x slower here.
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        x, y, source = load_64()
        model = build_model({"arch": "resnet19", "width": 0.125, "T": 2, "num_classes": 10,
                             "in_channels": x.shape[1], "staa": {"tsrd": False}})
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
        wall, cpu = time.perf_counter(), time.process_time()
        acc, steps = 0.0, 0
        for steps in range(1, 101):
            model.train()
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            acc = (out.argmax(1) == y).float().mean().item()
            if acc > 0.9:
                break
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        recalibrate_bn(model, x)
        model.eval()
        with torch.no_grad():
            eval_acc = (model(x).argmax(1) == y).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    print(f"\n{source}: train acc {acc:.3f} after {steps} steps, eval acc {eval_acc:.3f}, "
          f"{wall:.1f} s wall, {cpu:.1f} s CPU")
    assert acc > 0.9, f"train accuracy {acc:.3f} after {steps} steps"
    assert eval_acc > 0.8, f"eval accuracy {eval_acc:.3f} after BN recalibration"
    # Budgets: steps are deterministic (seed 0, one thread); CPU time per step is not (it grew
    # from 1.0 to 1.7 s as the shared 2 cores got busier). Measured on CIFAR: 54 steps with the
    # identity-start gates (seeds 1, 2: 46, 46), 38 with the earlier bias-2 sigmoid gates, 38 with
    # STAA frozen at its identity start: learning gates and PE cost steps early in training.
    assert steps <= 70, f"needed {steps} steps to fit 64 images (budget 70)"
    assert cpu / steps < 2.0, f"{cpu / steps:.2f} CPU seconds per step (budget 2.0 on one thread)"
