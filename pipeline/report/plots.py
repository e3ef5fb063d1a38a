"""The report's PNG plots, drawn from the report.json document with matplotlib's Agg backend.

Why Agg: the stage runs headless (CI, a training box, a Jetson over ssh); no display needed.
Three plots: accuracy vs latency per artifact (what each compression buys and costs),
firing rate per layer (where the spikes, hence the synaptic operations, are) and accuracy
vs T (the time-step reduction curve). A fourth, the training curves, is drawn from the
fitting stages' ``history.csv`` files rather than the report (:func:`draw_training_curves`).
A plot with nothing to show is not written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline.runtime import specs  # noqa: E402
from pipeline.training.history import read_history  # noqa: E402

MARKERS = specs.column("marker")  # backend -> marker, from the backend table (pipeline/runtime/specs.py)
TRAINING_CURVES = "training_curves"  # the plot's name (validate's plot output names the file: {plot}.png)


def _legend() -> str:
    """The plot key ('o torch, s ONNX Runtime, ...'): every backend's marker and label."""
    return ", ".join(f"{s.marker} {s.label}" for s in specs.SPECS.values())


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
           title=f"{doc['run']}: accuracy vs latency ({_legend()})")
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


def accuracy_vs_steps(doc: Mapping[str, Any], path: Path) -> bool:
    """Top-1 of the streaming graphs' running-mean logits after 1..T steps (test split), with each adaptive
    row at its mean step count: what stopping early costs."""
    st = doc.get("steps") or {}
    curves = [c for c in st.get("curves") or [] if c.get("rows")]
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, c in enumerate(curves):
        ax.plot([r["steps"] for r in c["rows"]], [r["top1"] for r in c["rows"]], color=f"C{i % 10}",
                marker=MARKERS.get(c["backend"], "o"), label=f"{c['artifact']} [{c['backend']}]")
        for a in st.get("adaptive") or []:
            if a["artifact"] == f"{c['artifact']} (adaptive)" and a["backend"] == c["backend"]:
                ax.scatter(a["mean_steps"], a["top1"], marker="*", s=120, color=f"C{i % 10}",
                           label=f"adaptive, tau {a['tau'] if a['tau'] is None else round(a['tau'], 4)}")
    ax.set(xlabel="time steps (mean steps for adaptive rows)", ylabel="top-1 (%)",
           title=f"{doc['run']}: accuracy vs steps (streaming graphs)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def draw_training_curves(histories: Mapping[str, Path], out: Path) -> str | None:
    """Val top-1 and loss per epoch, one line per stage and T, from each fitting stage's history
    file (``histories``: stage name -> the file; absent files are skipped).

    Writes the PNG ``out`` and returns its file name; None when no stage has a history.
    Train loss is solid, validation loss dashed; a fit without a validation split has no val line.
    """
    fits: list[tuple[str, list[dict[str, Any]]]] = []
    for stage, path in histories.items():
        if not Path(path).is_file():
            continue
        rows = read_history(path)
        for T in dict.fromkeys(r["T"] for r in rows):  # in file order: reduce_t's largest T first
            fits.append((f"{stage} T={T}", [r for r in rows if r["T"] == T]))
    if not any(rows for _, rows in fits):
        return None
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, rows) in enumerate(fits):
        color = f"C{i % 10}"
        epochs = [r["epoch"] for r in rows]
        val = [(r["epoch"], r["val_top1"]) for r in rows if r["val_top1"] is not None]
        if val:
            acc.plot(*zip(*val), marker=".", color=color, label=label)
        loss.plot(epochs, [r["train_loss"] for r in rows], marker=".", color=color, label=f"{label} train")
        val_loss = [(r["epoch"], r["val_loss"]) for r in rows if r["val_loss"] is not None]
        if val_loss:
            loss.plot(*zip(*val_loss), linestyle="--", marker="x", color=color, label=f"{label} val")
    acc.set(xlabel="epoch (of each fit)", ylabel="validation top-1 (%)", title="validation top-1 per epoch")
    loss.set(xlabel="epoch (of each fit)", ylabel="loss (train: the fit's objective, distillation included)",
             title="loss per epoch (solid train, dashed val)")
    for ax in (acc, loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    _save(fig, Path(out))
    return Path(out).name


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {"accuracy_vs_latency": accuracy_vs_latency, "firing_rates": firing_rates, "accuracy_vs_T": accuracy_vs_T,
         "accuracy_vs_steps": accuracy_vs_steps}


def draw_all(doc: Mapping[str, Any], path_for: Callable[[str], Path]) -> list[str]:
    """Write every plot that has data to ``path_for(plot name)`` (the stage names the files); returns
    the file names written."""
    written = []
    for name, fn in PLOTS.items():
        path = Path(path_for(name))
        if fn(doc, path):
            written.append(path.name)
    return written


__all__ = ["PLOTS", "TRAINING_CURVES", "accuracy_vs_T", "accuracy_vs_latency", "accuracy_vs_steps", "draw_all", "draw_training_curves",
           "firing_rates"]
