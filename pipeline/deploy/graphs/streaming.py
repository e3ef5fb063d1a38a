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
- Causal SA (``model.staa.sa_mode: causal``): step t's gate reads pooled steps <= t only, so it
  streams. Its state is one input ``sa_in.<j>`` / output ``sa_out.<j>`` per SA block (forward
  order, names in ``sa_state_layers``), ``[B, C, T]``: the pooled per-step means seen so far,
  zeros after step t (zeros at t = 0). Each step writes this step's pooled mean into column t and
  runs SA's own two masked linear layers on the whole ``[B, C, T]`` tensor, then takes column t:
  the same ops on the same values as the unrolled graph (the zero columns meet zero weights), so
  the gates are the unrolled graph's bit for bit. Full SA (the paper's) pools all T steps before
  any step's neuron fires: such models cannot stream, and their streaming export is skipped
  with that reason recorded. TSRD is training-only and never in the graph.
- INT8: the step module is built from the same unrolled Q/DQ module as the unrolled INT8 graph
  and keeps its quantisers: module quantisers (the tests' reference Q/DQ model) are in the copy,
  and NNCF's hook quantisers run because each step calls the wrapped model's own ``forward`` and
  the step modules issue the quantised ops under the same names (``_StepNeuron`` returns its
  spikes through a one-step ``stack``, the op whose output NNCF quantises; ``_StepSA`` runs
  ``mean``, SA's masked weights and its gate in the unrolled order).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.models import PositionEncoding, StepAttention, neuron_modules, record_spikes
from pipeline.models.staa import STAA, gate_fn

STATE_IN, STATE_OUT = "u_in.", "u_out."
SA_IN, SA_OUT = "sa_in.", "sa_out."


def stream_blockers(model: nn.Module) -> list[str]:
    """Why ``model`` cannot run one step at a time (empty when it can): full (non-causal) step attention."""
    sa = [name for name, m in model.named_modules() if isinstance(m, STAA) and m.sa is not None and not m.sa.causal]
    if sa:
        return [f"step attention (SA) mixes all T steps in {len(sa)} STAA blocks (first: {sa[0]}); a step "
                f"cannot be computed before the clip ends. Train with model.staa.sa_mode: causal (or "
                f"model.staa.sa: false) to get a streamable model"]
    return []


def step_attention_modules(model: nn.Module) -> list[tuple[str, StepAttention]]:
    """``(name, module)`` of every step attention, in forward order (the ``sa_in.<j>`` order)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, StepAttention)]


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
        self.spikes: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:  # x: [1, B, C, H, W]
        assert self.u is not None, "StreamingNet sets the membrane before each call"
        s, self.u_next = self.lif.step(x[0], self.u)
        # a one-step stack, as the unrolled neuron returns its steps: an NNCF model quantises this op's output
        self.spikes = torch.stack([s])  # what the export's spike probe reads
        return self.spikes


class _StepSA(nn.Module):
    """Causal step attention for one step: pooled history ``[B, C, T]`` in (``hist``) and out (``hist_next``).

    Op for op the unrolled causal SA's (``mean``, the masked weights, both linears, the gate), on the history
    with this step's pooled mean written into column ``t``; the gate of column ``t`` multiplies ``x``.
    """

    def __init__(self, sa: StepAttention) -> None:
        super().__init__()
        if not sa.causal:
            raise ValueError("only causal step attention streams (model.staa.sa_mode: causal)")
        self.sa = sa
        self.T = sa.fc1.in_features
        self.register_buffer("columns", torch.eye(self.T, dtype=torch.bool))  # row t: True at column t
        self.t: Tensor | None = None
        self.hist: Tensor | None = None
        self.hist_next: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:  # [1, B, C, ...]
        assert self.t is not None and self.hist is not None, "StreamingNet sets the step and history before each call"
        pooled = x if x.dim() <= 3 else x.flatten(3).mean(-1)  # [1, B, C]
        column = self.columns.index_select(0, self.t)  # [1, T]
        hist = torch.where(column, pooled[0].unsqueeze(-1), self.hist)  # [B, C, T], zeros after t
        self.hist_next = hist
        z = self.sa.logits(hist).index_select(-1, self.t)  # [B, C, 1]: gate logit of step t
        g = gate_fn(z, self.sa.gate).permute(2, 0, 1)  # [1, B, C]
        for _ in range(x.dim() - 3):
            g = g.unsqueeze(-1)
        return x * g


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


class StreamingNet(nn.Module):
    """``forward(frame, step, *u) -> (logits_step, *u_next)`` built from an unrolled float model."""

    def __init__(self, unrolled: nn.Module, state_shapes: list[tuple[int, ...]],
                 sa_shapes: list[tuple[int, ...]] | None = None) -> None:
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
        self.sa_layers = [name for name, _ in step_attention_modules(net)]
        sa_shapes = [] if sa_shapes is None else [tuple(s) for s in sa_shapes]
        if len(sa_shapes) != len(self.sa_layers):
            raise ValueError(f"{len(sa_shapes)} step-attention state shapes for {len(self.sa_layers)} SA blocks")
        self.sa_shapes = sa_shapes
        for name in self.sa_layers:
            _replace(net, name, _StepSA(net.get_submodule(name)))
        net.T = 1  # each call is one step: a 4-D frame is "repeated" once
        self.net = net
        self._pes = [m for m in net.modules() if isinstance(m, _StepPE)]
        self._neurons = [net.get_submodule(n) for n in self.state_layers]
        self._sas = [net.get_submodule(n) for n in self.sa_layers]

    def forward(self, frame: Tensor, step: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        """``state``: the membranes (``u_in.<i>``), then the SA histories (``sa_in.<j>``); returned in that order."""
        n = len(self._neurons)
        if len(state) != n + len(self._sas):
            raise ValueError(f"{len(state)} state tensors for {n} neurons and {len(self._sas)} SA blocks")
        for pe in self._pes:
            pe.t = step
        for neuron, u in zip(self._neurons, state[:n]):
            neuron.u = u
        for sa, hist in zip(self._sas, state[n:]):
            sa.t, sa.hist = step, hist
        # the model's own forward (mean over one step = that step's logits, exactly): an NNCF-wrapped model
        # runs its quantiser hooks only there
        logits = self.net(frame)
        nxt = [m.u_next for m in self._neurons] + [m.hist_next for m in self._sas]
        for neuron in self._neurons:
            neuron.u = neuron.u_next = None
        for sa in self._sas:
            sa.t = sa.hist = sa.hist_next = None
        for pe in self._pes:
            pe.t = None
        return (logits, *nxt)

    @property
    def input_names(self) -> list[str]:
        return (["input", "step"] + [f"{STATE_IN}{i}" for i in range(len(self.state_layers))]
                + [f"{SA_IN}{j}" for j in range(len(self.sa_layers))])

    @property
    def output_names(self) -> list[str]:
        return (["logits_step"] + [f"{STATE_OUT}{i}" for i in range(len(self.state_layers))]
                + [f"{SA_OUT}{j}" for j in range(len(self.sa_layers))])

    def state_inputs(self) -> dict[str, list[int]]:
        """Every state input name -> its per-sample shape (what :class:`pipeline.runtime.StepRunner` takes)."""
        shapes = [*self.state_shapes, *self.sa_shapes]
        return {name: list(s) for name, s in zip(self.input_names[2:], shapes)}

    def zero_state(self, batch: int) -> list[Tensor]:
        return [torch.zeros(batch, *s) for s in (*self.state_shapes, *self.sa_shapes)]

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
                         "u_in.<i> membranes, sa_in.<j> step-attention histories [B,C,T] (all zeros at step 0); "
                         "outputs: logits_step, u_out.<i>, sa_out.<j> (feed back as u_in/sa_in); "
                         "clip logits = mean of logits_step over T",
            "state_layers": self.state_layers, "state_shapes": [list(s) for s in self.state_shapes],
            "sa_state_layers": self.sa_layers, "sa_state_shapes": [list(s) for s in self.sa_shapes],
        }


def state_shapes(unrolled: nn.Module, example: Tensor) -> list[tuple[int, ...]]:
    """Per-sample membrane shapes (``[C, H, W]``) of every neuron, from one probe forward pass."""
    with torch.no_grad(), record_spikes(unrolled) as store:
        unrolled(example[:1])
    return [tuple(store[name].shape[2:]) for name, _ in neuron_modules(unrolled)]


def sa_state_shapes(unrolled: nn.Module, example: Tensor) -> list[tuple[int, ...]]:
    """Per-sample history shapes (``[C, T]``) of every step attention, from one probe forward pass."""
    seen: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(
        name, (int(inp[0].shape[2]), int(mod.fc1.in_features)))) for name, m in step_attention_modules(unrolled)]
    try:
        with torch.no_grad():
            unrolled(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return [seen[name] for name, _ in step_attention_modules(unrolled)]


def build_streaming(unrolled: nn.Module, example: Tensor) -> StreamingNet:
    """The streaming wrapper of an unrolled model, float or Q/DQ (raises ValueError when it cannot stream)."""
    blockers = stream_blockers(unrolled)
    if blockers:
        raise ValueError(blockers[0])
    return StreamingNet(unrolled, state_shapes(unrolled, example), sa_state_shapes(unrolled, example)).eval()
