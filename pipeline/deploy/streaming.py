"""The streaming graph: one time step, membrane state in and out, for event streams on a device.

Choices (documented in the export metrics and the ONNX metadata):

- Per-step constants: the graph holds the whole position-encoding table ``[T, 1, C, 1, 1]`` and
  takes the step index as an input (``step``, int64 ``[1]``, 0..T-1); it gathers row ``t``. One
  graph serves every step, and the device only counts steps.
- State: one input ``u_in.<i>`` and output ``u_out.<i>`` per neuron (in forward order, names
  in the ``state_layers`` metadata), shape ``[B, C, H, W]``; zeros at ``t = 0`` (``U_0 = 0``,
  identical to the unrolled graph's first step: ``M * 0 + N * I == N * I``).
- Output: ``logits_step`` ``[B, K]``, the classifier on this step's pooled spikes; the clip's
  logits are the mean over the T steps (what the unrolled graph returns).
- SA (step attention) pools the input over all T steps before any step's neuron fires, so a
  step cannot be computed before the clip has ended: models with SA cannot stream. Their
  streaming export is skipped with that reason recorded (use ``model.staa.sa: false`` for a
  streamable model). TSRD is training-only and never in the graph.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.models import PositionEncoding, neuron_modules, record_spikes
from pipeline.models.staa import STAA

STATE_IN, STATE_OUT = "u_in.", "u_out."


def stream_blockers(model: nn.Module) -> list[str]:
    """Why ``model`` cannot run one step at a time (empty when it can)."""
    sa = [name for name, m in model.named_modules() if isinstance(m, STAA) and m.sa is not None]
    if sa:
        return [f"step attention (SA) mixes all T steps in {len(sa)} STAA blocks (first: {sa[0]}); a step "
                f"cannot be computed before the clip ends. Train with model.staa.sa: false to get a "
                f"streamable model"]
    return []


class _StepPE(nn.Module):
    """Position encoding for one step: ``x + pe[t]`` with ``t`` set by :class:`StreamingNet`."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table.detach().clone())  # [T, 1, C, 1, 1]
        self.t: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        assert self.t is not None, "StreamingNet sets the step index before each call"
        return x + self.table.index_select(0, self.t)


class _StepNeuron(nn.Module):
    """A neuron run for one step with explicit membrane in/out (``u`` set and read by the wrapper)."""

    def __init__(self, lif: nn.Module) -> None:
        super().__init__()
        self.lif = lif
        self.u: Tensor | None = None
        self.u_next: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:  # x: [1, B, C, H, W]
        assert self.u is not None, "StreamingNet sets the membrane before each call"
        s, self.u_next = self.lif.step(x[0], self.u)
        return s.unsqueeze(0)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


class StreamingNet(nn.Module):
    """``forward(frame, step, *u) -> (logits_step, *u_next)`` built from an unrolled float model."""

    def __init__(self, unrolled: nn.Module, state_shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        blockers = stream_blockers(unrolled)
        if blockers:
            raise ValueError(blockers[0])
        net = copy.deepcopy(unrolled).eval()
        self.T = int(net.T)
        self.state_layers = [name for name, _ in neuron_modules(net)]
        if len(state_shapes) != len(self.state_layers):
            raise ValueError(f"{len(state_shapes)} state shapes for {len(self.state_layers)} neurons")
        self.state_shapes = [tuple(s) for s in state_shapes]
        for name, m in list(net.named_modules()):
            if isinstance(m, PositionEncoding):
                _replace(net, name, _StepPE(m.pe))
        for name in self.state_layers:
            _replace(net, name, _StepNeuron(net.get_submodule(name)))
        net.T = 1  # each call is one step: a 4-D frame is "repeated" once
        self.net = net
        self._pes = [m for m in net.modules() if isinstance(m, _StepPE)]
        self._neurons = [net.get_submodule(n) for n in self.state_layers]

    def forward(self, frame: Tensor, step: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        for pe in self._pes:
            pe.t = step
        for neuron, u in zip(self._neurons, state):
            neuron.u = u
        logits = self.net.forward_steps(frame)[0]
        nxt = [n.u_next for n in self._neurons]
        for neuron in self._neurons:
            neuron.u = neuron.u_next = None
        for pe in self._pes:
            pe.t = None
        return (logits, *nxt)

    @property
    def input_names(self) -> list[str]:
        return ["input", "step"] + [f"{STATE_IN}{i}" for i in range(len(self.state_layers))]

    @property
    def output_names(self) -> list[str]:
        return ["logits_step"] + [f"{STATE_OUT}{i}" for i in range(len(self.state_layers))]

    def zero_state(self, batch: int) -> list[Tensor]:
        return [torch.zeros(batch, *s) for s in self.state_shapes]

    def example_inputs(self, frame: Tensor) -> tuple[Tensor, ...]:
        return (frame, torch.zeros(1, dtype=torch.long), *self.zero_state(frame.shape[0]))

    @torch.no_grad()
    def run_clip(self, x: Tensor) -> Tensor:
        """Mean logits over T steps for static ``[B, C, H, W]`` or events ``[B, T, C, H, W]`` (torch reference)."""
        state = self.zero_state(x.shape[0])
        total = None
        for t in range(self.T):
            frame = x[:, t] if x.dim() == 5 else x
            logits, *state = self(frame, torch.tensor([t]), *state)
            total = logits if total is None else total + logits
        assert total is not None
        return total / self.T

    def metadata(self) -> dict[str, Any]:
        return {
            "streaming": "one time step per call; inputs: input [B,C,H,W] frame, step int64 [1] (0..T-1), "
                         "u_in.<i> membranes (zeros at step 0); outputs: logits_step, u_out.<i>; "
                         "clip logits = mean of logits_step over T",
            "state_layers": self.state_layers, "state_shapes": [list(s) for s in self.state_shapes],
        }


def state_shapes(unrolled: nn.Module, example: Tensor) -> list[tuple[int, ...]]:
    """Per-sample membrane shapes (``[C, H, W]``) of every neuron, from one probe forward pass."""
    with torch.no_grad(), record_spikes(unrolled) as store:
        unrolled(example[:1])
    return [tuple(store[name].shape[2:]) for name, _ in neuron_modules(unrolled)]


def build_streaming(unrolled: nn.Module, example: Tensor) -> StreamingNet:
    """The streaming wrapper of an unrolled float model (raises ValueError when it cannot stream)."""
    return StreamingNet(unrolled, state_shapes(unrolled, example)).eval()
