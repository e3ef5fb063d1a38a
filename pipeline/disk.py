"""Recognise a failed write (disk full, quota, file-size limit) and say it in one line.

Why: a full disk surfaces as ``OSError: [Errno 28]`` from Python, but as ``RuntimeError: unexpected
pos 2033024 vs 2032912`` from ``torch.save`` (its C++ stream writer), and neither names the folder
or the space left. The runner asks :func:`write_failure` about any exception a stage raises, and
turns a write failure into a message with the folder, the free space and what was written so far.
Stdlib only (the CLI imports the runner before torch).
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large (a file-size limit: ulimit -f)"}
# what torch's C++ writer (PyTorchStreamWriter, via std::ostream) says when a write fails
TORCH_WRITE_FAILURES = ("unexpected pos", "iostream error", "PytorchStreamWriter failed", "file write failed")


def write_failure(exc: BaseException) -> str | None:
    """What went wrong if ``exc`` (or its cause/context) is a failed write, else None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            where = f" writing {e.filename}" if e.filename else ""
            return WRITE_ERRNOS[e.errno] + where
        if isinstance(e, RuntimeError) and any(s in str(e) for s in TORCH_WRITE_FAILURES):
            return "torch could not write a checkpoint (no space left, a quota or a file-size limit)"
        todo += [e.__cause__, e.__context__]
    return None


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def folder_bytes(folder: Path) -> int:
    """Bytes in the files below ``folder`` (0 if it is gone)."""
    try:
        return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    except OSError:
        return 0


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the filesystem that holds ``folder`` (or its nearest existing parent)."""
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None
