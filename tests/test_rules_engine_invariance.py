"""Batch invariance: how a stream is cut into calls, and where the engine is snapshotted
and restored (a gateway restart), never changes the transitions."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from rules.columns import ReadingColumns
from rules.engine import Engine
from rules.model import Rule
from tests.test_rules_engine_floor import FLOOR_RULES
from tests.test_rules_engine_reference import Item, Row
from tests.test_rules_engine_streams import (
    RELAXED,
    SITE,
    canonical,
    only_readings,
    rows,
    streams,
)
from tests.test_rules_engine_streams import RULES as KIND_RULES

RULES: tuple[Rule, ...] = (*KIND_RULES, *FLOOR_RULES)
"""Every kind, the floor rules (tests/test_rules_engine_floor.py) included."""


def cuts(n: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, n), max_size=6).map(lambda c: sorted(set(c)))


def pieces(items: list[Item], at: list[int]) -> list[list[Item]]:
    bounds = [0, *at, len(items)]
    return [items[a:b] for a, b in itertools.pairwise(bounds)]


def whole(items: list[Item]) -> list[Row]:
    return canonical(rows(Engine(RULES, SITE).process(items)))


@RELAXED
@given(streams(), st.data())
def test_any_split_gives_the_same_transitions(items: list[Item], data: st.DataObject) -> None:
    at = data.draw(cuts(len(items)))
    engine = Engine(RULES, SITE)
    got = [t for piece in pieces(items, at) for t in engine.process(piece)]
    assert canonical(rows(got)) == whole(items)


@RELAXED
@given(streams(), st.data())
def test_restart_at_any_point_neither_refires_nor_forgets(items: list[Item],
                                                          data: st.DataObject) -> None:
    """snapshot() + restore() between calls is invisible, pending timers included."""
    at = data.draw(cuts(len(items)))
    engine = Engine(RULES, SITE)
    got = []
    for piece in pieces(items, at):
        got += engine.process(piece)
        saved = engine.snapshot()
        engine = Engine.restore(RULES, SITE, saved)
        assert engine.snapshot() == saved  # restore reproduces the state exactly
    assert canonical(rows(got)) == whole(items)
    reference = Engine(RULES, SITE)
    reference.process(items)
    assert engine.active() == reference.active()


@RELAXED
@given(streams(), st.data())
def test_columns_in_pieces_equal_objects_in_one_call(items: list[Item],
                                                     data: st.DataObject) -> None:
    readings = only_readings(items)
    at = data.draw(cuts(len(readings)))
    engine = Engine(RULES, SITE)
    got = []
    for piece in pieces(list(readings), at):
        got += engine.process_columns(ReadingColumns.from_readings(only_readings(piece)))
    assert canonical(rows(got)) == whole(list(readings))
