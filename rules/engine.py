"""The anomaly rule evaluator: readings and device events in, alert transitions out.

Pure and deterministic: the same stream gives the same transitions however it is cut into
calls, after any number of snapshot/restore cycles, whether it arrives as `Reading`
objects or as columns. Time is event time (the items' `ts`) everywhere except `tick`.

Stream rules every detector follows:
- Per device, a reading not newer than the device's newest is ignored (`late`); so is an
  event older than the device's newest event (`late_events`).
- The watermark is the newest timestamp of any accepted item so far. Deadlines (no data,
  expiring counter and event alerts, buckets closing) are decided when the watermark
  passes them, which one-at-a-time delivery and batches see identically.
- One alert per (rule, device): a firing alert absorbs further breaches until resolved.
- Output is sorted by (ts, rule order, device id), emission order breaking ties (a
  resolution before a re-fire at the same instant).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from device_drivers.vocabulary import DeviceEvent, Reading
from rules import snapshot as snap
from rules.batch import Batch, prepare
from rules.columns import ReadingColumns
from rules.detectors import Detector, Site, make_detector
from rules.lifecycle import Emitted
from rules.messages import Messages
from rules.model import DeviceInfo, Rule, SiteContext, Transition, alert_id, rule_metric

F64 = npt.NDArray[np.float64]

__all__ = ["Engine", "ReadingColumns"]


class Engine:
    """Evaluates `rules` for the devices of `context` (and any device the stream names).

    `process` takes `Reading`/`DeviceEvent` objects, `process_columns` readings already in
    columns (the fast path; `process` converts and shares it), `tick` the live wall clock
    for deadman rules. `snapshot`/`restore` carry the whole state across a restart.

    `counters`: readings and events accepted, `late` readings and `late_events` ignored,
    `invalid` items without a finite timestamp, `transitions` emitted.
    """

    counters: dict[str, int]

    def __init__(self, rules: Sequence[Rule], context: SiteContext) -> None:
        self._setup(rules, context)
        for info in context.devices.values():
            self._device(info.device_id, info.kind, registered=info)

    def _setup(self, rules: Sequence[Rule], context: SiteContext) -> None:
        self.rules = tuple(rules)
        ids = [rule.id for rule in self.rules]
        if len(set(ids)) != len(ids):
            raise ValueError("rule ids must be unique (they name the alerts)")
        self.context = context
        self.site = Site(context)
        self._detectors: list[Detector] = [make_detector(r, self.site) for r in self.rules]
        self._messages = [Messages(r) for r in self.rules]
        self._metrics = [rule_metric(r) for r in self.rules]
        self.counters = {"readings": 0, "events": 0, "late": 0, "late_events": 0,
                         "invalid": 0, "transitions": 0}
        self._capacity = 0
        self._last_ts = np.zeros(0)
        self._last_event = np.zeros(0)
        self._wm = math.nan
        self._active: dict[tuple[int, str], Transition] = {}
        self._map_ids: tuple[str, ...] | None = None
        self._map = np.zeros(0, dtype=np.int64)

    # ---- devices ----------------------------------------------------------------------

    def _device(self, device_id: str, kind: str, registered: DeviceInfo | None = None) -> int:
        number = self.site.index.get(device_id)
        if number is not None:
            return number
        info = registered or DeviceInfo(device_id, kind)
        number = self.site.add(info, registered is not None, self._wm)
        if number >= self._capacity:
            self._grow(max(64, 2 * self._capacity, number + 1))
        return number

    def _device_map(self, columns: ReadingColumns) -> npt.NDArray[np.int64]:
        """Engine numbers of the columns' devices; a producer that keeps its device table
        between batches (the same tuple) pays for the lookup once."""
        ids = columns.device_ids
        if ids is not self._map_ids:
            index = self.site.index
            numbers = [index.get(d) for d in ids]
            if None in numbers:
                numbers = [self._device(d, k) for d, k in zip(ids, columns.kinds, strict=True)]
            self._map_ids, self._map = ids, np.array(numbers, dtype=np.int64)
        return self._map

    def _grow(self, capacity: int) -> None:
        self._capacity = capacity
        for detector in self._detectors:
            detector.resize(capacity)
        self._last_ts = _grown(self._last_ts, capacity)
        self._last_event = _grown(self._last_event, capacity)

    # ---- evaluation -------------------------------------------------------------------

    def process(self, items: Sequence[Reading | DeviceEvent]) -> list[Transition]:
        """Evaluate readings and events in arrival order (time order per device)."""
        readings: list[Reading] = []
        events: list[DeviceEvent] = []
        stamps: list[float] = []
        is_reading: list[bool] = []
        for item in items:
            ts = float(item.ts)
            if not math.isfinite(ts):
                self.counters["invalid"] += 1
                continue
            if isinstance(item, DeviceEvent):
                events.append(item)
                is_reading.append(False)
            else:
                readings.append(item)
                is_reading.append(True)
            stamps.append(ts)
        if not stamps:
            return []
        wm = self._watermarks(np.array(stamps))
        kinds = np.array(is_reading, dtype=np.bool_)
        return self._run(ReadingColumns.from_readings(readings), wm[kinds], events,
                         wm[~kinds].tolist(), float(wm[0]), float(wm[-1]))

    def process_columns(self, columns: ReadingColumns) -> list[Transition]:
        """The fast path: the same evaluation over readings already in columns."""
        if not len(columns):
            return []
        wm = self._watermarks(columns.ts)
        return self._run(columns, wm, [], [], float(wm[0]), float(wm[-1]))

    def _watermarks(self, stamps: F64) -> F64:
        wm = np.maximum.accumulate(stamps)
        return wm if math.isnan(self._wm) else np.maximum(wm, self._wm)

    def _run(self, columns: ReadingColumns, reading_wm: F64, events: list[DeviceEvent],
             event_wm: list[float], wm_first: float, wm_end: float) -> list[Transition]:
        batch = prepare(columns, self._device_map(columns), self._last_ts, reading_wm,
                        self._wm, wm_first, wm_end)
        self._accept_events(batch, events, event_wm)
        self.counters["readings"] += len(batch.order)
        self.counters["late"] += batch.late
        out: list[tuple[float, int, str, int, Transition]] = []
        for number, detector in enumerate(self._detectors):
            self._dress(number, detector.process(batch), out)
        self._wm = wm_end
        return self._finish(out)

    def _accept_events(self, batch: Batch, events: list[DeviceEvent],
                       event_wm: list[float]) -> None:
        kept: list[DeviceEvent] = []
        devs: list[int] = []
        wms: list[float] = []
        for event, wm in zip(events, event_wm, strict=True):
            d = self._device(event.device_id, event.kind)
            if event.ts < self._last_event[d]:
                self.counters["late_events"] += 1
                continue
            self._last_event[d] = event.ts
            kept.append(event)
            devs.append(d)
            wms.append(wm)
        batch.events, batch.event_dev, batch.event_wm = kept, devs, wms
        self.counters["events"] += len(kept)

    def tick(self, now: float) -> list[Transition]:
        """Live deadman: no-data alerts for devices silent for `timeout_s` of wall clock.

        Fires exactly the transition event time would fire later (ts = last reading +
        timeout), so the later event-time check finds it already firing. Never called
        in replay.
        """
        out: list[tuple[float, int, str, int, Transition]] = []
        for number, detector in enumerate(self._detectors):
            self._dress(number, detector.tick(float(now)), out)
        return self._finish(out)

    def _dress(self, number: int, emitted: list[Emitted],
               out: list[tuple[float, int, str, int, Transition]]) -> None:
        if not emitted:
            return
        rule = self.rules[number]
        messages = self._messages[number]
        for e in emitted:
            info = self.site.infos[e.device]
            transition = Transition(
                alert_id(rule.id, info.device_id, e.started_at), rule.id, info.device_id,
                self._metrics[number], "firing" if e.state == "firing" else "resolved",
                rule.severity, e.value, e.started_at, e.ts,
                messages.render(info, e.state, e.value, e.detail), rule.labels)
            out.append((e.ts, number, info.device_id, len(out), transition))

    def _finish(self, out: list[tuple[float, int, str, int, Transition]]) -> list[Transition]:
        out.sort(key=lambda row: row[:4])
        result = [row[4] for row in out]
        for row in out:
            key = (row[1], row[2])
            if row[4].state == "firing":
                self._active[key] = row[4]
            else:
                self._active.pop(key, None)
        self.counters["transitions"] += len(result)
        return result

    def active(self) -> list[Transition]:
        """The firing alerts, each as its (latest) firing transition, in rule order."""
        return [self._active[key] for key in sorted(self._active)]

    # ---- snapshot -----------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The complete evaluator state as compact, deterministic bytes."""
        n = len(self.site)
        arrays: dict[str, npt.NDArray[Any]] = {
            "engine.last_ts": self._last_ts[:n], "engine.last_event": self._last_event[:n]}
        rules_meta = []
        for number, detector in enumerate(self._detectors):
            det_arrays, det_meta = detector.dump()
            arrays.update({f"rule{number}.{k}": v for k, v in det_arrays.items()})
            rules_meta.append({"id": self.rules[number].id,
                               "fingerprint": snap.fingerprint(self.rules[number]),
                               "meta": det_meta})
        meta = {
            "wm": self._wm,
            "counters": self.counters,
            "devices": [[i.device_id, i.kind, i.building, r, s] for i, r, s in
                        zip(self.site.infos, self.site.registered, self.site.since, strict=True)],
            "rules": rules_meta,
            "active": [[number, _wire(t)] for (number, _), t in sorted(self._active.items())],
        }
        return snap.encode(meta, arrays)

    @classmethod
    def restore(cls, rules: Sequence[Rule], context: SiteContext, snapshot: bytes) -> Engine:
        """An engine continuing from `snapshot`, with possibly changed rules and site.

        Rules whose id and definition (every field but `source`) are unchanged keep their
        state, pending timers and firing alerts; others start fresh; state of rules that
        no longer exist is dropped. Registry devices come from the new `context`.
        ValueError: not a snapshot, corrupt, or of an incompatible format.
        """
        meta, arrays = snap.decode(snapshot)
        engine = cls.__new__(cls)
        engine._setup(rules, context)
        try:
            engine._load(meta, arrays)
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ValueError(f"snapshot does not fit this engine: {exc!r}") from exc
        return engine

    def _load(self, meta: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> None:
        self._wm = float(meta["wm"])
        for name, value in meta["counters"].items():
            self.counters[str(name)] = int(value)
        for device_id, kind, _building, _registered, since in meta["devices"]:
            info = self.context.devices.get(device_id)
            number = self.site.add(info or DeviceInfo(str(device_id), str(kind)),
                                   info is not None, float(since))
            if number >= self._capacity:
                self._grow(max(64, 2 * self._capacity, number + 1))
        stored = len(self.site)
        for info in self.context.devices.values():
            self._device(info.device_id, info.kind, registered=info)
        for name, target in (("last_ts", self._last_ts), ("last_event", self._last_event)):
            values = arrays[f"engine.{name}"]
            if values.shape != (stored,):
                raise ValueError(f"engine.{name} does not match the device table")
            target[:stored] = values
        old = {entry["id"]: (k, entry) for k, entry in enumerate(meta["rules"])}
        kept: dict[int, int] = {}
        for number, rule in enumerate(self.rules):
            found = old.get(rule.id)
            if found is None or found[1]["fingerprint"] != snap.fingerprint(rule):
                continue
            prefix = f"rule{found[0]}."
            mine = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            self._detectors[number].load(mine, found[1]["meta"])
            kept[found[0]] = number
        for old_number, wire in meta["active"]:
            if old_number in kept:
                transition = Transition(**{**wire, "labels": dict(wire["labels"])})
                self._active[(kept[old_number], transition.device_id)] = transition


def _wire(t: Transition) -> dict[str, Any]:
    return {"alert_id": t.alert_id, "rule_id": t.rule_id, "device_id": t.device_id,
            "metric": t.metric, "state": t.state, "severity": t.severity, "value": t.value,
            "started_at": t.started_at, "ts": t.ts, "message": t.message,
            "labels": dict(t.labels)}


def _grown(values: F64, capacity: int) -> F64:
    grown = np.full(capacity, np.nan)
    grown[: len(values)] = values
    return grown
