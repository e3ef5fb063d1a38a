"""Run the shipped streaming graphs for the report: accuracy vs steps, tau on validation, adaptive rows.

Why apart from :mod:`.measure`: a step graph is not a whole-clip model (it needs the stateful loop of
``pipeline.runtime.stream.StepRunner``), so it gets its own pass: one run over the validation split
(chooses tau) and one over the test split (scores every step count and the chosen tau) per graph and
runtime, and a batch-1 timing of the real early-exit loop, per sample.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from pipeline.console import LOG_ONLY
from pipeline.report.inventory import RUNNER_OPTIONS
from pipeline.report.steps import NEVER, accuracy_vs_steps, adaptive_scores, choose_tau, gate
from pipeline.runtime.backends import get_backend
from pipeline.runtime.stream import StepRunner, open_step_graph

GRAPHS = (("step_fp32", "fp32"), ("step_int8", "int8"))  # export roles of the step graphs, in report order
RUNTIMES = ("onnxruntime", "openvino")


def running_over(stepper: StepRunner, loader: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Running-mean logits ``[T, N, K]`` and labels ``[N]`` of a whole split (one pass of the step graph)."""
    parts, labels = [], []
    for x, y in loader:
        parts.append(stepper.running_means(np.asarray(x, np.float32)))
        labels.append(np.asarray(y))
    return np.concatenate(parts, axis=1), np.concatenate(labels)


def exit_latency(stepper: StepRunner, samples: np.ndarray, tau: float | None, criterion: str,
                 warmup: int = 2) -> dict[str, Any]:
    """Per-sample wall time (ms) of the real loop at batch 1 with the exit on (``tau`` None: all T steps)."""
    t_exit = NEVER if tau is None else tau
    for i in range(min(warmup, len(samples))):
        stepper.run_early_exit(samples[i:i + 1], t_exit, criterion)
    times, steps = [], []
    for i in range(len(samples)):
        t0 = time.perf_counter()
        _, s = stepper.run_early_exit(samples[i:i + 1], t_exit, criterion)
        times.append((time.perf_counter() - t0) * 1e3)
        steps.append(int(s[0]))
    ms = np.asarray(times)
    return {"batch": 1, "samples": len(samples), "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "mean_ms": float(ms.mean()), "mean_steps": float(np.mean(steps))}


def streaming_section(graphs: Mapping[str, Path], val_loader: Callable[[int], Any], test_loader: Callable[[int], Any],
                      *, max_drop: float, total_drop: float, baseline_top1: float | None, baseline: str,
                      criterion: str, latency_samples: int, threads: int | None, log: Any = None
                      ) -> tuple[dict[str, Any], list[str]]:
    """The report's ``steps`` section and its failed-gate messages.

    ``graphs``: export role -> step graph path (absent roles are skipped); the loaders take the graph's T.
    Each (graph, runtime): accuracy vs steps on test, tau chosen on val, the adaptive row on test."""
    curves, adaptive, failed, choices = [], [], [], []
    for role, precision in GRAPHS:
        path = graphs.get(role)
        if path is None or not Path(path).is_file():
            continue
        for backend in RUNTIMES:
            name = f"export/{Path(path).name}"
            ok, reason = get_backend(backend).is_available()
            if not ok:
                curves.append({"artifact": name, "backend": backend, "precision": precision,
                               "status": f"skipped: {reason}", "rows": []})
                continue
            try:
                runner = get_backend(backend).runner(Path(path), precision=precision, **RUNNER_OPTIONS.get(backend, {}))
                stepper = open_step_graph(path, runner)
                if threads:
                    runner.set_threads(threads)
                val_run, val_y = running_over(stepper, val_loader(stepper.T))
                test_run, test_y = running_over(stepper, test_loader(stepper.T))
            except Exception as exc:  # a runtime that cannot compile the graph: a row that says so, not a crash
                curves.append({"artifact": name, "backend": backend, "precision": precision,
                               "status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                               "rows": []})
                continue
            choice = choose_tau(val_run, val_y, max_drop, criterion)
            choices.append({"artifact": name, "backend": backend, "precision": precision, **choice})
            score = adaptive_scores(test_run, test_y, choice["tau"], criterion)
            curves.append({"artifact": name, "backend": backend, "precision": precision, "status": "ok", "T": stepper.T,
                           "n": int(len(test_y)), "rows": accuracy_vs_steps(test_run, test_y)})
            xs = _latency_inputs(test_loader(stepper.T), latency_samples)
            lat_exit = exit_latency(stepper, xs, choice["tau"], criterion)
            lat_full = exit_latency(stepper, xs, None, criterion)
            full_ref = f"{name} ({backend}, all {stepper.T} steps)"
            row = {"artifact": f"{name} (adaptive)", "backend": backend, "precision": precision, "status": "ok",
                   "T": stepper.T, "tau": choice["tau"], "criterion": criterion, "n": score["n"],
                   "mean_steps": score["mean_steps"], "max_steps": score["max_steps"], "top1": score["top1"],
                   "full_top1": score["full_top1"], "stats": score["stats"],
                   "p50_ms": lat_exit["p50_ms"], "latency": lat_exit, "full_latency": lat_full,
                   "gate": gate(score["top1"], score["full_top1"], max_drop, "reduce_t", full_ref, score["stats"]),
                   "total_gate": (gate(score["top1"], baseline_top1, total_drop, "total", baseline, None)
                                  if baseline_top1 is not None else None)}
            adaptive.append(row)
            for key in ("gate", "total_gate"):
                g = row[key]
                if g is not None and not g["passed"]:
                    failed.append(f"{row['artifact']} ({backend}): top-1 {row['top1']:.2f}% with the exit at tau="
                                  f"{choice['tau']} is {g['drop']:.2f} points below {g['reference']} "
                                  f"({g['reference_top1']:.2f}%), more than validate.gates.{g['name']}={g['max_drop']:g}")
            if log is not None:
                log.info("[validate] %s (%s): tau %s (%s, val) -> %.2f mean steps of %d, top-1 %.2f%% vs %.2f%% at T; "
                         "p50 %.3f ms vs %.3f ms at T", name, backend, choice["tau"], criterion, row["mean_steps"],
                         stepper.T, row["top1"], row["full_top1"], lat_exit["p50_ms"], lat_full["p50_ms"],
                         extra=LOG_ONLY)
            runner.close()
    return {"criterion": criterion, "curves": curves, "tau": choices, "adaptive": adaptive}, failed


def _latency_inputs(loader: Iterable[Any], n: int) -> np.ndarray:
    """The first ``n`` test inputs (real images: the exit depends on what the sample shows)."""
    got, total = [], 0
    for x, _ in loader:
        got.append(np.asarray(x, np.float32))
        total += len(got[-1])
        if total >= n:
            break
    return np.concatenate(got)[:n]


__all__ = ["GRAPHS", "RUNTIMES", "exit_latency", "running_over", "streaming_section"]
