"""What the user sees on the console, and what only the stage log keeps.

The console shows the project's own INFO lines and everyone's warnings and errors; every record
(DEBUG and third-party INFO included; NNCF from INFO up) still reaches the handlers on the root
logger, i.e. each stage's ``stage.log``. Progress bars are drawn only on a terminal: redirected to a file or a CI
log, a bar becomes hundreds of carriage-return frames, so there it is a plain line every
``interval_s`` seconds instead.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterable, Iterator

from tqdm import tqdm

CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(message)s"
PROJECT_LOGGERS = ("pipeline", "stages")
# third-party loggers whose DEBUG output is a flood even in a log file (font scans, PNG chunks);
# nncf is capped in quiet_nncf (its DEBUG level also switches on a slow debug mode)
QUIET_IN_LOG = ("matplotlib", "PIL")


class ConsoleFilter(logging.Filter):
    """Pass the project's INFO lines and any warning or error; ``verbose`` passes everything."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose or record.levelno >= logging.WARNING:
            return True
        own = any(record.name == n or record.name.startswith(n + ".") for n in PROJECT_LOGGERS)
        return own and record.levelno >= logging.INFO


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
    handler.addFilter(ConsoleFilter(verbose))
    handler._pipeline_console = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for name in QUIET_IN_LOG:
        logging.getLogger(name).setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> "py.warnings" records: console and stage.log
    quiet_nncf()
    return handler


def quiet_nncf() -> None:
    """Undo what ``import nncf`` does to logging: call it right after importing nncf.

    NNCF 3.x, when imported, sets its logger to INFO with its own stdout handler and no
    propagation, so its INFO lines bypass every filter (122 of 237 console lines of a default
    run). Here its records go through the root logger like everyone's: stage.log keeps them,
    the console shows its warnings only. Its level stays INFO, never DEBUG: at DEBUG, NNCF switches
    to a debug mode (``nncf.common.utils.debug.is_debug``) that dumps its quantiser-propagation
    graphs at every step, which made a tiny model's quantisation take 20 minutes instead of seconds.
    A no-op until nncf has been imported.
    """
    if "nncf" not in sys.modules:
        return
    lg = logging.getLogger("nncf")
    for h in list(lg.handlers):
        lg.removeHandler(h)
    lg.propagate = True
    lg.setLevel(logging.INFO)


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
             enabled: bool = True, interval_s: float = 30.0, **tqdm_kwargs: Any) -> Any:
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
                 enabled: bool = True, interval_s: float = 30.0) -> None:
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
