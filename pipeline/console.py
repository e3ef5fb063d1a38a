"""What the user sees on the console, and what only the stage log keeps.

The console shows the project's own INFO lines, the project's warnings and errors, and errors from
anyone. Every record (DEBUG, third-party INFO and warnings included; NNCF from INFO up) still reaches
the handlers on the root logger, i.e. each stage's ``stage.log``. Third-party warnings stay off the
console (a default run drew torch and NNCF notices that ask nothing of the user); they are counted,
and the runner names the count and the log at the end of the stage. A project line that only the
log needs (every epoch of a long fit) passes ``extra=LOG_ONLY``. Progress bars are drawn only on a
terminal: redirected to a file or a CI log, a bar becomes hundreds of carriage-return frames, so
there it is a plain line every ``interval_s`` seconds instead (NNCF's rich bars: nothing).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from tqdm import tqdm

CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(message)s"
PROJECT_LOGGERS = ("pipeline", "stages")
# a warnings.warn raised from these folders is the project's own (logging.captureWarnings names the file)
PROJECT_DIRS = tuple(str(Path(__file__).resolve().parents[1] / d) for d in PROJECT_LOGGERS)
# third-party loggers whose DEBUG output is a flood even in a log file (font scans, PNG chunks, and
# filelock's two lines every 50 ms while NNCF waits for another process building its extension);
# nncf is capped in quiet_nncf (its DEBUG level also switches on a slow debug mode)
QUIET_IN_LOG = ("matplotlib", "PIL", "filelock")
LOG_ONLY: dict[str, Any] = {"console": False}  # ``log.info(..., extra=LOG_ONLY)``: stage.log, not the console
PROGRESS_INTERVAL_S = 60.0  # off a terminal: one progress line a minute for a long loop


def is_project_record(record: logging.LogRecord) -> bool:
    """A record of the project's loggers, or a ``warnings.warn`` raised from the project's code."""
    if any(record.name == n or record.name.startswith(n + ".") for n in PROJECT_LOGGERS):
        return True
    if record.name == "py.warnings":  # message: "<file>:<line>: <Category>: <text>"
        return str(record.msg).startswith(PROJECT_DIRS)
    return False


class ConsoleFilter(logging.Filter):
    """Pass the project's INFO lines (unless marked LOG_ONLY) and warnings, and anyone's errors;
    ``verbose`` passes everything. Counts the third-party warnings it holds back."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = verbose
        self.held_warnings = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose or record.levelno >= logging.ERROR:
            return True
        own = is_project_record(record)
        if record.levelno >= logging.WARNING:
            if not own:
                self.held_warnings += 1
            return own
        return own and record.levelno >= logging.INFO and getattr(record, "console", True) is not False


_CONSOLE_FILTER: list[ConsoleFilter] = []  # the installed console's filter (one at a time)


def held_warnings() -> int:
    """Third-party warnings kept off the console so far (they are in the stage logs)."""
    return _CONSOLE_FILTER[0].held_warnings if _CONSOLE_FILTER else 0


def setup_logging(verbose: bool = False) -> logging.Handler:
    """Route every record through the root logger; the console handler filters, log files keep all.

    Replaces a console handler installed by an earlier call (and ``basicConfig``'s), so calling
    it twice (``python -m pipeline -v run -v``) does not print every line twice.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_pipeline_console", False) or type(h) is logging.StreamHandler:
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(CONSOLE_FORMAT, datefmt="%H:%M:%S"))
    console_filter = ConsoleFilter(verbose)
    handler.addFilter(console_filter)
    _CONSOLE_FILTER[:] = [console_filter]
    handler._pipeline_console = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for name in QUIET_IN_LOG:
        logging.getLogger(name).setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> "py.warnings" records: console and stage.log
    tame_libraries()
    return handler


def tame_libraries() -> None:
    """Send the imported libraries' log output through the root logger (hence the filter and
    stage.log); the runner calls it before each stage, after its imports. Cheap and idempotent."""
    quiet_nncf()
    route_torch_logs()


def route_torch_logs() -> None:
    """torch's own stderr handlers (``W1130 12:00:00 ... cpp_extension.py:183] No CUDA runtime``)
    bypass every filter and never reach stage.log: remove them, let the records propagate.
    Left alone when ``TORCH_LOGS`` is set (the user asked torch for its own output)."""
    if "torch" not in sys.modules or os.environ.get("TORCH_LOGS"):
        return
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if not isinstance(lg, logging.Logger) or not (name == "torch" or name.startswith("torch.")):
            continue
        own = [h for h in lg.handlers if type(h).__name__ == "_StderrHandler"]
        if own:
            for h in own:
                lg.removeHandler(h)
            lg.propagate = True


def quiet_nncf() -> None:
    """Undo what ``import nncf`` does to logging: call it right after importing nncf.

    NNCF 3.x, when imported, sets its logger to INFO with its own stdout handler and no
    propagation, so its INFO lines bypass every filter (122 of 237 console lines of a default
    run). Here its records go through the root logger like everyone's: stage.log keeps them,
    the console shows its errors only (its warnings are counted, see :class:`ConsoleFilter`). Its level stays INFO, never DEBUG: at DEBUG, NNCF switches
    to a debug mode (``nncf.common.utils.debug.is_debug``) that dumps its quantiser-propagation
    graphs at every step, which made a tiny model's quantisation take 20 minutes instead of seconds.
    Off a terminal its rich progress bars ("Statistics collection ━━━ 100%") are switched off
    too. A no-op until nncf has been imported.
    """
    if "nncf" not in sys.modules:
        return
    lg = logging.getLogger("nncf")
    for h in list(lg.handlers):
        lg.removeHandler(h)
    lg.propagate = True
    lg.setLevel(logging.INFO)
    if not sys.stdout.isatty():  # NNCF draws rich bars on the global rich console (stdout)
        import rich  # imported by nncf already

        rich.get_console().quiet = True


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
             enabled: bool = True, interval_s: float = PROGRESS_INTERVAL_S, **tqdm_kwargs: Any) -> Any:
    """A tqdm bar on a terminal; elsewhere a plain log line every ``interval_s`` seconds.

    The one place bars are made. ``enabled=False`` is silent everywhere. Both kinds support
    iteration, ``update``, ``set_postfix``, ``close`` and ``with``.
    """
    if enabled and sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, **tqdm_kwargs)
    return LogProgress(iterable, total=total, desc=desc, enabled=enabled, interval_s=interval_s)


class LogProgress:
    """tqdm's small API as periodic ``pipeline.progress`` log lines (none for loops shorter than
    ``interval_s``, so a short run's console stays short)."""

    def __init__(self, iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "",
                 enabled: bool = True, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.iterable = iterable
        self.total = total if total is not None else _len_or_none(iterable)
        self.desc, self.enabled, self.interval_s = desc, enabled, interval_s
        self.n = 0
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.log = logging.getLogger("pipeline.progress")

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.enabled and now - self.last >= self.interval_s:
            self.last = now
            self.log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """``desc 120/500 (24%) 33.1 s key=value ...``"""
        elapsed = (now or time.monotonic()) - self.start
        of = f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else ""
        return f"{self.desc} {self.n}{of} {elapsed:.1f} s {self.postfix}".strip()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = " ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        """Nothing to tidy: the caller logs its own summary line."""

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _len_or_none(iterable: Iterable[Any] | None) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None
