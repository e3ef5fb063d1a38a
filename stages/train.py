"""train: the float STAA-SNN at model.T time steps (best/last checkpoints, TensorBoard, test accuracy)."""
from __future__ import annotations

import torch

from pipeline.checkpoint import model_payload
from pipeline.models import build_model
from pipeline.runner import StageContext, StageError, StageResult
from pipeline.setup import data_bundle, data_meta, eval_loader, model_config, train_loader
from pipeline.training.evaluate import evaluate
from pipeline.training.loop import FitConfig, NonFiniteLoss, fit, seed_everything, total_steps
from pipeline.training.losses import classification_loss
from pipeline.training.optim import build_optimizer, warmup_cosine


def run(ctx: StageContext) -> StageResult:
    cfg, t = ctx.cfg, ctx.cfg["train"]
    if t["threads"]:
        torch.set_num_threads(t["threads"])
    seed_everything(cfg["seed"])
    bundle = data_bundle(cfg)
    mcfg = model_config(cfg, bundle)
    model = build_model(mcfg).to(ctx.device)
    if ctx.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    loader = train_loader(cfg, bundle, ctx.rank, ctx.world_size)
    val = eval_loader(cfg, bundle.val) if len(bundle.val) else None
    opt = build_optimizer(model.parameters(), t)
    steps = total_steps(loader, t["epochs"], t["max_batches"])
    sched = warmup_cosine(opt, steps, t["warmup_epochs"] * (steps // max(t["epochs"], 1)))
    meta = data_meta(bundle)

    def step_loss(m, x, y):
        return classification_loss(m, x, y, t["loss"], t["label_smoothing"])

    writer = None
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(ctx.out / "tb"))
    fc = FitConfig(epochs=t["epochs"], seed=cfg["seed"], device=ctx.device, amp=t["amp"], cpu_bf16=t["cpu_bf16"],
                   grad_clip=t["grad_clip"], max_batches=t["max_batches"], eval_every=t["eval_every"],
                   rank=ctx.rank, world_size=ctx.world_size)
    try:
        state = fit(model, loader, val, opt, sched, step_loss, fc, ctx.out,
                    payload=lambda m: model_payload(m, mcfg, meta), writer=writer)
    except NonFiniteLoss as exc:
        raise StageError(str(exc)) from exc
    finally:
        if writer is not None:
            writer.close()
    if not ctx.is_main:
        return StageResult()
    from pipeline.checkpoint import load_model

    best, _ = load_model(ctx.out / "best.pt")
    test = evaluate(best.to(ctx.device), eval_loader(cfg, bundle.test, cfg["data"]["limit_test"]), ctx.device,
                    desc="test")
    params = sum(p.numel() for p in best.parameters())
    last = state.history[-1] if state.history else {}
    ctx.log.info("test top-1 %.2f%% (top-5 %.2f%%) on %d images; %d parameters", test["top1"], test["top5"],
                 test["n"], params)
    return StageResult(metrics={
        "T": mcfg["T"], "test_top1": test["top1"], "test_top5": test["top5"], "test_n": test["n"],
        "best_val_top1": state.best_top1, "epochs": state.epoch, "resumed_from_epoch": state.resumed_from,
        "parameters": params, "images_per_s": last.get("images_per_s"), "history": state.history,
    })
