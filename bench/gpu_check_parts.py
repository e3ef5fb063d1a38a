"""The parts of bench/gpu_check.sh, one per call: ``python bench/gpu_check_parts.py PART --work DIR``.

Each part prints ``RESULT {json}`` as its last line (status pass / fail / skip, a reason, its
numbers) and exits 0 (pass), 1 (fail) or 77 (skip). The shell script runs each in its own process
under ``timeout``, so one failing or hanging part never stops the others. CUDA parts skip with
the reason on a machine where torch sees no GPU.

Parts: facts, kernels (the Triton neuron kernels compiled: bit-identity, gradients, one layer's time),
amp_step, resume_cuda, resume_cpu_to_cuda, stages, peer_sj (ours vs SpikingJelly on the plain ResNet-19),
infer (the unrolled model's GPU inference, eager and CUDA graphs), profile (where the fused all-STAA
step's GPU time goes, by op), realdata (plain LIF vs all STAA through the train stage on the real CIFAR-10
subset, two seeds), graphs (the training step eager vs CUDA graphs), throughput (the orchestrator:
compiled variants, when asked for with ``GPU_CHECK_COMPILE=1``, warm up in the background from the
start; timing waits for ``WORK/throughput.go``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PASS, FAIL, SKIP = 0, 1, 77
# GPU_CHECK_SIMULATE_CPU=1: run the CUDA parts on the CPU at small sizes (to test this script itself
# on a machine without a GPU; the numbers mean nothing)
SIMULATE = os.environ.get("GPU_CHECK_SIMULATE_CPU") == "1"
DEV = "cpu" if SIMULATE else "cuda"
CHANCE_DIGITS = 10.0  # top-1 of a 10-class guess, percent


class Skip(Exception):
    """The part does not apply here (e.g. no CUDA); the message is the reason."""


class Fail(Exception):
    """The check failed; the message says what was seen (``data``: what was measured anyway)."""

    def __init__(self, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.data = data or {}


def _cuda_or_skip() -> str:
    import torch

    if SIMULATE:
        return "cpu"
    if not torch.cuda.is_available():
        raise Skip(f"CUDA part: torch {torch.__version__} sees no usable GPU here (torch.cuda.is_available() is "
                   f"False)")
    return "cuda"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def _tail(text: str, n: int = 1500) -> str:
    return text[-n:] if text else ""


# ----------------------------------------------------------------------------------- facts
def _try_imports(names: tuple[str, ...]) -> dict[str, str]:
    """``{module: "ok" | the ImportError}`` (what the stages will need, checked up front)."""
    import importlib

    out = {}
    for name in names:
        try:
            importlib.import_module(name)
            out[name] = "ok"
        except Exception as exc:  # ImportError, or an error raised while importing
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def part_facts(args: argparse.Namespace) -> dict[str, Any]:
    """torch / CUDA / cuDNN / driver / toolkit / package facts; fails only if a GPU answers but torch cannot use it."""
    import importlib.metadata as md

    import torch

    from pipeline.compress.nncf_env import find_nvcc, plan_kernels
    from pipeline.distributed import DeviceError, nvidia_smi_gpus, resolve_device
    from pipeline.precision import fp32_settings

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    devices = []
    for i in range(torch.cuda.device_count() if cuda else 0):
        p = torch.cuda.get_device_properties(i)
        devices.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                        "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count})
    nvcc = find_nvcc()
    plan = plan_kernels(nvcc, torch.version.cuda, os.environ.get("STAA_NNCF_KERNELS", "auto"))
    try:
        auto = resolve_device("auto")
    except DeviceError as exc:
        auto = f"error: {exc}"
    facts = {
        "python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "cuda_available": cuda,
        "devices": devices, "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        "nvidia_smi": nvidia_smi_gpus(), "device_auto": auto, "nvcc": nvcc, "nvcc_version": plan.nvcc_version,
        "nncf_cuda_kernels_plan": f"{plan.kernels}: {plan.reason}", "fp32_precision_default": fp32_settings(),
        "packages": {p: version(p) for p in ("torch", "torchvision", "nncf", "torchao", "onnx", "onnxruntime",
                                             "onnxscript", "numpy", "scikit-learn", "tonic", "tensorboard",
                                             "matplotlib")},
        "imports": _try_imports(("torchvision", "nncf.torch", "torchao.quantization.pt2e.observer", "onnx",
                                 "onnxruntime", "onnxscript", "sklearn", "matplotlib", "torch.utils.tensorboard",
                                 "pipeline.cli", "stages.qat", "stages.validate")),
    }
    for k, v in facts.items():
        print(f"{k:>24}: {v}")
    if facts["nvidia_smi"] and not cuda:
        raise Fail(f"nvidia-smi reports {facts['nvidia_smi']} but torch cannot use CUDA ({auto})", facts)
    missing = {k: v for k, v in facts["imports"].items() if v != "ok"}
    if missing:
        raise Fail(f"imports the stages need fail: {missing}", facts)
    return facts


# -------------------------------------------------------------------------------- amp_step
def part_amp_step(args: argparse.Namespace) -> dict[str, Any]:
    """A few real training steps through fit(): bf16 (auto) and fp16 + GradScaler on CUDA; bf16 on the CPU."""
    import torch

    from pipeline.models import record_membranes
    from pipeline.models import build_model
    from pipeline.precision import amp_dtype, autocast, fp32_settings
    from pipeline.training.loop import Checkpoints, FitConfig, fit
    from pipeline.training.losses import classification_loss
    from pipeline.training.optim import build_optimizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precisions = ["auto", "fp16"] if device == "cuda" else ["bf16"]
    # CPU: the same code path on a model small enough for CPU bf16 (which is slow)
    width, T, size, n = (0.25, 4, 32, 256) if device == "cuda" else (0.0625, 2, 16, 64)
    out: dict[str, Any] = {"device": device}
    for precision in precisions:
        torch.manual_seed(0)
        cfg = {"arch": "resnet19", "width": width, "T": T, "num_classes": 10, "in_channels": 3}
        net = build_model(cfg).to(device)
        data = torch.utils.data.TensorDataset(torch.randn(n, 3, size, size), torch.randint(0, 10, (n,)))
        loader = torch.utils.data.DataLoader(data, batch_size=n // 8, shuffle=True,
                                             generator=torch.Generator().manual_seed(0), drop_last=True)
        opt = build_optimizer(net.parameters(), {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4},
                              device=device)
        seen: dict[str, Any] = {}

        def step_loss(m, x, y):
            seen.setdefault("fp32_precision_in_training", fp32_settings())
            return classification_loss(m, x, y, "ce", 0.1)

        before = [p.detach().clone() for p in net.parameters()]
        fc = FitConfig(epochs=2, device=device, precision=precision, progress=False, desc=f"amp {precision}")
        work = Path(args.work) / f"amp_{precision}"
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        state = fit(net, loader, None, opt, None, step_loss, fc, Checkpoints(work, "best.pt", "last.pt"),
                    payload=lambda m: {"model": m.state_dict()})
        wall = time.perf_counter() - t0
        dtype = amp_dtype(device, precision)
        with torch.no_grad(), autocast(device, dtype), record_membranes(net) as h:
            net.eval()(torch.randn(4, 3, size, size, device=device))
        ck = torch.load(work / "last.pt", map_location="cpu", weights_only=True)
        row = {
            "autocast": str(dtype).replace("torch.", "") if dtype else "off",
            "loss": [round(r["train_loss"], 4) for r in state.history],
            "images_per_s": [round(r["images_per_s"], 1) for r in state.history],
            "membrane_dtypes": sorted({str(v.dtype).replace("torch.", "") for v in h.values()}),
            "params_on": str(next(net.parameters()).device),
            "params_changed": any(not torch.equal(a, b.detach()) for a, b in zip(before, net.parameters())),
            "grad_scaler_state": {k: v for k, v in (ck.get("scaler") or {}).items()
                                  if k in ("scale", "_growth_tracker")},
            "fp32_precision_in_training": seen.get("fp32_precision_in_training"), "wall_s": round(wall, 2),
        }
        out[precision] = row
        print(precision, row)
        if not all(map(lambda v: v == v and abs(v) < 1e4, row["loss"])):
            raise Fail(f"{precision}: losses {row['loss']}", out)
        if row["membrane_dtypes"] != ["float32"] or not row["params_changed"]:
            raise Fail(f"{precision}: membranes {row['membrane_dtypes']}, params changed {row['params_changed']}", out)
        if precision == "fp16" and not row["grad_scaler_state"]:
            raise Fail("fp16: no GradScaler state was saved in last.pt", out)
    return out


# ------------------------------------------------------------------------------ resume parts
RESUME_CONFIG = {
    "name": "resume", "seed": 1,
    "data": {"dataset": "digits", "image_size": 16, "batch_size": 32, "eval_batch_size": 256, "val_fraction": 0.1,
             "augment": {"crop_padding": 1, "flip": False, "autoaugment": False}},
    "model": {"arch": "resnet19", "width": 0.125, "T": 4},
    "train": {"epochs": 6, "optimizer": "adamw", "lr": 0.003, "warmup_epochs": 1},
    "reduce_t": {"steps": [2]},
}


def _train_cmd(cfg_path: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline.stage", "train", "--config", str(cfg_path)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _kill_after_first_epoch(cmd: list[str], last: Path, log: Path, limit_s: float) -> float:
    """Start ``cmd``, SIGKILL it as soon as ``last`` (the first epoch's checkpoint) appears; returns seconds."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT)
        try:
            while not last.exists():
                if proc.poll() is not None:
                    raise Fail(f"training ended (rc {proc.returncode}) before its first checkpoint: "
                               f"{_tail(log.read_text())}")
                if time.perf_counter() - t0 > limit_s:
                    raise Fail(f"no checkpoint {last} after {limit_s:.0f} s")
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return time.perf_counter() - t0


def _resume(args: argparse.Namespace, first_sets: tuple[str, ...], second_sets: tuple[str, ...],
            name: str) -> dict[str, Any]:
    import torch
    import yaml

    if SIMULATE:  # same sets on both runs: they are part of the cache key
        first_sets, second_sets = first_sets + ("data.limit_train=320",), second_sets + ("data.limit_train=320",)

    work = Path(args.work) / name
    work.mkdir(parents=True, exist_ok=True)
    cfg = dict(RESUME_CONFIG, artifacts_dir=str(work / "artifacts"))
    cfg_path = work / "resume.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = work / "artifacts" / "resume"
    killed_s = _kill_after_first_epoch(_train_cmd(cfg_path, *first_sets), run / "train.partial" / "last.pt",
                                       work / "first.log", limit_s=120)
    partial = torch.load(run / "train.partial" / "last.pt", map_location="cpu", weights_only=True)
    done_before = int(partial["epoch"])
    t0 = time.perf_counter()
    second = subprocess.run(_train_cmd(cfg_path, *second_sets), cwd=REPO, env=_env(), capture_output=True,
                            text=True)
    (work / "second.log").write_text(second.stdout + second.stderr)
    if second.returncode != 0:
        raise Fail(f"the resumed run failed (rc {second.returncode}): {_tail(second.stderr)}")
    metrics = json.loads((run / "train" / "metrics.json").read_text())
    manifest = json.loads((run / "train" / "manifest.json").read_text())
    last = torch.load(run / "train" / "last.pt", map_location="cpu", weights_only=True)
    out = {"killed_after_s": round(killed_s, 1), "epochs_done_when_killed": done_before,
           "resumed_from_epoch": metrics.get("resumed_from_epoch"), "epochs": metrics.get("epochs"),
           "device": manifest.get("device"), "precision": metrics.get("precision"),
           "test_top1": metrics.get("test_top1"), "resumed_run_s": round(time.perf_counter() - t0, 1),
           "epoch_images_per_s": [round(r["images_per_s"], 1) for r in metrics.get("history", [])],
           "scaler_state_saved": bool(last.get("scaler"))}
    print(out)
    total = RESUME_CONFIG["train"]["epochs"]
    if out["resumed_from_epoch"] != done_before or not 1 <= done_before < total:
        raise Fail(f"expected a resume from epoch {done_before} (1..{total - 1}), metrics say "
                   f"{out['resumed_from_epoch']} (if the kill came after the last epoch, raise train.epochs)", out)
    if out["epochs"] != total or not str(out["device"]).startswith(DEV):
        raise Fail(f"the resumed run did {out['epochs']} epochs on {out['device']}; expected {total} on {DEV}", out)
    if (out["test_top1"] or 0) <= 2 * CHANCE_DIGITS:
        raise Fail(f"test top-1 {out['test_top1']}% after {total} epochs: training did not learn after the resume",
                   out)
    return out


def part_resume_cuda(args: argparse.Namespace) -> dict[str, Any]:
    """kill -9 a CUDA fp16 training run after its first epoch, run again: it resumes (GradScaler state too)."""
    _cuda_or_skip()
    sets = (f"device={DEV}",) + (() if SIMULATE else ("train.precision=fp16",))
    out = _resume(args, sets, sets, "resume_cuda")
    if not out["scaler_state_saved"] and not SIMULATE:
        raise Fail("fp16 run: last.pt holds no GradScaler state", out)
    return out


def part_resume_cpu_to_cuda(args: argparse.Namespace) -> dict[str, Any]:
    """kill -9 a CPU run after its first epoch, finish it on CUDA (device is not in the cache key)."""
    _cuda_or_skip()
    return _resume(args, ("device=cpu",), (f"device={DEV}",), "resume_cpu_to_cuda")


# ---------------------------------------------------------------------------------- stages
QUICK_SETS = ("train.epochs=4", "reduce_t.steps=[2]", "reduce_t.choose=2", "reduce_t.epochs=1", "qat.epochs=1",
              "validate.iterations=10")


def part_stages(args: argparse.Namespace) -> dict[str, Any]:
    """Every stage of configs/default.yaml on CUDA (a shorter schedule unless GPU_CHECK_FULL=1)."""
    _cuda_or_skip()
    from pipeline.registry import NAMES

    work = Path(args.work) / "stages"
    sets = [f"device={DEV}", f"artifacts_dir={work / 'artifacts'}"]
    if os.environ.get("GPU_CHECK_FULL") != "1":
        sets += list(QUICK_SETS)
    if SIMULATE:
        sets += ["train.epochs=1", "train.max_batches=4", "reduce_t.max_batches=2", "reduce_t.epochs=1",
                 "qat.max_batches=2", "qat.calibration_samples=64", "unroll.parity_images=32",
                 "export.parity_images=32", "validate.limit_test=64", "data.limit_test=64", "validate.iterations=2"]
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", str(REPO / "configs" / "default.yaml")]
    for s in sets:
        cmd += ["--set", s]
    env = _env()
    if os.environ.get("GPU_CHECK_NNCF_BUILD") != "1":
        env.setdefault("STAA_NNCF_KERNELS", "reference")  # no minutes-long nvcc build inside a 5-minute check
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    (work / "run.log").write_text(proc.stdout + proc.stderr)
    run = work / "artifacts" / "default"
    stages: dict[str, Any] = {}
    for name in NAMES:
        man = run / name / "manifest.json"
        if not man.is_file():
            stages[name] = {"status": "missing"}
            continue
        m = json.loads(man.read_text())
        stages[name] = {"status": m.get("status"), "device": m.get("device"), "wall_s": m.get("wall_time_s"),
                        "failed_gates": m.get("failed_gates") or None, "reason": m.get("reason") or None}
    out: dict[str, Any] = {"rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1), "sets": sets,
                           "nncf_kernels": env.get("STAA_NNCF_KERNELS", "auto"), "stages": stages}
    unroll = run / "unroll" / "metrics.json"
    if unroll.is_file():
        um = json.loads(unroll.read_text())
        out["unroll_parity"] = {k: {f: um[k]["parity"].get(f) for f in ("n", "samples_clean", "samples_numerical_flip",
                                                                         "samples_real_mismatch", "max_abs_diff",
                                                                         "worst_first_flip_margin")}
                                for k in ("float", "int8") if k in um}
    for name, key in (("train", "images_per_s"), ("train", "test_top1"), ("qat", "nncf_kernels"),
                      ("reduce_t", "chosen_T")):
        f = run / name / "metrics.json"
        if f.is_file():
            out[f"{name}.{key}"] = json.loads(f.read_text()).get(key)
    print(json.dumps(out, indent=1, default=str))
    bad = [n for n, s in stages.items() if s["status"] not in ("done", "skipped", "failed")]
    if bad:
        raise Fail(f"stages not completed: {', '.join(bad)} (rc {proc.returncode}): {_tail(proc.stderr)}", out)
    if stages["unroll"]["status"] != "done":
        raise Fail("unroll parity did not pass on CUDA", out)
    gated = [n for n, s in stages.items() if s["status"] == "failed"]
    if gated:
        out["note"] = f"accuracy gates failed (short schedule?): {', '.join(gated)}"
    return out


# ---------------------------------------------------------------------------------- kernels
def part_kernels(args: argparse.Namespace) -> dict[str, Any]:
    """The Triton neuron kernels compiled on CUDA: the comparisons tests/models/test_triton_kernels.py makes in the
    interpreter (spikes and membranes bit-identical, gradients within tolerance; FMA contraction shows
    only here), then one full-size layer per kind: bit-identity there and forward + backward time, T=4 and 32."""
    import torch

    from pipeline.models.kernels import triton_missing

    cuda = torch.cuda.is_available() and not SIMULATE
    env = _env()
    shape, rounds = ["128", "128", "32", "32"], "3"
    compare = [sys.executable, str(REPO / "pipeline" / "models" / "kernels" / "compare.py"), "--device",
               "cuda" if cuda else "cpu"]
    layer = [sys.executable, str(REPO / "bench" / "lif_kernels.py"), "--device", "cuda", "--json",
             str(Path(args.work) / "lif_kernels.jsonl")]
    if not cuda:  # the CPU: the same code under Triton's interpreter, tiny (the tests run the full comparison)
        compare += ["--nets", "--cases", "2"]
        layer += ["--interpret", "--T", "4", "--dtypes", "fp32", "--rounds", "1", "--steps", "1", "--shape",
                  "2", "4", "4", "4"]
    else:
        layer += ["--shape", *shape, "--rounds", rounds, "--steps", "5"]
    if triton_missing():
        raise (Fail if cuda else Skip)(f"Triton backend: {triton_missing()}")
    sys.path.insert(0, str(REPO))
    from pipeline.models.kernels.compare import failures

    r = subprocess.run(compare, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(args.limit - 5, 5))
    if r.returncode != 0:
        raise Fail(f"pipeline/models/kernels/compare.py failed: {_tail(r.stderr)}")
    rows = json.loads(r.stdout.strip().splitlines()[-1])["rows"]
    bad = failures(rows)
    out: dict[str, Any] = {"compared_cases": len(rows), "failures": bad}
    print(f"{len(rows)} comparison cases on {'cuda' if cuda else 'cpu (interpreter)'}: "
          f"{'all as claimed' if not bad else bad}")
    r = subprocess.run(layer, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(args.limit - 5, 5))
    print(r.stdout + r.stderr[-2000:])
    jl = Path(args.work) / "lif_kernels.jsonl"
    out["layers"] = [json.loads(line) for line in jl.read_text().splitlines()] if jl.is_file() else []
    if bad:
        raise Fail(f"the Triton kernels break their claims on this device: {bad[:5]}", out)
    if r.returncode != 0:
        raise Fail(f"bench/lif_kernels.py: rc {r.returncode} (spikes or membranes differ, or it crashed): "
                   f"{_tail(r.stdout + r.stderr, 600)}", out)
    if not cuda:
        raise Skip("CUDA part: no GPU here; the comparisons (small shapes) and the layer bench (tiny) ran in "
                   f"Triton's interpreter: {len(rows)} cases as claimed")
    return out


# ---------------------------------------------------------------------------------- peer_sj
SJ_WHEEL_HINT = ("bring its wheels along: pip download --no-deps -d .whl spikingjelly==2.0.0 loguru==0.7.3 "
                 "(bench/gpu_check.sh installs .whl into /tmp/site)")


def _timed_steps(models: dict[str, Any], device: str, dtype: Any, x: Any, y: Any, rounds: int, per_round: int,
                 warmup: int) -> dict[str, Any]:
    """Median seconds per SGD step of each model (interleaved rounds, bench/step_timing.py), under autocast
    ``dtype`` (None: fp32); a model whose step raises gets its error instead."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from step_timing import interleaved_seconds, sgd_step

    from pipeline.precision import training_precision

    def make(model, reset):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step() -> None:
            with torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None):
                sgd_step(model, opt, x, y, reset)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        return step

    steps, errors = {}, {}
    with training_precision(device):
        for name, (model, reset) in models.items():
            step = make(model, reset)
            try:
                step()
                steps[name] = step
            except Exception as exc:  # e.g. a peer kernel without bf16 support: recorded, the others still run
                errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
        seconds = interleaved_seconds(steps, rounds, per_round, warmup) if steps else {}
    return {"seconds": seconds, "errors": errors}


def part_peer_sj(args: argparse.Namespace) -> dict[str, Any]:
    """Ours vs SpikingJelly 2.0 on the same plain ResNet-19 (bench/peer_spikingjelly.py's networks: LIF, atan,
    STAA off), training img/s at full width, T=4, batch 128, fp32 and bf16: ours eager (torch kernels), ours
    fused (Triton), SpikingJelly on CUDA (it picks its own CUDA kernels by device), after checking that the
    neurons fire identically on this device and the networks have the same parameter count."""
    import torch

    try:
        import spikingjelly  # noqa: F401
        from spikingjelly.activation_based import functional
    except ImportError as exc:
        raise Skip(f"spikingjelly is not importable ({exc}): {SJ_WHEEL_HINT}") from None
    sys.path.insert(0, str(REPO / "bench"))
    from peer_spikingjelly import SJResNet19, ours, sj_lif

    from pipeline.models import LIF
    from pipeline.models.kernels import set_kernels, triton_missing

    cuda = torch.cuda.is_available() and not SIMULATE
    device = "cuda" if cuda else "cpu"
    width, batch, image, rounds, per_round = (1.0, 128, 32, 3, 5) if cuda else (0.0625, 4, 16, 1, 1)
    T, classes = 4, 100
    torch.manual_seed(0)
    x = torch.randn(T, 8, 16, 5, 5, device=device)
    kinds = ["torch"] + (["triton"] if cuda and not triton_missing() else [])
    same, flips = {}, {}
    for k in kinds:
        mine = set_kernels(LIF(decay=0.25, gain=1.0, v_th=0.5, surrogate="atan", surrogate_param=2.0), k)(x)
        node = sj_lif().to(device)
        theirs = node(x)
        functional.reset_net(node)
        same[k] = bool(torch.equal(mine, theirs))
        flips[k] = int((mine != theirs).sum().item())
    models = {"ours eager": ours(width, T, classes, 3).to(device),
              "spikingjelly": SJResNet19(width, T, classes, 3).to(device)}
    if "triton" in kinds:
        models["ours fused"] = set_kernels(ours(width, T, classes, 3).to(device), "triton")
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "width": width, "T": T,
                           "batch": batch, "same_spikes_as_spikingjelly": same, "spike_flips": flips,
                           "spikes_compared": x.numel(), "parameters": params, "precisions": {}}
    print(f"same spikes as SpikingJelly's LIFNode on {device}: {same} (flips {flips} of {x.numel()}); "
          f"parameters {params}")
    xb = torch.randn(batch, 3, image, image, device=device)
    yb = torch.randint(0, classes, (batch,), device=device)
    resets = {"spikingjelly": functional.reset_net}
    for p, dtype in (("fp32", None), ("bf16", torch.bfloat16)) if cuda else (("fp32", None),):
        r = _timed_steps({k: (m.train(), resets.get(k)) for k, m in models.items()}, device, dtype, xb, yb,
                         rounds, per_round, warmup=2)
        ips = {k: round(batch / s, 1) for k, s in r["seconds"].items()}
        row: dict[str, Any] = {"images_per_s": ips, "errors": r["errors"]}
        if ips.get("spikingjelly"):
            row.update({f"{k}_over_spikingjelly": round(v / ips["spikingjelly"], 2) for k, v in ips.items()
                        if k != "spikingjelly"})
        out["precisions"][p] = row
        print(p, row, flush=True)
    if not all(same.values()) or len(set(params.values())) != 1:  # timed anyway: the figures say what they say
        raise Fail(f"the two networks are not the same (spike flips {flips}, parameters {params}): the timings "
                   "compare different networks", out)
    if not cuda:
        raise Skip(f"CUDA part (full width, batch 128): no GPU here; the CPU smoke (width {width}, batch {batch}) "
                   f"ran: {out['precisions']['fp32']['images_per_s']}")
    return out


# ------------------------------------------------------------------------------------ infer
def _latency(fn: Callable[[], Any], device: str, seconds: float, warmup: int = 5) -> dict[str, float]:
    """p50 latency (ms) of ``fn`` over at least 20 calls and ``seconds`` of calls, synchronised each call."""
    import statistics

    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < 20 or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"p50_ms": round(1e3 * statistics.median(times), 3), "calls": len(times)}


def part_infer(args: argparse.Namespace) -> dict[str, Any]:
    """GPU inference of the unrolled ResNet-19 (full width, T=4, all STAA, CIFAR-100 head, random weights: speed
    only) in FP32 and FP16 (fp32 membranes, as TensorRT's fp32_neurons), batch 1 and 32, eager and replayed as
    a CUDA graph: p50 latency and img/s, the nearest figure to a TensorRT engine this machine gives."""
    import torch

    from pipeline.deploy.graphs.unroll import unroll_float
    from pipeline.models import build_model
    from pipeline.precision import strict_fp32

    cuda = torch.cuda.is_available() and not SIMULATE
    device = "cuda" if cuda else "cpu"
    width, image, batches, secs = (1.0, 32, (1, 32), 2.0) if cuda else (0.0625, 16, (1, 2), 0.05)
    torch.manual_seed(0)
    net = build_model({"arch": "resnet19", "width": width, "T": 4, "num_classes": 100, "in_channels": 3}).eval()
    unrolled = {"fp32": unroll_float(net).to(device)}
    unrolled["fp16"] = unroll_float(net).to(device).half() if cuda else None
    rows: dict[str, Any] = {}
    with torch.no_grad(), strict_fp32():  # IEEE FP32 as validate's torch rows (no TF32)
        for prec, module in unrolled.items():
            if module is None:
                continue
            dtype = torch.float16 if prec == "fp16" else torch.float32
            for b in batches:
                x = torch.randn(b, 3, image, image, device=device, dtype=dtype)
                eager = _latency(lambda: module(x), device, secs)
                rows[f"{prec} b{b} eager"] = dict(eager, images_per_s=round(1e3 * b / eager["p50_ms"], 1))
                if cuda:
                    try:
                        static_x = x.clone()
                        stream = torch.cuda.Stream()
                        stream.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(stream):
                            for _ in range(3):
                                module(static_x)
                        torch.cuda.current_stream().wait_stream(stream)
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            static_y = module(static_x)
                        g = _latency(graph.replay, device, secs)
                        same = bool(torch.equal(static_y, module(static_x)))
                        rows[f"{prec} b{b} cuda-graph"] = dict(g, images_per_s=round(1e3 * b / g["p50_ms"], 1),
                                                               same_logits_as_eager=same)
                    except Exception as exc:  # capture can fail on an op that syncs: recorded, not fatal
                        rows[f"{prec} b{b} cuda-graph"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    print(f"{'variant':<22} {'p50 ms':>8} {'img/s':>9}")
    for k, v in rows.items():
        print(f"{k:<22} {v.get('p50_ms', ''):>8} {v.get('images_per_s', ''):>9}  {v.get('error', '')}")
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "width": width, "T": 4, "rows": rows}
    if not cuda:
        raise Skip(f"CUDA part (full width, FP32/FP16, batch 1/32, CUDA graphs): no GPU here; the CPU smoke "
                   f"(width {width}, FP32 eager) ran: {rows}")
    return out


# ---------------------------------------------------------------------------------- profile
def part_profile(args: argparse.Namespace) -> dict[str, Any]:
    """Where the all-STAA training step's GPU time goes with the fused neuron kernels (ResNet-19 full width,
    T=4, batch 128, bf16; torch.profiler over 3 steps after 3 warm-up steps): the ops by CUDA time, the
    evidence for or against STAA kernels (SA pooling and gate, GC's softmax pooling)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipeline.models import build_model
    from pipeline.models.kernels import resolve_kernels, set_kernels
    from pipeline.precision import training_precision

    cuda = torch.cuda.is_available() and not SIMULATE
    device = "cuda" if cuda else "cpu"
    width, batch = (1.0, 128) if cuda else (0.0625, 4)
    torch.manual_seed(0)
    net = build_model({"arch": "resnet19", "width": width, "T": 4, "num_classes": 100, "in_channels": 3}).to(device)
    backend = resolve_kernels("auto", device)
    set_kernels(net.train(), backend)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    dtype = torch.bfloat16 if cuda else None

    def step() -> None:
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with training_precision(device):
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(3):
                step()
            if cuda:
                torch.cuda.synchronize()
    def self_us(e: Any) -> float:  # microseconds over the 3 profiled steps
        return float(e.self_device_time_total if cuda else e.self_cpu_time_total)

    events = sorted(prof.key_averages(), key=self_us, reverse=True)
    total = sum(self_us(e) for e in events) or 1.0
    top = [{"op": e.key, "self_ms_per_step": round(self_us(e) / 3e3, 3), "share": round(self_us(e) / total, 4),
            "calls_per_step": e.count // 3} for e in events[:30]]
    print(f"{'op':<60} {'ms/step':>8} {'share':>6} {'calls':>6}   (self {'CUDA' if cuda else 'CPU'} time, "
          f"kernels {backend})")
    for r in top:
        print(f"{r['op'][:60]:<60} {r['self_ms_per_step']:>8} {100 * r['share']:>5.1f}% {r['calls_per_step']:>6}")
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "kernels": backend, "width": width,
           "batch": batch, "top_ops": top}
    if not cuda:
        raise Skip(f"CUDA part (full width, bf16, fused kernels): no GPU here; the CPU smoke (width {width}, "
                   f"batch {batch}) profiled {len(events)} ops")
    return out


# ------------------------------------------------------------------------------ throughput
# torch.compile of the training step did not finish compiling within the budget on the H200 (twice): its
# variants run only when asked for, so the budget goes to the fused kernels
COMPILE = os.environ.get("GPU_CHECK_COMPILE") == "1"


def _variant(precision: str, compile: bool = False, channels_last: bool = False, kernels: str = "torch",
             plain: bool = False) -> dict[str, Any]:
    return {"precision": precision, "compile": compile, "channels_last": channels_last, "kernels": kernels,
            "plain": plain}


def _variants() -> list[dict[str, Any]]:
    """Eager with torch kernels (the baseline) per precision, channels-last, the fused Triton kernels (fp32,
    bf16), the plain network (LIF, STAA off) both ways (the all-STAA / plain step ratio), compiled on request."""
    out = [_variant(p) for p in ("fp32", "bf16", "fp16")]
    out += [_variant("bf16", channels_last=True)]
    out += [_variant(p, kernels="triton") for p in ("fp32", "bf16")]
    out += [_variant("bf16", plain=True), _variant("bf16", kernels="triton", plain=True)]
    if COMPILE:
        out += [_variant(p, compile=True) for p in ("fp32", "bf16", "fp16")]
    return out


def _bench_cmd(v: dict[str, Any], device: str, json_path: Path, sizes: dict[str, Any],
               ready: Path | None = None, go: Path | None = None) -> list[str]:
    cmd = [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--device", device,
           "--widths", str(sizes["width"]), "--batch", str(sizes["batch"]), "--T", "4", "--steps", str(sizes["steps"]),
           "--warmup", str(sizes["warmup"]), "--precisions", *v["precision"].split(), "--json", str(json_path)]
    if v["compile"]:
        cmd.append("--compile")
    if v["channels_last"]:
        cmd.append("--channels-last")
    cmd += ["--kernels", v.get("kernels", "torch")] + (["--plain"] if v.get("plain") else [])
    if ready is not None and go is not None:
        cmd += ["--ready-file", str(ready), "--go-file", str(go), "--max-wait", str(int(sizes.get("max_wait", 600)))]
    return cmd


def _label(v: dict[str, Any]) -> str:
    return (v["precision"] + (" compiled" if v["compile"] else "") + (" channels-last" if v["channels_last"] else "")
            + (" fused" if v.get("kernels") == "triton" else "") + (" plain" if v.get("plain") else ""))


def _ratios(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets from one run: fused / eager (>= 3x, >= 2,700 img/s), all-STAA / plain step time
    (<= 1.25x, fused kernels where they ran)."""
    def ips(label: str) -> float | None:
        return results.get(label, {}).get("images_per_s")

    out: dict[str, Any] = {}
    for p in ("fp32", "bf16"):
        eager, fused = ips(p), ips(f"{p} fused")
        if eager and fused:
            out[f"{p}_fused_over_eager"] = round(fused / eager, 2)
    for suffix in (" fused", ""):
        staa, plain = ips(f"bf16{suffix}"), ips(f"bf16{suffix} plain")
        if staa and plain:
            out[f"bf16_{'fused' if suffix else 'eager'}_staa_over_plain_step_time"] = round(plain / staa, 2)
    return out


def part_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Training img/s and peak memory, ResNet-19 full width, T=4, batch 128, per precision, eager and compiled.

    Compiled variants start at once (compiling in parallel, in the background of the other parts),
    then wait; timing starts when ``WORK/throughput.go`` exists (the shell script writes it when the
    other parts are done) and runs one variant at a time. Each variant is its own process.
    """
    import torch

    work = Path(args.work) / "throughput"
    work.mkdir(parents=True, exist_ok=True)
    go_all = Path(args.work) / "throughput.go"
    deadline = time.monotonic() + args.limit
    json_path = work / "results.jsonl"
    results: dict[str, Any] = {}
    if not torch.cuda.is_available() and not SIMULATE:  # CPU: exercise the code on a tiny model, skip the numbers
        sizes = {"width": 0.125, "batch": 8, "steps": 2, "warmup": 1}
        v = _variant("fp32", plain=True)
        r = subprocess.run(_bench_cmd(v, "cpu", json_path, sizes), cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=max(deadline - time.monotonic(), 1))
        print(r.stdout + r.stderr)
        if r.returncode != 0:
            raise Fail(f"the CPU smoke measurement failed: {_tail(r.stderr)}")
        raise Skip("CUDA part (ResNet-19 full width, batch 128): no GPU here; the CPU smoke measurement "
                   f"(width 0.125, batch 8) ran: {_tail(r.stdout.strip().splitlines()[-1], 200)}")
    sizes = {"width": 1.0, "batch": 128, "steps": 20, "warmup": 5, "max_wait": args.limit + 30}
    if SIMULATE:  # the protocol only: tiny eager runs stand in for the compiled ones
        sizes.update(width=0.0625, batch=4, steps=1, warmup=1)

    def stop(*_: Any) -> None:  # `timeout` / the shell's TERM: run the finally below (kill the workers)
        raise SystemExit(1)

    signal.signal(signal.SIGTERM, stop)
    compiled = [v for v in _variants() if v["compile"]]
    eager = [v for v in _variants() if not v["compile"]]
    env = _env(TORCHINDUCTOR_COMPILE_THREADS=os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "4"))
    procs = []
    for i, v in enumerate(compiled):
        ready, go, log = work / f"ready{i}", work / f"go{i}", work / f"compiled{i}.log"
        f = log.open("w")
        cmd = _bench_cmd(dict(v, compile=False) if SIMULATE else v, DEV, json_path, sizes, ready, go)
        procs.append((v, ready, go, log, subprocess.Popen(cmd,
                                                           cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)))
    def time_compiled(wait: bool) -> None:
        """Let each compiled worker time its steps, one at a time: only those already warmed up unless ``wait``."""
        for v, ready, go, log, proc in procs:
            if _label(v) in results:
                continue
            while wait and not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            if not ready.exists():
                if wait:
                    results[_label(v)] = {"status": "failed: " + _tail(log.read_text(), 300) if proc.poll() is not None
                                          else "timeout: still compiling at the deadline"}
                continue
            go.write_text("go")
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 1))
                results[_label(v)] = {"status": "ok" if proc.returncode == 0 else
                                      f"failed: {_tail(log.read_text(), 300)}"}
            except subprocess.TimeoutExpired:
                results[_label(v)] = {"status": "timeout while timing"}

    try:
        while not go_all.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        time_compiled(wait=False)  # the ones already compiled: a few seconds each
        # the precisions of one setting share one process (one CUDA start-up), one at a time, nothing else on the GPU
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for v in eager:
            groups.setdefault((v["channels_last"], v["kernels"], v["plain"]), []).append(v)
        for members in groups.values():
            for v in [dict(members[0], precision=" ".join(m["precision"] for m in members))]:
                labels = [_label(dict(v, precision=p)) for p in v["precision"].split()]
                left = deadline - time.monotonic()
                if left < 15:
                    results.update({label: {"status": "skipped: time budget"} for label in labels})
                    continue
                try:
                    # simulated on the CPU, the fused variants run in Triton's interpreter
                    env_v = _env(TRITON_INTERPRET="1") if SIMULATE and v["kernels"] == "triton" else _env()
                    r = subprocess.run(_bench_cmd(v, DEV, json_path, sizes), cwd=REPO, env=env_v,
                                       capture_output=True, text=True, timeout=min(150, left))
                    status = "ok" if r.returncode == 0 else f"failed: {_tail(r.stderr, 300)}"
                except subprocess.TimeoutExpired:
                    status = "timeout"
                results.update({label: {"status": status} for label in labels})
        time_compiled(wait=True)
    finally:
        for *_, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    rows = [json.loads(line) for line in json_path.read_text().splitlines()] if json_path.is_file() else []
    for row in rows:
        results.setdefault(_label(row), {}).update(
            {k: row[k] for k in ("images_per_s", "ms_per_step", "peak_mem_mib", "first_step_s", "grad_scaler",
                                 "device")})
    print(f"{'variant':<24} {'img/s':>8} {'ms/step':>8} {'peak MiB':>9} {'first step s':>12}  status")
    for label, r in results.items():
        print(f"{label:<24} {r.get('images_per_s', ''):>8} {r.get('ms_per_step', ''):>8} "
              f"{r.get('peak_mem_mib', ''):>9} {r.get('first_step_s', ''):>12}  {r.get('status', 'ok')}")
    ratios = _ratios(results)
    for k, v in ratios.items():
        print(f"{k}: {v}")
    if not rows:
        raise Fail("no variant produced a measurement", {"variants": results})
    return {"sizes": sizes, "variants": results, "ratios": ratios}


# --------------------------------------------------------------------------------- realdata
# plain LIF vs all STAA (bench/ablation.py's variants) through the train stage on the real CIFAR-10 subset;
# paired by seed, in this order, so a run cut short by the budget still holds whole pairs
REALDATA_RUNS = (("plain", 0), ("all", 0), ("plain", 1), ("all", 1))
REALDATA_FILES = ("cifar10_test.npz", ("cifar10_train_subset.npz", "cifar10_train.npz"))
REALDATA_FIX = ("copy it beside the code: `python bench/gpu_data.py` writes bench/data/ (18.9 MiB, git-ignored; "
                "carry \"bench/data\" to the GPU machine), or set GPU_CHECK_DATA=DIR")


def realdata_dirs() -> list[Path]:
    """Where part realdata looks for the CIFAR-10 npz files, first match wins: $GPU_CHECK_DATA, bench/data/
    (what the GPU machine gets when bench/data is carried), ../shared/data (this workplace's copy)."""
    env = os.environ.get("GPU_CHECK_DATA")
    return ([Path(env)] if env else []) + [REPO / "bench" / "data", REPO.parent / "shared" / "data"]


def find_realdata(dirs: list[Path]) -> Path:
    """The first folder holding cifar10_test.npz and a cifar10 train npz; Skip naming every folder and the fix."""
    test, trains = REALDATA_FILES
    for d in dirs:
        if (d / test).is_file() and any((d / t).is_file() for t in trains):
            return d
    raise Skip(f"the CIFAR-10 npz files ({test} and {' or '.join(trains)}) are in none of "
               f"{', '.join(str(d) for d in dirs)}: {REALDATA_FIX}")


def realdata_sets(root: Path, folder: Path, variant: str, seed: int, gpu: bool, epochs: int) -> list[str]:
    """The train stage's --set list for one (variant, seed): configs/cifar10_small.yaml at full width, batch 128,
    every train image, 2,000 test images on the GPU; a tiny, 2-batch run on the CPU (the wiring only)."""
    sys.path.insert(0, str(REPO / "bench"))
    from ablation import VARIANTS

    sets = [f"artifacts_dir={folder}", f"seed={seed}", f"data.root={root}", *VARIANTS[variant],
            "data.limit_test=2000"]
    if gpu:
        sets += ["device=cuda", "model.width=1.0", "data.batch_size=128", "data.limit_train=5000", "data.workers=4",
                 f"train.epochs={epochs}"]
    else:
        sets += ["device=cpu", "model.width=0.0625", "data.batch_size=16", "data.limit_train=64",
                 "data.limit_test=64", "train.epochs=1", "train.max_batches=2", "train.warmup_epochs=0"]
    return sets + os.environ.get("GPU_CHECK_REALDATA_SETS", "").split()


def realdata_summary(top1: dict[tuple[str, int], float]) -> dict[str, Any]:
    """Per-seed all-STAA minus plain-LIF test top-1 (points) for the seeds where both ran, and their mean."""
    import statistics

    seeds = sorted({s for _, s in top1})
    diffs = {s: round(top1[("all", s)] - top1[("plain", s)], 2) for s in seeds
             if ("all", s) in top1 and ("plain", s) in top1}
    mean = {v: round(statistics.fmean(t for (w, _), t in top1.items() if w == v), 2)
            for v in ("plain", "all") if any(w == v for w, _ in top1)}
    return {"mean_top1": mean, "all_minus_plain_by_seed": diffs,
            "all_minus_plain_mean": round(statistics.fmean(diffs.values()), 2) if diffs else None}


def part_realdata(args: argparse.Namespace) -> dict[str, Any]:
    """A short real-data run through the train stage: CIFAR-10 train subset (4,500 train / 500 val images),
    ResNet-19 full width, T=4, batch 128, configs/cifar10_small.yaml's recipe, GPU_CHECK_REALDATA_EPOCHS epochs
    (default 8) per run, plain LIF vs all STAA, seeds 0 and 1: test top-1 on 2,000 test images and the mean
    all-STAA - plain difference. On the CPU: the same runs at 2 batches of 16 (the wiring), then a skip."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from ablation import LABELS, read_result

    gpu = torch.cuda.is_available() and not SIMULATE
    root = find_realdata(realdata_dirs())
    epochs = int(os.environ.get("GPU_CHECK_REALDATA_EPOCHS", "8"))
    deadline = time.monotonic() + args.limit - 5
    config = REPO / "configs" / "cifar10_small.yaml"
    runs: dict[str, Any] = {}
    top1: dict[tuple[str, int], float] = {}
    longest = 0.0
    print(f"data {root}; {'cuda, %d epochs per run' % epochs if gpu else 'cpu smoke (2 batches of 16)'}", flush=True)
    for variant, seed in REALDATA_RUNS:
        key = f"{variant} seed{seed}"
        left = deadline - time.monotonic()
        if left < max(1.2 * longest, 20):
            runs[key] = {"status": f"skipped: {left:.0f} s left of the part's limit, the longest run took "
                                   f"{longest:.0f} s (raise GPU_CHECK_BUDGET_S or lower GPU_CHECK_REALDATA_EPOCHS)"}
            continue
        folder = Path(args.work) / "realdata" / variant / f"seed{seed}"
        cmd = _train_cmd(config, *realdata_sets(root, folder, variant, seed, gpu, epochs))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=left)
            rc, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, log = "timeout", str(exc.stdout or "") + str(exc.stderr or "")
        wall = time.perf_counter() - t0
        longest = max(longest, wall)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.log").write_text(log if isinstance(log, str) else "")
        if rc != 0:
            runs[key] = {"status": f"failed (rc {rc}) after {wall:.0f} s: {_tail(log, 400)}"}
            print(f"{LABELS[variant]:<10} seed {seed}: {runs[key]['status']}", flush=True)
            continue
        r = read_result(folder)
        man = json.loads(next(folder.glob("*/train/manifest.json")).read_text())
        runs[key] = {"status": "ok", "test_top1": r["test_top1"], "epochs": r["epochs"], "wall_s": round(wall, 1),
                     "images_per_s": r["images_per_s"], "device": man.get("device"),
                     "kernels": man.get("metrics", {}).get("kernels"),
                     "precision": man.get("metrics", {}).get("precision"),
                     "val_top1": [h.get("val_top1") for h in r["history"]]}
        top1[(variant, seed)] = float(r["test_top1"])
        print(f"{LABELS[variant]:<10} seed {seed}: test top-1 {r['test_top1']:.2f}% ({r['epochs']} epochs, "
              f"{wall:.0f} s, {r['images_per_s']:.0f} img/s on {man.get('device')})", flush=True)
    summary = realdata_summary(top1)
    print(f"mean test top-1: {summary['mean_top1']}; all STAA - plain LIF by seed {summary['all_minus_plain_by_seed']}, "
          f"mean {summary['all_minus_plain_mean']} points")
    out = {"data": str(root), "epochs": epochs if gpu else 1, "runs": runs, **summary}
    bad = [k for k, r in runs.items() if r["status"].startswith("failed")]
    if bad:
        raise Fail(f"train stage failed for {', '.join(bad)}: {runs[bad[0]]['status']}", out)
    if not top1:
        raise Fail("no run finished within the part's limit", out)
    if not gpu:
        raise Skip(f"CUDA part (full width, batch 128, {epochs} epochs x 4 runs): no GPU here; the CPU smoke "
                   f"(width 0.0625, 2 batches of 16, 64 test images) ran the train stage "
                   f"{len(top1)} times: {summary}")
    off = {k: r["device"] for k, r in runs.items() if r.get("device") and not str(r["device"]).startswith("cuda")}
    if off:
        raise Fail(f"runs did not train on CUDA: {off}", out)
    weak = {k: r["test_top1"] for k, r in runs.items() if r.get("test_top1") is not None
            and r["test_top1"] <= CHANCE_DIGITS + 5}
    if weak:
        raise Fail(f"test top-1 within 5 points of chance (10%): {weak}: training did not learn", out)
    return out


# ----------------------------------------------------------------------------------- graphs
def _graph_steps(net: Any, opt: Any, x: Any, y: Any, dtype: Any) -> dict[str, Any]:
    """Three ways to run one training step of ``net`` (SGD, cross-entropy, autocast ``dtype``) on the static
    batch ``x, y``: ``eager``; ``graph fwd+bwd`` (torch.cuda.make_graphed_callables on the model, optimiser
    eager); ``graph whole step`` (forward, backward and the fused optimiser step captured as one CUDA graph,
    the whole-network capture of torch's CUDA-graphs notes). Each returns its loss tensor. Building a graphed
    one runs warm-up steps (they change the weights); one that cannot be captured gets its error instead."""
    import copy

    import torch
    import torch.nn.functional as F

    def autocast() -> Any:  # graphs: the autocast cache must be off (torch's make_graphed_callables notes)
        return torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False)

    def eager_step(m: Any, o: Any) -> Callable[[], Any]:
        def step() -> Any:
            with autocast():
                loss = F.cross_entropy(m(x), y)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()
            return loss
        return step

    steps: dict[str, Any] = {"eager": eager_step(net, opt)}
    errors: dict[str, str] = {}
    models: dict[str, Any] = {"eager": net}
    state = copy.deepcopy(net.state_dict())
    make_opt = opt.__class__
    defaults = {k: v for k, v in opt.defaults.items() if k in ("lr", "momentum", "weight_decay", "fused", "nesterov")}
    try:
        m = copy.deepcopy(net)
        o = make_opt(m.parameters(), **defaults)
        with autocast():
            g = torch.cuda.make_graphed_callables(m, (x,), allow_unused_input=True)
        steps["graph fwd+bwd"] = eager_step(g, o)
        models["graph fwd+bwd"] = m
    except Exception as exc:  # an op that syncs or allocates on the host breaks capture: recorded, not fatal
        errors["graph fwd+bwd"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    try:
        m = copy.deepcopy(net)
        o = make_opt(m.parameters(), **defaults)
        warm = eager_step(m, o)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                warm()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        o.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            with autocast():
                static_loss = F.cross_entropy(m(x), y)
            static_loss.backward()
            o.step()

        def whole() -> Any:
            graph.replay()
            return static_loss
        steps["graph whole step"] = whole
        models["graph whole step"] = m
    except Exception as exc:
        errors["graph whole step"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return {"steps": steps, "errors": errors, "models": models, "state": state}


def part_graphs(args: argparse.Namespace) -> dict[str, Any]:
    """Fewer launches per training step: the step of ResNet-19 (full width, T=4, batch 128, bf16, the fused
    neuron kernels, the fused SGD of build_optimizer), all STAA and plain, eager vs CUDA graphs (model forward
    + backward graphed; the whole step graphed), median ms per step over interleaved rounds, after checking
    that a graphed step gives the eager loss from the same weights. Measures only: the training loop is
    unchanged (a graphed step there would need static batches and a tensor learning rate)."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from step_timing import interleaved_seconds
    from train_throughput import PLAIN

    from pipeline.models import build_model
    from pipeline.models.kernels import resolve_kernels, set_kernels
    from pipeline.precision import training_precision
    from pipeline.training.optim import build_optimizer

    cuda = torch.cuda.is_available() and not SIMULATE
    device = "cuda" if cuda else "cpu"
    width, batch, rounds, per_round = (1.0, 128, 3, 10) if cuda else (0.0625, 4, 1, 1)
    dtype = torch.bfloat16 if cuda else None
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "width": width, "T": 4,
                           "batch": batch, "autocast": "bf16" if cuda else "off", "networks": {}}
    for name, extra in (("all-STAA", {}), ("plain", PLAIN)):
        torch.manual_seed(0)
        cfg = {"arch": "resnet19", "width": width, "T": 4, "num_classes": 100, "in_channels": 3, **extra}
        net = build_model(cfg).to(device).train()
        backend = resolve_kernels("auto", device)
        set_kernels(net, backend)
        opt = build_optimizer(net.parameters(), {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
                                                 "weight_decay": 1e-4}, device=device)
        x = torch.randn(batch, 3, 32, 32, device=device)
        y = torch.randint(0, 100, (batch,), device=device)
        row: dict[str, Any] = {"kernels": backend}
        built: dict[str, Any] | None = None
        with training_precision(device):
            if cuda:
                built = _graph_steps(net, opt, x, y, dtype)
                steps, row["errors"] = built["steps"], built["errors"]
                losses = {}
                for k, m in built["models"].items():  # the same weights and BN buffers, one step each: same loss?
                    m.load_state_dict(built["state"])  # in place: the graphs' parameter addresses stay valid
                    losses[k] = float(steps[k]().float())
                    torch.cuda.synchronize()
                row["first_loss"] = {k: round(v, 5) for k, v in losses.items()}
            else:  # the CPU: the eager step of the same network (the wiring); graphs need CUDA
                def step() -> None:
                    opt.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(net(x), y).backward()
                    opt.step()
                steps, row["errors"] = {"eager": step}, {}

            def synced(fn: Callable[[], Any]) -> Callable[[], None]:
                def call() -> None:
                    fn()
                    if cuda:
                        torch.cuda.synchronize()
                return call

            secs = interleaved_seconds({k: synced(f) for k, f in steps.items()}, rounds, per_round, warmup=3)
        row["ms_per_step"] = {k: round(1e3 * s, 3) for k, s in secs.items()}
        row["images_per_s"] = {k: round(batch / s, 1) for k, s in secs.items()}
        row["speedup_over_eager"] = {k: round(secs["eager"] / s, 2) for k, s in secs.items() if k != "eager"}
        out["networks"][name] = row
        print(name, row, flush=True)
        del net, opt, steps
        built = None  # the graphs and their memory pools go before the next network's
        if cuda:
            torch.cuda.empty_cache()
    if not cuda:
        raise Skip(f"CUDA part (CUDA graphs need a GPU: full width, batch 128, bf16): no GPU here; the CPU smoke "
                   f"(width {width}, batch {batch}) timed the eager step: "
                   f"{ {k: r['ms_per_step'] for k, r in out['networks'].items()} } ms")
    wrong = {n: r["first_loss"] for n, r in out["networks"].items()
             if any(abs(v - r["first_loss"]["eager"]) > 0.02 * abs(r["first_loss"]["eager"]) + 1e-3 or v != v
                    for v in r["first_loss"].values())}
    if wrong:
        raise Fail(f"a graphed step's loss differs from the eager one's from the same weights (> 2%): {wrong}", out)
    if all(r["errors"] and len(r["errors"]) == 2 for r in out["networks"].values()):
        raise Fail(f"no graph could be captured: {[r['errors'] for r in out['networks'].values()]}", out)
    return out


PARTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "facts": part_facts, "amp_step": part_amp_step, "resume_cuda": part_resume_cuda,
    "resume_cpu_to_cuda": part_resume_cpu_to_cuda, "stages": part_stages, "throughput": part_throughput,
    "kernels": part_kernels, "peer_sj": part_peer_sj, "infer": part_infer, "profile": part_profile,
    "realdata": part_realdata, "graphs": part_graphs,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=sorted(PARTS))
    ap.add_argument("--work", required=True, help="scratch folder for this check")
    ap.add_argument("--limit", type=float, default=240.0, help="seconds this part may take (throughput's deadline)")
    args = ap.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        data, status, reason, code = PARTS[args.part](args), "pass", "", PASS
    except Skip as exc:
        data, status, reason, code = {}, "skip", str(exc), SKIP
    except Fail as exc:
        data, status, reason, code = exc.data, "fail", str(exc), FAIL
    except Exception as exc:  # a crash is a failed check, with the error as its reason
        import traceback

        traceback.print_exc()
        data, status, reason, code = {}, "fail", f"{type(exc).__name__}: {exc}", FAIL
    result = {"part": args.part, "status": status, "reason": reason, "seconds": round(time.perf_counter() - t0, 1),
              "data": data}
    print("RESULT " + json.dumps(result, default=str), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
