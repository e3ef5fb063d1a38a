"""torchrun support: which device a process uses, which stages may run multi-process, and the
process group's life (init with the rank's GPU, barriers, a cross-rank flag, teardown).

Why each piece exists (issue 13):
- under ``torchrun --nproc_per_node N`` every process reads ``LOCAL_RANK`` and binds itself to
  ``cuda:LOCAL_RANK`` (``torch.cuda.set_device`` + ``init_process_group(device_id=...)``); without
  it every rank lands on GPU 0 and the first NCCL collective hangs or fails;
- only stages whose spec says ``distributed=True`` (train) may run with ``WORLD_SIZE > 1``; the
  others are refused before any work, since a rank that returns early waits at the commit
  barrier until NCCL's watchdog kills the job;
- :func:`any_rank` shares a flag (e.g. "a loss was not finite") so every rank stops together;
- ``device: auto`` never falls back to the CPU silently when a GPU is present but torch cannot
  use it (:func:`resolve_device`, :func:`nvidia_smi_gpus`).
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping

import torch


class DeviceError(RuntimeError):
    """The requested device cannot be used as asked; the message says why and what to do."""


class DeviceNotHere(DeviceError):
    """The config asks for a device this machine does not have (``device: cuda``, no GPU): a config
    problem, which the CLI reports with exit code 2."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (all zeros/ones for a plain process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info(env: Mapping[str, str] | None = None) -> DistInfo:
    """Read torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", 1))
    return DistInfo(rank=int(env.get("RANK", 0)), world_size=world, local_rank=int(env.get("LOCAL_RANK", 0)),
                    local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)))


def rank_device(device: str, info: DistInfo, gpu_count: int) -> str:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun.

    A single process keeps ``cuda`` (the current device). Raises :class:`DeviceError` when the
    node has fewer visible GPUs than processes.
    """
    if not device.startswith("cuda"):
        return device
    if ":" in device:  # an explicit index is the user's choice
        index = int(device.split(":", 1)[1])
        if index >= gpu_count:
            raise DeviceError(f"device {device} asked for but only {gpu_count} GPU(s) are visible")
        return device
    if not info.distributed:
        return "cuda"
    if info.local_rank >= gpu_count:
        raise DeviceError(
            f"LOCAL_RANK={info.local_rank} needs GPU {info.local_rank}, but only {gpu_count} GPU(s) are visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start torchrun with "
            f"--nproc_per_node {gpu_count} or fewer")
    return f"cuda:{info.local_rank}"


def nvidia_smi_gpus(nvidia_smi: str | None = None, timeout: float = 15.0) -> list[str]:
    """GPUs that ``nvidia-smi`` reports (``"name, driver version"`` each); empty when it is absent or fails.

    ``nvidia_smi`` is the executable to ask (default: the one on ``PATH``), so a test can point
    this at a script of its own.
    """
    exe = nvidia_smi or shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def _cuda_failure() -> str:
    """Why torch cannot use CUDA, in torch's words when it has any."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as exc:  # torch raises RuntimeError/AssertionError with the driver's reason
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'}"
    return "torch.cuda.is_available() is False"


def resolve_device(want: str, info: DistInfo | None = None, nvidia_smi: str | None = None,
                   cuda_available: bool | None = None) -> str:
    """The device a stage runs on, for config ``device`` (``auto``, ``cpu``, ``cuda``).

    ``auto`` picks CUDA when torch can use it and the CPU when the machine has no GPU; when a GPU
    is present (``nvidia-smi`` answers) but torch cannot use it, it raises instead of starting a
    long run on the CPU. ``cpu`` never probes. Under torchrun CUDA becomes ``cuda:LOCAL_RANK``.
    """
    info = dist_info() if info is None else info
    if want == "cpu":
        return "cpu"
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if available:
        return rank_device("cuda" if want == "auto" else want, info, torch.cuda.device_count())
    gpus = nvidia_smi_gpus(nvidia_smi)
    if gpus:
        raise DeviceError(
            f"a GPU is present (nvidia-smi: {'; '.join(gpus)}) but torch {torch.__version__} "
            f"(built for CUDA {torch.version.cuda}) cannot use it: {_cuda_failure()}. Install a driver that "
            f"supports CUDA {torch.version.cuda} or a torch build for this driver; to train on the CPU on "
            f"purpose, set device: cpu (--set device=cpu)")
    if want != "auto":
        raise DeviceNotHere(f"device: {want} was asked for but CUDA is not available (no GPU answers nvidia-smi); "
                            f"set device: auto or cpu (--set device=cpu)")
    return "cpu"


def check_stage_world(stage: str, supports_distributed: bool, world_size: int, config_source: str = "F") -> None:
    """Refuse a multi-process run of a stage that only runs as one process (before any work)."""
    if world_size > 1 and not supports_distributed:
        raise DeviceError(
            f"stage '{stage}' runs as one process, but this is process {os.environ.get('RANK', '?')} of "
            f"WORLD_SIZE={world_size} (torchrun); only 'train' runs multi-process. Train with torchrun "
            f"(torchrun --nproc_per_node N -m pipeline.stage train --config {config_source}), then run the "
            f"other stages as one process: python -m pipeline run --config {config_source}")


_TEARDOWN_REGISTERED = False


def init_process_group(world_size: int, device: str) -> None:
    """Join the torchrun job: NCCL bound to this rank's GPU on CUDA, gloo on the CPU. Idempotent.

    The group is destroyed at process exit (:func:`destroy_process_group`), or earlier by the caller.
    """
    global _TEARDOWN_REGISTERED
    if world_size <= 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device.startswith("cuda"):
        dev = torch.device(device if ":" in device else f"cuda:{dist_info().local_rank}")
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dist.init_process_group("gloo")
    if not _TEARDOWN_REGISTERED:
        atexit.register(destroy_process_group)
        _TEARDOWN_REGISTERED = True


def destroy_process_group() -> None:
    """Leave the job cleanly (NCCL warns, and may hang at exit, when a group is never destroyed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op outside a process group); NCCL waits on this rank's GPU."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def any_rank(flag: torch.Tensor) -> bool:
    """True when ``flag`` (a bool/number tensor on this rank's device) is set on any rank.

    The one host sync of a check: callers accumulate the flag on the device between checks.
    Every rank must call it at the same point (it is a collective).
    """
    import torch.distributed as dist

    value = flag.detach().reshape(()).to(torch.int32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def auto_workers(local_world_size: int = 1, cap: int = 8) -> int:
    """DataLoader workers per process: ``min(cap, CPU cores / processes on this node)``, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cap, cores // max(local_world_size, 1)))


def wrap_ddp(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """``DistributedDataParallel`` with this rank's GPU as its device (none on the CPU)."""
    if device.startswith("cuda"):
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[index], output_device=index)
    return torch.nn.parallel.DistributedDataParallel(model)


__all__ = ["DistInfo", "DeviceError", "dist_info", "rank_device", "resolve_device", "nvidia_smi_gpus",
           "check_stage_world", "init_process_group", "destroy_process_group", "barrier", "any_rank",
           "auto_workers", "wrap_ddp"]
