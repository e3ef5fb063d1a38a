"""Command-line entry points: ``python -m pipeline``, ``python -m pipeline.stage`` and ``staa-pipeline``.

Exit codes: 0 success, 1 a stage failed or a gate failed, 2 bad usage, config or data (the
message says what to fix; nothing is left behind), 130 interrupted (Ctrl-C: the message says
what was kept and how to resume).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

import click
import yaml

from pipeline import __version__, registry
from pipeline.artifacts import ArtifactError, Manifest
from pipeline.config import DEFAULT_CONFIG, ConfigError, load_config, resolved_yaml
from pipeline.console import setup_logging
from pipeline.disk import folder_bytes, megabytes
from pipeline.registry import spec
from pipeline.runner import (GateFailed, StageError, clean, run_all, run_stage, run_store, stage_key,
                             stage_states, stale_reasons)

CONFIGS_DIR = DEFAULT_CONFIG.parent
# a new override inside a --sets string starts at a token shaped like "key.path="
_OVERRIDE_START = re.compile(r"^[A-Za-z_][\w.\-]*=")

config_option = click.option("--config", "config_path", default=None, metavar="FILE",
                             help="YAML config (default: configs/default.yaml, the embedded digits run)")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                          help="override a config value, e.g. --set train.epochs=3 (repeatable)")
sets_option = click.option("--sets", "set_string", default="", metavar="'K=V K=V'",
                           help="several overrides in one string, split before each KEY= "
                                "(how the Makefile passes SET; a value may hold spaces: 'reduce_t.steps=[2, 1]')")
verbose_option = click.option("-v", "--verbose", is_flag=True,
                              help="show DEBUG and third-party INFO lines on the console too")
version_option = click.version_option(__version__, "--version", prog_name="staa-pipeline")


def run_config_options(fn):
    """--config, --set and --sets: the options every command that names a run takes."""
    return config_option(set_option(sets_option(fn)))


class StageChoice(click.Choice):
    """A stage name, checked against the registry when the command runs, not when this module is
    imported: a stage registered later (a plugin, a test's dummy stage) is a valid choice too."""

    def __init__(self, *extra: str) -> None:
        self.extra = extra
        super().__init__(())

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        return (*registry.names(), *self.extra)

    @choices.setter
    def choices(self, value: tuple[str, ...]) -> None:  # click.Choice.__init__ assigns it: the registry decides
        pass


def split_set_string(text: str) -> list[str]:
    """``"a=1 b.c=[2, 1]"`` -> ``["a=1", "b.c=[2, 1]"]``: tokens that do not start a key join the previous one."""
    out: list[str] = []
    for token in text.split():
        if out and not _OVERRIDE_START.match(token):
            out[-1] += " " + token
        else:
            out.append(token)
    return out


def _data_error_type() -> type[BaseException] | None:
    """DataError, if the data package was imported (it imports torch: the CLI itself does not)."""
    mod = sys.modules.get("pipeline.data.errors")
    return getattr(mod, "DataError", None)


def _guard(fn: Callable[[], None]) -> None:
    """Turn the pipeline's own errors into one clear message and an exit code (no traceback)."""
    try:
        fn()
    except ConfigError as exc:
        click.echo(f"config error: {exc}", err=True)
        sys.exit(2)
    except (StageError, ArtifactError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except GateFailed as exc:
        click.echo(f"gate failed: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt as exc:  # click would print only "Aborted!"
        click.echo(str(exc) if str(exc) else "interrupted (Ctrl-C); finished stages are kept; run the same "
                   "command again to continue", err=True)
        sys.exit(130)
    except ImportError as exc:  # a missing optional dependency
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:
        data_error = _data_error_type()
        if data_error is not None and isinstance(exc, data_error):
            click.echo(f"data error: {exc}", err=True)
            sys.exit(2)
        raise


def _verbose(verbose: bool) -> bool:
    """-v given here or before the sub-command (``python -m pipeline -v run``)."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    return verbose or bool(root is not None and root.params.get("verbose"))


def _load(config_path: str | None, overrides: tuple[str, ...], set_string: str = "") -> dict:
    return load_config(config_path, (*split_set_string(set_string), *overrides))


@click.group(help="STAA-SNN pipeline: run the stages, show their status, list what exists, clean a run.",
             context_settings={"help_option_names": ["-h", "--help"]})
@verbose_option
@version_option
def main(verbose: bool) -> None:
    setup_logging(verbose)


@main.command("run", help="Run every stage in order; fresh stages are skipped.")
@run_config_options
@click.option("--force", multiple=True, type=StageChoice("all"), metavar="STAGE",
              help="re-run this stage even if fresh ('all' for every stage; repeatable)")
@click.option("--until", type=StageChoice(), default=None, help="stop after this stage")
@verbose_option
def run_cmd(config_path: str | None, overrides: tuple[str, ...], set_string: str, force: tuple[str, ...],
            until: str | None, verbose: bool) -> None:
    setup_logging(_verbose(verbose))

    def go() -> None:
        cfg = _load(config_path, overrides, set_string)
        try:
            outcomes = run_all(cfg, force=force, until=until)
        except GateFailed:
            _where_are_my_results(cfg, err=True)  # a failed gate still leaves a report to read
            raise
        ran = [n for n, o in outcomes.items() if o != "cached"]
        if not ran:
            click.echo(f"run '{cfg['name']}': every stage is up to date; nothing to do")
        else:
            click.echo(f"run '{cfg['name']}': " + ", ".join(f"{n} {o}" for n, o in outcomes.items()))
        if until is None:  # a partial run (make all's first half) has no report to point at yet
            _where_are_my_results(cfg)
    _guard(go)


@main.command("status", help="Each stage as done, skipped, failed, running, stale or missing, with a note.")
@run_config_options
@verbose_option
def status_cmd(config_path: str | None, overrides: tuple[str, ...], set_string: str, verbose: bool) -> None:
    setup_logging(_verbose(verbose))

    def go() -> None:
        cfg = _load(config_path, overrides, set_string)
        store = run_store(cfg)
        holder = store.lock_holder()
        busy = f" (a run is in progress: pid {holder})" if holder else ""
        click.echo(f"run '{cfg['name']}' in {store.root}{busy}")
        click.echo(f"{'stage':<10} {'state':<8} {'key':<17} {'finished':<25} {'wall s':>8}  note")
        left = []
        for name, state, key, man in stage_states(cfg):
            partial = store.partial_dir(name).exists()
            shown = _display_state(state, man, running=bool(holder) and partial)
            when = man.finished_at if man else "-"
            wall = f"{man.wall_time_s:.1f}" if man else "-"
            why = stale_reasons(cfg, name, store) if shown == "stale" else []
            if partial and _partial_key(store.partial_dir(name)) not in (None, key):
                why = ["a partial run of another config is kept; the next run discards it"]
            note = _status_note(man, state=shown, partial=partial, why=why)
            click.echo(f"{name:<10} {shown:<8} {key:<17} {when:<25} {wall:>8}  {note}".rstrip())
            if not holder:
                left += [(name, p) for p in store.leftovers(name, key)]
        for name, path in left:
            click.echo(f"left by a killed run of {name}: {path} ({megabytes(_bytes(path))}); "
                       f"the next run of {name} removes it")
    _guard(go)


def _partial_key(part: Path) -> str | None:
    try:
        return (part / ".key").read_text()
    except OSError:
        return None


def _bytes(path: Path) -> int:
    return folder_bytes(path) if path.is_dir() else path.stat().st_size if path.exists() else 0


def _display_state(state: str, man: Manifest | None, running: bool) -> str:
    """The store's state, refined: ``running`` (its partial folder is being written by a live run)
    and ``skipped`` (fresh, but recorded as not done here, e.g. no TensorRT)."""
    if running:
        return "running"
    if state == "done" and man is not None and man.status == "skipped":
        return "skipped"
    return state


def _status_note(man: Manifest | None, width: int = 60, state: str = "", partial: bool = False,
                 why: list[str] | None = None) -> str:
    """One short line: why a stage was skipped, which gate failed, why it is stale (``why``, from
    :func:`pipeline.runner.stale_reasons`), or what a kept partial folder means (the full text is
    in the stage folder's manifest.json and report)."""
    if state == "running":
        text = "being written now (see its stage.log)"
    elif man is not None and man.status == "skipped" and state in ("skipped", "done"):
        text = "skipped: " + re.split(r"[;:.]\s", man.reason, maxsplit=1)[0]
    elif man is not None and man.status == "failed":
        first = man.failed_gates[0] if man.failed_gates else "?"
        text = f"{len(man.failed_gates)} gate(s) failed: {first}"
    elif partial and state in ("missing", "stale") and why and why[0].startswith("a partial run"):
        text = why[0]
    elif partial and state in ("missing", "stale"):
        text = "an interrupted run is kept; the next run resumes it"
    elif state == "stale" and man is not None:
        text = "; ".join(why or ["its key changed"])
    else:
        return ""
    return text if len(text) <= width else text[: width - 3] + "..."


@main.command("clean", help="Delete a run's stage folders (all, or the named stages).")
@run_config_options
@click.argument("stages", nargs=-1, type=StageChoice())
@verbose_option
def clean_cmd(config_path: str | None, overrides: tuple[str, ...], set_string: str, stages: tuple[str, ...],
              verbose: bool) -> None:
    setup_logging(_verbose(verbose))

    def go() -> None:
        cfg = _load(config_path, overrides, set_string)
        removed = ", ".join(clean(cfg, stages or None)) or "nothing"
        click.echo(f"run '{cfg['name']}' in {run_store(cfg).root}: removed {removed}")
    _guard(go)


@main.command("list", help="The stages (what each does and makes) and the shipped configs (dataset, model).")
@click.option("--names", is_flag=True, help="stage names only, one per line (for scripts and the Makefile)")
@verbose_option
def list_cmd(names: bool, verbose: bool) -> None:
    if names:
        click.echo("\n".join(registry.names()))
        return
    click.echo("stages (in order; python -m pipeline stage NAME --config F):")
    for s in registry.stages():
        click.echo(f"  {s.name:<9} {s.help}")
        click.echo(f"  {'':<9} makes {', '.join(s.produces)}" + (f"; reads {', '.join(s.needs)}" if s.needs else ""))
    click.echo(f"configs ({CONFIGS_DIR}; python -m pipeline run --config configs/NAME.yaml):")
    for path in sorted(CONFIGS_DIR.glob("*.yaml")):
        click.echo(f"  {path.name:<20} {_config_line(path)}")


def _config_line(path: Path) -> str:
    """``dataset, model arch width T`` of one config file, or why it does not load."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        cfg = load_config(path)
    except (ConfigError, yaml.YAMLError) as exc:
        return f"(does not load: {str(exc).splitlines()[0]})"
    if "dataset" not in (raw.get("data") or {}) and "extends" not in raw:
        return "(a base that other configs extend)"
    d, m = cfg["data"], cfg["model"]
    where = d.get("train_file") or d.get("root") or ("built in (scikit-learn)" if d["dataset"] == "digits" else "-")
    return f"{d['dataset']:<10} {m['arch']} width {m['width']:g}, T={m['T']}  data: {where}"


@main.command("config", help="Print the resolved config (defaults, extends and --set applied) as YAML.")
@run_config_options
@verbose_option
def config_cmd(config_path: str | None, overrides: tuple[str, ...], set_string: str, verbose: bool) -> None:
    _guard(lambda: click.echo(resolved_yaml(_load(config_path, overrides, set_string)), nl=False))


@click.command(help="Run one stage, reusing the cached upstream artifacts. Stages: " + ", ".join(registry.names()),
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("name", type=StageChoice())
@run_config_options
@click.option("--force", is_flag=True, help="re-run from scratch even if the stage is fresh (discards a kept partial run)")
@verbose_option
@version_option
def stage_main(name: str, config_path: str | None, overrides: tuple[str, ...], set_string: str, force: bool,
               verbose: bool) -> None:
    setup_logging(_verbose(verbose))

    def go() -> None:
        cfg = _load(config_path, overrides, set_string)
        try:
            outcome = run_stage(cfg, name, force=force)
        except GateFailed:
            if name == "validate":
                _where_are_my_results(cfg, err=True)
            raise
        if outcome == "cached":
            click.echo(f"{name}: up to date for run '{cfg['name']}'; nothing to do (use --force to re-run)")
        else:
            click.echo(f"{name}: {outcome} -> {run_store(cfg).stage_dir(spec(name).name)}")
        if name == "validate":
            _where_are_my_results(cfg)
    _guard(go)


main.add_command(stage_main, "stage")


def best_shipping_row(report: dict[str, Any]) -> dict[str, Any] | None:
    """The fastest (p50 at the latency batch) deployable row whose gates all passed, or None."""
    def passed(row: dict[str, Any]) -> bool:
        gates = [g for g in (row.get("gate"), row.get("total_gate")) if g is not None]
        return bool(gates) and all(g.get("passed") is True for g in gates)

    ok = [r for r in report.get("rows", []) if r.get("ships") and r.get("status") == "ok" and passed(r)
          and (r.get("latency") or {}).get("p50_ms") is not None]
    return min(ok, key=lambda r: r["latency"]["p50_ms"]) if ok else None


def _where_are_my_results(cfg: dict[str, Any], err: bool = False) -> None:
    """The committed report, the best artifact that passed its gates, and what to do next."""
    store = run_store(cfg)
    report_json = registry.path(store.stage_dir("validate"), "validate", "report_json")
    if store.state("validate", stage_key(cfg, spec("validate"), store)) not in ("done", "failed"):
        return  # no report for this config (an older one may lie there: say nothing rather than mislead)
    try:
        report = json.loads(report_json.read_text())
    except (OSError, json.JSONDecodeError):
        return
    lines = [f"report: {registry.path(report_json.parent, 'validate', 'report_md')}"]
    best = best_shipping_row(report)
    if best is None:
        lines.append("best artifact: none of the deployable graphs passed all its gates (see the report)")
    else:
        lat, top1 = best["latency"], best.get("top1")
        lines.append(f"best artifact: {best['artifact']} ({best['backend']} {best['precision']}, T={best['T']}): "
                     f"top-1 {top1:.2f}%, delta {best.get('delta') or 0:+.2f} vs float, "
                     f"p50 {lat['p50_ms']:.2f} ms at batch {lat['batch']}")
    bundle = store.stage_dir("build")
    if bundle.is_dir():
        guide = registry.file("build", "guide")
        graph, samples = (registry.path(bundle, "export", r) for r in ("onnx_fp32", "samples"))  # copied by name
        lines += [f"device bundle: {bundle}/ (copy it to the Jetson; {guide} says how to build and time the engines)",
                  f"try it here:   python -m pipeline.runtime predict {graph} --samples {samples}"]
    click.echo("\n".join(lines), err=err)
