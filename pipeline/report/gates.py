"""Deltas, agreement and the pass/fail gate of every report row.

Why separate from measuring: the gate logic is the contract the run is judged by, so it is
kept small and pure (rows in, rows out) and tested on its own.

- ``delta``: top-1 minus the float baseline's top-1, in points (negative = worse).
- ``agreement``: share of test images where the row predicts the baseline's class.
- gate: ``validate.gates[<key>]`` is the largest top-1 drop (points) a row may show against its
  reference: its parent artifact (``validate.gate_reference: parent``, default: the cost of
  this one step) or the float baseline (``baseline``: the cumulative cost). A row passes when
  ``reference_top1 - top1 <= max_drop``; a gated row that failed to run fails its gate; a
  skipped row (e.g. no TensorRT here) has no gate result and does not fail the run.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

EPS = 1e-9  # float noise in percentages must not fail a 0.0 gate


def _agreement(preds: Any, ref: Any) -> float | None:
    from pipeline.training.evaluate import agreement

    if preds is None or ref is None or len(preds) != len(ref):
        return None
    return agreement(preds, ref)


def apply_gates(rows: Sequence[dict[str, Any]], gates: Mapping[str, float], baseline: str,
                reference: str = "parent") -> list[str]:
    """Fill ``delta``, ``agreement`` and ``gate`` on every row; returns the failed-gate messages."""
    by_name = {r["artifact"]: r for r in rows}
    base = by_name.get(baseline)
    base_top1 = base["top1"] if base else None
    base_preds = base["preds"] if base else None
    failed: list[str] = []
    for r in rows:
        ok = r["top1"] is not None
        r["delta"] = r["top1"] - base_top1 if ok and base_top1 is not None else None
        r["agreement"] = _agreement(r["preds"], base_preds) if ok else None
        key = r.get("gate_key")
        if key is None or r["artifact"] == baseline:
            r["gate"] = None
            continue
        ref_name = baseline if reference == "baseline" or not r.get("parent") else r["parent"]
        ref = by_name.get(ref_name)
        if ref is None or ref["top1"] is None:  # parent absent or broken: fall back to the baseline
            ref_name, ref = baseline, base
        max_drop = float(gates[key])
        gate: dict[str, Any] = {"name": key, "max_drop": max_drop, "reference": ref_name,
                                "reference_top1": ref["top1"] if ref else None, "drop": None, "passed": None}
        if r["status"].startswith("skipped"):
            r["gate"] = gate
            continue
        if not ok or gate["reference_top1"] is None:
            gate["passed"] = False
            failed.append(f"{r['artifact']}: gate {key} could not be checked ({r['status']})")
        else:
            gate["drop"] = gate["reference_top1"] - r["top1"]
            gate["passed"] = gate["drop"] <= max_drop + EPS
            if not gate["passed"]:
                failed.append(f"{r['artifact']}: top-1 {r['top1']:.2f}% is {gate['drop']:.2f} points below "
                              f"{ref_name} ({gate['reference_top1']:.2f}%), more than validate.gates.{key}="
                              f"{max_drop:g}")
        r["gate"] = gate
    return failed


__all__ = ["apply_gates"]
