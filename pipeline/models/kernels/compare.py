"""The Triton neuron kernels vs the torch path, as one JSON report (run by tests/models/test_triton_kernels.py and
bench/gpu_check_parts.py; ``python -m pipeline.models.kernels.compare --device cuda`` checks a GPU).

Run as a script in its own process: it sets ``TRITON_INTERPRET=1`` before Triton is imported (Triton
reads it when the kernels are defined), so the kernels run in Triton's numpy interpreter on the CPU, and
no other test's process ever sees the variable. With ``--device cuda`` (bench/gpu_check_parts.py) the
same comparisons run compiled on a GPU, which is where FMA contraction could differ: the interpreter
rounds every product and sum on its own whatever the kernel asks.

For each case: spikes and the fp32 membranes saved for backward, compared bit for bit with
``neurons.MultiStepLIF``; the input and parameter gradients as max |a - b| / max |b| over the tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
# max |a - b| / max |b| of a gradient, Triton vs torch path
NEURON_GRAD_RTOL = 2e-6  # one fp32 layer: measured up to 4.3e-7 (ALIF gain, tanh); tanh/atan use other formulas
NET_GRAD_RTOL = 5e-5  # a whole net (tests/models/test_fused_step.py holds the torch path to it); measured 3.2e-6
LOW_PRECISION_RTOL = {"torch.bfloat16": 2.0 ** -7, "torch.float16": 2.0 ** -10}  # one ulp of the input's dtype


def failures(rows: list[dict[str, Any]]) -> list[str]:
    """What in a report breaks the claims (bench/gpu_check_parts.py; the tests assert each on its own)."""
    bad = []
    for r in rows:
        c = r["case"]
        if c == "eval-paths":
            if r["loaded_by_eval"] or r["loaded_by_trace"]:
                bad.append(f"{c}: evaluation or tracing loaded the kernels")
            continue
        if c.startswith("net-"):
            if not r["logits_equal"] or r["grad_worst_rel"] > NET_GRAD_RTOL:
                bad.append(f"{c}: logits equal {r['logits_equal']}, worst grad {r['grad_worst_rel']:.2e}")
            continue
        if not r["spikes_equal"] or not r.get("membranes_equal", True):
            bad.append(f"{c}: spikes or membranes differ")
        tol = LOW_PRECISION_RTOL.get(r["grad_dtype"][1], NEURON_GRAD_RTOL)
        if r["grad_x_rel"] > tol:
            bad.append(f"{c}: input gradient {r['grad_x_rel']:.2e} > {tol:.1e}")
        for k in ("grad_decay_rel", "grad_gain_rel"):
            if isinstance(r.get(k), float) and r[k] > NEURON_GRAD_RTOL:
                bad.append(f"{c}: {k} {r[k]:.2e}")
    return bad


def _setup(device: str) -> None:
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(REPO))


def _inputs(shape: tuple[int, ...], gen: Any, device: str) -> Any:
    """Input currents around the threshold: half on a 1/32 grid (with decay 0.25 and gain 1 the
    membranes then hit v_th = 0.5 exactly, so ``>=`` vs ``>`` and the reset compare are exercised), half
    plain floats (rounding of every product and sum)."""
    import torch

    x = torch.randn(shape, generator=gen) * 0.6 + 0.3
    grid = torch.round(x * 32) / 32
    pick = torch.rand(shape, generator=gen) < 0.5
    return torch.where(pick, grid, x).to(device)


def _neurons(kind: str, surrogate: str, channels: int, gen: Any, device: str, exact: bool, reset: str = "hard"):
    import torch

    from pipeline.models import LIF, AdaptiveLIF
    from pipeline.models.kernels import set_kernels

    param = 1.0 if surrogate == "rect" else 2.0
    if kind == "lif":
        decay, gain = (0.25, 1.0) if exact else (0.3, 1.1)
        pair = [LIF(decay=decay, gain=gain, surrogate=surrogate, surrogate_param=param, reset=reset)
                for _ in range(2)]
    else:
        pair = [AdaptiveLIF(channels, surrogate=surrogate, surrogate_param=param, reset=reset) for _ in range(2)]
        if not exact:
            with torch.no_grad():
                pair[0].decay.copy_(torch.rand(channels, generator=gen) * 0.6 + 0.1)
                pair[0].gain.copy_(torch.rand(channels, generator=gen) + 0.5)
        pair[1].load_state_dict(pair[0].state_dict())
    ref, tri = (m.to(device) for m in pair)
    set_kernels(tri, "triton")
    return ref, tri


def _rel(a: Any, b: Any) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    d = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item()
    return d / scale if scale else d


def _node_names(root: Any) -> dict[str, int]:
    """How many autograd nodes of each type the graph under ``root`` holds (which backend ran)."""
    seen, stack, count = set(), [root], {}
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        count[type(fn).__name__] = count.get(type(fn).__name__, 0) + 1
        stack.extend(f for f, _ in fn.next_functions)
    return count


def compare_neuron(kind: str, surrogate: str, shape: tuple[int, ...], dtype: str, device: str, exact: bool,
                   seed: int = 0, reset: str = "hard") -> dict[str, Any]:
    """One neuron layer, torch path vs Triton path, on the same input and upstream gradient."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    channels = shape[2] if len(shape) >= 3 else 1
    ref, tri = _neurons(kind, surrogate, channels, gen, device, exact, reset)
    dt = getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype])
    x = _inputs(shape, gen, device).to(dt)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    sa, sb = ref(xa), tri(xb)
    g = (torch.randn(shape, generator=gen).to(device) * (torch.rand(shape, generator=gen).to(device) < 0.7)).to(dt)
    nodes = [[k for k in _node_names(s.grad_fn) if "MultiStepLIF" in k] for s in (sa, sb)]
    membranes = [s.grad_fn.saved_tensors[0] for s in (sa, sb)] if dt == torch.float32 else None
    (sa * g).sum().backward()
    (sb * g).sum().backward()
    out: dict[str, Any] = {
        "case": f"{kind}-{surrogate}-{dtype}-{'x'.join(map(str, shape))}{'-exact' if exact else ''}"
                f"{'' if reset == 'hard' else '-' + reset}",
        "nodes": nodes, "spike_dtype": [str(sa.dtype), str(sb.dtype)], "spikes_equal": bool(torch.equal(sa, sb)),
        "spike_rate": round(sa.float().mean().item(), 4), "grad_dtype": [str(xa.grad.dtype), str(xb.grad.dtype)],
        "grad_x_rel": _rel(xb.grad, xa.grad),
    }
    if dt == torch.float32:
        ha, hb = membranes
        out["membranes_equal"] = bool(torch.equal(ha, hb))
        out["at_threshold"] = int((ha == ref.v_th).sum().item())
    for (name, p), q in zip(ref.named_parameters(), tri.parameters()):
        if p.grad is None or q.grad is None:
            out[f"grad_{name}_rel"] = None if p.grad is None and q.grad is None else "missing on one side"
        else:
            out[f"grad_{name}_rel"] = _rel(q.grad, p.grad)
    return out


def compare_net(dtype: str, device: str, seed: int = 0) -> dict[str, Any]:
    """A tiny STAA ResNet-19 (ALIF, rect), one training forward/backward under autocast ``dtype`` (or fp32):
    the same logits bit for bit, parameter gradients within rounding."""
    import torch

    from pipeline.models import build_model, neuron_modules
    from pipeline.models.kernels import set_kernels
    from pipeline.precision import strict_fp32

    cfg = {"arch": "resnet19", "width": 0.0625, "T": 2, "num_classes": 10, "in_channels": 3}
    torch.manual_seed(seed)
    ref = build_model(cfg).to(device).train()
    tri = build_model(cfg).to(device).train()
    tri.load_state_dict(ref.state_dict())
    set_kernels(tri, "triton")
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(seed)).to(device)
    y = torch.arange(4, device=device)
    ac = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}.get(dtype, "float32"))
    logits, fused = [], []
    for net in (ref, tri):  # strict IEEE FP32 convs (no TF32 on CUDA): only the neurons differ between the two
        torch.manual_seed(seed + 1)  # TSRD's random steps: the same draws on both sides
        with strict_fp32():
            with torch.autocast(torch.device(device).type, dtype=ac, enabled=dtype != "fp32"):
                out = net(x)
                loss = torch.nn.functional.cross_entropy(out.float(), y)
            names = _node_names(loss.grad_fn)
            fused.append({k: v for k, v in names.items() if "MultiStepLIF" in k})
            loss.backward()
        logits.append(out.detach())
    rels = {n: _rel(q.grad, p.grad) for (n, p), q in zip(ref.named_parameters(), tri.parameters())
            if p.grad is not None and q.grad is not None and p.grad.abs().max() > 0}
    worst = max(rels, key=rels.get)
    return {"case": f"net-{dtype}", "logit_dtype": str(logits[0].dtype), "fused_nodes": fused,
            "neurons": len(neuron_modules(ref)),
            "logits_equal": bool(torch.equal(logits[0], logits[1])), "grads_compared": len(rels),
            "grad_worst_rel": rels[worst], "grad_worst_param": worst}


def eval_paths(device: str) -> dict[str, Any]:
    """Evaluation (no gradient) and tracing of a model on the Triton backend never load the kernels: they
    run the per-step ops, so what is inspected or exported is unchanged."""
    import torch

    from pipeline.models import build_model
    from pipeline.models.kernels import set_kernels

    net = set_kernels(build_model({"arch": "resnet19", "width": 0.0625, "T": 2, "num_classes": 10,
                                   "in_channels": 3}).to(device).eval(), "triton")
    x = torch.rand(2, 3, 8, 8, device=device)
    with torch.no_grad():
        net(x)
    after_eval = "pipeline.models.kernels.triton_lif" in sys.modules
    torch.jit.trace(net, x, check_trace=False)
    return {"case": "eval-paths", "loaded_by_eval": after_eval,
            "loaded_by_trace": "pipeline.models.kernels.triton_lif" in sys.modules}


CASES: list[dict[str, Any]] = [
    *({"kind": k, "surrogate": s, "shape": (4, 2, 3, 5, 7), "dtype": "fp32", "exact": e}
      for k in ("lif", "alif") for s in ("rect", "tanh", "atan") for e in (False, True)),
    # 2 column tiles (33 x 33 > 1024)
    {"kind": "alif", "surrogate": "rect", "shape": (3, 2, 3, 33, 33), "dtype": "fp32", "exact": False},
    {"kind": "alif", "surrogate": "atan", "shape": (4, 6, 10), "dtype": "fp32", "exact": False},  # no spatial dims
    {"kind": "lif", "surrogate": "atan", "shape": (4, 7), "dtype": "fp32", "exact": True},  # [T, N]
    {"kind": "alif", "surrogate": "rect", "shape": (1, 2, 3, 4, 4), "dtype": "fp32", "exact": False},  # T = 1
    *({"kind": k, "surrogate": "rect", "shape": (4, 2, 3, 5, 7), "dtype": d, "exact": e}
      for k in ("lif", "alif") for d in ("bf16", "fp16") for e in (False, True)),
    # soft reset (U = H - S v_th): both kinds, the grid inputs that hit the threshold, and one smooth surrogate
    *({"kind": k, "surrogate": s, "shape": (4, 2, 3, 5, 7), "dtype": "fp32", "exact": e, "reset": "soft"}
      for k, s in (("lif", "rect"), ("alif", "rect"), ("alif", "atan")) for e in (False, True)),
    {"kind": "alif", "surrogate": "rect", "shape": (4, 2, 3, 5, 7), "dtype": "bf16", "exact": False, "reset": "soft"},
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu (Triton's interpreter) or cuda (compiled kernels)")
    ap.add_argument("--nets", nargs="*", default=["fp32", "bf16"], help="tiny-network cases (autocast dtypes)")
    ap.add_argument("--cases", type=int, default=None, help="only the first N layer cases (a quick run)")
    args = ap.parse_args(argv)
    _setup(args.device)
    import torch

    torch.set_num_threads(1)
    rows = [eval_paths(args.device)]  # first: before any case loads the kernels
    rows += [compare_neuron(device=args.device, **c) for c in CASES[:args.cases]]
    rows += [compare_net(d, args.device) for d in args.nets]
    print(json.dumps({"device": args.device, "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
