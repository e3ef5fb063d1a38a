"""TensorBoard scalars of every fitting stage (train, reduce_t, qat): one writer per stage folder.

Stdlib and torch only; ``fit`` adds one scalar per history key and epoch under the fit's tag.
"""
from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

TB_DIR = "tb"


def tensorboard_writer(stage_dir: Path) -> SummaryWriter:
    """The stage's TensorBoard writer (``<stage>/tb/``); several fits of a stage share the folder."""
    return SummaryWriter(str(Path(stage_dir) / TB_DIR))


def tb_tag(desc: str) -> str:
    """A TensorBoard tag prefix from a fit's description: ``"reduce_t T=2"`` -> ``"reduce_t_T2"``."""
    return desc.replace("=", "").replace(" ", "_")


__all__ = ["TB_DIR", "tb_tag", "tensorboard_writer"]
