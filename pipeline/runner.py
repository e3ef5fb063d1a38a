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
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from pipeline import __version__
from pipeline.artifacts import (TEMPORARY, ArtifactError, Manifest, RunStore, package_versions, remove_paths,
                                write_json_atomic)
from pipeline.config import ConfigError, slice_hash, write_run_config
from pipeline.console import held_warnings, tame_libraries
from pipeline.disk import folder_bytes, free_bytes, megabytes, write_failure
from pipeline.registry import StageSpec, names, spec
from pipeline.registry import file as output_file

if TYPE_CHECKING:  # torch stays out of the CLI's imports
    from torch import nn

log = logging.getLogger("pipeline")


class StageError(RuntimeError):
    """A stage could not do its job (bad input, failed check); the message says what to do."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a stage; the message says what was kept and how to resume."""


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

    @property
    def scratch(self) -> Path:
        """A scratch folder outside the committed one (probe graphs, temporary files); the runner
        removes it after the stage, and a killed run's on the next run."""
        folder = (self.store.scratch_dir(self.spec.name) if self.store is not None
                  else self.out.parent / f".{self.spec.name}.scratch")  # a context built without a store (tests)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def output(self, role: str, **values: Any) -> Path:
        """Where this stage writes its declared output ``role`` (pipeline/registry.py), in the partial folder."""
        return self.out / output_file(self.spec.name, role, **values)

    def _resolve(self, name: str) -> tuple[str, str]:
        """Input ``name`` of this stage's row -> (stage, role); KeyError for an input the row does not declare."""
        stage, _, role = self.spec.reference(name).partition(".")
        if role == "*":
            raise KeyError(f"input {name!r} of stage {self.spec.name!r} is the whole folder of {stage!r}: "
                           f"use ctx.inputs[{stage!r}], or name one output ({stage}.<role>)")
        return stage, role

    def input(self, name: str, **values: Any) -> Path:
        """The file of the declared input ``name`` (its row says ``"name=stage.role"``, so which upstream
        output that is lives in pipeline/registry.py): ``ctx.input("model")`` -> ``reduce_t/chosen.pt``.
        An input the row does not declare is refused (KeyError): a stage reads what its row says."""
        stage, role = self._resolve(name)
        return self.inputs[stage] / output_file(stage, role, **values)

    def input_artifact(self, name: str, **values: Any) -> str:
        """The declared input's name in reports and metrics: ``<stage>/<file>`` (``qat/qat.pt``)."""
        stage, role = self._resolve(name)
        return f"{stage}/{output_file(stage, role, **values)}"

    def checkpoints(self, folder: Path | None = None):
        """Where a fit keeps its checkpoints (``pipeline.training.loop.Checkpoints``): the train stage's
        ``best``/``last`` names, in ``folder`` (default: this stage's folder). Fine-tunes use the same
        names so that a write failure keeps their resume state (:func:`_drop_after_write_failure`)."""
        from pipeline.training.loop import Checkpoints  # torch: not at the top (the CLI imports this module)

        return Checkpoints(self.out if folder is None else Path(folder), output_file("train", "best"),
                           output_file("train", "last"))

    def load_upstream_model(self, name: str) -> tuple[nn.Module, dict[str, Any]]:
        """The common start of a fine-tuning stage: fix threads and seed, then load the checkpoint of
        the declared input ``name`` onto the stage's device -> (model, checkpoint); a damaged or foreign
        checkpoint becomes a StageError that names it."""
        # imported here, not at the top: they load torch, and this module serves the torch-free CLI
        import torch

        from pipeline.checkpoint import CheckpointError, load_model
        from pipeline.training.loop import seed_everything

        if self.cfg["train"]["threads"]:
            torch.set_num_threads(self.cfg["train"]["threads"])
        seed_everything(self.cfg["seed"])
        try:
            model, ckpt = load_model(self.input(name))
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
    from pipeline.distributed import DeviceError, DeviceNotHere, resolve_device as _resolve

    try:
        return _resolve(cfg["device"])
    except DeviceNotHere as exc:  # the config asks for what this machine lacks: exit 2, like any config error
        raise ConfigError(str(exc)) from exc
    except DeviceError as exc:
        raise StageError(str(exc)) from exc


# What a stage writes about its run rather than for later stages: timings, logs, resume state. They
# differ on every run, so they are left out of the upstream digest; everything else is content.
RECORD_KINDS = ("metrics", "log", "training_state")
RECORD_FILES = ("stage.log", "metrics.json")  # the runner writes both for every stage


def is_record(stage: str, rel: str) -> bool:
    """True for an output of ``stage`` that records the run (a log, timings, resume state), not content."""
    if rel in RECORD_FILES:
        return True
    for o in spec(stage).outputs:
        if o.kind in RECORD_KINDS and (rel.startswith(o.file) if o.file.endswith("/") else o.match(rel) is not None):
            return True
    return False


def command_for(cfg: Mapping[str, Any], head: str, *extra: str) -> str:
    """``head --config F --set K=V ...``: a command for this very run. Why the overrides: without them
    (another artifacts_dir, epochs, ...) the command would address another run folder."""
    parts = [head, "--config", shlex.quote(str(cfg.get("_source", "F")))]
    for item in cfg.get("_overrides", ()):
        parts += ["--set", shlex.quote(item)]
    return " ".join([*parts, *extra])


def upstream_digest(store: RunStore, stage: str) -> str:
    """sha256 over the path and sha256 of every content output in ``stage``'s manifest ("none" without
    one): what a stage built from it read, so other bytes upstream mean another key downstream."""
    man = store.manifest(stage)
    if man is None:
        return "none"
    rows = sorted(f"{rel}={digest}" for rel, digest in man.outputs.items() if not is_record(stage, rel))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def stage_key(cfg: Mapping[str, Any], s: StageSpec, store: RunStore) -> str:
    """Config slice hash + pipeline version + for each upstream stage its key and the digest of the bytes
    it produced (:func:`upstream_digest`): a config change upstream, or an upstream re-run that wrote
    other bytes, changes every key below it; bump ``pipeline.__version__`` when a code change alters results."""
    parts = [s.name, __version__, slice_hash(cfg, s.config_keys)]
    for up in s.needs:
        parts.append(f"{up}={stage_key(cfg, spec(up), store)}")
        parts.append(f"{up}#={upstream_digest(store, up)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def stale_reasons(cfg: Mapping[str, Any], name: str, store: RunStore | None = None) -> list[str]:
    """Why ``name`` is not fresh, in words (empty when it is, or when it never ran): its config slice
    changed, an upstream stage wrote other bytes or changed, its own outputs changed on disk."""
    store = store or run_store(cfg)
    s, man = spec(name), store.manifest(name)
    if man is None:
        return []
    why = []
    if man.key != stage_key(cfg, s, store):
        if man.config_hash != slice_hash(cfg, s.config_keys):
            why.append("config changed (" + ", ".join(s.config_keys) + ")")
        if s.needs and not man.inputs:
            why.append("made by an older pipeline (its key lacks the upstream bytes)")
        for up in s.needs if man.inputs else ():
            if man.inputs.get(up) != upstream_digest(store, up):
                why.append(f"upstream '{up}' wrote other bytes")
            elif man.upstream.get(up) != stage_key(cfg, spec(up), store):
                up_why = stale_reasons(cfg, up, store)
                why.append(f"upstream '{up}' changed" + (f" ({up_why[0]})" if up_why else ""))
        if not why and man.metrics.get("pipeline_version") != __version__:
            why.append(f"pipeline version changed ({man.metrics.get('pipeline_version')} -> {__version__})")
        if not why:
            why.append("its key changed")
    bad = store.verify(name)
    if bad:
        why.append("own outputs changed on disk: " + ", ".join(bad))
    return why


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

    Upstream stages must already be done (``python -m pipeline run`` runs them in order); ``force``
    re-runs it from scratch, discarding a kept partial run (a resumable one too). A stage
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
        if rank == 0:
            _sweep_locked(store, name, key, locked)
        return "cached"
    if state == "failed" and not force:  # the verdict stands until the config (the key) changes
        man = store.manifest(name)
        raise GateFailed(_gate_message(name, man.failed_gates if man else [], store)
                         + f"; recorded {man.finished_at if man else '?'} for this exact config and not "
                           f"re-measured: fix the cause and change the config, or re-measure with --force")
    if state == "stale" and store.manifest(name) is not None:
        why = "; ".join(stale_reasons(cfg, name, store)) or "its key changed"
        log.info("[%s] stale (%s): re-running", name, why)
    inputs = {}
    for up in s.needs:
        up_key = stage_key(cfg, spec(up), store)
        up_state = store.state(up, up_key)
        if up_state != "done":
            raise StageError(
                f"stage '{name}' needs '{up}', which is {up_state} for config '{cfg['name']}'; "
                f"run it first: {command_for(cfg, f'python -m pipeline.stage {up}')} "
                f"(or run everything: {command_for(cfg, 'python -m pipeline run')})"
            )
        inputs[up] = store.stage_dir(up)

    if locked or rank != 0:
        return _execute(cfg, s, store, key, inputs, rank, world, force)
    with store.lock():
        return _execute(cfg, s, store, key, inputs, rank, world, force)


def _execute(cfg: dict[str, Any], s: StageSpec, store: RunStore, key: str, inputs: dict[str, Path],
             rank: int, world: int, force: bool = False) -> str:
    device = resolve_device(cfg)
    _init_distributed(world, device, s)
    if force and rank == 0 and store.partial_dir(s.name).exists():  # --force: from scratch, no resume
        log.info("[%s] --force: discarding the partial run in %s", s.name, store.partial_dir(s.name))
        shutil.rmtree(store.partial_dir(s.name))
    if rank == 0:
        for p in store.sweep(s.name):  # a killed run's scratch and temporary files
            log.info("[%s] removed %s, left by a killed run", s.name, p)
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
        try:
            result: StageResult = module.run(ctx)
        except KeyboardInterrupt:
            if rank != 0:
                raise
            if _only_scratch(part) and fresh:
                kept = "it had nothing to resume from yet, so nothing of it is kept"
            else:
                kept = (f"its partial run is kept in {part}: the same command resumes it "
                        f"({command_for(cfg, f'python -m pipeline.stage {s.name}')}; --force starts afresh)")
            raise Interrupted(f"[{s.name}] interrupted (Ctrl-C); finished stages are kept; {kept}") from None
        except Exception as exc:
            if type(exc).__name__ == "ResumeFailed":  # pipeline.training.loop's: not imported here (torch)
                raise StageError(f"[{s.name}] {exc}; start the stage afresh, discarding the partial run in {part}: "
                                 f"{command_for(cfg, f'python -m pipeline.stage {s.name}', '--force')}") from exc
            _raise_if_write_failed(exc, cfg, s.name, part, rank)
            raise
        finished = True
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        if rank == 0:
            shutil.rmtree(store.scratch_dir(s.name), ignore_errors=True)
        if not finished and rank == 0 and fresh:
            _discard_scratch(part)
    wall = time.perf_counter() - start
    _barrier(world)
    if rank != 0:
        return result.status
    man = Manifest(
        stage=s.name, key=key, status="failed" if result.failed_gates else result.status, reason=result.reason,
        failed_gates=list(result.failed_gates),
        upstream={up: stage_key(cfg, spec(up), store) for up in s.needs},
        inputs={up: upstream_digest(store, up) for up in s.needs},
        config_hash=slice_hash(cfg, s.config_keys), metrics=result.metrics,
        packages=package_versions(), device=_device_name(device), wall_time_s=round(wall, 3),
    )
    man.metrics.setdefault("pipeline_version", __version__)
    try:
        write_json_atomic(part / "metrics.json", result.metrics)
        store.commit(s.name, man)
        write_run_config(cfg, store.root, s.name)
    except Exception as exc:
        _raise_if_write_failed(exc, cfg, s.name, part, rank)
        raise
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
    if _only_scratch(part):
        shutil.rmtree(part, ignore_errors=True)


def _only_scratch(part: Path) -> bool:
    """True when ``part`` holds nothing but its key and logs (or is gone): nothing to resume from."""
    try:
        entries = list(part.iterdir())
    except FileNotFoundError:
        return True
    return all(p.is_file() and (p.name in SCRATCH_FILES or p.name.startswith(".stage.rank")) for p in entries)


def _sweep_locked(store: RunStore, name: str, key: str, locked: bool) -> None:
    """Remove what killed runs of ``name`` left, under the run lock (no live run owns it then); when
    another run holds the lock, leave everything to it."""
    if not store.root.is_dir():
        return
    try:
        if locked:
            removed = store.sweep(name, key)
        else:
            with store.lock():
                removed = store.sweep(name, key)
    except ArtifactError:
        return
    for p in removed:
        log.info("[%s] removed %s, left by a killed run", name, p)


def _raise_if_write_failed(exc: BaseException, cfg: Mapping[str, Any], stage: str, part: Path, rank: int) -> None:
    """A failed write (disk full, quota, file-size limit) becomes one StageError naming the folder and the
    free space; temporary files go, and so does the partial folder unless it holds a run to resume."""
    failure = write_failure(exc)
    if failure is None:
        return
    written = folder_bytes(part)
    kept = rank == 0 and _drop_after_write_failure(part)
    free = free_bytes(part)
    raise StageError(
        f"[{stage}] {failure}: {megabytes(free) if free is not None else 'unknown space'} free on the disk of "
        f"{part.parent} (artifacts_dir), and the stage had written {megabytes(written)} when it failed, so it "
        f"needs more than that free; "
        + (f"its checkpoints are kept in {part} and the next run resumes from them"
           if kept else f"its partial folder {part.name} was removed")
        + f". Free space there or set artifacts_dir to a bigger disk, then run again: "
          f"{command_for(cfg, f'python -m pipeline.stage {stage}')}") from exc


def _drop_after_write_failure(part: Path) -> bool:
    """Remove temporary files below ``part``; then the whole folder, unless it holds a checkpoint to
    resume from (a training run's last.pt, written atomically). True when it is kept."""
    sweep_temporary(part)
    if part.is_dir() and any(part.rglob(output_file("train", "last"))):
        return True
    shutil.rmtree(part, ignore_errors=True)
    return False


def sweep_temporary(folder: Path) -> list[Path]:
    """Delete the temporary files and folders a killed or failed write leaves below ``folder``."""
    found = [p for p in Path(folder).rglob("*") if TEMPORARY.search(p.name)] if Path(folder).is_dir() else []
    return remove_paths(found)


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


__all__ = ["StageContext", "StageResult", "StageError", "GateFailed", "Interrupted", "ArtifactError", "run_stage",
           "run_all", "stage_states", "stage_key", "stale_reasons", "upstream_digest", "clean", "run_store", "resolve_device"]
