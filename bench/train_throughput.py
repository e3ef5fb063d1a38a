"""CPU training throughput of the STAA-SNN ResNet-19 (CIFAR-100 head, 32x32): fp32 vs bf16 autocast.

Prints images/s per width and precision, the bf16/fp32 ratio and the peak RSS of the process.
Preload tcmalloc for representative numbers (DESIGN.md §5), e.g.::

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \\
        .venv/bin/python bench/train_throughput.py --widths 0.25 0.5 --steps 10
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.models import build_model  # noqa: E402


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def images_per_s(width: float, T: int, batch: int, steps: int, warmup: int, bf16: bool) -> float:
    """Time ``steps`` full training steps (forward, loss, backward, SGD step) after ``warmup`` ones."""
    torch.manual_seed(0)
    model = build_model({"arch": "resnet19", "width": width, "T": T, "num_classes": 100, "in_channels": 3}).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,))
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> None:
        with cast:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=float, nargs="+", default=[0.25])
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preload = os.environ.get("LD_PRELOAD", "")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"tcmalloc {'on' if 'tcmalloc' in preload else 'off'}; ResNet-19/CIFAR-100, 32x32, T={args.T}, "
          f"batch {args.batch}, {args.warmup} warm-up + {args.steps} timed steps")
    print(f"{'width':>6} {'fp32 img/s':>11} {'bf16 img/s':>11} {'bf16/fp32':>10} {'peak RSS MiB':>13}")
    for width in args.widths:
        fp32 = images_per_s(width, args.T, args.batch, args.steps, args.warmup, bf16=False)
        bf16 = images_per_s(width, args.T, args.batch, args.steps, args.warmup, bf16=True)
        print(f"{width:>6g} {fp32:>11.1f} {bf16:>11.1f} {bf16 / fp32:>10.2f} {peak_rss_mib():>13.0f}", flush=True)


if __name__ == "__main__":
    main()
