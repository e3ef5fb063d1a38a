"""Validation report: measure every artifact of a run, gate it, write report.md/.json and plots.

- :mod:`.inventory`: list a run's artifacts (how to open each, its gate and parent).
- :mod:`.measure`: accuracy, agreement inputs, latency/throughput, ops and the executed
  precision of one artifact, through the one runner interface of :mod:`pipeline.runtime`.
- :mod:`.energy`: MACs per layer by forward hooks, SOPs from input firing rates, energy estimate.
- :mod:`.gates`: delta, agreement and pass/fail per row.
- :mod:`.report_json` (versioned schema), :mod:`.report_md`, :mod:`.plots`: the outputs.
"""
from __future__ import annotations

from .energy import CONVENTION, E_AC_PJ, E_MAC_PJ, E_MUL_PJ, EXCLUDED, LayerOps, count_ops, profile_ops, summarize
from .gates import apply_gates
from .inventory import Artifact, discover, upstream_parity
from .measure import Settings, executed, inherit_energy, measure, measure_speed
from .report_json import SCHEMA_VERSION, build_report, validate_report
from .report_md import fake_quant, render

__all__ = [
    "CONVENTION", "E_AC_PJ", "E_MAC_PJ", "E_MUL_PJ", "EXCLUDED", "SCHEMA_VERSION", "Artifact", "LayerOps", "Settings",
    "apply_gates", "build_report", "count_ops", "discover", "executed", "fake_quant", "inherit_energy", "measure", "measure_speed",
    "profile_ops", "render", "summarize", "upstream_parity", "validate_report",
]
