"""Resolve the ``model`` config mapping into typed, validated specs.

The pipeline hands ``build_model`` the plain ``model`` section of the config (see
``pipeline/schema.py``) plus ``num_classes`` and ``in_channels`` injected from the dataset.
Missing keys take the schema defaults, so a partial mapping (as in tests) is enough; unknown
keys raise, so a typo never silently falls back to a default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from pipeline.schema import SCHEMA, Choice, FreeMap, ListOf, Opt

INJECTED_KEYS = ("num_classes", "in_channels")


@dataclass(frozen=True)
class NeuronSpec:
    """Neuron settings: ``kind`` "alif" learns per-channel decay/gain, "lif" keeps them fixed."""

    kind: str = "alif"
    v_th: float = 0.5
    decay: float = 0.25
    gain: float = 1.0
    surrogate: str = "rect"
    surrogate_width: float = 1.0
    surrogate_k: float = 3.0


@dataclass(frozen=True)
class STAASpec:
    """Which STAA parts are on, their hyper-parameters and where they are placed."""

    pe: bool = True
    gc: bool = True
    sa: bool = True
    tsrd: bool = True
    tsrd_p: float = 0.1
    gc_fusion: str = "mul"
    gc_ratio: int = 4
    sa_ratio: int = 4
    sa_hidden: int | None = None  # step attention's T_h; None: step_attention_width(T, sa_ratio)
    sa_position: str = "before"
    placement: str = "all"
    last_k: int = 1
    gate: str = "identity"  # "identity": 2 * sigmoid, zero-init (staa.gate_fn); "legacy": sigmoid, bias 2

    @property
    def any_block(self) -> bool:
        """True when at least one attention part (PE, GC, SA) exists; TSRD alone has nothing to bypass."""
        return self.pe or self.gc or self.sa


@dataclass(frozen=True)
class ModelSpec:
    """Everything ``build_model`` needs, typed."""

    arch: str
    width: float
    T: int
    num_classes: int
    in_channels: int
    neuron: NeuronSpec
    staa: STAASpec

    def as_dict(self) -> dict[str, Any]:
        """Plain nested dict (config form), e.g. to store next to a checkpoint and rebuild from it."""
        from dataclasses import asdict

        return asdict(self)


def step_attention_width(T: int, sa_ratio: int) -> int:
    """SA's hidden width for a new model at T steps: T for T <= 4, ``max(T // r, 1)`` above.

    (docs/architecture.md §4.) Fixed at build time and stored in every checkpoint
    (``model.staa.sa_hidden``): a model carried to another T keeps its trained width, whatever
    this rule says for the new T.
    """
    return int(T) if T <= 4 else max(int(T) // int(sa_ratio), 1)


def legacy_step_attention_width(T: int, sa_ratio: int) -> int:
    """The rule before ``sa_hidden`` was stored: ``max(T // r, 1)`` of the T the checkpoint runs at."""
    return max(int(T) // int(sa_ratio), 1)


def checkpoint_model_cfg(stored: Mapping[str, Any]) -> dict[str, Any]:
    """The model config a checkpoint was built with, for ``build_model``.

    Checkpoints written before ``model.staa.sa_hidden`` existed lack it (and ``gate``): they were
    built with the legacy width rule and the legacy sigmoid gates, so those are filled in here;
    a current checkpoint is returned unchanged.
    """
    cfg = dict(stored)
    staa = dict(cfg.get("staa") or {})
    if "sa_hidden" not in staa:
        ratio = staa.get("sa_ratio", STAASpec.sa_ratio)
        staa["sa_hidden"] = legacy_step_attention_width(cfg.get("T", SCHEMA["model"]["T"]), ratio)
        staa.setdefault("gate", "legacy")
    cfg["staa"] = staa
    return cfg


def stored_model_cfg(model_cfg: Mapping[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """``model_cfg`` with what the built model fixed: its current T and SA's hidden width and gate.

    What a checkpoint must store so that ``build_model`` rebuilds exactly this model after it was
    carried to another T (``SpikingNet.set_time_steps`` keeps the hidden width).
    """
    staa = dict(model_cfg.get("staa") or {}, sa_hidden=spec.staa.sa_hidden, gate=spec.staa.gate)
    return dict(model_cfg, T=spec.T, staa=staa)


def schema_defaults(node: Any) -> Any:
    """The default value tree of a schema node (``Opt``/``Choice``/``ListOf``/``FreeMap`` -> ``.default``)."""
    if isinstance(node, dict):
        return {k: schema_defaults(v) for k, v in node.items()}
    if isinstance(node, ListOf):
        return list(node.default)
    if isinstance(node, (Opt, Choice, FreeMap)):
        return node.default
    return node


def _merge(schema: dict, cfg: Mapping, path: str) -> dict[str, Any]:
    """Overlay ``cfg`` on the schema defaults, checking keys and ``Choice`` options."""
    unknown = sorted(set(cfg) - set(schema) - (set(INJECTED_KEYS) if path == "model" else set()))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{path}.{k}' for k in unknown)}; valid: {', '.join(sorted(schema))}")
    out: dict[str, Any] = {}
    for key, node in schema.items():
        if isinstance(node, dict):
            sub = cfg.get(key, {}) or {}
            if not isinstance(sub, Mapping):
                raise ValueError(f"{path}.{key} must be a mapping, got {type(sub).__name__}")
            out[key] = _merge(node, sub, f"{path}.{key}")
            continue
        value = cfg[key] if key in cfg else schema_defaults(node)
        if isinstance(node, Choice) and key != "arch" and value not in node.options:
            raise ValueError(f"{path}.{key}={value!r} is not one of {', '.join(node.options)}")
        out[key] = value
    return out


def resolve_model_cfg(cfg: Mapping[str, Any]) -> ModelSpec:
    """Validate ``cfg`` (the ``model`` section + ``num_classes``/``in_channels``) into a ``ModelSpec``."""
    merged = _merge(SCHEMA["model"], cfg, "model")
    for key in INJECTED_KEYS:
        if key not in cfg:
            raise ValueError(f"model config needs '{key}' (the pipeline injects it from the dataset)")
        if int(cfg[key]) < 1:
            raise ValueError(f"model.{key} must be >= 1, got {cfg[key]!r}")
    if int(merged["T"]) < 1:
        raise ValueError(f"model.T must be >= 1, got {merged['T']!r}")
    if float(merged["width"]) <= 0:
        raise ValueError(f"model.width must be > 0, got {merged['width']!r}")
    staa = merged["staa"]
    if not 0.0 <= float(staa["tsrd_p"]) < 1.0:
        raise ValueError(f"model.staa.tsrd_p must be in [0, 1), got {staa['tsrd_p']!r}")
    for key in ("gc_ratio", "sa_ratio"):
        if int(staa[key]) < 1:
            raise ValueError(f"model.staa.{key} must be >= 1, got {staa[key]!r}")
    T = int(merged["T"])
    sa_hidden = step_attention_width(T, staa["sa_ratio"]) if staa["sa_hidden"] is None else int(staa["sa_hidden"])
    if sa_hidden < 1:
        raise ValueError(f"model.staa.sa_hidden must be >= 1 (or null for the default rule), got {staa['sa_hidden']!r}")
    if int(staa["last_k"]) < 0:
        raise ValueError(f"model.staa.last_k must be >= 0, got {staa['last_k']!r}")
    n = merged["neuron"]
    return ModelSpec(
        arch=str(merged["arch"]),
        width=float(merged["width"]),
        T=T,
        num_classes=int(cfg["num_classes"]),
        in_channels=int(cfg["in_channels"]),
        neuron=NeuronSpec(
            kind=n["kind"], v_th=float(n["v_th"]), decay=float(n["decay"]), gain=float(n["gain"]),
            surrogate=n["surrogate"], surrogate_width=float(n["surrogate_width"]),
            surrogate_k=float(n["surrogate_k"]),
        ),
        staa=STAASpec(
            pe=bool(staa["pe"]), gc=bool(staa["gc"]), sa=bool(staa["sa"]), tsrd=bool(staa["tsrd"]),
            tsrd_p=float(staa["tsrd_p"]), gc_fusion=staa["gc_fusion"], gc_ratio=int(staa["gc_ratio"]),
            sa_ratio=int(staa["sa_ratio"]), sa_hidden=sa_hidden, sa_position=staa["sa_position"],
            placement=staa["placement"], last_k=int(staa["last_k"]), gate=staa["gate"],
        ),
    )
