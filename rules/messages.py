"""Alert messages: the rule's `message` template, or a sensible default per rule kind.

A template is operator input; a typo in it must not lose the alert. Templates that use
attribute or index access (`{value.__class__}`), positional fields, unknown names or a
format spec that does not fit the value fall back to the default message.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Mapping
from typing import Any

from rules.model import (
    BaselineRule,
    CounterRule,
    DeviceInfo,
    EventRule,
    FlatlineRule,
    FloorRule,
    GroupRule,
    NoDataRule,
    RateOfChangeRule,
    RatioRule,
    Rule,
    ScheduleRule,
    ThresholdRule,
    rule_metric,
)

_HIDDEN = {"match", "labels", "message", "source", "kind"}


def num(value: Any) -> str:
    """A number as people read it: 5000 not 5000.0, 5312.4 not 5312.400000001."""
    if value is None:
        return "-"
    if isinstance(value, (set, frozenset)):
        return ", ".join(sorted(str(v) for v in value))
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    x = float(value)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.6g}"


class Messages:
    """Renders one rule's messages; the template is checked once, not per alert."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.metric = rule_metric(rule)
        self.base: dict[str, Any] = {}
        for f in dataclasses.fields(rule):
            if f.name not in _HIDDEN:
                value = getattr(rule, f.name)
                self.base[f.name] = num(value) if isinstance(value, frozenset) else value
        self.base.update(rule.labels)
        self.template = rule.message if _safe(rule.message) else ""

    def render(self, device: DeviceInfo, state: str, value: float | None,
               detail: Mapping[str, Any] | None) -> str:
        fields = {**self.base, **(detail or {}), "rule_id": self.rule.id,
                  "device_id": device.device_id, "kind": device.kind,
                  "building": device.building or "", "metric": self.metric or "",
                  "value": value, "severity": self.rule.severity, "state": state}
        if self.template:
            try:
                return self.template.format_map(fields)
            except Exception:  # noqa: S110 -- any template error: default message
                pass
        return default_message(self.rule, fields)


def _safe(template: str) -> bool:
    if not template:
        return False
    try:
        for _text, name, _spec, _conv in string.Formatter().parse(template):
            if name is None:
                continue
            if not name.isidentifier():
                return False
    except ValueError:
        return False
    return True


def default_message(rule: Rule, f: Mapping[str, Any]) -> str:
    """E.g. "power_w of hvac-b1-1 above 5000 for 300 s (value 5312.4)"."""
    dev, metric, value = f["device_id"], f["metric"], num(f["value"])
    firing = f["state"] == "firing"
    held = f" for {num(rule.for_s)} s" if rule.for_s > 0 else ""
    if isinstance(rule, ThresholdRule):
        up = rule.above is not None
        limit = rule.above if up else rule.below
        clear = limit if rule.clear is None else rule.clear
        side, back = ("above", "below") if up else ("below", "above")
        if firing:
            return f"{metric} of {dev} {side} {num(limit)}{held} (value {value})"
        return f"{metric} of {dev} back {back} {num(clear)} (value {value})"
    if isinstance(rule, RateOfChangeRule):
        if firing:
            return (f"{metric} of {dev} changing at {value}/s, over {num(rule.max_per_s)}/s"
                    f"{held}")
        return f"{metric} of {dev} changing at {value}/s again, within limits"
    if isinstance(rule, FlatlineRule):
        if firing:
            return (f"{metric} of {dev} stuck at {value} (within {num(rule.tolerance)}) for "
                    f"{num(rule.window_s)} s")
        return f"{metric} of {dev} changing again (value {value})"
    if isinstance(rule, CounterRule):
        if firing:
            return (f"{metric} of {dev}: {f.get('anomaly', 'anomaly')} of {value} "
                    f"(previous reading {num(f.get('previous'))})")
        return f"{metric} of {dev}: no counter anomaly for {num(rule.clear_after_s)} s"
    if isinstance(rule, NoDataRule):
        what = f"{rule.metric} " if rule.metric else ""
        if firing:
            return f"no {what}data from {dev} for {num(rule.timeout_s + rule.for_s)} s"
        return f"{dev} sending {what}data again"
    if isinstance(rule, ScheduleRule):
        where = f["building"] or "the site"
        if firing:
            return (f"{metric} of {dev} at {value} while {where} is closed (limit "
                    f"{num(rule.above)}){held}")
        return f"{metric} of {dev} back to out-of-hours normal or {where} open (value {value})"
    if isinstance(rule, BaselineRule):
        usual = f"usual {num(f.get('expected'))} ± {num(f.get('bound'))}"
        if firing:
            return (f"{metric} of {dev} averaged {value} over {num(rule.bucket_s)} s, {usual}"
                    f"{held}")
        return f"{metric} of {dev} back to its usual range (averaged {value}, {usual})"
    if isinstance(rule, FloorRule):
        at = f" at {rule.per} steps of {num(rule.per_step)}" if rule.per else ""
        pct = f.get("pct")
        change = "-" if pct is None else f"{pct:+.1f}%"
        if firing:
            return (f"base {metric} of {dev}{at} is {value}, {change} from its lowest "
                    f"{num(f.get('reference'))}{held}")
        return f"base {metric} of {dev} back near its lowest ({change}, value {value})"
    if isinstance(rule, RatioRule):
        ratio = f"{rule.numerator}/{rule.denominator}^{num(rule.exponent)} of {dev}"
        pct = f.get("pct")
        change = "-" if pct is None else f"{pct:+.1f}%"
        if firing:
            return f"{ratio} {change} from its reference {num(f.get('reference'))}{held}"
        return f"{ratio} back near its reference ({change})"
    if isinstance(rule, GroupRule):
        body = (f"{metric} of main meter {dev} ({num(f.get('main'))}) vs its sub-meters "
                f"({num(f.get('subs'))})")
        if firing:
            return f"{body} differ by {num(f.get('difference'))}"
        return f"{body} balanced again"
    if isinstance(rule, EventRule):
        event = f.get("event")
        if firing:
            return f"{event} at {dev}"
        if event:
            return f"{dev}: {event}"
        return f"{dev}: no {num(rule.events)} for {num(rule.clear_after_s)} s"
    return f"{rule.id} {f['state']} for {dev}"
