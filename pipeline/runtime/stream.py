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

import json
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from .base import Runner

STATE_IN, STATE_OUT = "u_in.", "u_out."
SA_IN, SA_OUT = "sa_in.", "sa_out."
STATE_PAIRS = ((STATE_IN, STATE_OUT), (SA_IN, SA_OUT))  # each state input prefix and its output's
CRITERIA = ("softmax", "margin")  # the exit's confidence: top softmax probability, or top-1 minus top-2 probability
DEFAULT_CRITERION = "softmax"


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

    def running_means(self, x: np.ndarray) -> np.ndarray:
        """The clip's running-mean logits after 1, 2, ..., T steps, ``[T, B, K]`` (row T-1 = :meth:`run`).

        One pass gives the accuracy at every step count: step t's prediction of a streaming device
        that stopped after t frames is the mean of the first t per-step logits."""
        self.reset(x.shape[0])
        out = []
        for t in range(self.T):
            self.step(x[:, t] if x.ndim == 5 else x)
            assert self.logit_sum is not None
            out.append(self.logit_sum / (t + 1))
        return np.stack(out)

    def run_early_exit(self, x: np.ndarray, tau: float, criterion: str = DEFAULT_CRITERION
                       ) -> tuple[np.ndarray, np.ndarray]:
        """A clip with the exit on: each sample stops at the first step ``t`` whose running-mean logits have
        ``confidence >= tau`` (step T at the latest); returns its logits at that step ``[B, K]`` and the
        steps it used ``[B]`` (1..T). The loop ends when every sample of the batch has stopped, so at
        batch 1 an early exit really skips the remaining step calls."""
        self.reset(x.shape[0])
        B = x.shape[0]
        steps = np.zeros(B, np.int64)  # 0: still running
        logits: np.ndarray | None = None
        for t in range(self.T):
            self.step(x[:, t] if x.ndim == 5 else x)
            assert self.logit_sum is not None
            mean = self.logit_sum / (t + 1)
            if logits is None:
                logits = np.zeros_like(mean)
            stop = (steps == 0) & ((confidence(mean, criterion) >= tau) | (t + 1 == self.T))
            logits[stop] = mean[stop]
            steps[stop] = t + 1
            if (steps > 0).all():
                break
        assert logits is not None
        return logits, steps



def confidence(logits: np.ndarray, criterion: str = DEFAULT_CRITERION) -> np.ndarray:
    """Per-sample confidence of ``[..., K]`` logits in [0, 1]: the largest softmax probability (``softmax``) or
    the gap between the two largest (``margin``). Both on probabilities, so one tau scale serves every model."""
    if criterion not in CRITERIA:
        raise ValueError(f"exit criterion {criterion!r} is not one of {', '.join(CRITERIA)}")
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if criterion == "softmax" or p.shape[-1] < 2:
        return p.max(axis=-1)
    top2 = np.sort(p, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def state_shapes_from_metadata(props: Mapping[str, str]) -> dict[str, list[int]]:
    """``u_in.<i>`` / ``sa_in.<j>`` -> per-sample shape, from a step graph's ``state_shapes`` / ``sa_state_shapes``
    metadata (JSON lists, written by the export stage)."""
    if "state_shapes" not in props:
        raise ValueError("the graph has no 'state_shapes' metadata: it is not a step graph written by the export "
                         "stage (export/step_fp32.onnx, export/step_int8.onnx)")
    shapes = {f"{STATE_IN}{i}": list(s) for i, s in enumerate(json.loads(props["state_shapes"]))}
    sa = json.loads(props.get("sa_state_shapes") or "[]")
    shapes.update({f"{SA_IN}{j}": list(s) for j, s in enumerate(sa)})
    return shapes


def graph_metadata(path: str | Path) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` (onnx when installed, else ONNX Runtime's model metadata)."""
    try:
        import onnx
        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except ImportError:
        import onnxruntime as ort
        return dict(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                    .get_modelmeta().custom_metadata_map)


def open_step_graph(path: str | Path, runner: Runner) -> StepRunner:
    """A :class:`StepRunner` over ``runner`` (the step graph at ``path`` in any backend): states and T from its metadata."""
    props = graph_metadata(path)
    if "T" not in props:
        raise ValueError(f"{path}: no 'T' metadata; pass a step graph written by the export stage")
    return StepRunner(runner, state_shapes_from_metadata(props), int(json.loads(props["T"])))
