"""One detector class per rule kind."""

from __future__ import annotations

from rules.detectors.base import Detector, Site
from rules.detectors.baseline import BaselineDetector
from rules.detectors.counter import CounterDetector
from rules.detectors.event import EventDetector
from rules.detectors.flatline import FlatlineDetector
from rules.detectors.floor import FloorDetector
from rules.detectors.group import GroupDetector
from rules.detectors.level import RateOfChangeDetector, ScheduleDetector, ThresholdDetector
from rules.detectors.nodata import NoDataDetector
from rules.detectors.ratio import RatioDetector
from rules.model import (
    BaselineRule,
    CounterRule,
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
)

__all__ = ["Detector", "Site", "make_detector"]


def make_detector(rule: Rule, site: Site) -> Detector:
    if isinstance(rule, ThresholdRule):
        return ThresholdDetector(rule, site)
    if isinstance(rule, RateOfChangeRule):
        return RateOfChangeDetector(rule, site)
    if isinstance(rule, FlatlineRule):
        return FlatlineDetector(rule, site)
    if isinstance(rule, CounterRule):
        return CounterDetector(rule, site)
    if isinstance(rule, NoDataRule):
        return NoDataDetector(rule, site)
    if isinstance(rule, ScheduleRule):
        return ScheduleDetector(rule, site)
    if isinstance(rule, BaselineRule):
        return BaselineDetector(rule, site)
    if isinstance(rule, RatioRule):
        return RatioDetector(rule, site)
    if isinstance(rule, FloorRule):
        return FloorDetector(rule, site)
    if isinstance(rule, GroupRule):
        return GroupDetector(rule, site)
    if isinstance(rule, EventRule):
        return EventDetector(rule, site)
    raise TypeError(f"not a rule: {rule!r}")
