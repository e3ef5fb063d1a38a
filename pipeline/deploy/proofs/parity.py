"""Parity gates: does a transformed model (unrolled, ONNX, engine) still compute the same thing?

Why the gates look past the raw numbers: a spike threshold is discontinuous. Two correct
implementations differ by float rounding (conv accumulation order, a folded BN) of ~1e-7, and
once in a few hundred thousand neuron updates a membrane sits closer than that to the threshold:
one spike flips, and the flip cascades through every later layer and into the logits (measured
on digits: one flip at the stem ends as 0.2% disagreement in the last layer and a 0.07 logit
change). Raw agreement and raw max-abs-diff then measure the network's chaos, not the export.
So each sample is classified by its *first divergence* (the earliest neuron layer, in forward
order, whose spikes differ; its inputs are still identical, so any flip there comes from the
layer's own arithmetic):

- clean: identical spikes everywhere;
- numerical: every flip at the first divergence (that layer's first differing time step: later
  steps differ through the layer's own membrane state) had a reference membrane within
  ``flip_margin`` of the threshold (needs the reference's membranes: torch references record
  them); later differences are its cascade;
- real: a flip at the first divergence far from the threshold, i.e. a wrong computation.

Gates (:meth:`ParityReport.failures`):
- top-1 identical on every sample, except (a) a near-tie: the candidate picked a class whose
  reference logit is within ``tie_tol`` of the reference's maximum (any other new class is a
  mismatch, however close the reference's top two were), and (b) samples whose first divergence
  is numerical: their top-1 change is the cascade of a rounding-level flip (counted as
  ``top1_changed_by_numerical_flip``: measured on the trained default, one such image in 256 after
  15 epochs, with logits max diff 9.5e-7 on the clean ones);
- the excuse (b) is bounded: at most ``max_numerical_share`` of the images may diverge
  numerically. Rounding flips are rare (a correct FP32 export: 2 of 256 images, worst margin
  6e-8), a systematic error is not: every threshold 1e-4 too low makes 240 of 256 images
  diverge, each flip within the margin. The share is recorded with its cap;
- logits max abs diff ``<= max_abs_diff`` on clean samples;
- per-layer *local* spike agreement ``>= min_spike_agreement``: the differences of a layer counted
  only in samples whose first divergence is that layer (a layer's own flip rate);
- no real sample.
Raw numbers over all samples (agreement with cascades, max abs diff) are reported too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from pipeline.models import recording
from pipeline.precision import strict_fp32


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


@dataclass
class ParityReport:
    """Accumulates one reference-vs-candidate comparison; see the module docstring."""

    tie_tol: float = 0.0
    flip_margin: float = 1e-4
    max_numerical_share: float = 1.0  # of the images; the export and unroll stages set it from their config
    n: int = 0
    max_abs_diff_all: float = 0.0
    max_abs_diff_clean: float = 0.0
    sum_abs_diff: float = 0.0
    n_values: int = 0
    top1_mismatches: int = 0
    top1_mismatches_beyond_tol: int = 0
    top1_changed_by_numerical_flip: int = 0
    top1_tie_excused: int = 0  # top-1 changed to a class tied (within tie_tol) with the reference's winner
    clean: int = 0
    numerical: int = 0
    real: int = 0
    worst_first_flip_margin: float = 0.0  # over numerical and real samples: |h - v_th| at the first divergence
    first_divergence: dict[str, int] = field(default_factory=dict)  # layer -> samples diverging there first
    spike_equal: dict[str, int] = field(default_factory=dict)
    spike_total: dict[str, int] = field(default_factory=dict)
    local_diff: dict[str, int] = field(default_factory=dict)
    spikes_compared: bool = False

    def update(self, ref_logits: Any, logits: Any, ref_spikes: Mapping[str, Any] | None = None,
               spikes: Mapping[str, Any] | None = None, ref_membranes: Mapping[str, Any] | None = None) -> None:
        """Add one batch. Spikes and membranes (``h - v_th``) are ``{layer: [T, B, ...]}`` in forward order."""
        ref, out = _np(ref_logits).astype(np.float64), _np(logits).astype(np.float64)
        if ref.shape != out.shape:
            raise ValueError(f"logit shapes differ: reference {ref.shape}, candidate {out.shape}")
        batch = ref.shape[0]
        diff = np.abs(ref - out)
        self.n += batch
        self.max_abs_diff_all = max(self.max_abs_diff_all, float(diff.max(initial=0.0)))
        self.sum_abs_diff += float(diff.sum())
        self.n_values += diff.size
        choice = out.argmax(1)
        mismatch = ref.argmax(1) != choice
        self.top1_mismatches += int(mismatch.sum())
        # a tie excuses only a choice among the tied classes: the candidate's class must score within
        # tie_tol of the reference's best in the reference's own logits
        tied_choice = ref[np.arange(batch), choice] >= ref.max(1) - self.tie_tol
        clean = np.ones(batch, bool)
        numerical = np.zeros(batch, bool)
        if ref_spikes is not None and spikes is not None:
            clean, numerical = self._spikes(ref_spikes, spikes, ref_membranes, batch)
        beyond = mismatch & ~tied_choice
        self.top1_tie_excused += int((mismatch & tied_choice).sum())
        self.top1_mismatches_beyond_tol += int((beyond & ~numerical).sum())
        self.top1_changed_by_numerical_flip += int((beyond & numerical).sum())
        self.clean += int(clean.sum())
        if clean.any():
            self.max_abs_diff_clean = max(self.max_abs_diff_clean, float(diff[clean].max()))

    def _spikes(self, ref_spikes: Mapping[str, Any], spikes: Mapping[str, Any],
                membranes: Mapping[str, Any] | None, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Classify each sample; returns (clean, numerical) masks."""
        self.spikes_compared = True
        numerical = np.zeros(batch, bool)
        names = list(ref_spikes)
        if set(names) != set(spikes):
            raise ValueError(f"spike layers differ between reference and candidate: "
                             f"{sorted(set(names) ^ set(spikes))[:5]}")
        first = np.full(batch, -1)
        differs: dict[str, np.ndarray] = {}
        for i, name in enumerate(names):
            r, s = _np(ref_spikes[name]), _np(spikes[name])
            if r.shape != s.shape:
                raise ValueError(f"spike shapes differ for {name}: {r.shape} vs {s.shape}")
            d = (r != s).reshape(r.shape[0], r.shape[1], -1)  # [T, B, rest]
            differs[name] = d
            self.spike_equal[name] = self.spike_equal.get(name, 0) + int(d.size - d.sum())
            self.spike_total[name] = self.spike_total.get(name, 0) + d.size
            self.local_diff.setdefault(name, 0)
            hit = d.any(axis=(0, 2)) & (first < 0)
            first[hit] = i
        for b in np.flatnonzero(first >= 0):
            name = names[first[b]]
            self.first_divergence[name] = self.first_divergence.get(name, 0) + 1
            self.local_diff[name] += int(differs[name][:, b].sum())
            if membranes is None:
                # cannot tell without membranes: counted as numerical, margin unknown; its top-1 is still gated
                self.numerical += 1
                continue
            # only the first diverging step: later steps of the same layer differ through its own state
            d = differs[name][:, b]  # [T, rest]
            t0 = int(np.flatnonzero(d.any(axis=1))[0])
            h = _np(membranes[name]).reshape(d.shape[0], batch, -1)[t0, b]
            worst = float(np.abs(h[d[t0]]).max())
            self.worst_first_flip_margin = max(self.worst_first_flip_margin, worst)
            if worst <= self.flip_margin:
                self.numerical += 1
                numerical[b] = True
            else:
                self.real += 1
        return first < 0, numerical

    @property
    def numerical_share(self) -> float:
        """Share of the images excused as diverging by rounding (0 when none was compared)."""
        return self.numerical / self.n if self.n else 0.0

    @property
    def max_abs_diff(self) -> float:
        """Logits max abs diff on clean samples (all samples when spikes were not compared)."""
        return self.max_abs_diff_clean if self.spikes_compared else self.max_abs_diff_all

    @property
    def mean_abs_diff(self) -> float:
        return self.sum_abs_diff / max(self.n_values, 1)

    @property
    def spike_agreement(self) -> dict[str, float]:
        """Raw per-layer agreement over all samples, cascades included."""
        return {k: self.spike_equal[k] / max(self.spike_total[k], 1) for k in self.spike_equal}

    @property
    def local_spike_agreement(self) -> dict[str, float]:
        """Per-layer agreement counting only the layer's own first-divergence flips."""
        return {k: 1 - self.local_diff.get(k, 0) / max(self.spike_total[k], 1) for k in self.spike_total}

    @property
    def min_spike_agreement(self) -> float | None:
        agree = self.spike_agreement
        return min(agree.values()) if agree else None

    @property
    def min_local_spike_agreement(self) -> float | None:
        agree = self.local_spike_agreement
        return min(agree.values()) if agree else None

    def failures(self, max_abs_diff: float, min_spike_agreement: float | None, what: str) -> list[str]:
        """Gate messages (empty when every gate passes); see the module docstring."""
        if self.n == 0:
            return [f"{what}: no images were compared"]
        out = []
        if self.top1_mismatches_beyond_tol:
            out.append(f"{what}: top-1 differs on {self.top1_mismatches_beyond_tol}/{self.n} images, each to a class "
                       f"more than {self.tie_tol:g} below the reference's best (no tie) and not after a rounding flip")
        if self.spikes_compared and self.clean == 0:
            out.append(f"{what}: no image kept identical spikes ({self.numerical} diverged numerically, "
                       f"{self.real} for real)")
        elif self.max_abs_diff > max_abs_diff:
            out.append(f"{what}: logits max abs diff {self.max_abs_diff:.3g} > {max_abs_diff:g} on images with "
                       f"identical spikes")
        local = self.min_local_spike_agreement
        if min_spike_agreement is not None and local is not None and local < min_spike_agreement:
            layer = min(self.local_spike_agreement, key=self.local_spike_agreement.get)
            out.append(f"{what}: spike agreement of layer {layer} on its own flips {local:.6f} < {min_spike_agreement}")
        if self.spikes_compared and self.numerical_share > self.max_numerical_share:
            out.append(f"{what}: {self.numerical}/{self.n} images diverge within the flip margin "
                       f"{self.flip_margin:g} of a threshold, more than the {self.max_numerical_share:.1%} rounding "
                       f"explains: a systematic shift (e.g. a threshold or scale off by a little), not rounding")
        if self.real:
            layers = ", ".join(sorted(self.first_divergence))
            out.append(f"{what}: {self.real}/{self.n} images first diverge with a membrane "
                       f"{self.worst_first_flip_margin:.3g} from the threshold (> flip margin {self.flip_margin:g}): "
                       f"a real mismatch, not rounding (first diverging layers: {layers})")
        return out

    def metrics(self) -> dict[str, Any]:
        return {
            "n": self.n, "max_abs_diff": self.max_abs_diff, "max_abs_diff_all": self.max_abs_diff_all,
            "mean_abs_diff": self.mean_abs_diff, "top1_mismatches": self.top1_mismatches,
            "top1_mismatches_beyond_tol": self.top1_mismatches_beyond_tol, "tie_tol": self.tie_tol,
            "top1_changed_by_numerical_flip": self.top1_changed_by_numerical_flip,
            "top1_tie_excused": self.top1_tie_excused,
            "numerical_share": self.numerical_share, "max_numerical_share": self.max_numerical_share,
            "samples_clean": self.clean, "samples_numerical_flip": self.numerical, "samples_real_mismatch": self.real,
            "flip_margin": self.flip_margin, "worst_first_flip_margin": self.worst_first_flip_margin,
            "first_divergence": dict(self.first_divergence),
            "min_spike_agreement": self.min_spike_agreement, "min_local_spike_agreement": self.min_local_spike_agreement,
            "spike_agreement": {k: round(v, 8) for k, v in self.spike_agreement.items()},
        }


SpikeFn = Callable[[Any], tuple]  # x -> (logits, {layer: spikes}[, {layer: h - v_th}])


def torch_with_spikes(model: Any, membranes: bool = True) -> SpikeFn:
    """``x -> (logits, spikes, membranes)`` for a torch model, from the neurons' step hook
    (:func:`pipeline.models.recording`; ``membranes=False``: None in their place), computed in strict FP32
    (no TF32: see :mod:`pipeline.precision`)."""
    @torch.no_grad()
    def run(x: Any) -> tuple:
        with strict_fp32(), recording(model) as rec:
            logits = model(x)
        return logits, rec.spikes, rec.membranes if membranes else None

    return run


def compare(reference: SpikeFn, candidate: SpikeFn, batches: Iterable[Any], tie_tol: float,
            flip_margin: float = 1e-4, spikes: bool = True, max_numerical_share: float = 1.0) -> ParityReport:
    """Run both on every input batch (``x`` or ``(x, y)``) and accumulate a :class:`ParityReport`.

    The reference's membranes (third element, when it returns one) classify the flips. Both run in
    strict FP32: with TF32 (cuDNN's default for convolutions on Ampere and newer) a conv differs by
    ~5e-4, more than ``flip_margin``, so rounding would pass for real mismatches.
    """
    report = ParityReport(tie_tol=tie_tol, flip_margin=flip_margin, max_numerical_share=max_numerical_share)
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        with strict_fp32():
            ref = reference(x)
            cand = candidate(x)
        ref_membranes = ref[2] if len(ref) > 2 else None
        if spikes:
            report.update(ref[0], cand[0], ref[1], cand[1], ref_membranes)
        else:
            report.update(ref[0], cand[0])
    return report
