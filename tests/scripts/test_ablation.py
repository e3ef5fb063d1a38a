"""bench/ablation.py's variants are valid configs, and a bad --pair fails before any training starts."""
from __future__ import annotations

import importlib.util

import pytest

from pipeline.config import load_config
from tests.conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("ablation", REPO / "bench" / "ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("config", ["nmnist.yaml", "cifar10_small.yaml"])
def test_every_variant_is_a_valid_config_and_sa_forms_differ_as_named(config):
    bench = _bench()
    staa = {v: load_config(REPO / "configs" / config, sets)["model"]["staa"] for v, sets in bench.VARIANTS.items()}
    assert staa["all"]["sa"] and staa["all"]["sa_mode"] == "full"  # the paper's, whatever the config says
    assert staa["causal"]["sa"] and staa["causal"]["sa_mode"] == "causal"
    assert not staa["nosa"]["sa"] and staa["nosa"]["gc"] and staa["nosa"]["pe"] and staa["nosa"]["tsrd"]


def test_a_pair_naming_an_untrained_variant_exits_before_training(tmp_path):
    bench = _bench()
    with pytest.raises(SystemExit, match="--pair causal:all"):
        bench.main(["--config", str(REPO / "configs" / "default.yaml"), "--variants", "all",
                    "--pair", "causal:all", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written
