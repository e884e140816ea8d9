"""The line handling of `scgw rules replay` (gateway/app/cli_rules.py): JSON lines of readings
into the rules engine in batches of columns, bad lines reported with their number.

A module of its own so that the `scgw` command line imports numpy and the engine only when
a replay runs (the gateway process never evaluates rules; its telemetry worker does).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import numpy as np

from device_drivers.vocabulary import DeviceEvent, valid_device_id
from rules.columns import ReadingColumns
from rules.engine import Engine
from rules.model import Transition

BATCH = 50_000  # the engine has a fixed cost per call (~10 ms for 50 rules)


class _ColumnBuilder:
    """Recorded lines straight into `ReadingColumns`, without a `Reading` per line: the
    replay's hot loop (measured: building Readings and converting them cost more than the
    engine itself). Lines are grouped by their metric names (a device sends the same ones
    every time), so a line costs two appends and `build` converts each group at once."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.index: dict[str, int] = {}
        self.kinds: list[str] = []
        self.device: list[int] = []
        self.ts: list[float] = []
        self.rows: dict[tuple[str, ...], list[int]] = {}
        self.values: dict[tuple[str, ...], list[list[Any]]] = {}

    def __len__(self) -> int:
        return len(self.ts)

    def add(self, device_id: str, kind: str, ts: float, metrics: dict[str, Any]) -> None:
        slot = self.index.get(device_id)
        if slot is None:
            slot = self.index[device_id] = len(self.kinds)
            self.kinds.append(kind)
        names = tuple(metrics)
        rows = self.rows.get(names)
        if rows is None:
            rows = self.rows[names] = []
            self.values[names] = []
        rows.append(len(self.ts))
        self.values[names].append(list(metrics.values()))
        self.device.append(slot)
        self.ts.append(ts)

    def build(self) -> ReadingColumns:
        n = len(self.ts)
        metrics: dict[str, Any] = {}
        for names, rows in self.rows.items():
            at = np.array(rows, dtype=np.int64)
            block = np.array(self.values[names], dtype=np.float64)
            for k, name in enumerate(names):
                column = metrics.get(name)
                if column is None:
                    column = metrics[name] = np.full(n, np.nan)
                column[at] = block[:, k]
        return ReadingColumns(tuple(self.index), tuple(self.kinds),
                              np.array(self.device, dtype=np.int64),
                              np.array(self.ts, dtype=np.float64), metrics)

    def take(self) -> ReadingColumns:
        """`build`, and start empty (`add` stays bound: the hot loop keeps it in a local)."""
        columns = self.build()
        self._reset()
        return columns


_NUMBER = (int, float)


def _check(data: Any, kinds: Mapping[str, str], known: dict[str, str]
           ) -> tuple[str, str, float, dict[str, Any]] | DeviceEvent | str:
    """A parsed line as (device, kind, ts, metrics) or an event, or why it is unusable."""
    if type(data) is not dict:
        return "expected a JSON object"
    device_id = data.get("device_id")
    kind = known.get(device_id) if type(device_id) is str else None
    if kind is None:
        if not valid_device_id(device_id):
            return "device_id missing or not a device id"
        assert isinstance(device_id, str)
        kind = kinds.get(device_id) or data.get("kind")
        if not isinstance(kind, str) or not kind:
            return f"no kind for {device_id!r} (not in the site file and none on the line)"
        known[device_id] = kind
    assert isinstance(device_id, str)
    ts = data.get("ts")
    if type(ts) not in _NUMBER or not math.isfinite(ts):  # type: ignore[arg-type]
        return "ts must be a number (Unix seconds)"
    metrics = data.get("metrics")
    if metrics is None and type(data.get("type")) is str:
        return DeviceEvent(device_id, kind, float(ts), data["type"])  # type: ignore[arg-type]
    if type(metrics) is not dict or not metrics:
        return "metrics must be a non-empty object"
    for name, value in metrics.items():
        if type(value) not in _NUMBER or not math.isfinite(value):
            return f"metric {name!r} is not a finite number"
    return device_id, kind, float(ts), metrics  # type: ignore[arg-type]


def json_loads() -> Callable[[str], Any]:
    """orjson's parser when installed (about 3x faster than the standard library's, which
    dominated the replay's time), else `json.loads`. Both refuse the same lines here that
    matter (not JSON, trailing text); orjson also refuses NaN and Infinity literals, which
    `_check` would refuse as non-finite anyway."""
    try:
        from orjson import loads
    except ImportError:
        return json.loads
    return loads


def replay_stream(lines: TextIO, engine: Engine, kinds: Mapping[str, str],
                  out: TextIO, err: TextIO) -> tuple[int, int, int]:
    """Feed `lines` to `engine` in batches; write transitions to `out`. (readings, bad,
    transitions)."""
    readings = bad = emitted = 0
    known: dict[str, str] = {}
    loads = json_loads()

    def emit(transitions: list[Transition]) -> None:
        nonlocal emitted
        for transition in transitions:
            out.write(json.dumps(transition.to_wire(), separators=(",", ":")) + "\n")
            emitted += 1

    batch = _ColumnBuilder()
    add, pending = batch.add, 0
    isfinite, numbers = math.isfinite, _NUMBER
    for number, text in enumerate(lines, 1):
        try:
            data = loads(text)
        except ValueError as exc:  # orjson's error is a ValueError too
            if not text.strip():
                continue
            checked: Any = f"not JSON ({exc})"
        else:
            # the common line inline (a known device, a finite ts, finite numbers); any
            # other goes through `_check`, which also says what is wrong
            if type(data) is dict:
                device_id: Any = data.get("device_id")
                kind = known.get(device_id) if type(device_id) is str else None
                ts: Any = data.get("ts")
                metrics = data.get("metrics")
                if (kind is not None and type(ts) in numbers and isfinite(ts)
                        and type(metrics) is dict and metrics):
                    for value in metrics.values():
                        if type(value) not in numbers or not isfinite(value):
                            break
                    else:
                        add(device_id, kind, float(ts), metrics)
                        readings += 1
                        pending += 1
                        if pending >= BATCH:
                            emit(engine.process_columns(batch.take()))
                            pending = 0
                        continue
            checked = _check(data, kinds, known)
        if isinstance(checked, tuple):
            add(*checked)
            readings += 1
            pending += 1
            if pending >= BATCH:
                emit(engine.process_columns(batch.take()))
                pending = 0
        elif isinstance(checked, DeviceEvent):
            if pending:  # keep the stream's order around the event
                emit(engine.process_columns(batch.take()))
                pending = 0
            emit(engine.process([checked]))
            readings += 1
        else:
            bad += 1
            if bad <= 100:
                err.write(f"line {number}: {checked}; skipped\n")
    if pending:
        emit(engine.process_columns(batch.take()))
    return readings, bad, emitted
