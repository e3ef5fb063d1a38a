"""Drive a one-time-step graph (membrane state in, membrane state out) over an input stream.

The step graph (see ``pipeline.deploy.graphs.streaming``) has inputs ``input`` (one frame
``[B, C, H, W]``), ``step`` (int64 ``[1]``, selects the position-encoding row and causal step
attention's column), one ``u_in.<i>`` per neuron and one ``sa_in.<j>`` per causal step-attention
block (the pooled per-step means seen so far, ``[B, C, T]``); outputs ``logits_step``, ``u_out.<i>``
and ``sa_out.<j>``, fed back as the next step's inputs. Every state starts at zero.
The logits of a clip are the mean of the per-step logits, exactly as the unrolled graph
averages them over T.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .base import Runner

STATE_IN, STATE_OUT = "u_in.", "u_out."
SA_IN, SA_OUT = "sa_in.", "sa_out."
STATE_PAIRS = ((STATE_IN, STATE_OUT), (SA_IN, SA_OUT))  # each state input prefix and its output's


def state_output(name: str) -> str:
    """The output that feeds state input ``name`` at the next step (``u_in.3`` -> ``u_out.3``)."""
    for inp, out in STATE_PAIRS:
        if name.startswith(inp):
            return out + name[len(inp):]
    raise ValueError(f"{name!r} is not a state input (prefixes: {', '.join(p for p, _ in STATE_PAIRS)})")


class StepRunner:
    """Keeps the membranes between calls of a step-graph :class:`Runner` (any backend)."""

    def __init__(self, runner: Runner, state_shapes: dict[str, list[int]], T: int) -> None:
        self.runner = runner
        self.state_shapes = state_shapes  # u_in.<i> / sa_in.<j> -> per-sample shape (no batch axis)
        self.outputs = {n: state_output(n) for n in state_shapes}
        self.T = int(T)
        self.state: dict[str, np.ndarray] = {}
        self.t = 0
        self.logit_sum: np.ndarray | None = None

    def reset(self, batch: int) -> None:
        """Zero membranes (U_0 = 0) and step-attention histories for a new clip of ``batch`` samples."""
        self.state = {n: np.zeros((batch, *s), np.float32) for n, s in self.state_shapes.items()}
        self.t = 0
        self.logit_sum = None

    def step(self, frame: np.ndarray) -> np.ndarray:
        """Feed one frame ``[B, C, H, W]``; returns this step's logits and advances the state."""
        if not self.state:
            self.reset(frame.shape[0])
        if self.t >= self.T:
            raise RuntimeError(f"the step graph was exported for T={self.T} steps (one position-encoding row "
                               f"per step); call reset() to start the next clip")
        feeds = {"input": np.ascontiguousarray(frame, np.float32), **self.state}
        if "step" in self.runner.input_names:  # a model without position encoding never reads it: the exporter drops it
            feeds["step"] = np.array([self.t], np.int64)
        out = self.runner.run(feeds)
        self.state = {n: out[self.outputs[n]] for n in self.state}
        self.t += 1
        logits = np.asarray(out["logits_step"], np.float32)
        self.logit_sum = logits.copy() if self.logit_sum is None else self.logit_sum + logits
        return logits

    def run(self, x: np.ndarray) -> np.ndarray:
        """A whole clip: static ``[B, C, H, W]`` (fed every step) or events ``[B, T, C, H, W]``."""
        self.reset(x.shape[0])
        frames: Iterable[np.ndarray] = (x[:, t] for t in range(self.T)) if x.ndim == 5 else (x for _ in range(self.T))
        for frame in frames:
            self.step(frame)
        assert self.logit_sum is not None
        return self.logit_sum / self.T
