"""Device-side command line: check backends, build engines from a bundle, predict, benchmark.

In the bundle this package is ``staa_runtime``::

    python3 -m staa_runtime check
    python3 -m staa_runtime build                        # every engine listed in bundle.json
    python3 -m staa_runtime predict model_int8.engine    # accuracy on sample_inputs.npz
    python3 -m staa_runtime predict step_fp32.onnx --early-exit 0.9     # streaming, stop each sample when confident
    python3 -m staa_runtime predict step_fp32.onnx --exit-from report.json   # tau chosen on validation by validate
    python3 -m staa_runtime bench model_int8.engine --batch 1
    python3 -m staa_runtime bench model_int8.onnx --backend openvino     # Intel CPU, real INT8 kernels
    python3 -m staa_runtime executed model_int8.onnx --backend openvino  # which convs ran in int8
    python3 -m staa_runtime openvino-adapt model_int8.onnx -o model_int8_ov.onnx  # for benchmark_app (needs onnx)
    python3 -m staa_runtime nir-info model.nir           # nodes, edges, neuron parameters of an NIR graph (needs nir)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from . import specs
from .backends import BACKENDS, get_backend, load_runner
from .base import BENCH_DEFAULTS, NonFiniteInput, Runner, benchmark, check_finite
from .stream import CRITERIA, DEFAULT_CRITERION, STATE_IN, open_step_graph
from .backends.tensorrt_build import BuildRequest, EngineSpec

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


def _open_runner(model: str, backend: str | None = None) -> Runner:
    """A runner for ``model`` (``backend``: onnxruntime or openvino for .onnx), or a UsageError that says why
    it cannot run here."""
    path = _existing(model, "model", "pass an .onnx or .engine file of this bundle (ls *.onnx *.engine)")
    try:
        name = specs.backend_for(path, backend)
    except ValueError as exc:  # no backend loads the suffix, or --backend cannot load it
        raise UsageError(str(exc)) from None
    ok, reason = get_backend(name).is_available()
    if not ok:
        raise UsageError(f"cannot run {path.name} here: {reason}")
    try:
        return load_runner(path, backend=name)
    except Exception as exc:  # a damaged graph or engine, refused external data: the runtime's own words
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UsageError(f"{name} cannot load {path}: {type(exc).__name__}: {first[:300]}; pass a graph or "
                         f"engine written by this pipeline's export or build stage") from None


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
    results = backend.build(BuildRequest(folder, tuple(specs), verbose=args.verbose))
    print(json.dumps(results, indent=2))
    return 1 if any("error" in r for r in results.values()) else 0


def _samples(path: str) -> dict[str, np.ndarray]:
    """``x`` (float, batch first) and, when present, ``y`` and ``logits`` of a samples npz, checked."""
    f = _existing(path, "samples", "pass --samples sample_inputs.npz (in the bundle folder)")
    try:
        with np.load(f, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("x", "y", "logits") if k in z.files}
            keys = sorted(z.files)
    except Exception as exc:  # not a zip, damaged members, pickled objects (refused, never unpickled)
        raise UsageError(f"{f} cannot be read as an npz of arrays ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); pass the bundle's sample_inputs.npz")
    if "x" not in arrays:
        raise UsageError(f"{f} has no array 'x' (the input images; keys present: {keys})")
    x = arrays["x"]
    if x.dtype.kind not in "fiu" or x.ndim < 2:
        raise UsageError(f"{f}: 'x' has dtype {x.dtype} shape {x.shape}; expected float images, batch first")
    for key in ("y", "logits"):
        if key in arrays and len(arrays[key]) != len(x):
            raise UsageError(f"{f}: '{key}' has {len(arrays[key])} rows for {len(x)} images in 'x'")
    return arrays


def cmd_predict(args: argparse.Namespace) -> int:
    samples = _samples(args.samples)
    x = samples["x"]
    if args.allow_nonfinite:
        try:
            check_finite(x, "input")
        except NonFiniteInput as exc:
            print(f"staa_runtime predict: warning: {exc}; predicting anyway (--allow-nonfinite)", file=sys.stderr)
    else:
        try:
            check_finite(x, "input")
        except NonFiniteInput as exc:
            raise UsageError(f"{args.samples}: {exc}; a spiking net maps them to ordinary-looking logits. "
                             f"Fix the inputs, or pass --allow-nonfinite to predict anyway") from None
    with _open_runner(args.model, args.backend) as runner:
        if any(n.startswith(STATE_IN) for n in runner.input_names):  # a step graph: the stateful loop
            logits, stream = _predict_streaming(args, runner, x)
        else:
            if args.early_exit is not None or args.exit_from:
                raise UsageError(f"{args.model} is a whole-clip graph: the early exit needs a step graph "
                                 f"(step_fp32.onnx or step_int8.onnx of this bundle)")
            logits, stream = runner.predict_all(x, args.batch, allow_nonfinite=True), None  # checked above
    pred = logits.argmax(1)
    report = {"model": args.model, "backend": runner.name, "n": int(len(x))}
    if stream:
        report.update(stream)
    if "y" in samples:
        report["top1"] = float((pred == samples["y"]).mean() * 100)
    else:
        report["top1"] = None
        report["note"] = "no labels ('y') in the samples: predictions only"
        report["predictions"] = pred.astype(int).tolist()
    if "logits" in samples:
        ref = samples["logits"]
        report["agreement_with_float"] = float((pred == ref.argmax(1)).mean() * 100)
        report["max_abs_diff_vs_float"] = float(np.abs(logits - ref).max())
    print(json.dumps(report, indent=2))
    return 0


def exit_tau(report_path: str, model: str, backend: str) -> tuple[float | None, str]:
    """(tau, criterion) that validate chose on the validation split for ``model`` in ``backend`` (report.json
    ``steps.tau``; ONNX Runtime's choice when this backend has none)."""
    path = _existing(report_path, "report", "pass the validate stage's report.json (--exit-from)")
    try:
        steps = json.loads(path.read_text()).get("steps") or {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not JSON ({exc}); pass the validate stage's report.json") from None
    name = Path(model).name
    rows = [t for t in steps.get("tau") or [] if Path(str(t.get("artifact", ""))).name == name]
    row = next((t for t in rows if t.get("backend") == backend), None) or \
        next((t for t in rows if t.get("backend") == "onnxruntime"), None)
    if row is None:
        why = steps.get("skipped") or f"it has no tau for {name}"
        raise UsageError(f"{path}: {why}; pass --early-exit TAU instead")
    return row["tau"], row["criterion"]


def _predict_streaming(args: argparse.Namespace, runner: Runner, x: np.ndarray) -> tuple[np.ndarray, dict]:
    """Logits of a step graph run T steps per clip, or stopped per sample with the exit on; what it did."""
    try:
        stepper = open_step_graph(args.model, runner)
    except (ValueError, ImportError) as exc:
        raise UsageError(f"{args.model}: {exc}") from None
    tau, criterion = args.early_exit, args.exit_criterion
    if args.exit_from:
        tau, criterion = exit_tau(args.exit_from, args.model, runner.name)
    if tau is None:  # no exit, or validate chose "never exit early"
        logits = np.concatenate([stepper.run(x[i:i + args.batch]) for i in range(0, len(x), args.batch)])
        return logits, {"T": stepper.T, "early_exit": None, "mean_steps": float(stepper.T)}
    parts, steps = [], []
    for i in range(0, len(x), args.batch):
        lg, st = stepper.run_early_exit(x[i:i + args.batch], float(tau), criterion)
        parts.append(lg)
        steps.append(st)
    s = np.concatenate(steps)
    return np.concatenate(parts), {"T": stepper.T, "early_exit": {"tau": float(tau), "criterion": criterion},
                                   "mean_steps": float(s.mean()), "max_steps": int(s.max())}


def cmd_bench(args: argparse.Namespace) -> int:
    threads = None if args.threads == 0 else args.threads
    with _open_runner(args.model, args.backend) as runner:
        print(json.dumps(benchmark(runner, args.batch, args.warmup, args.iters, threads,
                                   min_seconds=args.min_seconds), indent=2))
    return 0


def cmd_executed(args: argparse.Namespace) -> int:
    """The precision the runtime really executed (int8 ops k/n, conv MAC share, kernels), as the report counts it."""
    with _open_runner(args.model, args.backend) as runner:
        info = runner.executed_precision()
        print(json.dumps({"model": args.model, **runner.describe(), "executed": info}, indent=2))
    return 0


def cmd_openvino_adapt(args: argparse.Namespace) -> int:
    """Write the Q/DQ graph OpenVINO computes exactly (what the openvino runner compiles) for other tools."""
    src = _existing(args.model, "model", "pass the INT8 .onnx file (e.g. model_int8.onnx)")
    out = Path(args.output) if args.output else src.with_name(f"{src.stem}_ov.onnx")
    if out.resolve() == src.resolve():
        raise UsageError(f"-o {out} is the input file: the input stays TensorRT's graph; write the adapted one "
                         f"elsewhere")
    try:
        from .backends.openvino_qdq import adapt_file
    except ImportError as exc:
        raise UsageError(f"adapting needs onnx ({exc}): python3 -m pip install onnx") from exc
    counts = adapt_file(str(src), str(out))
    if not counts.adapted:
        print(f"staa_runtime openvino-adapt: note: {src.name} has no activation Q/DQ pair to adapt "
              f"(an FP32 graph?); {out.name} is the same graph", file=sys.stderr)
    print(json.dumps({"model": str(src), "output": str(out), **counts.to_dict()}, indent=2))
    return 0


def cmd_nir_info(args: argparse.Namespace) -> int:
    """Nodes, edges and neuron parameters of an NIR file (the export stage's model.nir)."""
    path = _existing(args.model, "NIR file", "pass the export stage's model.nir (written for plain-LIF models)")
    try:
        from .nir_info import render, summary
        info = summary(path)
    except ImportError as exc:
        raise UsageError(f"reading NIR needs the nir package ({exc}): python3 -m pip install nir") from exc
    except (OSError, KeyError, ValueError) as exc:
        raise UsageError(f"{path} is not a readable NIR file ({type(exc).__name__}: {exc})") from exc
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


def _backend_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=sorted(BACKENDS), default=None,
                        help="runtime for the model (default: onnxruntime for .onnx, tensorrt for .engine; "
                             "openvino runs .onnx on Intel CPUs with real INT8 kernels)")


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
    pr.add_argument("--allow-nonfinite", action="store_true",
                    help="predict even if inputs hold NaN or infinity (a warning instead of an error)")
    ex_group = pr.add_mutually_exclusive_group()
    ex_group.add_argument("--early-exit", type=float, default=None, metavar="TAU",
                          help="step graphs: stop each sample once its running logits' confidence reaches TAU")
    ex_group.add_argument("--exit-from", metavar="REPORT_JSON",
                          help="step graphs: the tau (and criterion) validate chose on the validation split")
    pr.add_argument("--exit-criterion", choices=CRITERIA, default=DEFAULT_CRITERION,
                    help="confidence of the exit: top softmax probability, or top-1 minus top-2 probability")
    _backend_arg(pr)
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
    _backend_arg(be)
    be.set_defaults(fn=cmd_bench)
    ex = sub.add_parser("executed", help="which convolutions/matmuls the runtime ran on int8 kernels (k/n, MAC share)")
    ex.add_argument("model", help=".onnx or .engine")
    _backend_arg(ex)
    ex.set_defaults(fn=cmd_executed)
    oa = sub.add_parser("openvino-adapt", help="write the INT8 graph adapted for OpenVINO (what --backend openvino "
                                               "compiles; for benchmark_app and other OpenVINO tools; needs onnx)")
    oa.add_argument("model", help="the INT8 .onnx file")
    oa.add_argument("-o", "--output", help="adapted .onnx to write (default: <model>_ov.onnx next to it)")
    oa.set_defaults(fn=cmd_openvino_adapt)
    ni = sub.add_parser("nir-info", help="nodes, edges and neuron parameters of an NIR graph (needs nir)")
    ni.add_argument("model", help="the .nir file")
    ni.add_argument("--json", action="store_true", help="print JSON instead of text")
    ni.set_defaults(fn=cmd_nir_info)
    args = p.parse_args(argv)
    try:
        return int(args.fn(args))
    except UsageError as exc:
        print(f"staa_runtime {args.cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
