"""Config loading: defaults, extends, --set overrides and errors that name the key and the fix."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.config import ConfigError, load_config, slice_hash
from tests.conftest import REPO


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg["model"]["T"] >= 1 and cfg["name"]


def test_embedded_default_ships_a_multi_step_model():
    """At T=1 the membranes, step attention, PE and the unrolled loop are trivial (and parity exact by
    construction): whatever reduce_t picks for `make all`, it must keep T >= 2 and have a choice."""
    cfg = load_config(REPO / "configs" / "default.yaml")
    steps = cfg["reduce_t"]["steps"]
    assert min(steps) >= 2 and len(steps) >= 2 and cfg["reduce_t"]["choose"] is None
    assert cfg["data"]["val_fraction"] > 0  # the T is chosen on validation images


def test_extends_merges_parent_and_child():
    cfg = load_config(REPO / "configs" / "cifar100.yaml")
    assert cfg["data"]["dataset"] == "cifar100"  # child
    assert cfg["train"]["lr"] == 0.1 and cfg["data"]["augment"]["cutout"] == 16  # parent
    assert cfg["name"] == "cifar100"


def test_set_overrides_keep_yaml_types(tmp_path):
    cfg = load_config(REPO / "configs" / "default.yaml", ["train.epochs=3", "reduce_t.steps=[1]", "train.lr=1e-3"])
    assert cfg["train"]["epochs"] == 3 and cfg["reduce_t"]["steps"] == [1]
    assert cfg["train"]["lr"] == pytest.approx(1e-3)


def test_unknown_key_names_path_and_closest(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "train.epochz" in str(e.value) and "train.epochs" in str(e.value)


def test_wrong_type_names_expected_type(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  T: four\n")
    with pytest.raises(ConfigError, match=r"model\.T: expected int, got str"):
        load_config(p)


def test_bad_choice_suggests(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'cifar100'"):
        load_config(REPO / "configs" / "default.yaml", ["data.dataset=cifar1000"])


def test_missing_file_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("extends: b.yaml\n")
    b.write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)


def test_semantic_checks(tmp_path):
    with pytest.raises(ConfigError, match="reduce_t.steps"):
        load_config(REPO / "configs" / "default.yaml", ["reduce_t.steps=[4]"])


def test_slice_hash_tracks_only_its_keys():
    a = load_config(REPO / "configs" / "default.yaml")
    b = load_config(REPO / "configs" / "default.yaml", ["validate.iterations=7"])
    assert slice_hash(a, ["train", "model"]) == slice_hash(b, ["train", "model"])
    assert slice_hash(a, ["validate"]) != slice_hash(b, ["validate"])


def test_cli_config_error_exits_2_and_writes_nothing(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(f"artifacts_dir: {tmp_path / 'art'}\ntrain:\n  lr: fast\n")
    r = subprocess.run([sys.executable, "-m", "pipeline.stage", "train", "--config", str(p)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert "train.lr" in r.stderr and "expected float" in r.stderr
    assert not (tmp_path / "art").exists()
