"""Resolve the ``model`` config mapping into typed, validated specs.

The pipeline hands ``build_model`` the plain ``model`` section of the config (see
``pipeline/schema.py``) plus ``num_classes`` and ``in_channels`` injected from the dataset.
Missing keys take the schema defaults, so a partial mapping (as in tests) is enough; unknown
keys, wrong types and out-of-range values raise through the schema's own checks
(:func:`pipeline.schema.resolve`), so a typo never silently falls back to a default and each key
is checked by one piece of code with one message.

The dataclasses below take their defaults from the schema (``_NEURON``, ``_STAA``): a default
changes in ``pipeline/schema.py`` only (tests/orchestration/test_schema.py checks that every field matches).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from pipeline.schema import ConfigError, defaults, node, resolve

INJECTED_KEYS = ("num_classes", "in_channels")
_NEURON: dict[str, Any] = defaults(node("model.neuron"))
_STAA: dict[str, Any] = defaults(node("model.staa"))


@dataclass(frozen=True)
class NeuronSpec:
    """Neuron settings: ``kind`` "alif" learns per-channel decay/gain, "lif" keeps them fixed."""

    kind: str = _NEURON["kind"]
    v_th: float = _NEURON["v_th"]
    decay: float = _NEURON["decay"]
    gain: float = _NEURON["gain"]
    surrogate: str = _NEURON["surrogate"]
    surrogate_width: float = _NEURON["surrogate_width"]
    surrogate_k: float = _NEURON["surrogate_k"]
    reset: str = _NEURON["reset"]  # "hard": U = H (1 - S); "soft": U = H - S v_th (neurons.RESETS)


@dataclass(frozen=True)
class STAASpec:
    """Which STAA parts are on, their hyper-parameters and where they are placed."""

    pe: bool = _STAA["pe"]
    gc: bool = _STAA["gc"]
    sa: bool = _STAA["sa"]
    tsrd: bool = _STAA["tsrd"]
    tsrd_p: float = _STAA["tsrd_p"]
    gc_fusion: str = _STAA["gc_fusion"]
    gc_ratio: int = _STAA["gc_ratio"]
    sa_ratio: int = _STAA["sa_ratio"]
    sa_hidden: int | None = _STAA["sa_hidden"]  # step attention's T_h; None: step_attention_width(T, sa_ratio)
    sa_position: str = _STAA["sa_position"]
    sa_mode: str = _STAA["sa_mode"]  # "full" (the paper's) or "causal" (T_h = T, lower-triangular: streams)
    placement: str = _STAA["placement"]
    last_k: int = _STAA["last_k"]
    gate: str = _STAA["gate"]  # "identity": 2 * sigmoid, zero-init (staa.gate_fn); "legacy": sigmoid, bias 2

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
        staa["sa_hidden"] = legacy_step_attention_width(cfg.get("T", defaults(node("model.T"))), ratio)
        staa.setdefault("gate", "legacy")
    staa.setdefault("sa_mode", "full")  # written before sa_mode existed: the paper's SA, whatever the default
    cfg["staa"] = staa
    return cfg


def stored_model_cfg(model_cfg: Mapping[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """``model_cfg`` with what the built model fixed: its current T, SA's hidden width and gate, and the
    neuron's reset rule.

    What a checkpoint must store so that ``build_model`` rebuilds exactly this model after it was
    carried to another T (``SpikingNet.set_time_steps`` keeps the hidden width), whatever a later
    default says.
    """
    staa = dict(model_cfg.get("staa") or {}, sa_hidden=spec.staa.sa_hidden, gate=spec.staa.gate,
                sa_mode=spec.staa.sa_mode)
    neuron = dict(model_cfg.get("neuron") or {}, reset=spec.neuron.reset)
    return dict(model_cfg, T=spec.T, staa=staa, neuron=neuron)


def resolve_model_cfg(cfg: Mapping[str, Any]) -> ModelSpec:
    """Validate ``cfg`` (the ``model`` section + ``num_classes``/``in_channels``) into a ``ModelSpec``.

    Raises :class:`~pipeline.schema.ConfigError` (a ``ValueError``) naming the key.
    """
    for key in INJECTED_KEYS:
        if key not in cfg:
            raise ConfigError(f"model config needs '{key}' (the pipeline injects it from the dataset)")
        if int(cfg[key]) < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {cfg[key]!r}")
    merged = resolve("model", {k: v for k, v in cfg.items() if k not in INJECTED_KEYS})
    staa, n = merged["staa"], merged["neuron"]
    T = merged["T"]
    sa_hidden = step_attention_width(T, staa["sa_ratio"]) if staa["sa_hidden"] is None else staa["sa_hidden"]
    if staa["sa_mode"] == "causal":
        if staa["sa_hidden"] is not None and staa["sa_hidden"] != T:
            raise ConfigError(f"model.staa.sa_hidden={staa['sa_hidden']} with sa_mode 'causal': causal step attention's "
                              f"hidden width is T ({T}, one unit per step); unset sa_hidden or set it to {T}")
        sa_hidden = T
    return ModelSpec(arch=merged["arch"], width=merged["width"], T=T, num_classes=int(cfg["num_classes"]),
                     in_channels=int(cfg["in_channels"]), neuron=NeuronSpec(**n),
                     staa=STAASpec(**dict(staa, sa_hidden=sa_hidden)))
