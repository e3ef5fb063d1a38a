"""The config schema: every key the pipeline reads, its default, its type and its bounds.

One table so that validation, `--set` parsing, the docs and each stage's cache key all agree,
and one set of functions over it (:func:`defaults`, :func:`validate`, :func:`deep_merge`,
:func:`resolve`): the config loader, the data library and the model specs all fill and check a
section here, so a default or a bound is written once. A key whose default is ``None`` names its
type with :class:`Opt`; a bounded number is a :class:`Num`; a list names its item type.
Checks that relate two keys (``reduce_t.steps`` < ``model.T``) live in ``pipeline.config``.

Stdlib only: the Makefile imports the stage registry (which may import this) before the venv exists.
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Any, Mapping


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the key and the fix."""


@dataclass(frozen=True)
class Opt:
    """A value that may be ``None`` (default) or of ``type``, at least ``lo`` when given."""

    type: type | tuple[type, ...]
    default: Any = None
    lo: float | None = None
    hint: str = ""  # appended to a bound error: what the values mean


@dataclass(frozen=True)
class Num:
    """A number of the default's type (an int key accepts no float) within ``[lo, hi]``;
    ``lo_open``/``hi_open`` exclude that end."""

    default: int | float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    hint: str = ""  # appended to a bound error: what the values mean

    @property
    def type(self) -> type:
        return type(self.default)


@dataclass(frozen=True)
class Choice:
    """A string restricted to ``options``."""

    options: tuple[str, ...]
    default: str


@dataclass(frozen=True)
class ListOf:
    """A list whose items are of ``item`` type (and among ``options`` when given)."""

    item: type | tuple[type, ...]
    default: tuple = ()
    options: tuple[str, ...] | None = None


@dataclass(frozen=True)
class FreeMap:
    """A mapping with arbitrary keys (e.g. per-dataset extras); only its own type is checked."""

    default: tuple = ()


SCHEMA: dict[str, Any] = {
    "name": Opt(str),  # run folder under artifacts/; defaults to the config file's stem
    "seed": Num(0, lo=0),
    "device": Choice(("auto", "cpu", "cuda"), "auto"),
    "artifacts_dir": "artifacts",
    "data": {
        "dataset": Choice(("digits", "cifar10", "cifar100", "imagenet", "cifar10dvs", "dvsgesture", "nmnist"), "digits"),
        "root": Opt(str),  # folder (torchvision layout, ImageFolder, tonic layout) or npz folder
        "format": Choice(("auto", "torchvision", "npz"), "auto"),  # CIFAR only
        "train_file": Opt(str),  # npz overrides (CIFAR / N-MNIST)
        "test_file": Opt(str),
        "download": False,  # torchvision CIFAR only; tonic datasets never download
        "val_fraction": Num(0.1, lo=0.0, hi=1.0, hi_open=True),
        "image_size": Opt(int, lo=1),  # None: the dataset's native size
        "limit_train": Opt(int, lo=1),  # first N training samples (class-balanced where the source is)
        "limit_test": Opt(int, lo=1),
        "batch_size": Num(128, lo=1),
        "eval_batch_size": Num(256, lo=1),
        # DataLoader workers per process. Not in the cache key
        "workers": Num(0, lo=-1, hint="0: load in the main process; -1: min(8, CPU cores per process)"),
        "prefetch": Opt(int, lo=1),  # batches each worker loads ahead (None: torch's 2). Not in the cache key
        "cache_dir": Opt(str),  # event-frame cache; None: <artifacts_dir>/frames_cache
        "augment": {
            "crop_padding": Num(4, lo=0),
            "flip": True,
            "autoaugment": True,
            "cutout": Num(0, lo=0),  # square size in pixels; 0 disables
            "event_affine": True,  # small random translation of event frames
        },
    },
    "model": {
        "arch": Choice(("resnet19", "resnet34", "resnet20"), "resnet19"),
        "width": Num(1.0, lo=0.0, hi=4.0, lo_open=True),  # channel multiplier
        "T": Num(4, lo=1),  # time steps of the trained model
        "neuron": {
            "kind": Choice(("alif", "lif"), "alif"),
            "v_th": Num(0.5, lo=0.0, lo_open=True),
            "decay": 0.25,  # M init (alif) or fixed decay (lif)
            "gain": 1.0,  # N init (alif) or fixed gain (lif)
            "surrogate": Choice(("rect", "tanh", "atan"), "rect"),
            "surrogate_width": Num(1.0, lo=0.0, lo_open=True),  # rect window width
            "surrogate_k": Num(3.0, lo=0.0, lo_open=True),  # tanh/atan sharpness
            "reset": Choice(("hard", "soft"), "hard"),  # after a spike: U = H (1 - S) (to 0) or U = H - S v_th
        },
        "staa": {
            "pe": True,
            "gc": True,
            "sa": True,
            "tsrd": True,
            "tsrd_p": Num(0.1, lo=0.0, hi=1.0, hi_open=True),
            "gc_fusion": Choice(("mul", "add"), "mul"),
            "gc_ratio": Num(4, lo=1),
            "sa_ratio": Num(4, lo=1),
            # step attention's hidden width T_h; None: T for T <= 4, max(T // sa_ratio, 1) above.
            # Checkpoints store the built value, so a model carried to another T keeps it.
            "sa_hidden": Opt(int, lo=1),
            "sa_position": Choice(("before", "after"), "before"),
            # "full": the paper's SA (every step's gate reads all T steps); "causal": step t's gate reads
            # steps <= t only (T -> T -> T, lower-triangular weights), so the model can stream
            "sa_mode": Choice(("full", "causal"), "full"),
            "placement": Choice(("all", "last_k"), "all"),
            "last_k": Num(1, lo=0),  # stages (from the end) that get STAA when placement == last_k
            # GC ("mul") and SA gates: "identity" = 2*sigmoid(z), last layer zero-initialised (starts
            # as the plain LIF); "legacy" = sigmoid(z), bias 2 (checkpoints written before it)
            "gate": Choice(("identity", "legacy"), "identity"),
        },
    },
    "train": {
        "epochs": Num(200, lo=1),
        "optimizer": Choice(("sgd", "adamw"), "sgd"),
        "lr": Num(0.1, lo=0.0, lo_open=True),
        "momentum": Num(0.9, lo=0.0, hi=1.0, hi_open=True),
        "weight_decay": Num(1e-4, lo=0.0),
        "warmup_epochs": Num(0, lo=0),
        "label_smoothing": Num(0.1, lo=0.0, hi=1.0, hi_open=True),
        "loss": Choice(("ce", "tet"), "ce"),
        "grad_clip": Opt(float, lo=0.0),
        "amp": True,  # CUDA mixed precision
        "cpu_bf16": False,  # bf16 autocast on CPU
        # autocast dtype: "auto" = on CUDA (with amp) bf16 where supported, else fp16 + GradScaler;
        # on the CPU bf16 if cpu_bf16, else fp32. "fp32" / "bf16" / "fp16" force it on any device
        "precision": Choice(("auto", "fp32", "bf16", "fp16"), "auto"),
        "compile": False,  # torch.compile the model for training (speed only: not in the cache key)
        "channels_last": False,  # NHWC conv weights on CUDA (speed only: not in the cache key)
        # the neurons' fused training loop: "auto" = Triton kernels on CUDA (where triton imports), torch
        # elsewhere; the same spikes either way (speed only: not in the cache key). pipeline/models/kernels.
        # Default torch until a GPU run has checked the Triton kernels on CUDA (so far: Triton's CPU interpreter)
        "kernels": Choice(("auto", "triton", "torch"), "torch"),
        "max_batches": Opt(int, lo=1),  # cap batches per epoch (smoke runs)
        "eval_every": Num(1, lo=1),
        "threads": Opt(int, lo=0),  # torch CPU threads (None or 0: torch's default)
    },
    "reduce_t": {
        "steps": ListOf(int, (2, 1)),
        "epochs": Num(10, lo=0),  # 0: no fine-tuning
        "lr": Num(0.01, lo=0.0, lo_open=True),
        "distill": True,
        "temperature": Num(4.0, lo=0.0, lo_open=True),
        "alpha": Num(0.5, lo=0.0, hi=1.0),  # weight of the distillation term
        "pe_mode": Choice(("truncate", "interpolate", "mean"), "interpolate"),
        "max_batches": Opt(int, lo=1),
        "choose": Opt(int, lo=1),  # T handed to qat; None: the smallest T within validate.gates.reduce_t
    },
    "qat": {
        "epochs": Num(3, lo=0),  # 0: post-training quantisation only
        "lr": Num(0.001, lo=0.0, lo_open=True),
        "calibration_samples": Num(512, lo=1),
        "keep_float": ListOf(str, ()),  # kept in float: "stem", "staa", "fc", a module path, or "re:<NNCF op regex>"
        "fold_bn": True,  # fold BN into the convs before quantising (QAT trains the deployed Conv+bias graph)
        "bias_correction": False,  # NNCF fast bias correction; off: it adds spike flips in SNNs (see compress/quantize.py)
        "max_batches": Opt(int, lo=1),
    },
    "unroll": {
        "parity_images": Num(256, lo=1),
        "max_abs_diff": Num(1e-4, lo=0.0),  # logits, on images whose spikes all agree
        "min_spike_agreement": Num(0.9999, lo=0.0, hi=1.0),  # per layer, counting the layer's own flips (not cascades)
        "flip_margin": Num(1e-4, lo=0.0),  # a first flip this close to the threshold is rounding, not a bug
        # at most this share of the images may diverge by such flips: rounding flips are rare, a
        # systematic shift is not (pipeline/deploy/proofs/parity.py)
        "max_numerical_share": Num(0.05, lo=0.0, hi=1.0),
    },
    "export": {
        "opset": Num(18, lo=13, hint="ONNX opsets below 13 lack per-channel QuantizeLinear"),
        "dynamo": False,
        "parity_images": Num(256, lo=1),
        "max_abs_diff": Num(1e-4, lo=0.0),
        "min_spike_agreement": Num(0.9999, lo=0.0, hi=1.0),
        "flip_margin": Num(1e-4, lo=0.0),
        # share of the parity images allowed to diverge by rounding-level flips (correct FP32 exports: 1 and 2
        # of 256 on the trained default; every threshold 1e-4 low: 240 of 256)
        "max_numerical_share": Num(0.05, lo=0.0, hi=1.0),
        # identical spikes leave only the pooled-rate -> FC path: one int8 step of its input
        # rounded differently by ORT and torch fake-quant moves a logit by ~1e-2 (seen: 0.0078)
        "int8_max_abs_diff": Num(0.05, lo=0.0),
        "int8_min_spike_agreement": Num(0.999, lo=0.0, hi=1.0),
        # a value on a quantiser's rounding boundary moves by one whole step under a 1-ulp change,
        # so an INT8 graph's first flips sit up to about one activation step from the threshold
        "int8_flip_margin": Num(0.05, lo=0.0),
        "int8_max_numerical_share": Num(0.1, lo=0.0, hi=1.0),  # correct INT8 exports of the default: 0 of 256
        "streaming": True,  # one-step graph with explicit membranes; skipped (with reason) for SA models
        "trt_check_strict": True,  # a TensorRT static-check violation fails the stage (else a warning)
    },
    "build": {
        "precisions": ListOf(str, ("fp16", "int8"), options=("fp32", "fp16", "int8")),
        "min_batch": Num(1, lo=1),
        "opt_batch": Num(8, lo=1),
        "max_batch": Num(64, lo=1),
        "workspace_mb": Num(1024, lo=1),
        "fp32_neurons": True,  # keep spike thresholds in FP32 inside FP16 engines
    },
    "validate": {
        "batch_sizes": ListOf(int, (1, 32)),
        "warmup": Num(5, lo=0),
        "iterations": Num(30, lo=1),
        "threads": Num(1, lo=0),
        "min_seconds": Num(0.5, lo=0.0),  # timing also lasts at least this long per batch size (stable p95/p99 for fast graphs)
        "limit_test": Opt(int, lo=1),  # None: data.limit_test
        # gates compare each row with the artifact it was made from ("parent": the cost of one
        # step) or with the float baseline ("baseline": the cumulative cost)
        "gate_reference": Choice(("parent", "baseline"), "parent"),
        "gates": {  # max top-1 drop (points) of each row vs its reference (gate_reference)
            "reduce_t": 3.0,  # max top-1 drop (points) vs the float baseline
            "qat": 1.0,
            # rows that must equal their parent (unroll, FP32 graphs) are held to validate.changed below; their
            # accuracy gate is the same share, so it never passes what the agreement gate refuses
            "unroll": 0.25,
            "onnx_fp32": 0.5,
            "onnx_int8": 1.0,
            "engine": 1.0,
            # every row that can ship (ONNX graphs, engines) vs the float baseline: the cumulative
            # cost, so the per-step tolerances above cannot add up unnoticed
            "total": 3.0,
        },
        # identity rows (registry Output.identity): the largest share (percent of the test images, rounded up
        # to whole images) whose prediction may differ from the parent's. Measured on correct runs:
        # cifar10_small's 2,000 test images, ONNX Runtime FP32 0 and OpenVINO FP32 1 changed; every threshold
        # 1e-4 low changed about 0.8% of the images
        "changed": {
            "unroll": 0.25,  # torch vs torch with BN folded: another summation order (cifar10_small: 2 of 2,000 changed)
            "onnx_fp32": 0.5,
            "onnx_int8": 0.5,  # ONNX Runtime's exact Q/DQ vs torch fake-quant: an int8 rounding boundary moves a step
            # a runtime running the INT8 file (OpenVINO) vs the file's exact Q/DQ numbers (ONNX Runtime): its own
            # kernels are not exact (measured: default 0 of 360, cifar10_small 15 of 2,000; nmnist.yaml sets its own)
            "runtime_int8": 2.0,
        },
        # identity keys whose largest logit difference is gated too (always recorded): empty by default
        "max_logit_diff": FreeMap(),
        # adaptive time steps on the streaming graphs (pipeline/report/steps.py): tau is chosen on the validation
        # split (smallest mean steps within gates.reduce_t of the full-T graph), scored on test
        "early_exit": {
            "criterion": Choice(("softmax", "margin"), "softmax"),  # top softmax probability, or top-1 minus top-2
            "latency_samples": Num(50, lo=1),  # test samples timed one by one at batch 1 with the exit on
        },
    },
}


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return " or ".join(x.__name__ for x in t)
    return t.__name__


def defaults(node: Any = SCHEMA) -> Any:
    """The default value tree of a schema node (the whole schema: a plain nested dict)."""
    if isinstance(node, dict):
        return {k: defaults(v) for k, v in node.items()}
    if isinstance(node, ListOf):
        return list(node.default)
    if isinstance(node, FreeMap):
        return dict(node.default)
    if isinstance(node, (Opt, Num, Choice)):
        return node.default
    return node


def node(dotted: str) -> Any:
    """The schema node at ``dotted`` (``"model.staa"``); KeyError names the missing part."""
    out: Any = SCHEMA
    for part in dotted.split("."):
        if not isinstance(out, dict) or part not in out:
            raise KeyError(f"no config section {dotted!r} in pipeline/schema.py (at {part!r})")
        out = out[part]
    return out


def _check_scalar(path: str, value: Any, expected: type | tuple[type, ...]) -> Any:
    """Check one value; ints are accepted (and converted) where floats are expected."""
    exp = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in exp:
        raise ConfigError(f"{path}: expected {_type_name(expected)}, got a boolean ({value!r})")
    if float in exp and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in exp and isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, exp):
        raise ConfigError(
            f"{path}: expected {_type_name(expected)}, got {type(value).__name__} ({value!r})"
        )
    return value


def _fmt(x: float) -> str:
    return f"{x:g}"


def _check_bounds(path: str, value: float, lo: float | None, hi: float | None,
                  lo_open: bool = False, hi_open: bool = False, hint: str = "") -> None:
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    high_bad = hi is not None and (value >= hi if hi_open else value > hi)
    if not (low_bad or high_bad):
        return
    if hi is None:
        need = f"{'>' if lo_open else '>='} {_fmt(lo)}"
    elif lo is None:
        need = f"{'<' if hi_open else '<='} {_fmt(hi)}"
    else:
        need = f"in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    raise ConfigError(f"{path}: must be {need}, got {value!r}" + (f" ({hint})" if hint else ""))


def _check_choice(path: str, value: Any, options: tuple[str, ...]) -> Any:
    if value not in options:
        close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.4)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{path}: {value!r} is not one of {list(options)}{hint}")
    return value


def _check_value(path: str, value: Any, spec: Any) -> Any:
    """One leaf value checked against its schema node; returns it (ints made floats where floats are expected)."""
    if isinstance(spec, Opt):
        if value is None:
            return None
        value = _check_scalar(path, value, spec.type)
        if spec.lo is not None:
            _check_bounds(path, value, spec.lo, None, hint=spec.hint)
        return value
    if isinstance(spec, Num):
        value = _check_scalar(path, value, spec.type)
        _check_bounds(path, value, spec.lo, spec.hi, spec.lo_open, spec.hi_open, spec.hint)
        return value
    if isinstance(spec, Choice):
        return _check_choice(path, value, spec.options)
    if isinstance(spec, ListOf):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list of {_type_name(spec.item)}, got {value!r}")
        items = [_check_scalar(f"{path}[{i}]", v, spec.item) for i, v in enumerate(value)]
        bad = [v for v in items if spec.options is not None and v not in spec.options]
        if bad:
            raise ConfigError(f"{path}: {bad} not in {list(spec.options)}")
        return items
    if isinstance(spec, FreeMap):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    return _check_scalar(path, value, type(spec))


def validate(tree: Any, schema: Mapping[str, Any] = SCHEMA, prefix: str = "") -> dict[str, Any]:
    """Check a (partial) config tree against ``schema``: unknown keys (with the closest valid one),
    types, choices and bounds. Returns the checked tree; missing keys stay missing."""
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(tree).__name__}")
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1, cutoff=0.5)
            hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
            valid = ", ".join(sorted(schema))
            raise ConfigError(f"unknown key '{path}'{hint} (valid keys here: {valid})")
        spec = schema[key]
        if isinstance(spec, dict):
            out[key] = validate(value if value is not None else {}, spec, path)
        else:
            out[key] = _check_value(path, value, spec)
    return out


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base`` (mappings merge, the rest replaces)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve(section: str, partial: Mapping[str, Any] | None) -> dict[str, Any]:
    """A config section (``"data"``, ``"model"``) from a partial mapping: validated, then merged over
    the schema defaults. What library callers (tests, checkpoints) use where no full config exists."""
    spec = node(section)
    return deep_merge(defaults(spec), validate(partial or {}, spec, section))
