"""The ``data`` config section with schema defaults filled in.

The config loader normally hands over a complete mapping; library callers and tests may pass
a partial one, so every missing key falls back to the default written in ``pipeline.schema``.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.schema import SCHEMA, Choice, FreeMap, ListOf, Opt


def _default(spec: Any) -> Any:
    if isinstance(spec, dict):
        return {k: _default(v) for k, v in spec.items()}
    if isinstance(spec, (Opt, Choice)):
        return spec.default
    if isinstance(spec, (ListOf, FreeMap)):
        return list(spec.default) if isinstance(spec, ListOf) else dict(spec.default)
    return spec


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def data_settings(data_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return ``data_cfg`` merged over the schema defaults of the ``data`` section."""
    return _merge(_default(SCHEMA["data"]), data_cfg or {})


def opt_path(value: str | Path | None) -> Path | None:
    """A config path (``~`` expanded) or ``None``."""
    return None if value in (None, "") else Path(str(value)).expanduser()
