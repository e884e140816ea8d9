"""Readings as columns: the shape the engine evaluates, one numpy array per metric.

The gateway's hot path (and the benchmark) builds these once per batch and hands them to
`Engine.process_columns`; `Engine.process` converts `Reading` objects through
`ReadingColumns.from_readings` so both paths share one evaluator.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from device_drivers.vocabulary import Reading

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]


@dataclass(frozen=True, eq=False)
class ReadingColumns:
    """A batch of readings in stream order (the order they arrived in).

    `device[i]` indexes `device_ids`/`kinds` (the batch's own small device table, so the
    per-reading column is an integer, not a string). `metrics[name][i]` is NaN where reading
    i does not carry that metric; non-finite values are treated as absent, because one
    `inf` from a faulty sensor would otherwise poison every difference and mean after it.
    """

    device_ids: tuple[str, ...]
    kinds: tuple[str, ...]
    device: I64
    ts: F64
    metrics: Mapping[str, F64] = field(default_factory=dict)

    def __post_init__(self) -> None:
        device = np.ascontiguousarray(self.device, dtype=np.int64)
        ts = np.ascontiguousarray(self.ts, dtype=np.float64)
        if device.ndim != 1 or ts.shape != device.shape:
            raise ValueError("device and ts must be 1-d arrays of the same length")
        if len(self.kinds) != len(self.device_ids):
            raise ValueError("kinds must have one entry per device id")
        if len(device) and (device.min() < 0 or device.max() >= len(self.device_ids)):
            raise ValueError("device index out of range")
        if not np.isfinite(ts).all():
            raise ValueError("timestamps must be finite")
        metrics: dict[str, F64] = {}
        for name, values in self.metrics.items():
            column = np.array(values, dtype=np.float64)
            if column.shape != ts.shape:
                raise ValueError(f"metric {name!r} has {column.shape}, expected {ts.shape}")
            column[~np.isfinite(column)] = np.nan
            metrics[name] = column
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "ts", ts)
        object.__setattr__(self, "metrics", metrics)

    def __len__(self) -> int:
        return len(self.ts)

    @classmethod
    def from_readings(cls, readings: Iterable[Reading]) -> ReadingColumns:
        """Columns of `readings`, keeping their order; unparseable values count as absent."""
        index: dict[str, int] = {}
        kinds: list[str] = []
        device: list[int] = []
        ts: list[float] = []
        rows: dict[str, list[int]] = {}
        values: dict[str, list[float]] = {}
        for row, reading in enumerate(readings):
            slot = index.get(reading.device_id)
            if slot is None:
                slot = index[reading.device_id] = len(kinds)
                kinds.append(reading.kind)
            device.append(slot)
            ts.append(float(reading.ts))
            for name, raw in reading.metrics.items():
                value = _as_float(raw)
                if value is None:
                    continue
                column_rows = rows.get(name)
                if column_rows is None:
                    column_rows = rows[name] = []
                    values[name] = []
                column_rows.append(row)
                values[name].append(value)
        n = len(ts)
        metrics: dict[str, F64] = {}
        for name, column_rows in rows.items():
            column = np.full(n, np.nan)
            column[np.array(column_rows, dtype=np.int64)] = values[name]
            metrics[name] = column
        return cls(tuple(index), tuple(kinds), np.array(device, dtype=np.int64),
                   np.array(ts, dtype=np.float64), metrics)

    @classmethod
    def empty(cls) -> ReadingColumns:
        return cls((), (), np.zeros(0, dtype=np.int64), np.zeros(0))


def _as_float(raw: Any) -> float | None:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
