"""Making deployable graphs: unrolled torch modules, ONNX (whole-sequence and one-step), compaction, NIR.

Imports nothing from :mod:`..proofs` or :mod:`..packaging` (they read what this package makes).
"""
