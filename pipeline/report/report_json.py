"""report.json: the machine-readable report, with a versioned schema.

Why versioned: dashboards and CI compare reports across runs and releases; a reader checks
``schema_version`` and refuses what it does not know instead of misreading a renamed field.
Bump ``SCHEMA_VERSION`` on any change that removes or renames a field or changes its unit;
adding an optional field keeps the version.

Schema version 5 (units in the names or stated here; 2 added the paired statistics, the
total gate, tied top-1 counts and ``ships``; 3 added the ``openvino`` backend and the required
``executed`` field, which a version-2 reader would reject or misread; 4: ``ci95`` is Tango's
unconditional interval (3: conditional on the discordant count, too narrow), and the required
``agreement_gate`` of identity rows; 5: the required ``steps`` section (accuracy vs steps of the
streaming graphs, tau chosen on validation, adaptive rows) and ``ships`` (what ships, per runtime))::

    {
      "schema_version": 5,
      "run": str, "dataset": str, "num_classes": int, "test_images": int,
      "created": ISO-8601 str, "pipeline_version": str, "device": str,
      "settings": {"batch_sizes": [int], "warmup": int, "iterations": int, "threads": int|null,
                   "gate_reference": "parent"|"baseline", "gates": {key: float points},
                   "changed": {key: float percent}, "max_logit_diff": {key: float}},
      "baseline": {"artifact": str, "top1": float|null},
      "energy_model": {"e_mac_pj": float, "e_ac_pj": float, "e_mul_pj": float, "convention": str,
                       "excluded": [str]},                 # what the estimate leaves out
      "rows": [{
          "artifact": str, "stage": str, "backend": "torch"|"onnxruntime"|"openvino"|"tensorrt",
          "precision": "fp32"|"fp16"|"int8", "T": int|null,
          "status": "ok" | "skipped: <reason>" | "error: <message>",
          "size_mb": float|null, "n": int,                 # test images scored
          "top1": float|null, "top5": float|null,          # percent (top-1 = first index of the max);
                                                           # top5 only when classes > 10
          "tied_top1": int|null,                           # images whose max logit two+ classes share
          "loss": float|null,
          "delta": float|null,                             # top-1 points vs the baseline
          "delta_stats": STATS | null,                     # paired on the same images (null: baseline)
          "agreement": float|null,                         # percent same prediction as the baseline
          "latency": {"batch": int, "p50_ms": float, "p95_ms": float, "mean_ms": float} | null,
          "throughput": {"batch": int, "images_per_s": float} | null,
          "benchmarks": [ {"batch", "p50_ms", "p95_ms", "mean_ms", "throughput", ...,
                           "compiled": "dynamic batch"|"static batch N",   # the compiled model timed
                           "executed": {"int8_convs", "convs", "int8_ops", "ops", "int8_mac_share"}|null} ],
          "static_benchmarks": [ same, each compiled for its static batch ],  # OpenVINO rows; else []
          "energy": {"energy_uj": float, "energy_pj": float, "macs": float, "sops": float,
                     "dense_macs": float, "mults": float, "adds": float,   # element-wise real ops
                     "elementwise_pj": float, "excluded": [str], "source": str} | null,   # per image; an estimate
          "firing_rates": {neuron: float} | null, "mean_firing_rate": float|null,
          "parent": str|null, "notes": [str],
          "ships": bool,                                   # a deployable graph: also total-gated
          "executed": EXECUTED | null,                     # what the runtime really ran (null: not measured)
          "gate": CHECK | null,                            # vs the parent (or baseline, gate_reference)
          "agreement_gate": AGREE | null,                  # identity rows: changed predictions vs the row they equal
          "total_gate": CHECK | null                       # ships only: vs the baseline, gates.total
      }],
      "layers": {artifact: [{"name", "kind", "spike_driven", "macs", "input_rate", "sops", "energy_pj"}]},
      "parity": {"<stage>/<graph>": {"n", "max_abs_diff", "top1_mismatches", "min_spike_agreement",
                                     "spike_agreement": {layer: share}, ...}},  # as unroll/export reported
      "gates": {"passed": bool, "failed": [str]},
      "plots": [str],                       # PNG file names next to report.json
      "steps": {"skipped": str} |           # no step graph exported (full-SA models): why
               {"criterion": "softmax"|"margin",
                "curves": [{"artifact", "backend", "precision", "status", "T", "n",   # one pass over test
                            "rows": [{"steps": int, "top1": float, "stats": STATS|null}]}],  # stats vs step T
                "tau": [{"artifact", "backend", "precision", "tau": float|null,   # null: never exit early
                         "criterion", "mean_steps", "top1", "full_top1", "max_drop", "n", "T",
                         "candidates", "split": "validation"}],                     # chosen on validation
                "adaptive": [ADAPTIVE]},                                            # scored on test
      "ships": {backend: {"artifact", "kind": "fixed-T"|"reduced-T"|"adaptive", "precision",
                          "steps": float, "top1", "p50_ms", "candidates", ...}}   # fastest row passing its gates
    }

    ADAPTIVE = {"artifact", "backend", "precision", "status", "T", "tau", "criterion", "n",
                "mean_steps": float, "max_steps": int, "top1", "full_top1", "stats": STATS,  # vs the full-T row
                "p50_ms": float,                  # per sample at batch 1, the real loop with the exit on
                "latency": {...}, "full_latency": {...},   # the same loop, exit on / all T steps
                "gate": CHECK, "total_gate": CHECK|null}

    CHECK = {"name": str, "max_drop": float, "reference": str, "reference_top1": float|null,
             "drop": float|null, "passed": bool|null, "stats": STATS|null}   # passed null: skipped row
    AGREE = {"name": str, "reference": str, "n": int|null, "changed": int|null,      # changed predictions
             "max_changed": int|null, "max_changed_share": float,                  # allowed (count, percent)
             "changed_images": [{"index", "reference_pred", "pred", "reference_margin"}],  # first 20, listed
             "max_logit_diff": float|null, "max_allowed_logit_diff": float|null, "passed": bool|null}
    STATS = {"delta": float, "ci95": [float, float], "p_value": float, "significant": bool,
             "only_row": int, "only_reference": int, "n": int}      # see pipeline.report.stats
    EXECUTED = {"int8_ops": int, "ops": int,          # convs + matmuls/gemms on integer kernels / all
                "int8_convs": int, "convs": int,
                "int8_mac_share": float|null,         # share of convolution MACs on integer kernels
                "conv_macs": float|null, "int8_conv_macs": float|null,   # per image and time step
                "kernels": {str: int}, "source": str, # kernel histogram; how it was read
                "float_reason": str|null, ...}        # see pipeline.runtime.executed
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from pipeline.runtime.specs import NAMES as BACKEND_NAMES

SCHEMA_VERSION = 5

ROW_FIELDS: dict[str, tuple[type, ...]] = {
    "artifact": (str,), "stage": (str,), "backend": (str,), "precision": (str,), "T": (int, type(None)),
    "status": (str,), "size_mb": (float, int, type(None)), "n": (int,), "top1": (float, int, type(None)),
    "top5": (float, int, type(None)), "loss": (float, int, type(None)), "delta": (float, int, type(None)),
    "agreement": (float, int, type(None)), "latency": (dict, type(None)), "throughput": (dict, type(None)),
    "benchmarks": (list,), "energy": (dict, type(None)), "firing_rates": (dict, type(None)),
    "mean_firing_rate": (float, int, type(None)), "parent": (str, type(None)), "notes": (list,),
    "gate": (dict, type(None)), "total_gate": (dict, type(None)), "delta_stats": (dict, type(None)),
    "tied_top1": (int, type(None)), "ships": (bool,), "executed": (dict, type(None)),
    "agreement_gate": (dict, type(None)), "static_benchmarks": (list,),
}
TOP_FIELDS: dict[str, tuple[type, ...]] = {
    "schema_version": (int,), "run": (str,), "dataset": (str,), "num_classes": (int,), "test_images": (int,),
    "created": (str,), "pipeline_version": (str,), "device": (str,), "settings": (dict,), "baseline": (dict,),
    "energy_model": (dict,), "rows": (list,), "layers": (dict,), "parity": (dict,), "gates": (dict,),
    "plots": (list,), "steps": (dict,), "ships": (dict,),
}
GATE_FIELDS = ("name", "max_drop", "reference", "reference_top1", "drop", "passed", "stats")
AGREE_FIELDS = ("name", "reference", "n", "changed", "max_changed", "max_changed_share", "changed_images",
                "max_logit_diff", "max_allowed_logit_diff", "passed")
STATS_FIELDS = ("delta", "ci95", "p_value", "significant", "only_row", "only_reference", "n")
BACKENDS = BACKEND_NAMES  # live view of the backend table (pipeline/runtime/specs.py)
EXECUTED_FIELDS = ("int8_ops", "ops", "int8_mac_share", "kernels", "source")
STATUS_PREFIXES = ("ok", "skipped", "error")


def _clean_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A measured row without the in-memory parts (predictions, per-layer list)."""
    return {k: row.get(k, [] if ROW_FIELDS[k] == (list,) else None) for k in ROW_FIELDS}


def build_report(rows: Sequence[Mapping[str, Any]], *, run: str, dataset: str, num_classes: int, test_images: int,
                 created: str, pipeline_version: str, device: str, settings: Mapping[str, Any], baseline: str,
                 energy_model: Mapping[str, Any], parity: Mapping[str, Any], failed: Sequence[str],
                 plots: Sequence[str], steps: Mapping[str, Any] | None = None,
                 ships: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report.json document (schema version 5) from measured, gated rows."""
    base = next((r for r in rows if r["artifact"] == baseline), None)
    return {
        "schema_version": SCHEMA_VERSION, "run": run, "dataset": dataset, "num_classes": int(num_classes),
        "test_images": int(test_images), "created": created, "pipeline_version": pipeline_version, "device": device,
        "settings": dict(settings), "baseline": {"artifact": baseline, "top1": base["top1"] if base else None},
        "energy_model": dict(energy_model), "rows": [_clean_row(r) for r in rows],
        "layers": {r["artifact"]: r["layers"] for r in rows if r.get("layers")},
        "parity": dict(parity), "gates": {"passed": not failed, "failed": list(failed)}, "plots": list(plots),
        "steps": dict(steps) if steps is not None else {"skipped": "no streaming graph measured"},
        "ships": dict(ships or {}),
    }


def validate_report(doc: Mapping[str, Any]) -> list[str]:
    """Structural problems of a report.json document (empty list: valid for the current schema version)."""
    errs: list[str] = []
    if doc.get("schema_version") != SCHEMA_VERSION:
        return [f"schema_version is {doc.get('schema_version')!r}, this reader knows {SCHEMA_VERSION}"]
    errs += _check_fields(doc, TOP_FIELDS, "report")
    for i, row in enumerate(doc.get("rows") or []):
        where = f"rows[{i}] ({row.get('artifact', '?') if isinstance(row, dict) else '?'})"
        if not isinstance(row, dict):
            errs.append(f"{where}: not an object")
            continue
        errs += _check_fields(row, ROW_FIELDS, where)
        if row.get("backend") not in BACKENDS:
            errs.append(f"{where}: backend {row.get('backend')!r} not one of {BACKENDS}")
        status = row.get("status")
        if isinstance(status, str) and not status.startswith(STATUS_PREFIXES):
            errs.append(f"{where}: status {status!r} does not start with one of {STATUS_PREFIXES}")
        for field in ("gate", "total_gate"):
            check = row.get(field)
            if isinstance(check, dict):
                missing = [k for k in GATE_FIELDS if k not in check]
                if missing:
                    errs.append(f"{where}: {field} lacks {', '.join(missing)}")
                elif isinstance(check["stats"], dict):
                    errs += _missing(check["stats"], STATS_FIELDS, f"{where}: {field}.stats")
        if isinstance(row.get("agreement_gate"), dict):
            errs += _missing(row["agreement_gate"], AGREE_FIELDS, f"{where}: agreement_gate")
        if isinstance(row.get("executed"), dict):
            errs += _missing(row["executed"], EXECUTED_FIELDS, f"{where}: executed")
        if isinstance(row.get("delta_stats"), dict):
            errs += _missing(row["delta_stats"], STATS_FIELDS, f"{where}: delta_stats")
        lat = row.get("latency")
        if isinstance(lat, dict) and not lat.get("p50_ms", 0) <= lat.get("p95_ms", 0):
            errs.append(f"{where}: latency p50 > p95")
    errs += _check_steps(doc.get("steps"))
    gates = doc.get("gates")
    if isinstance(gates, dict) and (not isinstance(gates.get("passed"), bool) or not isinstance(gates.get("failed"), list)):
        errs.append("gates: needs passed (bool) and failed (list)")
    return errs


ADAPTIVE_FIELDS = ("artifact", "backend", "precision", "tau", "criterion", "mean_steps", "max_steps", "top1",
                   "full_top1", "stats", "p50_ms", "gate", "total_gate")
TAU_FIELDS = ("artifact", "backend", "tau", "criterion", "mean_steps", "top1", "full_top1", "split")


def _check_steps(steps: Any) -> list[str]:
    """The ``steps`` section: skipped with a reason, or curves, tau choices and adaptive rows with their fields."""
    if not isinstance(steps, dict):
        return []  # its type is reported with the top fields
    if "skipped" in steps:
        return [] if isinstance(steps["skipped"], str) else ["steps: 'skipped' must be the reason (str)"]
    errs = _missing(steps, ("criterion", "curves", "tau", "adaptive"), "steps")
    for i, c in enumerate(steps.get("curves") or []):
        for j, r in enumerate(c.get("rows") or []):
            if r.get("steps") != j + 1:
                errs.append(f"steps.curves[{i}].rows[{j}]: steps {r.get('steps')!r}, expected {j + 1}")
            if isinstance(r.get("stats"), dict):
                errs += _missing(r["stats"], STATS_FIELDS, f"steps.curves[{i}].rows[{j}].stats")
    for i, t in enumerate(steps.get("tau") or []):
        errs += _missing(t, TAU_FIELDS, f"steps.tau[{i}]")
        if t.get("split") != "validation":
            errs.append(f"steps.tau[{i}]: tau must be chosen on the validation split, not {t.get('split')!r}")
    for i, a in enumerate(steps.get("adaptive") or []):
        errs += _missing(a, ADAPTIVE_FIELDS, f"steps.adaptive[{i}]")
        if isinstance(a.get("mean_steps"), (int, float)) and isinstance(a.get("max_steps"), int) \
                and a["mean_steps"] > a["max_steps"] + 1e-9:
            errs.append(f"steps.adaptive[{i}]: mean steps {a['mean_steps']} > max steps {a['max_steps']}")
    return errs


def _missing(obj: Mapping[str, Any], keys: Sequence[str], where: str) -> list[str]:
    missing = [k for k in keys if k not in obj]
    return [f"{where} lacks {', '.join(missing)}"] if missing else []


def _check_fields(obj: Mapping[str, Any], fields: Mapping[str, tuple[type, ...]], where: str) -> list[str]:
    errs = []
    for key, types in fields.items():
        if key not in obj:
            errs.append(f"{where}: missing '{key}'")
        elif isinstance(obj[key], bool) and bool not in types or not isinstance(obj[key], types):
            errs.append(f"{where}: '{key}' is {type(obj[key]).__name__}, expected {'/'.join(t.__name__ for t in types)}")
    return errs


__all__ = ["SCHEMA_VERSION", "build_report", "validate_report"]
