"""Load shapes, weather and occupancy: the physics-ish part of the scenario generator.

Pure functions over numpy arrays on a regular time grid. Profiles are hourly values,
linearly interpolated; weekends and holidays differ from working days.
"""

from __future__ import annotations

import itertools
from typing import Final

import numpy as np

from simulators.faults.noise import BoolArray, FloatArray

_HOURS: Final = np.arange(25, dtype=np.float64)


def _profile(values: list[float]) -> FloatArray:
    arr = np.asarray([*values, values[0]], dtype=np.float64)
    assert arr.size == 25
    return arr


# Per-household draw (W) of an apartment riser: night base, breakfast, a larger evening peak.
RESIDENTIAL_WORKDAY: Final = _profile([
    210, 180, 170, 165, 170, 210, 360, 560, 470, 330, 300, 320,
    390, 330, 300, 300, 340, 480, 720, 880, 900, 820, 620, 380])
RESIDENTIAL_WEEKEND: Final = _profile([
    250, 205, 185, 172, 170, 185, 250, 370, 510, 540, 510, 505,
    560, 490, 440, 425, 450, 560, 760, 900, 905, 830, 650, 430])

# Occupancy (0..1) of the common spaces the units serve.
OCCUPANCY: Final[dict[str, tuple[FloatArray, FloatArray]]] = {
    "lobby": (
        _profile([0.02, 0.01, 0.01, 0.01, 0.02, 0.05, 0.25, 0.75, 0.6, 0.3, 0.2, 0.25,
                  0.35, 0.25, 0.2, 0.25, 0.35, 0.6, 0.85, 0.7, 0.5, 0.35, 0.2, 0.06]),
        _profile([0.03, 0.02, 0.01, 0.01, 0.01, 0.03, 0.1, 0.3, 0.45, 0.5, 0.45, 0.45,
                  0.5, 0.45, 0.4, 0.4, 0.45, 0.55, 0.65, 0.6, 0.5, 0.35, 0.2, 0.08])),
    "gym": (
        _profile([0, 0, 0, 0, 0, 0, 0.3, 0.45, 0.25, 0.1, 0.1, 0.15,
                  0.25, 0.15, 0.1, 0.1, 0.15, 0.35, 0.7, 0.9, 0.8, 0.5, 0.2, 0]),
        _profile([0, 0, 0, 0, 0, 0, 0.1, 0.3, 0.5, 0.6, 0.6, 0.45,
                  0.35, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.7, 0.55, 0.35, 0.15, 0])),
    "office": (
        _profile([0, 0, 0, 0, 0, 0, 0, 0.1, 0.7, 0.9, 0.9, 0.85,
                  0.5, 0.8, 0.9, 0.9, 0.85, 0.6, 0.15, 0, 0, 0, 0, 0]),
        _profile([0, 0, 0, 0, 0, 0, 0, 0, 0.2, 0.4, 0.45, 0.4,
                  0.25, 0.35, 0.4, 0.35, 0.2, 0.05, 0, 0, 0, 0, 0, 0])),
    "clubhouse": (
        _profile([0, 0, 0, 0, 0, 0, 0, 0, 0.05, 0.15, 0.25, 0.3,
                  0.35, 0.3, 0.3, 0.35, 0.45, 0.6, 0.75, 0.8, 0.65, 0.4, 0.1, 0]),
        _profile([0, 0, 0, 0, 0, 0, 0, 0.05, 0.2, 0.45, 0.6, 0.65,
                  0.7, 0.7, 0.7, 0.7, 0.75, 0.8, 0.85, 0.8, 0.7, 0.5, 0.2, 0])),
    "lounge": (
        _profile([0, 0, 0, 0, 0, 0, 0.05, 0.2, 0.2, 0.15, 0.2, 0.3,
                  0.4, 0.3, 0.25, 0.3, 0.4, 0.5, 0.6, 0.6, 0.5, 0.3, 0.1, 0]),
        _profile([0, 0, 0, 0, 0, 0, 0.02, 0.1, 0.3, 0.45, 0.5, 0.5,
                  0.55, 0.5, 0.5, 0.5, 0.55, 0.6, 0.65, 0.6, 0.5, 0.35, 0.1, 0])),
}


def hourly(profile: FloatArray, tod_s: FloatArray) -> FloatArray:
    return np.interp(tod_s / 3600.0, _HOURS, profile)


def by_daytype(pair: tuple[FloatArray, FloatArray], tod_s: FloatArray,
               restday: BoolArray) -> FloatArray:
    work, rest = pair
    return np.where(restday, hourly(rest, tod_s), hourly(work, tod_s))


def residential_w(tod_s: FloatArray, restday: BoolArray, outdoor_c: FloatArray) -> FloatArray:
    """Mean draw of one household: appliances plus split heat pumps for comfort."""
    base = np.where(restday, hourly(RESIDENTIAL_WEEKEND, tod_s),
                    hourly(RESIDENTIAL_WORKDAY, tod_s))
    presence = np.clip(base / 900.0, 0.15, 1.0)
    comfort = (38.0 * np.maximum(0.0, 15.0 - outdoor_c)
               + 60.0 * np.maximum(0.0, outdoor_c - 26.0)) * presence
    return base + comfort


def lighting_level(tod_s: FloatArray, sunrise_s: FloatArray, sunset_s: FloatArray) -> FloatArray:
    """Corridors and garage always (22 %), landscape and facade from dusk to 23:30."""
    evening = (tod_s >= sunset_s - 900.0) & (tod_s < 23.5 * 3600)
    night = (tod_s >= 23.5 * 3600) | (tod_s < sunrise_s)
    return np.where(evening, 1.0, np.where(night, 0.55, 0.22))


def relax_runs(times: FloatArray, on: BoolArray, target_on: FloatArray, target_off: FloatArray,
               tau_on: float, tau_off: float, y0: float, step_s: float
               ) -> tuple[FloatArray, float]:
    """First-order relaxation toward one target while `on`, another while off (a room held
    at its setpoint, drifting back when the unit stops). Exact for constant targets."""
    n = times.size
    out = np.empty(n, dtype=np.float64)
    if n == 0:
        return out, y0
    edges = np.flatnonzero(on[1:] != on[:-1]) + 1
    bounds = [0, *edges.tolist(), n]
    cur = y0
    for a, b in itertools.pairwise(bounds):
        running = bool(on[a])
        target = target_on[a:b] if running else target_off[a:b]
        tau = tau_on if running else tau_off
        dt = times[a:b] - times[a] + step_s
        seg = target + (cur - target[0]) * np.exp(-dt / tau)
        out[a:b] = seg
        cur = float(seg[-1])
    return out, cur
