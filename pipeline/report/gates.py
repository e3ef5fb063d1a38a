"""Deltas, agreement, their uncertainty and the pass/fail gates of every report row.

Why separate from measuring: the gate logic is the contract the run is judged by, so it is
kept small and pure (rows in, rows out) and tested on its own.

- ``delta``: top-1 minus the float baseline's top-1, in points (negative = worse), with
  ``delta_stats``: a 95% interval and an exact McNemar p-value from the paired predictions on
  the same test images (:mod:`.stats`); a delta whose p >= 0.05 is noise, not a gain or a loss.
- ``agreement``: share of test images where the row predicts the baseline's class.
- ``gate`` (the cost of one step): ``validate.gates[<key>]`` is the largest top-1 drop (points)
  a row may show against its parent artifact (``validate.gate_reference: parent``, default) or
  against the float baseline (``baseline``).
- ``total_gate`` (the cumulative cost): every row that can ship (ONNX graphs, engines) is also
  held to ``validate.gates.total`` points against the float baseline, so the per-step
  tolerances cannot add up to an unbounded loss while every step looks green.

- ``agreement_gate`` (identity rows only: an unrolled module, a graph in its runtime, a runtime
  running an INT8 file against the file's exact Q/DQ numbers): these rows must compute their
  parent's function, so a net top-1 drop says too little (5 images better and 5 worse nets to 0).
  ``validate.changed[<key>]`` is the largest share (percent of the test images, rounded up to
  whole images) whose prediction may differ from the parent's: the rounding flips a correct
  graph shows; every changed image is listed with the parent's top-2 logit margin on it, and the
  largest logit difference is recorded (and gated where ``validate.max_logit_diff[<key>]`` is set).

A check passes when ``reference_top1 - top1 <= max_drop``; a gated row that failed to run fails
its gates; a skipped row (e.g. no TensorRT here) has no result and does not fail the run. A
failed check says whether its drop is statistically significant on these images.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.report.stats import PairedDelta, paired_delta
from pipeline.training.evaluate import agreement

EPS = 1e-9  # float noise in percentages must not fail a 0.0 gate
TOTAL = "total"  # validate.gates key of the cumulative check


def _correct(row: Mapping[str, Any]) -> np.ndarray | None:
    preds, labels = row.get("preds"), row.get("labels")
    if preds is None or labels is None or len(preds) != len(labels) or len(preds) == 0:
        return None
    return np.asarray(preds) == np.asarray(labels)


def paired(row: Mapping[str, Any], ref: Mapping[str, Any] | None) -> PairedDelta | None:
    """Paired delta of ``row`` vs ``ref`` when both were scored on the same images, else None."""
    if ref is None:
        return None
    a, r = _correct(row), _correct(ref)
    if a is None or r is None or a.shape != r.shape or not np.array_equal(np.asarray(row["labels"]),
                                                                         np.asarray(ref["labels"])):
        return None
    return paired_delta(a, r)


def _check(row: dict[str, Any], ref_name: str, ref: Mapping[str, Any] | None, key: str,
           max_drop: float) -> dict[str, Any]:
    """One gate check of ``row`` against ``ref``: drop, pass/fail and the drop's significance."""
    check: dict[str, Any] = {"name": key, "max_drop": max_drop, "reference": ref_name,
                             "reference_top1": ref["top1"] if ref else None, "drop": None, "passed": None,
                             "stats": None}
    if row["status"].startswith("skipped"):
        return check
    if row["top1"] is None or check["reference_top1"] is None:
        check["passed"] = False
        return check
    check["drop"] = float(check["reference_top1"] - row["top1"])
    check["passed"] = bool(check["drop"] <= max_drop + EPS)
    stats = paired(row, ref)
    check["stats"] = stats.as_dict() if stats else None
    return check


def allowed_changes(share: float, n: int) -> int:
    """Changed predictions a ``share`` (percent) allows on ``n`` images: rounded up, 0 only for a 0 share."""
    return int(math.ceil(share * n / 100.0 - 1e-9)) if share > 0 else 0


def _margin(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0] if logits.shape[1] > 1 else np.full(len(logits), np.inf)


def _agreement_check(row: dict[str, Any], ref_name: str, ref: Mapping[str, Any] | None, key: str, max_share: float,
                     max_logit_diff: float | None, listed: int = 20) -> dict[str, Any]:
    """The identity check of ``row`` against ``ref``: changed predictions (count, listed) and logit difference."""
    check: dict[str, Any] = {"name": key, "reference": ref_name, "max_changed_share": max_share, "n": None,
                             "max_changed": None, "changed": None, "changed_images": [], "max_logit_diff": None,
                             "max_allowed_logit_diff": max_logit_diff, "passed": None}
    if row["status"].startswith("skipped"):
        return check
    preds, rpreds = row.get("preds"), (ref or {}).get("preds")
    if preds is None or rpreds is None or len(preds) != len(rpreds) or len(preds) == 0:
        check["passed"] = False
        return check
    preds, rpreds = np.asarray(preds), np.asarray(rpreds)
    n = len(preds)
    changed = np.flatnonzero(preds != rpreds)
    check.update(n=n, changed=int(changed.size), max_changed=allowed_changes(max_share, n))
    logits, rlogits = row.get("logits"), (ref or {}).get("logits")
    margins = None
    if logits is not None and rlogits is not None and np.shape(logits) == np.shape(rlogits):
        logits, rlogits = np.asarray(logits, np.float64), np.asarray(rlogits, np.float64)
        check["max_logit_diff"] = float(np.abs(logits - rlogits).max(initial=0.0))
        margins = _margin(rlogits)
    check["changed_images"] = [
        {"index": int(i), "reference_pred": int(rpreds[i]), "pred": int(preds[i]),
         "reference_margin": None if margins is None else float(margins[i])} for i in changed[:listed]]
    ok = check["changed"] <= check["max_changed"]
    if max_logit_diff is not None:
        ok = ok and check["max_logit_diff"] is not None and check["max_logit_diff"] <= max_logit_diff
    check["passed"] = bool(ok)
    return check


def _agreement_failure(row: Mapping[str, Any], check: Mapping[str, Any]) -> str:
    key, ref_name = check["name"], check["reference"]
    if check["changed"] is None:
        return f"{row['artifact']}: agreement gate {key} could not be checked against {ref_name} ({row['status']})"
    msg = (f"{row['artifact']}: {check['changed']} of {check['n']} test predictions differ from {ref_name} "
           f"(validate.changed.{key}={check['max_changed_share']:g}% allows {check['max_changed']})")
    if check["max_allowed_logit_diff"] is not None:
        msg += (f"; logits max |diff| {check['max_logit_diff'] if check['max_logit_diff'] is not None else '?'} "
                f"(validate.max_logit_diff.{key}={check['max_allowed_logit_diff']:g})")
    return msg + ": it should compute its reference's function"


def _failure(row: Mapping[str, Any], check: Mapping[str, Any]) -> str:
    key, ref_name = check["name"], check["reference"]
    if check["drop"] is None:
        return f"{row['artifact']}: gate {key} could not be checked ({row['status']})"
    drop, max_drop = check["drop"], check["max_drop"]
    if drop >= 0:
        where = f"{drop:.2f} points below {ref_name} ({check['reference_top1']:.2f}%)"
    else:
        where = f"{-drop:.2f} points above {ref_name} ({check['reference_top1']:.2f}%)"
    allowed = (f"more than validate.gates.{key}={max_drop:g} allows" if max_drop >= 0 else
               f"less than the gain of {-max_drop:g} points that validate.gates.{key}={max_drop:g} demands")
    msg = f"{row['artifact']}: top-1 {row['top1']:.2f}% is {where}, {allowed}"
    st = check.get("stats")
    if st:
        lo, hi = st["ci95"]
        kind = "a significant drop" if st["significant"] else "within noise on these images, but over the gate"
        msg += f" ({kind}: 95% CI [{lo:+.2f}, {hi:+.2f}], McNemar p={st['p_value']:.3g}, n={st['n']})"
    return msg


def apply_gates(rows: Sequence[dict[str, Any]], gates: Mapping[str, float], baseline: str,
                reference: str = "parent", changed: Mapping[str, float] | None = None,
                max_logit_diff: Mapping[str, float] | None = None) -> list[str]:
    """Fill ``delta``, ``delta_stats``, ``agreement``, ``gate``, ``agreement_gate`` and ``total_gate`` on
    every row; returns the failed-check messages.

    ``changed``: ``validate.changed`` (identity rows' max share of changed predictions, percent);
    ``max_logit_diff``: ``validate.max_logit_diff`` (optional per identity key)."""
    by_name = {r["artifact"]: r for r in rows}
    base = by_name.get(baseline)
    base_top1 = base["top1"] if base else None
    failed: list[str] = []
    for r in rows:
        ok = r["top1"] is not None
        r["delta"] = r["top1"] - base_top1 if ok and base_top1 is not None else None
        stats = paired(r, base) if ok and r is not base else None
        r["delta_stats"] = stats.as_dict() if stats else None
        r["agreement"] = (agreement(r["preds"], base["preds"]) if ok and base is not None and base["preds"] is not None
                          and len(r["preds"]) == len(base["preds"]) else None)
        r["gate"] = r["total_gate"] = r["agreement_gate"] = None
        key = r.get("gate_key")
        if key is None or r["artifact"] == baseline:
            continue
        ref_name = baseline if reference == "baseline" or not r.get("parent") else r["parent"]
        ref = by_name.get(ref_name)
        if ref is None or ref["top1"] is None:  # parent absent or broken: fall back to the baseline
            ref_name, ref = baseline, base
        r["gate"] = _check(r, ref_name, ref, key, float(gates[key])) if key in gates else None
        identity = r.get("identity_key")
        if identity is not None and changed is not None:
            ident_name = r.get("identity_parent") or ref_name
            r["agreement_gate"] = _agreement_check(r, ident_name, by_name.get(ident_name), identity,
                                                   float(changed[identity]),
                                                   (max_logit_diff or {}).get(identity))
            if r["agreement_gate"]["passed"] is False:
                failed.append(_agreement_failure(r, r["agreement_gate"]))
        if r.get("ships"):
            r["total_gate"] = _check(r, baseline, base, TOTAL, float(gates[TOTAL]))
        for check in (r["gate"], r["total_gate"]):
            if check is not None and check["passed"] is False:
                failed.append(_failure(r, check))
    return failed


__all__ = ["TOTAL", "allowed_changes", "apply_gates", "paired"]
