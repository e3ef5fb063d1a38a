"""train: the float STAA-SNN at model.T time steps (best/last checkpoints, TensorBoard, history.csv, test accuracy).

Multi-process (``torchrun --nproc_per_node N -m pipeline.stage train``): each rank trains on its
own GPU (``cuda:LOCAL_RANK``) with ``data.batch_size`` images per step, so the global batch is
``N * data.batch_size``; the learning rate is used as configured (not scaled), and the effective
global batch is logged and recorded in the metrics. See docs/gpu.md.
"""
from __future__ import annotations

from typing import Any

import torch

from pipeline.checkpoint import load_model, model_payload
from pipeline.console import LOG_ONLY
from pipeline.data import data_bundle, data_meta, eval_loader, model_config, train_loader
from pipeline.distributed import wrap_ddp
from pipeline.models import build_model
from pipeline.models.kernels import resolve_kernels, set_kernels
from pipeline.precision import amp_dtype
from pipeline.runner import StageContext, StageError, StageResult
from pipeline.schema import ConfigError
from pipeline.training.evaluate import evaluate
from pipeline.training.history import history_rows, write_history
from pipeline.training.loop import FitConfig, NonFiniteLoss, fit, seed_everything, to_channels_last, total_steps
from pipeline.training.losses import classification_loss
from pipeline.training.optim import build_optimizer, warmup_cosine
from pipeline.training.tb import tensorboard_writer


class StepsForward(torch.nn.Module):
    """``x -> per-step logits [T, B, K]`` as the module's forward, so that DDP and torch.compile wrap it.

    TET needs ``forward_steps``; calling it on the network inside DDP would bypass DDP's forward
    (no gradient all-reduce), and on a compiled module it would run uncompiled; so under DDP or
    compile the wrapped module is this adapter instead.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.forward_steps(x)


class _TETView:
    """What ``classification_loss(kind="tet")`` calls: ``forward_steps`` is the DDP-wrapped adapter."""

    def __init__(self, wrapped: torch.nn.Module) -> None:
        self.forward_steps = wrapped


def _tet_view_needed(ctx: StageContext, t: dict[str, Any]) -> bool:
    return t["loss"] == "tet" and (ctx.world_size > 1 or bool(t["compile"]))


def _prepare(net: torch.nn.Module, ctx: StageContext, t: dict[str, Any]) -> torch.nn.Module:
    """The module ``fit`` trains: DDP across ranks, compiled on request (around the TET adapter when needed)."""
    model: torch.nn.Module = StepsForward(net) if _tet_view_needed(ctx, t) else net
    if ctx.world_size > 1:
        model = wrap_ddp(model, ctx.device)
    if t["compile"]:
        model = torch.compile(model)
    return model


def _kernels(ctx: StageContext, setting: str) -> str:
    """The neurons' training backend ``train.kernels`` means on this device (before any data is read: a
    setting this machine cannot run is a config error that names the fix)."""
    try:
        backend = resolve_kernels(setting, ctx.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    ctx.log.info("neuron training kernels: %s (train.kernels=%s, device %s)", backend, setting, ctx.device,
                 extra=LOG_ONLY)
    return backend


def run(ctx: StageContext) -> StageResult:
    cfg, t = ctx.cfg, ctx.cfg["train"]
    if t["threads"]:
        torch.set_num_threads(t["threads"])
    kernels = _kernels(ctx, t["kernels"])
    seed_everything(cfg["seed"])
    bundle = data_bundle(cfg)
    mcfg = model_config(cfg, bundle)
    net = build_model(mcfg).to(ctx.device)
    if t["channels_last"] and ctx.device.startswith("cuda"):
        to_channels_last(net)
    set_kernels(net, kernels)
    model = _prepare(net, ctx, t)
    loader = train_loader(cfg, bundle, ctx.rank, ctx.world_size)
    val = eval_loader(cfg, bundle.val) if len(bundle.val) else None
    opt = build_optimizer(net.parameters(), t, device=ctx.device)
    steps = total_steps(loader, t["epochs"], t["max_batches"])
    sched = warmup_cosine(opt, steps, t["warmup_epochs"] * (steps // max(t["epochs"], 1)))
    meta = data_meta(bundle)
    global_batch = cfg["data"]["batch_size"] * ctx.world_size
    if ctx.is_main:
        ctx.log.info("batch %d per process x %d process(es) = global batch %d; lr %g as configured (not scaled "
                     "with the number of processes)", cfg["data"]["batch_size"], ctx.world_size, global_batch, t["lr"],
                     extra=None if ctx.world_size > 1 else LOG_ONLY)

    if _tet_view_needed(ctx, t):
        view = _TETView(model)

        def step_loss(m, x, y):
            return classification_loss(view, x, y, "tet", t["label_smoothing"])
    else:
        def step_loss(m, x, y):
            return classification_loss(m, x, y, t["loss"], t["label_smoothing"])

    writer = tensorboard_writer(ctx.out) if ctx.is_main else None
    fc = FitConfig(epochs=t["epochs"], seed=cfg["seed"], device=ctx.device, amp=t["amp"], cpu_bf16=t["cpu_bf16"],
                   precision=t["precision"], grad_clip=t["grad_clip"], max_batches=t["max_batches"],
                   eval_every=t["eval_every"], rank=ctx.rank, world_size=ctx.world_size)
    try:
        state = fit(model, loader, val, opt, sched, step_loss, fc, ctx.checkpoints(),
                    payload=lambda m: model_payload(m, mcfg, meta), writer=writer)
    except NonFiniteLoss as exc:
        raise StageError(str(exc)) from exc
    finally:
        if writer is not None:
            writer.close()
    if not ctx.is_main:
        return StageResult()
    write_history(ctx.output("history"), history_rows(mcfg["T"], state.history))
    best, _ = load_model(ctx.output("best"))
    test = evaluate(best.to(ctx.device), eval_loader(cfg, bundle.test, cfg["data"]["limit_test"]), ctx.device,
                    desc="test")
    params = sum(p.numel() for p in best.parameters())
    last = state.history[-1] if state.history else {}
    ctx.log.info("test top-1 %.2f%% (top-5 %.2f%%) on %d images; %d parameters", test["top1"], test["top5"],
                 test["n"], params)
    dtype = amp_dtype(ctx.device, t["precision"], t["amp"], t["cpu_bf16"])
    return StageResult(metrics={
        "T": mcfg["T"], "test_top1": test["top1"], "test_top5": test["top5"], "test_n": test["n"],
        "best_val_top1": state.best_top1, "epochs": state.epoch, "resumed_from_epoch": state.resumed_from,
        "parameters": params, "images_per_s": last.get("images_per_s"), "history": state.history,
        "world_size": ctx.world_size, "global_batch": global_batch,
        "precision": str(dtype).replace("torch.", "") if dtype is not None else "fp32", "compile": bool(t["compile"]),
        "kernels": kernels,
    })
