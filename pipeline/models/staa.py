"""STAA: the spatial-temporal attention aggregator applied to a spiking layer's input current.

Parts (docs/architecture.md §4), each switchable by config:

- ``PositionEncoding`` (PE): learnable ``[T, 1, C, 1, 1]`` added to X, zero init.
- ``GlobalContext`` (GC): per (t, b), softmax over H*W of a 1x1 conv C->1 weights a sum of X
  into a ``[C, 1, 1]`` context; transform 1x1 C->C/r, LayerNorm, ReLU, 1x1 C/r->C; fusion
  ``X * 2 sigmoid(t)`` ("mul", see ``gate_fn``) or ``X + t`` ("add"). Weights are shared
  over T (T merged into B).
- ``StepAttention`` (SA): pool over H, W to ``[B, C, T]``; bottleneck over the T axis
  ``T -> T_h -> T`` with ReLU between and the gate after; multiply back. ``T_h`` is
  ``spec.sa_hidden`` (``step_attention_width``: T for T <= 4, ``max(T // r, 1)`` above).
  ``sa_position`` "before" gates X before the neuron, "after" gates the spikes after it.
  ``sa_mode`` "causal" (not the paper's): ``T -> T -> T`` with lower-triangular weights, so step t's gate
  reads steps <= t only and the model can stream one step at a time (see ``StepAttention``).
- TSRD: in training only, each (sample, step) with probability ``tsrd_p`` bypasses STAA and
  passes the raw ``X_t`` (and, with SA after, the raw spikes). Never active in eval.

``STAALIF`` = optional ``STAA`` (attribute ``staa``) + the neuron (attribute ``lif``).

Training kernels: when a gradient is wanted, GC pools through ``AttentionPool`` and runs its transform as
linear layers, and SA pools through ``SpatialMean`` (hand-written backward, same maths; tests/models/test_staa_fast.py).
Evaluation, tracing, export and quantisation see the eval ops (1x1 convs, softmax, matmul, mean), and
``set_hand_backward(model, False)`` keeps a quantiser-wrapped model on them in training too (and its neurons
on the per-step loop instead of the fused ``MultiStepLIF``). Measured on the
CPU (width 1/8, T=4, batch 16, one thread, ``bench/peer_spikingjelly.py``): the all-STAA step went from 1.69x
to 1.38x the plain-LIF step (docs/bench-runs/2026-12-01-cpu/train_step.txt).

Changing T (``set_time_steps``): PE is resampled along T (``resample_time``). SA's two
Linear layers act on the T axis; they are resampled too, not re-initialised: the hidden width
is kept, fc1's input columns and fc2's output rows / bias are resampled with the same mode,
and fc1 is rescaled by ``T_old / T_new`` (except "truncate") so that a time-constant input
keeps its hidden pre-activation (exact for "mean"). Causal SA keeps the leading ``[:T, :T]`` block of both
layers whatever the mode (its first T gates are then exactly the old ones) and its width follows T.

Choices made here (implementation details the paper does not fix):
- GC's attention conv has no bias (softmax ignores a constant shift; a bias would never learn).
- GC's hidden width is ``max(C // r, 2)``: LayerNorm over a single channel is constant.
- Gates start as the identity with a full gradient (``gate="identity"``, see ``gate_fn``): GC
  "mul" and SA multiply by ``2 * sigmoid(z)`` and the layer producing ``z`` (GC's last conv, SA's
  fc2) starts at zero, so ``z = 0``, the gate is exactly 1 and its slope 0.5; GC "add" adds the
  same zero-initialised ``z``. At initialisation an STAA-LIF computes what the plain LIF computes
  and the attention has to earn its effect. ``gate="legacy"`` is the earlier form (``sigmoid(z)``,
  bias 2), kept so that checkpoints written with it compute what they computed.
- SA's fc1 starts as a positive time average (weights U(0.5/T, 1.5/T), bias 0), so that its
  ReLU units are alive from the start (a random-sign init left a single unit dead, zero
  gradient for good, in layers whose input current is mostly positive).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import merge_time, split_time
from .neurons import BaseLIF, tracing
from .spec import STAASpec, step_attention_width

PE_MODES = ("truncate", "interpolate", "mean")
GATES = ("identity", "legacy")
# the "legacy" gate's starting bias: sigmoid(2) = 0.88, so that two half-open gates did not
# silence the net at init (its slope there is 0.10, which is why "identity" replaced it)
LEGACY_GATE_BIAS = 2.0


def gate_fn(z: Tensor, gate: str = "identity") -> Tensor:
    """The multiplicative gate of GC ("mul") and SA for logits ``z``.

    "identity": ``2 * sigmoid(z)``, in (0, 2), exactly 1 with slope 0.5 at ``z = 0``. Chosen over
    the equivalent ``1 + tanh(z)`` (= ``2 * sigmoid(2z)``) because it keeps the Sigmoid op that
    NNCF's ignored scopes, the ONNX graphs and TensorRT already handle; the extra Mul is per
    (step, sample, channel), negligible. "legacy": ``sigmoid(z)``.
    """
    return torch.sigmoid(z) if gate == "legacy" else 2.0 * torch.sigmoid(z)


def _check_gate(gate: str) -> None:
    if gate not in GATES:
        raise ValueError(f"unknown staa gate {gate!r}; valid: {', '.join(GATES)}")


def resample_time(w: Tensor, dim: int, T_new: int, mode: str) -> Tensor:
    """Resample tensor ``w`` along its time axis ``dim`` to length ``T_new``.

    - "truncate": keep the first ``T_new`` steps (cannot grow T: raises).
    - "interpolate": linear interpolation with the end points kept (align_corners=True):
      new step i samples old position ``i * (T_old - 1) / (T_new - 1)``; ``T_new = 1`` -> step 0.
    - "mean": every new step is the mean over the old steps.
    """
    T_old = w.shape[dim]
    if mode not in PE_MODES:
        raise ValueError(f"unknown pe_mode {mode!r}; valid: {', '.join(PE_MODES)}")
    if T_new < 1:
        raise ValueError(f"T must be >= 1, got {T_new}")
    if mode == "truncate":
        if T_new > T_old:
            raise ValueError(f"pe_mode 'truncate' cannot grow T ({T_old} -> {T_new}); use 'interpolate' or 'mean'")
        return w.narrow(dim, 0, T_new).clone()
    if mode == "mean":
        return w.mean(dim, keepdim=True).repeat_interleave(T_new, dim)
    steps = []
    for i in range(T_new):
        pos = i * (T_old - 1) / (T_new - 1) if T_new > 1 else 0.0
        lo = min(int(pos), T_old - 1)
        hi = min(lo + 1, T_old - 1)
        frac = pos - lo
        steps.append((1 - frac) * w.select(dim, lo) + frac * w.select(dim, hi))
    return torch.stack(steps, dim)


class PositionEncoding(nn.Module):
    """Learnable per-step, per-channel offset ``[T, 1, C, 1, 1]`` added to X."""

    def __init__(self, T: int, channels: int, init_std: float = 0.0) -> None:
        super().__init__()
        self.pe = nn.Parameter(torch.randn(T, 1, channels, 1, 1) * init_std)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pe

    def set_time_steps(self, T_new: int, mode: str) -> None:
        self.pe = nn.Parameter(resample_time(self.pe.detach(), 0, T_new, mode))


class AttentionPool(torch.autograd.Function):
    """GC's context in training: ``softmax_P(a . f) f``, ``f [N, C, P]``, ``a [C]`` -> ``[N, C]``, backward by hand.

    Why: the eval path (a 1x1 conv C->1, softmax, a batched matmul) is the graph NNCF and the exporters see,
    but on the CPU its training cost was most of GC's: the conv's backward and the ``[C, P] @ [P, 1]``
    matmul are small-matrix kernels (measured 5-6x a broadcast multiply and sum of the same size, one
    thread). Here the logits are ``a @ f`` (one ``[1, C] @ [C, P]`` product per sample), the weighted sum a
    broadcast product and sum; backward, with ``w = softmax(l)`` and ``g = dL/dctx``::

        dL/dw = g @ f,   dL/dl = w (dL/dw - <w, dL/dw>),   dL/df = g w^T + a dL/dl^T,   dL/da = sum f dL/dl

    Equal to autograd through the eval ops up to float summation order (tests/models/test_staa_fast.py).
    Mixed precision: the products run in ``f``'s dtype (fp16/bf16 under autocast, as the eval ops' conv and
    matmul do), the softmax and its backward in at least fp32; backward runs without autocast, so every
    operand is cast to ``f``'s dtype there explicitly.
    """

    @staticmethod
    def forward(ctx, f: Tensor, a: Tensor) -> Tensor:  # type: ignore[override]
        a = a.to(f.dtype)
        # an explicit batched [1, C] @ [C, P]: matmul(a, f) with a 1-D ``a`` copies f transposed first
        logits = torch.bmm(a.view(1, 1, -1).expand(f.shape[0], 1, -1), f).squeeze(1)  # [N, P]
        w = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        ctx.save_for_backward(f, a, w)
        return (f * w.to(f.dtype).unsqueeze(1)).sum(-1)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        f, a, w = ctx.saved_tensors
        g = g.to(f.dtype)
        gw = torch.bmm(g.unsqueeze(1), f).squeeze(1).to(w.dtype)  # [N, P]
        gl = (w * (gw - (w * gw).sum(-1, keepdim=True))).to(f.dtype)
        gf = torch.addcmul(g.unsqueeze(-1) * w.to(f.dtype).unsqueeze(1), a.view(1, -1, 1), gl.unsqueeze(1)) \
            if ctx.needs_input_grad[0] else None
        ga = (f * gl.unsqueeze(1)).sum((0, 2)) if ctx.needs_input_grad[1] else None
        return gf, ga


class SpatialMean(torch.autograd.Function):
    """Mean over the trailing spatial axes ``[T, B, C, *S]`` -> ``[T, B, C]`` whose gradient is a broadcast view.

    Why: autograd's mean backward writes ``grad / |S|`` out at full size and then adds it to the input's
    other gradient (SA multiplies the same input by its gate); an expanded (stride-0) gradient skips
    that write, the accumulation reads it in place. Same forward op as the eval path.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.shape = x.shape
        return x.flatten(3).mean(-1)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        shape = ctx.shape
        spatial = shape[3:].numel()
        return (g / spatial).view(*g.shape, *([1] * (len(shape) - 3))).expand(shape)


def hand_backward(module: nn.Module) -> bool:
    """Whether ``module`` runs its hand-written training kernels now: asked for (``module.hand_backward``), a
    gradient wanted, and no graph being traced or exported (those must see the eval ops)."""
    return getattr(module, "hand_backward", True) and torch.is_grad_enabled() and not tracing()


def set_hand_backward(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch the hand-written training kernels on or off in ``model``: the STAA parts' and the neurons' fused
    T loop (``MultiStepLIF``); returns ``model``.

    Off for a model a quantiser wraps (QAT): NNCF hooks the eval ops (the attention conv's weight, the
    matmul's output, the neuron's spike output) and its quantisers only learn through autograd, so QAT must
    train exactly those ops; with the fused neuron step on, a QAT step ran none of the spike quantisers.
    """
    for m in model.modules():
        if isinstance(m, (GlobalContext, StepAttention, BaseLIF)):
            m.hand_backward = bool(enabled)
    return model


class GlobalContext(nn.Module):
    """GCNet-style global-context block, weights shared over time."""

    def __init__(self, channels: int, ratio: int = 4, fusion: str = "mul", gate: str = "identity") -> None:
        super().__init__()
        if fusion not in ("mul", "add"):
            raise ValueError(f"unknown gc_fusion {fusion!r}; valid: mul, add")
        _check_gate(gate)
        hidden = max(channels // ratio, 2)
        self.fusion = fusion
        self.gate = gate
        self.hand_backward = True  # training kernels (AttentionPool, linear transform); see set_hand_backward
        self.attn = nn.Conv2d(channels, 1, 1, bias=False)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
        )
        last = self.transform[-1]
        if gate == "identity":  # z = 0: "mul" multiplies by exactly 1, "add" adds 0
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        elif fusion == "mul":
            nn.init.constant_(last.bias, LEGACY_GATE_BIAS)

    def forward(self, x: Tensor) -> Tensor:
        f = merge_time(x)  # [N, C, H, W]
        if hand_backward(self):
            t = self._transform_flat(AttentionPool.apply(f.flatten(2), self.attn.weight.view(-1)))
        else:
            w = self.attn(f).flatten(1).softmax(-1)  # [N, HW]
            t = self.transform(torch.matmul(f.flatten(2), w.unsqueeze(-1)).unsqueeze(-1))  # [N, C, 1, 1]
        t = split_time(t, x.shape[0])  # [T, B, C, 1, 1]
        return x * gate_fn(t, self.gate) if self.fusion == "mul" else x + t

    def _transform_flat(self, context: Tensor) -> Tensor:
        """``self.transform`` on ``[N, C]`` as linear layers with the convs' weights -> ``[N, C, 1, 1]``.

        Why: the same arithmetic as the 1x1 convs on ``[N, C, 1, 1]``, without a conv kernel's set-up per call
        (about 0.2 ms each on the CPU, three per GC block and step, for a few hundred multiply-adds)."""
        conv1, norm, _, conv2 = self.transform
        z = F.linear(context, conv1.weight.flatten(1), conv1.bias)
        z = F.layer_norm(z, z.shape[-1:], norm.weight.flatten(), norm.bias.flatten(), norm.eps)
        z = F.linear(torch.relu(z), conv2.weight.flatten(1), conv2.bias)
        return z[..., None, None]


SA_MODES = ("full", "causal")


def causal_mask(T: int) -> Tensor:
    """``[T, T]`` lower-triangular ones: entry ``(i, j)`` is 1 when output ``i`` may read input ``j <= i``."""
    return torch.ones(T, T).tril()


class StepAttention(nn.Module):
    """Gate each (step, channel) by a bottleneck MLP over the T axis of the pooled input.

    ``mode`` "full" (the paper's): ``T -> T_h -> T``, every gate reads every step. "causal": ``T -> T -> T`` with
    both weight matrices masked lower-triangular in ``forward`` (``weight * mask``), so hidden unit ``j`` reads
    pooled steps ``<= j`` and gate ``t`` reads hidden units ``<= t``: step t's gate depends on steps ``<= t`` only,
    whatever the weights (the mask is structural, not a property of training), and a step can be computed as soon
    as its frame arrives (the streaming graph keeps the pooled means seen so far, ``pipeline.deploy.graphs.streaming``).
    """

    def __init__(self, T: int, ratio: int = 4, hidden: int | None = None, gate: str = "identity",
                 mode: str = "full") -> None:
        super().__init__()
        _check_gate(gate)
        if mode not in SA_MODES:
            raise ValueError(f"unknown sa_mode {mode!r}; valid: {', '.join(SA_MODES)}")
        self.causal = mode == "causal"
        if self.causal:
            if hidden is not None and int(hidden) != T:
                raise ValueError(f"causal step attention has hidden width T={T}, got {hidden}")
            hidden = T
        hidden = step_attention_width(T, ratio) if hidden is None else int(hidden)
        if hidden < 1:
            raise ValueError(f"step attention needs a hidden width >= 1, got {hidden}")
        self.gate = gate
        self.hand_backward = True  # SpatialMean in training; see set_hand_backward
        self.fc1 = nn.Linear(T, hidden)
        self.fc2 = nn.Linear(hidden, T)
        # Hidden units start as positive time averages of the pooled current, zero bias: a
        # random-sign init left a single ReLU unit dead (zero gradient for good) in layers whose
        # input current is mostly positive (the residual sums carry spikes).
        nn.init.uniform_(self.fc1.weight, 0.5 / T, 1.5 / T)
        nn.init.zeros_(self.fc1.bias)
        if self.causal:
            # not persistent: the state dict is the full mode's, the mask follows from T
            self.register_buffer("mask", causal_mask(T), persistent=False)
            with torch.no_grad():  # hidden unit j: a positive average of the j + 1 steps it sees
                self.fc1.weight.copy_(self._causal_fc1_init(T))
        if gate == "identity":  # gate logits 0: every step passes unchanged at init
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)
        else:
            nn.init.constant_(self.fc2.bias, LEGACY_GATE_BIAS)

    @staticmethod
    def _causal_fc1_init(T: int) -> Tensor:
        seen = torch.arange(1, T + 1, dtype=torch.float32).unsqueeze(1)  # row j sees j + 1 steps
        return (torch.empty(T, T).uniform_(0.5, 1.5) / seen).tril()

    def weights(self) -> tuple[Tensor, Tensor]:
        """``(fc1, fc2)`` weights as applied: lower-triangular in causal mode."""
        if self.causal:
            return self.fc1.weight * self.mask, self.fc2.weight * self.mask
        return self.fc1.weight, self.fc2.weight

    def logits(self, pooled: Tensor) -> Tensor:
        """Gate logits ``[B, C, T]`` of pooled inputs ``[B, C, T]``."""
        if not self.causal:
            return self.fc2(torch.relu(self.fc1(pooled)))
        w1, w2 = self.weights()
        return F.linear(torch.relu(F.linear(pooled, w1, self.fc1.bias)), w2, self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() <= 3:
            pooled = x  # [T, B, C]
        else:
            pooled = SpatialMean.apply(x) if hand_backward(self) else x.flatten(3).mean(-1)
        g = gate_fn(self.logits(pooled.permute(1, 2, 0)), self.gate)  # [B, C, T]
        g = g.permute(2, 0, 1)  # [T, B, C]
        for _ in range(x.dim() - 3):
            g = g.unsqueeze(-1)
        return x * g

    @torch.no_grad()
    def set_time_steps(self, T_new: int, mode: str) -> None:
        if self.causal:
            self._carry_causal(T_new)
            return
        T_old = self.fc1.in_features
        hidden = self.fc1.out_features
        w1 = resample_time(self.fc1.weight, 1, T_new, mode)
        if mode != "truncate":
            w1 = w1 * (T_old / T_new)
        fc1, fc2 = nn.Linear(T_new, hidden), nn.Linear(hidden, T_new)
        fc1.weight.copy_(w1)
        fc1.bias.copy_(self.fc1.bias)
        fc2.weight.copy_(resample_time(self.fc2.weight, 0, T_new, mode))
        fc2.bias.copy_(resample_time(self.fc2.bias, 0, T_new, mode))
        dev, dt = self.fc1.weight.device, self.fc1.weight.dtype
        self.fc1, self.fc2 = fc1.to(dev, dt), fc2.to(dev, dt)

    def _carry_causal(self, T_new: int) -> None:
        """Causal SA at ``T_new`` steps: the leading ``[:T_new, :T_new]`` block (whatever ``pe_mode``).

        Why not resample: the gate of step t reads steps <= t only, so the first ``T_new`` steps' gates of the
        carried model are exactly the old model's (same inputs, same numbers); resampling would mix later
        steps' weights into earlier ones. Growing T keeps the old block and starts the new steps as at init
        (hidden units averaging what they see, gate logits at the start value).
        """
        T_old = self.fc1.in_features
        dev, dt = self.fc1.weight.device, self.fc1.weight.dtype
        fc1, fc2 = nn.Linear(T_new, T_new), nn.Linear(T_new, T_new)
        fc1.weight.copy_(self._causal_fc1_init(T_new))
        nn.init.zeros_(fc1.bias)
        nn.init.zeros_(fc2.weight)
        nn.init.constant_(fc2.bias, 0.0 if self.gate == "identity" else LEGACY_GATE_BIAS)
        n = min(T_old, T_new)
        for new, old in ((fc1, self.fc1), (fc2, self.fc2)):
            new.weight[:n, :n] = (old.weight * self.mask)[:n, :n]
            new.bias[:n] = old.bias[:n]
        self.fc1, self.fc2 = fc1.to(dev, dt), fc2.to(dev, dt)
        self.mask = causal_mask(T_new).to(dev)

    def extra_repr(self) -> str:
        return "causal" if self.causal else "full"


class STAA(nn.Module):
    """PE -> GC -> SA (before) on the input current; SA (after) on the spikes; TSRD in training."""

    def __init__(self, spec: STAASpec, channels: int, T: int) -> None:
        super().__init__()
        self.pe = PositionEncoding(T, channels) if spec.pe else None
        self.gc = GlobalContext(channels, spec.gc_ratio, spec.gc_fusion, spec.gate) if spec.gc else None
        self.sa = StepAttention(T, spec.sa_ratio, spec.sa_hidden, spec.gate, spec.sa_mode) if spec.sa else None
        if spec.sa_position not in ("before", "after"):
            raise ValueError(f"unknown sa_position {spec.sa_position!r}; valid: before, after")
        self.sa_after = spec.sa_position == "after"
        self.tsrd_p = spec.tsrd_p if spec.tsrd else 0.0

    def pre(self, x: Tensor) -> Tensor:
        """The parts that act on the input current before the neuron."""
        if self.pe is not None:
            x = self.pe(x)
        if self.gc is not None:
            x = self.gc(x)
        if self.sa is not None and not self.sa_after:
            x = self.sa(x)
        return x

    def post(self, s: Tensor) -> Tensor:
        """SA on the spikes when ``sa_position == "after"``; identity otherwise."""
        return self.sa(s) if self.sa is not None and self.sa_after else s

    def tsrd_mask(self, x: Tensor) -> Tensor | None:
        """``[T, B, 1, ...]`` bool, True where a step bypasses STAA; None in eval or when off."""
        if not self.training or self.tsrd_p <= 0:
            return None
        shape = tuple(x.shape[:2]) + (1,) * (x.dim() - 2)
        return torch.rand(shape, device=x.device) < self.tsrd_p

    def set_time_steps(self, T_new: int, mode: str) -> None:
        for part in (self.pe, self.sa):
            if part is not None:
                part.set_time_steps(T_new, mode)

    def extra_repr(self) -> str:
        return f"sa_after={self.sa_after}, tsrd_p={self.tsrd_p}"


class STAALIF(nn.Module):
    """A spiking unit: optional STAA on the input current, then the neuron (``lif``)."""

    def __init__(self, lif: BaseLIF, staa: STAA | None = None) -> None:
        super().__init__()
        self.staa = staa
        self.lif = lif

    def forward(self, x: Tensor) -> Tensor:
        if self.staa is None:
            return self.lif(x)
        mask = self.staa.tsrd_mask(x)
        y = self.staa.pre(x)
        if mask is not None:
            y = torch.where(mask, x, y)
        s = self.lif(y)
        z = self.staa.post(s)
        if mask is not None and self.staa.sa_after:
            z = torch.where(mask, s, z)
        return z


def staa_on_stage(spec: STAASpec, stage: int, num_stages: int) -> bool:
    """Whether stage ``stage`` (0 = stem, ``num_stages - 1`` = last) gets STAA under ``spec``."""
    if not spec.any_block:
        return False
    if spec.placement == "all":
        return True
    if spec.placement == "last_k":
        return stage >= num_stages - spec.last_k
    raise ValueError(f"unknown placement {spec.placement!r}; valid: all, last_k")


def set_tsrd_p(model: nn.Module, p: float) -> nn.Module:
    """Set the TSRD probability of every STAA block (e.g. 0 to fine-tune without it)."""
    for m in model.modules():
        if isinstance(m, STAA):
            m.tsrd_p = float(p)
    return model
