"""Simulator physics: the shapes the anomaly rules rely on (pure)."""

from __future__ import annotations

from collections.abc import Mapping

from simulators.physics import Environment, UnitState, advance, observe


def run(kind: str, state: UnitState, controls: Mapping[str, float], env: Environment,
        seconds: float, step: float = 10.0) -> UnitState:
    for _ in range(int(seconds / step)):
        state = advance(kind, state, controls, env, step)
    return state


HVAC = {"running": 1, "mode": 0, "setpoint_c": 24.0, "fan_speed_pct": 60}


def test_room_temperature_follows_the_setpoint() -> None:
    env = Environment(outdoor_c=34.0)
    state = run("hvac", UnitState(room_c=30.0), HVAC, env, 3600)
    assert abs(state.room_c - 24.0) < 0.3
    off = run("hvac", UnitState(room_c=24.0), {**HVAC, "running": 0}, env, 3 * 3600)
    assert off.room_c > 27.0  # drifts towards outdoors when off


def test_power_follows_outdoor_temperature_and_load() -> None:
    def settled_power(outdoor: float) -> float:
        env = Environment(outdoor_c=outdoor)
        return run("hvac", UnitState(room_c=24.0), HVAC, env, 600).power_w
    assert settled_power(38.0) > settled_power(30.0) * 1.3
    standby = run("hvac", UnitState(), {**HVAC, "running": 0}, Environment(), 60)
    assert standby.power_w < 10
    one_hour = run("hvac", UnitState(room_c=24.0), HVAC, Environment(), 3600)
    assert abs(one_hour.energy_wh - one_hour.power_w) < 0.2 * one_hour.power_w  # Wh ~ W x 1 h


def test_pm25_decays_faster_at_higher_fan_speed() -> None:
    env = Environment(outdoor_pm25=60.0)
    start = UnitState(pm25=150.0)
    controls = {"running": 1, "mode": 0}
    slow = run("air_purifier", start, {**controls, "fan_speed_pct": 20}, env, 3600)
    fast = run("air_purifier", start, {**controls, "fan_speed_pct": 100}, env, 3600)
    assert fast.pm25 < slow.pm25 < start.pm25
    assert fast.pm25 < 25.0 < slow.pm25  # an hour at full speed clears the room


def test_clogging_filter_raises_pressure_drop_and_fan_power() -> None:
    controls = {"running": 1, "fan_speed_pct": 80}
    env = Environment()
    clean = advance("fresh_air", UnitState(filter_load=0.1), controls, env, 1.0)
    clogged = advance("fresh_air", UnitState(filter_load=0.9), controls, env, 1.0)
    seen_clean = observe("fresh_air", clean, controls, env)
    seen_clogged = observe("fresh_air", clogged, controls, env)
    assert seen_clogged["filter_dp_pa"] > 2 * seen_clean["filter_dp_pa"]
    assert clogged.power_w > 1.5 * clean.power_w
    assert seen_clogged["filter_alarm"] == 1.0 and seen_clean["filter_alarm"] == 0.0
    used = run("fresh_air", UnitState(filter_load=0.1), controls, env, 24 * 3600, step=600)
    assert used.filter_load > 0.1  # running loads the filter


def test_meter_energy_integrates_power() -> None:
    state = run("meter", UnitState(), {}, Environment(), 3600, step=60)
    seen = observe("meter", state, {}, Environment())
    assert 15_000 < state.energy_wh < 60_000
    assert abs(seen["power_l1_w"] + seen["power_l2_w"] + seen["power_l3_w"] - seen["power_w"]) < 1
