"""The GPU path's logic, tested on the CPU (issue 13): rank -> device binding, refusal of
multi-process non-train stages, the cross-rank non-finite flag and TET under DDP (2 real gloo
processes), strict FP32 inside parity and validate's torch rows, fp32 membranes under autocast,
the loud failure when a GPU is present but unusable, NNCF's kernel choice, speed-only keys.
"""
from __future__ import annotations

import datetime
import os
import socket
import stat
import time
from pathlib import Path

import pytest
import torch

from pipeline.distributed import DeviceError, DistInfo, check_stage_world, dist_info, rank_device
from pipeline.precision import amp_dtype, fp32_settings, is_strict_fp32, needs_grad_scaler, strict_fp32


def _script(folder: Path, name: str, body: str) -> Path:
    """An executable shell script ``folder/name`` (a stand-in for nvidia-smi / nvcc on PATH)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# --- rank -> device ------------------------------------------------------------------------

def test_dist_info_reads_torchrun_environment():
    info = dist_info({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 4)
    assert dist_info({}) == DistInfo()


def test_each_rank_binds_to_its_local_gpu():
    two_nodes = [DistInfo(rank=r, world_size=4, local_rank=r % 2, local_world_size=2) for r in range(4)]
    assert [rank_device("cuda", i, gpu_count=2) for i in two_nodes] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert rank_device("cuda", DistInfo(), gpu_count=1) == "cuda"  # one process: the current device
    assert rank_device("cpu", two_nodes[1], gpu_count=2) == "cpu"
    assert rank_device("cuda:1", DistInfo(), gpu_count=2) == "cuda:1"
    with pytest.raises(DeviceError, match="LOCAL_RANK=2 needs GPU 2, but only 2 GPU"):
        rank_device("cuda", DistInfo(rank=2, world_size=3, local_rank=2, local_world_size=3), gpu_count=2)


# --- multi-process refusal -------------------------------------------------------------------

def test_only_train_may_run_multi_process():
    from pipeline.registry import STAGES

    assert [s.name for s in STAGES if s.distributed] == ["train"]
    for s in STAGES:
        check_stage_world(s.name, s.distributed, world_size=1)
        if not s.distributed:
            with pytest.raises(DeviceError, match=f"stage '{s.name}' runs as one process.*WORLD_SIZE=2"):
                check_stage_world(s.name, s.distributed, world_size=2)


@pytest.mark.slow
def test_runner_refuses_multi_rank_reduce_t_before_any_work(write_config, monkeypatch):
    from pipeline.config import load_config
    from pipeline.runner import StageError, run_stage, run_store

    cfg = load_config(write_config({"train": {"epochs": 1, "max_batches": 1}}))
    assert run_stage(cfg, "train") == "done"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(StageError, match="stage 'reduce_t' runs as one process.*torchrun"):
        run_stage(cfg, "reduce_t")
    store = run_store(cfg)
    assert not store.partial_dir("reduce_t").exists() and not store.stage_dir("reduce_t").exists()
    assert not torch.distributed.is_initialized()  # refused before joining a process group


# --- two real gloo processes: the shared non-finite flag, TET through DDP ----------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _poisoned_fit(n: int, at_call: int | None, value: float):
    """A Linear(3, 2) on ``n`` random rows in batches of 2, and a step loss that turns ``value``
    (nan/inf) at call ``at_call``: the smallest real fit() whose loss goes non-finite on cue."""
    lin = torch.nn.Linear(3, 2)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3), torch.randint(0, 2, (n,)))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    calls = {"n": 0}

    def step_loss(m, xb, yb):
        calls["n"] += 1
        logits = m(xb)
        loss = torch.nn.functional.cross_entropy(logits, yb)
        return (loss * value if calls["n"] == at_call else loss), logits

    return lin, loader, calls, step_loss


def _gloo_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank: TET gradients through DDP, then a loss that turns NaN on rank 1 only."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from pipeline.models import build_model
    from pipeline.training.loop import Checkpoints, FitConfig, NonFiniteLoss, fit
    from pipeline.training.losses import classification_loss
    from stages.train import StepsForward, _TETView

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    lines = []
    try:
        torch.manual_seed(0)  # same initial weights on both ranks, different data per rank below
        net = build_model({"arch": "resnet19", "width": 0.0625, "T": 2, "num_classes": 4, "in_channels": 1,
                           "staa": {"tsrd": False}})
        ddp = torch.nn.parallel.DistributedDataParallel(StepsForward(net))
        g = torch.Generator().manual_seed(100 + rank)
        x, y = torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
        loss, _ = classification_loss(_TETView(ddp), x, y, "tet", 0.0)
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.grad is not None])
        grads = [torch.zeros_like(grad) for _ in range(world)]
        dist.all_gather(grads, grad)
        lines.append(f"tet_grads_equal={torch.equal(grads[0], grads[1])} grad_norm={grad.norm():.4g}")

        lin, loader, calls, step_loss = _poisoned_fit(8, at_call=3 if rank == 1 else None, value=float("nan"))
        model = torch.nn.parallel.DistributedDataParallel(lin)

        fc = FitConfig(epochs=1, device="cpu", rank=rank, world_size=world, progress=False, check_every=1)
        try:
            fit(model, loader, None, torch.optim.SGD(lin.parameters(), lr=0.1), None, step_loss, fc,
                Checkpoints(Path(out_dir) / f"ckpt{rank}", "best.pt", "last.pt"), payload=lambda m: {"model": m.state_dict()})
            lines.append("nan=not raised")
        except NonFiniteLoss as exc:
            lines.append(f"nan=raised at step {calls['n']}: {exc}")
    except Exception as exc:  # recorded, so the parent sees what went wrong on which rank
        lines.append(f"error={type(exc).__name__}: {exc}")
    finally:
        (Path(out_dir) / f"rank{rank}.txt").write_text("\n".join(lines))
        dist.destroy_process_group()


def test_two_gloo_ranks_share_the_nonfinite_flag_and_sync_tet_gradients(tmp_path):
    import torch.multiprocessing as mp

    (tmp_path / "ckpt0").mkdir()
    (tmp_path / "ckpt1").mkdir()
    ctx = mp.start_processes(_gloo_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 180  # a rank waiting for the other forever is the bug this guards against
    while not ctx.join(timeout=5):  # join returns as each process ends
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the two gloo ranks did not finish within 180 s (a collective hangs)")
    out = {r: (tmp_path / f"rank{r}.txt").read_text() for r in range(2)}
    for r in range(2):
        assert "error=" not in out[r], out
        assert "tet_grads_equal=True" in out[r], out  # DDP averaged the TET gradients
        # rank 0's own loss stayed finite; it stops at the same step as rank 1, before backward
        assert "nan=raised at step 3: loss became non-finite" in out[r], out
        assert "learning rate" in out[r]
    assert not (tmp_path / "ckpt0" / "last.pt").exists()  # no checkpoint from the bad epoch


def test_nonfinite_check_every_n_steps_names_the_range(tmp_path):
    from pipeline.training.loop import Checkpoints, FitConfig, NonFiniteLoss, fit

    lin, loader, calls, step_loss = _poisoned_fit(12, at_call=2, value=float("inf"))

    fc = FitConfig(epochs=1, device="cpu", progress=False, check_every=4)
    with pytest.raises(NonFiniteLoss, match=r"batch 1-4 \(checked every 4 batches\)"):
        fit(lin, loader, None, torch.optim.SGD(lin.parameters(), lr=0.1), None, step_loss, fc,
                    Checkpoints(tmp_path, "best.pt", "last.pt"),
            payload=lambda m: {"model": m.state_dict()})
    assert calls["n"] == 4  # found at the first check, not at the end of the epoch


# --- strict FP32 in parity code and validate's torch rows ---------------------------------------

@pytest.fixture
def loose_precision():
    """TF32 / bf16 allowed everywhere (what a training loop or a user may leave behind)."""
    saved = fp32_settings()
    for backend, op, value in (("cuda", "matmul", "tf32"), ("cudnn", "conv", "tf32"), ("cudnn", "rnn", "tf32"),
                               ("mkldnn", "matmul", "bf16"), ("mkldnn", "conv", "bf16")):
        getattr(getattr(torch.backends, backend), op).fp32_precision = value
    assert not is_strict_fp32()
    yield fp32_settings()
    for name, value in saved.items():
        backend, op = name.split(".")
        getattr(getattr(torch.backends, backend), op).fp32_precision = value


class _Spy(torch.nn.Module):
    """Records the fp32 precision settings in force while its forward runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.seen: list[dict[str, str]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(fp32_settings())
        return self.fc(x)


def test_parity_compare_runs_in_strict_fp32(loose_precision):
    from pipeline.deploy.proofs.parity import compare

    seen = []

    def spy(x):
        seen.append(fp32_settings())
        return (x.sum(1, keepdim=True).repeat(1, 3),)

    rep = compare(spy, spy, [torch.randn(2, 4), torch.randn(2, 4)], tie_tol=0.0, spikes=False)
    assert rep.n == 4 and len(seen) == 4
    assert all(v == "ieee" for s in seen for v in s.values()), seen
    assert fp32_settings() == loose_precision  # restored afterwards


def test_torch_spike_reference_and_validate_torch_rows_run_in_strict_fp32(loose_precision):
    import numpy as np

    from pipeline.deploy.proofs.parity import torch_with_spikes
    from pipeline.runtime.backends.torch import TorchRunner

    spy = _Spy()
    torch_with_spikes(spy, membranes=False)(torch.randn(2, 4))
    TorchRunner(spy).run({"input": np.zeros((2, 4), np.float32)})
    assert len(spy.seen) == 2 and all(v == "ieee" for s in spy.seen for v in s.values()), spy.seen
    assert fp32_settings() == loose_precision


def test_strict_fp32_block_restores_the_training_settings(loose_precision):
    with strict_fp32():
        assert is_strict_fp32()
    assert fp32_settings() == loose_precision


def test_amp_policy():
    assert amp_dtype("cpu") is None and amp_dtype("cpu", cpu_bf16=True) == torch.bfloat16
    assert amp_dtype("cuda:1", "fp16") == torch.float16 and amp_dtype("cuda", amp=False) is None
    assert amp_dtype("cpu", "bf16") == torch.bfloat16 and amp_dtype("cuda", "fp32") is None
    assert needs_grad_scaler("cuda:0", torch.float16)
    assert not needs_grad_scaler("cuda", torch.bfloat16) and not needs_grad_scaler("cpu", torch.float16)


# --- neurons in fp32 under autocast -----------------------------------------------------------

@pytest.mark.parametrize("staa", [False, True])
def test_membranes_are_fp32_under_cpu_bf16_autocast(staa):
    from pipeline.models import record_membranes
    from pipeline.models import build_model, neuron_modules

    torch.manual_seed(0)
    parts = {"pe": staa, "gc": staa, "sa": staa, "tsrd": False}
    model = build_model({"arch": "resnet19", "width": 0.0625, "T": 2, "num_classes": 4, "in_channels": 1,
                         "neuron": {"kind": "lif"}, "staa": parts})
    inputs, outputs = {}, {}

    def hook(name):
        def record(_m, args, out):
            inputs[name], outputs[name] = args[0].dtype, out.dtype
        return record

    hooks = [m.register_forward_hook(hook(name)) for name, m in neuron_modules(model)]
    with torch.autocast("cpu", dtype=torch.bfloat16), record_membranes(model) as membranes:
        logits = model(torch.randn(2, 1, 8, 8))
    for h in hooks:
        h.remove()
    if not staa:  # bf16 conv outputs reach the neurons (STAA's fp32 parameters promote them to fp32)
        assert torch.bfloat16 in set(inputs.values())
    assert membranes and {v.dtype for v in membranes.values()} == {torch.float32}
    assert all(outputs[n] == inputs[n] for n in inputs)  # spikes come back in the input dtype
    logits.float().sum().backward()  # and the surrogate gradient flows through the casts


# --- a GPU that torch cannot use: loud, not a silent CPU run ------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch cannot use CUDA")
def test_device_auto_fails_loudly_when_nvidia_smi_answers_but_torch_cannot_use_it(tmp_path, monkeypatch):
    from pipeline.runner import StageError, resolve_device

    smi = tmp_path / "gpu_bin"
    _script(smi, "nvidia-smi", 'echo "NVIDIA H200, 570.86.15"')
    monkeypatch.setenv("PATH", f"{smi}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(StageError, match=r"a GPU is present \(nvidia-smi: NVIDIA H200, 570.86.15\) but torch .* "
                                         r"cannot use it.*set device: cpu"):
        resolve_device({"device": "auto"})
    with pytest.raises(StageError, match="a GPU is present"):
        resolve_device({"device": "cuda"})
    assert resolve_device({"device": "cpu"}) == "cpu"  # asked for on purpose: no probe

    _script(smi, "nvidia-smi", 'echo "NVIDIA-SMI has failed" >&2; exit 9')  # no usable GPU here
    assert resolve_device({"device": "auto"}) == "cpu"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi at all
    assert resolve_device({"device": "auto"}) == "cpu"
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="device: cuda was asked for but CUDA is not available"):
        resolve_device({"device": "cuda"})  # a config problem: the CLI exits 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch cannot use CUDA")
def test_device_cuda_without_a_gpu_exits_2_with_one_line(tmp_path):
    """Issue 20 case 9: it exited 1, though config problems exit 2."""
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "PATH": str(tmp_path / "no-nvidia-smi"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "pipeline", "stage", "train", "--set", "device=cuda",
                          "--set", f"artifacts_dir={tmp_path / 'a'}"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("config error: device: cuda was asked for but CUDA is not "
                                                   "available"), res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "a").exists()


# --- NNCF's CUDA kernels ----------------------------------------------------------------------

def test_nncf_kernel_plan_compares_nvcc_with_torch_cuda(tmp_path):
    from pipeline.compress.nncf_env import find_nvcc, plan_kernels

    old = _script(tmp_path / "cuda12" / "bin", "nvcc", 'echo "Cuda compilation tools, release 12.4, V12.4.131"')
    new = _script(tmp_path / "cuda13" / "bin", "nvcc", 'echo "Cuda compilation tools, release 13.0, V13.0.88"')
    odd = _script(tmp_path / "odd" / "bin", "nvcc", 'echo "something else"')
    mismatch = plan_kernels(str(old), "13.0")
    assert mismatch.kernels == "reference" and "nvcc 12.4" in mismatch.reason and "CUDA 13.0" in mismatch.reason
    assert plan_kernels(str(new), "13.0").kernels == "extension"
    assert plan_kernels(str(odd), "13.0").kernels == "reference"
    assert plan_kernels(None, "13.0").kernels == "reference"
    assert plan_kernels(str(new), "13.0", override="reference").kernels == "reference"
    # torch's search order: CUDA_HOME first, then PATH
    assert find_nvcc({"CUDA_HOME": str(tmp_path / "cuda12"), "PATH": str(new.parent)}) == str(old)
    assert find_nvcc({"PATH": str(new.parent)}) == str(new)


def test_reference_kernels_replace_the_cuda_extension_without_a_build():
    from nncf.torch.extensions import ExtensionNamespace
    from nncf.torch.quantization.extensions import QuantizedFunctionsCUDALoader
    from nncf.torch.quantization.reference import ReferenceQuantizedFunctions

    from pipeline.compress.nncf_env import prepare_nncf_kernels, use_reference_kernels

    namespace = ExtensionNamespace(QuantizedFunctionsCUDALoader())
    assert use_reference_kernels(namespace)
    assert namespace.get("Quantize_forward") is ReferenceQuantizedFunctions.Quantize_forward
    assert not use_reference_kernels(object())
    assert prepare_nncf_kernels("cpu") == "cpu"


# --- speed-only settings stay out of the cache key ---------------------------------------------

def test_speed_settings_do_not_invalidate_training(write_config):
    from pipeline.config import load_config
    from pipeline.registry import spec
    from pipeline.runner import run_store, stage_key

    path = write_config()
    store = run_store(load_config(path))

    def key(*sets: str) -> str:
        return stage_key(load_config(path, list(sets)), spec("train"), store)

    base = key()
    assert key("data.workers=4", "data.prefetch=4", "train.compile=true", "train.channels_last=true") == base
    assert key("data.batch_size=16") != base and key("train.precision=fp16") != base


# --- speed options keep the arithmetic ---------------------------------------------------------

def _tiny_net():
    from pipeline.models import build_model

    torch.manual_seed(0)
    return build_model({"arch": "resnet19", "width": 0.0625, "T": 2, "num_classes": 4, "in_channels": 1,
                        "staa": {"tsrd": False}})


def test_channels_last_converts_conv_weights_and_keeps_outputs():
    from pipeline.training.loop import to_channels_last

    net, x = _tiny_net().eval(), torch.randn(2, 1, 8, 8)
    ref = net(x)
    to_channels_last(net)  # Module.to(memory_format=...) refuses the 5-D position encodings
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert any(not c.weight.is_contiguous() for c in convs if c.weight.shape[-1] > 1)
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)


def test_model_traces_as_one_graph_under_autocast():
    """train.compile: the T loop, the surrogate autograd.Function and the neurons' fp32 region trace
    without graph breaks (``fullgraph=True`` raises on the first one), forward and backward."""
    net = _tiny_net().train()
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(torch.randn(2, 1, 8, 8))
    out.float().sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_resume_takes_the_optimizer_implementation_of_the_new_run(tmp_path):
    """A CPU checkpoint (default AdamW) resumed by a run with the fused AdamW (what CUDA uses) keeps
    the fused kernels: load_state_dict would otherwise restore the saved run's choice."""
    from pipeline.training.loop import Checkpoints, FitConfig, fit

    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)

    def step_loss(m, xb, yb):
        logits = m(xb)
        return torch.nn.functional.cross_entropy(logits, yb), logits

    def run(epochs: int, fused: bool | None):
        torch.manual_seed(0)
        lin = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(lin.parameters(), lr=0.01, fused=fused)
        state = fit(lin, loader, None, opt, None, step_loss, FitConfig(epochs=epochs, progress=False),
                    Checkpoints(tmp_path, "best.pt", "last.pt"),
                    payload=lambda m: {"model": m.state_dict(), "model_cfg": {}, "data_meta": {}})
        return state, opt

    run(1, None)
    state, opt = run(2, True)
    assert state.resumed_from == 1 and state.epoch == 2
    assert opt.param_groups[0]["fused"] is True
    steps = [s["step"] for s in opt.state.values()]
    assert steps and all(s.dtype == torch.float32 and float(s) == 4.0 for s in steps)  # 2 epochs x 2 batches
