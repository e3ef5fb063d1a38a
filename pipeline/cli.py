"""Command-line entry points; both `python -m pipeline` and `python -m pipeline.stage` land here.

Exit codes: 0 success, 1 a stage failed or a gate failed, 2 bad usage or config (nothing written).
"""
from __future__ import annotations

import logging
import sys
from typing import Callable

import click

from pipeline.artifacts import ArtifactError
from pipeline.config import ConfigError, load_config
from pipeline.registry import NAMES, spec
from pipeline.runner import GateFailed, StageError, clean, run_all, run_stage, stage_states

config_option = click.option("--config", "config_path", default=None, metavar="FILE",
                             help="YAML config (default: configs/default.yaml, the embedded digits run)")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                          help="override a config value, e.g. --set train.epochs=3 (repeatable)")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("nncf", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _guard(fn: Callable[[], None]) -> None:
    """Turn the pipeline's own errors into one clear line and an exit code."""
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
    except ImportError as exc:  # a missing optional dependency
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


def _load(config_path: str | None, overrides: tuple[str, ...]) -> dict:
    return load_config(config_path, overrides)


@click.group(help="STAA-SNN pipeline: run all stages, show their status, or clean a run.")
@click.option("-v", "--verbose", is_flag=True)
def main(verbose: bool) -> None:
    _setup_logging(verbose)


@main.command("run", help="Run every stage in order; fresh stages are skipped.")
@config_option
@set_option
@click.option("--force", multiple=True, metavar="STAGE", help="re-run this stage even if fresh ('all' for every stage)")
@click.option("--until", type=click.Choice(NAMES), default=None, help="stop after this stage")
def run_cmd(config_path: str | None, overrides: tuple[str, ...], force: tuple[str, ...], until: str | None) -> None:
    def go() -> None:
        cfg = _load(config_path, overrides)
        outcomes = run_all(cfg, force=force, until=until)
        ran = [n for n, o in outcomes.items() if o != "cached"]
        if not ran:
            click.echo(f"run '{cfg['name']}': every stage is up to date; nothing to do")
        else:
            click.echo(f"run '{cfg['name']}': " + ", ".join(f"{n} {o}" for n, o in outcomes.items()))
    _guard(go)


@main.command("status", help="List each stage as done, stale or missing, with its key and time.")
@config_option
@set_option
def status_cmd(config_path: str | None, overrides: tuple[str, ...]) -> None:
    def go() -> None:
        cfg = _load(config_path, overrides)
        click.echo(f"run '{cfg['name']}'")
        click.echo(f"{'stage':<10} {'state':<8} {'key':<17} {'finished':<25} {'wall s':>8}  note")
        for name, state, key, man in stage_states(cfg):
            when = man.finished_at if man else "-"
            wall = f"{man.wall_time_s:.1f}" if man else "-"
            note = f"skipped: {man.reason}" if man and man.status == "skipped" else ""
            click.echo(f"{name:<10} {state:<8} {key:<17} {when:<25} {wall:>8}  {note}")
    _guard(go)


@main.command("clean", help="Delete a run's stage folders (all, or the named stages).")
@config_option
@set_option
@click.argument("stages", nargs=-1, type=click.Choice(NAMES))
def clean_cmd(config_path: str | None, overrides: tuple[str, ...], stages: tuple[str, ...]) -> None:
    def go() -> None:
        cfg = _load(config_path, overrides)
        removed = clean(cfg, stages or None)
        click.echo(f"removed: {', '.join(removed) if removed else 'nothing'}")
    _guard(go)


@click.command(help="Run one stage, reusing the cached upstream artifacts. Stages: " + ", ".join(NAMES))
@click.argument("name", type=click.Choice(NAMES))
@config_option
@set_option
@click.option("--force", is_flag=True, help="re-run even if the stage is fresh")
@click.option("-v", "--verbose", is_flag=True)
def stage_main(name: str, config_path: str | None, overrides: tuple[str, ...], force: bool, verbose: bool) -> None:
    _setup_logging(verbose)

    def go() -> None:
        cfg = _load(config_path, overrides)
        outcome = run_stage(cfg, name, force=force)
        if outcome == "cached":
            click.echo(f"{name}: up to date for run '{cfg['name']}'; nothing to do (use --force to re-run)")
        else:
            click.echo(f"{name}: {outcome} -> {spec(name).name} of run '{cfg['name']}'")
    _guard(go)
