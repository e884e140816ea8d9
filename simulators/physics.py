"""Plausible physics for the simulated air-handling units and the energy meter.

Pure functions over frozen state: `advance(kind, state, controls, env, dt)` moves a unit
forward in (simulated) time and `observe(...)` says what its sensors read. Exponential
relaxation is used everywhere, so a poll after an hour of silence is as stable as one after
a second. The shapes are what the rules look for: room temperature follows the setpoint,
power follows load and the outdoor temperature, PM2.5 decays faster at higher fan speed, and
a clogging filter shows a rising pressure drop and fan power.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

ROOM_M3 = 150.0  # volume served by one unit
FILTER_LIFE_S = 2000 * 3600.0  # full-speed running seconds from clean to clogged


@dataclass(frozen=True, slots=True)
class Environment:
    """What the units cannot control: the weather and the city's air."""

    outdoor_c: float = 33.0
    outdoor_pm25: float = 60.0
    outdoor_co2: float = 420.0
    occupants: float = 3.0


@dataclass(frozen=True, slots=True)
class UnitState:
    """The physical state of one unit and the room it serves."""

    room_c: float = 27.0
    humidity_pct: float = 55.0
    pm25: float = 45.0
    co2: float = 900.0
    filter_load: float = 0.1  # 0 clean .. 1 clogged
    energy_wh: float = 0.0
    power_w: float = 0.0
    load: float = 0.0  # compressor load fraction, hvac only
    clock_s: float = 0.0  # simulated seconds since start (meter's daily profile)


def _relax(value: float, target: float, dt: float, tau_s: float) -> float:
    return target + (value - target) * math.exp(-dt / tau_s)


def _on(controls: Mapping[str, float]) -> bool:
    return controls.get("running", 0.0) >= 0.5


def _fan(controls: Mapping[str, float]) -> float:
    if not _on(controls):
        return 0.0
    return max(0.0, min(100.0, controls.get("fan_speed_pct", 0.0))) / 100.0


def _purifier_fan(state: UnitState, controls: Mapping[str, float]) -> float:
    if not _on(controls):
        return 0.0
    mode = round(controls.get("mode", 0.0))
    if mode == 1:  # auto: fan follows PM2.5
        return min(1.0, max(0.2, state.pm25 / 75.0))
    if mode == 2:  # sleep
        return 0.2
    return _fan(controls)


def hvac_power_w(state: UnitState, controls: Mapping[str, float], env: Environment) -> float:
    """Compressor power rises with the gap to the setpoint and with the outdoor lift."""
    if not _on(controls):
        return 3.0
    fan_w = 8.0 + 60.0 * _fan(controls) ** 3
    if round(controls.get("mode", 0.0)) == 2:
        return fan_w
    setpoint = controls.get("setpoint_c", 26.0)
    lift = abs(env.outdoor_c - setpoint)
    cop = max(1.8, 5.5 - 0.12 * lift)
    heat_w = 2600.0 * state.load
    return fan_w + heat_w / cop * (1.0 + 0.015 * lift)


def _advance_hvac(s: UnitState, c: Mapping[str, float], env: Environment, dt: float) -> UnitState:
    mode = round(c.get("mode", 0.0))
    setpoint = c.get("setpoint_c", 26.0)
    conditioning = _on(c) and mode != 2
    if mode == 3:
        conditioning = conditioning and abs(s.room_c - setpoint) > 0.2
    if conditioning:
        room = _relax(s.room_c, setpoint, dt, 600.0 / (0.4 + _fan(c)))
        gap = abs(room - setpoint)
        load = min(1.0, 0.15 + abs(env.outdoor_c - setpoint) / 20.0 + gap / 4.0)
    else:
        room = _relax(s.room_c, env.outdoor_c - 2.0, dt, 7200.0)
        load = 0.0
    moved = replace(s, room_c=room, load=load)
    power = hvac_power_w(moved, c, env)
    return replace(moved, power_w=power, energy_wh=s.energy_wh + power * dt / 3600.0)


def _filter_dp(state: UnitState, fan: float, clean_pa: float) -> float:
    return clean_pa * fan**2 * (1.0 + 4.0 * state.filter_load**2)


def _fan_power(state: UnitState, fan: float, rated_w: float) -> float:
    """Constant-airflow fans draw more as the filter clogs."""
    return rated_w * fan**3 * (1.0 + 1.5 * state.filter_load**2)


def _advance_air(
    s: UnitState, c: Mapping[str, float], env: Environment, dt: float, *, purifier: bool
) -> UnitState:
    fan = _purifier_fan(s, c) if purifier else _fan(c)
    air_m3h = (420.0 if purifier else 350.0) * fan * (1.0 - 0.3 * s.filter_load)
    ach = air_m3h / ROOM_M3  # air changes per hour through the filter
    infiltration = 0.5
    pm_target = env.outdoor_pm25 * infiltration / (infiltration + ach * 0.97)
    pm25 = _relax(s.pm25, pm_target, dt, 3600.0 / (infiltration + ach))
    co2 = s.co2
    if not purifier:
        exchange = infiltration + ach
        co2_target = env.outdoor_co2 + env.occupants * 18_000.0 / (ROOM_M3 * exchange)
        co2 = _relax(s.co2, co2_target, dt, 3600.0 / exchange)
    load = min(1.0, s.filter_load + fan * dt / FILTER_LIFE_S)
    moved = replace(s, pm25=pm25, co2=co2, filter_load=load)
    power = (2.0 if purifier else 6.0) + _fan_power(moved, fan, 45.0 if purifier else 120.0)
    if not _on(c):
        power = 1.0
    return replace(moved, power_w=power, energy_wh=s.energy_wh + power * dt / 3600.0)


def meter_power_w(clock_s: float) -> float:
    """A building's draw: night base load, a morning and a larger evening peak."""
    hour = (clock_s / 3600.0 + 8.0) % 24.0
    morning = math.exp(-(((hour - 8.0) / 1.5) ** 2))
    evening = math.exp(-(((hour - 19.5) / 2.0) ** 2))
    return 18_000.0 + 14_000.0 * morning + 26_000.0 * evening


def advance(
    kind: str | None, state: UnitState, controls: Mapping[str, float], env: Environment, dt: float
) -> UnitState:
    """State after `dt` simulated seconds with the controls held constant."""
    if dt <= 0:
        return state
    state = replace(state, clock_s=state.clock_s + dt)
    if kind == "hvac":
        return _advance_hvac(state, controls, env, dt)
    if kind in ("fresh_air", "air_purifier"):
        return _advance_air(state, controls, env, dt, purifier=kind == "air_purifier")
    if kind == "meter":
        power = meter_power_w(state.clock_s)
        return replace(state, power_w=power, energy_wh=state.energy_wh + power * dt / 3600.0)
    return state


def observe(
    kind: str | None, state: UnitState, controls: Mapping[str, float], env: Environment
) -> dict[str, float]:
    """What the unit's sensors report, by standard metric name."""
    seen: dict[str, float] = {
        "temperature_c": state.room_c,
        "outdoor_temperature_c": env.outdoor_c,
        "humidity_pct": state.humidity_pct,
        "power_w": state.power_w,
        "energy_wh": state.energy_wh,
    }
    if kind == "hvac":
        seen["compressor_hz"] = 20.0 + 70.0 * state.load if state.load > 0 else 0.0
        seen["fault_code"] = 0.0
    elif kind in ("fresh_air", "air_purifier"):
        purifier = kind == "air_purifier"
        fan = _purifier_fan(state, controls) if purifier else _fan(controls)
        seen["filter_dp_pa"] = _filter_dp(state, fan, 60.0 if purifier else 90.0)
        seen["filter_life_pct"] = 100.0 * (1.0 - state.filter_load)
        seen["filter_alarm"] = 1.0 if state.filter_load > 0.8 else 0.0
        seen["co2_ppm"] = state.co2
        if purifier:
            seen["pm25_ugm3"] = state.pm25
        else:
            seen["pm25_ugm3"] = state.pm25 * 0.4  # supply air, after the filter
            bypass = round(controls.get("bypass_mode", 0.0)) == 2
            efficiency = 0.0 if bypass else 0.7
            seen["supply_temperature_c"] = env.outdoor_c + efficiency * (
                state.room_c - env.outdoor_c
            )
    elif kind == "meter":
        share = (0.36, 0.31, 0.33)
        volts = (229.8, 231.2, 230.4)
        for phase, (part, volt) in enumerate(zip(share, volts, strict=True), start=1):
            watts = state.power_w * part
            seen[f"voltage_l{phase}_v"] = volt
            seen[f"power_l{phase}_w"] = watts
            seen[f"current_l{phase}_a"] = watts / (volt * 0.95)
        seen["voltage_v"] = sum(volts) / 3.0
        seen["current_a"] = sum(seen[f"current_l{p}_a"] for p in (1, 2, 3))
        seen["frequency_hz"] = 50.0
        seen["export_energy_wh"] = 0.0
    return seen
