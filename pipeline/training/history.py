"""``history.csv``, one row per epoch of every fit, beside the stage's ``metrics.json``.

Why a csv beside TensorBoard's scalars (pipeline/training/tb.py): TensorBoard is what one opens
while a long run trains; ``history.csv`` is what a report (the training-curves plot), a notebook
or ``pandas.read_csv`` reads afterwards without TensorBoard. Stdlib only. Rows come from ``fit``'s history (``FitState.history``), which a resumed fit restores from
``last.pt``, so an interrupted run still writes every epoch.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable, Mapping


# csv column -> key of a fit history row ("T" is added per fit; "seconds" is the epoch's wall time)
COLUMNS = {"epoch": "epoch", "T": "T", "train_loss": "train_loss", "train_top1": "train_top1",
           "val_top1": "val_top1", "val_loss": "val_loss", "lr": "lr", "seconds": "epoch_s"}


def history_rows(T: int, history: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One csv row per epoch of one fit at ``T`` time steps (a missing value, e.g. no val split: empty)."""
    rows = []
    for h in history:
        src = {**h, "T": T}
        rows.append({col: _cell(src.get(key)) for col, key in COLUMNS.items()})
    return rows


def write_history(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``history.csv`` (header always, so an empty fit still has a readable file)."""
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(rows)
    return path


def read_history(path: Path) -> list[dict[str, float | int | None]]:
    """The rows of a ``history.csv`` with numbers parsed (``epoch`` and ``T`` as int, empty as None)."""
    out = []
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            out.append({k: (None if v in ("", None) else int(v) if k in ("epoch", "T") else float(v))
                        for k, v in row.items()})
    return out


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return round(value, 6) if isinstance(value, float) else value


__all__ = ["COLUMNS", "history_rows", "read_history", "write_history"]
