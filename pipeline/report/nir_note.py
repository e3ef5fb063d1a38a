"""The report's NIR note: the export stage's NIR graph (or why there is none) and its round-trip parity.

Self-contained on purpose: read from export's metrics.json (``nir``), appended to report.md and to
validate's metrics.json, without touching the measured rows or the gates (the NIR gates run in export).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping


def read_nir_metrics(path: Path | None) -> dict[str, Any] | None:
    """``["nir"]`` of the export stage's metrics file ``path``, or None when that stage did not record one."""
    if path is None:
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    nir = doc.get("nir") if isinstance(doc, dict) else None
    return nir if isinstance(nir, dict) else None


def nir_summary(nir: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A compact form for validate's metrics.json."""
    if nir is None:
        return None
    if not nir.get("exported"):
        return {"exported": False, "skipped": list(nir.get("skipped", []))}
    readers = {}
    for name, r in (nir.get("readers") or {}).items():
        readers[name] = ({"checked": False} if not r.get("checked") else
                         {"checked": True, "images": r["n"], "clean": r["samples_clean"],
                          "numerical_flips": r["samples_numerical_flip"], "real": r["samples_real_mismatch"],
                          "top1_mismatches": r["top1_mismatches"], "max_abs_diff": r["max_abs_diff"]})
    return {"exported": True, "identical_after_resave": bool((nir.get("roundtrip") or {}).get("identical")),
            "dt": nir.get("dt"), "readers": readers}


def nir_note(nir: Mapping[str, Any] | None) -> list[str]:
    """Markdown lines for report.md (empty when the export stage recorded nothing about NIR)."""
    s = nir_summary(nir)
    if s is None:
        return []
    lines = ["", "## NIR graph (export/model.nir)", ""]
    if not s["exported"]:
        lines.append("nir: skipped; parts with no NIR form:")
        return lines + [f"- {b}" for b in s["skipped"]]
    lines.append(f"Written for neuromorphic toolchains (dt = {s['dt']:g} s; {nir.get('neuron_mapping', '')}). "
                 f"nir's own reader: load, re-save, {'identical' if s['identical_after_resave'] else 'DIFFERENT'}.")
    lines.append("")
    lines.append("| reader | images | identical spikes | numerical flips | real mismatches | top-1 mismatches | "
                 "max abs diff (logits) |")
    lines.append("|---|---|---|---|---|---|---|")
    for name, r in s["readers"].items():
        if not r["checked"]:
            lines.append(f"| {name} | not installed | | | | | |")
        else:
            lines.append(f"| {name} | {r['images']} | {r['clean']} | {r['numerical_flips']} | {r['real']} | "
                         f"{r['top1_mismatches']} | {r['max_abs_diff']:.3g} |")
    return lines
