"""The pure access decision over a hand-built directory: every contract reason, every rule."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from device_drivers import tokens as c
from device_drivers.vocabulary import Credential, Reason
from gateway.access.decision import AccessDecision, Reader, decide, decide_for_resident
from gateway.access.index import DirectoryIndex, build_index
from gateway.store.directory import (
    AccessGroup,
    Building,
    Card,
    DirectorySnapshot,
    Floor,
    PhoneCredential,
    Resident,
    ScheduleWindow,
    Unit,
    VisitorPass,
)

TZ = ZoneInfo("Asia/Shanghai")
# Monday 2026-05-11, 10:00 site time.
NOW = datetime(2026, 5, 11, 10, 0, tzinfo=TZ).timestamp()
ALICE, BOB, CAROL, GONE = "r-alice", "r-bob", "r-carol", "r-gone"
SECRETS = {f"{n:016x}": bytes([n]) * 32 for n in range(1, 8)}
ALICE_PHONE, ALICE_TABLET, BOB_PHONE, CAROL_PHONE, GONE_PHONE, LOST_PHONE, VISIT = SECRETS

GATE = Reader("gate-north", "gate")
DOOR_A = Reader("door-a", "gate", building_id="a")
GYM = Reader("gym-door", "gate", gate_ids=frozenset({"gym"}), restricted=True)
ELEV_A = Reader("elev-a-1", "elevator", building_id="a", duration_s=10)
ELEV_B = Reader("elev-b-1", "elevator", building_id="b")
TILL = Reader("canteen-1", "canteen")


def snapshot(*, groups: Iterable[AccessGroup] = (), passes: Iterable[VisitorPass] = (),
             moved_out: Iterable[str] = ()) -> DirectorySnapshot:
    gone = set(moved_out) | {GONE}
    people = [(ALICE, "a-1201"), (BOB, "a-0501"), (CAROL, "b-0801"), (GONE, "a-0501")]
    phones = [(ALICE_PHONE, ALICE, None), (ALICE_TABLET, ALICE, None), (BOB_PHONE, BOB, None),
              (CAROL_PHONE, CAROL, None), (GONE_PHONE, GONE, None), (LOST_PHONE, ALICE, NOW - 60)]
    return DirectorySnapshot(
        version=1,
        buildings=(Building("a", "A"), Building("b", "B")),
        floors=(Floor("a", -1, "garage", True), Floor("a", 1, "lobby", True),
                *(Floor("a", n) for n in range(2, 13)), Floor("b", 1, "lobby", True),
                *(Floor("b", n) for n in range(2, 20)), Floor("b", 20, "gym", True)),
        units=(Unit("a-1201", "a", 12), Unit("a-0501", "a", 5), Unit("b-0801", "b", 8)),
        residents=tuple(Resident(rid, unit, rid, "owner", 0.0, 1.0 if rid in gone else None)
                        for rid, unit in people),
        cards=(Card("gate", "G-ALICE", ALICE, 0.0), Card("elevator", "E-ALICE", ALICE, 0.0),
               Card("canteen", "C-ALICE", ALICE, 0.0), Card("gate", "G-LOST", ALICE, 0.0, 5.0),
               Card("gate", "G-BOB", BOB, 0.0), Card("gate", "G-GONE", GONE, 0.0)),
        phone_credentials=tuple(PhoneCredential(cid, rid, "phone", 0.0, revoked)
                                for cid, rid, revoked in phones),
        access_groups=tuple(groups),
        visitor_passes=tuple(passes),
        secrets=SECRETS,
    )


def index_of(snap: DirectorySnapshot | None = None) -> DirectoryIndex:
    return build_index(snap or snapshot(), TZ)


def qr(cid: str, now: float = NOW) -> Credential:
    return Credential("qr", c.mint_qr(cid, SECRETS[cid], now))


def ble(cid: str, now: float = NOW) -> Credential:
    return Credential("ble", c.mint_ble(cid, SECRETS[cid], now).hex())


def card(number: str) -> Credential:
    return Credential("card", number)


def at(day: int, hour: int, minute: int) -> float:
    """A time in May 2026 in the site's zone; 11 is a Monday."""
    return datetime(2026, 5, day, hour, minute, tzinfo=TZ).timestamp()


def denied(decision: AccessDecision, reason: Reason) -> bool:
    return (not decision.granted and decision.reason == reason and decision.action == "none"
            and decision.floors is None and decision.duration_s == 0)


def test_one_phone_resolves_to_each_kind_of_card() -> None:
    index = index_of()
    at_gate = decide(index, GATE, qr(ALICE_PHONE), NOW)
    assert (at_gate.granted, at_gate.action, at_gate.floors, at_gate.duration_s) == (
        True, "unlock", None, 5)
    assert (at_gate.resident_id, at_gate.credential_ref, at_gate.credential_type) == (
        ALICE, ALICE_PHONE, "qr")
    in_car = decide(index, ELEV_A, ble(ALICE_PHONE), NOW)
    assert (in_car.granted, in_car.action, in_car.floors, in_car.duration_s) == (
        True, "enable_floors", (-1, 1, 12), 10)
    at_till = decide(index, TILL, qr(ALICE_PHONE), NOW)
    assert (at_till.granted, at_till.account, at_till.resident_id) == (True, ALICE, ALICE)


def test_elevator_floors_are_home_plus_public_never_a_neighbours() -> None:
    index = index_of()
    assert decide(index, ELEV_A, qr(BOB_PHONE), NOW).floors == (-1, 1, 5)
    assert decide(index, ELEV_B, qr(CAROL_PHONE), NOW).floors == (1, 8, 20)
    # Alice lives in A: B's car gives her nothing, not even B's public floors.
    assert denied(decide(index, ELEV_B, qr(ALICE_PHONE), NOW), Reason.NOT_PERMITTED)


def test_physical_cards_keep_working_by_kind() -> None:
    index = index_of()
    assert decide(index, GATE, card("G-ALICE"), NOW).credential_ref == "G-ALICE"
    assert decide(index, ELEV_A, card("E-ALICE"), NOW).floors == (-1, 1, 12)
    assert decide(index, TILL, card("C-ALICE"), NOW).account == ALICE
    assert denied(decide(index, ELEV_A, card("G-ALICE"), NOW), Reason.NOT_PERMITTED)
    unknown = decide(index, GATE, card("NOPE"), NOW)
    assert denied(unknown, Reason.UNKNOWN_CARD) and unknown.credential_ref == "NOPE"


def test_building_doors_and_restricted_gates() -> None:
    index = index_of()
    assert decide(index, DOOR_A, qr(BOB_PHONE), NOW).granted
    assert denied(decide(index, DOOR_A, qr(CAROL_PHONE), NOW), Reason.NOT_PERMITTED)
    assert decide(index, GATE, qr(CAROL_PHONE), NOW).granted
    assert denied(decide(index, GYM, qr(ALICE_PHONE), NOW), Reason.NOT_PERMITTED)


def test_token_refusals() -> None:
    index = index_of()
    assert denied(decide(index, GATE, Credential("qr", "hello"), NOW), Reason.INVALID_TOKEN)
    assert denied(decide(index, GATE, Credential("ble", "zz"), NOW), Reason.INVALID_TOKEN)
    # A BLE token's bytes dressed as a QR (and back) are refused: the kind is signed.
    ble_raw = c.mint_ble(ALICE_PHONE, SECRETS[ALICE_PHONE], NOW)
    assert denied(decide(index, GATE, Credential("qr", "SC1." + ble_raw.hex()), NOW),
                  Reason.INVALID_TOKEN)
    stranger = c.new_credential_id()
    forged = c.mint_qr(stranger, c.new_secret(), NOW)
    assert denied(decide(index, GATE, Credential("qr", forged), NOW), Reason.INVALID_TOKEN)
    wrong_key = c.mint_qr(ALICE_PHONE, SECRETS[BOB_PHONE], NOW)
    assert denied(decide(index, GATE, Credential("qr", wrong_key), NOW), Reason.INVALID_TOKEN)
    old = decide(index, GATE, qr(ALICE_PHONE, NOW - 61), NOW)
    assert denied(old, Reason.EXPIRED_TOKEN) and old.credential_ref == ALICE_PHONE
    assert denied(decide(index, GATE, qr(ALICE_PHONE, NOW + 61), NOW), Reason.INVALID_TOKEN)
    # A forged token for a revoked credential says invalid, not revoked: guesses learn nothing.
    guessed = c.mint_qr(LOST_PHONE, c.new_secret(), NOW)
    assert denied(decide(index, GATE, Credential("qr", guessed), NOW), Reason.INVALID_TOKEN)


@pytest.mark.parametrize("credential", [
    # Bytes off the wire: a JSON null, list or number where a string belongs.
    Credential("nfc", "x"), Credential(None, "x"),  # type: ignore[arg-type]
    Credential(["qr"], "x"), Credential("qr", 7),  # type: ignore[arg-type]
    Credential("card", ""), Credential("card", "has space"), Credential("card", "x" * 65),
    Credential("qr", ""), Credential("qr", "SC1." + "A" * 200),
    Credential("card", None),  # type: ignore[arg-type]
])
def test_malformed_requests(credential: Credential) -> None:
    decision = decide(index_of(), GATE, credential, NOW)
    assert denied(decision, Reason.MALFORMED_REQUEST)
    assert decision.credential_type in ("qr", "ble", "card", "invalid")


def test_revocation_is_per_credential_and_move_out_is_total() -> None:
    index = index_of()
    lost = decide(index, GATE, qr(LOST_PHONE), NOW)
    assert denied(lost, Reason.REVOKED) and lost.resident_id == ALICE
    assert decide(index, GATE, qr(ALICE_TABLET), NOW).granted  # her other phone still works
    assert denied(decide(index, GATE, card("G-LOST"), NOW), Reason.REVOKED)
    assert decide(index, GATE, card("G-ALICE"), NOW).granted  # and her other card
    assert denied(decide(index, GATE, qr(GONE_PHONE), NOW), Reason.REVOKED)
    assert denied(decide(index, GATE, card("G-GONE"), NOW), Reason.REVOKED)
    moved = index_of(snapshot(moved_out=[ALICE]))
    for reader in (GATE, ELEV_A, TILL):
        for credential in (qr(ALICE_PHONE), qr(ALICE_TABLET), card("G-ALICE"),
                           card("E-ALICE"), card("C-ALICE")):
            decision = decide(moved, reader, credential, NOW)
            assert not decision.granted and decision.reason in (Reason.REVOKED,
                                                                Reason.NOT_PERMITTED)
    assert denied(decide_for_resident(moved, GATE, ALICE, NOW), Reason.REVOKED)


GYM_HOURS = AccessGroup("g-gym", "gym", gate_ids=("gym",), floors=(("a", 3),),
                        windows=(ScheduleWindow(0, 8 * 60, 18 * 60),), member_ids=(BOB,))


@pytest.mark.parametrize(("when", "reason"), [
    (at(11, 7, 59), Reason.OUTSIDE_SCHEDULE),
    (at(11, 8, 0), None),
    (at(11, 8, 1), None),
    (at(11, 17, 59), None),
    (at(11, 18, 0), Reason.OUTSIDE_SCHEDULE),
    (at(11, 18, 1), Reason.OUTSIDE_SCHEDULE),
    (at(12, 10, 0), Reason.OUTSIDE_SCHEDULE),  # Tuesday
])
def test_schedule_edges_a_minute_before_and_after(when: float, reason: Reason | None) -> None:
    index = index_of(snapshot(groups=[GYM_HOURS]))
    decision = decide(index, GYM, qr(BOB_PHONE, when), when)
    assert decision.granted is (reason is None) and decision.reason == reason
    # The group's floor follows the same window; Bob's home floor does not.
    floors = decide(index, ELEV_A, qr(BOB_PHONE, when), when).floors
    assert floors == ((-1, 1, 3, 5) if reason is None else (-1, 1, 5))


def test_schedule_is_in_site_local_time() -> None:
    index = index_of(snapshot(groups=[GYM_HOURS]))
    utc_eight = datetime(2026, 5, 11, 8, 0, tzinfo=ZoneInfo("UTC")).timestamp()  # 16:00 local
    assert decide(index, GYM, qr(BOB_PHONE, utc_eight), utc_eight).granted
    utc_index = build_index(snapshot(groups=[GYM_HOURS]), ZoneInfo("UTC"))
    early = at(11, 10, 0)  # 02:00 UTC
    assert denied(decide(utc_index, GYM, qr(BOB_PHONE, early), early), Reason.OUTSIDE_SCHEDULE)


def test_only_group_floors_outside_schedule_is_outside_schedule() -> None:
    cleaners = AccessGroup("g-clean", "cleaners", floors=(("b", 9),),
                           windows=(ScheduleWindow(0, 6 * 60, 7 * 60),), member_ids=(ALICE,))
    index = index_of(snapshot(groups=[cleaners]))
    assert denied(decide(index, ELEV_B, qr(ALICE_PHONE), NOW), Reason.OUTSIDE_SCHEDULE)
    early = at(11, 6, 30)
    assert decide(index, ELEV_B, qr(ALICE_PHONE, early), early).floors == (1, 9, 20)


def visitor_pass(**changes: object) -> VisitorPass:
    base = VisitorPass("v-1", BOB, "Dana", VISIT, "a", 5, NOW - 3600, NOW + 3600, 4, 0, NOW - 7200)
    return replace(base, **changes)  # type: ignore[arg-type]


def test_visitor_pass_gates_one_floor_and_window() -> None:
    index = index_of(snapshot(passes=[visitor_pass()]))
    at_gate = decide(index, GATE, qr(VISIT), NOW)
    assert at_gate.granted and at_gate.visitor_pass_id == "v-1" and at_gate.resident_id == BOB
    assert decide(index, DOOR_A, qr(VISIT), NOW).granted  # the issuer's own building
    assert decide(index, ELEV_A, qr(VISIT), NOW).floors == (-1, 1, 5)
    assert denied(decide(index, ELEV_B, qr(VISIT), NOW), Reason.NOT_PERMITTED)
    assert denied(decide(index, TILL, qr(VISIT), NOW), Reason.NOT_PERMITTED)
    assert denied(decide(index, GYM, qr(VISIT), NOW), Reason.NOT_PERMITTED)
    for when in (NOW - 3601, NOW + 3600):
        assert denied(decide(index, GATE, qr(VISIT, when), when), Reason.OUTSIDE_SCHEDULE)


def test_visitor_pass_uses_and_limits() -> None:
    index = index_of(snapshot(passes=[visitor_pass(max_uses=2, uses=1)]))
    assert decide(index, GATE, qr(VISIT), NOW, {"v-1": 1}).granted
    assert denied(decide(index, GATE, qr(VISIT), NOW, {"v-1": 2}), Reason.NOT_PERMITTED)
    only_south = index_of(snapshot(passes=[visitor_pass(gate_ids=("gate-south",))]))
    assert denied(decide(only_south, GATE, qr(VISIT), NOW), Reason.NOT_PERMITTED)
    revoked = index_of(snapshot(passes=[visitor_pass(revoked_at=NOW - 1)]))
    assert denied(decide(revoked, GATE, qr(VISIT), NOW), Reason.REVOKED)
    issuer_gone = index_of(snapshot(passes=[visitor_pass()], moved_out=[BOB]))
    assert denied(decide(issuer_gone, GATE, qr(VISIT), NOW), Reason.REVOKED)


def test_a_visitor_never_gets_more_than_the_issuer() -> None:
    # Bob lives on 5: a pass he issued for floor 9 (someone else's) opens nothing up there.
    index = index_of(snapshot(passes=[visitor_pass(floor=9)]))
    assert denied(decide(index, ELEV_A, qr(VISIT), NOW), Reason.NOT_PERMITTED)
    # A pass naming the gym gate works only while Bob's gym group does.
    gym_pass = visitor_pass(gate_ids=("gym",))
    index = index_of(snapshot(groups=[GYM_HOURS], passes=[gym_pass]))
    assert decide(index, GYM, qr(VISIT), NOW).granted
    evening = at(11, 19, 0)
    late = index_of(snapshot(groups=[GYM_HOURS], passes=[replace(
        gym_pass, valid_until=evening + 60)]))
    assert denied(decide(late, GYM, qr(VISIT, evening), evening), Reason.OUTSIDE_SCHEDULE)


def test_authentic_tokens_carry_what_to_consume_and_nothing_leaks() -> None:
    index = index_of()
    text = c.mint_qr(ALICE_PHONE, SECRETS[ALICE_PHONE], NOW)
    decision = decide(index, GATE, Credential("qr", text), NOW)
    assert decision.consume is not None and decision.consume.credential_id == ALICE_PHONE
    # Denied for rights, still consumed: a token shown anywhere is spent.
    assert decide(index, ELEV_B, Credential("qr", text), NOW).consume is not None
    assert decide(index, GATE, Credential("qr", "SC1.xx"), NOW).consume is None
    assert decide(index, GATE, card("G-ALICE"), NOW).consume is None
    shown = repr(decision) + repr(index.credentials[ALICE_PHONE])
    assert text[4:] not in shown and SECRETS[ALICE_PHONE].hex() not in shown
    assert repr(SECRETS[ALICE_PHONE]) not in shown


def test_remote_decisions_use_the_same_rights() -> None:
    index = index_of()
    assert decide_for_resident(index, ELEV_A, BOB, NOW).floors == (-1, 1, 5)
    assert denied(decide_for_resident(index, ELEV_B, BOB, NOW), Reason.NOT_PERMITTED)
    assert denied(decide_for_resident(index, GATE, "r-nobody", NOW), Reason.REVOKED)


def test_ten_thousand_random_tokens_grant_nothing() -> None:
    index = index_of(snapshot(passes=[visitor_pass()]))
    known = list(SECRETS)
    grants = 0
    for i in range(10_000):
        cid = bytes.fromhex(known[i % len(known)] if i % 2 else c.new_credential_id())
        step = c.time_step(NOW).to_bytes(4, "big")
        if i % 3:
            raw = bytes([1]) + cid + step + secrets.token_bytes(20)
            credential = Credential("qr", c.QR_PREFIX + base64.urlsafe_b64encode(raw)
                                    .rstrip(b"=").decode())
        else:
            raw = bytes([2]) + cid + step + secrets.token_bytes(10)
            credential = Credential("ble", raw.hex())
        reader = (GATE, DOOR_A, ELEV_A, ELEV_B, TILL, GYM)[i % 6]
        decision = decide(index, reader, credential, NOW)
        grants += decision.granted
        assert decision.reason == Reason.INVALID_TOKEN
    assert grants == 0


def test_reader_validation() -> None:
    with pytest.raises(ValueError, match="kind"):
        Reader("x", "door")
    with pytest.raises(ValueError, match="building_id"):
        Reader("x", "elevator")
    assert Reader("gate-1", "gate").gate_ids == frozenset({"gate-1"})
