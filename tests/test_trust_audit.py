"""Issue 11, the audit log: nothing lost unseen.

Every entry carries its gateway's instance id and sequence number; `scgw audit verify`
reports numbers that never arrived, in the middle or at the end of a dead gateway's run.
The writer survives a locked database: the decision is answered from memory, its entry goes
to the spill file first and reaches the log later, or after a crash, from the next start.
Staff actions on cards are in the log with who did them.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, insert, select
from typer.testing import CliRunner

from gateway.access import spent
from gateway.access.audit import AuditEntry, AuditLog, append_entries, audit_log, verify
from gateway.access.enrolment import issue_card_audited
from gateway.access.presence import gateway_uptime
from gateway.access.spent import ClaimOutcome, TokenClaim, spent_tokens
from gateway.app.cli_audit import app as audit_app
from gateway.store import directory as d
from gateway.store.db import make_engine, upgrade
from tests.test_directory_store import seed_site


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    upgrade(database_url)
    eng = make_engine(database_url)
    yield eng
    eng.dispose()


def entry(i: int, instance: str | None = "gw-a", seq: int | None = None) -> AuditEntry:
    return AuditEntry(ts=1_800_000_000.0 + i, device_id="gate-north", device_kind="gate",
                      granted=True, action="unlock", credential_type="card",
                      credential_ref=f"card-{i}", request_id=f"req-{i}", gw_instance=instance,
                      gw_seq=seq if seq is not None else (i if instance else None))


def test_a_gap_in_a_gateways_sequence_is_reported(engine: Engine, database_url: str,
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with engine.begin() as conn:
        append_entries(conn, [entry(1), entry(2), entry(4), entry(5), entry(9)])
        append_entries(conn, [entry(10, instance=None)])  # a staff action: not numbered
    with engine.connect() as conn:
        result = verify(conn)
    # The hash chain is intact: rows were never written, not deleted afterwards.
    assert not result.ok and result.first_bad_id is None and result.rows == 6
    assert result.gaps == ("gateway gw-a: 4 decision(s) missing, seq 3, 6-8",)
    monkeypatch.chdir(tmp_path)
    cli = CliRunner().invoke(audit_app, ["verify", "--database-url", database_url])
    assert cli.exit_code == 1
    assert "MISSING" in cli.output and "seq 3, 6-8" in cli.output


def test_decisions_lost_at_the_end_of_a_dead_gateway_are_reported(engine: Engine) -> None:
    now = time.time()
    with engine.begin() as conn:
        append_entries(conn, [entry(1), entry(2), entry(1, instance="gw-b")])
        conn.execute(insert(gateway_uptime), [
            # gw-a said it had numbered 4 decisions, then stopped beating long ago.
            {"instance_id": "gw-a", "segment": 1, "started_at": now - 900,
             "alive_at": now - 600, "seq_assigned": 4},
            # gw-b is alive: what it numbered may still be on its way to the log.
            {"instance_id": "gw-b", "segment": 1, "started_at": now - 900, "alive_at": now,
             "seq_assigned": 7},
        ])
    with engine.connect() as conn:
        result = verify(conn, now=now)
    assert result.gaps == ("gateway gw-a: 2 decision(s) missing, seq 3-4",)


async def test_a_commit_is_in_the_log_before_it_returns_and_spends_its_token_once(
    engine: Engine,
) -> None:
    async with AuditLog(engine, flush_interval_s=3600) as a, AuditLog(engine) as b:
        token = TokenClaim("qr:c1:1:aa", 30.0, "gate-north", "gate-north/r-1")
        first = await a.commit(entry(1, instance=None), token)
        assert first is not None and first.outcome is ClaimOutcome.FRESH
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(audit_log)).scalar_one() == 1
        # Another process, another reader: the same token is a replay, and logged as such.
        again = TokenClaim("qr:c1:1:aa", 30.0, "gate-south", "gate-south/r-2")
        second = await b.commit(entry(2, instance=None), again)
        assert second is not None and second.outcome is ClaimOutcome.SPENT
        assert (second.entry.granted, second.entry.reason) == (False, "replayed_token")
        # The very same request seen by a second gateway on the same broker: stay silent.
        peer = await b.commit(entry(3, instance=None), token)
        assert peer is not None and peer.outcome is ClaimOutcome.PEER
    with engine.connect() as conn:
        assert verify(conn).ok
        assert conn.execute(select(func.count()).select_from(spent_tokens)).scalar_one() == 1


async def test_a_locked_database_falls_back_to_memory_and_the_spill_file_survives_a_crash(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'gw.db'}"
    upgrade(url)
    engine = make_engine(url)
    spill = tmp_path / "spill"
    # Another writer holds the database's write lock (a long transaction, a stuck tool).
    blocker = sqlite3.connect(tmp_path / "gw.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    audit = AuditLog(engine, spill_dir=spill, lock_wait_s=0.05, commit_timeout_s=0.5,
                     retry_max_s=0.05, shutdown_attempts=1)
    try:
        async with audit:
            started = time.monotonic()
            claim = TokenClaim("qr:c1:2:bb", 60.0, "gate-north", "gate-north/r-9")
            assert await audit.commit(entry(7, instance=None), claim) is None  # from memory
            assert time.monotonic() - started < 0.5
            audit.record(entry(8, instance=None))
            await asyncio.sleep(0.2)
            spilled = spill / f"{audit.instance_id}.jsonl"
            at_crash = spilled.read_bytes()
            lines = [json.loads(line) for line in at_crash.splitlines()]
            assert [line["entry"]["request_id"] for line in lines] == ["req-7", "req-8"]
            assert lines[0]["claim"]["token_key"] == "qr:c1:2:bb"
            # The process dies here: nothing it holds in memory survives, the file does.
            audit._stop.set()
            audit._pending.clear()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    spilled.write_bytes(at_crash)  # as the crash left it (the clean exit above emptied it)
    async with AuditLog(engine, spill_dir=spill) as restarted:
        assert restarted.replayed == 2
    with engine.connect() as conn:
        rows = conn.execute(select(audit_log.c.request_id, audit_log.c.gw_seq)
                            .order_by(audit_log.c.id)).all()
        assert spent.is_spent(conn, "qr:c1:2:bb")
        assert verify(conn).ok
    assert rows == [("req-7", 1), ("req-8", 2)]
    assert list(spill.glob("*.jsonl")) == []
    engine.dispose()


def test_a_card_enrolled_by_staff_is_audited_with_the_actor(engine: Engine) -> None:
    with engine.begin() as conn:
        seed_site(conn)
        issue_card_audited(conn, "r-alice", "canteen", "C-9001", actor="staff-wu", now=1e9)
        issue_card_audited(conn, "r-alice", "canteen", "C-9001", actor="staff-wu")  # again
    with pytest.raises(d.Conflict), engine.begin() as conn:
        issue_card_audited(conn, "r-bob", "canteen", "C-9001", actor="staff-li")
    with engine.connect() as conn:
        rows = conn.execute(select(audit_log.c.actor, audit_log.c.action,
                                   audit_log.c.resident_id, audit_log.c.credential_ref)).all()
        assert verify(conn).ok
    assert rows == [("staff-wu", "enrol_card", "r-alice", "C-9001")]


def test_spent_tokens_are_kept_as_long_as_an_upload_could_bring_them_back(
    engine: Engine,
) -> None:
    now = 1_800_000_000.0
    with engine.begin() as conn:
        for i, age in enumerate((10.0, 7 * 86400.0, spent.RETAIN_S + 120, spent.RETAIN_S + 9e5)):
            spent.claim(conn, TokenClaim(f"qr:c:{i}:00", now - age, "gate-north", f"g/{i}"),
                        now)
        assert spent.prune(conn, now) == 2
        kept = set(conn.execute(select(spent_tokens.c.token_key)).scalars())
    assert kept == {"qr:c:0:00", "qr:c:1:00"}


async def test_while_another_writer_holds_sqlite_decisions_go_out_and_spent_tokens_stay_spent(
    tmp_path: Path,
) -> None:
    """The telemetry worker's rollups hold SQLite's write lock for tens of milliseconds at a
    time. Decisions do not wait for it: a fresh token goes out spilled (written to the store
    once the lock is free), a spent one is refused from a read, which needs no lock."""
    url = f"sqlite:///{tmp_path / 'gw.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        async with AuditLog(engine, spill_dir=tmp_path / "spill", lock_wait_s=3.0,
                            commit_timeout_s=5.0) as audit:
            used = TokenClaim("qr:a:1:00", 30.0, "gate-north", "gate-north/r-1")
            first = await audit.commit(entry(1, instance=None), used)
            assert first is not None and first.outcome is ClaimOutcome.FRESH
            blocker = sqlite3.connect(tmp_path / "gw.db", isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            try:
                started = time.monotonic()
                fresh = TokenClaim("qr:b:1:00", 30.0, "gate-north", "gate-north/r-2")
                assert await audit.commit(entry(2, instance=None), fresh) is None
                again = await audit.commit(entry(3, instance=None),
                                           TokenClaim("qr:a:1:00", 30.0, "gate-south",
                                                      "gate-south/r-3"))
                assert again is not None and again.outcome is ClaimOutcome.SPENT
                assert (again.entry.granted, again.entry.reason) == (False, "replayed_token")
                assert time.monotonic() - started < 1.0  # nobody waited for the lock
                assert audit.busy_releases == 1
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            while audit.pending:
                await asyncio.sleep(0.02)
        with engine.connect() as conn:
            rows = conn.execute(select(audit_log.c.request_id, audit_log.c.granted)
                                .order_by(audit_log.c.id)).all()
            assert spent.is_spent(conn, "qr:b:1:00")
            assert verify(conn).ok
        assert rows == [("req-1", True), ("req-2", True), ("req-3", False)]
    finally:
        engine.dispose()
