"""Build TensorRT 10 engines from ONNX with the Python API (the same recipe as build_engines.sh).

One :class:`EngineSpec` describes an engine; the build stage writes them to ``bundle.json`` so
that the device (``python3 -m staa_runtime build``) and the trtexec script build the very same
engines. A :class:`BuildRequest` (the specs, the bundle folder, the log level) is what a build call
takes. Recipes:

- ``fp16``: weakly typed network, ``BuilderFlag.FP16``. With ``fp32_scopes`` every layer whose
  name falls in a neuron scope (membrane arithmetic, threshold compare) is pinned to FP32
  (layer precision + float output types, ``OBEY_PRECISION_CONSTRAINTS``): a spike threshold is
  discontinuous, so FP16 rounding of the membrane flips spikes (docs/architecture.md §5).
  trtexec equivalent: ``--precisionConstraints=obey --layerPrecisions=<layer>:fp32,...
  --layerOutputTypes=<layer>:fp32,...``.
- ``int8``: explicit quantisation, ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (types come
  from the Q/DQ graph; builder precision flags are not allowed there). Parts outside Q/DQ pairs,
  the neurons included, run in the ONNX types, i.e. FP32. trtexec: ``--stronglyTyped``.
- ``fp32``: no precision flag (a reference engine).

Every build: one optimisation profile over the batch axis (min/opt/max), a workspace limit,
a persistent timing cache, detailed profiling verbosity, the builder log and the engine's
layer information (``IEngineInspector``, JSON).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

PRECISIONS = ("fp16", "int8", "fp32")


@dataclass
class EngineSpec:
    """One engine to build. Paths are relative to the bundle folder."""

    name: str  # e.g. "model_fp16"
    onnx: str
    precision: str  # fp16 | int8 | fp32
    inputs: dict[str, list[int]]  # input name -> dims, -1 for the (dynamic) batch axis
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64
    workspace_mb: int = 1024
    fp32_scopes: list[str] = field(default_factory=list)  # API path: layer-name scopes pinned to FP32
    fp32_layers: list[str] = field(default_factory=list)  # trtexec path: --layerPrecisions names
    fp32_outputs: dict[str, int] = field(default_factory=dict)  # trtexec: --layerOutputTypes name -> outputs
    timing_cache: str = "timing.cache"

    @property
    def engine(self) -> str:
        return f"{self.name}.engine"

    @property
    def layer_info(self) -> str:
        return f"{self.name}.layers.json"

    @property
    def log(self) -> str:
        return f"{self.name}.build.log"

    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Every input's shape with the batch axis set to ``batch``."""
        return {n: tuple(batch if d == -1 else d for d in dims) for n, dims in self.inputs.items()}

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"{self.name}: precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"{self.name}: need 1 <= min_batch <= opt_batch <= max_batch, got "
                             f"{self.min_batch}/{self.opt_batch}/{self.max_batch}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineSpec":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class BuildRequest:
    """One call to build engines: what :meth:`TensorRTBackend.build` takes, so that the build stage and
    the device CLI (``python3 -m staa_runtime build``) ask for the very same thing.

    ``engines`` carry everything per engine (ONNX file, precision, batch profile, workspace, FP32
    scopes, timing cache name); ``folder`` is the bundle folder: the ONNX graphs are read from it and
    the engines, build logs, layer information and the shared timing cache are written into it.
    Every spec is checked when the request is made, before anything is built.
    """

    folder: Path
    engines: tuple[EngineSpec, ...]
    verbose: bool = False  # the builder log at VERBOSE instead of INFO

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))
        object.__setattr__(self, "engines", tuple(self.engines))
        names = [e.name for e in self.engines]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"engine names repeat in one build request: {', '.join(repeated)}")
        for spec in self.engines:
            spec.validate()


class BuildError(RuntimeError):
    """TensorRT could not parse or build; the message names the engine and points at its log."""


def _file_logger(trt: Any, path: Path | None, verbose: bool) -> Any:
    """A ``trt.ILogger`` that appends every message to ``path`` (the build log)."""

    class FileLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[str] = []
            self.min_severity = trt.ILogger.Severity.VERBOSE if verbose else trt.ILogger.Severity.INFO

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(self.min_severity):
                line = f"[{str(severity).split('.')[-1]}] {msg}"
                self.lines.append(line)
                if path is not None:
                    with open(path, "a") as f:
                        f.write(line + "\n")

    return FileLogger()


def pin_fp32(trt: Any, network: Any, scopes: Sequence[str]) -> list[str]:
    """Pin layers whose name contains a scope to FP32 (precision and float outputs); returns their names."""
    floats = (trt.float32, trt.float16)
    skip = {trt.LayerType.CONSTANT, trt.LayerType.SHAPE}
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in skip or not any(s in layer.name for s in scopes):
            continue
        float_in = any(layer.get_input(j) is not None and layer.get_input(j).dtype in floats
                       for j in range(layer.num_inputs))
        if float_in:
            layer.precision = trt.float32
        for k in range(layer.num_outputs):
            if layer.get_output(k).dtype in floats:
                layer.set_output_type(k, trt.float32)
        pinned.append(layer.name)
    return pinned


def build_engine(spec: EngineSpec, folder: Path, verbose: bool = False) -> dict[str, Any]:
    """Build ``spec`` inside ``folder`` (ONNX read from there, engine/log/layer info written there)."""
    import tensorrt as trt

    spec.validate()
    folder = Path(folder)
    onnx_path = folder / spec.onnx
    log_path = folder / spec.log
    log_path.write_text(f"# TensorRT {trt.__version__}: {spec.name} from {spec.onnx} ({spec.precision})\n")
    logger = _file_logger(trt, log_path, verbose)
    start = time.perf_counter()
    builder = trt.Builder(logger)
    flags = 0
    if spec.precision == "int8":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{spec.name}: TensorRT cannot parse {spec.onnx}: {errors} (log: {log_path})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_mb) << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    pinned: list[str] = []
    if spec.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        if spec.fp32_scopes:
            pinned = pin_fp32(trt, network, spec.fp32_scopes)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)
        if any(d < 0 for d in dims[1:]):
            raise BuildError(f"{spec.name}: input {tensor.name} has a dynamic non-batch axis {dims}; "
                             f"only the batch may be dynamic (see trt_check.json)")
        if dims and dims[0] < 0:
            shapes = [tuple([b] + dims[1:]) for b in (spec.min_batch, spec.opt_batch, spec.max_batch)]
            profile.set_shape(tensor.name, *shapes)
    config.add_optimization_profile(profile)
    cache_path = folder / spec.timing_cache
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"{spec.name}: TensorRT could not build the engine; see {log_path}")
    engine_path = folder / spec.engine
    engine_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(bytes(serialized))
    inspector = engine.create_engine_inspector()
    info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    (folder / spec.layer_info).write_text(info)
    try:
        n_layers = len(json.loads(info).get("Layers", []))
    except (ValueError, AttributeError):
        n_layers = None
    return {"engine": spec.engine, "precision": spec.precision, "bytes": engine_path.stat().st_size,
            "build_s": round(time.perf_counter() - start, 2), "engine_layers": n_layers,
            "fp32_pinned_layers": len(pinned), "tensorrt": trt.__version__, "log": spec.log,
            "layer_info": spec.layer_info}


def build_all(request: BuildRequest) -> dict[str, dict[str, Any]]:
    """Build every engine of ``request``; one failure is recorded (with its message) and the others still build."""
    results: dict[str, dict[str, Any]] = {}
    for spec in request.engines:
        try:
            results[spec.name] = build_engine(spec, request.folder, request.verbose)
        except Exception as exc:  # keep going: one bad graph must not hide the others' results
            results[spec.name] = {"error": f"{type(exc).__name__}: {exc}"}
    return results
