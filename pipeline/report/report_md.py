"""report.md: the human-readable report, rendered from the report.json document only.

Why from the document: the markdown can never say something the JSON does not, and a
report can be re-rendered from an old report.json. One table per run, one row per artifact,
in the spirit of ultralytics' benchmark table.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from pipeline.report.steps_md import ships_section, steps_section

COLUMNS = ("artifact", "backend", "precision", "int8 ops executed", "int8 MACs %", "T", "status", "size MB",
           "top-1 %", "top-5 %", "tied top-1",
           "delta [95% CI]", "agreement %", "p50 ms (b{b1})", "p95 ms (b{b1})", "img/s (b{bn})", "energy µJ/img*",
           "gate (step)", "gate (agreement)", "gate (total)")


def _f(value: Any, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _delta(row: Mapping[str, Any]) -> str:
    """``-1.39 [-2.50, -0.28]``; ``~`` marks a delta within noise (McNemar p >= 0.05)."""
    if row.get("delta") is None:
        return "-"
    st = row.get("delta_stats")
    if not st:
        return _f(row["delta"], signed=True)
    lo, hi = st["ci95"]
    return f"{row['delta']:+.2f} [{lo:+.2f}, {hi:+.2f}]{'' if st['significant'] else ' ~'}"


def _gate(check: Mapping[str, Any] | None, empty: str = "-") -> str:
    if check is None:
        return empty
    g = check
    if g["passed"] is None:
        return f"- ({g['name']} ≤ {g['max_drop']:g})"
    if g["drop"] is None:
        return f"**FAIL** ({g['name']}: not measured)"
    mark, op = ("pass", "≤") if g["passed"] else ("**FAIL**", ">")
    sig = ""
    if not g["passed"] and g.get("stats"):
        sig = ", significant" if g["stats"]["significant"] else ", within noise"
    return f"{mark} ({g['name']}: drop {g['drop']:.2f} {op} {g['max_drop']:g} vs {g['reference']}{sig})"


def _agreement_gate(check: Mapping[str, Any] | None) -> str:
    """``pass (onnx_fp32: 1 ≤ 5 changed vs unroll/float.pt, max |Δlogit| 0.07)``."""
    if check is None:
        return "-"
    if check["passed"] is None:
        return f"- ({check['name']} ≤ {check['max_changed_share']:g}%)"
    if check["changed"] is None:
        return f"**FAIL** ({check['name']}: not measured)"
    mark = "pass" if check["passed"] else "**FAIL**"
    op = "≤" if check["changed"] <= check["max_changed"] else ">"  # a failure with ≤ failed on the logits
    diff = "" if check["max_logit_diff"] is None else f", max |Δlogit| {check['max_logit_diff']:.3g}"
    return f"{mark} ({check['name']}: {check['changed']} {op} {check['max_changed']} changed vs {check['reference']}{diff})"


def fake_quant(row: Mapping[str, Any]) -> str | None:
    """Why an "int8" row ran its convolutions in float (its runtime's own words), or None.

    Decided from the executed graph only (``executed.int8_convs == 0``), never from the name.
    """
    ex = row.get("executed")
    if row.get("precision") != "int8" or not isinstance(ex, Mapping):
        return None
    integer = ex.get("int8_convs", ex.get("int8_ops"))
    if integer != 0 or not ex.get("convs", ex.get("ops")):
        return None
    return ex.get("float_reason") or "every convolution ran on a float kernel"


def _executed_cells(row: Mapping[str, Any]) -> list[str]:
    """``k/n`` ops on integer kernels and the share of conv MACs on them (``-``: not measured)."""
    ex = row.get("executed")
    if not isinstance(ex, Mapping):
        return ["-", "-"]
    share = ex.get("int8_mac_share")
    return [f"{ex['int8_ops']}/{ex['ops']}", "-" if share is None else f"{100 * share:.1f}"]


def _row_cells(row: Mapping[str, Any], baseline: str) -> list[str]:
    lat, thr, en = row.get("latency") or {}, row.get("throughput") or {}, row.get("energy") or {}
    status = row["status"] if len(row["status"]) < 90 else row["status"][:87] + "..."
    energy = _f(en.get("energy_uj"), 3) if en else "-"
    if en and en.get("source") not in (None, row["artifact"]):
        energy += "†"
    notes = list(row.get("notes") or []) + (["**fake-quant**"] if fake_quant(row) else [])
    name = row["artifact"] + (f" ({', '.join(notes)})" if notes else "")
    ties = "-" if row.get("tied_top1") is None else str(row["tied_top1"])
    step = _gate(row.get("gate"), "baseline" if row["artifact"] == baseline else "-")
    return [name, row["backend"], row["precision"], *_executed_cells(row), "-" if row["T"] is None else str(row["T"]),
            status,
            _f(row.get("size_mb")), _f(row.get("top1")), _f(row.get("top5")), ties, _delta(row),
            _f(row.get("agreement"), 1), _f(lat.get("p50_ms"), 3), _f(lat.get("p95_ms"), 3),
            _f(thr.get("images_per_s"), 1), energy, step, _agreement_gate(row.get("agreement_gate")),
            _gate(row.get("total_gate"))]


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    cells = [[c.replace("|", "\\|") for c in r] for r in body]
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in cells)]


def render(doc: Mapping[str, Any]) -> str:
    """The markdown report for a report.json document (schema version 3)."""
    s = doc["settings"]
    sizes = s.get("batch_sizes") or [1]
    header = [c.format(b1=min(sizes), bn=max(sizes)) for c in COLUMNS]
    lines = [f"# Validation report: run `{doc['run']}`", "",
             f"Dataset **{doc['dataset']}** ({doc['num_classes']} classes), {doc['test_images']} test images; "
             f"device {doc['device']}; pipeline {doc['pipeline_version']}; {doc['created']}.", "",
             f"Baseline: `{doc['baseline']['artifact']}` top-1 {_f(doc['baseline']['top1'])} %. "
             f"Timing: warm-up {s['warmup']}, at least {s['iterations']} timed calls and {s.get('min_seconds', 0):g} s, "
             f"threads {s['threads']}; latency at batch "
             f"{min(sizes)}, throughput at batch {max(sizes)}. Step gate: max top-1 drop in points vs the "
             f"{'parent artifact' if s.get('gate_reference') == 'parent' else 'float baseline'}; total gate: every "
             f"row that can ship vs the float baseline (validate.gates.total = {s['gates'].get('total', '-')}); "
             f"agreement gate: rows that must compute the same function as the row they were made from (unrolled "
             f"modules, graphs in their runtimes, a runtime running an INT8 file vs the file's exact Q/DQ numbers) "
             f"may change at most validate.changed (percent, rounded up to whole images) of the predictions.", "",
             "Every figure is measured on the test split (never used to choose anything). Top-1 is the first index "
             "of the largest logit; *tied top-1* counts images whose largest logit two or more classes share. "
             "*delta*: top-1 points vs the baseline with a 95% interval from the paired predictions on the same "
             "images; `~` marks a delta within noise (exact McNemar p ≥ 0.05): neither a gain nor a loss.", ""]
    lines += _table(header, [_row_cells(r, doc["baseline"]["artifact"]) for r in doc["rows"]])
    lines += executed_note(doc)
    g = doc["gates"]
    lines += ["", f"**Gates: {'all passed' if g['passed'] else 'FAILED'}**"]
    lines += [f"- {msg}" for msg in g["failed"]]
    lines += ships_section(doc)
    lines += steps_section(doc)
    lines += _changed_section(doc)
    lines += compiled_shapes_section(doc)
    lines += energy_note(doc)
    lines += _firing_section(doc)
    lines += _layer_section(doc)
    lines += _parity_section(doc.get("parity") or {})
    if doc.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in doc["plots"]]
    return "\n".join(lines) + "\n"


def compiled_shapes_section(doc: Mapping[str, Any]) -> list[str]:
    """Latency and integer-kernel counts per compiled shape: a static batch-1 compile (the usual edge
    deployment) can run other kernels than the dynamic-batch model the main table timed."""
    body = []
    for r in (r for r in doc["rows"] if r.get("static_benchmarks")):
        for b in list(r.get("benchmarks") or []) + list(r.get("static_benchmarks") or []):
            ex = b.get("executed") or {}
            if not ex or not b.get("compiled"):
                continue
            share = ex.get("int8_mac_share")
            body.append([r["artifact"], r["backend"], b["compiled"], str(b["batch"]),
                         f"{ex.get('int8_convs', '-')}/{ex.get('convs', '-')}",
                         "-" if share is None else f"{100 * share:.1f}", _f(b.get("p50_ms"), 3),
                         _f(b.get("throughput"), 1)])
    if not any(r.get("static_benchmarks") for r in doc["rows"]):
        return []
    return ["", "## Executed precision per compiled shape", "",
            "Each timing with the kernels of the model it timed: the main table's figures come from one "
            "dynamic-batch compile; OpenVINO rows are also compiled and timed at each batch size as a static "
            "shape, which can pick other kernels and run at another speed (counted from that compile's own "
            "runtime model).", ""] + \
        _table(["artifact", "backend", "compiled", "batch", "int8 convs", "int8 MACs %", "p50 ms", "img/s"], body)


def _changed_section(doc: Mapping[str, Any]) -> list[str]:
    """Every changed prediction of an identity row, with the reference's top-2 margin on that image."""
    lines: list[str] = []
    for r in doc["rows"]:
        g = r.get("agreement_gate")
        if not g or not g.get("changed_images"):
            continue
        cells = [f"#{c['index']} {c['reference_pred']}→{c['pred']}"
                 + ("" if c["reference_margin"] is None else f" (margin {c['reference_margin']:.3g})")
                 for c in g["changed_images"]]
        more = g["changed"] - len(cells)
        lines.append(f"- `{r['artifact']}` vs `{g['reference']}`: {', '.join(cells)}" + (f", and {more} more" if more > 0 else ""))
    return (["", "Changed predictions of identity rows (image, reference class → row class, the reference's "
                 "top-2 logit margin):"] + lines) if lines else []


def executed_note(doc: Mapping[str, Any]) -> list[str]:
    """What the two executed-precision columns mean, and why each fake-quant row ran in float."""
    lines = ["", "*int8 ops executed*: convolutions and matmuls/gemms the runtime ran on integer (u8/i8) kernels, of "
             "all it ran, read from the runtime's own executed graph (OpenVINO's runtime model, ONNX Runtime's "
             "optimised graph, TensorRT's engine inspector; torch counts its conv/linear modules), never from the "
             "file name. *int8 MACs %*: share of the convolution multiply-accumulates that ran on integer kernels. "
             "An int8 row whose convolutions all ran in float is labelled **fake-quant**: its INT8 is simulated "
             "(quantise -> dequantise -> float op), so its accuracy is the INT8 model's but its speed is not "
             "INT8 speed."]
    fakes = [(r, fake_quant(r)) for r in doc["rows"]]
    fakes = [(r, why) for r, why in fakes if why]
    if fakes:
        lines += ["", "Fake-quant rows:"] + [f"- `{r['artifact']}` ({r['backend']}): {why}." for r, why in fakes]
    return lines


def energy_note(doc: Mapping[str, Any]) -> list[str]:
    """The footnote of the energy column: the convention, and what the estimate leaves out.

    The excluded list is read from ``energy_model.excluded`` or else from any row's energy
    summary (``pipeline.report.energy.summarize`` puts it there), so old reports still render.
    """
    em = doc["energy_model"]
    lines = ["", f"\\* Energy per image, an **{em['convention']}**. † inherited from the torch module the "
             f"graph was exported from (same graph, same spikes)."]
    excluded = em.get("excluded") or next(
        (r["energy"]["excluded"] for r in doc.get("rows", []) if (r.get("energy") or {}).get("excluded")), None)
    if excluded:
        lines += ["", "Not counted in the energy estimate:"] + [f"- {e}" for e in excluded]
    return lines


def _firing_section(doc: Mapping[str, Any]) -> list[str]:
    """Firing rate per neuron layer (spikes per neuron per step) of every torch artifact."""
    rows = [r for r in doc["rows"] if r.get("firing_rates")]
    if not rows:
        return []
    names = list(dict.fromkeys(n for r in rows for n in r["firing_rates"]))
    body = [[n, *(_f(r["firing_rates"].get(n), 4) for r in rows)] for n in names]
    body.append(["**mean**", *(_f(r.get("mean_firing_rate"), 4) for r in rows)])
    return ["", "## Firing rate per layer (torch artifacts, whole test split)", ""] + _table(
        ["neuron layer", *(f"{r['artifact']} (T={r['T']})" for r in rows)], body)


def _grouped(layers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Fold each spiking unit's attention ops (``...staa.*``) into one row; keep the rest as is."""
    rows: dict[str, dict[str, Any]] = {}
    for l in layers:
        if ".staa." in l["name"]:
            key = l["name"].split(".staa.")[0] + ".staa"
            g = rows.setdefault(key, {"name": key, "kind": "attention", "input": "real (MAC)", "rate": "-",
                                      "macs": 0.0, "sops": 0.0, "energy_pj": 0.0})
        else:
            g = rows.setdefault(l["name"], {"name": l["name"], "kind": l["kind"], "macs": 0.0, "sops": 0.0,
                                            "energy_pj": 0.0, "rate": f"{l['input_rate']:.3f}",
                                            "input": "spikes (AC)" if l["spike_driven"] else "real (MAC)"})
        for k in ("macs", "sops", "energy_pj"):
            g[k] += l[k]
    return list(rows.values())


def _layer_section(doc: Mapping[str, Any]) -> list[str]:
    """Per-layer ops of the baseline: where the energy goes and which layers are spike-driven."""
    base = doc["baseline"]["artifact"]
    layers = doc.get("layers", {}).get(base)
    if not layers:
        return []
    body = [[g["name"], g["kind"], g["input"], g["rate"], f"{g['macs'] / 1e6:.4f}", f"{g['sops'] / 1e6:.4f}",
             f"{g['energy_pj'] / 1e6:.4f}"] for g in _grouped(layers)]
    return ["", f"## Operations per layer: `{base}` (per image, all T steps; STAA parts summed per unit, "
                f"every layer in report.json)", ""] + _table(
        ["layer", "kind", "input", "input rate", "MMACs (dense)", "MSOPs", "energy µJ"], body)


def _parity_section(parity: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Upstream parity of each unrolled/exported graph vs its source, and spike agreement per layer."""
    if not parity:
        return []
    body = [[g, str(p.get("n", "-")), _g(p.get("max_abs_diff")), str(p.get("top1_mismatches", "-")),
             _g(p.get("min_spike_agreement"))] for g, p in parity.items()]
    lines = ["", "## Parity of unrolled and exported graphs vs their source (from the unroll and export stages)", ""]
    lines += _table(["graph", "images", "max abs diff (logits)", "top-1 mismatches", "min spike agreement"], body)
    per_layer = {g: p["spike_agreement"] for g, p in parity.items() if isinstance(p.get("spike_agreement"), dict)}
    layers = list(dict.fromkeys(k for d in per_layer.values() for k in d))
    if layers:
        lines += ["", "Spike agreement per layer (share of identical spikes):", ""]
        lines += _table(["layer", *per_layer], [[l, *(_g(d.get(l)) for d in per_layer.values())] for l in layers])
    return lines


def _g(value: Any) -> str:
    return "-" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


__all__ = ["energy_note", "executed_note", "fake_quant", "render"]
