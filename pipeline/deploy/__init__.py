"""Deployment, by job: make static graphs, prove them, package them for a device.

The three subpackages depend one way: ``proofs`` and ``packaging`` read what ``graphs`` makes;
``graphs`` imports neither, and ``packaging`` does not import ``proofs``.

- :mod:`.graphs` (making): :mod:`~.graphs.unroll` (static, stateless copies of the float and QAT
  models: fixed T, BN folded, hard spikes, TSRD off, and their save/load format),
  :mod:`~.graphs.onnx_export` (ONNX export, checker + shape inference, metadata, the spike-probe
  graph), :mod:`~.graphs.compact` (int8 weight initializers, onnxslim, checked),
  :mod:`~.graphs.streaming` (the one-time-step graph with explicit state),
  :mod:`~.graphs.nir_export` (the NIR graph of a plain-LIF model, blockers named).
- :mod:`.proofs` (proving): :mod:`~.proofs.parity` (the gates: logits max-abs diff, top-1 identity,
  per-layer spike agreement), :mod:`~.proofs.trt_check` (static TensorRT-compatibility check, no
  TensorRT needed), :mod:`~.proofs.nir_readers` (the NIR graph run by snnTorch and Norse, for
  round-trip parity), :mod:`~.proofs.verify` (export + every check for one graph: what the export
  stage calls).
- :mod:`.packaging` (shipping): :mod:`~.packaging.bundle` (the self-contained device folder: graphs,
  sample inputs, the standalone runner), :mod:`~.packaging.trt_script` (the trtexec build script
  and JETSON.md), :mod:`~.packaging.openvino_guide` (INTEL.md).

Engine building and running, the ONNX graph index these modules share
(:mod:`pipeline.runtime.onnx_graph`) and OpenVINO's Q/DQ adaptation
(:mod:`pipeline.runtime.backends.openvino_qdq`) live in :mod:`pipeline.runtime`, which is
self-contained so it can be copied next to the ONNX files onto a device.

A freshly built SNN whose every layer fires (for tests and benchmarks) is :mod:`pipeline.testing`;
a minimal symmetric Q/DQ model in TensorRT's explicit-quantisation form lives in ``tests/helpers``,
outside the package.
"""
