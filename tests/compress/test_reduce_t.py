"""Time-step reduction: PE carried to the new T, the distillation loss, the choice of T."""
from __future__ import annotations

import ast
import inspect

import pytest
import torch

from pipeline.compress.timesteps import (PairedFrames, carry_to_T, choose_T, choose_T_on_val, distill_step_loss,
                                        kd_objective)
from pipeline.models import PositionEncoding, StepAttention, build_model
from pipeline.training.losses import distillation_loss

MCFG = {"arch": "resnet19", "width": 0.125, "T": 4, "num_classes": 10, "in_channels": 1}


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(MCFG).eval()
    with torch.no_grad():  # distinct values per step and channel, so a wrong resampling shows
        for m in model.modules():
            if isinstance(m, PositionEncoding):
                m.pe.copy_(torch.randn_like(m.pe))
    return model


def _pes(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.pe.detach().clone() for m in model.modules() if isinstance(m, PositionEncoding)]


@pytest.mark.parametrize("mode", ["truncate", "interpolate", "mean"])
def test_pe_carried_to_new_T(teacher, mode):
    before = _pes(teacher)
    student = carry_to_T(teacher, 2, mode)
    assert student.T == 2 and teacher.T == 4  # the teacher is left at T=4 for distillation
    for old, new, kept in zip(before, _pes(student), _pes(teacher)):
        assert new.shape == (2,) + old.shape[1:]
        torch.testing.assert_close(kept, old)
        if mode == "truncate":
            expect = old[:2]
        elif mode == "interpolate":  # end points kept: new steps sample old positions 0 and 3
            expect = torch.stack([old[0], old[3]])
        else:
            expect = old.mean(0, keepdim=True).expand(2, *old.shape[1:])
        torch.testing.assert_close(new, expect)
    with torch.no_grad():
        assert student.forward_steps(torch.rand(3, 1, 8, 8)).shape == (2, 3, 10)


def test_pe_carried_to_T1_and_step_attention_resized(teacher):
    student = carry_to_T(teacher, 1, "interpolate")
    for old, new in zip(_pes(teacher), _pes(student)):
        torch.testing.assert_close(new, old[:1])  # T=1 keeps the first step
    sa = [m for m in student.modules() if isinstance(m, StepAttention)]
    assert sa and all(m.fc1.in_features == 1 and m.fc2.out_features == 1 for m in sa)
    with torch.no_grad():
        assert student(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_distillation_loss_zero_positive_and_gradient_direction():
    torch.manual_seed(0)
    teacher = torch.randn(4, 10)
    assert distillation_loss(teacher.clone(), teacher, 4.0).abs().item() < 1e-6
    student = torch.randn(4, 10, requires_grad=True)
    loss = distillation_loss(student, teacher, 4.0)
    assert loss.item() > 0
    loss.backward()
    # d/ds KL = (softmax(s/T) - softmax(t/T)) * T / B: descending moves the student toward the teacher
    p_s, p_t = torch.softmax(student.detach() / 4, -1), torch.softmax(teacher / 4, -1)
    torch.testing.assert_close(student.grad, (p_s - p_t) * 4 / 4)
    stepped = student.detach() - 1.0 * student.grad
    assert distillation_loss(stepped, teacher, 4.0) < loss.detach()
    # the teacher gets no gradient
    s2, t2 = student.detach().clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    distillation_loss(s2, t2, 4.0).backward()
    assert t2.grad is None and s2.grad is not None


def test_kd_objective_mixes_task_and_distillation():
    s, t, y = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0, 1, 2])
    task = torch.nn.functional.cross_entropy(s, y)
    assert kd_objective(s, t, y, 0.0, 4.0, task) is task
    kd = distillation_loss(s, t, 4.0)
    torch.testing.assert_close(kd_objective(s, t, y, 0.25, 4.0, task), 0.75 * task + 0.25 * kd)
    torch.testing.assert_close(kd_objective(s, t, y, 1.0, 4.0, task), kd)


class _Recorder(torch.nn.Module):
    """A stand-in net that records its input shape and returns fixed logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.seen = torch.nn.Parameter(logits.clone()), []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return self.logits.expand(x.shape[0], -1)


def test_distill_step_loss_splits_paired_event_frames():
    student, teacher = _Recorder(torch.zeros(1, 3)), _Recorder(torch.tensor([[3.0, 0.0, 0.0]]))
    step = distill_step_loss(teacher, alpha=1.0, temperature=2.0, loss_kind="ce", label_smoothing=0.0,
                             teacher_frames=4)
    x = torch.rand(5, 2 + 4, 2, 8, 8)  # student T=2, teacher T=4, batch-first event frames
    loss, logits = step(student, x, torch.zeros(5, dtype=torch.long))
    assert student.seen == [(5, 2, 2, 8, 8)] and teacher.seen == [(5, 4, 2, 8, 8)]
    assert loss.item() > 0 and logits.shape == (5, 3)
    plain = distill_step_loss(None, alpha=0.5, temperature=2.0, loss_kind="ce", label_smoothing=0.0)
    loss0, _ = plain(student, torch.rand(5, 1, 8, 8), torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(loss0, torch.nn.functional.cross_entropy(torch.zeros(5, 3), torch.zeros(5).long()))


def test_paired_frames_concatenates_views():
    a = [(torch.zeros(2, 1, 4, 4), 3), (torch.ones(2, 1, 4, 4), 5)]
    b = [(torch.full((4, 1, 4, 4), 7.0), 3), (torch.full((4, 1, 4, 4), 8.0), 5)]
    pair = PairedFrames(a, b)
    x, y = pair[1]
    assert x.shape == (6, 1, 4, 4) and y == 5 and x[:2].eq(1).all() and x[2:].eq(8).all()
    with pytest.raises(ValueError, match="not aligned"):
        PairedFrames(a, list(reversed(b)))[0]


def test_choose_T_rule_uses_the_validation_split():
    # on the test split T=1 looks best (95%); on validation it falls 11 points short: val decides
    rows = [{"T": 2, "val_top1": 90.0, "after_top1": 70.0}, {"T": 1, "val_top1": 80.0, "after_top1": 95.0}]
    assert choose_T(rows, 4, 91.0, 3.0)[0] == 2
    assert choose_T(rows, 4, 82.0, 3.0)[0] == 1  # smallest T within the gate
    assert choose_T(rows, 4, 99.0, 3.0)[0] == 2  # none within: the largest reduced T
    assert choose_T([], 4, 99.0, 3.0)[0] == 4
    assert choose_T(rows, 4, 99.0, 3.0, choose=4)[0] == 4
    with pytest.raises(ValueError, match="reduce_t.choose=3"):
        choose_T(rows, 4, 99.0, 3.0, choose=3)
    with pytest.raises(ValueError, match="val_fraction"):  # no validation scores: refuse to choose on test
        choose_T([{"T": 2, "val_top1": None, "after_top1": 90.0}], 4, None, 3.0)


def test_the_stage_chooses_T_on_validation_where_validation_and_test_disagree():
    """The stage's own choice (its recipe ``pipeline.compress.reduce_recipe`` calls ``choose_T_on_val`` with its
    score dicts, shaped as ``_score`` and ``_reduce_one`` write them): validation says T=2, the test split would say T=3 whichever of
    the baseline's or the rows' test figures were read instead."""
    import pipeline.compress.reduce_recipe as recipe

    # the stage's one choice is this function on its own score dicts, unchanged (no other chooser, no edited dict)
    calls = [n for n in ast.walk(ast.parse(inspect.getsource(recipe.reduce_time_steps)))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id.startswith("choose_T")]
    assert [(c.func.id, [ast.unparse(a) for a in c.args[:4]]) for c in calls] == [
        ("choose_T_on_val", ["rows", "T0", "base", "gate"])]
    assert recipe.choose_T_on_val is choose_T_on_val
    base = {"val_top1": 90.0, "val_n": 100, "test_top1": 99.0, "test_n": 300}
    rows = [{"T": 3, "val_top1": 85.0, "before_val_top1": 80.0, "before_top1": 90.0, "after_top1": 99.0},
            {"T": 2, "val_top1": 89.5, "before_val_top1": 80.0, "before_top1": 70.0, "after_top1": 80.0}]
    assert choose_T(rows, 4, base["test_top1"], 1.0, score="after_top1")[0] == 3  # what the test split says
    assert choose_T(rows, 4, base["test_top1"], 1.0)[0] == 3
    assert choose_T(rows, 4, base["val_top1"], 1.0, score="after_top1")[0] == 3
    chosen, why = choose_T_on_val(rows, 4, base, 1.0)
    assert chosen == 2, f"T={chosen} chosen: not on the validation split (val says T=2)"
    assert "smallest T within 1 points" in why


def test_the_stage_turns_the_recipes_error_into_a_stage_error(write_config, tmp_path):
    """stages/reduce_t.py wires pipeline.compress.reduce_recipe: the recipe's ReduceError (here: no validation
    split to choose the T on) reaches the user as the stage's StageError, with the recipe's fix in it."""
    import logging

    from pipeline import registry
    from pipeline.checkpoint import model_payload, save_atomic
    from pipeline.config import load_config
    from pipeline.data import data_bundle, data_meta, model_config
    from pipeline.models import build_model
    from pipeline.runner import StageContext, StageError, run_store
    from stages import reduce_t

    cfg = load_config(write_config({"data": {"val_fraction": 0.0}}))
    bundle = data_bundle(cfg)
    mcfg = model_config(cfg, bundle)
    (tmp_path / "train").mkdir()
    save_atomic(model_payload(build_model(mcfg), mcfg, data_meta(bundle)), tmp_path / "train" / "best.pt")
    (tmp_path / "out").mkdir()
    ctx = StageContext(cfg=cfg, spec=registry.spec("reduce_t"), out=tmp_path / "out",
                       inputs={"train": tmp_path / "train"}, store=run_store(cfg), device="cpu", log=logging.getLogger("pipeline.reduce_t"))
    with pytest.raises(StageError, match="data.val_fraction > 0"):
        reduce_t.run(ctx)
