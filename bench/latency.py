"""Per-backend latency ratios on one run's artifacts, measured in one process and printed as a table.

Why ratios: absolute milliseconds depend on the machine and its load; how much INT8 buys over
FP32 in ONNX Runtime, what unrolling buys over the eager model, and what halving T buys are
the numbers that carry over. Every artifact goes through the same runner interface and the
same benchmark helper as the validate stage (``pipeline.runtime.base.benchmark``: warm-up not
timed, fixed threads), on real test images.

Comparisons (A vs B; ratio > 1 means A is faster):
- ONNX Runtime INT8 vs ONNX Runtime FP32 (export/model_int8.onnx vs model_fp32.onnx)
- ONNX Runtime FP32 vs eager torch at the same T
- unrolled torch vs eager torch (unroll/float.pt vs the float checkpoint it came from)
- eager torch at T=2 vs the trained T (reduce_t/t2.pt vs train/best.pt; the smallest reduced T
  when 2 is absent)

    .venv/bin/python bench/latency.py [--config configs/default.yaml] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline import registry  # noqa: E402
from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.data import data_bundle, eval_loader  # noqa: E402
from pipeline.report.inventory import discover  # noqa: E402
from pipeline.report.measure import Settings, measure_speed  # noqa: E402
from pipeline.runner import run_store  # noqa: E402

REQUIRED = ("train/best.pt", "unroll/float.pt", "export/model_fp32.onnx", "export/model_int8.onnx")


def _fail(msg: str) -> None:
    print(f"bench/latency.py: {msg}", file=sys.stderr)
    sys.exit(1)


def _pairs(names: set[str], model_T: int, reduced: list[int], unroll_parent: str | None) -> list[tuple[str, str, str]]:
    """(label, A, B) for every comparison whose artifacts exist."""
    pairs = [("ONNX Runtime INT8 vs FP32", "export/model_int8.onnx", "export/model_fp32.onnx")]
    if unroll_parent:
        pairs.append(("ONNX Runtime FP32 vs eager torch", "export/model_fp32.onnx", unroll_parent))
        pairs.append(("unrolled vs eager torch", "unroll/float.pt", unroll_parent))
    if reduced:
        t = 2 if 2 in reduced else min(reduced)
        pairs.append((f"eager torch T={t} vs T={model_T}", f"reduce_t/t{t}.pt", "train/best.pt"))
    return [p for p in pairs if p[1] in names and p[2] in names]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--iters", type=int, default=None, help="timed calls (default validate.iterations)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls (default validate.warmup)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default validate.threads)")
    ap.add_argument("--batch", type=int, default=None, help="throughput batch (default max validate.batch_sizes)")
    args = ap.parse_args(argv)

    try:
        cfg = load_config(args.config, tuple(args.overrides))
    except ConfigError as exc:
        _fail(f"config error: {exc}")
    store = run_store(cfg)
    missing = [r for r in REQUIRED if not (store.stage_dir(r.split("/")[0]) / r.split("/")[1]).is_file()]
    if missing:
        _fail(f"the run '{cfg['name']}' lacks {', '.join(missing)} under {store.root}: run make all first "
              f"(make all CONFIG={args.config})")

    v = cfg["validate"]
    torch.set_num_threads(args.threads or v["threads"] or torch.get_num_threads())
    bundle = data_bundle(cfg)
    inputs = {s: store.stage_dir(s) for s in ("train", "reduce_t", "qat", "unroll", "export")
              if store.stage_dir(s).is_dir()}
    arts = {a.name: a for a in discover(inputs, cfg["model"]["T"], "cpu", (None, *bundle.test[0][0].shape),
                                         registry.table())}
    reduced = sorted(a.T for a in arts.values() if a.stage == "reduce_t" and a.T is not None)
    unroll_parent = arts["unroll/float.pt"].parent if "unroll/float.pt" in arts else None
    pairs = _pairs(set(arts), cfg["model"]["T"], reduced, unroll_parent)
    batch = args.batch or max(v["batch_sizes"])
    settings = Settings(batch_sizes=(1, batch), warmup=args.warmup if args.warmup is not None else v["warmup"],
                        iterations=args.iters or v["iterations"], threads=args.threads or v["threads"],
                        num_classes=bundle.num_classes)

    speed: dict[str, dict[str, Any]] = {}
    for name in sorted({n for _, a, b in pairs for n in (a, b)}):
        art = arts[name]
        loader = eval_loader(cfg, data_bundle(cfg, art.T).test if bundle.is_event else bundle.test, batch)
        sample = next(iter(loader))[0].numpy()
        loaded = art.opener()
        try:
            speed[name] = measure_speed(loaded.runner, sample, settings)
        finally:
            loaded.runner.close()

    print(f"run '{cfg['name']}' ({cfg['data']['dataset']}, {cfg['model']['arch']} x{cfg['model']['width']}): "
          f"CPU, {settings.threads} thread(s), warm-up {settings.warmup}, {settings.iterations} timed calls; "
          f"latency p50 at batch 1, throughput at batch {batch}; ratio > 1: A is faster")
    head = (f"{'comparison (A vs B)':<34}{'A p50 ms':>10}{'B p50 ms':>10}{'latency B/A':>13}"
            f"{'A img/s':>10}{'B img/s':>10}{'thrpt A/B':>11}")
    print(head)
    print("-" * len(head))
    for label, a, b in pairs:
        la, lb = speed[a]["latency"]["p50_ms"], speed[b]["latency"]["p50_ms"]
        ta, tb = speed[a]["throughput"]["images_per_s"], speed[b]["throughput"]["images_per_s"]
        print(f"{label:<34}{la:>10.3f}{lb:>10.3f}{lb / la:>12.2f}x{ta:>10.1f}{tb:>10.1f}{ta / tb:>10.2f}x")
    print("A/B artifacts: " + "; ".join(f"{label}: {a} vs {b}" for label, a, b in pairs))


if __name__ == "__main__":
    main()
