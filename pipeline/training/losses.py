"""Losses: cross-entropy on the mean logits, TET, and logit distillation for fewer time steps."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str,
                        label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (loss, mean logits). ``ce``: CE on logits averaged over T (the paper's);
    ``tet``: mean over steps of the per-step CE (Deng et al. 2022), which helps low T."""
    if kind == "tet":
        steps = model.forward_steps(x)  # [T, B, K]
        loss = torch.stack([F.cross_entropy(s, y, label_smoothing=label_smoothing) for s in steps]).mean()
        return loss, steps.mean(0)
    logits = model(x)
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing), logits


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened logits, scaled by T^2 (Hinton et al.)
    so its gradient magnitude does not shrink as the temperature grows."""
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    p_teacher = F.softmax(teacher_logits.detach() / t, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * (t * t)
