"""Run stages: cache keys, skipping fresh stages, atomic commits, timing and failure handling.

Every stage goes through :func:`run_stage`, so each gets the same logging, timing, manifest,
lock and error handling (the role of ultralytics' export decorator). Stage modules stay
small: ``stages/<name>.py`` defines ``run(ctx) -> StageResult`` and nothing else is needed.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from pipeline import __version__
from pipeline.artifacts import ArtifactError, Manifest, RunStore, package_versions, write_json_atomic
from pipeline.config import slice_hash, write_run_config
from pipeline.console import held_warnings, tame_libraries
from pipeline.registry import StageSpec, names, spec
from pipeline.registry import file as output_file

if TYPE_CHECKING:  # torch stays out of the CLI's imports
    from torch import nn

log = logging.getLogger("pipeline")


class StageError(RuntimeError):
    """A stage could not do its job (bad input, failed check); the message says what to do."""


class GateFailed(RuntimeError):
    """A quality gate failed; the stage's outputs (e.g. the report) were still written."""


@dataclass
class StageResult:
    metrics: dict[str, Any] = field(default_factory=dict)
    status: str = "done"  # or "skipped" with a reason (e.g. TensorRT absent)
    reason: str = ""
    failed_gates: list[str] = field(default_factory=list)


@dataclass
class StageContext:
    cfg: dict[str, Any]
    spec: StageSpec
    out: Path  # the partial folder: write every output here
    inputs: dict[str, Path]  # finished upstream stage folders
    store: RunStore
    device: str
    log: logging.Logger
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def output(self, role: str, **values: Any) -> Path:
        """Where this stage writes its declared output ``role`` (pipeline/registry.py), in the partial folder."""
        return self.out / output_file(self.spec.name, role, **values)

    def input(self, stage: str, role: str, **values: Any) -> Path:
        """The declared output ``role`` of the finished upstream ``stage`` (``ctx.input("unroll", "float")``)."""
        return self.inputs[stage] / output_file(stage, role, **values)

    def load_upstream_model(self, stage: str, file: str) -> tuple[nn.Module, dict[str, Any]]:
        """The common start of a fine-tuning stage: fix threads and seed, then load ``<stage>/<file>``
        onto the stage's device -> (model, checkpoint); a damaged or foreign checkpoint becomes a
        StageError that names it."""
        # imported here, not at the top: they load torch, and this module serves the torch-free CLI
        import torch

        from pipeline.checkpoint import CheckpointError, load_model
        from pipeline.training.loop import seed_everything

        if self.cfg["train"]["threads"]:
            torch.set_num_threads(self.cfg["train"]["threads"])
        seed_everything(self.cfg["seed"])
        try:
            model, ckpt = load_model(self.inputs[stage] / file)
        except CheckpointError as exc:
            raise StageError(str(exc)) from exc
        return model.to(self.device), ckpt


def run_store(cfg: Mapping[str, Any]) -> RunStore:
    root = Path(cfg["artifacts_dir"])
    if not root.is_absolute():
        root = Path.cwd() / root
    return RunStore(root, cfg["name"])


def resolve_device(cfg: Mapping[str, Any]) -> str:
    """``cpu``, ``cuda`` or, under torchrun, ``cuda:LOCAL_RANK``; a GPU that torch cannot use is an
    error, never a silent CPU run (see :func:`pipeline.distributed.resolve_device`)."""
    from pipeline.distributed import DeviceError, resolve_device as _resolve

    try:
        return _resolve(cfg["device"])
    except DeviceError as exc:
        raise StageError(str(exc)) from exc


def stage_key(cfg: Mapping[str, Any], s: StageSpec, store: RunStore) -> str:
    """Config slice hash + upstream keys + pipeline version: a change anywhere upstream changes
    every key below it; bump ``pipeline.__version__`` when a code change alters results."""
    parts = [s.name, __version__, slice_hash(cfg, s.config_keys)]
    for up in s.needs:
        parts.append(f"{up}={stage_key(cfg, spec(up), store)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def stage_states(cfg: Mapping[str, Any]) -> list[tuple[str, str, str, Manifest | None]]:
    """(stage, state, key, manifest) for every stage, in order."""
    store = run_store(cfg)
    rows = []
    for name in names():  # called, not imported: a stage registered later (plugin, test) shows too
        s = spec(name)
        key = stage_key(cfg, s, store)
        rows.append((name, store.state(name, key), key, store.manifest(name)))
    return rows


def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier(world_size: int) -> None:
    if world_size > 1:
        from pipeline.distributed import barrier

        barrier()


def _init_distributed(world_size: int, device: str, s: StageSpec | None = None) -> None:
    """Refuse a multi-process run of a one-process stage, then join the process group (NCCL on
    this rank's GPU, gloo on the CPU); the group is destroyed at process exit (registered there)."""
    from pipeline.distributed import DeviceError, check_stage_world, init_process_group

    if s is not None:
        try:
            check_stage_world(s.name, s.distributed, world_size)
        except DeviceError as exc:
            raise StageError(str(exc)) from exc
    init_process_group(world_size, device)


def _add_file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def run_stage(cfg: dict[str, Any], name: str, force: bool = False, locked: bool = False) -> str:
    """Run one stage unless it is fresh. Returns ``"cached"``, ``"done"`` or ``"skipped"``.

    Upstream stages must already be done (``python -m pipeline run`` runs them in order). A stage
    whose gates failed raises :class:`GateFailed` now and on every later call with the same key
    (the recorded verdict is repeated, not re-measured) until the config changes or ``force``.
    """
    s = spec(name)
    store = run_store(cfg)
    rank, world = _dist_info()
    key = stage_key(cfg, s, store)
    state = store.state(name, key)
    if state == "done" and not force:
        log.info("[%s] up to date (key %s): nothing to do", name, key)
        return "cached"
    if state == "failed" and not force:  # the verdict stands until the config (the key) changes
        man = store.manifest(name)
        raise GateFailed(_gate_message(name, man.failed_gates if man else [], store)
                         + f"; recorded {man.finished_at if man else '?'} for this exact config and not "
                           f"re-measured: fix the cause and change the config, or re-measure with --force")
    if state == "stale" and store.manifest(name) is not None:
        bad = store.verify(name)
        why = f"outputs changed on disk: {', '.join(bad)}" if bad else "its inputs or config changed"
        log.info("[%s] stale (%s): re-running", name, why)
    inputs = {}
    for up in s.needs:
        up_key = stage_key(cfg, spec(up), store)
        up_state = store.state(up, up_key)
        if up_state != "done":
            raise StageError(
                f"stage '{name}' needs '{up}', which is {up_state} for config '{cfg['name']}'; "
                f"run it first: python -m pipeline.stage {up} --config {cfg.get('_source', 'F')} "
                f"(or run everything: python -m pipeline run --config {cfg.get('_source', 'F')})"
            )
        inputs[up] = store.stage_dir(up)

    if locked or rank != 0:
        return _execute(cfg, s, store, key, inputs, rank, world)
    with store.lock():
        return _execute(cfg, s, store, key, inputs, rank, world)


def _execute(cfg: dict[str, Any], s: StageSpec, store: RunStore, key: str, inputs: dict[str, Path],
             rank: int, world: int) -> str:
    device = resolve_device(cfg)
    _init_distributed(world, device, s)
    fresh = not store.partial_dir(s.name).exists()  # this call made it: remove it again if it holds only scratch
    if rank == 0:
        part = store.open_partial(s.name, key)
    _barrier(world)
    part = store.partial_dir(s.name)
    handler = _add_file_log(part / ("stage.log" if rank == 0 else f".stage.rank{rank}.log"))
    ctx = StageContext(cfg=cfg, spec=s, out=part, inputs=inputs, store=store, device=device,
                       log=logging.getLogger(f"pipeline.{s.name}"), rank=rank, world_size=world)
    start, warned = time.perf_counter(), held_warnings()
    log.info("[%s] running (key %s, device %s) -> %s", s.name, key, device, store.stage_dir(s.name))
    finished = False
    try:
        module = importlib.import_module(s.module)
        tame_libraries()  # the stage's imports (torch, nncf) installed their own console handlers
        result: StageResult = module.run(ctx)
        finished = True
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        if not finished and rank == 0 and fresh:
            _discard_scratch(part)
    wall = time.perf_counter() - start
    _barrier(world)
    if rank != 0:
        return result.status
    man = Manifest(
        stage=s.name, key=key, status="failed" if result.failed_gates else result.status, reason=result.reason,
        failed_gates=list(result.failed_gates),
        upstream={up: (store.manifest(up).key if store.manifest(up) else "") for up in s.needs},
        config_hash=slice_hash(cfg, s.config_keys), metrics=result.metrics,
        packages=package_versions(), device=_device_name(device), wall_time_s=round(wall, 3),
    )
    man.metrics.setdefault("pipeline_version", __version__)
    write_json_atomic(part / "metrics.json", result.metrics)
    store.commit(s.name, man)
    write_run_config(cfg, store.root, s.name)
    if result.status == "skipped":
        log.warning("[%s] skipped: %s", s.name, result.reason)
    else:
        warned = held_warnings() - warned
        log.info("[%s] done in %.1f s%s", s.name, wall,
                 f" ({warned} library warning(s): see its stage.log)" if warned else "")
    if result.failed_gates:
        raise GateFailed(_gate_message(s.name, result.failed_gates, store))
    return result.status


SCRATCH_FILES = (".key", "stage.log")


def _discard_scratch(part: Path) -> None:
    """Remove a failed stage's partial folder when it holds nothing to resume from (only its key
    and log: e.g. the data was missing), so a failed call leaves nothing behind. Checkpoints keep it."""
    try:
        entries = list(part.iterdir())
    except FileNotFoundError:
        return
    if all(p.is_file() and (p.name in SCRATCH_FILES or p.name.startswith(".stage.rank")) for p in entries):
        shutil.rmtree(part, ignore_errors=True)


def _gate_message(stage: str, failed: list[str], store: RunStore) -> str:
    return f"[{stage}] gates failed: " + "; ".join(failed) + f" (see {store.stage_dir(stage)})"


def _device_name(device: str) -> str:
    import platform

    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index
        return f"cuda:{torch.cuda.get_device_name(torch.cuda.current_device() if index is None else index)}"
    return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}"


def run_all(cfg: dict[str, Any], force: Iterable[str] = (), until: str | None = None,
            progress: Callable[[str, str], None] | None = None) -> dict[str, str]:
    """Run every stage in order under one lock; fresh stages are skipped."""
    outcomes: dict[str, str] = {}
    store = run_store(cfg)
    force = set(force)
    with store.lock():
        for name in names():
            outcome = run_stage(cfg, name, force=name in force or "all" in force, locked=True)
            outcomes[name] = outcome
            if progress:
                progress(name, outcome)
            if until and name == until:
                break
    return outcomes


def clean(cfg: Mapping[str, Any], stages: Iterable[str] | None = None) -> list[str]:
    store = run_store(cfg)
    removed = []
    with store.lock():
        for name in stages or names():
            if store.stage_dir(name).exists() or store.partial_dir(name).exists():
                store.remove(name)
                removed.append(name)
    return removed


__all__ = ["StageContext", "StageResult", "StageError", "GateFailed", "ArtifactError", "run_stage",
           "run_all", "stage_states", "stage_key", "clean", "run_store", "resolve_device"]
