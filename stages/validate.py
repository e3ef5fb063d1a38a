"""validate: measure every artifact of the run, gate it, write report.md, report.json and plots.

The report is written before the gates are enforced: a failed gate comes back as
``failed_gates``, the runner commits the report and then fails the run (exit code 1).
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
from typing import Any

from pipeline import __version__, registry
from pipeline.artifacts import write_json_atomic
from pipeline.console import LOG_ONLY
from pipeline.data import data_bundle, eval_loader
from pipeline.report import (CONVENTION, E_AC_PJ, E_MAC_PJ, E_MUL_PJ, EXCLUDED, Settings, apply_gates,
                             build_report, discover, inherit_energy, measure, render, upstream_parity,
                             validate_report)
from pipeline.report.nir_note import nir_note, nir_summary, read_nir_metrics
from pipeline.report.plots import TRAINING_CURVES, draw_all, draw_training_curves
from pipeline.report.steps import choose_ships
from pipeline.report.streaming_rows import GRAPHS, streaming_section
from pipeline.runner import StageContext, StageError, StageResult


def _loaders(ctx: StageContext, limit: int | None, split: str = "test"):
    """``loader_for(T)``: the ``split`` loader; event datasets get frames built at each model's T."""
    cfg = ctx.cfg
    base = data_bundle(cfg)
    cache: dict[Any, Any] = {}

    def loader_for(T: int | None):
        key = T if base.is_event and T is not None else None
        if key not in cache:
            bundle = data_bundle(cfg, T) if key is not None else base
            cache[key] = eval_loader(cfg, getattr(bundle, split), limit)
        return cache[key]

    return base, loader_for


def _steps(ctx: StageContext, limit: int | None, loader_for, baseline_top1: float | None, baseline: str):
    """The streaming section (accuracy vs steps, tau on validation, adaptive rows), or why it is skipped."""
    v = ctx.cfg["validate"]
    if "export" not in ctx.inputs:
        return {"skipped": "no export stage in this run"}, []
    graphs = {role: ctx.input(f"export.{role}") for role, _ in GRAPHS if ctx.input(f"export.{role}").is_file()}
    if not graphs:
        metrics = ctx.input("export.metrics")
        reason = "export wrote no step graph"
        if metrics.is_file():
            reason = (json.loads(metrics.read_text()).get("streaming") or {}).get("reason") or reason
        ctx.log.info("[validate] accuracy vs steps and adaptive steps skipped: %s", reason)
        return {"skipped": reason}, []
    _, val_for = _loaders(ctx, limit, "val")
    ee = v["early_exit"]
    return streaming_section(graphs, val_for, loader_for, max_drop=float(v["gates"]["reduce_t"]),
                             total_drop=float(v["gates"]["total"]), baseline_top1=baseline_top1, baseline=baseline,
                             criterion=ee["criterion"], latency_samples=int(ee["latency_samples"]),
                             threads=v["threads"] or None, log=ctx.log)


def run(ctx: StageContext) -> StageResult:
    cfg, v = ctx.cfg, ctx.cfg["validate"]
    limit = v["limit_test"] if v["limit_test"] is not None else cfg["data"]["limit_test"]
    bundle, loader_for = _loaders(ctx, limit)
    sample = bundle.test[0][0]
    settings = Settings(batch_sizes=tuple(v["batch_sizes"]), warmup=v["warmup"], iterations=v["iterations"],
                        threads=v["threads"], num_classes=bundle.num_classes,
                        max_engine_batch=cfg["build"]["max_batch"], min_seconds=v["min_seconds"])
    table = registry.table()
    baseline = table.baseline_artifact()  # "train/best.pt"
    artifacts = discover(ctx.inputs, cfg["model"]["T"], ctx.device, (None, *sample.shape), table)
    if not artifacts or artifacts[0].name != baseline or not artifacts[0].path.is_file():
        stage = registry.baseline()[0]
        raise StageError(f"the float baseline {baseline} is missing under {ctx.inputs.get(stage)}; "
                         f"re-run the {stage} stage (python -m pipeline.stage {stage} --force --config ...)")
    rows = []
    for art in artifacts:
        # one line per artifact in stage.log; the console gets the summary line below
        ctx.log.info("[validate] %s (%s %s, T=%s)", art.name, art.backend, art.precision, art.T, extra=LOG_ONLY)
        rows.append(measure(art, loader_for(art.T), settings, ctx.log))
    if rows[0]["top1"] is None:
        raise StageError(f"the float baseline {baseline} could not be evaluated ({rows[0]['status']}); "
                         f"every delta and gate depends on it: fix it and re-run validate")
    inherit_energy(rows, {a.name: a.energy_from for a in artifacts})
    failed = apply_gates(rows, v["gates"], baseline, v["gate_reference"], changed=v["changed"],
                         max_logit_diff=v["max_logit_diff"])
    steps, steps_failed = _steps(ctx, limit, loader_for, rows[0]["top1"], baseline)
    failed += steps_failed
    for a in steps.get("adaptive") or []:  # one console line per adaptive row: what the exit buys
        ctx.log.info("[validate] %s [%s]: %.2f of %d steps on average (tau %s, chosen on val), top-1 %.2f%% vs %.2f%% "
                     "at all steps", a["artifact"], a["backend"], a["mean_steps"], a["T"], a["tau"], a["top1"],
                     a["full_top1"])

    doc = build_report(
        rows, run=cfg["name"], dataset=bundle.name, num_classes=bundle.num_classes, test_images=rows[0]["n"],
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), pipeline_version=__version__,
        device=f"{ctx.device} ({platform.processor() or platform.machine()})",
        settings={"batch_sizes": list(settings.batch_sizes), "warmup": settings.warmup,
                  "iterations": settings.iterations, "threads": settings.threads, "min_seconds": settings.min_seconds,
                  "gate_reference": v["gate_reference"], "gates": dict(v["gates"]), "changed": dict(v["changed"]),
                  "max_logit_diff": dict(v["max_logit_diff"])},
        baseline=baseline, energy_model={"e_mac_pj": E_MAC_PJ, "e_ac_pj": E_AC_PJ, "e_mul_pj": E_MUL_PJ,
                                            "convention": CONVENTION, "excluded": list(EXCLUDED)},
        parity=upstream_parity(ctx.inputs, table), failed=failed, plots=[], steps=steps,
        ships=choose_ships(rows, steps.get("adaptive") or [], cfg["model"]["T"]))
    doc["plots"] = draw_all(doc, lambda plot: ctx.output("plot", plot=plot))
    histories = {s.name: ctx.input(f"{s.name}.history") for s in registry.stages()
                 if s.name in ctx.inputs and any(o.role == "history" for o in s.outputs)}
    curves = draw_training_curves(histories, ctx.output("plot", plot=TRAINING_CURVES))
    if curves:
        doc["plots"].append(curves)
    problems = validate_report(doc)
    if problems:  # a bug here, not a user error: say so loudly
        raise StageError(f"{ctx.output('report_json').name} does not match its schema: " + "; ".join(problems))
    write_json_atomic(ctx.output("report_json"), doc)
    md = render(doc)
    # the NIR graph is not measured here: export's record, noted
    nir = read_nir_metrics(ctx.input("export.metrics") if "export" in ctx.inputs else None)
    if nir_note(nir):
        md = md.rstrip("\n") + "\n" + "\n".join(nir_note(nir)) + "\n"
    ctx.output("report_md").write_text(md)
    ctx.log.debug("[validate] report table:\n%s", md.split("\n\n**Gates")[0])
    shipping = [r for r in doc["rows"] if r["ships"] and r["top1"] is not None]
    ctx.log.info("[validate] %d artifacts measured on %d test images; baseline top-1 %.2f%%%s; gates %s",
                 len(doc["rows"]), doc["test_images"], doc["baseline"]["top1"],
                 "".join(f"; {r['artifact']} {r['top1']:.2f}%" for r in shipping),
                 "passed" if doc["gates"]["passed"] else f"FAILED ({len(failed)})")
    return StageResult(metrics=dict(_summary(doc), nir=nir_summary(nir)), failed_gates=failed)


def _summary(doc: dict[str, Any]) -> dict[str, Any]:
    """A compact metrics.json: per-artifact headline numbers (the full detail is report.json)."""
    rows = {}
    for r in doc["rows"]:
        rows[r["artifact"]] = {
            "status": r["status"], "top1": r["top1"], "delta": r["delta"], "agreement": r["agreement"],
            "p50_ms": (r["latency"] or {}).get("p50_ms"), "images_per_s": (r["throughput"] or {}).get("images_per_s"),
            "energy_uj": (r["energy"] or {}).get("energy_uj"), "tied_top1": r["tied_top1"],
            "delta_significant": (r["delta_stats"] or {}).get("significant"),
            "gate_passed": (r["gate"] or {}).get("passed"), "total_gate_passed": (r["total_gate"] or {}).get("passed"),
            "changed": (r["agreement_gate"] or {}).get("changed"),
            "agreement_gate_passed": (r["agreement_gate"] or {}).get("passed"),
            # what the runtime really ran: convs + matmuls on integer kernels, of all, and the conv MAC share
            "int8_ops": (r["executed"] or {}).get("int8_ops"), "ops": (r["executed"] or {}).get("ops"),
            "int8_mac_share": (r["executed"] or {}).get("int8_mac_share"),
        }
    st = doc.get("steps") or {}
    early_exit = {"criterion": st.get("criterion"), "skipped": st.get("skipped"),
                  "tau": [{k: t[k] for k in ("artifact", "backend", "tau", "mean_steps", "top1", "full_top1", "n")}
                          for t in st.get("tau") or []],  # chosen on validation
                  "adaptive": {f"{a['artifact']} [{a['backend']}]": {
                      "tau": a["tau"], "mean_steps": a["mean_steps"], "max_steps": a["max_steps"], "top1": a["top1"],
                      "full_top1": a["full_top1"], "p50_ms": a["p50_ms"], "full_p50_ms": a["full_latency"]["p50_ms"],
                      "gate_passed": a["gate"]["passed"]} for a in st.get("adaptive") or []}}
    return {"schema_version": doc["schema_version"], "baseline_top1": doc["baseline"]["top1"],
            "gates_passed": doc["gates"]["passed"], "failed_gates": doc["gates"]["failed"], "artifacts": rows,
            "early_exit": early_exit, "ships": doc.get("ships") or {}}
