"""STAA ablation at an equal budget: plain LIF, adaptive LIF, +PE, +GC, +SA, +TSRD, all STAA.

Why: STAA has to earn its cost. Every variant is trained by the pipeline's own train stage (a
subprocess of ``python -m pipeline.stage train``) on the same config and epochs, one artifacts
folder per (variant, seed) under ``--out``, so a finished variant is a cache hit (re-running the
bench resumes; an interrupted training resumes from its last epoch). The train stage evaluates its
best checkpoint on the *test* split (``test_top1``); images/s is its last epoch's training
throughput and wall s the stage's wall time (manifest ``wall_time_s``).

Variants (``model.staa.*`` and ``model.neuron.kind``, see pipeline/schema.py): "plain" = every STAA
part off, ``neuron.kind=lif``; "alif" = every part off, the default adaptive neuron; "pe", "gc",
"sa", "tsrd" = alif plus only that part; "all" = every part on with the paper's step attention
(``sa_mode=full``); "causal" = every part on with causal step attention (the form that streams);
"nosa" = every part but step attention.

``--pair A:B`` compares two variants image by image on the test split, per seed: the delta of A
minus B in points with its 95% interval (Tango's, as in the report) and the exact McNemar p-value.
SA's three forms on N-MNIST (issue 21)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/ablation.py --config configs/nmnist.yaml \\
        --variants all causal nosa --seeds 0 1 --pair causal:all --pair nosa:all --out artifacts/ablation_nmnist

The full run (about an hour on 2 CPU cores)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/ablation.py --config configs/cifar10_small.yaml \\
        --seeds 0 1 --out artifacts/ablation --json artifacts/ablation/ablation.json

A smoke run: ``--epochs 1 --variants plain all --seeds 0 --set data.limit_train=128``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.config import load_config  # noqa: E402

PARTS = ("pe", "gc", "sa", "tsrd")
OFF = [f"model.staa.{p}=false" for p in PARTS]
VARIANTS: dict[str, list[str]] = {
    "plain": OFF + ["model.neuron.kind=lif"],
    "alif": OFF + ["model.neuron.kind=alif"],
    **{p: [f"model.staa.{q}={'true' if q == p else 'false'}" for q in PARTS] + ["model.neuron.kind=alif"]
       for p in PARTS},
    "all": [f"model.staa.{p}=true" for p in PARTS] + ["model.neuron.kind=alif", "model.staa.sa_mode=full"],
    # step attention's three forms with every other part on: the paper's, the causal one that streams, none
    "causal": [f"model.staa.{p}=true" for p in PARTS] + ["model.neuron.kind=alif", "model.staa.sa_mode=causal"],
    "nosa": [f"model.staa.{p}={'false' if p == 'sa' else 'true'}" for p in PARTS] + ["model.neuron.kind=alif"],
}
LABELS = {"plain": "plain LIF", "alif": "adaptive LIF", "pe": "+PE", "gc": "+GC", "sa": "+SA", "tsrd": "+TSRD",
          "all": "all STAA", "causal": "all, causal SA", "nosa": "all, no SA"}
TARGET_POINTS = 1.0


def check_data(cfg: dict[str, Any], config_path: Path) -> None:
    """Exit with a clear message when the CIFAR npz files the config reads are absent."""
    d = cfg["data"]
    if d.get("format") != "npz":
        return
    root = Path(d.get("root") or ".")
    roots = [root] if root.is_absolute() else [Path.cwd() / root, config_path.parent / root, REPO / root]
    name = d.get("dataset", "cifar10")
    wanted = [d.get("test_file") or f"{name}_test.npz"]
    train = [d["train_file"]] if d.get("train_file") else [f"{name}_train_subset.npz", f"{name}_train.npz"]
    for r in roots:
        if (r / wanted[0]).is_file() and any((r / t).is_file() for t in train):
            return
    sys.exit(f"ablation: the {name} data is absent: looked for {wanted[0]} and one of {', '.join(train)} in "
             f"{', '.join(str(r) for r in roots)}. Put the offline copy in ../shared/data (docs/data.md) or pass "
             f"--set data.root=DIR")


def test_correct(folder: Path) -> "np.ndarray":
    """Per-image correctness of a trained variant's best checkpoint on its run's test split."""
    import numpy as np
    import torch

    from pipeline.checkpoint import load_model
    from pipeline.data import data_bundle, eval_loader
    from pipeline.training.evaluate import evaluate

    run = sorted(folder.glob("*/train/best.pt"))
    if not run:
        sys.exit(f"ablation: no train/best.pt under {folder}")
    cfg = load_config(run[0].parents[1] / "config.yaml")
    torch.manual_seed(0)
    model, _ = load_model(run[0])
    bundle = data_bundle(cfg, model.T)
    ev = evaluate(model, eval_loader(cfg, bundle.test, cfg["data"]["limit_test"]), "cpu", desc="test", progress=False)
    return np.asarray((ev["preds"] == ev["labels"]).numpy(), dtype=bool)


def compare_pairs(pairs: list[str], seeds: list[int], out: Path) -> list[str]:
    """``A:B`` -> one line per seed: A minus B on the same test images, with interval and p-value."""
    from pipeline.report.stats import paired_delta

    lines = []
    for pair in pairs:
        a, _, b = pair.partition(":")
        for s in seeds:
            d = paired_delta(test_correct(out / a / f"seed{s}"), test_correct(out / b / f"seed{s}"))
            lines.append(f"  {LABELS[a]} - {LABELS[b]}, seed {s}: {d.describe()} "
                         f"(only A right {d.only_row}, only B right {d.only_reference}, n={d.n})")
    return lines


def train_variant(config: Path, variant: str, seed: int, out: Path, epochs: int | None, extra: list[str]) -> Path:
    """Run (or reuse) the train stage for one (variant, seed); return its artifacts folder."""
    folder = out / variant / f"seed{seed}"
    sets = [f"artifacts_dir={folder}", f"seed={seed}", *VARIANTS[variant], *extra]
    if epochs is not None:
        sets.append(f"train.epochs={epochs}")
    cmd = [sys.executable, "-m", "pipeline.stage", "train", "--config", str(config)]
    for s in sets:
        cmd += ["--set", s]
    print(f"[{LABELS[variant]}, seed {seed}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        sys.exit(f"ablation: training {variant} (seed {seed}) failed with exit code {proc.returncode}; "
                 f"its log is under {folder}. Fix it and re-run: finished variants are reused")
    print(f"[{LABELS[variant]}, seed {seed}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def read_result(folder: Path) -> dict[str, Any]:
    """Test top-1, images/s, wall s and the per-epoch history from the train stage's manifest."""
    found = sorted(folder.glob("*/train/manifest.json"))
    if not found:
        sys.exit(f"ablation: no train manifest under {folder}")
    man = json.loads(found[0].read_text())
    m = man.get("metrics", {})
    return {"test_top1": m.get("test_top1"), "images_per_s": m.get("images_per_s"),
            "wall_s": man.get("wall_time_s"), "epochs": m.get("epochs"),
            "history": [{k: row.get(k) for k in ("epoch_s", "val_top1", "images_per_s")} for row in m.get("history", [])]}


def at_wall_time(history: list[dict[str, Any]], budget_s: float) -> tuple[float | None, int]:
    """Val top-1 at the last epoch whose cumulative training time is within ``budget_s`` (and that epoch)."""
    total, best, epoch = 0.0, None, 0
    for i, row in enumerate(history, start=1):
        total += row.get("epoch_s") or 0.0
        if total > budget_s * 1.0001:
            break
        if row.get("val_top1") is not None:
            best, epoch = row["val_top1"], i
    return best, epoch


def summarise(results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    rows = {}
    for v, per_seed in results.items():
        tops = [r["test_top1"] for r in per_seed.values() if r["test_top1"] is not None]
        rows[v] = {"top1": {s: r["test_top1"] for s, r in per_seed.items()},
                   "mean": statistics.fmean(tops) if tops else None,
                   "spread": (max(tops) - min(tops)) if len(tops) > 1 else 0.0,
                   "images_per_s": statistics.fmean(r["images_per_s"] for r in per_seed.values()
                                                    if r["images_per_s"] is not None),
                   "wall_s": statistics.fmean(r["wall_s"] for r in per_seed.values() if r["wall_s"] is not None)}
    return rows


def print_table(rows: dict[str, Any], seeds: list[int]) -> None:
    head = "".join(f"{'seed ' + str(s):>9}" for s in seeds)
    print(f"\n{'variant':<14}{head}{'mean':>8}{'spread':>8}{'images/s':>10}{'wall s':>9}")
    for v, r in rows.items():
        tops = "".join(f"{r['top1'].get(s, float('nan')):>9.2f}" for s in seeds)
        print(f"{LABELS[v]:<14}{tops}{r['mean']:>8.2f}{r['spread']:>8.2f}{r['images_per_s']:>10.1f}{r['wall_s']:>9.0f}")


def verdict(rows: dict[str, Any]) -> str | None:
    if "all" not in rows or "plain" not in rows:
        return None
    d = rows["all"]["mean"] - rows["plain"]["mean"]
    ok = "reached" if d >= TARGET_POINTS else "NOT reached"
    return f"all-STAA mean - plain-LIF mean = {d:+.2f} points (target >= +{TARGET_POINTS:g}): {ok}"


def equal_wall_view(results: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """Each variant's val top-1 at the epoch where its cumulative training time reaches plain LIF's total."""
    if "plain" not in results:
        return ["equal wall time: needs the plain variant"]
    lines = ["equal wall time (val top-1, not test: the train stage evaluates only the best checkpoint on test; "
             "budget = plain LIF's total training seconds for the same seed):"]
    for v, per_seed in results.items():
        parts = []
        for s, r in per_seed.items():
            plain = results["plain"].get(s)
            if plain is None or not plain["history"] or not r["history"]:
                parts.append(f"seed {s}: no per-epoch history")
                continue
            budget = sum(row.get("epoch_s") or 0.0 for row in plain["history"])
            top, epoch = at_wall_time(r["history"], budget)
            parts.append(f"seed {s}: {top:.2f} at epoch {epoch}/{len(r['history'])}" if top is not None
                         else f"seed {s}: not one epoch within {budget:.0f} s")
        lines.append(f"  {LABELS[v]:<14}" + "; ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "cifar10_small.yaml")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS),
                    help=f"any of {', '.join(VARIANTS)} (space- or comma-separated)")
    ap.add_argument("--seeds", nargs="+", default=["0", "1"], help="space- or comma-separated")
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs for every variant (default: the config's)")
    ap.add_argument("--out", type=Path, default=REPO / "artifacts" / "ablation", help="one artifacts dir per variant")
    ap.add_argument("--json", type=Path, default=None, help="write every number here")
    ap.add_argument("--pair", dest="pairs", action="append", default=[], metavar="A:B",
                    help="paired test-split delta of variant A minus variant B per seed (e.g. causal:all)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to every training run (e.g. data.limit_train=128)")
    args = ap.parse_args(argv)
    variants = [v for item in args.variants for v in item.split(",") if v]
    seeds = [int(s) for item in args.seeds for s in item.split(",") if s]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"ablation: unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    unpaired = [p for p in args.pairs if len(p.split(":")) != 2 or not set(p.split(":")) <= set(variants)]
    if unpaired:
        sys.exit(f"ablation: --pair {', '.join(unpaired)}: give A:B with both among --variants ({', '.join(variants)})")
    cfg = load_config(args.config, args.sets)
    check_data(cfg, args.config)
    out = args.out.resolve()

    results: dict[str, dict[int, dict[str, Any]]] = {}
    for v in variants:
        for s in seeds:
            results.setdefault(v, {})[s] = read_result(train_variant(args.config, v, s, out, args.epochs, args.sets))
    rows = summarise(results)
    epochs = args.epochs if args.epochs is not None else cfg["train"]["epochs"]
    print(f"\nSTAA ablation on {args.config.name}, {epochs} epochs each, seeds {', '.join(map(str, seeds))}; "
          f"test top-1 (%) of the best checkpoint; images/s of the last training epoch")
    print_table(rows, seeds)
    line = verdict(rows)
    print("\n" + (line or "verdict: needs both the plain and the all variant"))
    wall = equal_wall_view(results)
    print("\n".join(wall))
    paired = compare_pairs(args.pairs, seeds, out) if args.pairs else []
    if paired:
        print("\npaired on the test split (A minus B, same images):\n" + "\n".join(paired))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": str(args.config), "epochs": epochs, "seeds": seeds,
                                         "sets": args.sets, "rows": rows, "runs": results, "verdict": line,
                                         "equal_wall_time": wall, "paired": paired}, indent=2, default=str))


if __name__ == "__main__":
    main()
