"""Two stages for tests/orchestration/test_cache_keys.py: ``up`` writes bytes, ``down`` reads them.

``NOISE`` stands for what a config does not pin (thread count, kernel choice): changing it makes
``up`` write other bytes under the same key. ``RUNS`` lists the stages that really executed.
"""
from __future__ import annotations

import errno

from pipeline.runner import StageContext, StageResult

NOISE: list[str] = [""]
RUNS: list[str] = []


def run(ctx: StageContext) -> StageResult:
    RUNS.append(ctx.spec.name)
    if NOISE[0] == "ctrl-c":  # after a checkpoint (a file to resume from), as in a training epoch
        (ctx.out / "last.pt").write_text("epoch 1")
        raise KeyboardInterrupt
    if NOISE[0] == "disk full":  # half a file and a temporary one, then the disk fills
        half = ctx.output("value")
        half.write_text("half")
        (ctx.out / f".{half.name}.tmp-123").write_text("temporary")
        raise OSError(errno.ENOSPC, "No space left on device", str(half))
    if ctx.spec.name == "up":
        ctx.output("value").write_text(f"{ctx.cfg['up']['factor']}{NOISE[0]}")
        (ctx.out / "history.csv").write_text(f"run {len(RUNS)}\n")  # a record: differs on every run
        return StageResult(metrics={"runs": len(RUNS)})
    read = ctx.input("up.value").read_text()
    ctx.output("copy").write_text(read)
    return StageResult(metrics={"read": read})
