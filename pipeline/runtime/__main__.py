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
from .base import BENCH_DEFAULTS, Runner, benchmark
from .trt_build import EngineSpec

HERE = Path(__file__).resolve().parent


class UsageError(Exception):
    """Something the user must fix (a missing file, no TensorRT here): one line, exit code 2."""


def _bundle_dir(arg: str | None) -> Path:
    return Path(arg) if arg else HERE.parent


def _existing(path: str | Path, what: str, fix: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} not found: {p.absolute()}; {fix}")
    return p


def _open_runner(model: str) -> Runner:
    """A runner for ``model``, or a UsageError that says why it cannot run here."""
    path = _existing(model, "model", "pass an .onnx or .engine file of this bundle (ls *.onnx *.engine)")
    if path.suffix not in (".onnx", ".engine", ".plan", ".trt"):
        raise UsageError(f"no runner for {path.name}: expected .onnx or .engine")
    if path.suffix != ".onnx":
        ok, reason = get_backend("tensorrt").is_available()
        if not ok:
            raise UsageError(f"cannot run {path.name} here: {reason}")
    return load_runner(path)


def cmd_check(args: argparse.Namespace) -> int:
    print(json.dumps({name: b.check_env() for name, b in BACKENDS.items()}, indent=2))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    folder = _bundle_dir(args.bundle)
    manifest = json.loads(_existing(folder / "bundle.json", "bundle.json",
                                    "pass the bundle folder with --bundle (the build stage's output)").read_text())
    specs = [EngineSpec.from_dict(d) for d in manifest["engines"]]
    if args.only:
        specs = [s for s in specs if s.name in args.only]
    backend = get_backend("tensorrt")
    ok, reason = backend.is_available()
    if not ok:
        raise UsageError(f"cannot build engines here: {reason}")
    results = backend.build(specs, folder, verbose=args.verbose)
    print(json.dumps(results, indent=2))
    return 1 if any("error" in r for r in results.values()) else 0


def cmd_predict(args: argparse.Namespace) -> int:
    samples = np.load(_existing(args.samples, "samples", "pass --samples sample_inputs.npz (in the bundle folder)"))
    x, y = samples["x"], samples["y"]
    with _open_runner(args.model) as runner:
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
    threads = None if args.threads == 0 else args.threads
    with _open_runner(args.model) as runner:
        print(json.dumps(benchmark(runner, args.batch, args.warmup, args.iters, threads,
                                   min_seconds=args.min_seconds), indent=2))
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
    be = sub.add_parser("bench", help="latency (p50/p95/p99, min, max, std) and throughput; defaults = the report's")
    be.add_argument("model")
    be.add_argument("--batch", type=int, default=1)
    be.add_argument("--warmup", type=int, default=BENCH_DEFAULTS["warmup"], help="untimed calls first")
    be.add_argument("--iters", type=int, default=BENCH_DEFAULTS["iters"], help="at least this many timed calls")
    be.add_argument("--min-seconds", type=float, default=BENCH_DEFAULTS["min_seconds"],
                    help="and at least this long (seconds)")
    be.add_argument("--threads", type=int, default=BENCH_DEFAULTS["threads"],
                    help="CPU threads while timing, as in the report (0: the runtime's default)")
    be.set_defaults(fn=cmd_bench)
    args = p.parse_args(argv)
    try:
        return int(args.fn(args))
    except UsageError as exc:
        print(f"staa_runtime {args.cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
