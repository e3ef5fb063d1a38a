"""The target-side build recipe: ``build_engines.sh`` (trtexec) and ``JETSON.md``.

Engines are tied to one GPU model and TensorRT version, so where this machine has no TensorRT
the build stage ships a script that builds, on the device, exactly what the Python API path
(:mod:`pipeline.runtime.backends.tensorrt_build`) would: same profile, precision recipe, FP32 neurons,
timing cache and layer information.

The flags come from ``trtexec --help`` of TensorRT 10 (samples/trtexec and
samples/common/sampleOptions.cpp in NVIDIA/TensorRT); :data:`TRTEXEC_FLAGS` lists the ones used
here with their value grammar, and :func:`validate_args` checks a command against it.
Notes from that help: ``--stronglyTyped`` forbids precision flags such as ``--int8`` (the Q/DQ
nodes carry the types); ``--layerPrecisions``/``--layerOutputTypes`` only act with
``--precisionConstraints=obey|prefer`` and allow at most one ``*`` per layer name, so neuron
layers are listed by name; ``--memPoolSize`` sizes default to MiB.
"""
from __future__ import annotations

import re
import shlex
from typing import Callable, Sequence

from pipeline.runtime.base import BENCH_DEFAULTS
from pipeline.runtime.backends.tensorrt_build import EngineSpec

_SHAPES = re.compile(r"^[^:,]+:\d+(x\d+)*(,[^:,]+:\d+(x\d+)*)*$")
_TYPE = r"(fp32|fp16|bf16|int32|int8)"
_PRECISION_SPEC = re.compile(rf"^[^:,]+:{_TYPE}(,[^:,]+:{_TYPE})*$")
_OUTPUT_TYPES_SPEC = re.compile(rf"^[^:,]+:{_TYPE}(\+{_TYPE})*(,[^:,]+:{_TYPE}(\+{_TYPE})*)*$")
_POOL = re.compile(r"^(workspace|dlaSRAM|dlaLocalDRAM|dlaGlobalDRAM|tacticSharedMem):\d+(\.\d+)?[BKMG]?"
                   r"(,(workspace|dlaSRAM|dlaLocalDRAM|dlaGlobalDRAM|tacticSharedMem):\d+(\.\d+)?[BKMG]?)*$")

# flag -> value check (None: a switch that takes no value)
TRTEXEC_FLAGS: dict[str, Callable[[str], bool] | None] = {
    "--onnx": lambda v: v.endswith(".onnx"),
    "--saveEngine": lambda v: bool(v),
    "--loadEngine": lambda v: bool(v),
    "--fp16": None,
    "--int8": None,
    "--stronglyTyped": None,
    "--minShapes": lambda v: bool(_SHAPES.match(v)),
    "--optShapes": lambda v: bool(_SHAPES.match(v)),
    "--maxShapes": lambda v: bool(_SHAPES.match(v)),
    "--shapes": lambda v: bool(_SHAPES.match(v)),
    "--memPoolSize": lambda v: bool(_POOL.match(v)),
    "--timingCacheFile": lambda v: bool(v),
    "--profilingVerbosity": lambda v: v in ("layer_names_only", "detailed", "none"),
    "--exportLayerInfo": lambda v: bool(v),
    "--exportProfile": lambda v: bool(v),
    "--precisionConstraints": lambda v: v in ("none", "prefer", "obey"),
    "--layerPrecisions": lambda v: bool(_PRECISION_SPEC.match(v)),
    "--layerOutputTypes": lambda v: bool(_OUTPUT_TYPES_SPEC.match(v)),
    "--skipInference": None,
    "--verbose": None,
    "--iterations": lambda v: v.isdigit(),
    "--warmUp": lambda v: v.isdigit(),
    "--duration": lambda v: v.isdigit(),
    "--useCudaGraph": None,
}


def validate_args(args: Sequence[str]) -> list[str]:
    """Problems with one trtexec command's arguments (empty when every flag and value is valid)."""
    problems = []
    seen = set()
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag not in TRTEXEC_FLAGS:
            problems.append(f"unknown trtexec flag {flag}")
            continue
        check = TRTEXEC_FLAGS[flag]
        if check is None and eq:
            problems.append(f"{flag} takes no value")
        elif check is not None and not (eq and check(value)):
            problems.append(f"bad value for {flag}: {value!r}")
        seen.add(flag)
    if "--stronglyTyped" in seen and seen & {"--fp16", "--int8"}:
        problems.append("--stronglyTyped cannot be combined with --fp16/--int8")
    if ("--layerPrecisions" in seen or "--layerOutputTypes" in seen) and "--precisionConstraints" not in seen:
        problems.append("--layerPrecisions needs --precisionConstraints=obey|prefer")
    return problems


def _shape_spec(spec: EngineSpec, batch: int) -> str:
    return ",".join(f"{n}:{'x'.join(str(d) for d in dims)}" for n, dims in spec.shapes(batch).items()
                    if -1 in spec.inputs[n])


def trtexec_args(spec: EngineSpec) -> list[str]:
    """The trtexec arguments that build ``spec`` (paths relative to the bundle folder)."""
    spec.validate()
    args = [f"--onnx={spec.onnx}", f"--saveEngine={spec.engine}"]
    if spec.precision == "fp16":
        args.append("--fp16")
    elif spec.precision == "int8":
        args.append("--stronglyTyped")
    if any(-1 in dims for dims in spec.inputs.values()):
        args += [f"--minShapes={_shape_spec(spec, spec.min_batch)}", f"--optShapes={_shape_spec(spec, spec.opt_batch)}",
                 f"--maxShapes={_shape_spec(spec, spec.max_batch)}"]
    args += [f"--memPoolSize=workspace:{int(spec.workspace_mb)}", f"--timingCacheFile={spec.timing_cache}",
             "--profilingVerbosity=detailed", f"--exportLayerInfo={spec.layer_info}", "--skipInference"]
    if spec.precision == "fp16" and spec.fp32_layers:
        args.append("--precisionConstraints=obey")
        args.append("--layerPrecisions=" + ",".join(f"{n}:fp32" for n in spec.fp32_layers))
        if spec.fp32_outputs:
            args.append("--layerOutputTypes=" + ",".join(f"{n}:{'+'.join(['fp32'] * k)}"
                                                          for n, k in spec.fp32_outputs.items()))
    return args


_HEADER = """#!/usr/bin/env bash
# Build this bundle's TensorRT engines on the target device (written by the pipeline's build stage).
# Engines are tied to the GPU model and the TensorRT version: build them where they will run.
# Needs TensorRT 10 (JetPack 6.x); trtexec usually lives in /usr/src/tensorrt/bin on a Jetson.
# Same recipe as `python3 -m staa_runtime build` (TensorRT Python API): one batch profile,
# FP16 with neuron layers pinned to FP32, INT8 strongly typed from the Q/DQ graph (no --int8:
# trtexec refuses precision flags with --stronglyTyped), a shared timing cache, layer info JSON.
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"
[ -x "$TRTEXEC" ] || { echo "trtexec not found: set TRTEXEC=/path/to/trtexec" >&2; exit 1; }
"""


# trtexec timing of each built engine: batch 1, at least TIMING_ITERATIONS inferences and
# TIMING_SECONDS seconds after TIMING_WARMUP_MS of warm-up (JETSON.md explains the summary)
TIMING_WARMUP_MS = 500
TIMING_ITERATIONS = 100
TIMING_SECONDS = 3


def timing_args(spec: EngineSpec, batch: int = 1) -> list[str]:
    """trtexec arguments that load ``spec``'s engine and time it (inference on: no --skipInference)."""
    args = [f"--loadEngine={spec.engine}"]
    if any(-1 in dims for dims in spec.inputs.values()):
        args.append(f"--shapes={_shape_spec(spec, batch)}")
    return args + [f"--warmUp={TIMING_WARMUP_MS}", f"--iterations={TIMING_ITERATIONS}", f"--duration={TIMING_SECONDS}"]


def timing_log(spec: EngineSpec) -> str:
    return f"{spec.name}.timing.log"


def _render_timing(specs: Sequence[EngineSpec]) -> str:
    parts = ['\n# Time each engine with trtexec (batch 1; SKIP_TIMING=1 skips this). The summary lands in\n'
             '# <name>.timing.log under "=== Performance summary ===": JETSON.md explains its lines.\n'
             'if [ "${SKIP_TIMING:-0}" != 1 ]; then\n']
    for spec in specs:
        log = shlex.quote(timing_log(spec))
        command = " \\\n    ".join(['"$TRTEXEC"'] + [shlex.quote(a) for a in timing_args(spec)])
        parts.append(f'echo "timing {spec.engine} (batch 1) ..."\n'
                     f"{command} \\\n    > {log} 2>&1 \\\n"
                     f'  || {{ echo "timing {spec.engine} failed; see {timing_log(spec)}" >&2; exit 1; }}\n'
                     f'grep -E "Throughput|] Latency|GPU Compute Time" {log} || true\n')
    parts.append("fi\n")
    return "".join(parts)


def render_script(specs: Sequence[EngineSpec]) -> str:
    """The whole ``build_engines.sh``: one trtexec command per engine, each logging to ``<name>.build.log``,
    then a trtexec timing run of each engine (``<name>.timing.log``)."""
    parts = [_HEADER]
    for spec in specs:
        what = {"fp16": "FP16" + (" (neuron layers FP32)" if spec.fp32_layers else ""),
                "int8": "INT8, explicit Q/DQ, strongly typed", "fp32": "FP32"}[spec.precision]
        parts.append(f"\n# {spec.name}: {what}, from {spec.onnx}, batch {spec.min_batch}..{spec.max_batch} "
                     f"(opt {spec.opt_batch})\n")
        parts.append(f'echo "building {spec.engine} ..."\n')
        lines = ['"$TRTEXEC"'] + [shlex.quote(a) for a in trtexec_args(spec)]
        log = shlex.quote(spec.log)
        parts.append(" \\\n    ".join(lines) + f" \\\n    > {log} 2>&1 \\\n"
                     f'  || {{ echo "{spec.engine} failed; see {spec.log}" >&2; tail -n 20 {log} >&2; exit 1; }}\n')
    parts.append(_render_timing(specs))
    parts.append('\necho "engines built; check them with: python3 -m staa_runtime predict <name>.engine"\n')
    return "".join(parts)


def parse_script(text: str, which: str = "build") -> list[list[str]]:
    """The trtexec argument lists in a rendered script (for tests and for checking edits by hand).

    ``which``: ``"build"`` (commands with ``--onnx``), ``"time"`` (``--loadEngine``) or ``"all"``.
    """
    joined = text.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if not line.startswith('"$TRTEXEC"'):
            continue
        tokens = shlex.split(line, comments=True)
        args = []
        for tok in tokens[1:]:
            if tok in ("|", "||", ">", "2>&1", "&&") or tok.startswith(">"):
                break
            args.append(tok)
        commands.append(args)
    if which == "all":
        return commands
    flag = {"build": "--onnx=", "time": "--loadEngine="}[which]
    return [c for c in commands if any(a.startswith(flag) for a in c)]


def render_jetson_guide(specs: Sequence[EngineSpec], meta: dict[str, str], graph: str, step: str, samples: str,
                        first_engine: str) -> str:
    """``JETSON.md``: copy, build on the device, check accuracy, time it. ``graph``, ``step``, ``samples``:
    the float, streaming and sample files' names; ``first_engine``: the engine named when none is planned."""
    engines = "\n".join(f"| `{s.engine}` | `{s.onnx}` | {s.precision} | {s.min_batch}/{s.opt_batch}/{s.max_batch} |"
                        for s in specs)
    first = specs[0].engine if specs else first_engine
    return f"""# Running this model on a Jetson (or any GPU with TensorRT 10)

This folder is self-contained: ONNX graphs, `{samples}` (real test images, labels and
the float model's logits), `bundle.json` (the engine recipes), `build_engines.sh` (trtexec) and
`staa_runtime/` (a runner for ONNX Runtime and TensorRT engines; needs numpy, and for engines
`tensorrt` + `torch` with CUDA, as in NVIDIA's JetPack wheels).

Model: {meta.get('dataset', '?')}, T={meta.get('T', '?')} time steps, {meta.get('num_classes', '?')} classes.
Input: {meta.get('input_layout', '?')}; mean {meta.get('mean', '?')}, std {meta.get('std', '?')}.

## 1. Copy the bundle
    rsync -a <artifacts>/<run>/build/ jetson:~/staa_bundle/

## 2. Build the engines on the device
Engines are tied to the GPU model and the TensorRT version, so they are never copied: build them
where they run (JetPack 6.x ships TensorRT 10).

    cd ~/staa_bundle
    ./build_engines.sh                       # trtexec (TRTEXEC=/usr/src/tensorrt/bin/trtexec)
    # or, same recipe through the Python API:
    python3 -m staa_runtime build

| engine | from | precision | batch min/opt/max |
|---|---|---|---|
{engines}

FP16 engines keep the neuron layers (membrane update and threshold compare) in FP32: a spike
threshold is discontinuous and FP16 rounding flips spikes. trtexec does this with
`--precisionConstraints=obey --layerPrecisions=<layer>:fp32,... --layerOutputTypes=<layer>:fp32,...`
(the layer lists are in `build_engines.sh`); the Python API path pins every layer whose name
contains a neuron scope (`fp32_scopes` in `bundle.json`). INT8 engines are built strongly typed
from the explicit Q/DQ graph (`--stronglyTyped`); parts outside Q/DQ pairs run in FP32.
Each build leaves `<name>.build.log`, `<name>.layers.json` (engine layer information) and the
shared `timing.cache` (reused by later builds on the same device).

## 3. Check and time
    python3 -m staa_runtime check                      # which backends work here
    python3 -m staa_runtime predict {first}    # top-1 and agreement with the float model
    python3 -m staa_runtime bench {first} --batch 1
    python3 -m staa_runtime predict {graph}    # ONNX Runtime, no engine needed

`staa_runtime bench` times `predict` the way the pipeline's report does, with the same defaults
({BENCH_DEFAULTS['warmup']} warm-up calls, then at least {BENCH_DEFAULTS['iters']} calls and {BENCH_DEFAULTS['min_seconds']} s, \
{BENCH_DEFAULTS['threads']} CPU thread; `--threads 0` leaves the runtime's default): wall-clock per call from
numpy in to numpy out, copies to and from the GPU included, as an application sees it. It prints p50, p95, p99, min, max, mean and std in ms and
the throughput in images per second.

`build_engines.sh` also times each engine with trtexec after building it (batch 1, at least
{TIMING_ITERATIONS} inferences and {TIMING_SECONDS} s after {TIMING_WARMUP_MS} ms of warm-up;
`SKIP_TIMING=1 ./build_engines.sh` skips it) and writes `<name>.timing.log`. Read its
`=== Performance summary ===`:
- `Throughput: N qps`: inferences per second; one inference is one batch, so images per
  second is N times the batch (1 here).
- `Latency: min, max, mean, median, percentile(90/95/99%)`: host latency of one inference =
  `H2D Latency` (input copy) + `GPU Compute Time` + `D2H Latency` (output copy). The median
  compares with `staa_runtime bench`'s p50, which adds Python and numpy overhead on top.
- `Enqueue Time`: CPU time to launch one inference; when it approaches the GPU compute time the
  CPU is the bottleneck (try `--useCudaGraph`).
- `GPU Compute Time`: the engine alone on the GPU: the number to compare FP16 with INT8.
- `Total Host Walltime` / `Total GPU Compute Time`: the whole timed run; their ratio shows how
  busy the GPU was.
To time another batch size, rerun the timing line from `build_engines.sh` with
`--shapes=input:<B>x...` (within the engine's min/max batch).

## Streaming (event cameras)
If `{step}` is present the model can run one time step at a time: inputs `input`
(one frame), `step` (int64, 0..T-1), the membranes `u_in.<i>` and, for causal step attention,
`sa_in.<j>` (the pooled means of the steps so far, `[B, C, T]`; all zeros at step 0); outputs
`logits_step`, `u_out.<i>` and `sa_out.<j>` (feed them back as `u_in.<i>` / `sa_in.<j>`). The clip's
logits are the mean of `logits_step` over the T steps. `staa_runtime.StepRunner` does this bookkeeping.
`step_int8.onnx`, when present, is the same step with the INT8 graph's Q/DQ quantisers;
`build_engines.sh` builds `step_int8.engine` from it (every `u_in.<i>` / `sa_in.<j>` gets the batch profile).

## Adaptive time steps (early exit)
A sample may stop before T steps once its running-mean logits are confident (top softmax
probability, or top-1 minus top-2 probability, >= tau). tau was chosen on the validation split by
the validate stage (report.json `steps.tau`; the report's "Adaptive time steps" table gives its
mean steps, top-1 and per-sample latency on test):

    python3 -m staa_runtime predict {step} --exit-from report.json   # the validated tau and criterion
    python3 -m staa_runtime predict {step} --early-exit 0.9 --exit-criterion softmax

In your own loop: after each step, `staa_runtime.stream.confidence(logit_sum / (t + 1))` >= tau
stops the clip (`StepRunner.run_early_exit` does this).
"""
