"""Checkpoints that rebuild their own model: weights plus the exact model config and data facts.

Every stage after ``train`` loads models through :func:`load_model`, so a checkpoint is
self-describing (no guessing the architecture from the config that may have changed since)
and a wrong or damaged file fails with a message that names it and says how to fix it.

Safety: a checkpoint may come from elsewhere (a shared artifacts folder, a download), and a
pickle can run code when it is opened. So every file is read with ``torch.load(weights_only=True)``
(tensors and plain data only) and :func:`save_atomic` writes only such data: numpy scalars,
paths, enums and dataclasses are converted when saved, anything else is refused at save time.
"""
from __future__ import annotations

import dataclasses
import enum
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.models import build_model
from pipeline.models.spec import checkpoint_model_cfg, stored_model_cfg

REQUIRED = ("model", "model_cfg", "data_meta")
# what torch.load(weights_only=True) rebuilds without any allow-list (besides tensors and containers)
_ATOMS = (str, int, float, bool, complex, bytes, type(None), torch.dtype, torch.device, torch.Size)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, unsafe to open or not one of this pipeline's."""


def safe_payload(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` with every value ``torch.load(weights_only=True)`` cannot rebuild made plain.

    numpy scalars/arrays -> Python numbers/tensors, paths -> str, enums -> their value,
    dataclasses -> dicts; tensors, containers and plain values pass through unchanged (a
    state dict keeps its ``_metadata``). Anything else raises, naming where it sits.
    """
    if isinstance(obj, torch.Tensor) or type(obj) in _ATOMS:  # exact types: np.float64 is a float, an enum an int
        return obj
    if isinstance(obj, dict):
        out = (OrderedDict if isinstance(obj, OrderedDict) else dict)(
            (safe_payload(k, f"{where} key"), safe_payload(v, f"{where}[{k!r}]")) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # type: ignore[attr-defined]  # load_state_dict reads module versions
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [safe_payload(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else set(items) if isinstance(obj, (set, frozenset)) else tuple(items)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, enum.Enum):
        return safe_payload(obj.value, where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: safe_payload(getattr(obj, f.name), f"{where}.{f.name}") for f in dataclasses.fields(obj)}
    raise CheckpointError(f"{where} holds a {type(obj).__module__}.{type(obj).__qualname__}, which a checkpoint "
                          f"read with torch.load(weights_only=True) cannot hold; store its state "
                          f"(tensors, numbers, strings, lists, dicts) instead")


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save via a temporary file + rename: a kill mid-write never corrupts the last good file.

    The payload is made plain first (:func:`safe_payload`), so every file loads with weights_only=True.
    """
    path = Path(path)
    obj = safe_payload(obj, path.name)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a kill leaves no half file behind
        raise


def _refused_global(exc: BaseException) -> str | None:
    """What torch's weights-only unpickler refused (``GLOBAL os.system``), or None for other errors."""
    if not isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" not in str(exc):
        return None
    found = re.search(r"Unsupported global: (GLOBAL \S+)|WeightsUnpickler error: ([^\n]+)", str(exc))
    return (found.group(1) or found.group(2)) if found else "a Python object"


def load_plain(path: Path, error: type[Exception] = CheckpointError,
               fix: str = "delete it and re-run the stage that wrote it (or use --force)") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; every failure becomes ``error`` naming the file and ``fix``.

    A file that holds pickled code or arbitrary objects is refused before anything in it runs.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        refused = _refused_global(exc)
        if refused is not None:
            raise error(
                f"{path} was refused: it holds pickled Python objects ({refused}), not only tensors and plain "
                f"data, and opening it could run arbitrary code. This pipeline loads checkpoints with "
                f"torch.load(weights_only=True) only. If you trust the file's origin and it came from an older "
                f"version of this pipeline, {fix}; otherwise do not use it"
            ) from exc
        raise error(f"{path} cannot be read ({type(exc).__name__}: {exc}); it is damaged or not a torch "
                    f"file: {fix}") from exc


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A pipeline checkpoint's dict, loaded without running any code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; re-run the stage that writes it")
    ckpt = load_plain(path)
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
    spec = getattr(module, "spec", None)  # T and SA width as built/carried, so load_model rebuilds it
    cfg = stored_model_cfg(model_cfg, spec) if spec is not None else dict(model_cfg, T=module.T)
    return {"model": module.state_dict(), "model_cfg": cfg, "data_meta": data_meta, **extra}


def load_model(path: Path, T: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the float model stored at ``path``; returns (model in eval mode, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    cfg = checkpoint_model_cfg(ckpt["model_cfg"])  # fills keys older checkpoints lack
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the stored model config ({exc}); "
                              f"the file was written by another version: re-run its stage") from exc
    if T is not None and T != model.T:
        model.set_time_steps(T)
    return model.eval(), ckpt
