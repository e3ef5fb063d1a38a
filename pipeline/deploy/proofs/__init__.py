"""Proving a made graph computes what its model does: parity gates, the TensorRT static check, NIR
round trips, and :mod:`.verify` (export + every check for one graph, what the export stage calls)."""
