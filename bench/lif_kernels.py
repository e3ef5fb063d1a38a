"""One neuron layer's training forward + backward, torch path vs the fused Triton kernels (``train.kernels``).

For each T and dtype: builds an ALIF (per-channel M, N; rect) or LIF (atan) layer at ``[T, B, C, H, W]``,
checks that the Triton backend's spikes and saved fp32 membranes equal the torch path's bit for bit on
this device and that the input gradient agrees (max |a - b| / max |b|), then times forward + backward
of each (median of ``--rounds`` rounds of ``--steps``, interleaved). SpikingJelly's docs report one
LIF layer at T=4 as 0.77 ms (Triton) vs 0.99 ms (torch), and 3.4 vs 41.9 ms at T=32.

    python bench/lif_kernels.py --device cuda --json out.jsonl            # ResNet-19's first layer, batch 128
    python bench/lif_kernels.py --interpret --shape 2 4 6 6 --T 4         # the CPU, Triton's interpreter

The figures are the machine's: nothing here is a target by itself.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(kind: str, T: int, shape: tuple[int, ...], dtype: str, device: str, rounds: int, steps: int
            ) -> dict[str, Any]:
    import torch

    from pipeline.models import LIF, AdaptiveLIF
    from pipeline.models.kernels import set_kernels

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    channels = shape[1]

    def make():
        if kind == "alif":
            return AdaptiveLIF(channels).to(device)
        return LIF(decay=0.25, gain=1.0, surrogate="atan", surrogate_param=2.0).to(device)

    layers = {"torch": make(), "triton": set_kernels(make(), "triton")}
    gen = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn((T, *shape), generator=gen, device=device) * 0.6 + 0.3).to(dt)
    g = torch.randn(x.shape, generator=gen, device=device).to(dt)
    out: dict[str, Any] = {"kind": kind, "T": T, "shape": [T, *shape], "dtype": dtype, "device": device}
    spikes, membranes, grads = {}, {}, {}
    for name, layer in layers.items():
        xi = x.clone().requires_grad_()
        s = layer(xi)
        fn = s.grad_fn
        while fn is not None and "MultiStepLIF" not in type(fn).__name__:  # past the dtype cast, if any
            fn = fn.next_functions[0][0]
        membranes[name] = fn.saved_tensors[0].clone()
        s.backward(g)
        spikes[name], grads[name] = s.detach(), xi.grad
    out["spikes_equal"] = bool(torch.equal(spikes["torch"], spikes["triton"]))
    out["membranes_equal"] = bool(torch.equal(membranes["torch"], membranes["triton"]))
    d = (grads["triton"].double() - grads["torch"].double()).abs().max().item()
    out["grad_x_rel"] = d / max(grads["torch"].double().abs().max().item(), 1e-30)
    out["spike_rate"] = round(spikes["torch"].float().mean().item(), 4)

    xs = x.clone().requires_grad_()

    def step(layer) -> None:
        xs.grad = None
        layer(xs).backward(g)

    for layer in layers.values():  # warm-up (Triton compiles on its first call)
        step(layer)
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in layers}
    for _ in range(rounds):
        for name, layer in layers.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step(layer)
            _sync(device)
            times[name].append((time.perf_counter() - t0) / steps)
    for name in layers:
        out[f"{name}_ms"] = round(1e3 * statistics.median(times[name]), 4)
    out["speedup"] = round(out["torch_ms"] / out["triton_ms"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--interpret", action="store_true", help="the CPU, Triton's interpreter (tiny shapes only)")
    ap.add_argument("--shape", type=int, nargs=4, default=[128, 128, 32, 32], metavar=("B", "C", "H", "W"))
    ap.add_argument("--T", type=int, nargs="+", default=[4, 32])
    ap.add_argument("--kinds", nargs="+", default=["alif", "lif"], choices=["alif", "lif"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per row")
    args = ap.parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton defines the kernels
        args.device = "cpu"
    sys.path.insert(0, str(REPO))
    import torch

    print(f"torch {torch.__version__}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}"
          f"{', Triton interpreter' if args.interpret else ''}; one layer, forward + backward, median of "
          f"{args.rounds} rounds x {args.steps}")
    print(f"{'kind':<5} {'T':>3} {'dtype':<5} {'shape':<22} {'torch ms':>9} {'triton ms':>10} {'speedup':>8}  "
          f"spikes  membranes  grad rel")
    ok = True
    for kind in args.kinds:
        for T in args.T:
            for dtype in args.dtypes:
                r = measure(kind, T, tuple(args.shape), dtype, args.device, args.rounds, args.steps)
                ok &= r["spikes_equal"] and r["membranes_equal"]
                print(f"{kind:<5} {T:>3} {dtype:<5} {'x'.join(map(str, r['shape'])):<22} {r['torch_ms']:>9} "
                      f"{r['triton_ms']:>10} {r['speedup']:>7}x  {'same' if r['spikes_equal'] else 'DIFF':<6}  "
                      f"{'same' if r['membranes_equal'] else 'DIFF':<9}  {r['grad_x_rel']:.1e}", flush=True)
                if args.json is not None:
                    with args.json.open("a") as f:
                        f.write(json.dumps(r) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
