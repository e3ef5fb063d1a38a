"""Deployment speed of ResNet-19 (CIFAR-100 head) on CPU: torch eager, ONNX Runtime and OpenVINO, FP32 and INT8.

Why this bench: it answers what the shipped graphs cost on a CPU at full width, not on the
embedded default's toy net, and it goes through the project's own code paths so it measures what
the pipeline ships: ``build_model`` (BN calibrated on real images so every layer fires:
``pipeline/testing.py``'s ``firing_model``; weights untrained), ``unroll_float`` /
NNCF ``quantize_model`` -> QAT checkpoint -> ``qdq_module`` -> ``unroll_qat``, and
``export_verified`` (the export stage's export: int8 weight fold, onnxslim, ONNX Runtime parity,
static TensorRT check). Calibration and timing inputs are real CIFAR-100 test images from
``../shared/data/cifar100_test.npz`` when present (random data otherwise, with a warning).

Rows: width, T, backend, precision. Columns: p50 ms per batch at batch 1 and 32 with 1 and 2
threads, images/s at batch 32, and the share of conv MACs the runtime executed on integer kernels
(read from its executed graph). ONNX Runtime runs the Q/DQ graph with exact semantics (as the
validate stage does: ``OrtRunner``'s default), i.e. as fake-quant in float; OpenVINO compiles it to
u8/i8 kernels and keeps its float parts in true f32 (``inference_precision="f32"``).

Ratios printed after the table (targets in brackets): OpenVINO INT8 over FP32 at full width,
batch 32 [>= 3.0x]; T=2 over T=4 per backend [>= 1.8x]; ONNX Runtime FP32 over torch eager at
batch 1 for width <= 1/4 [>= 3x]; the achieved fraction of FP32 peak at full width (conv and
linear FLOPs over ``--peak-gflops`` per thread); the INT8/FP32 ONNX file-size ratio at full width
[<= 0.3].

    .venv/bin/python bench/deploy_speed.py --quick                 # smoke test: width 1/4, T=2
    .venv/bin/python bench/deploy_speed.py --out results.json      # full: widths 1, 1/4; T 4, 2, 1
    .venv/bin/python bench/deploy_speed.py --widths 1 --T 4,2 --threads 1,2,4
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.checkpoint import save_atomic  # noqa: E402
from pipeline.compress.quantize import load_qat_model, qat_payload, quantize_model  # noqa: E402
from pipeline.console import quiet_nncf  # noqa: E402
from pipeline.data import build_datasets  # noqa: E402
from pipeline.deploy.graphs.unroll import unroll_float, unroll_qat  # noqa: E402
from pipeline.deploy.proofs.verify import Gates, export_verified  # noqa: E402
from pipeline.runtime import OrtRunner, Runner, TorchRunner, benchmark  # noqa: E402
from pipeline.testing import firing_model  # noqa: E402

try:  # written by another change in parallel: fall back to a local runner while it is absent
    from pipeline.runtime import OpenVinoRunner
except ImportError:  # pragma: no cover
    OpenVinoRunner = None  # type: ignore[assignment,misc]

NUM_CLASSES, IMAGE = 100, (3, 32, 32)
DATA_FILE = "cifar100_test.npz"
BACKENDS = (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"),
            ("openvino", "int8"))
TARGETS = {"openvino_int8_over_fp32": 3.0, "t2_over_t4": 1.8, "ort_fp32_over_torch_b1": 3.0, "int8_over_fp32_file": 0.3}
LOG = logging.getLogger("bench.deploy_speed")


@dataclass
class Prepared:
    """One (width, T) model: the eager net, the exported graphs and what their export measured."""

    width: float
    T: int
    eager: nn.Module
    graphs: dict[str, Path]
    flops_per_image: float
    file_bytes: dict[str, int]
    export_notes: list[str] = field(default_factory=list)
    compact: dict[str, Any] = field(default_factory=dict)


def load_images(data_dir: Path, n: int, T: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` normalised CIFAR-100 test images through the project's loader, or random data (with a warning)."""
    path = data_dir / DATA_FILE
    if path.is_file():
        bundle = build_datasets({"dataset": "cifar100", "root": str(data_dir), "format": "npz", "limit_test": n,
                                 "limit_train": 16}, T)
        xs, ys = zip(*(bundle.test[i] for i in range(min(n, len(bundle.test)))))
        return torch.stack(xs), torch.tensor(ys), f"CIFAR-100 test images ({path})"
    print(f"WARNING: {path} is absent: calibrating and timing on random data (speeds are unaffected, "
          f"INT8 activation ranges are not those of real images)", file=sys.stderr)
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, *IMAGE, generator=gen), torch.randint(0, NUM_CLASSES, (n,), generator=gen), "random data"


def model_cfg(width: float, T: int) -> dict[str, Any]:
    return {"arch": "resnet19", "width": width, "T": T, "num_classes": NUM_CLASSES, "in_channels": IMAGE[0]}


@torch.no_grad()
def count_flops(model: nn.Module, x: torch.Tensor) -> float:
    """Conv and linear FLOPs (2 per MAC) of one image through ``model`` (all T steps)."""
    total = [0.0]

    def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            total[0] += 2.0 * out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            total[0] += 2.0 * out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return total[0]


def prepare(width: float, T: int, x: torch.Tensor, y: torch.Tensor, work: Path, parity_images: int = 4) -> Prepared:
    """Build, unroll, quantise (NNCF PTQ, the QAT stage's start point) and export one (width, T) model."""
    cfg = model_cfg(width, T)
    model = firing_model(cfg, x)  # BN from real images: every layer fires, as in a trained net
    meta = {"dataset": "cifar100", "in_channels": IMAGE[0], "image_size": list(IMAGE[1:]), "is_event": False,
            "num_classes": NUM_CLASSES}
    qmodel = quantize_model(model, [(x, y)], 1, fold_bn=True)
    quiet_nncf()
    out = work / f"w{width:g}_T{T}"
    out.mkdir(parents=True, exist_ok=True)
    save_atomic(qat_payload(qmodel, cfg, meta, fold_bn=True), out / "qat.pt")  # what the qat stage writes
    q = unroll_qat(load_qat_model(out / "qat.pt")[0])  # ... and what the unroll stage makes of it
    flat = unroll_float(model)
    gates = {"fp32": Gates(1e-4, None, 2e-4), "int8": Gates(1e-3, None, 2e-3, flip_margin=0.05)}
    graphs, notes, compact = {}, [], {}
    for key, module in (("fp32", flat), ("int8", q)):
        path = out / f"model_{key}.onnx"
        metrics, failures, trt = export_verified(module, x[:parity_images], path, opset=18, dynamo=False,
                                                 metadata={"T": str(T), "precision": key}, gates=gates[key],
                                                 what=f"width {width:g} T={T} {key}", work_dir=out)
        graphs[key] = path
        compact[key] = metrics["compact"]
        notes += failures + ([] if trt.ok else [trt.summary(2)])
    return Prepared(width, T, model.eval(), graphs, count_flops(model, x), {k: p.stat().st_size for k, p in graphs.items()},
                    notes, compact)


class _LocalOpenVino(Runner):  # pragma: no cover - only while pipeline.runtime.backends.openvino is absent
    """FALLBACK, local to this bench: plain OpenVINO compile (f32 hint, one stream)."""

    name = "openvino"

    def __init__(self, path: Path, precision: str, threads: int | None = None, inference_precision: str = "f32") -> None:
        import openvino as ov

        self.core, self.path, self.precision, self.hint, self.threads = ov.Core(), path, precision, inference_precision, None
        self.set_threads(threads or 1)

    def set_threads(self, threads: int | None) -> None:
        if threads and threads != self.threads:
            cfg = {"INFERENCE_PRECISION_HINT": self.hint, "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": int(threads)}
            self.compiled = self.core.compile_model(str(self.path), "CPU", cfg)
            self.request, self.threads = self.compiled.create_infer_request(), threads
            self.input_names = [i.get_any_name() for i in self.compiled.inputs]
            self.output_names = [o.get_any_name() for o in self.compiled.outputs]
            self.input_shape = (None, *IMAGE)

    def run(self, feeds: Any) -> dict[str, np.ndarray]:
        res = self.request.infer(dict(feeds))
        return {n: np.asarray(res[o]) for n, o in zip(self.output_names, self.compiled.outputs)}


def make_runner(backend: str, precision: str, prep: Prepared, threads: int) -> Runner:
    if backend == "torch":
        return TorchRunner(prep.eager, input_shape=(None, *IMAGE))
    path = prep.graphs[precision]
    if backend == "onnxruntime":
        return OrtRunner(path, threads=threads, precision=precision)
    if OpenVinoRunner is not None:
        return OpenVinoRunner(path, precision=precision, threads=threads, inference_precision="f32")
    return _LocalOpenVino(path, precision, threads)


def int8_share(runner: Runner) -> float | None:
    """Share of conv MACs on integer kernels, from the runtime's executed graph (None where unknown)."""
    if runner.name == "torch":
        return 0.0
    try:
        got = runner.executed_precision()
    except Exception as exc:  # the count is information; a failure must not lose the timings
        LOG.debug("executed precision of %s failed: %s", runner.name, exc)
        return None
    return None if got is None else got.get("int8_mac_share")


def batch_of(x: np.ndarray, b: int) -> np.ndarray:
    reps = -(-b // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:b])


def time_model(prep: Prepared, x: np.ndarray, batches: Sequence[int], threads: Sequence[int], warmup: int,
               iters: int, say: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for backend, precision in BACKENDS:
        runner = make_runner(backend, precision, prep, threads[0])
        row: dict[str, Any] = {"width": prep.width, "T": prep.T, "backend": backend, "precision": precision,
                               "p50_ms": {}, "images_per_s": {}, "file_bytes": prep.file_bytes.get(precision)
                               if backend != "torch" else None}
        try:
            for t in threads:
                torch.set_num_threads(t)
                for b in batches:
                    r = benchmark(runner, batch=b, warmup=warmup, iters=iters, threads=t, x=batch_of(x, b))
                    row["p50_ms"][f"b{b}_t{t}"] = r["p50_ms"]
                    row["images_per_s"][f"b{b}_t{t}"] = b * 1e3 / r["p50_ms"]
            row["int8_mac_share"] = int8_share(runner)
        finally:
            runner.close()
        say(f"  timed {backend} {precision}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row["p50_ms"].items()))
        rows.append(row)
    return rows


def _find(rows: list[dict[str, Any]], **key: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r[k] == v for k, v in key.items())), None)


def ratios(rows: list[dict[str, Any]], preps: list[Prepared], batches: Sequence[int], threads: Sequence[int],
           peak_gflops: float) -> dict[str, Any]:
    """The headline ratios (speed-ups are slower time / faster time; > 1 means the first named is faster)."""
    big, small = max(batches), min(batches)
    widths = sorted({r["width"] for r in rows})
    full = max(widths)
    out: dict[str, Any] = {"openvino_int8_over_fp32": {}, "t2_over_t4": {}, "ort_fp32_over_torch_b1": {},
                           "fraction_of_fp32_peak": {}, "int8_over_fp32_file": {}, "targets": TARGETS,
                           "full_width": full, "peak_gflops_per_thread": peak_gflops}
    for T in sorted({r["T"] for r in rows}):
        fp, i8 = (_find(rows, width=full, T=T, backend="openvino", precision=p) for p in ("fp32", "int8"))
        for t in threads:
            k = f"b{big}_t{t}"
            if fp and i8:
                out["openvino_int8_over_fp32"][f"T{T}_{k}"] = fp["p50_ms"][k] / i8["p50_ms"][k]
    for w in widths:
        for backend, precision in BACKENDS:
            r4, r2 = _find(rows, width=w, T=4, backend=backend, precision=precision), \
                _find(rows, width=w, T=2, backend=backend, precision=precision)
            if r4 and r2:
                for t in threads:
                    k = f"b{big}_t{t}"
                    out["t2_over_t4"][f"w{w:g}_{backend}_{precision}_{k}"] = r4["p50_ms"][k] / r2["p50_ms"][k]
        if w <= 0.25:
            for T in sorted({r["T"] for r in rows}):
                ort_, eager = _find(rows, width=w, T=T, backend="onnxruntime", precision="fp32"), \
                    _find(rows, width=w, T=T, backend="torch", precision="fp32")
                if ort_ and eager:
                    for t in threads:
                        k = f"b{small}_t{t}"
                        out["ort_fp32_over_torch_b1"][f"w{w:g}_T{T}_{k}"] = eager["p50_ms"][k] / ort_["p50_ms"][k]
    for p in preps:
        if p.width != full:
            continue
        out["int8_over_fp32_file"][f"T{p.T}"] = p.file_bytes["int8"] / p.file_bytes["fp32"]
        for backend in ("torch", "onnxruntime", "openvino"):
            r = _find(rows, width=full, T=p.T, backend=backend, precision="fp32")
            for t in threads if r else ():
                k = f"b{big}_t{t}"
                gflops = p.flops_per_image * r["images_per_s"][k] / 1e9
                out["fraction_of_fp32_peak"][f"T{p.T}_{backend}_{k}"] = gflops / (peak_gflops * t)
    return out


def table(rows: list[dict[str, Any]], batches: Sequence[int], threads: Sequence[int]) -> str:
    keys = [f"b{b}_t{t}" for t in threads for b in batches]
    big = max(batches)
    head = (f"{'width':>6} {'T':>2} {'backend':<12}{'prec':<5}" + "".join(f"{'ms ' + k:>13}" for k in keys)
            + "".join(f"{'img/s b' + str(big) + ' t' + str(t):>15}" for t in threads) + f"{'int8 MACs':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        share = r.get("int8_mac_share")
        lines.append(f"{str(Fraction(r['width']).limit_denominator(64)):>6} {r['T']:>2} {r['backend']:<12}"
                     f"{r['precision']:<5}" + "".join(f"{r['p50_ms'][k]:>13.2f}" for k in keys)
                     + "".join(f"{r['images_per_s'][f'b{big}_t{t}']:>15.1f}" for t in threads)
                     + (f"{share:>9.0%} " if share is not None else f"{'?':>10}"))
    return "\n".join(lines)


def ratio_lines(rat: dict[str, Any]) -> list[str]:
    def fmt(name: str, target: str, values: dict[str, float], unit: str = "x") -> str:
        if not values:
            return f"{name}: not measured (needs the rows it compares)"
        body = ", ".join(f"{k} {v:.2f}{unit}" for k, v in values.items())
        return f"{name} [{target}]: {body}"

    return [
        fmt(f"OpenVINO INT8 vs FP32 at width {rat['full_width']:g}", ">= 3.0x", rat["openvino_int8_over_fp32"]),
        fmt("T=2 vs T=4 per backend", ">= 1.8x", rat["t2_over_t4"]),
        fmt("ONNX Runtime FP32 vs torch eager at batch 1, width <= 1/4", ">= 3x", rat["ort_fp32_over_torch_b1"]),
        fmt(f"fraction of FP32 peak at width {rat['full_width']:g} ({rat['peak_gflops_per_thread']:g} GFLOP/s per "
            f"thread)", "information", {k: v * 100 for k, v in rat["fraction_of_fp32_peak"].items()}, "%"),
        fmt(f"INT8/FP32 ONNX file size at width {rat['full_width']:g}", "<= 0.3", rat["int8_over_fp32_file"], ""),
    ]


def parse_list(text: str, kind: Callable[[str], Any]) -> list[Any]:
    return [kind(v) for v in text.replace(" ", "").split(",") if v]


def width_value(text: str) -> float:
    return float(Fraction(text))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: width 1/4, T=2, few iterations")
    ap.add_argument("--widths", default=None, help="comma list, fractions allowed (default 1,1/4; --quick 1/4)")
    ap.add_argument("--T", dest="steps", default=None, help="comma list of time steps (default 4,2,1; --quick 2)")
    ap.add_argument("--threads", default="1,2", help="comma list of CPU thread counts (default 1,2)")
    ap.add_argument("--batches", default="1,32", help="comma list of batch sizes (default 1,32)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per point (default 10; --quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per point (default 2; --quick 1)")
    ap.add_argument("--images", type=int, default=32, help="real images for calibration and timing (default 32)")
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data", help="where cifar100_test.npz is")
    ap.add_argument("--peak-gflops", type=float, default=100.0, help="FP32 peak per thread (default 100, measured here)")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep the exported graphs here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="write every number to this JSON file")
    args = ap.parse_args(argv)

    widths = parse_list(args.widths or ("1/4" if args.quick else "1,1/4"), width_value)
    steps = parse_list(args.steps or ("2" if args.quick else "4,2,1"), int)
    threads, batches = parse_list(args.threads, int), parse_list(args.batches, int)
    iters = args.iters or (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)

    def say(msg: str) -> None:
        print(msg, flush=True)

    if OpenVinoRunner is None:
        say("NOTE: pipeline.runtime.OpenVinoRunner is absent: OpenVINO rows use this bench's local fallback runner")
    preps, rows = [], []
    with tempfile.TemporaryDirectory(prefix="deploy_speed-") as tmp:
        work = args.work_dir or Path(tmp)
        x, y, source = load_images(args.data_dir, args.images, steps[0])  # static images: T is applied in the net
        for T in steps:
            for w in widths:
                start = time.perf_counter()
                say(f"width {w:g} T={T}: building, quantising (NNCF) and exporting on {source} ...")
                prep = prepare(w, T, x, y, work)
                say(f"  exported in {time.perf_counter() - start:.0f} s: FP32 {prep.file_bytes['fp32'] / 1e6:.2f} MB, "
                    f"INT8 {prep.file_bytes['int8'] / 1e6:.2f} MB, {prep.flops_per_image / 1e9:.2f} GFLOP per image")
                for note in prep.export_notes:
                    say(f"  export note: {note}")
                preps.append(prep)
                rows += time_model(prep, x.numpy(), batches, threads, warmup, iters, say)
    rat = ratios(rows, preps, batches, threads, args.peak_gflops)
    say(f"\nResNet-19, CIFAR-100 head, 32x32x3; p50 ms per batch (warm-up {warmup}, {iters} timed calls); "
        f"ONNX Runtime: exact Q/DQ (fake-quant INT8); OpenVINO: f32 inference precision")
    say(table(rows, batches, threads))
    say("")
    for line in ratio_lines(rat):
        say(line)
    results = {"rows": rows, "ratios": rat, "settings": {"widths": widths, "T": steps, "threads": threads,
                                                          "batches": batches, "iters": iters, "warmup": warmup,
                                                          "quick": args.quick},
               "models": [{"width": p.width, "T": p.T, "gflops_per_image": p.flops_per_image / 1e9,
                           "file_bytes": p.file_bytes, "export_notes": p.export_notes, "compact": p.compact}
                          for p in preps]}
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))
        say(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
