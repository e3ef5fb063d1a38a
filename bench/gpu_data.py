"""Copy the CIFAR-10 files part ``realdata`` of bench/gpu_check.sh reads into ``bench/data/`` (git-ignored).

Why: the GPU machine gets a copy of the working tree and reaches nothing else, so the data has to travel
with it, as a carried ignored path, and the device tool carries 64 MiB in all. The train subset goes as it
is (13.5 MiB); the test set is cut to its first ``--test-images`` rows (the file's rows are interleaved by
class, so any prefix is class-balanced: the first 2,000 are the 2,000 the part tests on), 5.4 MiB instead
of 27 MiB. Then carry ``bench/data`` (``run(..., carry=["bench/data", ...])``).

    .venv/bin/python bench/gpu_data.py                  # from ../shared/data (or --src DIR)
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TRAIN, TEST = "cifar10_train_subset.npz", "cifar10_test.npz"
KEYS = ("images", "labels", "index_in_class", "from_jpeg", "classes")


def cut_test(src: Path, dst: Path, n: int) -> int:
    """Write the first ``n`` rows of the test npz ``src`` to ``dst`` (same keys and layout); returns the rows."""
    with np.load(src, allow_pickle=False) as z:
        missing = [k for k in KEYS if k not in z.files]
        if missing:
            raise SystemExit(f"gpu_data: {src} lacks {', '.join(missing)}: not the CIFAR-10 npz layout of "
                             f"docs/data.md")
        rows = min(n, len(z["labels"]))
        arrays = {k: (z[k] if k == "classes" else z[k][:rows]) for k in z.files}
    np.savez_compressed(dst, **arrays)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--dst", type=Path, default=REPO / "bench" / "data")
    ap.add_argument("--test-images", type=int, default=2000)
    args = ap.parse_args(argv)
    for name in (TRAIN, TEST):
        if not (args.src / name).is_file():
            print(f"gpu_data: {args.src / name} is absent: pass --src DIR (a folder holding {TRAIN} and {TEST}, "
                  f"the npz layout of docs/data.md)", file=sys.stderr)
            return 2
    args.dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.src / TRAIN, args.dst / TRAIN)
    rows = cut_test(args.src / TEST, args.dst / TEST, args.test_images)
    sizes = {p.name: p.stat().st_size for p in (args.dst / TRAIN, args.dst / TEST)}
    total = sum(sizes.values()) / 2**20
    print(f"gpu_data: {args.dst}: {TRAIN} {sizes[TRAIN] / 2**20:.1f} MiB, {TEST} ({rows} images) "
          f"{sizes[TEST] / 2**20:.1f} MiB, {total:.1f} MiB in all (the device tool carries 64 MiB): "
          f"carry \"{args.dst.relative_to(REPO) if args.dst.is_relative_to(REPO) else args.dst}\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
