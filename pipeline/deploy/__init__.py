"""Deployment: unroll trained models into static graphs, export ONNX, check them for TensorRT.

- :mod:`.unroll`: static, stateless copies of the float and QAT models (fixed T, BN folded,
  hard spikes, TSRD off) and their save/load format.
- :mod:`.parity`: the gates that prove a transformed model still computes the same thing
  (logits max-abs diff, top-1 identity, per-layer spike agreement).
- :mod:`.onnx_export`: ONNX export (legacy exporter by default), checker + shape inference,
  metadata, and a spike-probe graph for per-layer agreement in ONNX Runtime.
- :mod:`.streaming`: a one-time-step graph with explicit membrane state for event streams.
- :mod:`.trt_check`: a static TensorRT-compatibility check of an ONNX file (no TensorRT needed).
- :mod:`.trt_script`: the trtexec build script and the Jetson guide for targets with TensorRT.
- :mod:`.bundle`: the self-contained folder (ONNX, sample inputs, runner) copied to a device.
- :mod:`.verify`: export + every check for one graph (what the export stage calls).
- :mod:`.nir_export`: the NIR graph of a plain-LIF model (neuron mapping, blockers named, nir round trip).
- :mod:`.nir_readers`: that graph imported and run by snnTorch and Norse, for round-trip parity.

Test-only helpers (a freshly built SNN whose every layer fires; a minimal symmetric Q/DQ model in
TensorRT's explicit-quantisation form) live in ``tests/helpers``, outside the package.

Engine building and running live in :mod:`pipeline.runtime`, which is self-contained so
it can be copied next to the ONNX files onto a Jetson.
"""
