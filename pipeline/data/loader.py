"""DataLoader construction with the run's seed, so shuffling and augmentation are reproducible."""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.distributed import auto_workers, dist_info


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and random in each worker from torch's per-worker seed (derived from the generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, train: bool, workers: int, seed: int,
                sampler: Sampler | None = None, prefetch: int | None = None) -> DataLoader:
    """A loader: shuffled (unless a sampler is given) and ``drop_last`` for training, ordered for eval.

    ``drop_last`` keeps BatchNorm away from a final tiny batch, but is skipped when the
    dataset holds no more than one batch, where it would leave an epoch with nothing in it.
    ``workers=-1``: one per CPU core of this process's share of the node, at most 8;
    ``prefetch``: batches loaded ahead per worker (None: torch's default).
    """
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    n = len(sampler) if sampler is not None else len(dataset)
    workers = auto_workers(dist_info().local_world_size) if workers == -1 else int(workers or 0)
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=bool(train) and sampler is None,
        sampler=sampler,
        num_workers=workers,
        generator=generator,
        drop_last=bool(train) and n > int(batch_size),
        persistent_workers=workers > 0,
        prefetch_factor=prefetch if workers > 0 and prefetch else None,
        worker_init_fn=_seed_worker if workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
    )
