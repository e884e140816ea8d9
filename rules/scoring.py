"""How well rules find labelled faults: precision, recall, detection delay, false alarms.

Pure: alert transitions (what `rules.engine.Engine` emitted over a recording) and fault
labels (what a scenario injected, `simulators.faults` writes them) in, a `Report` out. No
I/O, no engine: the same function scores a replay of real telemetry against labels an
engineer wrote by hand.

Matching. A *firing* transition is a true positive (TP) of a fault when it is on the
fault's device and its `ts` lies in [start - tolerance_s, end + grace_s]: the grace lets
detectors that judge closed buckets or windows report just after a short fault. One alert
may match several faults (all of them count it); two alerts for one fault are two TPs for
one detected fault. A firing on one of the fault's `related` devices in the same window
(an upstream meter that carries a faulty unit's power, the sub-meter of a meter mismatch) is
*collateral*: the fault is real there too, so it is not a false alarm, yet it is not the
detection the label asks for. Every other firing is a false positive (FP).

Figures:
- recall per fault type = faults with at least one TP / faults of that type;
- precision = TP / (TP + FP) (collateral left out); `precision_strict` counts collateral as
  false, i.e. TP / all firings;
- per-type precision attributes each rule to the fault type it detects most (its TPs);
  the FPs of that rule count against that type; rules that never hit a fault stay
  unattributed (they lower only the overall precision);
- detection delay = first TP firing ts - fault start (may be slightly negative within the
  tolerance), median and p90 per type; step faults are all types but the gradual ones
  (`slow_drift`, `clogging_filter`), whose delay from a labelled start is naturally days;
- false alarms per device-day on fault-free data = FPs / device-days outside every fault
  window (a device's span minus its own and its related faults' windows).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import numpy as np

from rules.model import Transition

FAULT_TYPES: Final[tuple[str, ...]] = (
    "spike", "stuck_sensor", "after_hours", "counter_reset", "counter_jump", "dropout",
    "slow_drift", "clogging_filter", "submeter_mismatch",
)
"""The fault types the bundled scenarios label; `score` accepts any type string."""
GRADUAL_FAULT_TYPES: Final[frozenset[str]] = frozenset({"slow_drift", "clogging_filter"})
"""Faults that grow over days: their detection delay from the labelled start is not a
step-response figure."""

DEFAULT_TOLERANCE_S: Final = 120.0
DEFAULT_GRACE_S: Final = 1800.0
_DAY_S: Final = 86_400.0


@dataclass(frozen=True, slots=True)
class Fault:
    """One labelled fault: `type` on `device_id` over [start, end] (Unix seconds).

    `related` are other devices on which the same fault is physically visible (the meters
    upstream of a faulty unit); alerts there are collateral, neither TP nor FP.
    """

    type: str
    device_id: str
    start: float
    end: float
    related: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "device_id": self.device_id, "start": self.start,
                "end": self.end, "related": list(self.related)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fault:
        return cls(type=str(data["type"]), device_id=str(data["device_id"]),
                   start=float(data["start"]), end=float(data["end"]),
                   related=tuple(str(d) for d in data.get("related", ())))


class FaultLike(Protocol):
    """Anything with a fault's four fields (and optionally `related`)."""

    @property
    def type(self) -> str: ...
    @property
    def device_id(self) -> str: ...
    @property
    def start(self) -> float: ...
    @property
    def end(self) -> float: ...


@dataclass(frozen=True, slots=True)
class FaultResult:
    """What happened to one labelled fault."""

    fault: Fault
    detected: bool
    delay_s: float | None
    tp_alerts: int
    first_rule: str | None

    def to_dict(self) -> dict[str, Any]:
        return {**self.fault.to_dict(), "detected": self.detected, "delay_s": self.delay_s,
                "tp_alerts": self.tp_alerts, "first_rule": self.first_rule}


@dataclass(frozen=True, slots=True)
class TypeScore:
    """Per fault type: how many, how many found, how fast, how clean."""

    type: str
    step: bool
    faults: int
    detected: int
    recall: float | None
    tp_alerts: int
    fp_alerts: int
    precision: float | None
    median_delay_s: float | None
    p90_delay_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "step": self.step, "faults": self.faults,
                "detected": self.detected, "recall": self.recall, "tp_alerts": self.tp_alerts,
                "fp_alerts": self.fp_alerts, "precision": self.precision,
                "median_delay_s": self.median_delay_s, "p90_delay_s": self.p90_delay_s}


@dataclass(frozen=True, slots=True)
class AlertRef:
    """A firing transition, reduced to what a reader of the report needs."""

    rule_id: str
    device_id: str
    ts: float
    value: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"rule_id": self.rule_id, "device_id": self.device_id, "ts": self.ts,
                "value": self.value}


@dataclass(frozen=True, slots=True)
class RuleScore:
    """Per rule: its firings split into TP, collateral and FP, and what it found."""

    rule_id: str
    firings: int
    tp: int
    collateral: int
    fp: int
    precision: float | None
    attributed_type: str | None
    matched_types: dict[str, int]
    false_positives: tuple[AlertRef, ...]  # the first few, for diagnosis

    def to_dict(self) -> dict[str, Any]:
        return {"rule_id": self.rule_id, "firings": self.firings, "tp": self.tp,
                "collateral": self.collateral, "fp": self.fp, "precision": self.precision,
                "attributed_type": self.attributed_type,
                "matched_types": dict(self.matched_types),
                "false_positives": [a.to_dict() for a in self.false_positives]}


@dataclass(frozen=True, slots=True)
class Report:
    """The whole score; `to_dict()` for JSON, `to_text()` for a terminal."""

    span: tuple[float, float]
    devices: int
    firings: int
    tp: int
    collateral: int
    fp: int
    precision: float | None
    precision_strict: float | None
    faults: int
    detected: int
    recall: float | None
    step_median_delay_s: float | None
    step_p90_delay_s: float | None
    fault_free_device_days: float
    fault_free_alerts: int
    fault_free_alerts_per_device_day: float | None
    per_type: tuple[TypeScore, ...]
    per_rule: tuple[RuleScore, ...]
    fault_results: tuple[FaultResult, ...]
    tolerance_s: float
    grace_s: float
    notes: tuple[str, ...] = field(default=())

    @property
    def min_type_recall(self) -> float | None:
        values = [t.recall for t in self.per_type if t.recall is not None]
        return min(values) if values else None

    @property
    def min_type_precision(self) -> float | None:
        values = [t.precision for t in self.per_type if t.precision is not None]
        return min(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "span": list(self.span), "devices": self.devices,
            "tolerance_s": self.tolerance_s, "grace_s": self.grace_s,
            "overall": {
                "firings": self.firings, "tp": self.tp, "collateral": self.collateral,
                "fp": self.fp, "precision": self.precision,
                "precision_strict": self.precision_strict, "faults": self.faults,
                "detected": self.detected, "recall": self.recall,
                "min_type_recall": self.min_type_recall,
                "min_type_precision": self.min_type_precision,
                "step_median_delay_s": self.step_median_delay_s,
                "step_p90_delay_s": self.step_p90_delay_s,
            },
            "fault_free": {
                "device_days": self.fault_free_device_days,
                "alerts": self.fault_free_alerts,
                "alerts_per_device_day": self.fault_free_alerts_per_device_day,
            },
            "per_type": [t.to_dict() for t in self.per_type],
            "per_rule": [r.to_dict() for r in self.per_rule],
            "faults": [f.to_dict() for f in self.fault_results],
            "notes": list(self.notes),
        }

    def to_text(self) -> str:
        """A fixed-width table: per fault type, overall, fault-free false alarms, per rule."""
        lines = [
            f"{'fault type':<18} {'n':>4} {'found':>5} {'recall':>6} {'prec':>6} "
            f"{'med delay':>10} {'p90 delay':>10}",
        ]
        for t in self.per_type:
            lines.append(
                f"{t.type + ('' if t.step else ' *'):<18} {t.faults:>4} {t.detected:>5} "
                f"{_fmt_ratio(t.recall):>6} {_fmt_ratio(t.precision):>6} "
                f"{_fmt_delay(t.median_delay_s):>10} {_fmt_delay(t.p90_delay_s):>10}")
        lines.append(
            f"{'overall':<18} {self.faults:>4} {self.detected:>5} {_fmt_ratio(self.recall):>6} "
            f"{_fmt_ratio(self.precision):>6} {_fmt_delay(self.step_median_delay_s):>10} "
            f"{_fmt_delay(self.step_p90_delay_s):>10}")
        lines.append("(* gradual fault: not in the step-fault delay figures)")
        lines.append(
            f"alerts: {self.firings} firing, {self.tp} true, {self.collateral} collateral, "
            f"{self.fp} false; precision {_fmt_ratio(self.precision)} "
            f"(strict {_fmt_ratio(self.precision_strict)})")
        per_day = ("-" if self.fault_free_alerts_per_device_day is None
                   else f"{self.fault_free_alerts_per_device_day:.4f}")
        lines.append(
            f"fault-free: {self.fault_free_alerts} false alerts over "
            f"{self.fault_free_device_days:.1f} device-days = {per_day} per device-day")
        if self.per_rule:
            lines.append("")
            lines.append(f"{'rule':<28} {'fired':>6} {'true':>5} {'coll':>5} {'false':>5} "
                         f"{'prec':>6}  finds")
            for r in self.per_rule:
                finds = ", ".join(f"{k} {v}" for k, v in sorted(r.matched_types.items()))
                lines.append(f"{r.rule_id:<28} {r.firings:>6} {r.tp:>5} {r.collateral:>5} "
                             f"{r.fp:>5} {_fmt_ratio(r.precision):>6}  {finds}")
        lines.extend(self.notes)
        return "\n".join(lines)


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_delay(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) < 3600:
        return f"{value / 60:.1f} min"
    if abs(value) < 2 * _DAY_S:
        return f"{value / 3600:.1f} h"
    return f"{value / _DAY_S:.1f} d"


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def _type_order(fault_type: str) -> int:
    return FAULT_TYPES.index(fault_type) if fault_type in FAULT_TYPES else len(FAULT_TYPES)


def _as_fault(item: FaultLike) -> Fault:
    if isinstance(item, Fault):
        return item
    related = getattr(item, "related", ())
    return Fault(type=item.type, device_id=item.device_id, start=float(item.start),
                 end=float(item.end), related=tuple(related or ()))


def _union_length(intervals: Iterable[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of intervals, clipped to [lo, hi]."""
    clipped = sorted((max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi)
    total = 0.0
    cur_a: float | None = None
    cur_b = 0.0
    for a, b in clipped:
        if cur_a is None or a > cur_b:
            if cur_a is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_a is not None:
        total += cur_b - cur_a
    return total


def score(
    transitions: Iterable[Transition],
    faults: Iterable[FaultLike],
    devices: Collection[str],
    span: tuple[float, float],
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    grace_s: float = DEFAULT_GRACE_S,
    gradual_types: Collection[str] = GRADUAL_FAULT_TYPES,
    fp_examples: int = 10,
) -> Report:
    """Score alert transitions against fault labels (see the module docstring).

    `devices` are the device ids the recording covers (a Mapping's keys do); `span` is
    [start, end) of the recording, for device-days. Only `firing` transitions count.
    """
    fault_list = [_as_fault(f) for f in faults]
    lo, hi = span
    by_device: dict[str, list[int]] = defaultdict(list)
    related_by_device: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(fault_list):
        by_device[f.device_id].append(i)
        for dev in f.related:
            if dev != f.device_id:
                related_by_device[dev].append(i)

    firings = sorted((t for t in transitions if t.state == "firing"),
                     key=lambda t: (t.ts, t.rule_id, t.device_id))
    first_tp: dict[int, tuple[float, str]] = {}
    tp_count: Counter[int] = Counter()
    rule_firings: Counter[str] = Counter()
    rule_tp: Counter[str] = Counter()
    rule_coll: Counter[str] = Counter()
    rule_fp: Counter[str] = Counter()
    rule_types: dict[str, Counter[str]] = defaultdict(Counter)
    rule_fp_refs: dict[str, list[AlertRef]] = defaultdict(list)
    type_tp: Counter[str] = Counter()
    fp_alerts: list[Transition] = []

    def in_window(f: Fault, ts: float) -> bool:
        return f.start - tolerance_s <= ts <= f.end + grace_s

    tp_total = coll_total = 0
    for t in firings:
        rule_firings[t.rule_id] += 1
        hits = [i for i in by_device.get(t.device_id, ()) if in_window(fault_list[i], t.ts)]
        if hits:
            tp_total += 1
            rule_tp[t.rule_id] += 1
            for fault_type in {fault_list[i].type for i in hits}:
                rule_types[t.rule_id][fault_type] += 1
                type_tp[fault_type] += 1
            for i in hits:
                tp_count[i] += 1
                if i not in first_tp:
                    first_tp[i] = (t.ts, t.rule_id)
            continue
        if any(in_window(fault_list[i], t.ts) for i in related_by_device.get(t.device_id, ())):
            coll_total += 1
            rule_coll[t.rule_id] += 1
            continue
        rule_fp[t.rule_id] += 1
        fp_alerts.append(t)
        if len(rule_fp_refs[t.rule_id]) < fp_examples:
            rule_fp_refs[t.rule_id].append(AlertRef(t.rule_id, t.device_id, t.ts, t.value))

    attributed: dict[str, str] = {}
    for rule_id, types in rule_types.items():
        attributed[rule_id] = max(types.items(), key=lambda kv: (kv[1], -_type_order(kv[0])))[0]
    type_fp: Counter[str] = Counter()
    for rule_id, n in rule_fp.items():
        if rule_id in attributed:
            type_fp[attributed[rule_id]] += n

    results: list[FaultResult] = []
    for i, f in enumerate(fault_list):
        if i in first_tp:
            ts, rule_id = first_tp[i]
            results.append(FaultResult(f, True, ts - f.start, tp_count[i], rule_id))
        else:
            results.append(FaultResult(f, False, None, 0, None))

    types_present = sorted({f.type for f in fault_list}, key=lambda x: (_type_order(x), x))
    per_type: list[TypeScore] = []
    step_delays: list[float] = []
    for fault_type in types_present:
        rows = [r for r in results if r.fault.type == fault_type]
        delays = [r.delay_s for r in rows if r.delay_s is not None]
        step = fault_type not in gradual_types
        if step:
            step_delays.extend(delays)
        detected = sum(1 for r in rows if r.detected)
        per_type.append(TypeScore(
            type=fault_type, step=step, faults=len(rows), detected=detected,
            recall=_ratio(detected, len(rows)), tp_alerts=type_tp[fault_type],
            fp_alerts=type_fp[fault_type],
            precision=_ratio(type_tp[fault_type], type_tp[fault_type] + type_fp[fault_type]),
            median_delay_s=_percentile(delays, 50), p90_delay_s=_percentile(delays, 90)))

    per_rule = tuple(
        RuleScore(rule_id=rule_id, firings=n, tp=rule_tp[rule_id], collateral=rule_coll[rule_id],
                  fp=rule_fp[rule_id], precision=_ratio(rule_tp[rule_id],
                                                        rule_tp[rule_id] + rule_fp[rule_id]),
                  attributed_type=attributed.get(rule_id),
                  matched_types=dict(rule_types.get(rule_id, {})),
                  false_positives=tuple(rule_fp_refs.get(rule_id, ())))
        for rule_id, n in sorted(rule_firings.items(), key=lambda kv: (-kv[1], kv[0])))

    # Device-days outside every fault window that touches the device.
    windows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for f in fault_list:
        window = (f.start - tolerance_s, f.end + grace_s)
        for dev in {f.device_id, *f.related}:
            windows[dev].append(window)
    all_devices = set(devices)
    span_s = max(0.0, hi - lo)
    free_s = sum(span_s - _union_length(windows.get(dev, ()), lo, hi) for dev in all_devices)
    free_days = free_s / _DAY_S

    detected_total = sum(1 for r in results if r.detected)
    fp_total = len(fp_alerts)
    notes: list[str] = []
    unattributed = sorted(r for r in rule_fp if r not in attributed)
    if unattributed:
        notes.append("rules with false alerts and no true ones: " + ", ".join(unattributed))
    return Report(
        span=(lo, hi), devices=len(all_devices), firings=len(firings), tp=tp_total,
        collateral=coll_total, fp=fp_total,
        precision=_ratio(tp_total, tp_total + fp_total),
        precision_strict=_ratio(tp_total, len(firings)),
        faults=len(fault_list), detected=detected_total,
        recall=_ratio(detected_total, len(fault_list)),
        step_median_delay_s=_percentile(step_delays, 50),
        step_p90_delay_s=_percentile(step_delays, 90),
        fault_free_device_days=free_days, fault_free_alerts=fp_total,
        fault_free_alerts_per_device_day=(fp_total / free_days if free_days > 0 else None),
        per_type=tuple(per_type), per_rule=per_rule, fault_results=tuple(results),
        tolerance_s=tolerance_s, grace_s=grace_s, notes=tuple(notes),
    )
