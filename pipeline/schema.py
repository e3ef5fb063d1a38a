"""The config schema: every key the pipeline reads, its default and its type.

One table so that validation, `--set` parsing, the docs and each stage's cache key all agree.
A key whose default is ``None`` names its type with :class:`Opt`; a list names its item type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Opt:
    """A value that may be ``None`` (default) or of ``type``."""

    type: type | tuple[type, ...]
    default: Any = None


@dataclass(frozen=True)
class Choice:
    """A string restricted to ``options``."""

    options: tuple[str, ...]
    default: str


@dataclass(frozen=True)
class ListOf:
    """A list whose items are of ``item`` type."""

    item: type | tuple[type, ...]
    default: tuple = ()


@dataclass(frozen=True)
class FreeMap:
    """A mapping with arbitrary keys (e.g. per-dataset extras); only its own type is checked."""

    default: tuple = ()


SCHEMA: dict[str, Any] = {
    "name": Opt(str),  # run folder under artifacts/; defaults to the config file's stem
    "seed": 0,
    "device": Choice(("auto", "cpu", "cuda"), "auto"),
    "artifacts_dir": "artifacts",
    "data": {
        "dataset": Choice(("digits", "cifar10", "cifar100", "imagenet", "cifar10dvs", "dvsgesture", "nmnist"), "digits"),
        "root": Opt(str),  # folder (torchvision layout, ImageFolder, tonic layout) or npz folder
        "format": Choice(("auto", "torchvision", "npz"), "auto"),  # CIFAR only
        "train_file": Opt(str),  # npz overrides (CIFAR / N-MNIST)
        "test_file": Opt(str),
        "download": False,  # torchvision CIFAR only; tonic datasets never download
        "val_fraction": 0.1,
        "image_size": Opt(int),  # None: the dataset's native size
        "limit_train": Opt(int),  # first N training samples (class-balanced where the source is)
        "limit_test": Opt(int),
        "batch_size": 128,
        "eval_batch_size": 256,
        "workers": 0,  # DataLoader workers per process; -1: min(8, CPU cores per process). Not in the cache key
        "prefetch": Opt(int),  # batches each worker loads ahead (None: torch's 2). Not in the cache key
        "cache_dir": Opt(str),  # event-frame cache; None: <root>/frames_cache
        "augment": {
            "crop_padding": 4,
            "flip": True,
            "autoaugment": True,
            "cutout": 0,  # square size in pixels; 0 disables
            "event_affine": True,  # small random translation of event frames
        },
    },
    "model": {
        "arch": Choice(("resnet19", "resnet34", "resnet20"), "resnet19"),
        "width": 1.0,
        "T": 4,
        "neuron": {
            "kind": Choice(("alif", "lif"), "alif"),
            "v_th": 0.5,
            "decay": 0.25,  # M init (alif) or fixed decay (lif)
            "gain": 1.0,  # N init (alif) or fixed gain (lif)
            "surrogate": Choice(("rect", "tanh", "atan"), "rect"),
            "surrogate_width": 1.0,  # rect window width
            "surrogate_k": 3.0,  # tanh/atan sharpness
        },
        "staa": {
            "pe": True,
            "gc": True,
            "sa": True,
            "tsrd": True,
            "tsrd_p": 0.1,
            "gc_fusion": Choice(("mul", "add"), "mul"),
            "gc_ratio": 4,
            "sa_ratio": 4,
            # step attention's hidden width T_h; None: T for T <= 4, max(T // sa_ratio, 1) above.
            # Checkpoints store the built value, so a model carried to another T keeps it.
            "sa_hidden": Opt(int),
            "sa_position": Choice(("before", "after"), "before"),
            "placement": Choice(("all", "last_k"), "all"),
            "last_k": 1,  # stages (from the end) that get STAA when placement == last_k
            # GC ("mul") and SA gates: "identity" = 2*sigmoid(z), last layer zero-initialised (starts
            # as the plain LIF); "legacy" = sigmoid(z), bias 2 (checkpoints written before it)
            "gate": Choice(("identity", "legacy"), "identity"),
        },
    },
    "train": {
        "epochs": 200,
        "optimizer": Choice(("sgd", "adamw"), "sgd"),
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "warmup_epochs": 0,
        "label_smoothing": 0.1,
        "loss": Choice(("ce", "tet"), "ce"),
        "grad_clip": Opt(float),
        "amp": True,  # CUDA mixed precision
        "cpu_bf16": False,  # bf16 autocast on CPU
        # autocast dtype: "auto" = on CUDA (with amp) bf16 where supported, else fp16 + GradScaler;
        # on the CPU bf16 if cpu_bf16, else fp32. "fp32" / "bf16" / "fp16" force it on any device
        "precision": Choice(("auto", "fp32", "bf16", "fp16"), "auto"),
        "compile": False,  # torch.compile the model for training (speed only: not in the cache key)
        "channels_last": False,  # NHWC conv weights on CUDA (speed only: not in the cache key)
        "max_batches": Opt(int),  # cap batches per epoch (smoke runs)
        "eval_every": 1,
        "threads": Opt(int),  # torch CPU threads
    },
    "reduce_t": {
        "steps": ListOf(int, (2, 1)),
        "epochs": 10,
        "lr": 0.01,
        "distill": True,
        "temperature": 4.0,
        "alpha": 0.5,  # weight of the distillation term
        "pe_mode": Choice(("truncate", "interpolate", "mean"), "interpolate"),
        "max_batches": Opt(int),
        "choose": Opt(int),  # T handed to qat; None: the smallest T within validate.gates.reduce_t
    },
    "qat": {
        "epochs": 3,
        "lr": 0.001,
        "calibration_samples": 512,
        "keep_float": ListOf(str, ()),  # kept in float: "stem", "staa", "fc", a module path, or "re:<NNCF op regex>"
        "fold_bn": True,  # fold BN into the convs before quantising (QAT trains the deployed Conv+bias graph)
        "bias_correction": False,  # NNCF fast bias correction; off: it adds spike flips in SNNs (see compress/quantize.py)
        "max_batches": Opt(int),
    },
    "unroll": {
        "parity_images": 256,
        "max_abs_diff": 1e-4,  # logits, on images whose spikes all agree
        "min_spike_agreement": 0.9999,  # per layer, counting the layer's own flips (not cascades)
        "flip_margin": 1e-4,  # a first flip this close to the threshold is rounding, not a bug
    },
    "export": {
        "opset": 18,
        "dynamo": False,
        "parity_images": 256,
        "max_abs_diff": 1e-4,
        "min_spike_agreement": 0.9999,
        "flip_margin": 1e-4,
        # identical spikes leave only the pooled-rate -> FC path: one int8 step of its input
        # rounded differently by ORT and torch fake-quant moves a logit by ~1e-2 (seen: 0.0078)
        "int8_max_abs_diff": 0.05,
        "int8_min_spike_agreement": 0.999,
        # a value on a quantiser's rounding boundary moves by one whole step under a 1-ulp change,
        # so an INT8 graph's first flips sit up to about one activation step from the threshold
        "int8_flip_margin": 0.05,
        "streaming": True,  # one-step graph with explicit membranes; skipped (with reason) for SA models
        "trt_check_strict": True,  # a TensorRT static-check violation fails the stage (else a warning)
    },
    "build": {
        "precisions": ListOf(str, ("fp16", "int8")),
        "min_batch": 1,
        "opt_batch": 8,
        "max_batch": 64,
        "workspace_mb": 1024,
        "fp32_neurons": True,  # keep spike thresholds in FP32 inside FP16 engines
    },
    "validate": {
        "batch_sizes": ListOf(int, (1, 32)),
        "warmup": 5,
        "iterations": 30,
        "threads": 1,
        "min_seconds": 0.5,  # timing also lasts at least this long per batch size (stable p95/p99 for fast graphs)
        "limit_test": Opt(int),  # None: data.limit_test
        # gates compare each row with the artifact it was made from ("parent": the cost of one
        # step) or with the float baseline ("baseline": the cumulative cost)
        "gate_reference": Choice(("parent", "baseline"), "parent"),
        "gates": {  # max top-1 drop (points) of each row vs its reference (gate_reference)
            "reduce_t": 3.0,  # max top-1 drop (points) vs the float baseline
            "qat": 1.0,
            "unroll": 0.0,
            "onnx_fp32": 0.0,
            "onnx_int8": 1.0,
            "engine": 1.0,
            # every row that can ship (ONNX graphs, engines) vs the float baseline: the cumulative
            # cost, so the per-step tolerances above cannot add up unnoticed
            "total": 3.0,
        },
    },
}
