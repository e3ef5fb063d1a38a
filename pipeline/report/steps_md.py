"""report.md sections of the streaming graphs: what ships, accuracy vs steps, adaptive time steps.

Rendered from report.json's ``ships`` and ``steps`` only (like the rest of report.md).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence


def _t(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body)]


def _stats(st: Mapping[str, Any] | None) -> str:
    if not st:
        return "- (reference)"
    lo, hi = st["ci95"]
    return f"{st['delta']:+.2f} [{lo:+.2f}, {hi:+.2f}] p={st['p_value']:.3g}{'' if st['significant'] else ' ~'}"


def _tau(tau: Any) -> str:
    return "never (all T)" if tau is None else f"{tau:.4g}"


def ships_section(doc: Mapping[str, Any]) -> list[str]:
    """Per runtime, the fastest row that passes its gates (fixed-T, reduced-T and adaptive rows compete)."""
    ships = doc.get("ships") or {}
    lines = ["", "## Summary: what ships", "",
             "Per runtime, the fastest row at batch 1 (p50) that passes all its gates, among the deployable fixed-T and "
             "reduced-T graphs and the adaptive (early-exit) streaming rows."]
    if not ships:
        return lines + ["", "No row passes its gates with a batch-1 latency: nothing ships from this run."]
    body = [[b, f"`{s['artifact']}`", s["kind"], s["precision"],
             (f"{s['steps']:.2f} mean (tau {_tau(s.get('tau'))}, {s.get('criterion')})" if s["kind"] != "fixed-T" and s["kind"] != "reduced-T"
              else str(s["steps"])), f"{s['top1']:.2f}", f"{s['p50_ms']:.3f}", str(s["candidates"])]
            for b, s in ships.items()]
    return lines + [""] + _t(["runtime", "ships", "kind", "precision", "steps", "top-1 %", "p50 ms (b1)",
                              "rows passing"], body)


def steps_section(doc: Mapping[str, Any]) -> list[str]:
    """The accuracy-vs-steps table (test split, one pass) and the adaptive rows (tau chosen on validation)."""
    st = doc.get("steps") or {}
    if "skipped" in st:
        return ["", "## Accuracy vs steps", "", f"Skipped: {st['skipped']}."]
    curves = [c for c in st.get("curves") or [] if c.get("rows")]
    lines = ["", "## Accuracy vs steps (streaming graphs, test split, one pass)", "",
             "Top-1 of the running-mean logits after t steps (what a device that stops after t frames predicts), "
             "with the paired delta vs the same graph's full-T row: 95% Tango interval, exact McNemar p; `~`: "
             "within noise."]
    for c in st.get("curves") or []:
        if not c.get("rows"):
            lines.append(f"- `{c['artifact']}` ({c['backend']}): {c['status']}")
    if curves:
        T = max(len(c["rows"]) for c in curves)
        body = []
        for t in range(T):
            cells = [str(t + 1)]
            for c in curves:
                r = c["rows"][t] if t < len(c["rows"]) else None
                cells.append("-" if r is None else f"{r['top1']:.2f} ({_stats(r['stats'])})")
            body.append(cells)
        lines += [""] + _t(["steps", *(f"{c['artifact']} [{c['backend']}]" for c in curves)], body)
    adaptive = st.get("adaptive") or []
    if adaptive:
        lines += ["", f"## Adaptive time steps (early exit, criterion `{st['criterion']}`)", "",
                  "Each sample stops at the first step whose running-mean logits reach the confidence tau. tau is "
                  "chosen on the validation split (smallest mean steps within validate.gates.reduce_t of the full-T "
                  "graph; ties: the larger tau), then scored here on test. Latency: per sample at batch 1, the real "
                  "loop of step calls with the exit on (p50), next to the same loop over all T steps.", ""]
        tau_rows = {(t["artifact"], t["backend"]): t for t in st.get("tau") or []}
        body = []
        for a in adaptive:
            v = tau_rows.get((a["artifact"].replace(" (adaptive)", ""), a["backend"])) or {}
            g = a["gate"]
            gate = f"{'pass' if g['passed'] else '**FAIL**'} (drop {g['drop']:.2f} {'≤' if g['passed'] else '>'} {g['max_drop']:g})"
            body.append([f"`{a['artifact']}`", a["backend"], a["precision"], _tau(a["tau"]),
                         f"{v.get('mean_steps', float('nan')):.2f} / {v.get('top1', float('nan')):.2f}",
                         f"{a['mean_steps']:.2f}", str(a["max_steps"]), str(a["T"]), f"{a['top1']:.2f}",
                         f"{a['full_top1']:.2f}", _stats(a["stats"]), f"{a['p50_ms']:.3f}",
                         f"{a['full_latency']['p50_ms']:.3f}", gate])
        lines += _t(["artifact", "backend", "precision", "tau", "val: mean steps / top-1 %", "mean steps", "max steps",
                     "T", "top-1 %", "full-T top-1 %", "delta vs full-T [95% CI]", "p50 ms/sample (exit)",
                     "p50 ms/sample (all T)", "gate (reduce_t)"], body)
    return lines


__all__ = ["ships_section", "steps_section"]
