"""Accuracy at every step count, the early-exit threshold tau, and what ships: pure numpy on logits.

Why from running-mean logits: the streaming graph's prediction after t frames is the mean of its
first t per-step logits, so one pass over a split (``StepRunner.running_means``: ``[T, N, K]``)
gives the accuracy at every step count and every exit threshold without running the graph again.

- ``accuracy_vs_steps``: top-1 after 1..T steps, each paired against the full-T row on the same
  images (:func:`pipeline.report.stats.paired_delta`: Tango's interval and the exact McNemar test).
- ``exit_at``: the step each sample stops at for a threshold tau (first t with confidence >= tau,
  T at the latest): the same rule as ``StepRunner.run_early_exit``.
- ``choose_tau``: on the VALIDATION split only: among the candidate thresholds (every observed
  confidence, plus "never exit"), the one with the smallest mean step count whose top-1 stays
  within ``max_drop`` points of the full-T top-1; ties go to the larger tau (the more careful exit).
  The test split never chooses anything; it only scores the chosen tau.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.report.stats import paired_delta
from pipeline.runtime.stream import DEFAULT_CRITERION, confidence

EPS = 1e-9
NEVER = math.inf  # the tau that never exits early: the full-T row


def _top1(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((pred == labels).mean() * 100.0)


def accuracy_vs_steps(running: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
    """One entry per step count t = 1..T: ``{"steps", "top1", "stats"}`` (stats: paired vs step T; None at T)."""
    running, labels = np.asarray(running), np.asarray(labels)
    if running.ndim != 3 or running.shape[1] != len(labels) or len(labels) == 0:
        raise ValueError(f"need running-mean logits [T, N, K] for N labelled images, got {running.shape} for "
                         f"{len(labels)} labels")
    correct = running.argmax(-1) == labels[None, :]
    full = correct[-1]
    T = running.shape[0]
    return [{"steps": t + 1, "top1": float(correct[t].mean() * 100.0),
             "stats": None if t + 1 == T else paired_delta(correct[t], full).as_dict()} for t in range(T)]


def exit_at(running: np.ndarray, tau: float, criterion: str = DEFAULT_CRITERION) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: the steps used (1..T) and the prediction at that step, for threshold ``tau``."""
    conf = confidence(running, criterion)  # [T, N]
    hit = conf >= tau
    hit[-1] = True  # every sample stops at T at the latest
    first = hit.argmax(0)  # first step index reaching tau
    preds = running.argmax(-1)[first, np.arange(running.shape[1])]
    return first + 1, preds


def choose_tau(running: np.ndarray, labels: np.ndarray, max_drop: float,
               criterion: str = DEFAULT_CRITERION) -> dict[str, Any]:
    """The validation split's threshold: smallest mean steps with top-1 >= full-T top-1 - ``max_drop``."""
    running, labels = np.asarray(running), np.asarray(labels)
    full = _top1(running[-1].argmax(-1), labels)
    conf = confidence(running[:-1], criterion)  # the last step always exits: its confidence never matters
    candidates = np.unique(conf)[::-1]  # larger tau first: a tie in mean steps keeps the earlier (larger) one
    best: dict[str, Any] = {"tau": NEVER, "mean_steps": float(running.shape[0]), "top1": full}
    for tau in candidates:
        steps, preds = exit_at(running, float(tau), criterion)
        top1, mean_steps = _top1(preds, labels), float(steps.mean())
        if full - top1 <= max_drop + EPS and mean_steps < best["mean_steps"] - EPS:
            best = {"tau": float(tau), "mean_steps": mean_steps, "top1": top1}
    best["tau"] = None if math.isinf(best["tau"]) else best["tau"]  # None: never exit early (JSON has no inf)
    return {**best, "criterion": criterion, "full_top1": full, "max_drop": float(max_drop), "n": int(len(labels)),
            "T": int(running.shape[0]), "candidates": int(len(candidates)) + 1, "split": "validation"}


def adaptive_scores(running: np.ndarray, labels: np.ndarray, tau: float | None,
                    criterion: str = DEFAULT_CRITERION) -> dict[str, Any]:
    """Test-split figures of threshold ``tau``: mean/max steps, top-1 and its paired delta vs the full-T row."""
    running, labels = np.asarray(running), np.asarray(labels)
    steps, preds = exit_at(running, NEVER if tau is None else tau, criterion)
    correct, full = preds == labels, running[-1].argmax(-1) == labels
    return {"tau": tau, "criterion": criterion, "mean_steps": float(steps.mean()), "max_steps": int(steps.max()),
            "top1": float(correct.mean() * 100.0), "full_top1": float(full.mean() * 100.0),
            "stats": paired_delta(correct, full).as_dict(), "n": int(len(labels)),
            "preds": preds, "correct": correct, "full_correct": full}


def gate(top1: float, reference_top1: float, max_drop: float, name: str, reference: str,
         stats: Mapping[str, Any] | None) -> dict[str, Any]:
    """A CHECK (report.json's gate format) of ``top1`` against ``reference_top1``."""
    drop = float(reference_top1 - top1)
    return {"name": name, "max_drop": float(max_drop), "reference": reference, "reference_top1": float(reference_top1),
            "drop": drop, "passed": bool(drop <= max_drop + EPS), "stats": dict(stats) if stats else None}


def _passes(row: Mapping[str, Any]) -> bool:
    return row.get("top1") is not None and all((row.get(g) or {}).get("passed") is not False
                                               for g in ("gate", "total_gate", "agreement_gate"))


def choose_ships(rows: Sequence[Mapping[str, Any]], adaptive: Sequence[Mapping[str, Any]],
                 model_T: int | None) -> dict[str, dict[str, Any]]:
    """Per runtime: the fastest row (p50 ms at batch 1) that passes its gates among the deployable fixed-T and
    reduced-T rows and the adaptive rows."""
    cands: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        lat = r.get("latency") or {}
        if r.get("ships") and _passes(r) and lat.get("p50_ms") is not None and lat.get("batch") == 1:
            kind = "reduced-T" if model_T is not None and r.get("T") is not None and r["T"] < model_T else "fixed-T"
            cands.setdefault(r["backend"], []).append(
                {"artifact": r["artifact"], "kind": kind, "precision": r["precision"], "steps": r["T"],
                 "top1": r["top1"], "p50_ms": lat["p50_ms"]})
    for a in adaptive:
        if _passes(a) and a.get("p50_ms") is not None:
            cands.setdefault(a["backend"], []).append(
                {"artifact": a["artifact"], "kind": "adaptive" if a["tau"] is not None else "streaming (all T)",
                 "precision": a["precision"], "steps": a["mean_steps"],
                 "top1": a["top1"], "p50_ms": a["p50_ms"], "tau": a["tau"], "criterion": a["criterion"]})
    return {b: {**min(c, key=lambda x: x["p50_ms"]), "candidates": len(c)} for b, c in cands.items()}


__all__ = ["NEVER", "accuracy_vs_steps", "adaptive_scores", "choose_ships", "choose_tau", "exit_at", "gate"]
