"""The ``data`` config section with schema defaults filled in.

The config loader normally hands over a complete mapping; library callers and tests may pass
a partial one, so every missing key falls back to the default written in ``pipeline.schema``,
and every given key goes through the schema's checks (one place for defaults and validation).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.schema import ConfigError, resolve

from .errors import DataError


def data_settings(data_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return ``data_cfg`` checked and merged over the schema defaults of the ``data`` section.

    A bad value raises :class:`DataError` (the data library's one error) with the schema's message.
    """
    try:
        return resolve("data", data_cfg)
    except ConfigError as exc:
        raise DataError(str(exc)) from exc


def opt_path(value: str | Path | None) -> Path | None:
    """A config path (``~`` expanded) or ``None``."""
    return None if value in (None, "") else Path(str(value)).expanduser()
