"""Glue the stages share: datasets, loaders and model configs built from one run config."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch.utils.data import DataLoader, DistributedSampler

from pipeline.data import DataBundle, build_datasets, make_loader

if TYPE_CHECKING:
    from pipeline.runner import StageContext


def data_bundle(cfg: Mapping[str, Any], T: int | None = None) -> DataBundle:
    """The run's datasets; ``T`` (frames per event sample) defaults to model.T."""
    return build_datasets(cfg["data"], T or cfg["model"]["T"], seed=cfg["seed"])


def model_config(cfg: Mapping[str, Any], bundle: DataBundle) -> dict[str, Any]:
    """The model section plus what only the dataset knows (classes, input channels)."""
    return dict(cfg["model"], num_classes=bundle.num_classes, in_channels=bundle.in_channels)


def data_meta(bundle: DataBundle) -> dict[str, Any]:
    """Facts a deployed model needs to be fed correctly; stored in checkpoints and ONNX metadata."""
    return {
        "dataset": bundle.name, "num_classes": bundle.num_classes, "in_channels": bundle.in_channels,
        "image_size": list(bundle.image_size), "mean": list(bundle.mean), "std": list(bundle.std),
        "is_event": bundle.is_event, "class_names": list(bundle.class_names),
    }


def train_loader(cfg: Mapping[str, Any], bundle: DataBundle, rank: int = 0, world_size: int = 1) -> DataLoader:
    d = cfg["data"]
    if world_size > 1:
        sampler = DistributedSampler(bundle.train, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=cfg["seed"], drop_last=True)
        return make_loader(bundle.train, d["batch_size"], train=True, workers=d["workers"], seed=cfg["seed"],
                           sampler=sampler, prefetch=d.get("prefetch"))
    return make_loader(bundle.train, d["batch_size"], train=True, workers=d["workers"], seed=cfg["seed"],
                       prefetch=d.get("prefetch"))


def eval_loader(cfg: Mapping[str, Any], dataset: torch.utils.data.Dataset, limit: int | None = None) -> DataLoader:
    if limit is not None and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(limit))
    d = cfg["data"]
    return make_loader(dataset, d["eval_batch_size"], train=False, workers=d["workers"], seed=cfg["seed"],
                       prefetch=d.get("prefetch"))


def load_upstream_model(ctx: "StageContext", stage: str, file: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The common start of a fine-tuning stage: fix threads and seed, then load ``<stage>/<file>``
    onto the stage's device; a damaged or foreign checkpoint becomes a StageError that names it."""
    from pipeline.checkpoint import CheckpointError, load_model
    from pipeline.runner import StageError
    from pipeline.training.loop import seed_everything

    if ctx.cfg["train"]["threads"]:
        torch.set_num_threads(ctx.cfg["train"]["threads"])
    seed_everything(ctx.cfg["seed"])
    try:
        model, ckpt = load_model(ctx.inputs[stage] / file)
    except CheckpointError as exc:
        raise StageError(str(exc)) from exc
    return model.to(ctx.device), ckpt
