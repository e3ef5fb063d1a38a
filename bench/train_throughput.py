"""Training throughput of the STAA-SNN ResNet-19 (CIFAR-100 head, 32x32) per precision, CPU or CUDA.

One training step is what ``pipeline.training.loop.fit`` runs: autocast in the run's dtype
(``pipeline.precision``: TF32 and ``cudnn.benchmark`` inside training on CUDA, a GradScaler for
fp16 only), the project's optimiser (fused on CUDA), optionally ``torch.compile``,
channels-last weights and the neurons' kernel backend (``--kernels``, ``train.kernels``: torch, or the
fused Triton kernels on CUDA). ``--plain``: the plain spiking ResNet-19 (LIF, every STAA part off, as
bench/peer_spikingjelly.py) instead of the all-STAA one. Prints images/s, ms per step, peak memory
(CUDA: allocated by torch; CPU: the process's peak RSS) and, for compiled runs, the first (compiling)
step's seconds.

CPU, as measured before/after changes (the default precisions are fp32 and bf16)::

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 OMP_NUM_THREADS=1 \\
        .venv/bin/python bench/train_throughput.py --widths 0.125 --steps 5 --warmup 2 --threads 1

GPU (what bench/gpu_check.sh runs, one variant per process)::

    python bench/train_throughput.py --device cuda --widths 1 --batch 128 --precisions bf16 --compile \\
        --json results.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.models import build_model  # noqa: E402
from pipeline.models.kernels import SETTINGS, resolve_kernels, set_kernels  # noqa: E402
from pipeline.precision import amp_dtype, autocast, device_type, needs_grad_scaler, training_precision  # noqa: E402
from pipeline.training.loop import to_channels_last  # noqa: E402
from pipeline.training.optim import build_optimizer  # noqa: E402


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: str) -> None:
    if device_type(device) == "cuda":
        torch.cuda.synchronize()


def wait_for_turn(ready: Path | None, go: Path | None, device: str, max_wait_s: float = 600.0,
                  poll_s: float = 0.2) -> None:
    """Between warm-up and timing: say "warmed up" (``ready``), free cached GPU memory, wait for ``go``.

    Lets bench/gpu_check.sh compile several variants at once and still time them one at a time.
    Gives up (exit 3) after ``max_wait_s``, so an orphaned waiter never holds the GPU for long.
    """
    if ready is None or go is None:
        return
    if device_type(device) == "cuda":
        torch.cuda.empty_cache()
    ready.write_text(str(os.getpid()))
    end = time.monotonic() + max_wait_s
    while not go.exists():
        if time.monotonic() > end:
            sys.exit(f"no {go} after {max_wait_s:.0f} s: giving up")
        time.sleep(poll_s)


# the plain network: bench/peer_spikingjelly.py's ``ours`` (LIF, atan k = 2, STAA off)
PLAIN: dict[str, Any] = {"neuron": {"kind": "lif", "decay": 0.25, "gain": 1.0, "v_th": 0.5, "surrogate": "atan",
                                    "surrogate_k": 2.0},
                         "staa": {"pe": False, "gc": False, "sa": False, "tsrd": False}}


def measure(width: float, T: int, batch: int, steps: int, warmup: int, precision: str, device: str = "cpu",
            compile_model: bool = False, channels_last: bool = False, image: int = 32,
            ready: Path | None = None, go: Path | None = None, max_wait_s: float = 600.0,
            kernels: str = "torch", plain: bool = False) -> dict[str, Any]:
    """Time ``steps`` full training steps (forward, loss, backward, optimiser step) after ``warmup`` ones.

    Peak memory is that of the timed steps (the steady state), not of the first, compiling one.
    """
    torch.manual_seed(0)
    cuda = device_type(device) == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cfg: dict[str, Any] = {"arch": "resnet19", "width": width, "T": T, "num_classes": 100, "in_channels": 3}
    if plain:
        cfg.update(PLAIN)
    net = build_model(cfg).to(device)
    backend = resolve_kernels(kernels, device)
    set_kernels(net, backend)
    if channels_last:
        to_channels_last(net)
    net.train()
    model = torch.compile(net) if compile_model else net
    opt = build_optimizer(net.parameters(), {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
                          device=device)
    dtype = amp_dtype(device, precision, amp=True, cpu_bf16=precision == "bf16")
    scaler = torch.amp.GradScaler(device_type(device), enabled=needs_grad_scaler(device, dtype))
    x = torch.randn(batch, 3, image, image, device=device)
    y = torch.randint(0, 100, (batch,), device=device)

    def step() -> None:
        with autocast(device, dtype):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    with training_precision(device):
        t0 = time.perf_counter()
        step()
        _sync(device)
        first_s = time.perf_counter() - t0
        for _ in range(max(warmup - 1, 0)):
            step()
        _sync(device)
        wait_for_turn(ready, go, device, max_wait_s)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        wall = time.perf_counter() - start
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "width": width, "T": T, "batch": batch,
        "image": image, "precision": precision, "autocast": str(dtype).replace("torch.", "") if dtype else "off",
        "grad_scaler": scaler.is_enabled(), "compile": compile_model, "channels_last": channels_last,
        "kernels": backend, "plain": plain,
        "steps": steps, "warmup": warmup, "images_per_s": round(steps * batch / wall, 2),
        "ms_per_step": round(1000 * wall / steps, 3), "first_step_s": round(first_s, 3),
        "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else round(peak_rss_mib(), 1),
        "peak_mem_kind": "cuda_allocated" if cuda else "process_rss", "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=float, nargs="+", default=[0.25])
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile)")
    ap.add_argument("--channels-last", action="store_true", help="channels-last conv weights (train.channels_last)")
    ap.add_argument("--kernels", default="torch", choices=SETTINGS,
                    help="neuron training kernels (train.kernels; default torch: the eager baseline)")
    ap.add_argument("--plain", action="store_true", help="the plain network (LIF, STAA off) instead of all-STAA")
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per measurement to this file")
    ap.add_argument("--ready-file", type=Path, default=None, help="written after warm-up (with --go-file)")
    ap.add_argument("--go-file", type=Path, default=None, help="timing starts once this file exists")
    ap.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for --go-file before giving up")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preload = os.environ.get("LD_PRELOAD", "")
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
          f"tcmalloc {'on' if 'tcmalloc' in preload else 'off'}; ResNet-19/CIFAR-100, 32x32, T={args.T}, "
          f"batch {args.batch}, {args.warmup} warm-up + {args.steps} timed steps"
          f"{', compiled' if args.compile else ''}{', channels-last' if args.channels_last else ''}, "
          f"kernels {resolve_kernels(args.kernels, args.device)}{', plain (STAA off)' if args.plain else ''}")
    names = " ".join(f"{p + ' img/s':>11}" for p in args.precisions)
    ratio = "bf16/fp32" if {"fp32", "bf16"} <= set(args.precisions) else ""
    mem = "peak MiB" if device_type(args.device) == "cuda" else "peak RSS MiB"
    print(f"{'width':>6} {names} {ratio:>10} {mem:>13}")
    for width in args.widths:
        rows = {}
        for p in args.precisions:
            rows[p] = measure(width, args.T, args.batch, args.steps, args.warmup, p, args.device, args.compile,
                              args.channels_last, ready=args.ready_file, go=args.go_file, max_wait_s=args.max_wait,
                              kernels=args.kernels, plain=args.plain)
            if args.json is not None:
                with args.json.open("a") as f:
                    f.write(json.dumps(rows[p]) + "\n")
        rate = " ".join(f"{rows[p]['images_per_s']:>11.1f}" for p in args.precisions)
        r = f"{rows['bf16']['images_per_s'] / rows['fp32']['images_per_s']:>10.2f}" if ratio else f"{'':>10}"
        peak = max(row["peak_mem_mib"] for row in rows.values())
        print(f"{width:>6g} {rate} {r} {peak:>13.0f}", flush=True)


if __name__ == "__main__":
    main()
