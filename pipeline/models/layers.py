"""Time-merged layers: run a per-frame module once over ``T*B`` and split back to ``[T, B, ...]``.

One call per layer (not T calls) means one set of weights, one BN statistic and one quantiser
serve every step. Shapes are merged with ``flatten(0, 1)`` and split with
``unflatten(0, (T, -1))`` so no Python-int batch size is baked into a traced graph.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def merge_time(x: Tensor) -> Tensor:
    """``[T, B, ...] -> [T*B, ...]``."""
    return x.flatten(0, 1)


def split_time(y: Tensor, T: int) -> Tensor:
    """``[T*B, ...] -> [T, B, ...]`` (batch left symbolic)."""
    return y.unflatten(0, (T, -1))


class SeqModule(nn.Module):
    """Apply a per-frame module (pool, conv, ...) to ``[T, B, ...]`` by merging T into the batch."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return split_time(self.module(merge_time(x)), x.shape[0])


class SeqConvBN(nn.Module):
    """Conv2d (no bias) + BatchNorm2d over ``[T, B, C, H, W]``, merged over T*B.

    ``fold_bn()`` folds the BN into the conv (eval statistics) for the unrolled graph.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int | None = None) -> None:
        super().__init__()
        pad = kernel // 2 if padding is None else padding
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return split_time(self.bn(self.conv(merge_time(x))), x.shape[0])

    @torch.no_grad()
    def fold_bn(self) -> None:
        """Fold BN (running statistics) into the conv weights and bias; BN becomes Identity."""
        if not isinstance(self.bn, nn.BatchNorm2d):
            return
        self.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(self.conv.eval(), self.bn.eval())
        self.bn = nn.Identity()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every ``SeqConvBN`` in ``model`` (call in eval mode, after training). Returns ``model``."""
    for m in model.modules():
        if isinstance(m, SeqConvBN):
            m.fold_bn()
    return model
