"""Find every artifact of a run and say how to load it, which gate guards it and what it came from.

Why a separate module: the validate stage must treat a float checkpoint, a QAT model, an
unrolled module, an ONNX file and a TensorRT engine the same way (one runner each), and the
report must explain every row, including the ones that could not run (a skipped build). This
module only *lists*; loading happens lazily through ``Artifact.open`` so that a broken
artifact becomes one failed row, not a crashed stage.

Gate parents (``validate.gate_reference: parent``, the default): each compression step is
gated against the artifact it was made from, so the config's tolerances mean "what this step
may cost": reduced T vs the float baseline; QAT vs the float model at its T; unrolled vs its
torch source; ONNX vs the unrolled module; engines vs their ONNX. With ``baseline`` every
gate compares against the float baseline instead (cumulative cost).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BASELINE = "train/best.pt"


@dataclass
class Loaded:
    """What opening an artifact gives: a runner, and the torch module behind it (None for graphs)."""

    runner: Any  # pipeline.runtime.base.Runner
    module: Any = None  # torch.nn.Module for torch artifacts (firing rates, SOPs)
    T: int | None = None


@dataclass
class Artifact:
    """One row of the report before it is measured."""

    name: str  # "<stage>/<file>", unique in the run
    stage: str
    backend: str  # "torch", "onnxruntime", "tensorrt"
    precision: str  # "fp32", "fp16", "int8"
    T: int | None
    path: Path | None
    gate: str | None = None  # key of validate.gates, None for the baseline
    parent: str | None = None  # artifact it was made from (gate reference in "parent" mode)
    status: str = "ok"  # "ok" or "skipped: <reason>"
    opener: Callable[[], Loaded] | None = None
    energy_from: str | None = None  # graph rows inherit ops from this torch artifact
    notes: list[str] = field(default_factory=list)
    ships: bool = False  # a deployable graph (ONNX, engine): also gated against the float baseline

    @property
    def size_mb(self) -> float | None:
        return self.path.stat().st_size / 2**20 if self.path is not None and self.path.is_file() else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _torch_opener(load: Callable[[], tuple[Any, int | None]], device: str, precision: str,
                  input_shape: tuple[int | None, ...]) -> Callable[[], Loaded]:
    def open_() -> Loaded:
        from pipeline.runtime.torch_runner import TorchRunner

        module, T = load()
        return Loaded(TorchRunner(module, precision=precision, device=device, input_shape=input_shape), module, T)
    return open_


def _float_loader(path: Path) -> Callable[[], tuple[Any, int | None]]:
    def load() -> tuple[Any, int | None]:
        from pipeline.checkpoint import load_model

        model, _ = load_model(path)
        return model, model.T
    return load


def _qat_loader(path: Path, T: int | None) -> Callable[[], tuple[Any, int | None]]:
    def load() -> tuple[Any, int | None]:
        from pipeline.compress.quantize import load_qat_model

        model, _ = load_qat_model(path)
        return model.eval(), getattr(model, "T", T)
    return load


def _unrolled_loader(path: Path) -> Callable[[], tuple[Any, int | None]]:
    def load() -> tuple[Any, int | None]:
        from pipeline.deploy.unroll import load_unrolled

        module, info = load_unrolled(path)
        return module, info.T
    return load


def _ort_opener(path: Path, precision: str) -> Callable[[], Loaded]:
    def open_() -> Loaded:
        from pipeline.runtime.ort_runner import OrtRunner

        return Loaded(OrtRunner(path, precision=precision))
    return open_


def _trt_opener(path: Path, precision: str) -> Callable[[], Loaded]:
    def open_() -> Loaded:
        from pipeline.runtime.trt_runner import TrtRunner

        return Loaded(TrtRunner(path, precision=precision))
    return open_


def _onnx_T(path: Path) -> int | None:
    try:
        from pipeline.deploy.onnx_export import read_metadata

        return int(read_metadata(path).get("T", ""))
    except Exception:  # metadata absent or unreadable: the row still runs
        return None


def _float_at(rows: list[Artifact], T: int | None) -> str:
    """The float torch artifact at ``T`` (baseline or a reduced-T checkpoint)."""
    for a in rows:
        if a.backend == "torch" and a.precision == "fp32" and a.stage in ("train", "reduce_t") and a.T == T:
            return a.name
    return BASELINE


def discover(inputs: dict[str, Path], model_T: int, device: str, input_shape: tuple[int | None, ...]) -> list[Artifact]:
    """Every artifact under the upstream stage folders, baseline first, in pipeline order.

    ``input_shape`` is the model input with ``None`` for the batch axis (torch runners need it
    to build timing inputs).
    """
    rows: list[Artifact] = []
    train = inputs.get("train")
    if train is not None:
        p = train / "best.pt"
        rows.append(Artifact(BASELINE, "train", "torch", "fp32", model_T, p,
                             opener=_torch_opener(_float_loader(p), device, "fp32", input_shape)))

    rt = inputs.get("reduce_t")
    chosen_T = _read_json(rt / "metrics.json").get("chosen_T") if rt else None
    if rt is not None:
        found = []
        for p in rt.glob("t*.pt"):
            m = re.fullmatch(r"t(\d+)\.pt", p.name)
            if m:
                found.append((int(m.group(1)), p))
        for T, p in sorted(found, reverse=True):
            a = Artifact(f"reduce_t/{p.name}", "reduce_t", "torch", "fp32", T, p, gate="reduce_t", parent=BASELINE,
                         opener=_torch_opener(_float_loader(p), device, "fp32", input_shape))
            if T == chosen_T:
                a.notes.append("chosen")
            rows.append(a)

    qat = inputs.get("qat")
    if qat is not None and (qat / "qat.pt").is_file():
        p = qat / "qat.pt"
        T = _read_json(qat / "metrics.json").get("T", chosen_T or model_T)
        rows.append(Artifact("qat/qat.pt", "qat", "torch", "int8", T, p, gate="qat", parent=_float_at(rows, T),
                             opener=_torch_opener(_qat_loader(p, T), device, "int8", input_shape),
                             notes=["fake-quant"]))

    un = inputs.get("unroll")
    if un is not None:
        T_un = _read_json(un / "metrics.json").get("T", chosen_T or model_T)
        for fname, prec in (("float.pt", "fp32"), ("int8.pt", "int8")):
            p = un / fname
            if p.is_file():
                parent = "qat/qat.pt" if prec == "int8" else _float_at(rows, T_un)
                rows.append(Artifact(f"unroll/{fname}", "unroll", "torch", prec, T_un, p, gate="unroll",
                                     parent=parent, opener=_torch_opener(_unrolled_loader(p), device, prec,
                                                                         input_shape),
                                     notes=["unrolled"]))

    ex = inputs.get("export")
    if ex is not None:
        for fname, prec, src in (("model_fp32.onnx", "fp32", "unroll/float.pt"),
                                 ("model_int8.onnx", "int8", "unroll/int8.pt")):
            p = ex / fname
            if p.is_file():
                rows.append(Artifact(f"export/{fname}", "export", "onnxruntime", prec, _onnx_T(p), p,
                                     gate=f"onnx_{prec}", parent=src, opener=_ort_opener(p, prec), energy_from=src,
                                     ships=True))

    by_name = {a.name: a for a in rows}
    for a in _engines(inputs.get("build")):
        a.T = by_name[a.parent].T if a.parent in by_name else None
        rows.append(a)
    return rows


def _engines(build: Path | None) -> list[Artifact]:
    """Engine rows: one per ``*.engine`` file, or one skipped row per precision with the reason."""
    if build is None:
        return []
    man = _read_json(build / "manifest.json")
    metrics = _read_json(build / "metrics.json") or man.get("metrics", {})
    # whole-sequence engines only: the streaming step engines need a stateful driver, not predict()
    engines = sorted(p for p in build.rglob("*.engine") if p.name.startswith("model"))
    if man.get("status") == "skipped" or not engines:
        reason = man.get("reason") or metrics.get("reason") or "no engine was built"
        precisions = metrics.get("precisions") or ["fp16", "int8"]
        return [Artifact(f"build/model_{p}.engine", "build", "tensorrt", p, None, None, gate="engine",
                         parent=f"export/model_{'int8' if p == 'int8' else 'fp32'}.onnx",
                         status=f"skipped: {reason}", ships=True) for p in precisions]
    rows = []
    for p in engines:
        prec = next((q for q in ("int8", "fp16", "fp32") if q in p.stem.lower()), "fp32")
        src = f"export/model_{'int8' if prec == 'int8' else 'fp32'}.onnx"
        rows.append(Artifact(f"build/{p.relative_to(build)}", "build", "tensorrt", prec, None, p, gate="engine",
                             parent=src, opener=_trt_opener(p, prec),
                             energy_from="unroll/int8.pt" if prec == "int8" else "unroll/float.pt", ships=True))
    return rows





def upstream_parity(inputs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """``{"<stage>/<graph>": parity metrics}`` as the unroll and export stages reported them.

    Why copied, not recomputed: those stages already compared each graph with its source on
    real images, layer by layer (max abs diff of the logits, top-1 mismatches, spike agreement
    per neuron layer); the report repeats their numbers so that one file tells the whole story.
    """
    out: dict[str, dict[str, Any]] = {}
    for stage in ("unroll", "export"):
        folder = inputs.get(stage)
        if folder is None:
            continue
        for graph, value in _read_json(folder / "metrics.json").items():
            if isinstance(value, dict) and isinstance(value.get("parity"), dict):
                out[f"{stage}/{graph}"] = dict(value["parity"])
    return out


__all__ = ["Artifact", "BASELINE", "Loaded", "discover", "upstream_parity"]
