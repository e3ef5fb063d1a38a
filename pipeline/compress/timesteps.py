"""Time-step reduction: run a trained STAA-SNN at fewer steps, fine-tune it, pick the T to ship.

Why a separate fine-tune: a net trained at T=4 loses accuracy when simply run at T=2 or 1
(its thresholds and attention were tuned to 4 steps of integration). A few epochs at the new
T, optionally distilling the T-step teacher's logits, recover most of it (the paper reports
gains at fewer steps). The learnable position encoding ``[T, 1, C, 1, 1]`` and the T-sized
step-attention layers are carried over by ``SpikingNet.set_time_steps(T, pe_mode)``:

- ``truncate``: keep the first T steps (what the net saw first, before adaptation);
- ``interpolate``: linear resampling with both end points kept (default);
- ``mean``: every new step gets the old mean (a time-invariant start).
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from pipeline.training.loop import StepLoss
from pipeline.training.losses import classification_loss, distillation_loss


def carry_to_T(model: nn.Module, T_new: int, pe_mode: str) -> nn.Module:
    """A copy of ``model`` running at ``T_new`` steps, PE and step attention resampled by ``pe_mode``.

    The teacher is left untouched (it keeps producing T-step logits for distillation). Step
    attention keeps its trained hidden width; ``model_payload`` stores it (``model.staa.sa_hidden``),
    so the saved student reloads strictly with ``load_model`` whatever the new T. Causal step
    attention (``model.staa.sa_mode: causal``) is not resampled: it keeps its leading ``[:T_new, :T_new]``
    block, whatever ``pe_mode``, and its stored width becomes ``T_new``.
    """
    student = copy.deepcopy(model)
    student.set_time_steps(int(T_new), pe_mode)
    return student


def kd_objective(student_logits: Tensor, teacher_logits: Tensor, y: Tensor, alpha: float, temperature: float,
                 task_loss: Tensor) -> Tensor:
    """``(1 - alpha) * task + alpha * KL(teacher || student) * temperature^2``.

    ``alpha = 0`` is plain fine-tuning; ``alpha = 1`` pure distillation (labels unused).
    """
    if alpha <= 0:
        return task_loss
    kd = distillation_loss(student_logits.float(), teacher_logits.float(), temperature)
    return (1.0 - alpha) * task_loss + alpha * kd


def distill_step_loss(teacher: nn.Module | None, alpha: float, temperature: float, loss_kind: str,
                      label_smoothing: float, teacher_frames: int = 0) -> StepLoss:
    """A ``fit`` step loss: the task loss (CE on mean logits, or TET) plus logit distillation.

    ``teacher_frames > 0`` means each batch is a paired event batch (see :class:`PairedFrames`):
    the last ``teacher_frames`` frames go to the teacher, the rest to the student. Static
    images are fed to both as they are (each net repeats them over its own T).
    """
    use_teacher = teacher is not None and alpha > 0
    if use_teacher:
        teacher.eval()

    def step(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x_student, x_teacher = (x[:, :-teacher_frames], x[:, -teacher_frames:]) if teacher_frames else (x, x)
        loss, logits = classification_loss(model, x_student, y, loss_kind, label_smoothing)
        if not use_teacher:
            return loss, logits
        with torch.no_grad():
            t_logits = teacher(x_teacher)
        return kd_objective(logits, t_logits, y, alpha, temperature, loss), logits

    return step


class PairedFrames(Dataset):
    """Event samples framed at two step counts, concatenated on the frame axis.

    The student needs ``T_new`` frames and the teacher ``T`` frames of the *same* recording;
    ``fit`` moves one tensor per batch, so both travel as ``[T_new + T, C, H, W]`` and
    :func:`distill_step_loss` splits them. (Random augmentation is drawn independently
    per view; for distillation that only softens the teacher signal.)
    """

    def __init__(self, student: Dataset, teacher: Dataset) -> None:
        if len(student) != len(teacher):
            raise ValueError(f"paired datasets differ in length ({len(student)} vs {len(teacher)})")
        self.student, self.teacher = student, teacher

    def __len__(self) -> int:
        return len(self.student)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        xs, y = self.student[i]
        xt, yt = self.teacher[i]
        if int(y) != int(yt):
            raise ValueError(f"paired sample {i} has labels {y} and {yt}: the two datasets are not aligned")
        return torch.cat([torch.as_tensor(xs), torch.as_tensor(xt)], 0), y


def choose_T(rows: Sequence[dict[str, Any]], T0: int, baseline_top1: float | None, gate: float,
             choose: int | None = None, score: str = "val_top1") -> tuple[int, str]:
    """Which T goes on to quantisation, and why.

    ``choose`` (reduce_t.choose) wins when set; it must be ``T0`` or one of the reduced T.
    Otherwise: the smallest T whose fine-tuned ``score`` (the validation top-1: a choice is never
    made on the test split) is within ``gate`` points of the baseline's; failing that the
    largest reduced T (closest to the baseline); with no reduced T at all, the original ``T0``.
    """
    done = {int(r["T"]): r for r in rows}
    if choose is not None:
        if choose != T0 and choose not in done:
            raise ValueError(f"reduce_t.choose={choose} is neither the trained T={T0} nor one of "
                             f"reduce_t.steps {sorted(done)}; add it to the steps or unset choose")
        return int(choose), "reduce_t.choose"
    if baseline_top1 is None or any(r.get(score) is None for r in rows):
        raise ValueError(f"choosing T needs {score} for the baseline and every reduced T; set data.val_fraction "
                         f"> 0 or fix the T with reduce_t.choose")
    ok = [T for T, r in done.items() if r[score] >= baseline_top1 - gate]
    if ok:
        return min(ok), f"smallest T within {gate:g} points of the T={T0} baseline"
    if done:
        return max(done), f"no T within {gate:g} points of the baseline: the largest reduced T"
    return T0, "no reduced T: the trained model"


def choose_T_on_val(rows: Sequence[dict[str, Any]], T0: int, base: dict[str, Any], gate: float,
                    choose: int | None = None) -> tuple[int, str]:
    """reduce_t's choice from the scores it keeps: ``base`` (the baseline's ``val_top1`` / ``test_top1``) and
    ``rows`` (per reduced T: ``val_top1`` / ``after_top1``, the test top-1). Only the validation figures are
    read, so the T that ships is never picked on the images that grade it (tests/compress/test_reduce_t.py)."""
    return choose_T(rows, T0, base["val_top1"], gate, choose, score="val_top1")


def format_table(rows: Sequence[dict[str, Any]], T0: int, base: dict[str, Any], chosen: int, base_file: str) -> str:
    """Markdown table: validation top-1 (what chose) and test top-1 (what is reported) at each T;
    ``base_file``: the baseline's name in the file column (``train/best.pt``)."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [f"| T | val top-1 | test top-1 before fine-tune | test top-1 after | test delta vs T={T0} | "
             f"agreement | file |", "|---|---|---|---|---|---|---|",
             f"| {T0} (baseline){' *' if chosen == T0 else ''} | {pct(base['val_top1'])} | {base['test_top1']:.2f} "
             f"| - | 0.00 | 100.00 | {base_file} |"]
    for r in rows:
        mark = " *" if r["T"] == chosen else ""
        agree = "-" if r.get("agreement") is None else f"{r['agreement']:.2f}"
        lines.append(f"| {r['T']}{mark} | {pct(r.get('val_top1'))} | {r['before_top1']:.2f} | {r['after_top1']:.2f} | "
                     f"{r['after_top1'] - base['test_top1']:+.2f} | {agree} | {r['file']} |")
    lines.append("(* = handed to qat, chosen on the validation split; test top-1 % is reported, never used to "
                 "choose; agreement = % same test prediction as the baseline)")
    return "\n".join(lines)
