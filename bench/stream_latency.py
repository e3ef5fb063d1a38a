"""Streaming vs unrolled latency at batch 1 on ONNX Runtime (one thread), for a causal-SA STAA ResNet-19.

Why: issue 21's target is that one step of the streaming graph costs <= 1.3 / T of the unrolled graph's
latency, i.e. that the state I/O (membranes and causal SA's pooled history) does not eat what streaming
saves. Prints, from one run: the unrolled graph per call, the step graph per call (through
``StepRunner``: feeds, state copy-back included), and the ratio ``step / (unrolled / T)``. The weights are
untrained (firing BN statistics, random gates): latency does not depend on them.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/stream_latency.py --T 4 --width 0.125 --image 32
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.deploy.graphs.compact import compact_onnx
from pipeline.deploy.graphs.onnx_export import export_onnx
from pipeline.deploy.graphs.streaming import build_streaming
from pipeline.deploy.graphs.unroll import unroll_float
from pipeline.models import build_model
from pipeline.runtime import OrtRunner, StepRunner


def _median_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--image", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--sa", choices=("causal", "off"), default="causal", help="off: the same net without SA")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = {"arch": "resnet19", "width": args.width, "T": args.T, "num_classes": 10, "in_channels": args.channels,
           "staa": {"sa_mode": "causal", "tsrd": False, "sa": args.sa == "causal"}}
    model = build_model(cfg).eval()
    flat = unroll_float(model)
    x = torch.randn(1, args.channels, args.image, args.image)
    net = build_streaming(flat, x)
    with tempfile.TemporaryDirectory() as tmp:
        full_path, step_path = Path(tmp) / "full.onnx", Path(tmp) / "step.onnx"
        export_onnx(flat, (x,), full_path)
        export_onnx(net, net.example_inputs(x), step_path, input_names=net.input_names,
                    output_names=net.output_names, static_inputs=("step",))
        for path in (full_path, step_path):  # as export ships them
            compact_onnx(path, fold_weights=True, slim=True)
        full = OrtRunner(full_path, threads=1)
        stepper = StepRunner(OrtRunner(step_path, threads=1), net.state_inputs(), net.T)
        arr = x.numpy()
        diff = float(np.abs(stepper.run(arr) - full.predict(arr)).max())
        unrolled_ms = _median_ms(lambda: full.predict(arr), args.warmup, args.iters)
        clip_ms = _median_ms(lambda: stepper.run(arr), args.warmup, args.iters)
    step_ms = clip_ms / net.T
    print(f"SA {args.sa}, ResNet-19 width {args.width}, T={net.T}, {args.image}x{args.image}, batch 1, ONNX Runtime 1 thread")
    print(f"unrolled graph: {unrolled_ms:.3f} ms per clip; step graph: {step_ms:.3f} ms per step "
          f"({clip_ms:.3f} ms for T steps); state tensors: {len(net.state_shapes)} membranes, {len(net.sa_shapes)} SA")
    print(f"step / (unrolled / T) = {step_ms / (unrolled_ms / net.T):.2f} (target <= 1.3); "
          f"clip logits max |diff| streaming vs unrolled {diff:.3g}")


if __name__ == "__main__":
    main()
