"""Checkpoints that rebuild their own model: weights plus the exact model config and data facts.

Every stage after ``train`` loads models through :func:`load_model`, so a checkpoint is
self-describing (no guessing the architecture from the config that may have changed since)
and a wrong or damaged file fails with a message that names it and says how to fix it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

REQUIRED = ("model", "model_cfg", "data_meta")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or not one of this pipeline's."""


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save via a temporary file + rename: a kill mid-write never corrupts the last good file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; re-run the stage that writes it")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for damaged files
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); it is damaged or not a "
            f"torch file: delete it and re-run the stage that wrote it (or use --force)"
        ) from exc
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt]
        raise CheckpointError(
            f"{path} is not a pipeline checkpoint (missing {', '.join(missing)}); "
            f"pass a file written by the train, reduce_t or qat stage"
        )
    return ckpt


def model_payload(model: torch.nn.Module, model_cfg: dict[str, Any], data_meta: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What every model checkpoint carries; ``extra`` adds training state or metrics."""
    module = model.module if hasattr(model, "module") else model
    return {"model": module.state_dict(), "model_cfg": dict(model_cfg, T=module.T), "data_meta": data_meta, **extra}


def load_model(path: Path, T: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the float model stored at ``path``; returns (model in eval mode, checkpoint dict)."""
    from pipeline.models import build_model

    ckpt = read_checkpoint(path)
    cfg = dict(ckpt["model_cfg"])
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the stored model config ({exc}); "
                              f"the file was written by another version: re-run its stage") from exc
    if T is not None and T != model.T:
        model.set_time_steps(T)
    return model.eval(), ckpt
