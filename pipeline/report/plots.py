"""The report's PNG plots, drawn from the report.json document with matplotlib's Agg backend.

Why Agg: the stage runs headless (CI, a training box, a Jetson over ssh); no display needed.
Three plots: accuracy vs latency per artifact (what each compression buys and costs),
firing rate per layer (where the spikes, hence the synaptic operations, are) and accuracy
vs T (the time-step reduction curve). A plot with nothing to show is not written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = {"torch": "o", "onnxruntime": "s", "tensorrt": "^"}


def accuracy_vs_latency(doc: Mapping[str, Any], path: Path) -> bool:
    rows = [r for r in doc["rows"] if r.get("top1") is not None and r.get("latency")]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(sorted(rows, key=lambda r: r["latency"]["p50_ms"])):
        ax.scatter(r["latency"]["p50_ms"], r["top1"], marker=MARKERS.get(r["backend"], "o"), s=50)
        # rows often share an accuracy: stagger the labels so that they stay readable
        ax.annotate(f"{r['artifact']} [{r['precision']}, T={r['T']}]", (r["latency"]["p50_ms"], r["top1"]),
                    fontsize=7, xytext=(4, 4 + 9 * (i % 4)), textcoords="offset points")
    batch = rows[0]["latency"]["batch"]
    ax.set_xscale("log")  # latencies span orders of magnitude (eager fake-quant vs ONNX Runtime)
    ax.set(xlabel=f"p50 latency at batch {batch} (ms, log scale)", ylabel="top-1 (%)",
           title=f"{doc['run']}: accuracy vs latency (o torch, s ONNX Runtime, ^ TensorRT)")
    ax.margins(x=0.15, y=0.25)  # room for the labels
    ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def firing_rates(doc: Mapping[str, Any], path: Path) -> bool:
    rows = [r for r in doc["rows"] if r.get("firing_rates")]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(max(7, 0.35 * max(len(r["firing_rates"]) for r in rows)), 4.5))
    names: list[str] = []
    for r in rows:
        layers = list(r["firing_rates"])
        if len(layers) > len(names):
            names = layers
        ax.plot(range(len(layers)), list(r["firing_rates"].values()), marker=".", label=f"{r['artifact']} (T={r['T']})")
    ax.set_xticks(range(len(names)), [n.replace(".lif", "") for n in names], rotation=75, fontsize=7)
    ax.set(ylabel="firing rate (spikes per neuron per step)", title=f"{doc['run']}: firing rate per layer")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def accuracy_vs_T(doc: Mapping[str, Any], path: Path) -> bool:
    float_rows = [r for r in doc["rows"] if r["stage"] in ("train", "reduce_t") and r.get("top1") is not None]
    if not float_rows:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = sorted((r["T"], r["top1"]) for r in float_rows)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="float (train, reduce_t)")
    other = [r for r in doc["rows"] if r["stage"] not in ("train", "reduce_t") and r.get("top1") is not None
             and r.get("T") is not None]
    for k, r in enumerate(other):  # small horizontal offsets: deployed rows usually share one T
        ax.scatter(r["T"] + 0.04 * (k - (len(other) - 1) / 2), r["top1"], marker=MARKERS.get(r["backend"], "x"),
                   s=30, label=f"{r['artifact']} ({r['precision']})")
    ax.set(xlabel="time steps T", ylabel="top-1 (%)", title=f"{doc['run']}: accuracy vs T")
    ax.set_xticks(sorted({p[0] for p in pts} | {r["T"] for r in other}))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {"accuracy_vs_latency.png": accuracy_vs_latency, "firing_rates.png": firing_rates,
         "accuracy_vs_T.png": accuracy_vs_T}


def draw_all(doc: Mapping[str, Any], folder: Path) -> list[str]:
    """Write every plot that has data into ``folder``; returns the file names written."""
    return [name for name, fn in PLOTS.items() if fn(doc, Path(folder) / name)]


__all__ = ["PLOTS", "accuracy_vs_T", "accuracy_vs_latency", "draw_all", "firing_rates"]
