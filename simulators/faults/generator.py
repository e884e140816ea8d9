"""Generate a scenario's readings, one day at a time, vectorised per device.

Model. Every device's true power lives on a common grid (`grid_s`, 10 s by default),
piecewise constant. Units (hvac, fresh_air, air_purifier) run on their schedules (within
the building's open hours), with compressor cycling or inverter modulation driven by the
weather, occupancy and the gap to the setpoint; fans follow the cube law; filters load
with running hours and outdoor PM2.5, their pressure drop growing with the square of the
fan speed. Sub-meters carry their units plus non-unit loads (apartment risers with
appliance switching, lifts, lighting, booster pumps); the main meter carries the
sub-meters, a small unmetered load and cable losses. Energy integrates the true power
exactly; each meter has its own small calibration gain, noise and resolution.

Each device reports on its own clock: every `interval` with jitter, a per-device phase,
per-device `seq`, rare lost readings and short communication blips. Readings come out in
timestamp order across devices (a per-day sort), so memory stays at about one day of data.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Final

import numpy as np

from device_drivers.vocabulary import Reading
from simulators.faults import models
from simulators.faults.noise import BoolArray, FloatArray, IntArray, Keyed, cycling, ema
from simulators.faults.placement import nominal_power_w
from simulators.faults.scenario import (
    METRICS_BY_KIND,
    BuildingSpec,
    FaultSpec,
    LoadSpec,
    MeterSpec,
    Scenario,
    UnitSpec,
    days_of,
    local_day_start,
)

CHUNK_S: Final = 86_400.0
_Draw = Callable[[np.random.Generator, int], FloatArray]
_EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()
_DECIMALS: Final[dict[str, int]] = {
    "power_w": 1, "voltage_v": 1, "current_a": 2, "temperature_c": 1, "setpoint_c": 1,
    "fan_speed_pct": 0, "filter_dp_pa": 0, "co2_ppm": 0, "pm25_ugm3": 0, "running": 0,
}


# ---- per-chunk context -----------------------------------------------------------------------


@dataclass(slots=True)
class _Clock:
    times: FloatArray  # grid cell starts (Unix s)
    widths: FloatArray  # cell lengths (the last one of the scenario may be short)
    tod: FloatArray  # local seconds after midnight
    dayidx: IntArray  # index into the generator's day list
    restday: BoolArray  # weekend or holiday
    t0: float
    t1: float
    step: float


@dataclass(slots=True)
class _Weather:
    temp: FloatArray
    pm25: FloatArray


@dataclass(slots=True)
class _UnitPlan:
    on_s: FloatArray  # per day, NaN: off all day
    off_s: FloatArray
    setpoint: FloatArray
    mode: IntArray  # 1 cooling, -1 heating, 0 ventilation only
    fan: FloatArray  # fan setting; 0 for a purifier in auto


@dataclass(slots=True)
class _DeviceState:
    next_k: int = 0
    pending_k: list[int] = field(default_factory=list)
    pending_ts: list[float] = field(default_factory=list)
    phase_s: float = 0.0
    seq0: int = 1
    energy: float = 0.0  # measured energy (Wh, before offsets and wrap)
    offset: float = 0.0  # counter offset from resets and jumps
    last: dict[str, float] = field(default_factory=dict)  # last row before any loss
    # unit physics
    room: float = 20.0
    supply: float = 15.0
    ema_a: float = 0.0  # co2 or indoor pm
    cycle: float = 0.0
    comp_prev: bool = False
    filter_load: float = 0.0
    # meter loads: pulses spilling into the next chunk (end time, watts) per load index
    spill: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    pump_phase: dict[int, float] = field(default_factory=dict)


@dataclass(slots=True)
class _Series:
    """What a device's sampling needs from its physics over one chunk."""

    measured: FloatArray  # what its meter integrates (W)
    extra: dict[str, FloatArray] = field(default_factory=dict)  # other metrics on the grid
    comp_start: BoolArray | None = None  # compressor start cells (inrush samples)


class Generator:
    """Readings of a scenario in timestamp order; see `readings()`."""

    def __init__(self, scenario: Scenario) -> None:
        self.s = scenario
        self.keyed = Keyed(scenario.seed)
        self.tz = scenario.tz
        self.days = days_of(scenario)
        self.daynum0 = self.days[0].toordinal() - _EPOCH_ORDINAL
        self.holiday_idx = np.array(
            [i for i, d in enumerate(self.days) if d in scenario.holidays], dtype=np.int64)
        self.kinds = scenario.device_kinds()
        self.ids = list(self.kinds)
        self.units = {u.id: u for u in scenario.units()}
        self.meters = {m.id: m for m in scenario.meters()}
        self.faults: dict[str, list[FaultSpec]] = defaultdict(list)
        for f in scenario.faults:
            self.faults[f.device].append(f)
        self.state = {dev: self._initial_state(dev) for dev in self.ids}
        self._weather_days()
        self.plans = {u.id: self._plan(u) for u in scenario.units()}
        self.on_from = self._after_hours_starts()
        self.stuck_values: dict[tuple[str, float, str], float] = {}
        self._nominal_w: dict[str, float] = {}

    # ---- set-up -----------------------------------------------------------------------------

    def _initial_state(self, dev: str) -> _DeviceState:
        rep = self.s.reporting
        k = self.keyed
        st = _DeviceState()
        st.phase_s = rep.jitter_s + (rep.interval_s - 2 * rep.jitter_s) * k.uniform1(
            f"phase/{dev}", 0)
        st.seq0 = 1 + int(50_000 * k.uniform1(f"seq0/{dev}", 0))
        unit = self.units.get(dev)
        if unit is not None:
            st.energy = unit.energy_start_wh
            st.filter_load = unit.filter_age
            st.cycle = k.uniform1(f"cycle0/{dev}", 0)
            st.room = 18.0 + 3.0 * k.uniform1(f"room0/{dev}", 0)
        else:
            st.energy = self.meters[dev].energy_start_wh
        return st

    def _weather_days(self) -> None:
        w = self.s.weather
        n = len(self.days) + 2  # one day of margin on each side, for interpolation
        idx = np.arange(-1, n - 1, dtype=np.int64)
        anomaly = np.zeros(n)
        z = self.keyed.normal("wx/day", idx)
        prev = 0.0
        for i in range(n):
            prev = 0.7 * prev + math.sqrt(1 - 0.49) * w.day_sd_c * float(z[i])
            anomaly[i] = prev
        self.wx_mean = w.mean_c + w.trend_c_per_day * idx + anomaly
        self.wx_amp = w.amplitude_c * (0.6 + 0.7 * self.keyed.uniform("wx/amp", idx))
        zp = self.keyed.normal("wx/pm", idx)
        pm = np.zeros(n)
        prev = 0.0
        for i in range(n):
            prev = 0.6 * prev + 0.8 * 0.45 * float(zp[i])
            pm[i] = prev
        self.wx_logpm = math.log(max(w.pm25_mean, 1.0)) + pm
        self.sunset = 18.1 * 3600 + 480.0 * self.keyed.normal("wx/sunset", idx)
        self.sunrise = 6.2 * 3600 + 480.0 * self.keyed.normal("wx/sunrise", idx)

    def _plan(self, u: UnitSpec) -> _UnitPlan:
        """Day by day: when the unit runs, its mode, setpoint and fan setting."""
        s, k = self.s, self.keyed
        n = len(self.days)
        on = np.full(n, np.nan)
        off = np.full(n, np.nan)
        setpoint = np.zeros(n)
        mode = np.zeros(n, dtype=np.int64)
        fan = np.zeros(n)
        rates = s.event_rates
        cal = s.calendar_for(u.building)
        fault_days = {self._local_date(t) for f in self.faults.get(u.id, ())
                      for t in np.arange(f.start, f.start + f.duration_s + 1, 3600.0)}
        explicit = {(e.type, e.day): e.value for e in s.events if e.device == u.id}
        prev_mode = 0
        for i, day in enumerate(self.days):
            key = f"plan/{u.id}"
            hours = u.schedule.for_day(day.weekday(), day in s.holidays)
            open_a = min(a for a, _ in cal.weekly[day.weekday()]) * 60.0
            open_b = max(b for _, b in cal.weekly[day.weekday()]) * 60.0
            # staff decide the mode from yesterday's weather, with some hysteresis
            mean_prev = float(self.wx_mean[i])  # index i is the day before (margin of one)
            if mean_prev > 22.0 or (prev_mode == 1 and mean_prev > 20.0):
                mode[i] = 1
            elif mean_prev < 16.0 or (prev_mode == -1 and mean_prev < 18.0):
                mode[i] = -1
            else:
                mode[i] = 0
            prev_mode = int(mode[i])
            base_sp = u.setpoint_cool_c if mode[i] == 1 else u.setpoint_heat_c
            setpoint[i] = base_sp
            if ("setpoint_change", day) in explicit:
                setpoint[i] += explicit[("setpoint_change", day)]
            elif k.uniform1(f"{key}/sp", i) < rates.setpoint_change_per_week / 7.0:
                step = (1.0, 1.5, 2.0)[int(3 * k.uniform1(f"{key}/spv", i))]
                setpoint[i] += step if k.uniform1(f"{key}/sps", i) < 0.5 else -step
            if u.kind == "air_purifier":
                manual = k.uniform1(f"{key}/fanday", i) < 0.15
                fan[i] = (40.0, 60.0, 80.0)[int(3 * k.uniform1(f"{key}/fanv", i))] if manual else 0
            elif k.uniform1(f"{key}/fanday", i) < 0.1:
                fan[i] = (60.0, 80.0, 100.0)[int(3 * k.uniform1(f"{key}/fanv", i))]
            else:
                fan[i] = u.fan_pct
            if hours is None:
                continue
            a, b = hours
            if u.schedule.manual:
                a += 360.0 * float(np.clip(k.normal1(f"{key}/on", i), -2, 2))
                b += 360.0 * float(np.clip(k.normal1(f"{key}/off", i), -2, 2))
            if ("early_start", day) in explicit:
                a -= 60.0 * explicit[("early_start", day)]
            elif k.uniform1(f"{key}/early", i) < rates.early_start_per_week / 7.0:
                a -= 60.0 * (20.0 + 40.0 * k.uniform1(f"{key}/earlyv", i))
            a, b = max(a, open_a), min(b, open_b)
            off_day = ("off_day", day) in explicit or (
                k.uniform1(f"{key}/offday", i) < rates.off_day_per_month / 30.0)
            if off_day and day not in fault_days:
                continue
            if b - a > 600.0:
                on[i], off[i] = a, b
        return _UnitPlan(on, off, setpoint, mode, fan)

    def _local_date(self, ts: float) -> date:
        return datetime.fromtimestamp(float(ts), self.tz).date()

    def _after_hours_starts(self) -> dict[tuple[str, float], float]:
        """`left_on`: the unit stays on from its (actual) stop time that day."""
        out: dict[tuple[str, float], float] = {}
        for dev, faults in self.faults.items():
            for f in faults:
                if f.type != "after_hours" or dev not in self.plans:
                    continue
                begin = f.start
                if (f.variant or "left_on") == "left_on":
                    day = self._local_date(f.start - 1.0)
                    if day in self.days:
                        i = self.days.index(day)
                        off_s = self.plans[dev].off_s[i]
                        if not math.isnan(off_s):
                            begin = min(f.start, local_day_start(day, self.tz) + float(off_s))
                out[(dev, f.start)] = begin
        return out

    # ---- the stream -------------------------------------------------------------------------

    def readings(self) -> Iterator[Reading]:
        """Every reading of the scenario, in timestamp order (ties: device order)."""
        for chunk in range(math.ceil(self.s.duration_s / CHUNK_S)):
            yield from self._chunk(chunk)

    def _chunk(self, chunk: int) -> Iterator[Reading]:
        s = self.s
        t0 = s.t0 + chunk * CHUNK_S
        t1 = min(t0 + CHUNK_S, s.t1)
        clk = self._clock(t0, t1)
        wx = self._weather(clk)
        series: dict[str, _Series] = {}
        for b in s.buildings:
            self._building(b, clk, wx, chunk, series)
        ts_all: list[list[float]] = []
        rows_all: list[list[list[float]]] = []
        seq_all: list[list[int]] = []
        names_all: list[tuple[str, ...]] = []
        for dev in self.ids:
            ts, seq, names, matrix = self._sample(dev, series[dev], clk, chunk)
            ts_all.append(ts.tolist())
            seq_all.append(seq.tolist())
            rows_all.append(matrix.tolist())
            names_all.append(names)
        counts = [len(t) for t in ts_all]
        if not sum(counts):
            return
        flat_ts = np.concatenate([np.asarray(t, dtype=np.float64) for t in ts_all])
        dev_idx = np.repeat(np.arange(len(self.ids)), counts)
        row_idx = np.concatenate([np.arange(c) for c in counts])
        order = np.lexsort((dev_idx, flat_ts))
        kinds = [self.kinds[d] for d in self.ids]
        ids = self.ids
        for d, r in zip(dev_idx[order].tolist(), row_idx[order].tolist(), strict=True):
            yield Reading(ids[d], kinds[d], ts_all[d][r], dict(zip(names_all[d], rows_all[d][r],
                                                                   strict=True)),
                          seq_all[d][r])

    def _clock(self, t0: float, t1: float) -> _Clock:
        g = self.s.grid_s
        n = max(1, math.ceil((t1 - t0) / g - 1e-9))
        times = t0 + g * np.arange(n, dtype=np.float64)
        widths = np.minimum(g, t1 - times)
        # UTC offsets per quarter hour (handles DST changes inside a chunk)
        bins = np.floor(times / 900.0).astype(np.int64)
        ub, inv = np.unique(bins, return_inverse=True)
        offs = np.array([self._utc_offset(float(b) * 900.0 + 1.0) for b in ub])
        local = times + offs[inv]
        daynum = np.floor(local / 86400.0).astype(np.int64)
        tod = local - daynum * 86400.0
        dayidx = np.clip(daynum - self.daynum0, 0, len(self.days) - 1)
        weekday = (daynum + 3) % 7  # 1970-01-01 was a Thursday
        restday = (weekday >= 5) | np.isin(dayidx, self.holiday_idx)
        return _Clock(times, widths, tod, dayidx, restday, t0, t1, g)

    def _utc_offset(self, ts: float) -> float:
        offset = datetime.fromtimestamp(ts, self.tz).utcoffset()
        return offset.total_seconds() if offset is not None else 0.0

    def _weather(self, clk: _Clock) -> _Weather:
        k, w = self.keyed, self.s.weather
        pos = clk.dayidx + clk.tod / 86400.0 + 0.5  # +1 margin, -0.5 day centre
        grid = np.arange(self.wx_mean.size, dtype=np.float64)
        mean = np.interp(pos, grid, self.wx_mean)
        amp = np.interp(pos, grid, self.wx_amp)
        temp = (mean + amp * np.cos(2 * np.pi * (clk.tod / 3600.0 - 15.0) / 24.0)
                + 0.6 * k.smooth("wx/3h", clk.times, self.s.t0, 3 * 3600.0)
                + 0.2 * k.smooth("wx/20m", clk.times, self.s.t0, 1200.0))
        for ev in w.events:
            a = local_day_start(ev.day, self.tz) + ev.from_s
            b = local_day_start(ev.day, self.tz) + ev.to_s
            ramp = np.clip((clk.times - a) / 3600.0, 0, 1) * np.clip((b - clk.times) / 3600.0,
                                                                      0, 1)
            temp = temp + ev.delta_c * np.sin(ramp * np.pi / 2) ** 2
        logpm = (np.interp(pos, grid, self.wx_logpm)
                 + 0.25 * k.smooth("wx/pm6h", clk.times, self.s.t0, 6 * 3600.0))
        return _Weather(temp, np.exp(logpm))

    # ---- physics ----------------------------------------------------------------------------

    def _windows(self, dev: str, kind: str, clk: _Clock) -> list[tuple[FaultSpec, BoolArray]]:
        out = []
        for f in self.faults.get(dev, ()):
            if f.type != kind:
                continue
            a = self.on_from.get((dev, f.start), f.start)
            b = f.start + f.duration_s
            if b <= clk.t0 or a >= clk.t1:
                continue
            out.append((f, (clk.times + clk.step > a) & (clk.times < b)))
        return out

    def _drift(self, dev: str, clk: _Clock) -> FloatArray:
        factor = np.ones(clk.times.size)
        for f, mask in self._windows(dev, "slow_drift", clk):
            days = np.maximum(0.0, clk.times - f.start) / 86400.0
            factor = np.where(mask, factor * (1.0 + (f.magnitude or 0.02) * days), factor)
        return factor

    def _building(self, b: BuildingSpec, clk: _Clock, wx: _Weather, chunk: int,
                  series: dict[str, _Series]) -> None:
        true_sub: dict[str, FloatArray] = {m.id: np.zeros(clk.times.size) for m in b.submeters}
        for u in b.units:
            ser = self._unit(u, clk, wx)
            series[u.id] = ser
            true_sub[u.submeter] += ser.measured
        total_true = np.zeros(clk.times.size)
        for m in b.submeters:
            true_sub[m.id] += self._loads(m, clk, wx, chunk) * self._drift(m.id, clk)
            total_true += true_sub[m.id]
            measured = true_sub[m.id] * m.gain
            for f, mask in self._windows(m.id, "submeter_mismatch", clk):
                measured = np.where(mask, measured * (1.0 - (f.magnitude or 0.3)), measured)
            series[m.id] = _Series(measured)
        nominal = max(1.0, float(self._nominal(b)))
        main_true = (total_true + b.unmetered_w * (1.0 + 0.05 * self.keyed.smooth(
            f"unmetered/{b.id}", clk.times, self.s.t0, 900.0))
            + b.loss_fraction * total_true**2 / nominal)
        for f, mask in self._windows(b.main.id, "submeter_mismatch", clk):
            watts = (f.magnitude or 0.2 * nominal) * (1.0 + 0.04 * self.keyed.smooth(
                f"unmetered-load/{b.id}", clk.times, self.s.t0, 600.0))
            main_true = main_true + np.where(mask, watts, 0.0)
        main_true = main_true * self._drift(b.main.id, clk)
        series[b.main.id] = _Series(main_true * b.main.gain)

    def _nominal(self, b: BuildingSpec) -> float:
        cached = self._nominal_w.get(b.id)
        if cached is None:
            cached = self._nominal_w[b.id] = nominal_power_w(self.s, b.main.id)
        return cached

    def _loads(self, m: MeterSpec, clk: _Clock, wx: _Weather, chunk: int) -> FloatArray:
        total = np.zeros(clk.times.size)
        st = self.state[m.id]
        for i, load in enumerate(m.loads):
            total += self._load(m.id, i, load, st, clk, wx, chunk)
        return total

    def _load(self, dev: str, i: int, load: LoadSpec, st: _DeviceState, clk: _Clock,
              wx: _Weather, chunk: int) -> FloatArray:
        k, n, t0 = self.keyed, clk.times.size, self.s.t0
        key = f"load/{dev}/{i}"
        rng = k.rng(key, chunk)
        if load.type == "residential":
            day_factor = 1.0 + 0.04 * k.normal(f"{key}/day", clk.dayidx)
            mean = (load.size * models.residential_w(clk.tod, clk.restday, wx.temp) * day_factor
                    * (1.0 + 0.03 * k.smooth(f"{key}/5m", clk.times, t0, 300.0)
                       + 0.03 * k.smooth(f"{key}/1h", clk.times, t0, 3600.0)))
            amp_mean, dur_mean = 1900.0, 700.0
            rate = 0.28 * mean / (amp_mean * dur_mean)  # appliance starts per second
            pulses = self._pulses(st, i, rng, clk, rate, lambda r, c: r.uniform(800, 3000, c),
                                  lambda r, c: np.exp(r.normal(math.log(500.0), 0.8, c)))
            return 0.72 * mean + pulses
        if load.type == "lifts":
            traffic = models.by_daytype(models.OCCUPANCY["lobby"], clk.tod, clk.restday)
            rate = load.size * (3.0 + 22.0 * traffic) / 3600.0
            pulses = self._pulses(st, i, rng, clk, rate, lambda r, c: r.uniform(3000, 11000, c),
                                  lambda r, c: r.uniform(20, 70, c))
            return 350.0 * load.size + pulses
        if load.type == "lighting":
            sunrise = self.sunrise[clk.dayidx + 1]
            sunset = self.sunset[clk.dayidx + 1]
            level = models.lighting_level(clk.tod, sunrise, sunset)
            return 1000.0 * load.size * level * (1.0 + 0.01 * k.smooth(f"{key}/n", clk.times, t0,
                                                                        600.0))
        if load.type == "pumps":
            demand = models.residential_w(clk.tod, clk.restday, wx.temp) / 1000.0
            duty = np.clip(0.1 + 0.6 * demand, 0.0, 0.95)
            on, st.pump_phase[i] = cycling(duty, st.pump_phase.get(i, 0.3), clk.step, 300.0)
            return 40.0 + np.where(on, 1000.0 * load.size * (1.0 + 0.02 * k.smooth(
                f"{key}/n", clk.times, t0, 120.0)), 0.0)
        # constant: security, telecom, the machine room
        return 1000.0 * load.size * (1.0 + 0.02 * k.smooth(f"{key}/n", clk.times, t0, 600.0)) * (
            np.ones(n))

    def _pulses(self, st: _DeviceState, i: int, rng: np.random.Generator, clk: _Clock,
                rate: FloatArray, amp: _Draw, dur: _Draw) -> FloatArray:
        """Rectangular switching loads (appliances, lift trips) arriving at `rate` per s."""
        n = clk.times.size
        diff = np.zeros(n + 1)
        for end, spilled_w in st.spill.get(i, ()):  # still running from the previous day
            j = min(n, max(0, math.ceil((end - clk.t0) / clk.step)))
            diff[0] += spilled_w
            diff[j] -= spilled_w
        cum = np.cumsum(rate * clk.widths)
        count = int(rng.poisson(float(cum[-1]))) if cum.size else 0
        spill: list[tuple[float, float]] = []
        if count:
            starts = np.searchsorted(cum, rng.uniform(0, float(cum[-1]), count))
            starts = np.minimum(starts, n - 1)
            watts = np.asarray(amp(rng, count), dtype=np.float64)
            cells = np.maximum(1, np.round(np.asarray(dur(rng, count)) / clk.step)).astype(
                np.int64)
            ends = starts + cells
            np.add.at(diff, starts, watts)
            np.add.at(diff, np.minimum(ends, n), -watts)
            over = ends > n
            spill = [(clk.t0 + float(e) * clk.step, float(w))
                     for e, w in zip(ends[over], watts[over], strict=True)]
        st.spill[i] = spill
        return np.cumsum(diff[:-1])

    def _unit_on(self, u: UnitSpec, clk: _Clock) -> BoolArray:
        plan = self.plans[u.id]
        on_s = plan.on_s[clk.dayidx]
        off_s = plan.off_s[clk.dayidx]
        with np.errstate(invalid="ignore"):
            on = (clk.tod >= on_s) & (clk.tod < off_s)
        for _, mask in self._windows(u.id, "after_hours", clk):
            on = on | mask
        return on

    def _unit(self, u: UnitSpec, clk: _Clock, wx: _Weather) -> _Series:
        if u.kind == "hvac":
            ser = self._hvac(u, clk, wx)
        else:
            ser = self._air(u, clk, wx)
        for f, mask in self._windows(u.id, "spike", clk):
            noise = 1.0 + 0.03 * self.keyed.smooth(f"spike/{u.id}", clk.times, self.s.t0, 30.0)
            ser.measured = np.where(mask, (f.magnitude or 4.0) * u.rated_w * noise, ser.measured)
        return ser

    def _hvac(self, u: UnitSpec, clk: _Clock, wx: _Weather) -> _Series:
        k, st, t0 = self.keyed, self.state[u.id], self.s.t0
        plan = self.plans[u.id]
        on = self._unit_on(u, clk)
        sp = plan.setpoint[clk.dayidx]
        mode = plan.mode[clk.dayidx]
        fan = np.where(on, plan.fan[clk.dayidx], 0.0)
        occ = models.by_daytype(models.OCCUPANCY[u.space], clk.tod, clk.restday)
        t_out = wx.temp
        free = 0.55 * t_out + 0.45 * (21.0 + 2.0 * occ)
        target_on = np.where(mode == 0, free, sp)
        room, st.room = models.relax_runs(clk.times, on, target_on, free, 1500.0, 4 * 3600.0,
                                          st.room, clk.step)
        cool, heat = mode == 1, mode == -1
        load = np.where(cool, (t_out - sp + 2.0 + 5.0 * occ) / 12.0,
                        np.where(heat, (sp - t_out - 1.0 - 3.0 * occ) / 20.0, 0.0))
        pull = np.clip((np.abs(room - sp) - 0.4) / 2.5, 0.0, 1.0) * (mode != 0)
        load = np.maximum(load, pull) * (1.0 + 0.07 * k.smooth(f"hvac/{u.id}/load", clk.times,
                                                                t0, 900.0))
        load = np.clip(load, 0.0, 1.0) * on
        min_period = 420.0 + 300.0 * k.uniform1(f"hvac/{u.id}/period", 0)
        if u.compressor == "fixed":
            comp, st.cycle = cycling(load, st.cycle, clk.step, min_period)
            comp_frac = comp.astype(np.float64)
            comp_power = comp_frac
        else:
            low = load < 0.3
            cyc, st.cycle = cycling(np.clip(load / 0.3, 0.0, 1.0), st.cycle, clk.step, min_period)
            comp_frac = np.where(low, 0.3 * cyc, load)
            comp = comp_frac > 0
            comp_power = comp_frac**1.15
        temp_factor = np.clip(np.where(cool, 1.0 + 0.012 * (t_out - 35.0),
                                       1.0 + 0.008 * (7.0 - t_out)), 0.8, 1.25)
        comp_w = (0.88 * u.rated_w * temp_factor * comp_power
                  * (1.0 + 0.02 * k.smooth(f"hvac/{u.id}/cw", clk.times, t0, 300.0)))
        fan_w = 0.06 * u.rated_w * (fan / 100.0) ** 3 + 0.04 * u.rated_w * comp
        standby = 6.0 + 40.0 * (t_out < 10.0)  # controls, and the crankcase heater in winter
        # a drift (fouled coils, worn bearings) raises what the unit draws while running
        power = np.where(on, 15.0 + (fan_w + comp_w) * self._drift(u.id, clk), standby)
        prev = np.concatenate(([st.comp_prev], comp[:-1]))
        st.comp_prev = bool(comp[-1])
        # the thermostat's dead band: the room swings a little around the setpoint
        ripple = np.where(on & (mode != 0), 0.15 * np.sin(2 * np.pi * (clk.times / min_period))
                          + 0.1 * k.smooth(f"hvac/{u.id}/room", clk.times, t0, 600.0), 0.0)
        return _Series(power, {"running": on.astype(np.float64), "temperature_c": room + ripple,
                               "setpoint_c": sp, "fan_speed_pct": fan}, comp & ~prev)

    def _air(self, u: UnitSpec, clk: _Clock, wx: _Weather) -> _Series:
        k, st, t0 = self.keyed, self.state[u.id], self.s.t0
        plan = self.plans[u.id]
        on = self._unit_on(u, clk)
        occ = models.by_daytype(models.OCCUPANCY[u.space], clk.tod, clk.restday)
        purifier = u.kind == "air_purifier"
        setting = plan.fan[clk.dayidx]
        if purifier:
            auto = 20.0 * np.clip(np.ceil(wx.pm25 / 30.0), 1, 5)
            fan = np.where(setting > 0, setting, auto)
        elif u.dcv:
            fan = np.clip(np.round((40.0 + 60.0 * occ) / 10.0) * 10.0, 40.0, 100.0)
        else:
            fan = setting
        fan = np.where(on, fan, 0.0)
        # Filter loading with running hours and outdoor dust; replaced when due or when a
        # clogging fault is fixed (its end).
        typical = 16 * 3600.0 * (0.5 if purifier else 0.8)
        life_s = u.filter_life_days * typical
        pm_factor = wx.pm25 / max(self.s.weather.pm25_mean, 1.0)
        inc = (fan / 100.0) * pm_factor * clk.widths / life_s
        replace_at = [int(np.searchsorted(clk.times, f.start + f.duration_s))
                      for f, _ in self._windows(u.id, "clogging_filter", clk)
                      if clk.t0 <= f.start + f.duration_s < clk.t1]
        fill = np.empty(clk.times.size)
        level = st.filter_load
        lo = 0
        while lo < clk.times.size:
            cut = min([r for r in replace_at if r > lo] + [clk.times.size])
            seg = level + np.cumsum(inc[lo:cut])
            over = np.flatnonzero(seg >= 1.0)
            if over.size:
                cut = lo + int(over[0])
                seg = seg[: cut - lo]
            fill[lo:cut] = seg
            level = float(seg[-1]) if seg.size else level
            if cut < clk.times.size:
                level = 0.0  # a fresh filter
                if cut in replace_at:
                    replace_at.remove(cut)
                fill[cut] = 0.0
                lo = cut + 1
            else:
                lo = cut
        st.filter_load = level
        ratio = 1.0 + 0.5 * fill**2
        for f, mask in self._windows(u.id, "clogging_filter", clk):
            days = np.maximum(0.0, clk.times - f.start) / 86400.0
            ratio = np.where(mask, ratio * (1.0 + (f.magnitude or 0.06) * days), ratio)
        x = fan / 100.0
        dp = u.dp_clean_pa * x**2 * ratio
        fan_part = 0.3 if purifier else 0.35  # share of the fan's work spent on the filter
        body = (0.1 + 0.9 * x**3) if purifier else (0.03 + 0.97 * x**3)
        running_w = ((2.0 if purifier else 8.0)
                     + u.rated_w * body * (1.0 + fan_part * (ratio - 1.0)) * self._drift(u.id, clk)
                     * (1.0 + 0.01 * k.smooth(f"air/{u.id}/n", clk.times, t0, 300.0)))
        power = np.where(on, running_w, 1.2 if purifier else 3.0)
        steps = 900.0 / clk.step
        extra: dict[str, FloatArray] = {"running": on.astype(np.float64), "fan_speed_pct": fan,
                                        "filter_dp_pa": dp}
        if purifier:
            target = wx.pm25 * 0.45 / (0.45 + 4.0 * x)
            if st.ema_a == 0.0:
                st.ema_a = float(target[0])
            pm = ema(target, steps, st.ema_a)
            st.ema_a = float(pm[-1])
            extra["pm25_ugm3"] = pm
        else:
            supply_on = wx.temp + 0.65 * (21.0 - wx.temp)
            supply_off = 0.5 * wx.temp + 0.5 * 19.0
            supply, st.supply = models.relax_runs(clk.times, on, supply_on, supply_off, 600.0,
                                                  1800.0, st.supply, clk.step)
            target = 420.0 + occ * 520.0 / (0.35 + 0.65 * x)
            if st.ema_a == 0.0:
                st.ema_a = float(target[0])
            co2 = ema(target, 1200.0 / clk.step, st.ema_a)
            st.ema_a = float(co2[-1])
            extra["temperature_c"] = supply
            extra["co2_ppm"] = co2
        return _Series(power, extra)

    # ---- sampling ---------------------------------------------------------------------------

    def _timestamps(self, dev: str, clk: _Clock, rng: np.random.Generator
                    ) -> tuple[IntArray, FloatArray]:
        rep, st = self.s.reporting, self.state[dev]
        base = self.s.t0 + st.phase_s
        k_end = math.floor((clk.t1 + rep.jitter_s - base) / rep.interval_s)
        ks = np.arange(st.next_k, max(st.next_k, k_end + 1), dtype=np.int64)
        ts = base + ks * rep.interval_s + rng.uniform(-rep.jitter_s, rep.jitter_s, ks.size)
        st.next_k = max(st.next_k, k_end + 1)
        all_k = np.concatenate((np.asarray(st.pending_k, dtype=np.int64), ks))
        all_ts = np.concatenate((np.asarray(st.pending_ts, dtype=np.float64), ts))
        keep = all_ts < clk.t1
        st.pending_k = all_k[~keep].tolist()
        st.pending_ts = all_ts[~keep].tolist()
        return all_k[keep], np.round(all_ts[keep], 3)

    def _sample(self, dev: str, ser: _Series, clk: _Clock, chunk: int
                ) -> tuple[FloatArray, IntArray, tuple[str, ...], FloatArray]:
        s, st = self.s, self.state[dev]
        kind = self.kinds[dev]
        rng = self.keyed.rng(f"sample/{dev}", chunk)
        ks, ts = self._timestamps(dev, clk, rng)
        n = ts.size
        idx = np.clip(((ts - clk.t0) // clk.step).astype(np.int64), 0, clk.times.size - 1)
        meas = ser.measured
        cell_kwh = meas * clk.widths / 3600.0
        e_end = st.energy + np.cumsum(cell_kwh)
        e_start = e_end - cell_kwh
        st.energy = float(e_end[-1])
        energy = e_start[idx] + meas[idx] * (ts - clk.times[idx]) / 3600.0
        names = METRICS_BY_KIND[kind]
        cols: dict[str, FloatArray] = {}
        if kind == "meter":
            power = meas[idx] * (1.0 + 0.002 * rng.standard_normal(n))
        else:
            power = (meas[idx] * (1.0 + 0.005 * rng.standard_normal(n))
                     + 0.1 * rng.standard_normal(n))
            if ser.comp_start is not None and s.inrush_probability > 0:
                inrush = ser.comp_start[idx] & (rng.random(n) < s.inrush_probability)
                power = np.where(inrush, power * rng.uniform(1.8, 2.8, n), power)
        for f, _ in self._windows(dev, "spike", clk):  # on a meter: a measurement glitch
            if kind == "meter":
                sel = (ts >= f.start) & (ts < f.start + f.duration_s)
                power = np.where(sel, power * (f.magnitude or 4.0), power)
        cols["power_w"] = np.maximum(power, 0.0)
        cols["energy_wh"] = self._counter(dev, energy, ts, e_start, meas, clk)
        if kind == "meter":
            b = next(b for b in s.buildings if b.main.id == dev or dev in
                     {m.id for m in b.submeters})
            nominal = max(1.0, self._nominal(b) * (1.0 if dev == b.main.id else 0.5))
            tod = clk.tod[idx]
            volt = (230.0 + 2.0 * self.keyed.normal1(f"volt/{b.id}", 0)
                    + 2.5 * np.cos(2 * np.pi * (tod / 3600.0 - 3.0) / 24.0)
                    - 1.5 * (meas[idx] / nominal - 1.0) + 0.4 * rng.standard_normal(n))
            cols["voltage_v"] = volt
            pf = 0.94 + 0.015 * self.keyed.smooth(f"pf/{dev}", ts, s.t0, 1800.0)
            cols["current_a"] = meas[idx] / (3.0 * volt * pf)
        else:
            for name in names:
                if name in ser.extra:
                    cols[name] = ser.extra[name][idx].copy()
            if "temperature_c" in cols:
                cols["temperature_c"] += 0.05 * rng.standard_normal(n)
            if "filter_dp_pa" in cols:
                dp = cols["filter_dp_pa"]
                cols["filter_dp_pa"] = np.maximum(
                    0.0, dp * (1.0 + 0.015 * rng.standard_normal(n)) + 0.5 * rng.standard_normal(n)
                    + 0.5)
            if "co2_ppm" in cols:
                cols["co2_ppm"] += 8.0 * rng.standard_normal(n)
            if "pm25_ugm3" in cols:
                cols["pm25_ugm3"] = np.maximum(0.0, cols["pm25_ugm3"] * (
                    1.0 + 0.05 * rng.standard_normal(n)))
        for name, decimals in _DECIMALS.items():
            if name in cols:
                cols[name] = np.round(cols[name], decimals)
        matrix = np.column_stack([cols[name] for name in names]) if n else np.zeros(
            (0, len(names)))
        self._stuck(dev, ts, names, matrix, clk)
        if n:
            st.last = dict(zip(names, matrix[-1].tolist(), strict=True))
        keep = self._delivered(dev, ts, rng, clk)
        return ts[keep], (st.seq0 + ks)[keep], names, matrix[keep]

    def _counter(self, dev: str, energy: FloatArray, ts: FloatArray, e_start: FloatArray,
                 meas: FloatArray, clk: _Clock) -> FloatArray:
        """The reported cumulative counter: offsets from resets and jumps, wrap, resolution."""
        st = self.state[dev]
        res = (self.units[dev].energy_resolution_wh if dev in self.units
               else self.meters[dev].energy_resolution_wh)
        offset = np.full(ts.size, st.offset)
        events = sorted((f.start, f) for f in self.faults.get(dev, ())
                        if f.type in ("counter_reset", "counter_jump")
                        and clk.t0 <= f.start < clk.t1)
        for at, f in events:
            if f.type == "counter_reset":
                i = min(int((at - clk.t0) // clk.step), clk.times.size - 1)
                e_at = float(e_start[i] + meas[i] * (at - clk.times[i]) / 3600.0)
                st.offset = (f.magnitude or 0.0) - e_at
            else:
                st.offset += f.magnitude or 1e6
            offset = np.where(ts >= at, st.offset, offset)
        value = np.mod(energy + offset, self.s.counter_max)
        return np.asarray(np.floor(value / res) * res, dtype=np.float64)

    def _stuck(self, dev: str, ts: FloatArray, names: tuple[str, ...], matrix: FloatArray,
               clk: _Clock) -> None:
        st = self.state[dev]
        for f in self.faults.get(dev, ()):
            if f.type != "stuck_sensor":
                continue
            end = f.start + f.duration_s
            if end <= clk.t0 or f.start >= clk.t1:
                continue
            sel = np.flatnonzero((ts >= f.start) & (ts < end))
            if not sel.size:
                continue
            metrics = names if f.metric == "all" else (f.metric or "power_w",)
            for metric in metrics:
                col = names.index(metric)
                key = (dev, f.start, metric)
                if key not in self.stuck_values:
                    first = int(sel[0])
                    self.stuck_values[key] = (float(matrix[first - 1, col]) if first > 0
                                              else st.last.get(metric, float(matrix[first, col])))
                matrix[sel, col] = self.stuck_values[key]

    def _delivered(self, dev: str, ts: FloatArray, rng: np.random.Generator,
                   clk: _Clock) -> BoolArray:
        rep = self.s.reporting
        keep = rng.random(ts.size) >= rep.loss
        days = (clk.t1 - clk.t0) / 86400.0
        for _ in range(int(rng.poisson(rep.blips_per_week * days / 7.0))):
            a = rng.uniform(clk.t0, clk.t1)
            keep &= ~((ts >= a) & (ts < a + rng.uniform(60.0, max(60.0, rep.blip_max_s))))
        for f in self.faults.get(dev, ()):
            if f.type == "dropout":
                keep &= ~((ts >= f.start) & (ts < f.start + f.duration_s))
        return keep


def generate(scenario: Scenario) -> Iterator[Reading]:
    """All readings of the scenario, in timestamp order (a generator: memory ~ one day)."""
    return Generator(scenario).readings()

