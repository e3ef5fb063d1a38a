"""Run an exported NIR graph in the libraries that read NIR (snnTorch, Norse): the round-trip half of the NIR check.

Each reader imports the graph into its own torch modules; :func:`reader_fn` drives that module for T
steps (one frame per call, its state carried between calls, reset per batch) and returns what
:func:`pipeline.deploy.proofs.parity.compare` wants: logits averaged over T (the graph's output convention)
and the spikes of every neuron node ``{layer: [T, B, ...]}``, named as our neuron modules.

The readers are test dependencies (requirements-dev.txt), not the pipeline's: :func:`available` says
which are importable, and the export stage records a missing one as not checked.

Semantics of each reader, as read from their code (measured in tests/deploy/test_nir_roundtrip.py):
- snnTorch (``import_from_nir``): ``beta = 1 - dt/tau`` with dt fixed at 1e-4 whatever the graph says,
  threshold ``v_threshold / (R dt/tau)``, ``mem = beta mem + I``, spike ``mem > thr``, reset to zero.
- Norse (its node mapping under ``nirtorch.nir_to_torch``, dt from the graph): ``v += dt/tau (v_leak - v + I)`` (R ignored), spike ``v > v_th``,
  reset to ``v_reset`` = 0.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from typing import Any, Callable

import torch

READERS = ("snntorch", "norse")


def available() -> dict[str, str | None]:
    """``{reader: None if importable, else why not}``."""
    out: dict[str, str | None] = {}
    for name, module in (("snntorch", "snntorch.import_nir"), ("norse", "norse.torch")):
        try:
            with _quiet():
                __import__(module)
            out[name] = None
        except Exception as exc:  # ImportError, or a reader broken against this torch
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


@contextlib.contextmanager
def _quiet():
    """The readers print and warn on import (snnTorch prints its RNN search, nirtorch deprecations): keep the console."""
    logger = logging.getLogger()
    level = logger.level
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)


def _sanitize(name: str) -> str:
    return name.replace(".", "_")


def _neurons(graph: Any) -> list[str]:
    import nir

    return [k for k, n in graph.nodes.items() if isinstance(n, nir.LIF)]


class _Imported:
    """One reader's module for one graph, with hooks that collect each neuron node's spikes per step."""

    def __init__(self, reader: str, graph: Any) -> None:
        if reader not in READERS:
            raise ValueError(f"unknown NIR reader {reader!r}; known: {', '.join(READERS)}")
        self.reader = reader
        self.names = _neurons(graph)
        with _quiet():
            if reader == "snntorch":
                from snntorch.import_nir import import_from_nir

                self.module = import_from_nir(copy.deepcopy(graph))  # it rewrites RNN subgraphs in place
            else:
                self.module = _norse(copy.deepcopy(graph), float(graph.metadata.get("dt", 1e-4)))
        self.module.eval()
        self.steps: dict[str, list[torch.Tensor]] = {}
        for name in self.names:
            sub = self.module.get_submodule(_sanitize(name))
            sub.register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Callable:
        def hook(_m: Any, _inp: Any, out: Any) -> None:
            spikes = out[0] if isinstance(out, tuple) else out  # Norse cells return (z, state)
            self.steps.setdefault(name, []).append(spikes.detach().clone())

        return hook

    def _reset(self) -> None:
        """snnTorch neurons keep their membrane inside the module (init_hidden): zero it per batch."""
        for m in self.module.modules():
            if hasattr(m, "reset_mem") and hasattr(m, "init_hidden"):
                m.reset_mem()

    @torch.no_grad()
    def run(self, x: torch.Tensor, T: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x`` [B, T, C, H, W] events or [B, C, H, W] static -> (logits mean over T, {layer: spikes [T, B, ...]})."""
        self.steps = {}
        self._reset()
        state = None
        logits = []
        with _quiet():
            for t in range(T):
                frame = x[:, t] if x.dim() == 5 else x
                out, state = self.module(frame, state)  # nirtorch's fx module: (output, state dict)
                logits.append(out.reshape(out.shape[0], -1))
        spikes = {name: torch.stack(self.steps[name]) for name in self.names}
        return torch.stack(logits).mean(0), spikes


def _norse(graph: Any, dt: float) -> torch.nn.Module:
    """Norse's node mapping (``norse.torch.utils.import_nir``: its LIF, conv, affine, sum-pool modules) wired by
    nirtorch's current interpreter ``nir_to_torch``. Norse 1.1.0's own ``from_nir`` wires them with nirtorch's
    deprecated ``load``, whose depth-first order runs a residual block's downsample conv after the neuron it
    feeds (docs/architecture.md §5 "NIR": the neuron then sees the previous step's shortcut)."""
    import nir
    import nirtorch
    from norse.torch.utils.import_nir import _import_norse_module

    def norse_node(node: Any) -> torch.nn.Module:
        return _import_norse_module(node, dt=dt)

    mapped = (nir.Conv2d, nir.LIF, nir.Affine, nir.Linear, nir.SumPool2d, nir.IF, nir.CubaLIF)
    return nirtorch.nir_to_torch(graph, {t: norse_node for t in mapped})


def reader_fn(reader: str, graph: Any, T: int | None = None) -> Callable[[Any], tuple]:
    """``x -> (logits, {layer: spikes})`` through ``reader``'s import of ``graph`` (a SpikeFn for parity.compare)."""
    steps = int(T if T is not None else graph.metadata["T"])
    imported = _Imported(reader, graph)

    def run(x: Any) -> tuple:
        return imported.run(torch.as_tensor(x, dtype=torch.float32), steps)

    return run


def roundtrip_parity(graph: Any, unrolled: torch.nn.Module, x: torch.Tensor, *, tie_tol: float, flip_margin: float,
                     batch_size: int = 64) -> dict[str, dict[str, Any]]:
    """Each installed reader's import of ``graph`` vs the unrolled torch module on ``x`` (parity.compare:
    per-layer spikes with the first-divergence flip classification, logits, top-1).

    ``{reader: {"checked": True, "report": ParityReport}}``, or ``{"checked": False, "reason": ...}`` for a
    reader that is not installed.
    """
    from .parity import compare, torch_with_spikes

    out: dict[str, dict[str, Any]] = {}
    for reader, missing in available().items():
        if missing:
            out[reader] = {"checked": False, "reason": f"{reader} is not installed ({missing}); it is a test "
                                                       f"dependency: pip install -r requirements-dev.txt"}
            continue
        batches = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
        report = compare(torch_with_spikes(unrolled), reader_fn(reader, graph), batches, tie_tol, flip_margin)
        out[reader] = {"checked": True, "report": report}
    return out
