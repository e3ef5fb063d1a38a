"""The Triton backend of the neurons' fused training loop (pipeline/models/kernels) vs the torch path.

The kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, numpy on the CPU) in a child process
(tests/helpers/triton_compare.py): Triton reads the variable when kernels are defined, and no other
test's process may see it. Small shapes, every neuron kind and surrogate the configs can name, fp32,
bf16 and fp16 inputs, and a tiny STAA ResNet under fp32 and bf16 autocast.

Claims: spikes (and the fp32 membranes saved for backward) bit-identical to ``MultiStepLIF``; gradients
within ``NEURON_GRAD_RTOL`` (one layer, fp32) or ``NET_GRAD_RTOL`` (a whole net: rounding carried
through convs and STAA) of the torch path, as max |a - b| / max |b|; low-precision input gradients
within one unit in the last place of their dtype. The interpreter rounds every product and sum on its own
(even ``tl.fma``), so what it cannot show is FMA contraction by the GPU compiler: the kernels are built
with ``enable_fp_fusion=False``, and a test compiles them to sm_90 PTX here (Triton ships ptxas) and checks
that no fp32 multiply-add can be fused; bench/gpu_check_parts.py (part ``kernels``) repeats the
comparisons compiled on CUDA.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.models.kernels import fused_multistep, resolve_kernels, set_kernels, triton_missing

from pipeline.models.kernels.compare import LOW_PRECISION_RTOL, NET_GRAD_RTOL, NEURON_GRAD_RTOL, failures

REPO = Path(__file__).resolve().parents[2]

needs_triton = pytest.mark.skipif(triton_missing() is not None, reason=f"Triton backend: {triton_missing()}")


@pytest.fixture(scope="module")
def report() -> dict:
    """One child process runs every comparison in the interpreter (about 20 s on one core)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself
    proc = subprocess.run([sys.executable, str(REPO / "pipeline" / "models" / "kernels" / "compare.py")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["interpreter"] and doc["device"] == "cpu"
    return {r["case"]: r for r in doc["rows"]}


def _neuron_rows(report: dict, dtype: str) -> list[dict]:
    rows = [r for c, r in report.items() if not c.startswith(("net-", "eval-")) and f"-{dtype}-" in c]
    assert rows, f"no {dtype} case ran"
    for r in rows:  # the comparison is torch path vs Triton kernels, not the torch path twice
        assert r["nodes"] == [["MultiStepLIFBackward"], ["TritonMultiStepLIFBackward"]], r
    return rows


@needs_triton
def test_spikes_and_membranes_bit_identical_fp32(report):
    rows = _neuron_rows(report, "fp32")
    assert {r["case"].split("-")[1] for r in rows} == {"rect", "tanh", "atan"}
    assert {r["case"].split("-")[0] for r in rows} == {"lif", "alif"}
    bad = [r["case"] for r in rows if not (r["spikes_equal"] and r["membranes_equal"])]
    assert not bad, f"spikes or membranes differ from MultiStepLIF: {bad}"
    # the exact-grid inputs put membranes on the threshold, so ">=" and the reset's "<" are exercised
    assert all(r["at_threshold"] > 0 for r in rows if r["case"].endswith("-exact"))
    assert all(0.05 < r["spike_rate"] < 0.95 for r in rows)
    soft = [r for r in rows if r["case"].endswith("-soft")]  # model.neuron.reset: soft runs on Triton too
    assert {r["case"].split("-")[0] for r in soft} == {"lif", "alif"}
    assert all(r["at_threshold"] > 0 for r in soft if "-exact" in r["case"])


@needs_triton
def test_gradients_within_tolerance_fp32(report):
    worst = {}
    for r in _neuron_rows(report, "fp32"):
        for k, v in r.items():
            if k.startswith("grad_") and k.endswith("_rel"):
                assert v is not None or (k == "grad_decay_rel" and r["case"].startswith("alif-rect-fp32-1x")), (
                    r["case"], k)
                if v is not None:
                    assert isinstance(v, float), (r["case"], k, v)
                    worst[(r["case"], k)] = v
    assert max(worst.values()) <= NEURON_GRAD_RTOL, max(worst.items(), key=lambda kv: kv[1])
    # ALIF's per-channel gradients were compared (and T = 1 gives no decay gradient, as autograd)
    assert any(k[1] == "grad_decay_rel" for k in worst) and any(k[1] == "grad_gain_rel" for k in worst)
    assert report["alif-rect-fp32-1x2x3x4x4"]["grad_decay_rel"] is None


@needs_triton
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_inputs(report, dtype):
    """bf16/fp16 input current: computed in fp32 as the torch path; spikes and input gradients in the
    input's dtype, equal spikes, gradients within one ulp."""
    for r in _neuron_rows(report, dtype):
        want = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}[dtype]
        assert r["spike_dtype"] == [want, want] and r["grad_dtype"] == [want, want], r
        assert r["spikes_equal"], r["case"]
        assert r["grad_x_rel"] <= LOW_PRECISION_RTOL[want], r
        for k in ("grad_decay_rel", "grad_gain_rel"):
            if k in r:
                assert r[k] <= NEURON_GRAD_RTOL, r


@needs_triton
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_whole_net_training_step(report, dtype):
    """A tiny STAA ResNet-19 (ALIF, rect) on the Triton backend: the same logits bit for bit, under fp32
    and under bf16 autocast; every parameter gradient within rounding of the torch path's."""
    r = report[f"net-{dtype}"]
    n = r["neurons"]
    assert r["fused_nodes"] == [{"MultiStepLIFBackward": n}, {"TritonMultiStepLIFBackward": n}], r
    assert r["logits_equal"], r
    assert r["grads_compared"] > 100, r
    assert r["grad_worst_rel"] <= NET_GRAD_RTOL, r


@needs_triton
def test_evaluation_and_tracing_never_load_the_kernels(report):
    r = report["eval-paths"]
    assert not r["loaded_by_eval"] and not r["loaded_by_trace"], r


@needs_triton
def test_the_gpu_check_judges_the_report_as_the_tests_do(report):
    """bench/gpu_check_parts.py (part kernels) reads the same report compiled on CUDA with ``failures``."""
    rows = list(report.values())
    assert failures(rows) == []
    broken = [dict(r, spikes_equal=False) if r["case"].startswith("alif-rect-fp32") else r for r in rows]
    assert any("spikes or membranes differ" in f for f in failures(broken))


# --- FMA contraction: the kernels compiled to PTX here (Triton ships ptxas; no GPU needed) ---------------

PTX_TARGET = ("cuda", 90, 32)  # sm_90 (H100 / H200)
FP32_ARITH = re.compile(r"\b((?:fma|mad|mul|add|sub)(?:\.\w+)*\.f32)\b")


def _ptx(kernel: str, consts: dict, dtypes: dict, options: dict) -> str:
    """PTX of ``triton_lif.<kernel>`` specialised on ``consts``; pointers fp32 unless ``dtypes`` says otherwise."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pipeline.models.kernels import triton_lif

    fn = getattr(triton_lif, kernel)
    sig = {a: "constexpr" if a in consts else dtypes.get(a, "*fp32") if a.endswith("_ptr") else
           "i32" if a in ("R", "S", "C", "N") else "fp32" for a in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget(*PTX_TARGET),
                          options=options).asm["ptx"]


def _contracted(ptx: str) -> list[str]:
    """fp32 multiply / add instructions the GPU may fuse or contract: FMAs, and mul/add/sub without ``.rn``
    (PTX lets ptxas contract those into FMAs; ``.rn`` ones it may not)."""
    return [op for op in FP32_ARITH.findall(ptx) if op.startswith(("fma", "mad")) or ".rn." not in op]


needs_ptx = pytest.mark.skipif(triton_missing() is not None or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                               reason="needs triton, not in interpreter mode (kernels compiled to PTX)")
FWD = {"T": 4, "PER_CHANNEL": True, "SOFT": False, "BLOCK_R": 4, "BLOCK_S": 256}
BWD = {"T": 4, "PER_CHANNEL": True, "SOFT": False, "NEED_GX": True, "NEED_GM": True, "NEED_GN": True, "BLOCK_R": 4,
       "BLOCK_S": 256}


@needs_ptx
@pytest.mark.parametrize("kernel, consts, dtypes", [
    ("_lif_fwd", FWD, {}),
    ("_lif_fwd", dict(FWD, SOFT=True), {}),
    ("_lif_fwd", dict(FWD, PER_CHANNEL=False), {"x_ptr": "*bf16", "s_ptr": "*bf16"}),
    *(("_lif_bwd", dict(BWD, SURROGATE=k), {"gs_ptr": "*bf16", "x_ptr": "*bf16"} if k else {}) for k in (0, 1, 2)),
    ("_lif_bwd", dict(BWD, SURROGATE=0, SOFT=True), {}),
])
def test_kernels_compile_without_fma_contraction(kernel, consts, dtypes):
    """The GPU rounds like the torch path only if no ``a * b + c`` becomes one FMA (one rounding instead of
    two): the interpreter cannot show it (it rounds every op, even ``tl.fma``), the PTX can."""
    from pipeline.models.kernels.triton_lif import LAUNCH

    ptx = _ptx(kernel, consts, dtypes, LAUNCH)
    assert FP32_ARITH.findall(ptx), "no fp32 arithmetic found: the PTX pattern is stale"
    assert _contracted(ptx) == []
    if kernel == "_lif_fwd":  # the check can fail: Triton's default (fusion on) contracts the forward
        assert _contracted(_ptx(kernel, consts, dtypes, dict(LAUNCH, enable_fp_fusion=True)))


# --- the setting: no Triton needed --------------------------------------------------------------

def test_resolve_kernels():
    assert resolve_kernels("torch", "cuda") == "torch"
    assert resolve_kernels("auto", "cpu") == "torch"
    assert resolve_kernels("auto", "cuda:0") == ("torch" if triton_missing() else "triton")
    with pytest.raises(ValueError, match="train.kernels"):
        resolve_kernels("cuda-graphs", "cuda")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises(ValueError, match="needs a CUDA device.*set train.kernels to auto or torch"):
            resolve_kernels("triton", "cpu")


def test_triton_backend_on_a_cpu_tensor_falls_back_to_torch(monkeypatch):
    """A model on the Triton backend moved to the CPU (no interpreter) trains on the torch loop."""
    import torch

    from pipeline.models import AdaptiveLIF

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.rand(2, 1, 3, 2, 2)
    assert fused_multistep("triton", x) is None and fused_multistep("torch", x) is None
    lif = set_kernels(AdaptiveLIF(3), "triton")
    assert lif.kernels == "triton"
    s = lif(x.requires_grad_())
    assert type(s.grad_fn).__name__ == "MultiStepLIFBackward"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        set_kernels(lif, "cupy")


def test_kernels_setting_is_not_in_the_cache_key(write_config):
    from pipeline.config import load_config
    from pipeline.registry import spec
    from pipeline.runner import run_store, stage_key

    path = write_config()
    store = run_store(load_config(path))

    def key(*sets: str) -> str:
        return stage_key(load_config(path, list(sets)), spec("train"), store)

    base = key()
    assert key("train.kernels=torch") == base and key("train.kernels=triton") == base
    assert key("train.precision=fp16") != base


def test_train_stage_refuses_triton_without_cuda_in_one_line(write_config, tmp_path):
    """``train.kernels: triton`` on a machine without CUDA: exit 2, one line naming the fix, before any data is
    read and with nothing left behind."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or triton_missing():
        pytest.skip("needs triton installed and no interpreter (then the setting is valid on the CPU)")
    path = write_config({"train": {"kernels": "triton"}})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "pipeline.stage", "train", "--config", str(path), "--set",
                        "device=cpu"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert errors == ["config error: train.kernels=triton needs a CUDA device (device is 'cpu'; Triton's CPU "
                      "interpreter, TRITON_INTERPRET=1, is for tests); set train.kernels to auto or torch"]
    assert not (tmp_path / "artifacts" / "tiny" / "train").exists()
