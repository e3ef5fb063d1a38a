"""Events -> T frames of per-pixel counts, the one conversion every event dataset goes through.

Encoding (the input contract recorded with the model):
1. the recording is cut into ``T`` equal time bins covering its whole duration, first to last
   event, and events are counted per (bin, polarity, y, x) with ``tonic.transforms.ToFrame``;
2. the count maps are rebinned to the network's image size by area (sum-preserving: a 2x
   downscale adds 2x2 pixel blocks, like a coarser sensor);
3. the network input is ``log1p(counts)``: DVS counts are heavy-tailed (a busy pixel fires
   hundreds of times per bin), log1p keeps the scale near 0..6 without data-dependent
   statistics, so mean 0 / std 1 are recorded as the "normalisation".

Why not ``ToFrame(n_time_bins=T)``: tonic 1.7 sizes those bins as ``(t_last - t0) // T`` and
drops the remainder and every event at ``t_last``; for recordings shorter than ``T`` ticks all
frames are empty. A fixed ``time_window = (t_last - t0) // T + 1`` from ``t0`` spans the whole
recording, so no event is lost (the counts sum to the number of events).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

EVENT_DTYPE = np.dtype([("x", np.int16), ("y", np.int16), ("t", np.int64), ("p", np.int8)])


def canonical_events(events: np.ndarray, sensor_size: tuple[int, int, int]) -> np.ndarray:
    """Structured events with fields x, y, t (int64), p (0/1), time-sorted, off-sensor events dropped."""
    out = np.empty(len(events), dtype=EVENT_DTYPE)
    for name in ("x", "y", "t"):
        out[name] = events[name]
    out["p"] = (np.asarray(events["p"]) > 0).astype(np.int8) if sensor_size[2] > 1 else 0
    w, h = sensor_size[0], sensor_size[1]
    keep = (out["x"] >= 0) & (out["x"] < w) & (out["y"] >= 0) & (out["y"] < h)
    out = out[keep] if not keep.all() else out
    t = out["t"]
    if len(t) > 1 and np.any(t[1:] < t[:-1]):
        out = out[np.argsort(t, kind="stable")]
    return out


def events_to_frames(events: np.ndarray, sensor_size: tuple[int, int, int], n_frames: int) -> np.ndarray:
    """Count events into ``[T, P, H, W]`` int16 frames over T equal time bins spanning the recording.

    ``sensor_size`` is tonic's ``(W, H, P)``; ``events`` needs fields x, y, t, p.
    """
    events = canonical_events(events, sensor_size)
    w, h, p = sensor_size
    if len(events) == 0:
        return np.zeros((n_frames, p, h, w), dtype=np.int16)
    from tonic.transforms import ToFrame  # here: only event datasets need tonic (digits/CIFAR runs do not)

    t0, t1 = int(events["t"][0]), int(events["t"][-1])
    window = (t1 - t0) // n_frames + 1
    to_frame = ToFrame(sensor_size=tuple(sensor_size), time_window=window,
                       start_time=t0, end_time=t0 + n_frames * window)
    frames = to_frame(events)
    assert frames.shape[0] == n_frames, frames.shape
    return frames


def rebin(frames: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize count frames ``[T,P,H,W]`` to ``size`` by area, scaled so the total count is kept."""
    x = torch.as_tensor(np.asarray(frames), dtype=torch.float32)
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    y = F.interpolate(x, size=tuple(size), mode="area")
    return y * (h * w) / (size[0] * size[1])


def frames_to_input(counts: torch.Tensor) -> torch.Tensor:
    """The network input for count frames: ``log1p(counts)`` as float32 (see module docstring)."""
    return torch.log1p(counts.float().clamp_min(0))
