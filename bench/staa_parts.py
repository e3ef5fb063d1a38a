"""What each STAA part adds to a training step: plain LIF, adaptive LIF, +PE, +GC, +SA, +TSRD, all STAA.

Why: ``bench/peer_spikingjelly.py`` gives the all-STAA / plain ratio; this says where the difference goes,
so that a speed-up is aimed at the part that costs. Every variant is the same ResNet-19 built by
``build_model`` (the variants of ``bench/ablation.py``), timed in interleaved rounds in one process (SGD step:
forward, cross-entropy, backward, update), median per variant, printed as ms and as a multiple of the plain step.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 OMP_NUM_THREADS=1 \\
        .venv/bin/python bench/staa_parts.py [--width 0.125 --T 4 --batch 16 --rounds 5]

Interleaving cancels slow drifts of the machine, not a busy neighbour: run it with nothing else on the cores.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.models import build_model  # noqa: E402
from step_timing import add_step_args, interleaved_seconds, sgd_step  # noqa: E402

PARTS = ("pe", "gc", "sa", "tsrd")


def variants(width: float, T: int, classes: int) -> dict[str, dict]:
    """The ablation's variants as model configs: STAA parts on/off and the neuron kind."""
    def cfg(kind: str, on: tuple[str, ...]) -> dict:
        return {"arch": "resnet19", "width": width, "T": T, "num_classes": classes, "in_channels": 3,
                "neuron": {"kind": kind}, "staa": {p: p in on for p in PARTS}}
    return {"plain": cfg("lif", ()), "alif": cfg("alif", ()), **{p: cfg("alif", (p,)) for p in PARTS},
            "all": cfg("alif", PARTS)}


def make_step(cfg: dict, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return lambda: sgd_step(model, opt, x, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_args(ap, rounds=5, steps=2, threads=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.image, args.image)
    y = torch.randint(0, args.classes, (args.batch,))
    steps = {k: make_step(c, x, y) for k, c in variants(args.width, args.T, args.classes).items()}
    seconds = interleaved_seconds(steps, args.rounds, args.steps, args.warmup)
    print(f"STAA parts, training step, CPU, {args.threads} thread(s), torch {torch.__version__}; width {args.width}, "
          f"T={args.T}, batch {args.batch}, {args.image}x{args.image}x3; {args.rounds} interleaved rounds x "
          f"{args.steps} steps (median)")
    print(f"{'variant':<8}{'ms/step':>10}{'x plain':>9}")
    for k, sec in seconds.items():
        print(f"{k:<8}{1e3 * sec:>10.1f}{sec / seconds['plain']:>9.2f}")


if __name__ == "__main__":
    main()
