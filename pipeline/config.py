"""Load, merge and validate pipeline configs.

A config is YAML; it may ``extends:`` another file (path relative to itself), and ``--set
key.path=value`` overrides any value (the value is parsed as YAML). Every key is checked
against :data:`pipeline.schema.SCHEMA` before anything runs, so a typo fails in a second,
with the key path, the expected type and the closest valid key, instead of after training.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from pipeline.schema import SCHEMA, ConfigError, deep_merge, defaults, validate

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"

# ConfigError, defaults and deep_merge live in pipeline.schema (one place for defaults and merging)
# and are re-exported here, where callers have always found them.
__all__ = ["ConfigError", "DEFAULT_CONFIG", "RUN_CONFIG", "SPEED_ONLY_KEYS", "apply_overrides", "command_line",
           "deep_merge", "defaults", "get", "load_config", "parse_override", "resolved_yaml", "slice_hash",
           "write_run_config"]


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file, resolving ``extends`` (relative to the file) recursively."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass an existing file with --config)")
    if path in chain:
        raise ConfigError(f"{path}: 'extends' forms a cycle: {' -> '.join(map(str, chain + (path,)))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends: expected a file path string, got {parent!r}")
    return deep_merge(_read_yaml((path.parent / parent).resolve(), chain + (path,)), raw)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` (value as YAML, so ``2``, ``true``, ``[2, 1]`` keep their types)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. --set train.epochs=3")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from exc
    return [k for k in key.strip().split(".") if k], value


def apply_overrides(cfg: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    out = copy.deepcopy(dict(cfg))
    for item in overrides:
        keys, value = parse_override(item)
        if not keys:
            raise ConfigError(f"--set {item!r}: empty key path")
        node = out
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read ``path`` (default: configs/default.yaml), apply ``--set`` overrides, validate, fill defaults.

    The result is a plain nested dict; ``name`` is set (from the file stem when absent) and
    ``_source`` records the file and ``_overrides`` the ``--set`` items, for messages that name a command.
    """
    file = Path(path).resolve() if path else DEFAULT_CONFIG
    overrides = list(overrides)
    raw = apply_overrides(_read_yaml(file), overrides)
    checked = validate(raw, SCHEMA, "")
    cfg = deep_merge(defaults(), checked)
    if not cfg.get("name"):
        cfg["name"] = file.stem
    _check_semantics(cfg)
    cfg["_source"] = str(file)
    cfg["_overrides"] = overrides
    return cfg


def _check_semantics(cfg: Mapping[str, Any]) -> None:
    """Checks that relate two keys (one key's type, choices and bounds are the schema's job)."""
    T = cfg["model"]["T"]
    bad = [t for t in cfg["reduce_t"]["steps"] if not 1 <= t < T]
    if bad:
        raise ConfigError(f"reduce_t.steps: {bad} must be between 1 and model.T - 1 = {T - 1} (the trained T); "
                          f"fix reduce_t.steps (e.g. --set reduce_t.steps=[{T // 2 if T > 1 else ''}])")
    sizes = cfg["validate"]["batch_sizes"]
    if not sizes or any(n < 1 for n in sizes):
        raise ConfigError(f"validate.batch_sizes: {sizes} must be one or more batch sizes >= 1 "
                          f"(e.g. --set 'validate.batch_sizes=[1, 32]')")
    b = cfg["build"]
    if not b["min_batch"] <= b["opt_batch"] <= b["max_batch"]:
        raise ConfigError(f"build: need min_batch <= opt_batch <= max_batch, got {b['min_batch']}, "
                          f"{b['opt_batch']}, {b['max_batch']}")


def get(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for k in dotted.split("."):
        node = node[k]
    return node


# Settings that change how fast a stage runs, not what it computes: left out of every cache key, so
# that e.g. more DataLoader workers on a GPU box do not invalidate a partial training run.
SPEED_ONLY_KEYS: tuple[str, ...] = ("data.workers", "data.prefetch", "train.compile", "train.channels_last",
                                     "train.kernels")


def _drop_speed_only(part: dict[str, Any]) -> dict[str, Any]:
    """A copy of a ``{selected key: value}`` slice without the :data:`SPEED_ONLY_KEYS` under it."""
    out = copy.deepcopy(part)
    for dotted in SPEED_ONLY_KEYS:
        for sel in out:
            if not dotted.startswith(sel + "."):
                continue
            node = out[sel]
            *parents, leaf = dotted[len(sel) + 1:].split(".")
            for k in parents:
                node = node.get(k) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(leaf, None)
    return out


def slice_hash(cfg: Mapping[str, Any], keys: Iterable[str]) -> str:
    """sha256 of the config values a stage reads (less :data:`SPEED_ONLY_KEYS`): the part of its
    cache key that the config owns."""
    part = _drop_speed_only({k: get(cfg, k) for k in sorted(keys)})
    blob = json.dumps(part, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


RUN_CONFIG = "config.yaml"


class _Dumper(yaml.SafeDumper):
    """Block style for sections, ``[1, 32]`` for lists of scalars: reads like the shipped configs."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, (dict, list)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def resolved_yaml(cfg: Mapping[str, Any]) -> str:
    """The config as it runs (defaults, ``extends`` and ``--set`` applied), loadable with ``--config``."""
    plain = {k: v for k, v in cfg.items() if not str(k).startswith("_")}
    return yaml.dump(plain, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def command_line(argv: list[str] | None = None) -> str:
    """This process's command as a user would type it (``python -m pipeline.stage train ...``)."""
    argv = list(sys.argv if argv is None else argv)
    prog = Path(argv[0]) if argv else Path("python")
    if prog.parent.name == "pipeline" and prog.name in ("__main__.py", "stage.py"):
        head = "python -m pipeline" + (".stage" if prog.name == "stage.py" else "")
    else:
        head = prog.name
    return " ".join([head, *(shlex.quote(a) for a in argv[1:])])


def write_run_config(cfg: Mapping[str, Any], folder: Path, stage: str) -> Path:
    """Write ``folder/config.yaml``: the resolved config, with the command and time as comments.

    Why: a manifest holds only a hash of its config slice; this file says exactly what ran, and
    ``--config`` reads it back as it is.
    """
    path = Path(folder) / RUN_CONFIG
    header = (f"# resolved config of run '{cfg.get('name')}' (defaults, extends and --set applied)\n"
              f"# written when stage '{stage}' ran, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
              f"# command: {command_line()}\n"
              f"# cwd: {Path.cwd()}\n"
              f"# from: {cfg.get('_source', '?')}\n"
              f"# run it again: python -m pipeline run --config {path}\n")
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(header + resolved_yaml(cfg))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
