"""``INTEL.md``: the bundle's ONNX graphs on an Intel CPU, iGPU or NPU with OpenVINO (JETSON.md's sibling).

Why a second guide: on a CPU, ONNX Runtime runs the INT8 Q/DQ graph as fake-quant (float
convolutions), while OpenVINO compiles the same file into u8/i8 convolutions, so an Intel
device gets real INT8 speed from the bundle without any rebuild step. The commands below are
the ones the pipeline's own OpenVINO rows use (``pipeline.runtime.backends.openvino``): FP32
inference precision, one stream, fixed threads. The runner compiles an INT8 graph from a Q/DQ-adapted
copy (``pipeline.runtime.backends.openvino_qdq``: OpenVINO's u8 kernels saturate on the raw graph on AVX2
CPUs without VNNI); benchmark_app reads files, so the guide says how to write that copy
(``staa_runtime openvino-adapt``) and what the raw file's numbers mean.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from pipeline.runtime.base import BENCH_DEFAULTS


def ov_shape(inputs: Mapping[str, Sequence[int | str | None]], batch: int = 1) -> str:
    """benchmark_app's ``-shape`` value, e.g. ``input[1,1,16,16]`` (the batch axis set to ``batch``)."""
    parts = []
    for name, dims in inputs.items():
        fixed = [batch if i == 0 else d for i, d in enumerate(dims)]
        parts.append(f"{name}[{','.join(str(d) for d in fixed)}]")
    return ",".join(parts)


def render_intel_guide(graphs: Mapping[str, Mapping[str, Sequence[int | str | None]]], meta: Mapping[str, str],
                       fp32_graph: str, int8_graph: str) -> str:
    """``INTEL.md`` for the whole-sequence graphs in ``graphs`` (file name -> input name -> dims);
    ``fp32_graph``/``int8_graph``: the float and Q/DQ graphs' file names (the build stage's)."""
    names = [g for g in (fp32_graph, int8_graph) if g in graphs]
    first = names[0] if names else fp32_graph
    int8 = int8_graph if int8_graph in graphs else first
    adapted = f"{int8[:-5]}_ov.onnx"
    shape1 = ov_shape(graphs.get(first, {"input": [-1, "C", "H", "W"]}), 1)
    threads = BENCH_DEFAULTS["threads"]
    bench = "\n".join(
        f"    benchmark_app -m {g} -d CPU -shape \"{ov_shape(graphs[g], 1)}\" -infer_precision f32 \\\n"
        f"        -hint none -nstreams 1 -nthreads {threads} -api sync -t 10 -exec_graph_path {g[:-5]}.exec.xml"
        for g in names)
    adapted_bench = ""
    if int8_graph in graphs:
        adapted_bench = (
            f"\n\nThe runner (section 2) does not compile `{int8}` as it is: it adapts its Q/DQ pairs first (spike\n"
            f"pairs to uint8 with zero point 0, the other activation pairs to the same arithmetic in float), because\n"
            f"on CPUs without VNNI (AVX2 only: no `avx512_vnni`, `avx_vnni` or `amx_int8` in /proc/cpuinfo)\n"
            f"OpenVINO's "
            f"u8 kernels add pairs of products in a saturating int16, and a spike shifted to u8 (255) times\n"
            f"a weight of 127 saturates: the raw graph's predictions change (61.7% agreement with exact Q/DQ on the default\n"
            f"model). So **benchmark_app on `{int8}` measures the unadapted graph**: its speed is representative\n"
            f"(the spike-fed convolutions, about 99% of the convolution MACs, run the same u8 kernels either way),\n"
            f"its accuracy on AVX2-without-VNNI CPUs is not. To run or time exactly\n"
            f"what the runner runs, write the adapted file (needs `pip install onnx`; the original stays\n"
            f"TensorRT's int8 graph) and give it to benchmark_app or any OpenVINO tool:\n\n"
            f"    python3 -m staa_runtime openvino-adapt {int8} -o {adapted}\n"
            f"    benchmark_app -m {adapted} -d CPU -shape \"{ov_shape(graphs[int8_graph], 1)}\" "
            f"-infer_precision f32 \\\n"
            f"        -hint none -nstreams 1 -nthreads {threads} -api sync -t 10 "
            f"-exec_graph_path {adapted[:-5]}.exec.xml")
    return f"""# Running this model on an Intel CPU, iGPU or NPU (OpenVINO)

The ONNX graphs of this folder run as they are with OpenVINO: no build step, no conversion.
On a CPU this is where the INT8 graph runs on integer kernels: ONNX Runtime's CPU provider
runs the same Q/DQ file as DequantizeLinear -> float Conv (fake-quant), OpenVINO compiles its
convolutions into u8/i8 kernels (as TensorRT does on a Jetson).

Model: {meta.get('dataset', '?')}, T={meta.get('T', '?')} time steps, {meta.get('num_classes', '?')} classes.
Input: {meta.get('input_layout', '?')}; mean {meta.get('mean', '?')}, std {meta.get('std', '?')}.
Graphs: {', '.join(f'`{g}`' for g in names) or '-'} (dynamic batch; the same files JETSON.md builds engines from).

## 1. Install
    python3 -m pip install openvino==2026.4.1 onnx numpy    # x86-64 or ARM64; includes benchmark_app
                                                            # (onnx: the runner adapts the INT8 graph with it)
    python3 -c "import openvino as ov; print(ov.Core().available_devices)"   # e.g. ['CPU', 'GPU', 'NPU']

## 2. Check accuracy and time it (the pipeline's runner)
    python3 -m staa_runtime check                                        # lists openvino and its devices
    python3 -m staa_runtime predict {int8} --backend openvino    # top-1 on sample_inputs.npz, agreement with float
    python3 -m staa_runtime bench {int8} --backend openvino --batch 1
    python3 -m staa_runtime executed {int8} --backend openvino   # which convolutions ran in int8

The runner compiles for `CPU` with `INFERENCE_PRECISION_HINT=f32` (float parts stay true FP32:
on CPUs with AVX512-BF16/AMX OpenVINO would otherwise pick bf16, and a spike threshold is
discontinuous, so bf16 can flip spikes), one stream and `INFERENCE_NUM_THREADS` = `--threads`
(default {threads}, as in the report; `--threads 0` leaves OpenVINO's default). `bench` prints the
same statistics as the report's rows ({BENCH_DEFAULTS['warmup']} warm-up calls, then at least
{BENCH_DEFAULTS['iters']} calls and {BENCH_DEFAULTS['min_seconds']} s). iGPU/NPU: from Python,
`staa_runtime.OpenVinoRunner("{int8}", device="GPU")`; the runner compiles the dynamic-batch
graph, which an NPU may refuse (use benchmark_app with a fixed `-shape` there). The executed-precision
count reads the CPU plugin's runtime model (`runtimePrecision` per node); it was written and
checked for `CPU`. For an INT8 graph the runner compiles an adapted copy (section 3) and says so:
`executed` prints `qdq_adaptation` (how many Q/DQ pairs were adapted, and how).

## 3. benchmark_app (OpenVINO's own timer)
Batch 1, the shape written as `name[dims]` (JETSON.md's trtexec `--shapes=input:1x...` in
OpenVINO's syntax), FP32 inference precision, one stream and one thread like the report:

{bench}{adapted_bench}

`-hint latency` (drop `-hint none -nstreams 1 -nthreads {threads}`) lets OpenVINO pick streams and
threads for the lowest latency; `-hint throughput -shape "{shape1.replace('[1,', '[32,', 1)}"` measures
throughput at batch 32. `-d GPU` / `-d NPU` run on the iGPU / NPU (`-shape` fixes the batch, which the NPU needs).
Read `Latency: Median` (compare with `staa_runtime bench`'s p50, which adds Python and numpy
overhead) and `Throughput` (FPS: inferences per second; images per second is FPS times the batch).

## 4. "int8 ops executed"
The validation report's column *int8 ops executed* (`k/n`) counts the convolutions and
matmuls/gemms that the runtime ran on integer (u8/i8) kernels, of all it ran, read from the
runtime's own executed graph, never from the file name; *int8 MACs %* is the share of the
convolution multiply-accumulates that ran on integer kernels. For OpenVINO it is read from
`compiled_model.get_runtime_model()`: every node's `runtimePrecision` (u8/i8 = integer) and
`primitiveType` (the kernel, e.g. `jit_avx2_I8` on an AVX2 CPU). `staa_runtime executed`
prints it; benchmark_app's `-exec_graph_path` writes the same graph to XML, where

    grep -A1 'type="Convolution"' {int8[:-5]}.exec.xml | grep -o 'runtimePrecision="[a-z0-9]*"' | sort | uniq -c

counts the convolutions by precision. An INT8 row whose convolutions all ran in float is
labelled **fake-quant** in the report: its accuracy is the INT8 model's, its speed is not INT8 speed.

## 5. A static shape runs other kernels
The counts belong to one compiled model, not to the file. OpenVINO picks kernels per compiled
shape: the embedded default's INT8 graph compiled with its dynamic batch (as the runner and the
report's main table do) ran 18 of 53 convolutions in u8 (99.5% of the convolution MACs) on the
CPU this was written on, and the same adapted graph reshaped to a static batch of 1 or 32
(`-shape` in benchmark_app, `model.reshape` in code, what an NPU or a fixed-batch deployment
does) ran 12 of 53 (60.0%), and was still faster there (batch 1: 1.5 ms static vs 7.0 ms
dynamic, one thread). The validation report's section *Executed precision per compiled shape*
gives both for this run's graphs, each timing next to the counts of the compile it timed: pick
the compile by its measured latency, and quote its speed as INT8 speed only with its own counts.
The dynamic-batch graph as it is keeps the integer kernels at batch 1 (`staa_runtime bench {int8}
--backend openvino --batch 1` runs it); a static shape is what benchmark_app's `-shape` and an NPU
compile, so check what it runs (`-exec_graph_path` above) on the target.

## 6. Streaming and adaptive time steps (step graphs)
`step_fp32.onnx` / `step_int8.onnx` (when present: causal step attention) run one time step per call
in OpenVINO too; the runner carries the state, and with the exit on stops each sample once its running
logits are confident (tau chosen on the validation split by the validate stage, in report.json):

    python3 -m staa_runtime predict step_int8.onnx --backend openvino --exit-from report.json
    python3 -m staa_runtime predict step_int8.onnx --backend openvino --early-exit 0.9
"""


__all__ = ["ov_shape", "render_intel_guide"]
