"""export: ONNX FP32 and INT8 (QDQ) with a dynamic batch, a streaming one-step graph, checks.

Each graph is compacted first (INT8 weights as int8 initializers, onnxslim simplification:
``pipeline.deploy.graphs.compact``); every check then runs on the final file: onnx.checker (full) +
shape inference, deployment metadata, ONNX Runtime parity on real test images (logits, top-1, per-layer spikes through a probe graph), and the static
TensorRT check (``trt_check.json``). Also writes ``sample_inputs.npz`` (the parity images,
labels and float logits) for the device bundle. ``metrics.json`` records node counts before and
after compaction, file and initializer bytes per graph, and the INT8/FP32 byte ratios.

NIR: a plain-LIF model (no STAA part, ``lif`` neurons) is also written as ``model.nir``
(:mod:`pipeline.deploy.graphs.nir_export`), checked with ``nir``'s own reader (load, re-save, identical) and
imported by each installed NIR reader (snnTorch, Norse) for round-trip parity on the same images;
any other model records ``nir.skipped`` with the parts that block it.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from pipeline import __version__
from pipeline.config import slice_hash
from pipeline.data import data_bundle, eval_loader
from pipeline.deploy.graphs.compact import CompactError
from pipeline.deploy.graphs.nir_export import (NirExportError, blocker_kinds, check_roundtrip, nir_blockers, to_nir,
                                       write_nir)
from pipeline.deploy.proofs.nir_readers import roundtrip_parity
from pipeline.deploy.graphs.onnx_export import ExportError, deploy_metadata
from pipeline.deploy.graphs.streaming import stream_blockers
from pipeline.deploy.proofs.trt_check import write_reports
from pipeline.deploy.graphs.unroll import UnrollError, load_unrolled
from pipeline.deploy.proofs.verify import Gates, batches, export_streaming_verified, export_verified
from pipeline.registry import config_sections
from pipeline.runner import StageContext, StageError, StageResult
from pipeline.runtime.backends.openvino_qdq import adaptation_exactness, has_qdq, saturating_inputs


def _inputs(cfg: dict[str, Any], T: int, limit: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    bundle = data_bundle(cfg, T=T)
    xs, ys = [], []
    for x, y in eval_loader(cfg, bundle.test, limit):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys), bundle


def _gates(e: dict[str, Any]) -> dict[str, Gates]:
    """The export.* tolerances per graph (ties: a top-1 flip is excused below twice the logit tolerance)."""
    fp32 = Gates(e["max_abs_diff"], e["min_spike_agreement"], 2 * e["max_abs_diff"], e["flip_margin"],
                 e["max_numerical_share"])
    int8 = Gates(e["int8_max_abs_diff"], e["int8_min_spike_agreement"], 2 * e["int8_max_abs_diff"],
                 e["int8_flip_margin"], e["int8_max_numerical_share"])
    step = Gates(e["max_abs_diff"], None, 2 * e["max_abs_diff"], e["flip_margin"], e["max_numerical_share"])
    step_int8 = Gates(e["int8_max_abs_diff"], None, 2 * e["int8_max_abs_diff"], e["int8_flip_margin"],
                      e["int8_max_numerical_share"])
    return {"fp32": fp32, "int8": int8, "step": step, "step_int8": step_int8}


def _log_streaming(ctx: StageContext, key: str, m: dict[str, Any]) -> None:
    for runtime, res in m["parity_runtimes"].items():
        if not res.get("checked"):
            ctx.log.warning("streaming %s on %s: not checked (%s)", key.upper(), runtime, res.get("reason"))
            continue
        ctx.log.info("streaming %s vs unrolled on %s: %d images, T=%d steps, %d of %d spikes differ, max logit |diff| "
                     "%.3g", key.upper(), runtime, res["n"], m["T"], res["spikes_differing"], res["spike_elements"],
                     res["max_abs_diff"])


def _log_parity(ctx: StageContext, key: str, p: dict[str, Any]) -> None:
    ctx.log.info("ONNX %s vs torch: %d images, %d with identical spikes (max |diff| %.3g), %d numerical flips, "
                 "%d real; top-1 mismatches %d; min local spike agreement %s", key, p["n"], p["samples_clean"],
                 p["max_abs_diff"], p["samples_numerical_flip"], p["samples_real_mismatch"], p["top1_mismatches"],
                 p["min_local_spike_agreement"])


def _log_compact(ctx: StageContext, key: str, c: dict[str, Any]) -> None:
    b, a = c["before"], c["after"]
    ctx.log.info("ONNX %s compacted: %d -> %d nodes, file %.2f -> %.2f MB, initializers %.2f -> %.2f MB "
                 "(%d weight quantisers folded to int8)", key, b["nodes"], a["nodes"], b["file_bytes"] / 1e6,
                 a["file_bytes"] / 1e6, b["initializer_bytes"] / 1e6, a["initializer_bytes"] / 1e6,
                 c["folded_weight_quantizers"])


def _adaptation_exact(ctx: StageContext, x: np.ndarray, failures: list[str]) -> dict[str, Any] | None:
    """The OpenVINO row runs an adapted copy of the INT8 file (pipeline.runtime.backends.openvino_qdq): prove on
    this very graph, with inputs past both int8 bounds, that the copy computes the file's numbers."""
    model = onnx.load(str(ctx.output("onnx_int8")))
    if not has_qdq(model):
        return None
    res = adaptation_exactness(model, saturating_inputs(x))
    ctx.log.info("OpenVINO Q/DQ adaptation vs the INT8 file (ONNX Runtime, exact Q/DQ): %d images, max |diff| %.3g; "
                 "%d float pairs, %d reached -128, %d reached 127", res["images"], res["max_abs_diff"],
                 res["float_pairs"], res["pairs_below_min"], res["pairs_above_max"])
    if res["max_abs_diff"] != 0.0:
        failures.append(f"the OpenVINO adaptation of the INT8 graph changes its numbers (max |diff| "
                        f"{res['max_abs_diff']:.3g} on {res['images']} images): a bug in pipeline/runtime/backends/openvino_qdq.py")
    return res


def size_ratios(fp32: dict[str, Any], int8: dict[str, Any]) -> dict[str, float]:
    """INT8 over FP32 initializer and file bytes of the final graphs (``compact.after`` of each)."""
    return {"int8_over_fp32_initializer_bytes": round(int8["initializer_bytes"] / max(fp32["initializer_bytes"], 1), 4),
            "int8_over_fp32_file_bytes": round(int8["file_bytes"] / max(fp32["file_bytes"], 1), 4)}


def export_nir_checked(ctx: StageContext, flat: torch.nn.Module, x: torch.Tensor, gates: Gates,
                       metadata: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The NIR graph of the unrolled float model, or the reason it has none: (metrics["nir"], gate failures)."""
    blockers = nir_blockers(flat)
    if blockers:
        # one short console line; every blocking module is in stage.log and metrics.json
        ctx.log.info("nir: skipped (%s; export/metrics.json nir.skipped says which modules and what to change)",
                     ", ".join(blocker_kinds(flat)))
        ctx.log.debug("nir: skipped: %s", "; ".join(blockers))
        return {"exported": False, "skipped": blockers}, []
    import nir

    path = ctx.output("nir")
    try:
        graph = to_nir(flat, tuple(int(v) for v in x.shape[-3:]), metadata=metadata)
    except NirExportError as exc:
        raise StageError(f"NIR export: {exc}") from exc
    write_nir(graph, path)
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="nir-", dir=ctx.scratch) as work:  # never in the committed folder
        roundtrip = check_roundtrip(path, graph, Path(work))
    if not roundtrip["identical"]:
        failures.append(f"NIR: {path.name} read back and re-saved by nir differs in {', '.join(roundtrip['differs'])}")
    metrics: dict[str, Any] = {"exported": True, "file_bytes": path.stat().st_size, "roundtrip": roundtrip,
                               "T": int(graph.metadata["T"]), "dt": float(graph.metadata["dt"]),
                               "neuron_mapping": graph.metadata["neuron_mapping"], "readers": {}}
    for reader, res in roundtrip_parity(nir.read(str(path)), flat, x, tie_tol=gates.tie_tol,
                                        flip_margin=gates.flip_margin).items():
        if not res["checked"]:
            metrics["readers"][reader] = {"checked": False, "reason": res["reason"]}
            ctx.log.warning("nir: %s", res["reason"])
            continue
        rep = res["report"]
        metrics["readers"][reader] = {"checked": True, **rep.metrics()}
        failures += rep.failures(gates.max_abs_diff, gates.min_spike_agreement, f"NIR via {reader}")
        ctx.log.info("nir: %s import vs torch: %d images, %d identical spikes, %d numerical flips, %d real; "
                     "top-1 mismatches %d; logits max |diff| %.3g", reader, rep.n, rep.clean, rep.numerical, rep.real,
                     rep.top1_mismatches, rep.max_abs_diff)
    return metrics, failures


def run(ctx: StageContext) -> StageResult:
    cfg, e = ctx.cfg, ctx.cfg["export"]
    try:
        flat, info = load_unrolled(ctx.input("float"))
        q, qinfo = load_unrolled(ctx.input("int8"))
    except UnrollError as exc:
        raise StageError(str(exc)) from exc
    x, y, bundle = _inputs(cfg, info.T, e["parity_images"])
    common = dict(pipeline_version=__version__, config_hash=slice_hash(cfg, config_sections(ctx.spec.name)),
                  input_encoding=getattr(bundle, "input_encoding", ""))
    opts = dict(opset=e["opset"], dynamo=e["dynamo"])
    gates = _gates(e)
    metrics: dict[str, Any] = {"T": info.T, "opset": e["opset"], "exporter": "dynamo" if e["dynamo"] else "legacy",
                               "parity_images": len(x)}
    failures: list[str] = []
    reports = []
    try:
        with tempfile.TemporaryDirectory(prefix="probe-", dir=ctx.scratch) as work:  # never in the committed folder
            for key, module, unrolled in (("fp32", flat, info), ("int8", q, qinfo)):
                m, f, r = export_verified(module, x, ctx.output(f"onnx_{key}"), gates=gates[key],
                                          metadata=deploy_metadata(unrolled, precision=key, **common),
                                          what=f"ONNX {key.upper()}", work_dir=Path(work), **opts)
                metrics[key] = m
                failures += f
                reports.append(r)
                _log_compact(ctx, key, m["compact"])
                _log_parity(ctx, key, m["parity"])
        metrics.update(size_ratios(metrics["fp32"]["compact"]["after"], metrics["int8"]["compact"]["after"]))
        metrics["int8"]["openvino_adaptation"] = _adaptation_exact(ctx, x[:64].numpy(), failures)
        blockers = stream_blockers(flat) if e["streaming"] else ["export.streaming is false"]
        if blockers:
            metrics["streaming"] = {"exported": False, "reason": blockers[0]}
            ctx.log.info("streaming graph skipped: %s", blockers[0])
        else:
            metrics["streaming"] = {"exported": True}
            for key, module, unrolled, gate in (("fp32", flat, info, gates["step"]), ("int8", q, qinfo, gates["step_int8"])):
                m, f, r = export_streaming_verified(module, x, ctx.output(f"step_{key}"), gates=gate,
                                                    metadata=deploy_metadata(unrolled, precision=key, **common),
                                                    reference=ctx.output(f"onnx_{key}"), work_dir=ctx.scratch,
                                                    what=f"streaming {key.upper()}", **opts)
                if key == "fp32":  # the FP32 step graph's metrics stay where they were; the INT8 one's under "int8"
                    metrics["streaming"].update(m)
                else:
                    metrics["streaming"]["int8"] = m
                failures += f
                reports.append(r)
                _log_streaming(ctx, key, m)
        metrics["nir"], f = export_nir_checked(ctx, flat, x, gates["fp32"],
                                               deploy_metadata(info, precision="fp32", **common))
        failures += f
    except ExportError as exc:
        raise StageError(f"{exc}. Try export.dynamo: {not e['dynamo']} or another export.opset") from exc
    except CompactError as exc:
        raise StageError(f"compacting the exported graph failed: {exc}") from exc

    trt = write_reports(reports, ctx.output("trt_check"))
    metrics["trt_check_ok"] = trt["ok"]
    if not trt["ok"]:
        msg = "TensorRT static check: " + "; ".join(r.summary(3) for r in reports if not r.ok)
        if e["trt_check_strict"]:
            failures.append(msg + " (export.trt_check_strict: false makes this a warning)")
        else:
            ctx.log.warning(msg)
    with torch.no_grad():
        ref = torch.cat([flat(xb) for xb in batches(x, 64)]).numpy()
    np.savez_compressed(ctx.output("samples"), x=x.numpy().astype(np.float32), y=y.numpy().astype(np.int64),
                        logits=ref.astype(np.float32))
    if failures:
        raise StageError("export gates failed: " + "; ".join(failures) + " (details in export/stage.log; "
                         "tolerances: export.max_abs_diff, export.*min_spike_agreement, export.*flip_margin)")
    return StageResult(metrics=metrics)
