"""The stage registry: the one table that names every stage, what it reads and what it makes.

The CLI (`python -m pipeline.stage NAME`), `python -m pipeline run|status`, the Makefile's
targets, the cache keys and the report all read this table, so adding a stage is one module
under ``stages/`` plus one row here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str
    needs: tuple[str, ...]  # upstream stages whose finished outputs this stage reads
    config_keys: tuple[str, ...]  # config sections in this stage's cache key (upstream keys chain in)
    produces: tuple[str, ...]  # the main files, for docs and status
    help: str
    # may run as several processes (torchrun, WORLD_SIZE > 1); the runner refuses the others before any work
    distributed: bool = False

    @property
    def module(self) -> str:
        return f"stages.{self.name}"


STAGES: tuple[StageSpec, ...] = (
    StageSpec("train", (), ("seed", "data", "model", "train"),
              ("best.pt", "last.pt", "metrics.json", "tb/"),
              "train the float STAA-SNN at model.T time steps", distributed=True),
    StageSpec("reduce_t", ("train",), ("reduce_t", "validate.gates.reduce_t"),
              ("t{T}.pt for each T in reduce_t.steps", "metrics.json"),
              "fine-tune at fewer time steps, optionally distilling from the T-step teacher"),
    StageSpec("qat", ("train", "reduce_t"), ("qat",),
              ("qat.pt", "nncf_config.json", "metrics.json"),
              "NNCF INT8 quantisation-aware fine-tuning (symmetric, per-channel weights)"),
    StageSpec("unroll", ("train", "reduce_t", "qat"), ("unroll",),
              ("float.pt", "int8.pt", "metrics.json"),
              "static, stateless modules: fixed T, BN folded, hard spikes; parity gates"),
    StageSpec("export", ("unroll",), ("export",),
              ("model_fp32.onnx", "model_int8.onnx", "step_fp32.onnx", "trt_check.json"),
              "ONNX FP32 and INT8 (QDQ) with dynamic batch, a streaming graph, static TensorRT check"),
    StageSpec("build", ("export",), ("build",),
              ("*.engine or skipped record", "build_engines.sh", "JETSON.md"),
              "TensorRT FP16/INT8 engines, or a skipped record and a trtexec script for the target"),
    StageSpec("validate", ("train", "reduce_t", "qat", "unroll", "export", "build"), ("validate",),
              ("report.md", "report.json", "*.png"),
              "accuracy, agreement, latency, firing rates and energy of every artifact; gates"),
)

BY_NAME: dict[str, StageSpec] = {s.name: s for s in STAGES}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def spec(name: str) -> StageSpec:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages are: {', '.join(NAMES)}") from None
