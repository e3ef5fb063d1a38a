"""Compression between training and deployment: fewer time steps, then INT8 QAT.

- ``timesteps``: carry a trained net to fewer steps (position encoding resampled), the
  distillation step loss, and the rule that picks which T goes on to quantisation.
- ``quantize``: NNCF 3.4 INT8 quantisation (TensorRT-style: symmetric, per-channel weights,
  per-tensor activations, no overflow fix, neuron internals excluded) and its checkpoints.
- ``qdq``: turn a quantised model into a plain torch module whose quantisers export as
  ONNX QuantizeLinear/DequantizeLinear pairs (never OpenVINO's FakeQuantize).

The deployment stages need one call: ``pipeline.compress.quantize.load_qat_model(path)``.
"""
