"""One schema: every default written once (pipeline/schema.py), every key checked by one piece of code.

The model specs, the data settings and the config loader all fill and validate their sections
through ``pipeline.schema``; these tests fail the day a default or a bound is repeated elsewhere
and drifts, or a dispatch table (datasets, architectures) and the schema's choices disagree.
"""
from __future__ import annotations

import dataclasses

import pytest

from pipeline.config import ConfigError, load_config, resolved_yaml
from pipeline.data.build import BUILDERS
from pipeline.data.settings import data_settings
from pipeline.models import ARCHS, resolve_model_cfg
from pipeline.models.spec import ModelSpec, NeuronSpec, STAASpec
from pipeline.schema import SCHEMA, Choice, defaults, node, resolve, validate
from tests.conftest import REPO

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("cls, section", [(NeuronSpec, "model.neuron"), (STAASpec, "model.staa")])
def test_spec_dataclass_defaults_are_the_schema_defaults(cls, section):
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    assert fields == defaults(node(section))  # same keys, same values: one source


def test_model_spec_covers_every_model_key():
    schema_keys = set(SCHEMA["model"])
    assert schema_keys <= {f.name for f in dataclasses.fields(ModelSpec)}
    spec = resolve_model_cfg({"num_classes": 10, "in_channels": 3})
    for key in schema_keys - {"neuron", "staa"}:
        assert getattr(spec, key) == defaults(node(f"model.{key}")), key


def test_data_settings_are_the_schema_defaults():
    assert data_settings(None) == defaults(SCHEMA["data"])
    assert data_settings({"augment": {"cutout": 8}})["augment"] == dict(defaults(SCHEMA["data"]["augment"]), cutout=8)


def test_dataset_table_matches_the_schema_choices():
    assert set(BUILDERS) == set(SCHEMA["data"]["dataset"].options)


def test_arch_table_matches_the_schema_choices():
    assert set(ARCHS) == set(SCHEMA["model"]["arch"].options)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_resolved_shipped_config_validates_again_unchanged(path, tmp_path):
    """The resolved config (defaults filled) passes the same checks and is a fixed point, also read
    back from YAML (what write_run_config stores); its model section builds a spec, which is what a
    checkpoint stores and rebuilds from."""
    cfg = load_config(path)
    plain = {k: v for k, v in cfg.items() if not k.startswith("_")}
    assert validate(plain) == plain
    written = tmp_path / "resolved.yaml"
    written.write_text(resolved_yaml(cfg))
    assert resolved_yaml(load_config(written)) == resolved_yaml(cfg)
    spec = resolve_model_cfg({**cfg["model"], "num_classes": 10, "in_channels": 3})
    assert spec.T == cfg["model"]["T"]


@pytest.mark.parametrize("override, message", [
    ("model.T=0", "model.T: must be >= 1, got 0"),
    ("model.width=0", "model.width: must be in (0, 4], got 0.0"),
    ("model.staa.tsrd_p=1", "model.staa.tsrd_p: must be in [0, 1), got 1.0"),
    ("model.staa.gc_ratio=0", "model.staa.gc_ratio: must be >= 1, got 0"),
    ("model.staa.sa_hidden=0", "model.staa.sa_hidden: must be >= 1, got 0"),
    ("data.workers=-2", "data.workers: must be >= -1, got -2 (0: load in the main process"),
    ("build.precisions=[fp8]", "build.precisions: ['fp8'] not in ['fp32', 'fp16', 'int8']"),
    ("reduce_t.steps=[4]", "reduce_t.steps: [4] must be between 1 and model.T - 1 = 3 (the trained T); "
                           "fix reduce_t.steps (e.g. --set reduce_t.steps=[2])"),
])
def test_one_message_per_bad_value(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "default.yaml", [override, "model.T=4"] if "steps" in override else [override])
    assert message in str(e.value)


@pytest.mark.parametrize("model, message", [
    ({"T": 0}, "model.T: must be >= 1, got 0"),
    ({"staa": {"gc_ratio": 0}}, "model.staa.gc_ratio: must be >= 1, got 0"),
    ({"neuron": {"surrogate": "sigmoid"}}, "model.neuron.surrogate: 'sigmoid' is not one of"),
])
def test_library_callers_get_the_config_loaders_message(model, message):
    """build_model/checkpoints validate through the same code as load_config: the same words."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        resolve_model_cfg({"num_classes": 10, "in_channels": 3, **model})


def test_resolve_fills_a_partial_section():
    staa = resolve("model.staa", {"pe": False})
    assert staa == dict(defaults(node("model.staa")), pe=False)
    assert isinstance(SCHEMA["model"]["arch"], Choice)


@pytest.mark.parametrize("override, message", [
    ("train.epochs=0", "train.epochs: must be >= 1, got 0"),
    ("train.epochs=-1", "train.epochs: must be >= 1, got -1"),
    ("train.lr=0", "train.lr: must be > 0, got 0.0"),
    ("train.lr=-0.1", "train.lr: must be > 0, got -0.1"),
    ("train.momentum=1", "train.momentum: must be in [0, 1), got 1.0"),
    ("train.max_batches=0", "train.max_batches: must be >= 1, got 0"),
    ("train.eval_every=0", "train.eval_every: must be >= 1, got 0"),
    ("data.batch_size=0", "data.batch_size: must be >= 1, got 0"),
    ("data.limit_train=0", "data.limit_train: must be >= 1, got 0"),
    ("data.image_size=-8", "data.image_size: must be >= 1, got -8"),
    ("model.neuron.v_th=0", "model.neuron.v_th: must be > 0, got 0.0"),
    ("reduce_t.epochs=-1", "reduce_t.epochs: must be >= 0, got -1"),
    ("reduce_t.alpha=2", "reduce_t.alpha: must be in [0, 1], got 2.0"),
    ("qat.calibration_samples=0", "qat.calibration_samples: must be >= 1, got 0"),
    ("export.parity_images=0", "export.parity_images: must be >= 1, got 0"),
    ("validate.iterations=0", "validate.iterations: must be >= 1, got 0"),
    ("validate.batch_sizes=[0]", "validate.batch_sizes: [0] must be one or more batch sizes >= 1"),
    ("seed=-1", "seed: must be >= 0, got -1"),
])
def test_out_of_range_values_are_refused_before_anything_runs(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "default.yaml", [override])
    assert message in str(e.value)


def test_zero_epochs_exit_2_with_one_line_and_nothing_left(tmp_path):
    """Issue 20 case 7: train.epochs: 0 used to pass, then fail in train with a traceback and a partial folder."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "pipeline", "run", "--set", f"artifacts_dir={tmp_path / 'a'}",
                          "--set", "train.epochs=0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == ["config error: train.epochs: must be >= 1, got 0"], res.stderr
    assert not (tmp_path / "a").exists()
