"""Rule files (YAML) into the frozen rules of rules/model.py, with every problem at once.

A rule file is a mapping with a `rules:` list; each entry has an `id`, a `kind` (one of
RULE_KINDS) and the keys of that kind's dataclass. The keys are derived from the dataclasses
themselves, so a field added to rules/model.py is a key here without an edit: durations
(fields named `*_s`, not `*_per_s`) drop the `_s` and accept `30s`, `5m`, `2h`, `7d`,
`1h30m` or a number of seconds (`for_s` is `for`, `window_s` is `window`); `match` and a
group's `main` are mappings of `kinds`, `devices` (globs) and `buildings`; everything else
keeps its field name. What the dataclasses cannot say (required keys, ranges, consistency
between keys, message templates) is in the tables and checks below.

Every problem names the file, the line, the rule and the key, and what was expected against
what was found, because a rule file is fixed by someone reading `scgw rules check` output:
`site-rules.yaml:14: rule 'hvac-overpower': clear: ...`. The YAML is composed once to map
each key path to its line (the technique of gateway/config.py; the layering keeps the rules
package from importing the gateway).

Calendars for the site file (`site.calendar`, `buildings[].calendar`) are parsed here too,
by `parse_calendar`, since they are what schedule rules judge against.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import math
import re
import string
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from importlib import resources
from typing import Any, Final, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from device_drivers.vocabulary import DEVICE_ID_RE, DEVICE_KINDS
from rules.model import (
    RULE_KINDS,
    Calendar,
    Interval,
    Match,
    Rule,
)

Path = tuple[str | int, ...]

RULE_ID_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
METRIC_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
LABEL_KEY_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
EVENT_TYPE_RE: Final = re.compile(r"\S{1,64}")
"""Device event types are matched as the device spells them (`door_forced`); no spaces."""
GLOB_RE: Final = re.compile(r"[a-z0-9_*?\[\]!-]{1,128}")
"""Device id globs: the device id alphabet plus `*`, `?`, `[...]` and `[!...]`."""

ENGINE_KEYS: Final[tuple[str, ...]] = (
    "rule_id", "device_id", "kind", "building", "metric", "value", "severity", "state",
)
"""Message template keys the engine offers besides the rule's fields and labels
(rules/model.py RuleBase; `state` is firing or resolved). `kind` is the device's kind;
`building` and `metric` are empty text when the device has no building or the alert no
metric."""
HIDDEN_FIELDS: Final = frozenset({"match", "labels", "message", "source", "kind"})
"""Rule fields the engine does not offer to templates (rules/messages.py)."""
DETAIL_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    "counter": ("anomaly", "previous", "explained"),
    "baseline": ("expected", "bound"),
    "ratio": ("reference", "pct"),
    "floor": ("reference", "pct"),
    "group": ("main", "subs", "difference"),
    "event": ("event",),
}
"""Keys the engine adds to a firing alert of these kinds (rules/detectors/*): which counter
anomaly, the previous reading and the energy the power explains (for a jump); the baseline
and its bound; the ratio's reference and change in percent; the main meter's and the
sub-meters' means and their difference; the event type. A transition without them (a
resolution) gets the engine's default message. Keep in step with rules/detectors."""
_DETAIL_SAMPLES: Final[Mapping[str, object]] = {
    "anomaly": "jump", "previous": 1000.0, "explained": 250.0, "expected": 1000.0, "bound": 100.0,
    "reference": 1.0, "pct": 55.0, "main": 1000.0, "subs": 800.0, "difference": 200.0,
    "event": "door_forced",
}
VALUE_MAY_BE_NULL: Final = frozenset({"no_data", "event", "counter"})
"""Kinds whose transitions may carry no value (no-data and events always, a counter alert's
resolution)."""

_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_DURATION_RE = re.compile(
    r"(?:(?P<d>\d+(?:\.\d+)?)\s*d)?\s*(?:(?P<h>\d+(?:\.\d+)?)\s*h)?\s*"
    r"(?:(?P<m>\d+(?:\.\d+)?)\s*m)?\s*(?:(?P<s>\d+(?:\.\d+)?)\s*s)?"
)
_UNIT_S = {"d": 86_400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
DURATION_HINT: Final = "a duration such as 30s, 5m, 2h, 7d or 1h30m, or a number of seconds"


class RuleFileError(Exception):
    """Rule files that cannot be used; `problems` has one line per problem, each
    `<source>:<line>: rule '<id>': <key path>: <what was expected, what was found>`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


# ---- scalar values ------------------------------------------------------------------------


def _found(value: object) -> str:
    """How a value from the file reads in a message: `found '5x' (text)`."""
    if value is None:
        return "found nothing (null)"
    if isinstance(value, bool):
        return f"found {str(value).lower()} (a boolean; YAML reads yes/no/on/off as booleans)"
    if isinstance(value, int | float):
        return f"found {value!r} (a number)"
    if isinstance(value, str):
        return f"found {value!r} (text)"
    if isinstance(value, date):
        return f"found {value.isoformat()} (a date)"
    if isinstance(value, Mapping):
        return "found a mapping" if value else "found an empty mapping"
    if isinstance(value, list):
        return "found a list" if value else "found an empty list"
    return f"found {value!r}"


def _as_number(value: object) -> float | None:
    """A finite number, or None. Numeric text counts: YAML 1.1 reads `5e3` and `4.3e9`
    (no sign in the exponent) as text, and nobody writing them means text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str) and _NUMBER_RE.fullmatch(value.strip()):
        number = float(value)
    else:
        return None
    return number if math.isfinite(number) else None


def parse_duration(value: object) -> float:
    """Seconds from `30s`, `5m`, `2h`, `7d`, `1h30m` (units in that order, each at most
    once, decimals allowed: `1.5h`) or a number of seconds. ValueError otherwise, and for
    negative or non-finite values."""
    seconds = _as_number(value)
    if seconds is None and isinstance(value, str):
        text = value.strip()
        found = _DURATION_RE.fullmatch(text) if text else None
        if found is not None and any(found.groupdict().values()):
            seconds = sum(float(amount) * _UNIT_S[unit]
                          for unit, amount in found.groupdict().items() if amount)
    if seconds is None and isinstance(value, str) and value.strip().startswith("-"):
        with contextlib.suppress(ValueError):
            seconds = -parse_duration(value.strip()[1:])
    if seconds is None:
        raise ValueError(f"expected {DURATION_HINT}; {_found(value)}")
    if seconds < 0:
        raise ValueError(f"expected a duration of 0 or more; {_found(value)}")
    return seconds


# ---- converters: a value from the file into a field's value ---------------------------------


class _Invalid(Exception):
    """Problems with one key's value, each at a path below that key."""

    def __init__(self, *problems: tuple[Path, str]) -> None:
        super().__init__(problems)
        self.problems = problems


def _bad(message: str, *below: str | int) -> _Invalid:
    return _Invalid((tuple(below), message))


Converter = Callable[[object], Any]


def _number(value: object) -> float:
    number = _as_number(value)
    if number is None:
        raise _bad(f"expected a number; {_found(value)}")
    return number


def _duration(value: object) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise _bad(str(exc)) from None


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"expected a whole number; {_found(value)}")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _bad(f"expected true or false; {_found(value)}")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise _bad(f"expected text; {_found(value)}")
    return value


def _name(pattern: re.Pattern[str], what: str) -> Converter:
    def convert(value: object) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise _bad(f"expected {what}; {_found(value)}")
        return value
    return convert


_metric = _name(METRIC_RE, "a metric name ([a-z][a-z0-9_]{0,63}, e.g. power_w)")
_nonempty_text = _name(re.compile(r"(?s).*\S.*"), "non-empty text")


def _choice(choices: tuple[object, ...]) -> Converter:
    def convert(value: object) -> object:
        if isinstance(value, bool) or value not in choices:
            raise _bad(f"expected one of {', '.join(map(str, choices))}; {_found(value)}"
                       + _did_you_mean(value, [str(c) for c in choices]))
        return value
    return convert


def _optional(inner: Converter) -> Converter:
    def convert(value: object) -> object:
        return None if value is None else inner(value)
    return convert


def _items(value: object, what: str) -> list[object]:
    """A list, or one scalar as a list of one (`kinds: hvac` means `kinds: [hvac]`)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise _bad(f"expected a list of {what}; {_found(value)}")
    return value


def _string_list(item: Converter, what: str, *, allow_empty: bool = True) -> Converter:
    def convert(value: object) -> tuple[str, ...]:
        items = _items(value, what)
        if not items and not allow_empty:
            raise _bad(f"expected at least one of {what}; found an empty list")
        problems: list[tuple[Path, str]] = []
        result: list[str] = []
        for i, raw in enumerate(items):
            try:
                result.append(item(raw))
            except _Invalid as exc:
                problems.extend(((i, *sub), message) for sub, message in exc.problems)
        if problems:
            raise _Invalid(*problems)
        return tuple(result)
    return convert


def _string_set(item: Converter, what: str) -> Converter:
    as_list = _string_list(item, what)

    def convert(value: object) -> frozenset[str]:
        return frozenset(as_list(value))
    return convert


def _kind_name(value: object) -> str:
    if not isinstance(value, str) or value not in DEVICE_KINDS:
        raise _bad(f"expected a device kind ({', '.join(DEVICE_KINDS)}); {_found(value)}"
                   + _did_you_mean(value, DEVICE_KINDS))
    return value


def _glob(value: object) -> str:
    if not isinstance(value, str) or not GLOB_RE.fullmatch(value):
        raise _bad("expected a device id or a glob of one (lower-case letters, digits, `_`, "
                   f"`-`, and `*`, `?`, `[...]`; e.g. hvac-b1-*); {_found(value)}")
    depth = 0
    for char in value:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            break
    if depth != 0:
        raise _bad(f"unbalanced [ ] in glob {value!r}")
    return value


def _building(value: object) -> str:
    if not isinstance(value, str) or not DEVICE_ID_RE.fullmatch(value):
        raise _bad(f"expected a building id ([a-z0-9][a-z0-9_-]*); {_found(value)}")
    return value


_MATCH_KEYS: Final = ("kinds", "devices", "buildings")


def _match(value: object) -> Match:
    """`{kinds: [...], devices: [globs], buildings: [...]}`, every key optional; an empty
    list is refused, because it would match nothing (kinds, buildings) or, for devices,
    everything: leaving the key out is how to say "any"."""
    if value is None:
        return Match()
    if not isinstance(value, Mapping):
        raise _bad(f"expected a mapping with any of {', '.join(_MATCH_KEYS)}; {_found(value)}")
    converters: dict[str, Converter] = {
        "kinds": _string_list(_kind_name, "device kinds", allow_empty=False),
        "devices": _string_list(_glob, "device id globs", allow_empty=False),
        "buildings": _string_list(_building, "building ids", allow_empty=False),
    }
    problems: list[tuple[Path, str]] = []
    parts: dict[str, tuple[str, ...]] = {}
    for key, raw in value.items():
        convert = converters.get(str(key))
        if convert is None:
            problems.append(((str(key),), f"unknown key (allowed: {', '.join(_MATCH_KEYS)})"
                             + _did_you_mean(key, _MATCH_KEYS)))
            continue
        try:
            parts[str(key)] = convert(raw)
        except _Invalid as exc:
            problems.extend(((str(key), *sub), message) for sub, message in exc.problems)
    if problems:
        raise _Invalid(*problems)
    kinds, devices, buildings = (parts.get(k) for k in _MATCH_KEYS)
    return Match(kinds=None if kinds is None else frozenset(kinds),
                 device_ids=devices,
                 buildings=None if buildings is None else frozenset(buildings))


def _labels(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _bad(f"expected a mapping of label names to text; {_found(value)}")
    problems: list[tuple[Path, str]] = []
    labels: dict[str, str] = {}
    for key, raw in value.items():
        if not isinstance(key, str) or not LABEL_KEY_RE.fullmatch(key):
            problems.append(((str(key),), "expected a label name ([a-z][a-z0-9_]{0,63}); "
                             + _found(key)))
        elif not isinstance(raw, str):
            hint = f" (quote it: '{raw}')" if isinstance(raw, int | float) else ""
            problems.append(((key,), f"expected text{hint}; {_found(raw)}"))
        else:
            labels[key] = raw
    if problems:
        raise _Invalid(*problems)
    return labels


# ---- per-field ranges ------------------------------------------------------------------------

Check = Callable[[Any], str | None]


def _above(limit: float, unit: str = "") -> Check:
    return lambda v: None if v > limit else f"expected more than {limit:g}{unit}; found {v:g}"


def _at_least(limit: float) -> Check:
    return lambda v: None if v >= limit else f"expected {limit:g} or more; found {v:g}"


def _below(limit: float) -> Check:
    return lambda v: None if v < limit else f"expected less than {limit:g}; found {v:g}"


def _at_most(limit: float) -> Check:
    return lambda v: None if v <= limit else f"expected {limit:g} or less; found {v:g}"


def _divides_hour(v: float) -> str | None:
    if v >= 1 and float(v).is_integer() and 3600 % int(v) == 0:
        return None
    return (f"expected a bucket that divides an hour evenly (1m, 5m, 10m, 15m, 20m, 30m, 1h), "
            f"so buckets line up with the hours of the week; found {v:g} s")


_POSITIVE_DURATION: Final = _above(0, " s")
CHECKS: Final[Mapping[str, tuple[Check, ...]]] = {
    # durations are never negative (parse_duration); these must also be above 0
    "window_s": (_POSITIVE_DURATION,),
    "timeout_s": (_POSITIVE_DURATION,),
    "clear_after_s": (_POSITIVE_DURATION,),
    "learn_s": (_POSITIVE_DURATION,),
    "min_interval_s": (_POSITIVE_DURATION,),
    "bucket_s": (_POSITIVE_DURATION, _divides_hour),
    "max_per_s": (_above(0),),
    "clear_per_s": (_above(0),),
    "tolerance": (_at_least(0),),
    "ignore_below": (_at_least(0),),
    "counter_max": (_above(0),),
    "rollover_margin": (_above(0), _at_most(0.5)),
    "regression_tolerance": (_at_least(0),),
    "jump_factor": (_at_least(1),),
    "jump_margin": (_at_least(0),),
    "max_power": (_above(0),),
    "history_weeks": (_at_least(1), _at_most(52)),
    "alpha": (_above(0), _at_most(1)),
    "k": (_above(0),),
    "min_abs_deviation": (_at_least(0),),
    "exponent": (_above(0),),
    "min_denominator": (_above(0),),
    "rise_pct": (_above(0),),
    "fall_pct": (_above(0), _below(100)),
    "clear_pct": (_at_least(0),),
    "tolerance_pct": (_at_least(0),),
    "min_abs": (_at_least(0),),
    "per_step": (_above(0),),
    "min_per": (_at_least(0),),
    "min_swing": (_at_least(1),),
}
"""Ranges by field name, wherever the field appears (names mean the same in every kind)."""

REQUIRED: Final[Mapping[str, frozenset[str]]] = {
    "threshold": frozenset({"metric"}),  # and exactly one of above/below (checked below)
    "rate_of_change": frozenset({"metric", "max_per_s"}),
    "flatline": frozenset({"metric"}),
    "counter": frozenset(),  # metric energy_wh, power_metric power_w
    "no_data": frozenset(),  # any reading counts
    "schedule": frozenset({"metric", "above"}),
    "baseline": frozenset({"metric"}),
    "ratio": frozenset({"numerator", "denominator"}),
    "floor": frozenset({"metric"}),
    "group": frozenset({"metric", "match", "main"}),
    "event": frozenset({"events"}),
}
"""Field names each kind needs in the file beyond id and kind. The dataclasses have
defaults for them, but a rule that silently watches power_w because `metric` was forgotten
is worse than an error."""

_METRIC_FIELDS: Final = frozenset({"metric", "power_metric", "numerator", "denominator",
                                   "per"})
_EVENT_FIELDS: Final = frozenset({"events", "clear_events"})
_INSTANT_KINDS: Final = {
    "event": "an event rule fires on the event itself",
    "counter": "a counter anomaly happens between two readings",
}
"""Kinds whose condition is an instant, for which `for` (hold this long) means nothing."""


# ---- the keys of each kind, from the dataclasses ---------------------------------------------


def yaml_key(field_name: str) -> str:
    """The key a field has in the file: durations drop `_s` (`for_s` -> `for`)."""
    if field_name.endswith("_s") and not field_name.endswith("_per_s"):
        return field_name[:-2]
    return field_name


def _is_duration(field_name: str, annotation: object) -> bool:
    return yaml_key(field_name) != field_name and annotation is float


def _converter(field_name: str, annotation: object) -> Converter:
    """How a field's value is read, from its type (and, for text, its name)."""
    args = get_args(annotation)
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        inner = rest[0] if len(rest) == 1 else Union[rest]  # noqa: UP007
        return _optional(_converter(field_name, inner))
    if _is_duration(field_name, annotation):
        return _duration
    if annotation is Match:
        return _match
    if origin is Literal:
        return _choice(args)
    if annotation is bool:
        return _boolean
    if annotation is int:
        return _integer
    if annotation is float:
        return _number
    if annotation is str:
        if field_name in _METRIC_FIELDS:
            return _metric
        return _text if field_name == "message" else _nonempty_text
    if origin in (frozenset, tuple) and args and args[0] is str:
        item = (_name(EVENT_TYPE_RE, "an event type (text without spaces)")
                if field_name in _EVENT_FIELDS else _nonempty_text)
        what = "event types" if field_name in _EVENT_FIELDS else "names"
        return _string_set(item, what) if origin is frozenset else _string_list(item, what)
    if origin is Mapping and args == (str, str):
        return _labels
    raise NotImplementedError(
        f"rules/loader.py cannot read a rule field {field_name!r} of type {annotation!r}; "
        "add a converter for it")


_NOT_KEYS: Final = frozenset({"id", "kind", "source"})


@dataclass(frozen=True, slots=True)
class KindSpec:
    """What one rule kind accepts: YAML key -> (field name, converter), and defaults."""

    kind: str
    cls: type[Any]
    keys: Mapping[str, tuple[str, Converter]]
    defaults: Mapping[str, Any]
    required: frozenset[str]  # YAML keys

    @property
    def allowed(self) -> tuple[str, ...]:
        return ("id", "kind", *self.keys)


def _spec(cls: type[Any]) -> KindSpec:
    hints = get_type_hints(cls)
    keys: dict[str, tuple[str, Converter]] = {}
    defaults: dict[str, Any] = {}
    kind = ""
    for field in dataclasses.fields(cls):
        if field.name == "kind":
            kind = str(field.default)
        if field.name in _NOT_KEYS or not field.init:
            continue
        keys[yaml_key(field.name)] = (field.name, _converter(field.name, hints[field.name]))
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
        elif field.name == "match":
            defaults[field.name] = Match()  # no `match`: every device
    return KindSpec(kind, cls, keys, defaults,
                    frozenset(yaml_key(name) for name in REQUIRED.get(kind, ())))


KINDS: Final[Mapping[str, KindSpec]] = {
    spec.kind: spec for spec in (_spec(cls) for cls in get_args(Rule))
}
"""Every rule kind's keys, in RULE_KINDS order of the model."""
assert set(KINDS) == set(RULE_KINDS), "rules.model.Rule and RULE_KINDS disagree"


# ---- checks across keys ----------------------------------------------------------------------


def _cross_checks(kind: str, v: Mapping[str, Any], given: set[str]) -> list[tuple[Path, str]]:
    """Consistency between keys; `v` has a value for every field, `given` the YAML keys the
    file set with a usable value (a check involving a broken key is skipped)."""
    problems: list[tuple[Path, str]] = []

    def has(*keys: str) -> bool:
        return all(k in given for k in keys)

    if kind in _INSTANT_KINDS and has("for") and v["for_s"] > 0:
        problems.append((("for",), f"{_INSTANT_KINDS[kind]}; `for` does not apply "
                         "(clear_after says how long the alert stays)"))
    if kind == "threshold":
        above, below, clear = v["above"], v["below"], v["clear"]
        if above is None and below is None:
            problems.append((("above/below",), "a threshold rule needs `above` or `below` "
                             "(exactly one); found neither"))
        elif above is not None and below is not None:
            problems.append((("below",), "give exactly one of `above` and `below`; found both "
                             "(a band is two rules)"))
        elif clear is not None and above is not None and clear > above:
            problems.append((("clear",), f"with `above: {above:g}` the alert resolves when the "
                             f"value drops below `clear`, so clear must be at most {above:g}; "
                             f"found {clear:g}"))
        elif clear is not None and below is not None and clear < below:
            problems.append((("clear",), f"with `below: {below:g}` the alert resolves when the "
                             f"value rises above `clear`, so clear must be at least {below:g}; "
                             f"found {clear:g}"))
    elif kind == "rate_of_change":
        if v["clear_per_s"] is not None and v["clear_per_s"] > v["max_per_s"]:
            problems.append((("clear_per_s",), f"expected at most max_per_s "
                             f"({v['max_per_s']:g}) so the alert can resolve; "
                             f"found {v['clear_per_s']:g}"))
    elif kind == "schedule":
        if v["clear"] is not None and v["clear"] > v["above"]:
            problems.append((("clear",), f"with `above: {v['above']:g}` the alert resolves when "
                             f"the value drops to `clear`, so clear must be at most "
                             f"{v['above']:g}; found {v['clear']:g}"))
    elif kind == "baseline":
        if has("alpha") and v["method"] != "ewma":
            problems.append((("alpha",), f"alpha is the weight of method ewma; this rule's "
                             f"method is {v['method']} (remove alpha or set method: ewma)"))
        if has("history_weeks") and v["method"] == "ewma":
            problems.append((("history_weeks",), "history_weeks is for method median_mad; "
                             "method ewma weighs all history by alpha"))
    elif kind == "ratio":
        rise, fall, clear = v["rise_pct"], v["fall_pct"], v["clear_pct"]
        if rise is None and fall is None:
            problems.append((("rise_pct",), "a ratio rule needs rise_pct or fall_pct (or "
                             "both); found neither"))
        for name, limit in (("rise_pct", rise), ("fall_pct", fall)):
            if clear is not None and limit is not None and clear > limit:
                problems.append((("clear_pct",), f"expected at most {name} ({limit:g}) so the "
                                 f"alert can resolve; found {clear:g}"))
        if v["numerator"] == v["denominator"]:
            problems.append((("denominator",), "expected a metric other than the numerator "
                             f"(the ratio of {v['numerator']} to itself never moves)"))
    elif kind == "floor":
        if v["clear_pct"] is not None and v["clear_pct"] > v["rise_pct"]:
            problems.append((("clear_pct",), f"expected at most rise_pct ({v['rise_pct']:g}) "
                             f"so the alert can resolve; found {v['clear_pct']:g}"))
        if v["per"] == v["metric"]:
            problems.append((("per",), "expected the metric that sets the operating point "
                             f"(a fan speed), not the watched metric itself ({v['metric']})"))
    elif kind == "group":
        for key in ("match", "main"):
            if has(key) and v[key] == Match():
                what = "sub-meters" if key == "match" else "main meter(s)"
                problems.append(((key,), f"expected at least one of kinds, devices, buildings "
                                 f"to select the {what}; found none (this would select every "
                                 "device)"))
        if has("match", "main") and v["match"] == v["main"] and v["main"] != Match():
            problems.append((("main",), "selects the same devices as `match`: the main meter "
                             "must not be one of its own sub-meters"))
    elif kind == "event":
        if has("events") and not v["events"]:
            problems.append((("events",), "expected at least one event type; found an empty "
                             "list"))
        both = sorted(v["events"] & v["clear_events"])
        if both:
            problems.append((("clear_events",), f"{', '.join(both)} both fire and clear the "
                             "alert; list each type in one of events and clear_events"))
    elif kind == "counter":
        if v["power_metric"] == v["metric"]:
            problems.append((("power_metric",), f"expected the power metric that explains "
                             f"the counter's growth, not the counter itself ({v['metric']})"))
    return problems


# ---- message templates -----------------------------------------------------------------------


def offered_keys(kind: str, labels: Iterable[str] = ()) -> list[str]:
    """Keys a message template of this kind may name (rules/messages.py renders them)."""
    fields = [f.name for f in dataclasses.fields(KINDS[kind].cls)
              if f.name not in HIDDEN_FIELDS]
    return list(dict.fromkeys([*ENGINE_KEYS, *fields, *DETAIL_KEYS.get(kind, ()), *labels]))


def _template_problems(kind: str, template: str, values: Mapping[str, Any]) -> list[str]:
    """Whether the engine can format `template`: every field a plain offered key, and every
    format spec valid for the values it may get, including null (the value of no-data and
    event alerts and of a counter's resolution; optional fields left out)."""
    labels: Mapping[str, str] = values.get("labels") or {}
    offered = offered_keys(kind, labels)
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return [f"not a valid template ({exc}); write {{{{ and }}}} for literal braces"]
    problems = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        written = "{" + name + (f"!{conversion}" if conversion else "") + (
            f":{spec}" if spec else "") + "}"
        if re.search(r"\d{4,}", spec or ""):
            problems.append(f"{written}: a width or precision of 1000 or more has no place "
                            "in a message")
        if name == "" or name.isdigit():
            problems.append(f"{written}: positional fields are not offered; name a key "
                            f"({', '.join(offered)})")
        elif not name.isidentifier():
            problems.append(f"{written}: attribute and index access are not offered; name a "
                            f"key ({', '.join(offered)})")
        elif name not in offered:
            problems.append(f"{written}: unknown key{_did_you_mean(name, offered)} "
                            f"(offered: {', '.join(offered)})")
        for _, inner, _, _ in string.Formatter().parse(spec or ""):
            if inner is not None and inner not in offered:
                problems.append(f"{{{inner}}} (in the format of {written}): unknown key "
                                f"(offered: {', '.join(offered)})")
    if problems:
        return problems
    fields = {k: (", ".join(sorted(v)) if isinstance(v, frozenset) else v)
              for k, v in values.items() if k not in HIDDEN_FIELDS}
    details = {k: _DETAIL_SAMPLES[k] for k in DETAIL_KEYS.get(kind, ())}
    for building in ("b1", ""):
        for value in (1234.5, *((None,) if kind in VALUE_MAY_BE_NULL else ())):
            sample: dict[str, Any] = {
                **fields, **labels, **details, "rule_id": values.get("id", "r"),
                "device_id": "dev-1", "kind": "meter", "building": building,
                "metric": _metric_of(kind, values) or "", "value": value,
                "severity": values.get("severity", "warning"), "state": "firing"}
            try:
                string.Formatter().vformat(template, (), sample)
            except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
                nulls = [k for k, x in sample.items() if x is None and k in template]
                why = (f" (null in this case: {', '.join(nulls)}; a format spec such as :.0f "
                       "needs a number: write the key without one)"
                       ) if nulls and isinstance(exc, TypeError) else ""
                return [f"cannot be formatted: {type(exc).__name__}: {exc}{why}"]
    return []


def _metric_of(kind: str, values: Mapping[str, Any]) -> str | None:
    if kind == "ratio":
        return str(values["numerator"])
    if kind == "event":
        return None
    metric = values.get("metric")
    return metric if isinstance(metric, str) else None


# ---- files ------------------------------------------------------------------------------------


def _did_you_mean(value: object, choices: Iterable[str]) -> str:
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _line_index(text: str) -> tuple[dict[Path, int], list[tuple[Path, int, int]]]:
    """Every key path of the document -> its 1-based line; and keys given twice in one
    mapping (path, first line, second line), which YAML would silently collapse.

    Keys merged in with `<<: *anchor` point at the anchor's line, unless the mapping sets
    them itself.
    """
    lines: dict[Path, int] = {}
    twice: list[tuple[Path, int, int]] = []

    def walk(node: yaml.Node, path: Path, depth: int) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if depth > 64:  # recursive anchors
            return
        if isinstance(node, yaml.MappingNode):
            merged: list[yaml.Node] = []
            for key, value in node.value:
                if key.tag == _MERGE_TAG:
                    merged.extend(value.value if isinstance(value, yaml.SequenceNode)
                                  else [value])
                    continue
                child = (*path, str(key.value))
                if child in lines:
                    twice.append((child, lines[child], key.start_mark.line + 1))
                    continue
                lines[child] = key.start_mark.line + 1
                walk(value, child, depth + 1)
                lines[child] = key.start_mark.line + 1
            for source in merged:
                if isinstance(source, yaml.MappingNode):
                    for key, value in source.value:
                        child = (*path, str(key.value))
                        if child not in lines:
                            lines[child] = key.start_mark.line + 1
                            walk(value, child, depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i), depth + 1)

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, (), 0)
    return lines, twice


def _dotted(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass(slots=True)
class _FileReader:
    source: str
    lines: dict[Path, int]
    problems: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    def line(self, path: Path) -> int:
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return 1

    def top(self, path: Path, message: str) -> None:
        self.problems.append((self.line(path), f"{self.source}:{self.line(path)}: {message}"))

    def rule(self, who: str, path: Path, below: Path, message: str,
             line: int | None = None) -> None:
        line = self.line((*path, *below)) if line is None else line
        self.problems.append(
            (line, f"{self.source}:{line}: {who}: {_dotted(below) or '(rule)'}: {message}"))


def _load(text: str, source: str) -> tuple[list[Rule], list[str]]:
    """The rules that are valid, and every problem (sorted by line)."""
    try:
        data = yaml.safe_load(text)
        lines, twice = _line_index(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        what = f"{problem} ({context})" if context else problem
        return [], [f"{source}:{line}: not valid YAML: {what}"]
    reader = _FileReader(source, lines)
    if data is None:
        reader.top((), "the file is empty; expected a `rules:` list (`rules: []` for none)")
        return [], [p for _, p in reader.problems]
    if not isinstance(data, Mapping):
        reader.top((), f"expected a mapping with a `rules:` list; {_found(data)}")
        return [], [p for _, p in reader.problems]
    for path, first, second in twice:
        if path[:1] != ("rules",) or len(path) == 1:
            reader.problems.append((second, f"{source}:{second}: {_dotted(path)}: key given "
                                    f"twice (first at line {first}); YAML would keep only the "
                                    "last"))
    for key in data:
        if key != "rules" and not (isinstance(key, str) and key.startswith("x-")):
            reader.top((str(key),), f"{key}: unknown top-level key (allowed: rules, and x-... "
                       "keys for YAML anchors)" + _did_you_mean(key, ["rules"]))
    if "rules" not in data:
        reader.top((), "no `rules:` list (top-level keys found: "
                   f"{', '.join(map(str, data)) or 'none'})")
        return [], [p for _, p in sorted(reader.problems, key=lambda p: p[0])]
    entries = data["rules"]
    if not isinstance(entries, list):
        hint = " (`rules: []` for no rules)" if entries is None else ""
        reader.top(("rules",), f"rules: expected a list of rules; {_found(entries)}{hint}")
        return [], [p for _, p in sorted(reader.problems, key=lambda p: p[0])]
    rules: list[Rule] = []
    first_line: dict[str, int] = {}
    for i, entry in enumerate(entries):
        rule = _rule(reader, i, entry, twice, first_line)
        if rule is not None:
            rules.append(rule)
    return rules, [p for _, p in sorted(reader.problems, key=lambda p: p[0])]


def _rule(reader: _FileReader, i: int, entry: object, twice: list[tuple[Path, int, int]],
          first_line: dict[str, int]) -> Rule | None:
    path: Path = ("rules", i)
    before = len(reader.problems)
    if not isinstance(entry, Mapping):
        reader.top(path, f"rules[{i}]: expected a mapping of rule keys (id, kind, ...); "
                   f"{_found(entry)}")
        return None
    raw_id = entry.get("id")
    who = f"rule {raw_id!r}" if isinstance(raw_id, str) and raw_id else f"rules[{i}]"

    def problem(below: Path, message: str, line: int | None = None) -> None:
        reader.rule(who, path, below, message, line)

    for dup, first, second in twice:
        if dup[:2] == path and len(dup) > 2:
            problem(dup[2:], f"key given twice (first at line {first}); YAML would keep only "
                    "the last", second)
    if "id" not in entry:
        problem(("id",), "required key is missing (a unique name, e.g. hvac-overpower)")
    elif not isinstance(raw_id, str) or not RULE_ID_RE.fullmatch(raw_id):
        problem(("id",), f"expected an id of [a-z0-9][a-z0-9_.-]{{0,63}}; {_found(raw_id)}")
    else:
        line = reader.line((*path, "id"))
        if raw_id in first_line:
            problem(("id",), f"duplicate id {raw_id!r}: also used by the rule at line "
                    f"{first_line[raw_id]}")
        else:
            first_line[raw_id] = line
    kind = entry.get("kind")
    if "kind" not in entry:
        problem(("kind",), f"required key is missing (one of {', '.join(RULE_KINDS)})")
        return None
    if not isinstance(kind, str) or kind not in KINDS:
        problem(("kind",), f"unknown kind; expected one of {', '.join(RULE_KINDS)}; "
                f"{_found(kind)}{_did_you_mean(kind, RULE_KINDS)}")
        return None
    spec = KINDS[kind]
    values: dict[str, Any] = dict(spec.defaults)
    given: set[str] = set()
    for key, raw in entry.items():
        if key in ("id", "kind"):
            continue
        if key not in spec.keys:
            problem((str(key),), _unknown_key(kind, key, spec))
            continue
        field_name, convert = spec.keys[key]
        try:
            value = convert(raw)
        except _Invalid as exc:
            for below, message in exc.problems:
                problem((key, *below), message)
            continue
        range_problems = [m for check in CHECKS.get(field_name, ())
                          if value is not None and (m := check(value)) is not None]
        for message in range_problems[:1]:
            problem((key,), message)
        if not range_problems:
            values[field_name] = value
            given.add(key)
    broken = {k for k in entry if k in spec.keys} - given
    missing = sorted(spec.required - set(entry))
    for key in missing:
        problem((key,), f"required key is missing for a {kind} rule")
    broken.update(missing)  # checks across keys would judge defaults nobody wrote
    if not broken:
        for below, message in _cross_checks(kind, values, given):
            problem(below, message)
    labels = values.get("labels") or {}
    reserved = set(offered_keys(kind))
    for label in labels:
        if label in reserved:
            problem(("labels", label), f"a label may not be named like the message key "
                    f"{label!r} the engine offers (it would hide it in templates)")
    if "message" in given and not broken:
        for message in _template_problems(kind, values["message"], values):
            problem(("message",), message)
    if len(reader.problems) > before:
        return None
    values["id"] = raw_id
    values["source"] = f"{reader.source}:{reader.line(path)}"
    rule: Rule = spec.cls(**values)
    return rule


def _unknown_key(kind: str, key: object, spec: KindSpec) -> str:
    """Which key was meant: a duration written with its field name (`window_s`), a key of
    another kind, or a misspelling."""
    allowed = spec.allowed
    name = str(key)
    durations = {k for s in KINDS.values() for k, (f, _) in s.keys.items() if k != f}
    if name.endswith("_s") and name[:-2] in durations:
        name = name[:-2]
        if name in spec.keys:
            return (f"unknown key; durations drop the _s: write `{name}: 5m` "
                    f"(allowed: {', '.join(allowed)})")
    owners = [s.kind for s in KINDS.values() if name in s.keys]
    if owners:
        hint = f" ({name} is a key of {', '.join(owners)} rules)"
    else:
        hint = _did_you_mean(key, allowed)
    return f"unknown key for a {kind} rule{hint}; allowed: {', '.join(allowed)}"


def load_rules(text: str, source: str = "<rules>") -> list[Rule]:
    """The rules of one file, in file order; RuleFileError lists every problem at once."""
    rules, problems = _load(text, source)
    if problems:
        raise RuleFileError(problems)
    return rules


def load_rule_files(texts: Sequence[tuple[str, str]]) -> list[Rule]:
    """The rules of several files, given as (source, text) pairs, in order; every problem of
    every file at once, and ids used in more than one file (naming both places)."""
    rules: list[Rule] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for source, text in texts:
        file_rules, file_problems = _load(text, source)
        problems.extend(file_problems)
        for rule in file_rules:
            if rule.id in seen:  # (within one file, _load has reported it already)
                problems.append(f"{rule.source}: rule {rule.id!r}: id: duplicate id, also "
                                f"defined at {seen[rule.id]}")
            else:
                seen.setdefault(rule.id, rule.source)
                rules.append(rule)
    if problems:
        raise RuleFileError(problems)
    return rules


DEFAULT_RULES_SOURCE: Final = "rules/default_rules.yaml"


def default_rules_text() -> str:
    """The bundled rules/default_rules.yaml, used when the site names no rule files."""
    return resources.files("rules").joinpath("default_rules.yaml").read_text(encoding="utf-8")


def default_rules() -> list[Rule]:
    return load_rules(default_rules_text(), DEFAULT_RULES_SOURCE)


# ---- calendars --------------------------------------------------------------------------------

_DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_NUMBER: Final[Mapping[str, int]] = {
    **{d: i for i, d in enumerate(_DAYS)},
    **{name: i for i, name in enumerate(("monday", "tuesday", "wednesday", "thursday",
                                         "friday", "saturday", "sunday"))},
}
_CALENDAR_KEYS: Final = ("hours", "holidays", "holiday_hours")
_TIME_RE = re.compile(r"(\d{1,2}):(\d{2})")
HOURS_HINT: Final = ('"HH:MM-HH:MM" (several comma-separated: "07:00-12:00, 13:00-20:00"), '
                     '"closed" or "24h"')


def _days(spec: str) -> list[int]:
    """`mon-fri`, `sat`, `sat,sun`, `fri-mon` (wraps), full names too."""
    days: list[int] = []
    for part in spec.split(","):
        ends = [e.strip().lower() for e in part.split("-")]
        if len(ends) > 2 or not all(e in _DAY_NUMBER for e in ends):
            raise ValueError(f"expected day names (mon, tue, wed, thu, fri, sat, sun), ranges "
                             f"(mon-fri) or lists (sat,sun); found {spec!r}")
        first, last = _DAY_NUMBER[ends[0]], _DAY_NUMBER[ends[-1]]
        days.extend((first + n) % 7 for n in range((last - first) % 7 + 1))
    return days


def _minutes(text: str, *, end: bool) -> int:
    found = _TIME_RE.fullmatch(text.strip())
    if found is None:
        raise ValueError(f"expected a time HH:MM; found {text.strip()!r}")
    hours, minutes = int(found[1]), int(found[2])
    if minutes > 59 or hours > 24 or (hours == 24 and (minutes or not end)):
        raise ValueError(f"expected a time from 00:00 to 24:00 (24:00 only as an end); "
                         f"found {text.strip()!r}")
    return hours * 60 + minutes


def parse_hours(value: object) -> tuple[Interval, ...]:
    """Open intervals of one day: `"07:00-20:00"`, `"07:00-12:00, 13:00-20:00"` (or a list
    of ranges), `"closed"`, `"24h"`. ValueError naming what was expected otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected {HOURS_HINT}; {_found(value)} (write closed, quoted or not)")
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    if not isinstance(value, str):
        raise ValueError(f"expected {HOURS_HINT}; {_found(value)}")
    text = value.strip().lower()
    if text == "closed":
        return ()
    if text == "24h":
        return ((0, 1440),)
    intervals: list[Interval] = []
    for part in text.split(","):
        ends = part.split("-")
        if len(ends) != 2:
            raise ValueError(f"expected {HOURS_HINT}; found {value!r}")
        start, stop = _minutes(ends[0], end=False), _minutes(ends[1], end=True)
        if start >= stop:
            raise ValueError(f"{part.strip()!r} ends before it starts; a range past midnight "
                             "is two ranges on consecutive days (22:00-24:00, then "
                             "00:00-02:00)")
        intervals.append((start, stop))
    intervals.sort()
    for (_, a_end), (b_start, _) in itertools.pairwise(intervals):
        if b_start < a_end:
            raise ValueError(f"ranges overlap in {value!r}")
    return tuple(intervals)


class CalendarError(ValueError):
    """Problems with a calendar mapping: `problems` are (key path below the calendar,
    message) pairs, so a caller that knows the lines (the site file's loader) can place each
    one; str() names each key under `where` with its message, joined by "; "."""

    def __init__(self, where: str, problems: list[tuple[Path, str]]) -> None:
        self.where = where
        self.problems = problems
        super().__init__("; ".join(f"{_dotted((where, *path))}: {message}"
                                   for path, message in problems))


def parse_calendar(data: object, where: str) -> Calendar:
    """A building's opening hours from the site file:

        hours: {mon-fri: "07:00-20:00", sat: "09:00-17:00", sun: closed}
        holidays: ["2026-10-01", "2026-10-02"]
        holiday_hours: closed

    Days not named are closed. CalendarError (a ValueError) lists every problem, each
    naming its key under `where` (e.g. `site.calendar.hours.mon-fri`) and what was
    expected; its `problems` have the key paths for finding the lines.
    """
    if not isinstance(data, Mapping):
        raise CalendarError(where, [((), "expected a mapping with hours, holidays, "
                                         f"holiday_hours; {_found(data)}")])
    problems: list[tuple[Path, str]] = []
    for name in data:
        if name not in _CALENDAR_KEYS:
            problems.append(((str(name),), f"unknown key (allowed: {', '.join(_CALENDAR_KEYS)})"
                             + _did_you_mean(name, _CALENDAR_KEYS)))
    weekly: list[tuple[Interval, ...] | None] = [None] * 7
    named_by: dict[int, str] = {}
    hours = data.get("hours")
    if "hours" not in data:
        problems.append((("hours",), "required key is missing (e.g. "
                         '{mon-fri: "07:00-20:00", sat-sun: closed}; days not named are closed)'))
    elif not isinstance(hours, Mapping) or not hours:
        problems.append((("hours",), "expected a mapping of days to hours, e.g. "
                         f'{{mon-fri: "07:00-20:00", sat-sun: closed}}; {_found(hours)}'))
    else:
        for day_spec, spec in hours.items():
            key: Path = ("hours", str(day_spec))
            try:
                days = _days(str(day_spec))
                intervals = parse_hours(spec)
            except ValueError as exc:
                problems.append((key, str(exc)))
                continue
            for day in days:
                if day in named_by:
                    problems.append((key, f"{_DAYS[day]} is already given by "
                                          f"{named_by[day]!r}"))
                else:
                    named_by[day] = str(day_spec)
                    weekly[day] = intervals
    holidays: set[str] = set()
    raw_holidays = data.get("holidays", [])
    if not isinstance(raw_holidays, list):
        problems.append((("holidays",), "expected a list of dates (YYYY-MM-DD); "
                         f"{_found(raw_holidays)}"))
    else:
        for i, day in enumerate(raw_holidays):
            holiday = _iso_date(day)
            if holiday is None:
                problems.append((("holidays", i), f"expected a date YYYY-MM-DD; {_found(day)}"))
            else:
                holidays.add(holiday)
    holiday_hours: tuple[Interval, ...] = ()
    if "holiday_hours" in data:
        try:
            holiday_hours = parse_hours(data["holiday_hours"])
        except ValueError as exc:
            problems.append((("holiday_hours",), str(exc)))
    if problems:
        raise CalendarError(where, problems)
    return Calendar(weekly=tuple(day or () for day in weekly), holidays=frozenset(holidays),
                    holiday_hours=holiday_hours)


def _iso_date(value: object) -> str | None:
    """YAML reads an unquoted 2026-10-01 as a date; quoted, it is text. Both are fine."""
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value.strip()):
        try:
            return date.fromisoformat(value.strip()).isoformat()
        except ValueError:
            return None
    return None
