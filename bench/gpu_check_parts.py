"""The parts of bench/gpu_check.sh, one per call: ``python bench/gpu_check_parts.py PART --work DIR``.

Each part prints ``RESULT {json}`` as its last line (status pass / fail / skip, a reason, its
numbers) and exits 0 (pass), 1 (fail) or 77 (skip). The shell script runs each in its own process
under ``timeout``, so one failing or hanging part never stops the others. CUDA parts skip with
the reason on a machine where torch sees no GPU.

Parts: facts, amp_step, resume_cuda, resume_cpu_to_cuda, stages, throughput (the orchestrator:
compiled variants warm up in the background from the start, timing waits for ``WORK/throughput.go``).
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

    from pipeline.deploy.parity import record_membranes
    from pipeline.models import build_model
    from pipeline.precision import amp_dtype, autocast, fp32_settings
    from pipeline.training.loop import FitConfig, fit
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
        state = fit(net, loader, None, opt, None, step_loss, fc, work, payload=lambda m: {"model": m.state_dict()})
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


# ------------------------------------------------------------------------------ throughput
def _variants() -> list[dict[str, Any]]:
    out = [{"precision": p, "compile": False, "channels_last": False} for p in ("fp32", "bf16", "fp16")]
    out += [{"precision": "bf16", "compile": False, "channels_last": True}]
    out += [{"precision": p, "compile": True, "channels_last": False} for p in ("fp32", "bf16", "fp16")]
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
    if ready is not None and go is not None:
        cmd += ["--ready-file", str(ready), "--go-file", str(go), "--max-wait", str(int(sizes.get("max_wait", 600)))]
    return cmd


def _label(v: dict[str, Any]) -> str:
    return v["precision"] + (" compiled" if v["compile"] else "") + (" channels-last" if v["channels_last"] else "")


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
        v = {"precision": "fp32", "compile": False, "channels_last": False}
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
        plain = [v for v in eager if not v["channels_last"]]
        # the plain precisions share one process (one CUDA start-up), one at a time, nothing else on the GPU
        for group in ([dict(plain[0], precision=" ".join(v["precision"] for v in plain))],
                      [v for v in eager if v["channels_last"]]):
            for v in group:
                labels = [_label(dict(v, precision=p)) for p in v["precision"].split()]
                left = deadline - time.monotonic()
                if left < 15:
                    results.update({label: {"status": "skipped: time budget"} for label in labels})
                    continue
                try:
                    r = subprocess.run(_bench_cmd(v, DEV, json_path, sizes), cwd=REPO, env=_env(),
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
    if not rows:
        raise Fail("no variant produced a measurement", {"variants": results})
    return {"sizes": sizes, "variants": results}


PARTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "facts": part_facts, "amp_step": part_amp_step, "resume_cuda": part_resume_cuda,
    "resume_cpu_to_cuda": part_resume_cpu_to_cuda, "stages": part_stages, "throughput": part_throughput,
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
