"""Measure one artifact through its runner: accuracy, agreement, latency, throughput, ops, and
the precision the runtime really executed (``executed``: convolutions and matmuls on integer
kernels, read from the runtime's own executed graph by ``runner.executed_precision()``).

Why one path for every backend: the report compares rows against each other, so the torch
baseline, an ONNX Runtime session and a TensorRT engine must be fed the same test images in
the same order, timed by the same helper (``pipeline.runtime.base.benchmark``: warm-up
excluded, fixed threads) and scored by the same ``evaluate``. Firing rates and synaptic
operations are collected with hooks *during* the accuracy pass of torch rows (the whole
test split, no extra pass), and never while timing.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.models import record_firing_rates
from pipeline.report.energy import count_ops, summarize
from pipeline.report.inventory import RUNNER_OPTIONS, Artifact
from pipeline.runtime.backends import get_backend
from pipeline.runtime.base import benchmark
from pipeline.training.evaluate import evaluate


@dataclass
class Settings:
    """The validate config section, resolved for one run."""

    batch_sizes: tuple[int, ...]
    warmup: int
    iterations: int
    threads: int | None
    num_classes: int
    max_engine_batch: int | None = None  # TensorRT optimisation profile maximum
    min_seconds: float = 0.0  # each timing runs >= iterations calls and >= this long


def runner_predict(runner: Any, chunk: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A torch-in, torch-out ``predict`` over any runner (what ``evaluate`` consumes)."""
    def predict(x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().cpu().numpy().astype(np.float32, copy=False)
        out = runner.predict_all(arr, chunk) if chunk else runner.predict(arr)
        return torch.from_numpy(np.ascontiguousarray(out))
    return predict


def tile_batch(sample: np.ndarray, batch: int) -> np.ndarray:
    """``batch`` real test inputs (repeating ``sample`` when it is shorter): timing inputs."""
    reps = -(-batch // len(sample))
    return np.ascontiguousarray(np.concatenate([sample] * reps)[:batch], dtype=np.float32)


def measure_speed(runner: Any, sample: np.ndarray, settings: Settings, max_batch: int | None = None) -> dict[str, Any]:
    """Benchmarks at every batch size: latency at the smallest, throughput at the largest.

    Torch's global thread count is restored afterwards so that later accuracy passes are not
    pinned to the timing thread count.
    """
    sizes = sorted({min(b, max_batch) if max_batch else b for b in settings.batch_sizes})
    prev = torch.get_num_threads()
    try:
        runs = [benchmark(runner, batch=b, warmup=settings.warmup, iters=settings.iterations,
                          threads=settings.threads, x=tile_batch(sample, b), min_seconds=settings.min_seconds)
                for b in sizes]
    finally:
        torch.set_num_threads(prev)
    lat, thr = runs[0], runs[-1]
    return {
        "latency": {"batch": lat["batch"], "p50_ms": lat["p50_ms"], "p95_ms": lat["p95_ms"], "mean_ms": lat["mean_ms"]},
        "throughput": {"batch": thr["batch"], "images_per_s": thr["throughput"]},
        "benchmarks": runs,
    }


def _accuracy(runner: Any, module: Any, loader: DataLoader, chunk: int | None) -> tuple[dict, dict | None, list | None]:
    """evaluate() through the runner; for torch rows also firing rates and per-layer ops."""
    predict = runner_predict(runner, chunk)
    if module is None:
        return evaluate(predict, loader, "cpu", progress=False, keep_logits=True), None, None
    with record_firing_rates(module) as rates, count_ops(module) as counter:
        res = evaluate(predict, loader, "cpu", progress=False, keep_logits=True)
        layers = counter.layers()
    return res, dict(rates), layers


def measure(art: Artifact, loader: DataLoader, settings: Settings, log: Any = None) -> dict[str, Any]:
    """One report row (without delta/agreement/gate, which need the baseline): never raises.

    A skipped artifact gives a row with its status; a failure to load or run gives a row with
    ``status = "error: ..."`` so the report still shows it and the gate can fail it.
    """
    row: dict[str, Any] = {
        "artifact": art.name, "stage": art.stage, "backend": art.backend, "precision": art.precision, "T": art.T,
        "status": art.status, "size_mb": art.size_mb, "parent": art.parent, "gate_key": art.gate,
        "identity_key": art.identity, "identity_parent": art.identity_parent, "logits": None,
        "notes": list(art.notes), "ships": art.ships,
        "top1": None, "top5": None, "loss": None, "n": 0, "tied_top1": None, "labels": None, "latency": None, "throughput": None, "benchmarks": [],
        "firing_rates": None, "mean_firing_rate": None, "energy": None, "preds": None, "layers": None,
        "executed": None, "static_benchmarks": [],
    }
    if art.status != "ok" or art.opener is None:
        return row
    try:
        loaded = art.opener()
        if loaded.T is not None:
            row["T"] = art.T = loaded.T
        max_batch = settings.max_engine_batch if art.backend == "tensorrt" else None
        try:
            res, rates, layers = _accuracy(loaded.runner, loaded.module, loader, max_batch)
            row.update(top1=res["top1"], top5=res["top5"] if settings.num_classes > 10 else None,
                       loss=res["loss"], n=res["n"], preds=res["preds"], labels=res["labels"],
                       tied_top1=res["tied_top1"], logits=res["logits"].numpy())
            if rates is not None:
                row["firing_rates"] = rates
                row["mean_firing_rate"] = float(np.mean(list(rates.values()))) if rates else None
            if layers is not None:
                row["layers"] = [l.as_dict() for l in layers]
                row["energy"] = dict(summarize(layers), source=art.name)
            first = next(iter(loader))[0].numpy()
            row.update(measure_speed(loaded.runner, first, settings, max_batch))
            row["executed"] = executed(loaded.runner, art.name, log)
            for b in row["benchmarks"]:  # what each figure timed: this compiled model, its batch axis as compiled
                b["compiled"] = _compiled_shape(loaded.runner)
                b["executed"] = _counts(row["executed"])
            if art.backend in STATIC_BACKENDS and art.path is not None:
                row["static_benchmarks"] = static_speed(art, first, settings, log)
        finally:
            loaded.runner.close()
    except Exception as exc:  # one broken artifact must not hide the others
        row["status"] = f"error: {type(exc).__name__}: {exc}"
        if log is not None:
            log.error("[validate] %s failed: %s\n%s", art.name, exc, traceback.format_exc())
    return row


# backends whose executed kernels depend on the compiled shape: their graphs are also compiled and timed at
# each timed batch size as a static shape (the usual edge deployment), with that compile's own counts
STATIC_BACKENDS = ("openvino",)


def _compiled_shape(runner: Any) -> str:
    if getattr(runner, "name", "") == "torch":
        return "eager"
    shape = getattr(runner, "input_shape", ())
    return "dynamic batch" if shape and shape[0] is None else f"static batch {shape[0] if shape else '?'}"


def _counts(ex: dict[str, Any] | None) -> dict[str, Any] | None:
    keys = ("int8_convs", "convs", "int8_ops", "ops", "int8_mac_share")
    return {k: ex.get(k) for k in keys} if ex else None


def static_speed(art: Artifact, sample: np.ndarray, settings: Settings, log: Any = None) -> list[dict[str, Any]]:
    """Latency at each timed batch size of the graph compiled for that static batch, with that compile's
    executed-precision counts (a static compile can pick other kernels than the dynamic one)."""
    out = []
    for b in sorted(set(settings.batch_sizes)):
        try:
            runner = get_backend(art.backend).runner(art.path, precision=art.precision, static_batch=b,
                                                     **RUNNER_OPTIONS.get(art.backend, {}))
        except Exception as exc:  # the dynamic figures stand without it
            if log is not None:
                log.warning("[validate] %s: static batch %d did not compile: %s", art.name, b, exc)
            continue
        try:
            run = benchmark(runner, batch=b, warmup=settings.warmup, iters=settings.iterations,
                            threads=settings.threads, x=tile_batch(sample, b), min_seconds=settings.min_seconds)
            run.update(compiled=_compiled_shape(runner), executed=_counts(executed(runner, art.name, log)))
            out.append(run)
        finally:
            runner.close()
    return out


def executed(runner: Any, name: str, log: Any = None) -> dict[str, Any] | None:
    """``runner.executed_precision()``, or None (logged) when the runtime cannot say: the row's
    accuracy and speed stand without it."""
    try:
        return runner.executed_precision()
    except Exception as exc:
        if log is not None:
            log.warning("[validate] %s: executed precision not readable: %s: %s", name, type(exc).__name__, exc)
        return None


def inherit_energy(rows: Sequence[dict[str, Any]], sources: dict[str, str | None]) -> None:
    """Graph rows (ONNX, engines) take the ops of the torch module they were exported from."""
    by_name = {r["artifact"]: r for r in rows}
    for r in rows:
        src = sources.get(r["artifact"])
        if r["energy"] is None and src and by_name.get(src, {}).get("energy"):
            r["energy"] = dict(by_name[src]["energy"], source=src)


__all__ = ["Settings", "executed", "inherit_energy", "measure", "measure_speed", "runner_predict", "tile_batch"]
