"""Deterministic randomness and small signal tools for the scenario generator.

Every random number is a function of (scenario seed, stream name, index), not of the order
in which the generator asks: `Keyed.normal(stream, idx)` draws the same value for the same
index whatever else was drawn before. So one device's series does not change when another
device is added, and a day's values do not depend on how the days were chunked.
"""

from __future__ import annotations

import math
import zlib
from typing import Final

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.int64]

_BLOCK: Final = 1024


def stream_key(name: str) -> int:
    return zlib.crc32(name.encode())


class Keyed:
    """Counter-style random values: N(0, 1) or U[0, 1) per (stream, integer index)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed) & 0xFFFF_FFFF_FFFF
        self._cache: dict[tuple[int, int, int], FloatArray] = {}

    def rng(self, stream: str, *index: int) -> np.random.Generator:
        """A generator for one (stream, index...) cell, e.g. one device and one chunk."""
        return np.random.default_rng([self.seed, stream_key(stream), *(int(i) & 0xFFFFFFFF
                                                                       for i in index)])

    def _block(self, kind: int, stream: int, block: int) -> FloatArray:
        key = (kind, stream, block)
        cached = self._cache.get(key)
        if cached is None:
            rng = np.random.default_rng([self.seed, stream, kind, block & 0xFFFFFFFF])
            cached = rng.standard_normal(_BLOCK) if kind == 0 else rng.random(_BLOCK)
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = cached
        return cached

    def _at(self, kind: int, stream: str, idx: IntArray) -> FloatArray:
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty(idx.shape, dtype=np.float64)
        if idx.size == 0:
            return out
        key = stream_key(stream)
        blocks = idx // _BLOCK
        for block in np.unique(blocks):
            sel = blocks == block
            out[sel] = self._block(kind, key, int(block))[idx[sel] - block * _BLOCK]
        return out

    def normal(self, stream: str, idx: IntArray) -> FloatArray:
        return self._at(0, stream, idx)

    def uniform(self, stream: str, idx: IntArray) -> FloatArray:
        return self._at(1, stream, idx)

    def normal1(self, stream: str, i: int) -> float:
        return float(self.normal(stream, np.array([i], dtype=np.int64))[0])

    def uniform1(self, stream: str, i: int) -> float:
        return float(self.uniform(stream, np.array([i], dtype=np.int64))[0])

    def smooth(self, stream: str, times: FloatArray, origin: float, knot_s: float) -> FloatArray:
        """Band-limited N(0, ~1) noise: independent normals at knots every `knot_s` seconds
        after `origin`, linearly interpolated (continuous across chunks)."""
        pos = (times - origin) / knot_s
        k0 = np.floor(pos).astype(np.int64)
        frac = pos - k0
        a = self.normal(stream, k0)
        b = self.normal(stream, k0 + 1)
        # Linear interpolation shrinks the variance mid-way; rescale to keep it near 1.
        scale = 1.0 / np.sqrt(frac**2 + (1.0 - frac) ** 2)
        return (a * (1.0 - frac) + b * frac) * scale


def ema(x: FloatArray, tau_steps: float, y_prev: float) -> FloatArray:
    """First-order low-pass y[n] = a y[n-1] + (1-a) x[n], a = exp(-1/tau_steps), vectorised
    in blocks (closed form per block) so it stays exact and fast."""
    n = x.size
    out = np.empty(n, dtype=np.float64)
    if n == 0:
        return out
    if tau_steps <= 1e-9:
        out[:] = x
        return out
    a = math.exp(-1.0 / tau_steps)
    block = max(1, min(512, int(30.0 * tau_steps)))
    y = y_prev
    for lo in range(0, n, block):
        seg = x[lo:lo + block]
        k = np.arange(seg.size, dtype=np.float64)
        inv = a ** (-k)  # a^-j
        acc = np.cumsum(seg * inv) * (1.0 - a)
        res = (a ** k) * (a * y + acc)
        out[lo:lo + seg.size] = res
        y = float(res[-1])
    return out


def cycling(load: FloatArray, phase0: float, step_s: float, min_period_s: float,
            max_period_s: float = 3600.0, min_run_s: float = 180.0) -> tuple[BoolArray, float]:
    """On/off thermostat cycling delivering the fraction `load` (0..1) of the time.

    The cycle period is shortest (min_period_s) at half load, like a thermostat dead band
    (`period = min / (4 L (1 - L))`), capped at max_period_s, but long enough for the
    anti-short-cycle timer: every on and off phase lasts at least `min_run_s`. Returns the
    on-state per step and the phase to carry into the next chunk.
    """
    lo = np.clip(load, 0.0, 1.0)
    duty = 4.0 * lo * (1.0 - lo)
    period = np.minimum(max_period_s, min_period_s / np.maximum(duty, 1e-6))
    period = np.maximum(period, min_run_s / np.maximum(np.minimum(lo, 1.0 - lo), 1e-6))
    phase = phase0 + np.cumsum(step_s / period)
    on = (phase - np.floor(phase)) < lo
    on &= lo > 0.02
    on |= lo > 0.98
    return on, float(phase[-1] - math.floor(phase[-1])) if phase.size else phase0
