"""Rule files: every mistake is named with its file, line, rule and key; good files of every
kind become the right dataclasses; the bundled defaults load; calendars parse."""

from __future__ import annotations

import dataclasses
import textwrap
from datetime import date

import pytest

from rules import loader
from rules.loader import (
    CHECKS,
    KINDS,
    REQUIRED,
    CalendarError,
    RuleFileError,
    default_rules,
    default_rules_text,
    load_rule_files,
    load_rules,
    parse_calendar,
    parse_duration,
    parse_hours,
)
from rules.model import (
    DEFAULT_CALENDAR,
    RULE_KINDS,
    SEVERITIES,
    BaselineRule,
    Calendar,
    CounterRule,
    EventRule,
    FlatlineRule,
    FloorRule,
    GroupRule,
    Match,
    NoDataRule,
    RateOfChangeRule,
    RatioRule,
    ScheduleRule,
    ThresholdRule,
)


def problems_of(text: str, source: str = "r.yaml") -> list[str]:
    with pytest.raises(RuleFileError) as caught:
        load_rules(textwrap.dedent(text), source)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def marked_line(text: str) -> int:
    """The line carrying the `#<` marker: where the problem must be reported."""
    lines = textwrap.dedent(text).splitlines()
    marked = [n for n, line in enumerate(lines, start=1) if "#<" in line]
    assert len(marked) == 1, "mark exactly one line of a case with #<"
    return marked[0]


# (case, file with the expected line marked `#<`, who, key path, fragment of the message)
BAD_FILES = [
    ("unknown key, with a suggestion and the kind's keys", """
        rules:
          - id: hvac-overpower
            kind: threshold
            metric: power_w
            above: 5000
            abvoe: 6000   #<
        """, "rule 'hvac-overpower'", "abvoe",
     "unknown key for a threshold rule (did you mean 'above'?); allowed: id, kind, match, "
     "severity, for, labels, message, metric, above, below, clear"),
    ("a duration written with its field name", """
        rules:
          - id: stuck
            kind: flatline
            metric: power_w
            window_s: 3600   #<
        """, "rule 'stuck'", "window_s", "durations drop the _s: write `window: 5m`"),
    ("a key of another kind", """
        rules:
          - id: hot
            kind: threshold
            metric: power_w
            above: 1
            window: 5m   #<
        """, "rule 'hot'", "window", "window is a key of flatline, ratio, floor, group rules"),
    ("text where a number belongs", """
        rules:
          - id: hot
            kind: threshold
            metric: power_w
            above: lots   #<
        """, "rule 'hot'", "above", "expected a number; found 'lots' (text)"),
    ("a YAML boolean where a number belongs", """
        rules:
          - id: hot
            kind: threshold
            metric: power_w
            above: yes   #<
        """, "rule 'hot'", "above", "expected a number; found true (a boolean"),
    ("threshold without metric", """
        rules:
          - id: hot   #<
            kind: threshold
            above: 5
        """, "rule 'hot'", "metric", "required key is missing for a threshold rule"),
    ("threshold with neither above nor below", """
        rules:
          - id: hot   #<
            kind: threshold
            metric: power_w
        """, "rule 'hot'", "above/below", "needs `above` or `below` (exactly one); found neither"),
    ("threshold with both above and below", """
        rules:
          - id: band
            kind: threshold
            metric: power_w
            above: 10
            below: 5   #<
        """, "rule 'band'", "below", "exactly one of `above` and `below`; found both"),
    ("above with clear over it", """
        rules:
          - id: hvac-overpower
            kind: threshold
            metric: power_w
            above: 5000
            clear: 5500   #<
        """, "rule 'hvac-overpower'", "clear", "clear must be at most 5000; found 5500"),
    ("below with clear under it", """
        rules:
          - id: cold
            kind: threshold
            metric: temperature_c
            below: 10
            clear: 8   #<
        """, "rule 'cold'", "clear", "clear must be at least 10; found 8"),
    ("rate_of_change without max_per_s", """
        rules:
          - id: jump   #<
            kind: rate_of_change
            metric: temperature_c
        """, "rule 'jump'", "max_per_s", "required key is missing for a rate_of_change rule"),
    ("rate_of_change that cannot resolve", """
        rules:
          - id: jump
            kind: rate_of_change
            metric: temperature_c
            max_per_s: 0.5
            clear_per_s: 1   #<
        """, "rule 'jump'", "clear_per_s", "expected at most max_per_s (0.5)"),
    ("an unknown direction", """
        rules:
          - id: jump
            kind: rate_of_change
            metric: temperature_c
            max_per_s: 0.5
            direction: sideways   #<
        """, "rule 'jump'", "direction", "expected one of up, down, both; found 'sideways'"),
    ("zero rate", """
        rules:
          - id: jump
            kind: rate_of_change
            metric: temperature_c
            max_per_s: 0   #<
        """, "rule 'jump'", "max_per_s", "expected more than 0; found 0"),
    ("event without events", """
        rules:
          - id: forced   #<
            kind: event
        """, "rule 'forced'", "events", "required key is missing for a event rule"),
    ("event with an empty list", """
        rules:
          - id: forced
            kind: event
            events: []   #<
        """, "rule 'forced'", "events", "expected at least one event type; found an empty list"),
    ("event with for", """
        rules:
          - id: forced
            kind: event
            events: [door_forced]
            for: 5m   #<
        """, "rule 'forced'", "for", "`for` does not apply"),
    ("event firing and clearing on one type", """
        rules:
          - id: held
            kind: event
            events: [door_held_open]
            clear_events: [door_held_open, door_closed]   #<
        """, "rule 'held'", "clear_events", "door_held_open both fire and clear the alert"),
    ("a negative duration", """
        rules:
          - id: hot
            kind: threshold
            metric: power_w
            above: 1
            for: -5m   #<
        """, "rule 'hot'", "for", "expected a duration of 0 or more; found '-5m'"),
    ("a negative number of seconds", """
        rules:
          - id: silent
            kind: no_data
            timeout: -1   #<
        """, "rule 'silent'", "timeout", "expected a duration of 0 or more; found -1"),
    ("a zero window", """
        rules:
          - id: stuck
            kind: flatline
            metric: power_w
            window: 0s   #<
        """, "rule 'stuck'", "window", "expected more than 0 s; found 0"),
    ("a duration in words", """
        rules:
          - id: silent
            kind: no_data
            timeout: 5 minutes   #<
        """, "rule 'silent'", "timeout",
     "expected a duration such as 30s, 5m, 2h, 7d or 1h30m, or a number of seconds; "
     "found '5 minutes'"),
    ("k of zero", """
        rules:
          - id: unusual
            kind: baseline
            metric: power_w
            k: 0   #<
        """, "rule 'unusual'", "k", "expected more than 0; found 0"),
    ("negative tolerance_pct", """
        rules:
          - id: balance
            kind: group
            metric: power_w
            match: {kinds: [meter]}
            main: {devices: ["*-main*"]}
            tolerance_pct: -1   #<
        """, "rule 'balance'", "tolerance_pct", "expected 0 or more; found -1"),
    ("an unknown kind, listing the kinds", """
        rules:
          - id: hot
            kind: thresold   #<
        """, "rule 'hot'", "kind",
     "unknown kind; expected one of threshold, rate_of_change, flatline, counter, no_data, "
     "schedule, baseline, ratio, floor, group, event; found 'thresold' (text) (did you mean "
     "'threshold'?)"),
    ("no kind", """
        rules:
          - id: hot   #<
            metric: power_w
        """, "rule 'hot'", "kind", "required key is missing (one of threshold, rate_of_change"),
    ("an unknown severity", """
        rules:
          - id: silent
            kind: no_data
            severity: urgent   #<
        """, "rule 'silent'", "severity",
     "expected one of info, warning, critical; found 'urgent'"),
    ("an invalid id", """
        rules:
          - id: Hvac Overpower   #<
            kind: no_data
        """, "rule 'Hvac Overpower'", "id", "expected an id of [a-z0-9][a-z0-9_.-]{0,63}"),
    ("a missing id: the rule is named by its index", """
        rules:
          - {id: first, kind: no_data}
          - kind: no_data   #<
        """, "rules[1]", "id", "required key is missing"),
    ("a numeric id: the rule is named by its index", """
        rules:
          - id: 42   #<
            kind: no_data
        """, "rules[0]", "id", "found 42 (a number)"),
    ("an upper-case glob", """
        rules:
          - id: silent
            kind: no_data
            match:
              devices: [hvac-*, HVAC-*]   #<
        """, "rule 'silent'", "match.devices[1]", "expected a device id or a glob of one"),
    ("an unbalanced glob", """
        rules:
          - id: silent
            kind: no_data
            match: {devices: ["hvac-[b1"]}   #<
        """, "rule 'silent'", "match.devices[0]", "unbalanced [ ] in glob 'hvac-[b1'"),
    ("an unknown device kind", """
        rules:
          - id: silent
            kind: no_data
            match:
              kinds: [hvca]   #<
        """, "rule 'silent'", "match.kinds[0]", "found 'hvca' (text) (did you mean 'hvac'?)"),
    ("an empty device list", """
        rules:
          - id: silent
            kind: no_data
            match:
              devices: []   #<
        """, "rule 'silent'", "match.devices", "expected at least one of device id globs"),
    ("an unknown match key", """
        rules:
          - id: silent
            kind: no_data
            match:
              device: [hvac-1]   #<
        """, "rule 'silent'", "match.device",
     "unknown key (allowed: kinds, devices, buildings) (did you mean 'devices'?)"),
    ("a message naming a key the engine does not offer", """
        rules:
          - id: hot
            kind: threshold
            metric: power_w
            above: 5000
            message: "{device_id} draws {valeu:.0f} W"   #<
        """, "rule 'hot'", "message", "{valeu:.0f}: unknown key (did you mean 'value'?)"),
    ("a message that does not parse", """
        rules:
          - id: hot
            kind: threshold
            metric: power_w
            above: 5000
            message: "{device_id draws"   #<
        """, "rule 'hot'", "message", "not a valid template"),
    ("a positional message field", """
        rules:
          - id: hot
            kind: threshold
            metric: power_w
            above: 5000
            message: "{} is hot"   #<
        """, "rule 'hot'", "message", "positional fields are not offered"),
    ("a number format on a no-data alert's value, which is null", """
        rules:
          - id: silent
            kind: no_data
            message: "{device_id} {value:.0f}"   #<
        """, "rule 'silent'", "message", "null in this case: value"),
    ("attribute access in a message", """
        rules:
          - id: silent
            kind: no_data
            message: "{device_id.upper}"   #<
        """, "rule 'silent'", "message", "{device_id.upper}: attribute and index access are "
     "not offered"),
    ("a field the engine does not offer to messages", """
        rules:
          - id: silent
            kind: no_data
            message: "{match}"   #<
        """, "rule 'silent'", "message", "{match}: unknown key"),
    ("a number format on a counter's value, which is null when it resolves", """
        rules:
          - id: counter
            kind: counter
            message: "{anomaly}: {value:.0f} Wh"   #<
        """, "rule 'counter'", "message", "null in this case: value"),
    ("a number format on a field left out", """
        rules:
          - id: hot
            kind: threshold
            metric: power_w
            above: 5
            message: "{below:.0f}"   #<
        """, "rule 'hot'", "message", "below"),
    ("a wrong format for the type", """
        rules:
          - id: hot
            kind: threshold
            metric: power_w
            above: 5
            message: "{value:d}"   #<
        """, "rule 'hot'", "message", "Unknown format code 'd'"),
    ("a metric name with capitals", """
        rules:
          - id: hot
            kind: threshold
            metric: Power-W   #<
            above: 5
        """, "rule 'hot'", "metric", "expected a metric name ([a-z][a-z0-9_]{0,63}"),
    ("a duplicate id, naming both lines", """
        rules:
          - id: hot
            kind: no_data
          - id: cold
            kind: no_data
          - id: hot   #<
            kind: no_data
        """, "rule 'hot'", "id", "duplicate id 'hot': also used by the rule at line 3"),
    ("a key given twice", """
        rules:
          - id: hot
            kind: threshold
            metric: power_w
            above: 5
            above: 6   #<
        """, "rule 'hot'", "above", "key given twice (first at line 6)"),
    ("a label that is a number", """
        rules:
          - id: silent
            kind: no_data
            labels: {floor: 3}   #<
        """, "rule 'silent'", "labels.floor", "expected text (quote it: '3')"),
    ("a label hiding a message key", """
        rules:
          - id: silent
            kind: no_data
            labels:
              value: high   #<
        """, "rule 'silent'", "labels.value", "may not be named like the message key 'value'"),
    ("alpha without ewma", """
        rules:
          - id: unusual
            kind: baseline
            metric: power_w
            alpha: 0.2   #<
        """, "rule 'unusual'", "alpha", "alpha is the weight of method ewma"),
    ("history_weeks with ewma", """
        rules:
          - id: unusual
            kind: baseline
            metric: power_w
            method: ewma
            history_weeks: 3   #<
        """, "rule 'unusual'", "history_weeks", "history_weeks is for method median_mad"),
    ("a bucket that does not divide an hour", """
        rules:
          - id: unusual
            kind: baseline
            metric: power_w
            bucket: 7m   #<
        """, "rule 'unusual'", "bucket", "divides an hour evenly"),
    ("a fractional number of weeks", """
        rules:
          - id: unusual
            kind: baseline
            metric: power_w
            history_weeks: 2.5   #<
        """, "rule 'unusual'", "history_weeks", "expected a whole number; found 2.5"),
    ("a ratio that can neither rise nor fall", """
        rules:
          - id: clog
            kind: ratio
            numerator: filter_dp_pa
            denominator: fan_speed_pct
            rise_pct: null   #<
        """, "rule 'clog'", "rise_pct", "needs rise_pct or fall_pct"),
    ("a ratio that cannot resolve", """
        rules:
          - id: clog
            kind: ratio
            numerator: filter_dp_pa
            denominator: fan_speed_pct
            rise_pct: 50
            clear_pct: 60   #<
        """, "rule 'clog'", "clear_pct", "expected at most rise_pct (50)"),
    ("a ratio of a metric to itself", """
        rules:
          - id: clog
            kind: ratio
            numerator: power_w
            denominator: power_w   #<
        """, "rule 'clog'", "denominator", "never moves"),
    ("a fall of 100 percent", """
        rules:
          - id: clog
            kind: ratio
            numerator: filter_dp_pa
            denominator: fan_speed_pct
            fall_pct: 100   #<
        """, "rule 'clog'", "fall_pct", "expected less than 100; found 100"),
    ("a counter whose most power is none", """
        rules:
          - id: counter
            kind: counter
            max_power: 0   #<
        """, "rule 'counter'", "max_power", "expected more than 0; found 0"),
    ("a floor that cannot resolve", """
        rules:
          - id: wear
            kind: floor
            metric: power_w
            rise_pct: 8
            clear_pct: 9   #<
        """, "rule 'wear'", "clear_pct", "expected at most rise_pct (8)"),
    ("a floor whose operating point is the watched metric", """
        rules:
          - id: wear
            kind: floor
            metric: power_w
            per: power_w   #<
        """, "rule 'wear'", "per", "the metric that sets the operating point"),
    ("a floor without its metric", """
        rules:
          - id: wear   #<
            kind: floor
            per: fan_speed_pct
        """, "rule 'wear'", "metric", "required key is missing"),
    ("a floor swing below 1", """
        rules:
          - id: wear
            kind: floor
            metric: power_w
            min_swing: 0.5   #<
        """, "rule 'wear'", "min_swing", "expected 1 or more; found 0.5"),
    ("a floor step of 0", """
        rules:
          - id: wear
            kind: floor
            metric: power_w
            per: fan_speed_pct
            per_step: 0   #<
        """, "rule 'wear'", "per_step", "expected more than 0; found 0"),
    ("a floor per a metric name that is not one", """
        rules:
          - id: wear
            kind: floor
            metric: power_w
            per: Fan-Speed   #<
        """, "rule 'wear'", "per", "Fan-Speed"),
    ("a group whose main selects every device", """
        rules:
          - id: balance
            kind: group
            metric: power_w
            match: {kinds: [meter], devices: ["*-sub*"]}
            main: {}   #<
        """, "rule 'balance'", "main", "expected at least one of kinds, devices, buildings"),
    ("a group whose main is its own sub-meters", """
        rules:
          - id: balance
            kind: group
            metric: power_w
            match: {kinds: [meter]}
            main: {kinds: [meter]}   #<
        """, "rule 'balance'", "main", "must not be one of its own sub-meters"),
    ("a group without main", """
        rules:
          - id: balance   #<
            kind: group
            metric: power_w
            match: {kinds: [meter]}
        """, "rule 'balance'", "main", "required key is missing for a group rule"),
    ("a jump factor under 1", """
        rules:
          - id: counter
            kind: counter
            jump_factor: 0.5   #<
        """, "rule 'counter'", "jump_factor", "expected 1 or more; found 0.5"),
    ("a counter explained by itself", """
        rules:
          - id: counter
            kind: counter
            power_metric: energy_wh   #<
        """, "rule 'counter'", "power_metric", "not the counter itself (energy_wh)"),
    ("a counter with for", """
        rules:
          - id: counter
            kind: counter
            for: 10m   #<
        """, "rule 'counter'", "for", "a counter anomaly happens between two readings"),
    ("a schedule rule without above", """
        rules:
          - id: night   #<
            kind: schedule
            metric: power_w
        """, "rule 'night'", "above", "required key is missing for a schedule rule"),
    ("a schedule rule that cannot resolve", """
        rules:
          - id: night
            kind: schedule
            metric: power_w
            above: 100
            clear: 200   #<
        """, "rule 'night'", "clear", "clear must be at most 100; found 200"),
    ("a rule that is not a mapping", """
        rules:
          - {id: ok, kind: no_data}
          - just text   #<
        """, None, "rules[1]",
     "expected a mapping of rule keys (id, kind, ...); found 'just text'"),
    ("not YAML", """
        rules:
          - {id: ok, kind: no_data
          - {id: other, kind: no_data}   #<
        """, None, None, "not valid YAML"),
    ("no rules list", """
        rule:   #<
          - {id: ok, kind: no_data}
        """, None, "rule", "unknown top-level key (allowed: rules, and x-... keys for YAML "
     "anchors) (did you mean 'rules'?)"),
    ("rules that are not a list", """
        rules:   #<
          hot: {kind: no_data}
        """, None, "rules", "expected a list of rules; found a mapping"),
    ("rules with nothing", """
        rules:   #<
        """, None, "rules", "found nothing (null) (`rules: []` for no rules)"),
    ("a list at the top", """
        - {id: ok, kind: no_data}   #<
        """, None, None, "expected a mapping with a `rules:` list; found a list"),
]


@pytest.mark.parametrize(("text", "who", "key", "fragment"),
                         [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES])
def test_each_mistake_is_named_with_line_rule_and_key(
    text: str, who: str | None, key: str | None, fragment: str
) -> None:
    line = marked_line(text)
    prefix = f"r.yaml:{line}: " + "".join(f"{part}: " for part in (who, key) if part)
    problems = problems_of(text)
    assert any(p.startswith(prefix) and fragment in p for p in problems), (
        f"no problem starting {prefix!r} containing {fragment!r} in:\n" + "\n".join(problems))


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_an_empty_file_is_refused(text: str) -> None:
    assert problems_of(text) == [
        "r.yaml:1: the file is empty; expected a `rules:` list (`rules: []` for none)"]


def test_a_file_with_no_rules_key_says_so() -> None:
    problems = problems_of("x-defaults: {a: 1}\n")
    assert problems == ["r.yaml:1: no `rules:` list (top-level keys found: x-defaults)"]


def test_every_problem_is_reported_at_once_in_line_order() -> None:
    problems = problems_of("""\
        rules:
          - id: a
            kind: threshold
            metric: power_w
            above: lots
          - id: b
            kind: nonsense
          - id: c
            kind: no_data
            timeout: soon
            severity: loud
        """)
    assert [p.split(": ", 3)[:3] for p in problems] == [
        ["r.yaml:5", "rule 'a'", "above"],
        ["r.yaml:7", "rule 'b'", "kind"],
        ["r.yaml:10", "rule 'c'", "timeout"],
        ["r.yaml:11", "rule 'c'", "severity"],
    ]


def test_an_empty_rules_list_means_no_rules() -> None:
    assert load_rules("rules: []\n") == []


# ---- good files -------------------------------------------------------------------------------

GOOD = """\
x-hvac: &hvac {kinds: [hvac], buildings: [b1]}
rules:
  - id: hvac-overpower
    kind: threshold
    match: {kinds: [hvac], devices: ["hvac-b1-*", "hvac-b2-?"], buildings: [b1]}
    metric: power_w
    above: 5000
    clear: 4500
    for: 5m
    severity: critical
    labels: {team: facilities}
    message: "{device_id} draws {value:.0f} W (over {above} W) for {team}"
  - id: too-cold
    kind: threshold
    match: {kinds: hvac}
    metric: temperature_c
    below: 16
    for: 1h30m
  - id: temp-jump
    kind: rate_of_change
    metric: temperature_c
    max_per_s: 0.5
    clear_per_s: 0.2
    direction: up
    min_interval: 2s
  - id: stuck
    kind: flatline
    match: *hvac
    metric: power_w
    window: 2h
    tolerance: 0.5
    ignore_below: 300
  - id: counter
    kind: counter
    counter_max: 4.3e9
    rollover_margin: 0.1
    regression_tolerance: 1
    jump_factor: 3
    jump_margin: 250
    clear_after: 30m
  - id: silent
    kind: no_data
    metric: power_w
    timeout: 600
    severity: info
    message: "{device_id} in {building} silent"
  - id: night
    kind: schedule
    match: {<<: *hvac, devices: ["hvac-*"]}
    metric: power_w
    above: 100
    clear: 60
    for: 1h
  - id: unusual
    kind: baseline
    metric: power_w
    bucket: 15m
    method: ewma
    alpha: 0.2
    k: 4.5
    min_abs_deviation: 5000
    direction: up
    warmup: 7d
  - id: clog
    kind: ratio
    numerator: filter_dp_pa
    denominator: fan_speed_pct
    exponent: 2
    min_denominator: 40
    learn: 1d
    window: 1h
    rise_pct: 50
    fall_pct: 40
    clear_pct: 30
  - id: balance
    kind: group
    match: {kinds: [meter], devices: ["*-sub*"]}
    main: {kinds: [meter], devices: ["*-main*"]}
    metric: power_w
    window: 15m
    tolerance_pct: 10
    min_abs: 500
    for: 30m
  - id: forced
    kind: event
    match: {kinds: [gate]}
    events: [door_forced, tamper]
    clear_events: door_closed
    clear_after: 15m
    severity: critical
    message: "{device_id}: {rule_id}"
  - id: wear
    kind: floor
    match: {kinds: [hvac]}
    metric: power_w
    per: fan_speed_pct
    per_step: 10
    min_per: 1
    window: 2h
    min_swing: 3
    learn: 2d
    rise_pct: 8
    clear_pct: 5
    for: 2h
    message: "{device_id}: {pct:.0f} % over {reference:.0f}"
"""


def test_good_rules_of_every_kind_become_their_dataclasses() -> None:
    rules = {rule.id: rule for rule in load_rules(GOOD, "site-rules.yaml")}
    assert {rule.kind for rule in rules.values()} == set(RULE_KINDS)
    hvac_b1 = Match(kinds=frozenset({"hvac"}), buildings=frozenset({"b1"}))
    assert rules["hvac-overpower"] == ThresholdRule(
        id="hvac-overpower", source="site-rules.yaml:3",
        match=Match(kinds=frozenset({"hvac"}), device_ids=("hvac-b1-*", "hvac-b2-?"),
                    buildings=frozenset({"b1"})),
        metric="power_w", above=5000.0, clear=4500.0, for_s=300.0, severity="critical",
        labels={"team": "facilities"},
        message="{device_id} draws {value:.0f} W (over {above} W) for {team}")
    assert rules["too-cold"] == ThresholdRule(
        id="too-cold", source="site-rules.yaml:13", match=Match(kinds=frozenset({"hvac"})),
        metric="temperature_c", below=16.0, for_s=5400.0)
    assert rules["temp-jump"] == RateOfChangeRule(
        id="temp-jump", source="site-rules.yaml:19", match=Match(), metric="temperature_c",
        max_per_s=0.5, clear_per_s=0.2, direction="up", min_interval_s=2.0)
    assert rules["stuck"] == FlatlineRule(
        id="stuck", source="site-rules.yaml:26", match=hvac_b1, metric="power_w",
        window_s=7200.0, tolerance=0.5, ignore_below=300.0)
    assert rules["counter"] == CounterRule(
        id="counter", source="site-rules.yaml:33", match=Match(), counter_max=4.3e9,
        rollover_margin=0.1, regression_tolerance=1.0, jump_factor=3.0, jump_margin=250.0,
        clear_after_s=1800.0)
    assert rules["silent"] == NoDataRule(
        id="silent", source="site-rules.yaml:41", match=Match(), metric="power_w",
        timeout_s=600.0, severity="info", message="{device_id} in {building} silent")
    assert rules["night"] == ScheduleRule(
        id="night", source="site-rules.yaml:47",
        match=Match(kinds=frozenset({"hvac"}), device_ids=("hvac-*",),
                    buildings=frozenset({"b1"})),
        metric="power_w", above=100.0, clear=60.0, for_s=3600.0)
    assert rules["unusual"] == BaselineRule(
        id="unusual", source="site-rules.yaml:54", match=Match(), metric="power_w",
        bucket_s=900.0, method="ewma", alpha=0.2, k=4.5, min_abs_deviation=5000.0,
        direction="up", warmup_s=604800.0)
    assert rules["clog"] == RatioRule(
        id="clog", source="site-rules.yaml:64", match=Match(), numerator="filter_dp_pa",
        denominator="fan_speed_pct", exponent=2.0, min_denominator=40.0, learn_s=86400.0,
        window_s=3600.0, rise_pct=50.0, fall_pct=40.0, clear_pct=30.0)
    assert rules["balance"] == GroupRule(
        id="balance", source="site-rules.yaml:75",
        match=Match(kinds=frozenset({"meter"}), device_ids=("*-sub*",)),
        main=Match(kinds=frozenset({"meter"}), device_ids=("*-main*",)),
        metric="power_w", window_s=900.0, tolerance_pct=10.0, min_abs=500.0, for_s=1800.0)
    assert rules["forced"] == EventRule(
        id="forced", source="site-rules.yaml:84", match=Match(kinds=frozenset({"gate"})),
        events=frozenset({"door_forced", "tamper"}), clear_events=frozenset({"door_closed"}),
        clear_after_s=900.0, severity="critical", message="{device_id}: {rule_id}")
    assert rules["wear"] == FloorRule(
        id="wear", source="site-rules.yaml:92", match=Match(kinds=frozenset({"hvac"})),
        metric="power_w", per="fan_speed_pct", per_step=10.0, min_per=1.0, window_s=7200.0,
        min_swing=3.0, learn_s=172800.0, rise_pct=8.0, clear_pct=5.0, for_s=7200.0,
        message="{device_id}: {pct:.0f} % over {reference:.0f}")


def test_templates_may_use_what_the_engine_offers() -> None:
    rules = load_rules("""\
rules:
  - id: c
    kind: counter
    labels: {team: facilities}
    message: "{state}: {anomaly} of {value} Wh after {previous:.0f} on {device_id} ({team})"
  - id: g
    kind: group
    metric: power_w
    match: {kinds: [meter]}
    main: {devices: ["*-main*"]}
    message: "{building}: main {main:.0f} W, sub-meters {subs:.0f} W ({difference:+.0f})"
  - id: e
    kind: event
    events: [door_forced, tamper]
    message: "{event} at {device_id} ({events}) in {building:>3}"
""")
    assert [r.id for r in rules] == ["c", "g", "e"]


def test_defaults_of_the_dataclasses_apply_to_keys_left_out() -> None:
    [rule] = load_rules("rules:\n  - {id: silent, kind: no_data}\n")
    assert rule == NoDataRule(id="silent", match=Match(), source="<rules>:2")
    [counter] = load_rules("rules:\n  - {id: c, kind: counter}\n")
    assert isinstance(counter, CounterRule)
    assert (counter.metric, counter.power_metric, counter.for_s) == ("energy_wh", "power_w", 0)


def test_an_anchor_key_is_reported_where_it_was_written() -> None:
    problems = problems_of("""\
        x-base: &base
          severity: loud
        rules:
          - id: silent
            kind: no_data
            <<: *base
        """)
    assert problems == ["r.yaml:2: rule 'silent': severity: expected one of info, warning, "
                        "critical; found 'loud' (text)"]


def test_every_dataclass_field_is_a_key_and_the_tables_name_real_fields() -> None:
    """A field another engineer adds to rules/model.py is a key without a loader edit; the
    loader's own tables must not name a field that is gone."""
    all_fields = set()
    for kind, spec in KINDS.items():
        fields = {f.name for f in dataclasses.fields(spec.cls)}
        all_fields |= fields
        assert {name for name, _ in spec.keys.values()} == fields - {"id", "kind", "source"}
        assert REQUIRED[kind] <= fields
    assert set(CHECKS) <= all_fields
    assert loader.yaml_key("for_s") == "for"
    assert loader.yaml_key("max_per_s") == "max_per_s"
    assert loader.yaml_key("clear_after_s") == "clear_after"


# ---- several files ----------------------------------------------------------------------------


def test_files_load_in_order_and_ids_must_be_unique_across_them() -> None:
    a = "rules:\n  - {id: silent, kind: no_data}\n  - {id: hot, kind: no_data}\n"
    b = "rules:\n  - {id: cold, kind: no_data}\n"
    assert [r.id for r in load_rule_files([("a.yaml", a), ("b.yaml", b)])] == [
        "silent", "hot", "cold"]
    with pytest.raises(RuleFileError) as caught:
        load_rule_files([("a.yaml", a), ("b.yaml", "rules:\n\n  - {id: hot, kind: no_data}\n")])
    assert caught.value.problems == [
        "b.yaml:3: rule 'hot': id: duplicate id, also defined at a.yaml:3"]


def test_problems_of_every_file_are_reported_together() -> None:
    with pytest.raises(RuleFileError) as caught:
        load_rule_files([("a.yaml", "rules: [{id: x, kind: nope}]\n"), ("b.yaml", "")])
    assert [p.split(":")[0] for p in caught.value.problems] == ["a.yaml", "b.yaml"]


# ---- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [
    ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("7d", 604800.0), ("1h30m", 5400.0),
    ("1d 2h 3m 4s", 93784.0), ("1.5h", 5400.0), ("0s", 0.0), (90, 90.0), (2.5, 2.5),
    ("90", 90.0), (0, 0.0),
])
def test_durations_parse(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(("value", "fragment"), [
    ("5 minutes", "expected a duration such as"), ("30m1h", "expected a duration such as"),
    ("5ms", "expected a duration such as"), ("", "expected a duration such as"),
    ("h", "expected a duration such as"), (True, "a boolean"), (None, "null"),
    ([5], "found a list"), (-1, "of 0 or more"), ("-2h", "of 0 or more"),
    (float("inf"), "expected a duration such as"), (float("nan"), "expected a duration"),
])
def test_bad_durations_are_refused(value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match="expected a duration") as caught:
        parse_duration(value)
    assert fragment in str(caught.value)


# ---- the bundled defaults ------------------------------------------------------------------------


def test_the_default_rules_load_and_cover_every_kind() -> None:
    rules = default_rules()
    assert {rule.kind for rule in rules} == set(RULE_KINDS)
    assert len({rule.id for rule in rules}) == len(rules)
    assert all(rule.source.startswith("rules/default_rules.yaml:") for rule in rules)
    assert all(rule.severity in SEVERITIES for rule in rules)
    assert load_rules(default_rules_text()) == [
        dataclasses.replace(r, source=r.source.replace("rules/default_rules.yaml", "<rules>"))
        for r in rules]


def test_the_default_rules_watch_the_standard_device_kinds() -> None:
    by_id = {rule.id: rule for rule in default_rules()}
    watched = set().union(*(r.match.kinds or set() for r in by_id.values()))
    assert watched == {"hvac", "fresh_air", "air_purifier", "meter"}
    silent = by_id["telemetry-silent"]
    assert isinstance(silent, NoDataRule) and silent.timeout_s == 600
    assert {e for r in by_id.values() if isinstance(r, EventRule) for e in r.events} == {
        "door_forced", "door_held_open", "tamper"}
    assert {r.severity for r in by_id.values() if isinstance(r, EventRule)
            and r.events & {"door_forced", "tamper"}} == {"critical"}
    clog = by_id["filter-clogging"]
    assert isinstance(clog, RatioRule)
    assert (clog.numerator, clog.denominator, clog.exponent, clog.rise_pct) == (
        "filter_dp_pa", "fan_speed_pct", 2.0, 50.0)
    balance = by_id["submeter-balance"]
    assert isinstance(balance, GroupRule) and balance.main.device_ids == ("*-main*",)
    unusual = by_id["meter-power-unusual"]
    assert isinstance(unusual, BaselineRule)
    assert (unusual.warmup_s, unusual.for_s, unusual.k) == (21 * 86400, 1800, 5)
    counters = {r.id: r for r in by_id.values() if isinstance(r, CounterRule)}
    assert {k for r in counters.values() for k in r.match.kinds or ()} == {
        "meter", "hvac", "fresh_air", "air_purifier"}
    hvac_counter = counters["hvac-energy-counter"]  # merged from the meter rule's anchor
    assert (hvac_counter.jump_margin, hvac_counter.jump_factor, hvac_counter.counter_max,
            hvac_counter.source) == (3500, 3, 2**32, "rules/default_rules.yaml:53")


def test_the_default_rules_are_documented() -> None:
    from pathlib import Path
    docs = (Path(__file__).parent.parent / "docs" / "rules.md").read_text(encoding="utf-8")
    for rule in default_rules():
        assert f"`{rule.id}`" in docs, f"{rule.id} is not in docs/rules.md"


# ---- calendars ----------------------------------------------------------------------------------


def test_a_calendar_parses() -> None:
    import yaml
    data = yaml.safe_load("""
        hours: {mon-fri: "07:00-20:00", sat: "09:00-12:00, 13:00-17:00", sun: closed}
        holidays: [2026-10-01, "2026-10-02"]
        holiday_hours: "10:00-16:00"
    """)
    weekday = ((420, 1200),)
    assert parse_calendar(data, "site.calendar") == Calendar(
        weekly=(weekday, weekday, weekday, weekday, weekday, ((540, 720), (780, 1020)), ()),
        holidays=frozenset({"2026-10-01", "2026-10-02"}), holiday_hours=((600, 960),))


def test_days_not_named_are_closed_and_ranges_wrap() -> None:
    calendar = parse_calendar({"hours": {"fri-mon": "24h", "Wednesday": ["08:00-12:00"]}}, "c")
    assert calendar.weekly == (((0, 1440),), (), ((480, 720),), (), ((0, 1440),),
                               ((0, 1440),), ((0, 1440),))
    assert calendar.holidays == frozenset() and calendar.holiday_hours == ()
    every_day = parse_calendar({"hours": {"mon-sun": "06:00-23:00"}}, "c")
    assert every_day == DEFAULT_CALENDAR


@pytest.mark.parametrize(("data", "message"), [
    (None, "site.calendar: expected a mapping with hours, holidays, holiday_hours; "
           "found nothing (null)"),
    ({}, "site.calendar.hours: required key is missing"),
    ({"hours": {}}, "site.calendar.hours: expected a mapping of days to hours"),
    ({"hours": {"mon-fri": "20:00-07:00"}},
     "site.calendar.hours.mon-fri: '20:00-07:00' ends before it starts"),
    ({"hours": {"mon": "07:00-12:00, 11:00-13:00"}}, "site.calendar.hours.mon: ranges overlap"),
    ({"hours": {"mon": "7-20"}}, "site.calendar.hours.mon: expected a time HH:MM; found '7'"),
    ({"hours": {"mon": "07:00-24:30"}}, "expected a time from 00:00 to 24:00"),
    ({"hours": {"sun": False}}, "site.calendar.hours.sun: expected \"HH:MM-HH:MM\""),
    ({"hours": {"mon-fri": "24h", "wed": "closed"}},
     "site.calendar.hours.wed: wed is already given by 'mon-fri'"),
    ({"hours": {"weekdays": "24h"}}, "site.calendar.hours.weekdays: expected day names"),
    ({"hours": {"mon": "24h"}, "holidays": ["2026-02-30"]},
     "site.calendar.holidays[0]: expected a date YYYY-MM-DD; found '2026-02-30'"),
    ({"hours": {"mon": "24h"}, "holidays": "2026-10-01"},
     "site.calendar.holidays: expected a list of dates"),
    ({"hours": {"mon": "24h"}, "holiday_hours": "open"}, "site.calendar.holiday_hours: expected"),
    ({"hours": {"mon": "24h"}, "hoildays": []},
     "site.calendar.hoildays: unknown key (allowed: hours, holidays, holiday_hours) "
     "(did you mean 'holidays'?)"),
])
def test_bad_calendars_fail_naming_the_key(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=r"site\.calendar") as caught:
        parse_calendar(data, "site.calendar")
    assert message in str(caught.value)
    assert isinstance(caught.value, CalendarError) and caught.value.problems


def test_calendar_problems_carry_key_paths_for_lines() -> None:
    with pytest.raises(CalendarError) as caught:
        parse_calendar({"hours": {"mon": "x"}, "holidays": [date(2026, 1, 1), 3]}, "b")
    assert [path for path, _ in caught.value.problems] == [("hours", "mon"), ("holidays", 1)]


def test_hours_of_a_day() -> None:
    assert parse_hours("closed") == ()
    assert parse_hours("24h") == ((0, 1440),)
    assert parse_hours("13:00-17:00,9:00-12:00") == ((540, 720), (780, 1020))
    assert parse_hours("00:00-24:00") == ((0, 1440),)
