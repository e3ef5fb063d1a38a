"""The multi-step LIF over all T as two Triton kernels: one forward and one backward launch per layer.

Same maths as the definition in ``neurons`` (charge, fire, reset; ``MultiStepLIF``'s docstring has the
backward recursion), same float operations, so the spikes are bit-identical to the torch path:

- forward, per element: ``h_1 = x_1 * N``; ``h_t = x_t * N + U_{t-1} * M`` with ``U = h * (1 - S)`` (hard
  reset) or ``U = h - S * v_th`` (soft, ``SOFT``: ``S * v_th`` is exactly 0 or v_th), each
  product and the sum rounded on its own (the kernels are compiled with ``enable_fp_fusion=False``:
  Triton would otherwise contract ``a * b + c`` into one FMA, which rounds once and moves spikes);
  ``S_t = h_t >= v_th``. Inputs are read in their dtype (fp32, bf16, fp16) and computed in fp32, as the
  torch path's ``x.float()``; spikes are written in the input dtype (0 and 1 are exact in each).
- backward, one pass from t = T-1 down to 0 with dL/dH_{t+1} in registers: the surrogate, the reset
  path, ``dL/dI = N dL/dH`` (fp32; cast to the input dtype by torch, as autograd casts the torch path's
  ``x.float()``), and for ALIF's per-channel M and N the sums ``dL/dH_t U_{t-1}`` and ``dL/dH_t I_t``:
  each program writes its tile's per-row partial sums, which one small torch sum reduces to ``[C]``
  (deterministic, unlike atomics). The surrogates use other float formulas than torch's in places
  (tanh from ``exp``), so gradients agree within float rounding, not bit for bit.

Memory: the forward saves the fp32 membranes ``h`` (as the torch path) and, for ALIF's gain gradient,
the input in its own dtype (the torch path saves its fp32 copy).

Tiles: the ``[T, B, C, *spatial]`` input is ``T`` steps of ``R = B*C`` rows by ``S`` spatial columns; a
program owns ``BLOCK_R x BLOCK_S`` elements (about 1024) of every step, so a row is one channel and the
per-channel coefficients and sums are per row. Importing this module defines the kernels: set
``TRITON_INTERPRET=1`` before it to run them on the CPU (tests).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

SURROGATE_IDS = {"rect": 0, "tanh": 1, "atan": 2}
TILE = 1024  # elements per program and step
# every launch: no FMA contraction, so each product and sum rounds on its own as in torch's separate ops
# (tests/models/test_triton_kernels.py compiles the kernels to PTX and checks every fp32 mul/add is ``.rn``)
LAUNCH = {"num_warps": 4, "enable_fp_fusion": False}


@triton.jit
def _surrogate(xm, p0, p1, SURROGATE: tl.constexpr):
    """dS/dh at ``xm = h - v_th``. rect: p0 = width/2, p1 = 1/width. tanh: p0 = k, p1 = k/2.
    atan: p0 = (pi/2 k)^2, p1 = k/2."""
    if SURROGATE == 0:
        sg = tl.where(tl.abs(xm) < p0, 1.0, 0.0) * p1
    elif SURROGATE == 1:
        e = tl.exp(-2.0 * tl.abs(p0 * xm))  # tanh(|y|) = (1 - e) / (1 + e), no overflow
        th = (1.0 - e) / (1.0 + e)
        sg = p1 * (1.0 - th * th)
    else:
        sg = (1.0 / (1.0 + p0 * xm * xm)) * p1
    return sg


@triton.jit
def _reset(h, v_th, SOFT: tl.constexpr):
    """``U_t`` from ``h_t``: hard ``h (1 - S)`` (``neurons._hard``), soft ``h - S v_th`` (``neurons._soft``)."""
    if SOFT:
        u = h - tl.where(h >= v_th, 1.0, 0.0) * v_th
    else:
        u = h * tl.where(h < v_th, 1.0, 0.0)
    return u


@triton.jit
def _reset_grad(h, sg, v_th, SOFT: tl.constexpr):
    """``dU_t/dH_t`` through the surrogate: hard ``(1 - S) - h sg``, soft ``1 - sg v_th`` (``Reset.grad``)."""
    if SOFT:
        b = 1.0 - sg * v_th
    else:
        b = tl.where(h < v_th, 1.0, 0.0) - h * sg
    return b


@triton.jit
def _lif_fwd(x_ptr, s_ptr, h_ptr, m_ptr, n_ptr, m_val, n_val, v_th, R, S, C, N,
             T: tl.constexpr, PER_CHANNEL: tl.constexpr, SOFT: tl.constexpr, BLOCK_R: tl.constexpr,
             BLOCK_S: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (rows < R)[:, None] & (cols < S)[None, :]
    offs = rows[:, None] * S + cols[None, :]
    if PER_CHANNEL:
        ch = rows % C
        m = tl.load(m_ptr + ch, mask=rows < R, other=0.0)[:, None]
        n = tl.load(n_ptr + ch, mask=rows < R, other=0.0)[:, None]
    else:
        m = m_val
        n = n_val
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = x * n
    tl.store(h_ptr + offs, h, mask=mask)
    tl.store(s_ptr + offs, tl.where(h >= v_th, 1.0, 0.0).to(s_ptr.dtype.element_ty), mask=mask)
    for _ in tl.static_range(T - 1):
        x_ptr += N
        h_ptr += N
        s_ptr += N
        u = _reset(h, v_th, SOFT)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = x * n + u * m
        tl.store(h_ptr + offs, h, mask=mask)
        tl.store(s_ptr + offs, tl.where(h >= v_th, 1.0, 0.0).to(s_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lif_bwd(gs_ptr, h_ptr, x_ptr, m_ptr, n_ptr, m_val, n_val, gx_ptr, part_ptr, v_th, p0, p1, R, S, C, N,
             T: tl.constexpr, SURROGATE: tl.constexpr, PER_CHANNEL: tl.constexpr, SOFT: tl.constexpr,
             NEED_GX: tl.constexpr,
             NEED_GM: tl.constexpr, NEED_GN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_ok = rows < R
    mask = row_ok[:, None] & (cols < S)[None, :]
    offs = rows[:, None] * S + cols[None, :]
    if PER_CHANNEL:
        ch = rows % C
        m = tl.load(m_ptr + ch, mask=row_ok, other=0.0)[:, None]
        n = tl.load(n_ptr + ch, mask=row_ok, other=0.0)[:, None]
    else:
        m = m_val
        n = n_val
    for _ in tl.static_range(T - 1):  # to step T-1 (pointer steps: no 32-bit overflow of (T-1) * N)
        gs_ptr += N
        h_ptr += N
        x_ptr += N
        gx_ptr += N
    acc_m = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
    acc_n = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
    g_next = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0)
    for i in tl.static_range(T):
        gs = tl.load(gs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sg = _surrogate(h - v_th, p0, p1, SURROGATE)
        gh = gs * sg  # a_t
        if i > 0:  # dL/dH_t = a_t + M dL/dH_{t+1} b_t, b_t = dU_t/dH_t
            gh = gh + (g_next * m) * _reset_grad(h, sg, v_th, SOFT)
        if NEED_GX:
            tl.store(gx_ptr + offs, gh * n, mask=mask)
        if NEED_GN:
            acc_n += gh * tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if i < T - 1:
            gs_ptr -= N
            h_ptr -= N
            x_ptr -= N
            gx_ptr -= N
            h = tl.load(h_ptr + offs, mask=mask, other=0.0)  # h_{t-1}
            if NEED_GM:
                acc_m += gh * _reset(h, v_th, SOFT)  # dL/dH_t U_{t-1}
        g_next = gh
    nsb = tl.num_programs(1)
    part = rows * nsb + tl.program_id(1)
    if NEED_GM:
        tl.store(part_ptr + part, tl.sum(acc_m, axis=1), mask=row_ok)
    if NEED_GN:
        tl.store(part_ptr + R * nsb + part, tl.sum(acc_n, axis=1), mask=row_ok)


def _layout(x: Tensor, per_channel: bool) -> tuple[int, int, int]:
    """``(R, S, C)``: rows (B*C), spatial columns, channels of a ``[T, B, C, *spatial]`` tensor."""
    if x.dim() >= 3:
        return x.shape[1] * x.shape[2], math.prod(x.shape[3:]), x.shape[2]
    if per_channel:
        raise ValueError(f"a per-channel neuron needs [T, B, C, ...] input, got shape {tuple(x.shape)}")
    return (x[0].numel() if x.dim() > 1 else 1), 1, 1


def _tiles(R: int, S: int) -> tuple[int, int, tuple[int, int]]:
    block_s = min(triton.next_power_of_2(S), TILE)
    block_r = max(TILE // block_s, 1)
    return block_r, block_s, (triton.cdiv(R, block_r), triton.cdiv(S, block_s))


def _surrogate_params(surrogate: str, param: float) -> tuple[float, float]:
    if surrogate == "rect":
        return param / 2, 1.0 / param
    if surrogate == "tanh":
        return param, param / 2
    if surrogate == "atan":
        return (math.pi / 2 * param) ** 2, param / 2
    raise ValueError(f"unknown surrogate {surrogate!r}; valid: {', '.join(SURROGATE_IDS)}")


def _coeff_args(value: Tensor | float, like: Tensor) -> tuple[Tensor, float]:
    """(pointer argument, scalar argument) of a coefficient: a per-channel fp32 tensor, or a float."""
    if isinstance(value, Tensor):
        return value.detach().float().contiguous(), 0.0
    return like, float(value)  # the pointer is never read (PER_CHANNEL is off)


class TritonMultiStepLIF(torch.autograd.Function):
    """``neurons.MultiStepLIF`` on Triton: ``[T, B, C, ...]`` input current (any float dtype) -> spikes in
    its dtype. ``decay``/``gain``: floats (LIF) or per-channel ``[C]`` tensors (ALIF), both or neither."""

    @staticmethod
    def forward(ctx, x: Tensor, decay: Tensor | float, gain: Tensor | float, v_th: float,  # type: ignore[override]
                surrogate: str, param: float, reset: str = "hard") -> Tensor:
        soft = _soft(reset)
        per_channel = isinstance(decay, Tensor)
        if per_channel != isinstance(gain, Tensor):
            raise ValueError("decay and gain must both be tensors (ALIF) or both floats (LIF)")
        x = x.contiguous()
        T = x.shape[0]
        R, S, C = _layout(x, per_channel)
        h = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        s = torch.empty_like(x)
        m_ptr, m_val = _coeff_args(decay, h)
        n_ptr, n_val = _coeff_args(gain, h)
        block_r, block_s, grid = _tiles(R, S)
        if x.numel():
            _lif_fwd[grid](x, s, h, m_ptr, n_ptr, m_val, n_val, float(v_th), R, S, C, R * S, T=T,
                           PER_CHANNEL=per_channel, SOFT=soft, BLOCK_R=block_r, BLOCK_S=block_s, **LAUNCH)
        ctx.save_for_backward(h, x if ctx.needs_input_grad[2] else None,
                              decay if per_channel else None, gain if per_channel else None)
        ctx.coeffs = (m_val, n_val)
        ctx.meta = (per_channel, float(v_th), surrogate, float(param), R, S, C, x.dtype, soft)
        return s

    @staticmethod
    def backward(ctx, grad_s: Tensor):  # type: ignore[override]
        h, x, decay, gain = ctx.saved_tensors
        per_channel, v_th, surrogate, param, R, S, C, x_dtype, soft = ctx.meta
        m_val, n_val = ctx.coeffs
        T = h.shape[0]
        need_gx = ctx.needs_input_grad[0]
        need_gm = bool(ctx.needs_input_grad[1]) and T > 1  # T = 1 never uses M: no gradient, as autograd
        need_gn = bool(ctx.needs_input_grad[2])
        grad_s = grad_s.contiguous()
        m_ptr, _ = _coeff_args(decay, h) if per_channel else (h, 0.0)
        n_ptr, _ = _coeff_args(gain, h) if per_channel else (h, 0.0)
        block_r, block_s, grid = _tiles(R, S)
        gx = torch.empty_like(h) if need_gx else h  # fp32, as the torch path's; h: never written
        part = torch.empty((2, R, grid[1]), dtype=torch.float32, device=h.device) if need_gm or need_gn else h
        p0, p1 = _surrogate_params(surrogate, param)
        if h.numel():
            _lif_bwd[grid](grad_s, h, x if x is not None else h, m_ptr, n_ptr, m_val, n_val, gx, part, v_th, p0, p1,
                           R, S, C, R * S, T=T, SURROGATE=SURROGATE_IDS[surrogate], PER_CHANNEL=per_channel, SOFT=soft,
                           NEED_GX=need_gx, NEED_GM=need_gm, NEED_GN=need_gn, BLOCK_R=block_r, BLOCK_S=block_s,
                           **LAUNCH)
        g_decay = g_gain = None
        if need_gm or need_gn:
            sums = part.view(2, R // C, C, grid[1]).sum((1, 3))
            g_decay = sums[0] if need_gm else None
            g_gain = sums[1] if need_gn else None
        grad_x = gx.to(x_dtype) if need_gx else None
        return grad_x, g_decay, g_gain, None, None, None, None


def _soft(reset: str) -> bool:
    """The kernels' ``SOFT`` flag for ``model.neuron.reset``; an unknown rule is refused, naming both."""
    if reset not in ("hard", "soft"):
        raise ValueError(f"unknown neuron reset {reset!r}; the Triton kernels run: hard, soft")
    return reset == "soft"


@torch.compiler.disable
def triton_multistep(x: Tensor, decay: Tensor | float, gain: Tensor | float, v_th: float, surrogate: str,
                     param: float, reset: str = "hard") -> Tensor:
    """Spikes of the whole T loop (``[T, B, C, ...]`` -> same shape, ``x.dtype``) with the Triton kernels.
    Outside ``torch.compile``'s graph (a graph break per neuron): its tracer does not see into them."""
    if surrogate not in SURROGATE_IDS:
        raise ValueError(f"unknown surrogate {surrogate!r}; valid: {', '.join(SURROGATE_IDS)}")
    return TritonMultiStepLIF.apply(x, decay, gain, v_th, surrogate, param, reset)
