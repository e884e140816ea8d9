"""The access service against real databases: revocation reaches the next request, from this
process or another engine; tokens are single-use across the site; visitor uses persist.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from zoneinfo import ZoneInfo

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Engine, text

from device_drivers import tokens as c
from device_drivers.vocabulary import Credential, Reason
from gateway.access.decision import Reader, decide
from gateway.access.index import DirectoryIndex, build_index
from gateway.access.service import AccessService
from gateway.config import parse_config
from gateway.store import db
from gateway.store import directory as d
from tests.test_directory_store import seed_site

NOW = time.time()
READERS = [
    Reader("gate-north", "gate"),
    Reader("door-a", "gate", building_id="a"),
    Reader("elev-a-1", "elevator", building_id="a"),
    Reader("elev-b-1", "elevator", building_id="b"),
    Reader("canteen-1", "canteen"),
]


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    with engine.begin() as conn:
        seed_site(conn)
    try:
        yield engine
    finally:
        engine.dispose()


def enrol(engine: Engine, resident_id: str) -> d.EnrolledCredential:
    with engine.begin() as conn:
        return d.enrol_phone_credential(conn, resident_id)


def qr_of(enrolled: d.EnrolledCredential, now: float | None = None) -> str:
    return c.mint_qr(enrolled.credential.credential_id, enrolled.secret,
                     time.time() if now is None else now)


async def test_a_qr_replayed_at_a_gate_and_then_an_elevator_is_refused(engine: Engine) -> None:
    phone = enrol(engine, "r-alice")
    async with AccessService(engine, READERS) as service:
        token = qr_of(phone)
        first = service.decide("gate-north", "qr", token)
        assert first.granted and first.consume is None  # the token never leaves the service
        again = service.decide("elev-a-1", "qr", token)
        assert (again.granted, again.reason, again.credential_ref) == (
            False, Reason.REPLAYED_TOKEN, phone.credential.credential_id)
        assert service.decide("gate-north", "qr", token).reason == Reason.REPLAYED_TOKEN
        fresh = service.decide("elev-a-1", "qr", qr_of(phone))
        assert fresh.granted and fresh.floors == (-1, 1, 12)
        # A token refused for rights is spent as well.
        carol = enrol(engine, "r-carol")
        await service.refresh_now()
        shown = qr_of(carol)
        assert service.decide("elev-a-1", "qr", shown).reason == Reason.NOT_PERMITTED
        assert service.decide("elev-b-1", "qr", shown).reason == Reason.REPLAYED_TOKEN


async def test_lost_card_and_lost_phone_are_refused_on_the_next_request(engine: Engine) -> None:
    with engine.begin() as conn:
        d.issue_card(conn, "r-alice", "gate", "G-LOST")
        d.issue_card(conn, "r-alice", "gate", "G-SPARE")
    phone, watch = enrol(engine, "r-alice"), enrol(engine, "r-alice")
    async with AccessService(engine, READERS, poll_interval_s=60) as service:
        assert service.decide("gate-north", "card", "G-LOST").granted
        with engine.begin() as conn:
            d.revoke_card(conn, "gate", "G-LOST")
            d.revoke_phone_credential(conn, phone.credential.credential_id)
        await service.refresh_now()  # what the admin API does after its write
        assert service.decide("gate-north", "card", "G-LOST").reason == Reason.REVOKED
        assert service.decide("gate-north", "card", "G-SPARE").granted
        assert service.decide("gate-north", "qr", qr_of(phone)).reason == Reason.REVOKED
        assert service.decide("gate-north", "qr", qr_of(watch)).granted


async def test_a_revocation_by_another_engine_is_picked_up(engine: Engine) -> None:
    phone = enrol(engine, "r-bob")
    other = db.make_engine(str(engine.url.render_as_string(hide_password=False)))
    async with AccessService(engine, READERS) as service:
        assert service.decide("elev-a-1", "qr", qr_of(phone)).granted
        with other.begin() as conn:
            d.move_out(conn, "r-bob")
        deadline = time.monotonic() + 5
        while service.decide("elev-a-1", "qr", qr_of(phone)).granted:
            assert time.monotonic() < deadline, "revocation not seen"
            await asyncio.sleep(0.05)
        assert service.decide("gate-north", "qr", qr_of(phone)).reason == Reason.REVOKED
    other.dispose()


async def test_the_last_index_keeps_serving_while_the_store_fails(engine: Engine) -> None:
    phone = enrol(engine, "r-alice")
    async with AccessService(engine, READERS, poll_interval_s=0.05) as service:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE directory_changes RENAME TO directory_changes_away"))
        deadline = time.monotonic() + 5
        while service.poll_failures == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert service.decide("gate-north", "qr", qr_of(phone)).granted
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE directory_changes_away RENAME TO directory_changes"))
            d.revoke_phone_credential(conn, phone.credential.credential_id)
        deadline = time.monotonic() + 10
        while service.decide("gate-north", "qr", qr_of(phone)).granted:
            assert time.monotonic() < deadline, "the watcher did not recover"
            await asyncio.sleep(0.05)


async def test_visitor_pass_uses_are_counted_and_saved(engine: Engine) -> None:
    now = time.time()
    with engine.begin() as conn:
        issued = d.issue_visitor_pass(conn, "r-alice", "Dana", now - 60, now + 3600,
                                      building_id="a", floor=12, max_uses=2)
    pass_id = issued.visitor_pass.pass_id
    async with AccessService(engine, READERS) as service:
        for reader in ("gate-north", "elev-a-1"):
            token = service.issue_visitor_qr(pass_id)
            assert token is not None and service.decide(reader, "qr", token.qr).granted
        token = service.issue_visitor_qr(pass_id)
        assert token is not None
        assert service.decide("gate-north", "qr", token.qr).reason == Reason.NOT_PERMITTED
    with engine.connect() as conn:
        assert d.get_visitor_pass(conn, pass_id).uses == 2
    async with AccessService(engine, READERS) as service:  # a restart remembers the uses
        token = service.issue_visitor_qr(pass_id)
        assert token is not None
        assert service.decide("gate-north", "qr", token.qr).reason == Reason.NOT_PERMITTED
        with engine.begin() as conn:
            d.revoke_visitor_pass(conn, pass_id)
        await service.refresh_now()
        assert service.issue_visitor_qr(pass_id) is None


async def test_app_tokens_and_remote_checks(engine: Engine) -> None:
    old, new = enrol(engine, "r-alice"), enrol(engine, "r-alice")
    async with AccessService(engine, READERS) as service:
        issued = service.issue_qr("r-alice", time.time())
        assert issued is not None and issued.credential_id == new.credential.credential_id
        qr, expires_at, credential_id = issued
        assert credential_id == issued.credential_id
        assert expires_at > time.time() and qr not in repr(issued)
        assert service.decide("elev-a-1", "qr", qr).floors == (-1, 1, 12)
        named = service.issue_qr("r-alice", credential_id=old.credential.credential_id)
        assert named is not None and service.decide("gate-north", "qr", named.qr).granted
        assert service.issue_qr("r-bob") is None  # no phone enrolled
        assert service.issue_qr("r-alice", credential_id=c.new_credential_id()) is None
        assert service.check_remote("r-bob", "elev-a-1").floors == (-1, 1, 5)
        assert service.check_remote("r-bob", "elev-b-1").reason == Reason.NOT_PERMITTED
        assert service.check_remote("r-bob", "nowhere").reason == Reason.NOT_PERMITTED
        unknown = service.decide("nowhere", "qr", qr)
        assert (unknown.granted, unknown.reason) == (False, Reason.MALFORMED_REQUEST)
        assert service.decide("canteen-1", "card", "NOPE").reason == Reason.UNKNOWN_CARD


async def test_from_config_mirrors_buildings_and_reads_devices(engine: Engine) -> None:
    config = parse_config("""
site: {id: test, timezone: Asia/Shanghai}
access: {unlock_duration_s: 7}
buildings:
  - {id: c, name: Tower C, floors: [{number: 1, name: Lobby, public: true}, {number: 2}]}
devices:
  - {device_id: gate-east, kind: gate}
  - {device_id: elev-c-1, kind: elevator, building: c}
""", environ={})
    async with AccessService.from_config(engine, config) as service:
        assert set(service.readers) == {"gate-east", "elev-c-1"}
        with engine.begin() as conn:
            d.create_unit(conn, "c-201", "c", 2)
            d.update_resident(conn, "r-carol", unit_id="c-201")
        phone = enrol(engine, "r-carol")
        await service.refresh_now()
        decision = service.decide("elev-c-1", "qr", qr_of(phone))
        assert (decision.floors, decision.duration_s) == ((1, 2), 7)
        assert service.index.timezone == ZoneInfo("Asia/Shanghai")
    with engine.connect() as conn:
        assert [f.number for f in d.list_floors(conn, "c") if f.public] == [1]


class DirectoryMachine(RuleBasedStateMachine):
    """Random grants, revocations and moves; a revoked credential must never open anything."""

    residents = Bundle("residents")
    cards = Bundle("cards")
    phones = Bundle("phones")
    passes = Bundle("passes")
    ids = itertools.count()
    engine: Engine

    def __init__(self) -> None:
        super().__init__()
        self.revoked: set[tuple[str, str]] = set()  # ("card" | "phone" | "pass", number or id)
        self.secrets: dict[str, bytes] = {}
        self.holder: dict[tuple[str, str], str] = {}
        self.card_kind: dict[str, str] = {}
        self.gone: set[str] = set()
        self.index: DirectoryIndex | None = None
        self.group = f"g-{next(self.ids)}"
        with self.engine.begin() as conn:
            d.create_access_group(conn, self.group, gate_ids=["gym"], floors=[("b", 9)],
                                  group_id=self.group)

    @rule(target=residents, unit=st.sampled_from(["a-1201", "a-0501", "b-0801"]))
    def add_resident(self, unit: str) -> str:
        with self.engine.begin() as conn:
            return d.create_resident(conn, unit, "someone", "tenant").resident_id

    @rule(target=cards, resident=residents, kind=st.sampled_from(d.CARD_KINDS))
    def issue_card(self, resident: str, kind: str) -> tuple[str, str]:
        number = f"N{next(self.ids)}"
        if resident not in self.gone:
            with self.engine.begin() as conn:
                d.issue_card(conn, resident, kind, number)
            self.holder[("card", number)] = resident
            self.card_kind[number] = kind
        return kind, number

    @rule(target=phones, resident=residents)
    def enrol_phone(self, resident: str) -> str:
        if resident in self.gone:
            return c.new_credential_id()
        with self.engine.begin() as conn:
            enrolled = d.enrol_phone_credential(conn, resident)
        cid = enrolled.credential.credential_id
        self.secrets[cid], self.holder[("phone", cid)] = enrolled.secret, resident
        return cid

    @rule(target=passes, resident=residents, floor=st.sampled_from([None, 5, 12]))
    def issue_pass(self, resident: str, floor: int | None) -> str:
        if resident in self.gone:
            return c.new_credential_id()
        with self.engine.begin() as conn:
            issued = d.issue_visitor_pass(conn, resident, "guest", NOW - 60, NOW + 3600,
                                          building_id=None if floor is None else "a", floor=floor)
        cid = issued.visitor_pass.credential_id
        self.secrets[cid], self.holder[("pass", cid)] = issued.secret, resident
        return issued.visitor_pass.pass_id + " " + cid

    @rule(card=consumes(cards))
    def revoke_card(self, card: tuple[str, str]) -> None:
        if ("card", card[1]) in self.holder:
            with self.engine.begin() as conn:
                d.revoke_card(conn, *card)
            self.revoked.add(("card", card[1]))

    @rule(phone=consumes(phones))
    def revoke_phone(self, phone: str) -> None:
        if ("phone", phone) in self.holder:
            with self.engine.begin() as conn:
                d.revoke_phone_credential(conn, phone)
            self.revoked.add(("phone", phone))

    @rule(visit=consumes(passes))
    def revoke_pass(self, visit: str) -> None:
        pass_id, _, cid = visit.partition(" ")
        if ("pass", cid) in self.holder:
            with self.engine.begin() as conn:
                d.revoke_visitor_pass(conn, pass_id)
            self.revoked.add(("pass", cid))

    @rule(resident=residents, unit=st.sampled_from(["a-1201", "a-0501", "b-0801"]))
    def move(self, resident: str, unit: str) -> None:
        if resident not in self.gone:
            with self.engine.begin() as conn:
                d.move_resident(conn, resident, unit)

    @rule(resident=residents)
    def join_group(self, resident: str) -> None:
        if resident not in self.gone:
            with self.engine.begin() as conn:
                d.add_group_member(conn, self.group, resident)

    @rule(resident=consumes(residents))
    def move_out(self, resident: str) -> None:
        if resident not in self.gone:
            with self.engine.begin() as conn:
                d.move_out(conn, resident)
            self.gone.add(resident)
            self.revoked.update(k for k, who in self.holder.items() if who == resident)

    @invariant()
    def revoked_never_opens_and_the_rest_still_works(self) -> None:
        with self.engine.connect() as conn:
            full = build_index(d.load_snapshot(conn))
            previous = self.index
            changes = d.pending_changes(conn, previous.version) if previous else d.ChangeSet(
                d.ALL_PARTS)
            index = build_index(d.load_snapshot(conn, changes.parts), previous=previous,
                                delta=d.load_delta(conn, changes))
        assert index == full  # reloading only what changed loses nothing
        self.index = index
        readers = [*READERS, Reader("gym", "gate", restricted=True)]
        for key in self.holder:
            kind, ref = key
            if kind == "card":
                credentials = [Credential("card", ref)]
            else:
                secret = self.secrets[ref]
                credentials = [Credential("qr", c.mint_qr(ref, secret, NOW)),
                               Credential("ble", c.mint_ble(ref, secret, NOW).hex())]
            revoked = key in self.revoked
            for reader in readers:
                for credential in credentials:
                    decision = decide(index, reader, credential, NOW)
                    if revoked:
                        assert not decision.granted, (key, reader.device_id)
            if not revoked and (kind == "phone" or self.card_kind.get(ref) == "gate"):
                assert decide(index, READERS[0], credentials[0], NOW).granted, key


def test_no_sequence_of_grants_revocations_and_moves_opens_with_a_revoked_credential(
    engine: Engine,
) -> None:
    machine = type("Machine", (DirectoryMachine,), {"engine": engine})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=20, stateful_step_count=20, deadline=None))
