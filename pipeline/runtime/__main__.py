"""Device-side command line: check backends, build engines from a bundle, predict, benchmark.

In the bundle this package is ``staa_runtime``::

    python3 -m staa_runtime check
    python3 -m staa_runtime build                        # every engine listed in bundle.json
    python3 -m staa_runtime predict model_int8.engine    # accuracy on sample_inputs.npz
    python3 -m staa_runtime bench model_int8.engine --batch 1
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .backends import BACKENDS, get_backend, load_runner
from .base import benchmark
from .trt_build import EngineSpec

HERE = Path(__file__).resolve().parent


def _bundle_dir(arg: str | None) -> Path:
    return Path(arg) if arg else HERE.parent


def cmd_check(args: argparse.Namespace) -> int:
    print(json.dumps({name: b.check_env() for name, b in BACKENDS.items()}, indent=2))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    folder = _bundle_dir(args.bundle)
    manifest = json.loads((folder / "bundle.json").read_text())
    specs = [EngineSpec.from_dict(d) for d in manifest["engines"]]
    if args.only:
        specs = [s for s in specs if s.name in args.only]
    backend = get_backend("tensorrt")
    ok, reason = backend.is_available()
    if not ok:
        print(f"cannot build: {reason}", file=sys.stderr)
        return 1
    results = backend.build(specs, folder, verbose=args.verbose)
    print(json.dumps(results, indent=2))
    return 1 if any("error" in r for r in results.values()) else 0


def cmd_predict(args: argparse.Namespace) -> int:
    samples = np.load(args.samples)
    x, y = samples["x"], samples["y"]
    with load_runner(args.model) as runner:
        logits = runner.predict_all(x, args.batch)
    pred = logits.argmax(1)
    report = {"model": args.model, "n": int(len(y)), "top1": float((pred == y).mean() * 100)}
    if "logits" in samples:
        ref = samples["logits"]
        report["agreement_with_float"] = float((pred == ref.argmax(1)).mean() * 100)
        report["max_abs_diff_vs_float"] = float(np.abs(logits - ref).max())
    print(json.dumps(report, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    with load_runner(args.model) as runner:
        print(json.dumps(benchmark(runner, args.batch, args.warmup, args.iters, args.threads), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="staa_runtime", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="which backends work here, and why not").set_defaults(fn=cmd_check)
    b = sub.add_parser("build", help="build the engines listed in bundle.json (TensorRT Python API)")
    b.add_argument("--bundle", help="bundle folder (default: the folder holding this package)")
    b.add_argument("--only", nargs="*", help="engine names to build (default: all)")
    b.add_argument("--verbose", action="store_true")
    b.set_defaults(fn=cmd_build)
    pr = sub.add_parser("predict", help="top-1 on the bundled sample images")
    pr.add_argument("model", help=".onnx or .engine")
    pr.add_argument("--samples", default=str(HERE.parent / "sample_inputs.npz"))
    pr.add_argument("--batch", type=int, default=32)
    pr.set_defaults(fn=cmd_predict)
    be = sub.add_parser("bench", help="latency p50/p95 and throughput")
    be.add_argument("model")
    be.add_argument("--batch", type=int, default=1)
    be.add_argument("--warmup", type=int, default=10)
    be.add_argument("--iters", type=int, default=100)
    be.add_argument("--threads", type=int, default=None)
    be.set_defaults(fn=cmd_bench)
    args = p.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
