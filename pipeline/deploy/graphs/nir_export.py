"""NIR export: the unrolled plain-LIF network as a Neuromorphic Intermediate Representation graph.

Why: NIR (the ``nir`` package) is the exchange format neuromorphic toolchains read (snnTorch, Norse,
Sinabs, Rockpool, Spyx, Nengo, hxtorch; Lava-DL, SpiNNaker2). Its primitives cover Conv2d, Affine,
AvgPool2d/SumPool2d and the LIF neuron, and a node with two incoming edges sums them (the residual
add). It has no BatchNorm, multiplication, sigmoid or attention, so only a model built from the
parts below goes through; :func:`nir_blockers` names every part that does not.

Mapping (docs/architecture.md §5, "NIR"):

- ``SeqConvBN`` with BN folded -> ``Conv2d`` (bias = the folded BN shift);
- ``SeqModule(AvgPool2d)`` -> ``AvgPool2d`` (count_include_pad, floor mode: torch's defaults);
- ``BasicBlock``: edges ``conv2 -> sn2`` and ``shortcut -> sn2`` (the add is the two edges);
- global average pool + per-step ``fc`` -> one ``Conv2d`` with a kernel the size of the last feature
  map and weights ``W / (H * W)``: the same affine map, without ``Flatten`` (NIR counts Flatten's
  dims without the batch, while the torch readers pass them to ``torch.nn.Flatten`` as they are);
- the discrete neuron ``H = M U + N I``, spike ``H >= v_th``, hard reset to 0 -> NIR's
  ``tau dv/dt = (v_leak - v) + R I`` under forward Euler with step ``dt``:
  ``v' = (1 - dt/tau) v + (dt/tau) R I``. With ``dt/tau = 1 - M`` the leak matches; the membrane is
  scaled, ``v = c U`` with ``c = (dt/tau) R / N``, so the threshold is ``c v_th`` and the reset
  stays 0. Default ``R = 1`` (readers that ignore ``R``, Norse, then compute the same), so
  ``tau = dt / 0.75`` and ``v_threshold = 0.375`` for M = 0.25, N = 1, v_th = 0.5.

Output convention (graph metadata): the graph runs one time step per call on one frame ``[C, H, W]``
(a static image: the same image every step); its output is that step's logits ``[num_classes, 1, 1]``;
the prediction is the mean over the ``T`` steps, as ``SpikingNet.forward``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from pipeline.models import LIF, STAALIF, BaseLIF, SeqConvBN, SeqModule, SpikingNet
from pipeline.models.resnet import BasicBlock
from pipeline.runtime.nir_info import file_version, summary  # noqa: F401  (summary: re-exported)

NIR_FORMAT = "staa-nir/1"
# snnTorch's NIR reader assumes dt = 1e-4 s whatever the graph says (snntorch/import_nir.py), so the
# graph states that dt: then every reader that takes dt from the graph (Norse) and snnTorch agree.
DEFAULT_DT = 1e-4
DEFAULT_R = 1.0
OUTPUT_NODE, INPUT_NODE = "output", "input"
# why each STAA part has no NIR form (NIR nodes are time-invariant, and it has no softmax, norm or product)
STAA_PARTS = {
    "pe": "position encoding (PE): a learned offset per time step, and NIR nodes are the same at every step",
    "gc": "global context (GC): softmax attention, LayerNorm and a sigmoid gate multiplying the input; NIR has none",
    "sa": "step attention (SA): mixes the T steps of a clip (a step needs later ones); NIR runs step by step",
}


class NirExportError(ValueError):
    """The model has a part NIR cannot express; the message names the part(s)."""


def lif_mapping(decay: float, gain: float, v_th: float, dt: float = DEFAULT_DT, r: float = DEFAULT_R) -> dict[str, float]:
    """NIR LIF parameters that reproduce ``H = M U + N I``, ``S = H >= v_th``, reset to 0 (see module docstring).

    ``scale`` is ``c`` in ``v = c U`` (NIR membrane over ours).
    """
    if not 0.0 <= decay < 1.0:
        raise NirExportError(f"LIF decay M={decay} has no NIR time constant (needs 0 <= M < 1: tau = dt / (1 - M))")
    if gain <= 0.0:
        raise NirExportError(f"LIF gain N={gain} must be > 0 for the NIR mapping")
    if dt <= 0.0 or r <= 0.0:
        raise NirExportError(f"dt={dt} and R={r} must be > 0")
    a = 1.0 - decay  # dt / tau
    scale = a * r / gain
    return {"tau": dt / a, "r": r, "v_leak": 0.0, "v_threshold": v_th * scale, "v_reset": 0.0, "scale": scale,
            "dt": dt}


Blocker = tuple[str, str]  # (part, why NIR cannot take it)


def _neuron_blocker(name: str, unit: nn.Module) -> list[Blocker]:
    if not isinstance(unit, STAALIF):
        return [(name, f"{type(unit).__name__} is not a spiking unit NIR knows")]
    out = []
    staa = unit.staa
    if staa is not None:
        for label, part in (("pe", staa.pe), ("gc", staa.gc), ("sa", staa.sa)):
            if part is not None:
                out.append((f"{name}.staa.{label}", f"STAA {STAA_PARTS[label]} (train with model.staa.{label}: false)"))
    lif = unit.lif
    if getattr(lif, "reset_mode", "hard") != "hard":  # NIR's LIF resets to v_reset; a subtracting reset has no form
        out.append((f"{name}.lif",
                    f"reset {lif.reset_mode!r}: NIR's LIF resets to v_reset (use model.neuron.reset: hard)"))
    if not isinstance(lif, LIF):
        kind = "adaptive LIF (alif: learned per-channel decay and gain)" if isinstance(lif, BaseLIF) else type(lif).__name__
        out.append((f"{name}.lif", f"{kind}: NIR could hold per-neuron constants, but snnTorch's reader takes one "
                                   f"threshold per layer, so round-trip parity is unproven (use model.neuron.kind: lif)"))
    else:
        try:
            lif_mapping(lif.decay, lif.gain, lif.v_th)
        except NirExportError as exc:
            out.append((f"{name}.lif", str(exc)))
    return out


def _conv_blocker(name: str, conv: SeqConvBN) -> list[Blocker]:
    out = []
    if not isinstance(conv.bn, nn.Identity):
        out.append((f"{name}.bn", "BatchNorm not folded: NIR has no BatchNorm (export the unrolled float model)"))
    c = conv.conv
    if c.padding_mode != "zeros" or isinstance(c.padding, str):
        out.append((f"{name}.conv", f"padding {c.padding!r} / {c.padding_mode!r}: only zero padding by numbers"))
    return out


def _pool_blocker(name: str, seq: SeqModule) -> list[Blocker]:
    p = seq.module
    if not isinstance(p, nn.AvgPool2d):
        return [(name, f"{type(p).__name__}: NIR has AvgPool2d and SumPool2d")]
    if p.ceil_mode or not p.count_include_pad or p.divisor_override is not None:
        return [(name, "AvgPool2d with ceil_mode/count_include_pad/divisor_override other than torch's defaults")]
    return []


def blocking_parts(model: nn.Module) -> list[Blocker]:
    """``(part, reason)`` for every part of ``model`` that NIR cannot express, in forward order."""
    if not isinstance(model, SpikingNet):
        return [(type(model).__name__, "not a SpikingNet (the NIR export walks its stem, stages and fc)")]
    out: list[Blocker] = []

    def visit(name: str, m: nn.Module) -> None:
        if isinstance(m, SeqConvBN):
            out.extend(_conv_blocker(name, m))
        elif isinstance(m, STAALIF):
            out.extend(_neuron_blocker(name, m))
        elif isinstance(m, SeqModule):
            out.extend(_pool_blocker(name, m))
        elif isinstance(m, BasicBlock):
            for child in ("conv1", "sn1", "conv2", "downsample", "sn2"):
                if getattr(m, child) is not None:
                    visit(f"{name}.{child}", getattr(m, child))
        elif isinstance(m, nn.Sequential):
            for child, sub in m.named_children():
                visit(f"{name}.{child}", sub)
        else:
            out.append((name, f"{type(m).__name__} has no NIR counterpart"))

    visit("stem", model.stem)
    for stage in model.stage_names:
        visit(stage, getattr(model, stage))
    return out


def nir_blockers(model: nn.Module) -> list[str]:
    """Why ``model`` cannot go to NIR, one line per reason with the parts it hits (empty: :func:`to_nir` exports it)."""
    by_reason: dict[str, list[str]] = {}
    for part, reason in blocking_parts(model):
        by_reason.setdefault(reason, []).append(part)
    lines = []
    for reason, parts in by_reason.items():
        more = f" and {len(parts) - 3} more" if len(parts) > 3 else ""
        lines.append(f"{', '.join(parts[:3])}{more}: {reason}")
    return lines


def blocker_kinds(model: nn.Module) -> list[str]:
    """The kinds of part that block ``model`` (each reason's headline, before its first colon), sorted: a
    one-line summary for the console; :func:`nir_blockers` names every module."""
    return sorted({reason.split(":")[0].split(" (")[0] for _, reason in blocking_parts(model)})


def _f32(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


class _Builder:
    """Collects nodes and edges while walking the network, tracking the ``[C, H, W]`` each node emits."""

    def __init__(self, nir_mod: Any, frame: tuple[int, int, int], dt: float, r: float) -> None:
        self.nir, self.dt, self.r = nir_mod, dt, r
        self.nodes: dict[str, Any] = {INPUT_NODE: nir_mod.Input(input_type={"input": np.array(frame)})}
        self.edges: list[tuple[str, str]] = []
        self.shapes: dict[str, tuple[int, ...]] = {INPUT_NODE: frame}
        self.neurons: list[str] = []

    def add(self, name: str, node: Any, sources: list[str], shape: tuple[int, ...]) -> str:
        self.nodes[name] = node
        self.edges += [(s, name) for s in sources]
        self.shapes[name] = shape
        return name

    def conv(self, name: str, m: SeqConvBN, src: str) -> str:
        c = m.conv
        _, h, w = self.shapes[src]
        weight = _f32(c.weight)
        bias = _f32(c.bias) if c.bias is not None else np.zeros(weight.shape[0], np.float32)
        node = self.nir.Conv2d(input_shape=(h, w), weight=weight, stride=tuple(c.stride), padding=tuple(c.padding),
                               dilation=tuple(c.dilation), groups=int(c.groups), bias=bias)
        return self.add(name, node, [src], tuple(int(v) for v in node.output_type["output"]))

    def lif(self, name: str, unit: STAALIF, sources: list[str]) -> str:
        shape = self.shapes[sources[0]]
        p = lif_mapping(unit.lif.decay, unit.lif.gain, unit.lif.v_th, self.dt, self.r)
        full = {k: np.full(shape, p[k], np.float32) for k in ("tau", "r", "v_leak", "v_threshold", "v_reset")}
        self.neurons.append(name)
        return self.add(name, self.nir.LIF(**full), sources, shape)

    def pool(self, name: str, m: SeqModule, src: str) -> str:
        p = m.module
        pair = lambda v: np.array(v if isinstance(v, (tuple, list)) else (v, v))  # noqa: E731
        c, h, w = self.shapes[src]
        k, s, pad = pair(p.kernel_size), pair(p.stride if p.stride is not None else p.kernel_size), pair(p.padding)
        out = tuple(int(v) for v in (np.array([h, w]) + 2 * pad - k) // s + 1)
        return self.add(name, self.nir.AvgPool2d(kernel_size=k, stride=s, padding=pad), [src], (c, *out))

    def classifier(self, fc: nn.Linear, src: str) -> str:
        """Global average pool + per-step fc as one Conv2d with an (H, W) kernel and weights W / (H W)."""
        c, h, w = self.shapes[src]
        weight = _f32(fc.weight)[:, :, None, None].repeat(h, 2).repeat(w, 3) / np.float32(h * w)
        bias = _f32(fc.bias) if fc.bias is not None else np.zeros(fc.out_features, np.float32)
        node = self.nir.Conv2d(input_shape=(h, w), weight=np.ascontiguousarray(weight, np.float32), stride=(1, 1),
                               padding=(0, 0), dilation=(1, 1), groups=1, bias=bias)
        return self.add("fc", node, [src], (fc.out_features, 1, 1))


def to_nir(model: SpikingNet, frame: tuple[int, int, int], *, dt: float = DEFAULT_DT, r: float = DEFAULT_R,
           metadata: Mapping[str, Any] | None = None) -> Any:
    """The NIR graph of ``model`` for input frames ``[C, H, W]``; raises :class:`NirExportError` naming every blocker.

    Neuron nodes are named after the neuron modules (``layer1.0.sn1.lif``), so their spikes can be
    compared with :func:`pipeline.models.record_spikes` layer by layer.
    """
    import nir

    blockers = nir_blockers(model)
    if blockers:
        raise NirExportError("the model cannot be expressed in NIR: " + "; ".join(blockers))
    b = _Builder(nir, tuple(int(v) for v in frame), dt, r)

    def walk(name: str, m: nn.Module, src: str) -> str:
        if isinstance(m, SeqConvBN):
            return b.conv(name, m, src)
        if isinstance(m, STAALIF):
            return b.lif(f"{name}.lif", m, [src])
        if isinstance(m, SeqModule):
            return b.pool(name, m, src)
        if isinstance(m, BasicBlock):
            main = walk(f"{name}.conv2", m.conv2, walk(f"{name}.sn1", m.sn1, walk(f"{name}.conv1", m.conv1, src)))
            short = src if m.downsample is None else walk(f"{name}.downsample", m.downsample, src)
            return b.lif(f"{name}.sn2.lif", m.sn2, [main, short])  # the residual add: two edges in
        for child, sub in m.named_children():  # nn.Sequential (stem, stages)
            src = walk(f"{name}.{child}", sub, src)
        return src

    last = walk("stem", model.stem, INPUT_NODE)
    for stage in model.stage_names:
        last = walk(stage, getattr(model, stage), last)
    head = b.classifier(model.fc, last)
    b.add(OUTPUT_NODE, nir.Output(output_type={"output": np.array(b.shapes[head])}), [head], b.shapes[head])
    dangling = sorted(set(b.nodes) - {s for s, _ in b.edges} - {OUTPUT_NODE})
    if dangling:  # a bug in the walk above; readers would hang or drop the node
        raise NirExportError(f"NIR graph nodes with no consumer: {', '.join(dangling)}")
    lif = next(u for u in model.modules() if isinstance(u, LIF))
    meta = graph_metadata(lif, model.T, dt, r, len(b.neurons), metadata)
    return nir.NIRGraph(nodes=b.nodes, edges=b.edges, metadata=meta)


def graph_metadata(lif: LIF, T: int, dt: float, r: float, neurons: int,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Flat metadata (NIR's reader reads one level of scalars and strings): format, T, dt, the neuron
    mapping and the output convention; ``extra`` (the deploy metadata) is kept as one JSON string."""
    p = lif_mapping(lif.decay, lif.gain, lif.v_th, dt, r)
    meta: dict[str, Any] = {
        "format": NIR_FORMAT, "T": int(T), "dt": float(dt), "neurons": int(neurons),
        "neuron_discrete": f"H = {lif.decay} U + {lif.gain} I; S = H >= {lif.v_th}; U = H (1 - S) (hard reset to 0)",
        "neuron_mapping": (f"NIR LIF, forward Euler with dt = {dt:g}: tau = dt / (1 - M) = {p['tau']:.6g}, "
                           f"R = {r:g}, v_leak = 0, v_reset = 0, v_threshold = v_th (1 - M) R / N = "
                           f"{p['v_threshold']:g}; NIR membrane = {p['scale']:g} x ours"),
        "threshold_rule": "ours fires at H >= v_th, NIR's LIF at v > v_threshold: they differ only on exact ties",
        "input": "one frame [C, H, W] per call, T calls (a static image: the same frame every step)",
        "output": "per-step logits [num_classes, 1, 1] (global average pool folded into the fc Conv2d); "
                  "the prediction is the mean over the T steps",
    }
    if extra:  # the ONNX deploy metadata, less what the NIR convention above replaces
        kept = {k: v for k, v in extra.items() if k not in ("T", "input_layout", "output")}
        meta["deploy"] = json.dumps(kept, sort_keys=True, default=str)
    return meta


def write_nir(graph: Any, path: Path) -> Path:
    """Write ``graph`` to ``path`` (HDF5, gzip) atomically: a partial file never takes its name."""
    import nir

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    nir.write(str(tmp), graph)
    tmp.replace(path)
    return path


def graph_dict(graph: Any) -> dict[str, Any]:
    """A comparable plain form of a graph: node types and parameters (arrays as lists), sorted edges,
    metadata (bytes decoded, numpy scalars as Python numbers)."""
    def plain(v: Any) -> Any:
        if isinstance(v, bytes):
            return v.decode("utf8")
        if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, np.number)) for x in v):
            v = np.asarray(v)  # strides and shapes: tuples when built, arrays when read
        if isinstance(v, np.ndarray):
            return plain(v.item()) if v.ndim == 0 else {"kind": v.dtype.kind, "bytes": v.dtype.itemsize
                                                        if v.dtype.kind == "f" else 0, "shape": list(v.shape),
                                                        "data": v.ravel().tolist()}
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in sorted(v.items())}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    nodes = {}
    for name, node in graph.nodes.items():
        d = node.to_dict()
        d.pop("metadata", None)
        nodes[name] = plain(d)
    return {"nodes": nodes, "edges": sorted(tuple(e) for e in graph.edges), "metadata": plain(dict(graph.metadata))}


def check_roundtrip(path: Path, graph: Any, work: Path) -> dict[str, Any]:
    """``nir``'s own reader: load ``path``, re-save it, load that; both must equal ``graph`` exactly."""
    import nir

    loaded = nir.read(str(path))
    again = Path(work) / (Path(path).stem + ".resaved.nir")
    nir.write(str(again), loaded)
    reread = nir.read(str(again))
    want, got, got2 = graph_dict(graph), graph_dict(loaded), graph_dict(reread)
    return {"identical": want == got == got2, "nodes": len(loaded.nodes), "edges": len(loaded.edges),
            "nir_version": file_version(path),
            "differs": sorted(k for k in want if want[k] != got.get(k) or want[k] != got2.get(k))}
