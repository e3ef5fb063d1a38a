"""Peer benchmark: one training step of the same plain spiking ResNet-19, ours vs SpikingJelly.

Why: our neurons loop over T in Python inside ``forward`` (no custom kernel), so the question
a reviewer asks is "how does that compare with the reference SNN library?". Both sides build
the same network: ResNet-19 (stem conv3x3 + BN + LIF; BasicBlocks [3, 3, 2] at 128/256/512 x
width, strides 1/2/2; LIF after the residual add; global average pool; per-step FC averaged
over T), STAA off, the same LIF and the same surrogate:

- ours: ``build_model`` with ``neuron.kind = lif`` (decay M = 0.25, gain N = 1, v_th 0.5, hard
  reset to 0), ``surrogate = atan, k = 2``, every STAA part off.
- SpikingJelly 2.0.0: ``layer.Conv2d`` / ``layer.BatchNorm2d`` with ``step_mode='m'`` (T merged
  into the batch, as ours) and ``neuron.LIFNode(tau=4/3, decay_input=False, v_threshold=0.5,
  v_reset=0.0, surrogate_function=surrogate.ATan(alpha=2.0), step_mode='m')``:
  ``H = V - (V - 0)/tau + X = 0.25 V + X``, which is our ``H = M U + N I``. SpikingJelly 2.0
  has no ``backend=`` argument any more; on the CPU ``LIFNode`` runs its own autograd op
  (a Python loop over T forward, a hand-written backward), i.e. its torch path.

The script first checks that the two neurons fire identically on the same input and that the
networks have the same parameter count, then times SGD steps (forward, CE loss, backward,
update; SpikingJelly also ``reset_net``) in interleaved rounds on the CPU and prints images/s
and the ratio ours / theirs. Needs ``pip install -r bench/requirements.txt`` (spikingjelly,
loguru; installed with ``--no-deps`` so that torch is left alone).

    .venv/bin/python bench/peer_spikingjelly.py [--width 0.125 --T 4 --batch 16 --image 32]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.models import LIF, build_model  # noqa: E402
from pipeline.models.resnet import scale_channels  # noqa: E402
from step_timing import add_step_args, interleaved_seconds, sgd_step  # noqa: E402

STAGES = [(128, 3, 1), (256, 3, 2), (512, 2, 2)]  # ResNet-19 (channels, blocks, stride)
ATAN_ALPHA = 2.0


def _sj():
    try:
        from spikingjelly.activation_based import functional, layer, neuron, surrogate
    except ImportError as exc:
        sys.exit(f"spikingjelly is not installed ({exc}): .venv/bin/pip install --no-deps -r bench/requirements.txt")
    return functional, layer, neuron, surrogate


def sj_lif():
    _, _, neuron, surrogate = _sj()
    return neuron.LIFNode(tau=4.0 / 3.0, decay_input=False, v_threshold=0.5, v_reset=0.0,
                          surrogate_function=surrogate.ATan(alpha=ATAN_ALPHA), step_mode="m")


class SJBlock(nn.Module):
    """SpikingJelly BasicBlock, LIF after the residual add (as ours)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        _, layer, _, _ = _sj()
        self.conv1 = nn.Sequential(layer.Conv2d(cin, cout, 3, stride, 1, bias=False, step_mode="m"),
                                   layer.BatchNorm2d(cout, step_mode="m"))
        self.sn1 = sj_lif()
        self.conv2 = nn.Sequential(layer.Conv2d(cout, cout, 3, 1, 1, bias=False, step_mode="m"),
                                   layer.BatchNorm2d(cout, step_mode="m"))
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(layer.Conv2d(cin, cout, 1, stride, 0, bias=False, step_mode="m"),
                                      layer.BatchNorm2d(cout, step_mode="m"))
        self.sn2 = sj_lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.sn1(self.conv1(x)))
        return self.sn2(out + (x if self.down is None else self.down(x)))


class SJResNet19(nn.Module):
    def __init__(self, width: float, T: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        _, layer, _, _ = _sj()
        self.T = T
        c0 = scale_channels(128, width)
        self.stem = nn.Sequential(layer.Conv2d(in_channels, c0, 3, 1, 1, bias=False, step_mode="m"),
                                  layer.BatchNorm2d(c0, step_mode="m"), sj_lif())
        blocks, cin = [], c0
        for channels, n, stride in STAGES:
            cout = scale_channels(channels, width)
            blocks += [SJBlock(cin if b == 0 else cout, cout, stride if b == 0 else 1) for b in range(n)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)))
        return self.fc(x.mean((-2, -1))).mean(0)


def ours(width: float, T: int, num_classes: int, in_channels: int) -> nn.Module:
    return build_model({"arch": "resnet19", "width": width, "T": T, "num_classes": num_classes,
                        "in_channels": in_channels,
                        "neuron": {"kind": "lif", "decay": 0.25, "gain": 1.0, "v_th": 0.5, "surrogate": "atan",
                                   "surrogate_k": ATAN_ALPHA},
                        "staa": {"pe": False, "gc": False, "sa": False, "tsrd": False}})


def ours_staa(width: float, T: int, num_classes: int, in_channels: int) -> nn.Module:
    """The same network with every STAA part on and the default adaptive LIF (what STAA costs)."""
    return build_model({"arch": "resnet19", "width": width, "T": T, "num_classes": num_classes,
                        "in_channels": in_channels})


def check_same_neuron(T: int) -> bool:
    """Our LIF and SpikingJelly's LIFNode (as configured) fire identically on one input."""
    functional, _, _, _ = _sj()
    x = torch.randn(T, 8, 16, 5, 5)
    mine = LIF(decay=0.25, gain=1.0, v_th=0.5)(x)
    theirs_node = sj_lif()
    theirs = theirs_node(x)
    functional.reset_net(theirs_node)
    return bool(torch.equal(mine, theirs))


# the ops both sides share (the same oneDNN convolutions and batch norms), by profiler name
SHARED_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::native_batch_norm",
              "aten::native_batch_norm_backward")


def shared_op_share(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, reset, steps: int = 2) -> float:
    """Fraction of a training step's CPU time spent in convolutions and batch norms (torch.profiler).

    Why: those kernels are identical on both sides, so they bound what a faster neuron can give: with
    ``share`` of our step in them, ours / theirs cannot exceed ``theirs_ms / (share * ours_ms)``.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            sgd_step(model, opt, x, y, reset)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shared = sum(e.self_cpu_time_total for e in events if e.key in SHARED_OPS)
    return shared / total if total else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_args(ap, rounds=4, steps=3, threads=2)
    ap.add_argument("--no-staa", action="store_true", help="skip the all-STAA model (STAA / plain step ratio)")
    args = ap.parse_args()
    functional, _, _, _ = _sj()
    import spikingjelly

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    models = {"ours": ours(args.width, args.T, args.classes, 3),
              "spikingjelly": SJResNet19(args.width, args.T, args.classes, 3)}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    if not args.no_staa:
        models["ours_staa"] = ours_staa(args.width, args.T, args.classes, 3)
    same = check_same_neuron(args.T)
    resets = {"ours": None, "spikingjelly": functional.reset_net, "ours_staa": None}
    x = torch.randn(args.batch, 3, args.image, args.image)
    y = torch.randint(0, args.classes, (args.batch,))
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    for m in models.values():
        m.train()
    steps = {k: (lambda k=k: sgd_step(models[k], opts[k], x, y, resets[k])) for k in models}
    seconds = interleaved_seconds(steps, args.rounds, args.steps, args.warmup)
    ips = {k: args.batch / sec for k, sec in seconds.items()}

    print(f"Training step, plain spiking ResNet-19 (STAA off, LIF), CPU, {args.threads} threads, torch "
          f"{torch.__version__}, spikingjelly {getattr(spikingjelly, '__version__', '2.0.0')}")
    print(f"width {args.width}, T={args.T}, batch {args.batch}, {args.image}x{args.image}x3, "
          f"{args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up steps (median)")
    print(f"same neuron (identical spikes on one input): {'yes' if same else 'NO'}; "
          f"parameters: ours {params['ours']:,}, spikingjelly {params['spikingjelly']:,}")
    print(f"{'implementation':<16}{'ms/step':>10}{'images/s':>12}")
    for k in models:
        print(f"{k:<16}{1e3 * seconds[k]:>10.1f}{ips[k]:>12.1f}")
    print(f"ratio ours / spikingjelly (images/s): {ips['ours'] / ips['spikingjelly']:.2f}x (target >= 1.5)")
    if "ours_staa" in ips:
        print(f"ratio all-STAA step / plain step (time): {ips['ours'] / ips['ours_staa']:.2f}x (target <= 1.25)")
    share = shared_op_share(models["ours"], opts["ours"], x, y, None)
    ours_ms, theirs_ms = seconds["ours"], seconds["spikingjelly"]
    print(f"convolutions + batch norms (the same kernels on both sides): {100 * share:.0f}% of our plain step; "
          f"with a neuron that cost nothing, ours / spikingjelly could reach at most "
          f"{theirs_ms / (share * ours_ms):.2f}x")


if __name__ == "__main__":
    main()
