"""``nir-info``: what an NIR file holds (nodes, shapes, neuron parameters, edges, metadata), without torch.

Self-contained like the rest of :mod:`pipeline.runtime` (it travels in the device bundle): needs only
the ``nir`` package (and its h5py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

NEURON_PARAMS = ("tau", "tau_mem", "tau_syn", "r", "v_leak", "v_threshold", "v_reset")


def file_version(path: Path) -> str:
    """The NIR version a file was written with (its ``version`` dataset)."""
    import h5py

    with h5py.File(str(path), "r") as f:
        v = f["version"][()]
    return v.decode("utf8") if isinstance(v, bytes) else str(v)


def _scalar(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf8")
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _values(a: Any) -> float | list[float]:
    """One number when every neuron shares it, else [min, max]."""
    vals = np.unique(np.asarray(a, dtype=np.float64))
    return float(vals[0]) if vals.size == 1 else [float(vals.min()), float(vals.max())]


def summary(path: Path) -> dict[str, Any]:
    """Nodes (type, output shape, neuron parameters or weight shape), edges and metadata of an NIR file."""
    import nir

    graph = nir.read(str(path))
    nodes = []
    for name, node in graph.nodes.items():
        row: dict[str, Any] = {"name": name, "type": type(node).__name__}
        out = getattr(node, "output_type", None) or {}
        if out.get("output") is not None:
            row["shape"] = [int(v) for v in out["output"]]
        params = {k: _values(getattr(node, k)) for k in NEURON_PARAMS if getattr(node, k, None) is not None}
        if params:
            row.update(params)
        elif getattr(node, "weight", None) is not None:
            row["weight"] = list(np.asarray(node.weight).shape)
        nodes.append(row)
    return {"file": str(path), "nir_version": file_version(path), "nodes": nodes,
            "edges": [list(e) for e in graph.edges], "metadata": {k: _scalar(v) for k, v in graph.metadata.items()}}


def render(info: dict[str, Any]) -> str:
    """The summary as text: one line per node, then the edges and the metadata."""
    lines = [f"{info['file']}: NIR {info['nir_version']}, {len(info['nodes'])} nodes, {len(info['edges'])} edges"]
    for n in info["nodes"]:
        extra = {k: v for k, v in n.items() if k not in ("name", "type", "shape")}
        params = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
        lines.append(f"  {n['name']:<28} {n['type']:<10} {str(n.get('shape', '')):<16} {params}")
    lines.append("edges:")
    lines += [f"  {a} -> {b}" for a, b in info["edges"]]
    lines.append("metadata:")
    lines += [f"  {k}: {v}" for k, v in info["metadata"].items() if k != "deploy"]
    return "\n".join(lines)
