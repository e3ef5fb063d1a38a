"""A stage inserted between reduce_t and qat (tests/orchestration/test_insert_stage.py): it reads reduce_t's chosen model
and writes a copy whose classifier rows are rolled by ``relabel.shift``; qat then quantises that copy.

What inserting it takes: this module, its registry row (``RELABEL`` in the test, with ``feeds`` naming qat's
input), its schema section and a config line. Nothing in stages/qat.py or the built-in rows changes.
"""
from __future__ import annotations

import torch

from pipeline.checkpoint import load_model, model_payload, save_atomic
from pipeline.runner import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    model, ckpt = load_model(ctx.input("model"))
    shift = int(ctx.cfg["relabel"]["shift"])
    with torch.no_grad():
        model.fc.weight.copy_(model.fc.weight.roll(shift, 0))
        model.fc.bias.copy_(model.fc.bias.roll(shift, 0))
    save_atomic(model_payload(model, ckpt["model_cfg"], ckpt["data_meta"]), ctx.output("model"))
    return StageResult(metrics={"shift": shift, "source": ctx.input_artifact("model")})
