"""The artifact store: one folder per run, one sub-folder per stage, each with a manifest.

Why this shape: a stage is only visible once complete (it writes into ``<stage>.partial`` and
renames), so a crash never leaves a half artifact that a later stage would trust; the
manifest's key (config slice + upstream keys + the digest of the bytes each upstream stage
wrote) decides whether a stage must re-run; the
sha256 of every output detects files edited or corrupted after the fact.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
PARTIAL_SUFFIX = ".partial"
# names of temporary files and folders a killed or failed write leaves (``.x.tmp-PID``, ``x.tmp``,
# ``x.tmpPID``, and the ``probe-*`` scratch folders export kept in its partial folder before 0.x)
TEMPORARY = re.compile(r"\.tmp(-?\d+)?$|\.tmp-|^probe-")
TRACKED_PACKAGES = ("torch", "torchvision", "onnx", "onnxruntime", "nncf", "tonic", "tensorrt", "numpy")


class ArtifactError(RuntimeError):
    """A problem with stored artifacts (missing upstream, lock held); the message says what to do."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    out["python"] = platform.python_version()
    return out


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half file behind
        raise


@dataclass
class Manifest:
    stage: str
    key: str
    status: str  # "done", "skipped" (e.g. no TensorRT here: the reason says why) or "failed" (gates failed)
    outputs: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    upstream: dict[str, str] = field(default_factory=dict)  # stage -> its key when this stage ran
    inputs: dict[str, str] = field(default_factory=dict)  # stage -> digest of the bytes read from it (runner.upstream_digest)
    config_hash: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    packages: dict[str, str] = field(default_factory=dict)
    device: str = ""
    wall_time_s: float = 0.0
    finished_at: str = ""
    failed_gates: list[str] = field(default_factory=list)  # a failed verdict, repeated until the key changes
    version: int = MANIFEST_VERSION

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        data = json.loads(path.read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def save(self, folder: Path) -> None:
        write_json_atomic(folder / MANIFEST, self.__dict__)


def hash_outputs(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` except the manifest and hidden scratch files."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            out[str(p.relative_to(folder))] = sha256_file(p)
    return out


class RunStore:
    """``<artifacts_dir>/<run name>/``: stage folders, their manifests and the run lock."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = Path(root) / name
        self.name = name

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def partial_dir(self, stage: str) -> Path:
        return self.root / f"{stage}{PARTIAL_SUFFIX}"

    def scratch_dir(self, stage: str) -> Path:
        """Where a stage's scratch goes (probe graphs, temporary files): beside its folders, never in the
        folder that gets committed, so a killed run's scratch cannot end up in a finished stage."""
        return self.root / f".{stage}.scratch"

    def leftovers(self, stage: str, key: str | None = None) -> list[Path]:
        """What killed runs of ``stage`` left: its scratch folder, old folders a commit was swapping out,
        temporary files in its partial folder, and a partial folder beside a finished stage of the same
        key (a killed ``--force``). The next run of the stage removes them; ``status`` shows them."""
        found = [p for p in (self.scratch_dir(stage), *self.root.glob(f".{stage}.old-*")) if p.exists()]
        part = self.partial_dir(stage)
        if part.is_dir():
            man = self.manifest(stage)
            if key is not None and man is not None and man.key == key and man.status != "failed":
                found.append(part)
            else:
                found += [p for p in part.rglob("*") if TEMPORARY.search(p.name)]
        return found

    def manifest(self, stage: str) -> Manifest | None:
        path = self.stage_dir(stage) / MANIFEST
        if not path.is_file():
            return None
        try:
            return Manifest.load(path)
        except (json.JSONDecodeError, TypeError):
            return None

    def verify(self, stage: str) -> list[str]:
        """Outputs of a finished stage whose sha256 no longer matches (or that vanished)."""
        man = self.manifest(stage)
        if man is None:
            return ["manifest.json"]
        folder = self.stage_dir(stage)
        bad = []
        for rel, digest in man.outputs.items():
            p = folder / rel
            if not p.is_file() or sha256_file(p) != digest:
                bad.append(rel)
        return bad

    def state(self, stage: str, key: str) -> str:
        """``done`` (fresh), ``failed`` (fresh, but its gates failed: the verdict stands until the
        key changes), ``stale`` (key changed or outputs corrupted) or ``missing``."""
        man = self.manifest(stage)
        if man is None:
            return "missing"
        if man.key != key or self.verify(stage):
            return "stale"
        return "failed" if man.status == "failed" else "done"

    def open_partial(self, stage: str, key: str) -> Path:
        """A scratch folder for a stage run; kept across crashes so training can resume.

        It is reused only when it was made for the same key; otherwise it is wiped.
        """
        part = self.partial_dir(stage)
        key_file = part / ".key"
        if part.exists() and not (key_file.is_file() and key_file.read_text() == key):
            shutil.rmtree(part)
        part.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key)
        return part

    def commit(self, stage: str, manifest: Manifest) -> Path:
        """Hash the partial folder's outputs, write its manifest, and swap it in atomically."""
        part = self.partial_dir(stage)
        manifest.outputs = hash_outputs(part)
        manifest.finished_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        manifest.save(part)
        final = self.stage_dir(stage)
        if final.exists():
            trash = self.root / f".{stage}.old-{os.getpid()}"
            os.replace(final, trash)
            os.replace(part, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(part, final)
        return final

    def remove(self, stage: str) -> None:
        for p in (self.stage_dir(stage), self.partial_dir(stage), self.scratch_dir(stage)):
            if p.exists():
                shutil.rmtree(p)

    def sweep(self, stage: str, key: str | None = None) -> list[Path]:
        """Remove :meth:`leftovers` (call it holding the run lock); returns what was removed."""
        return remove_paths(self.leftovers(stage, key))

    def lock(self) -> "RunLock":
        return RunLock(self.root / ".lock", self.name)

    def lock_holder(self) -> int | None:
        """The pid of a live process holding this run's lock (a run in progress), else None."""
        return RunLock(self.root / ".lock", self.name).holder()


class RunLock:
    """An exclusive, non-blocking lock per run folder (flock: released if the process dies).

    The lock file exists only while held: it is unlinked (still locked) on release, and a run
    folder this lock created is removed again if nothing else was written into it, so a call
    that fails early leaves nothing behind. A process that locked a file unlinked meanwhile
    retries on the new one, so two holders can never coexist.
    """

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        self._fd: int | None = None
        self._made: list[Path] = []  # folders this lock created, innermost first

    def __enter__(self) -> "RunLock":
        self._made = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                self._remove_made()
                raise ArtifactError(
                    f"another pipeline run of config '{self.name}' is in progress (pid {holder}); "
                    f"wait for it to finish, or stop it: its lock is {self.path}"
                ) from None
            if self._same_file(fd):
                break
            os.close(fd)  # the previous holder unlinked it between our open and flock: retry
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)  # while still held: a waiting opener sees a stale inode and retries
            except FileNotFoundError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        self._remove_made()

    def _remove_made(self) -> None:
        """Remove the folders this lock created, innermost first, where they are still empty."""
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:
                break
        self._made = []

    def holder(self) -> int | None:
        """The pid written in the lock file, if that process is alive and the lock is held."""
        try:
            text = self.path.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not text.isdigit():
            return None
        pid = int(text)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, another user's
        return pid


def remove_paths(paths: list[Path]) -> list[Path]:
    """Delete each file or folder (a symlink as a link, never its target); returns ``paths``."""
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return paths
