"""The rules engine's view of a site: its rule set and its SiteContext, from the site file.

Shared by the telemetry worker (live) and `scgw rules replay`, so both evaluate the same
rules against the same calendars, time zone and device registry: the reason a replay of a
recording gives the transitions the live gateway gave.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from gateway.telemetry.worker_config import WorkerConfig
from rules.loader import default_rules, load_rule_files, parse_calendar
from rules.model import DEFAULT_CALENDAR, Calendar, DeviceInfo, Rule, SiteContext


def load_rule_set(files: Sequence[str | Path]) -> list[Rule]:
    """The rules of `files` (RuleFileError naming every problem), or the bundled defaults
    when none are given (CONTRACT.md section 4: `rules.files: []`)."""
    if not files:
        return default_rules()
    texts = [(str(path), Path(path).read_text(encoding="utf-8")) for path in files]
    return load_rule_files(texts)


def rules_digest(rules: Sequence[Rule]) -> str:
    """Identifies a rule set (logged when a restart finds different rules)."""
    return hashlib.sha256(repr(list(rules)).encode()).hexdigest()[:32]


def site_context(config: WorkerConfig | None) -> SiteContext:
    """Time zone, calendars and devices of the site; the defaults without a site file."""
    if config is None:
        return SiteContext()
    default: Calendar = DEFAULT_CALENDAR
    if config.site_calendar is not None:
        default = parse_calendar(config.site_calendar, "site.calendar")
    calendars = {building: parse_calendar(calendar, f"buildings.{building}.calendar")
                 for building, calendar in config.building_calendars.items()}
    devices = {d.device_id: DeviceInfo(d.device_id, d.kind, d.building) for d in config.devices}
    return SiteContext(timezone=config.timezone, default_calendar=default,
                       calendars=calendars, devices=devices)
