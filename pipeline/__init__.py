"""STAA-SNN deployment pipeline: train -> reduce T -> INT8 QAT -> unroll -> ONNX -> TensorRT -> validate."""
__version__ = "0.5.0"
