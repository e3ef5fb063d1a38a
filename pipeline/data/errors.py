"""The one error the data library raises for anything the user must fix on disk or in the config.

Every message names the path looked at, draws the layout expected there and says how to get
the data or which ``data.*`` key to set, so a failed run explains itself without a debugger.
"""
from __future__ import annotations

from pathlib import Path

# the npz layouts this package reads, documented in the repository (never outside it)
DATA_DOC = "docs/data.md"


class DataError(Exception):
    """A dataset is missing, incomplete or in the wrong layout (message says how to fix it)."""


def layout_error(
    what: str,
    looked_at: str | Path | None,
    layout: str,
    fix: str,
    problem: str | None = None,
) -> DataError:
    """Build a :class:`DataError` whose message shows ``looked_at``, the ``layout`` tree and the ``fix``."""
    where = "(no path: data.root is not set)" if looked_at is None else str(Path(looked_at).expanduser().absolute())
    lines = [f"{what}: {problem or 'not found'}", f"  looked at: {where}", "  expected layout:"]
    lines += ["    " + line for line in layout.strip("\n").splitlines()]
    lines += ["  how to fix:"] + ["    " + line for line in fix.strip("\n").splitlines()]
    return DataError("\n".join(lines))
