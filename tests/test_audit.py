"""The hash-chained audit log, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, MetaData, delete, func, insert, select, text, update
from typer.testing import CliRunner

from device_drivers.tokens import mint_qr
from device_drivers.vocabulary import Credential, Reason
from gateway.access.audit import (
    GENESIS_HASH,
    AuditEntry,
    AuditError,
    AuditLog,
    ChainCheck,
    append_entries,
    audit_log,
    chain_hash,
    verify,
)
from gateway.access.decision import AccessDecision, Reader, decide
from gateway.access.index import build_index
from gateway.app.cli_audit import app as audit_app
from gateway.store import directory as d
from gateway.store.db import make_engine, upgrade

GRANT = AccessDecision(True, "enable_floors", (1, 12), None, 5, "r-1", "c-1", "qr")
DENY = AccessDecision(False, "none", None, Reason.REVOKED, 0, "r-2", "c-2", "ble")


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    upgrade(database_url)
    eng = make_engine(database_url)
    yield eng
    eng.dispose()


def entry(i: int, granted: bool = True) -> AuditEntry:
    return AuditEntry(
        ts=1_763_800_000.0 + i / 8, device_id=f"gate-{i % 3}", device_kind="gate",
        granted=granted, action="unlock" if granted else "none",
        reason=None if granted else "not_permitted", credential_type="card",
        credential_ref=f"card-{i}", resident_id=f"r-{i % 7}", request_id=f"req-{i}",
    )


def fill(engine: Engine, n: int) -> None:
    with engine.begin() as conn:
        append_entries(conn, [entry(i, granted=i % 2 == 0) for i in range(n)])


def check(engine: Engine, anchor: tuple[int, str] | None = None) -> ChainCheck:
    with engine.connect() as conn:
        return verify(conn, anchor=anchor)


def count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(audit_log)).scalar_one())


def test_migration_matches_the_table_definition(engine: Engine) -> None:
    only_audit = MetaData()
    audit_log.to_metadata(only_audit)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = [d for d in compare_metadata(context, only_audit)
                if "audit_log" in repr(d)]
    assert diff == []


async def test_decisions_are_written_in_order_with_what_was_decided(engine: Engine) -> None:
    async with AuditLog(engine) as audit:
        audit.record_decision("elev-b1-1", "elevator", GRANT, 100.0, request_id="r-1")
        audit.record_decision("gate-north", "gate", DENY, 101.0)
    with engine.connect() as conn:
        rows = conn.execute(select(audit_log).order_by(audit_log.c.id)).mappings().all()
    assert [r["id"] for r in rows] == [1, 2]
    first, second = rows
    assert (first["device_id"], first["device_kind"], first["granted"], first["action"]) == (
        "elev-b1-1", "elevator", True, "enable_floors")
    assert (first["floors"], first["credential_ref"], first["resident_id"]) == (
        "[1, 12]", "c-1", "r-1")
    assert (first["request_id"], first["ts"]) == ("r-1", 100.0)
    assert (second["granted"], second["reason"], second["credential_type"]) == (
        False, "revoked", "ble")
    assert first["prev_hash"] == GENESIS_HASH
    assert second["prev_hash"] == first["row_hash"]
    result = check(engine)
    assert result.ok and result.rows == 2 and result.head_id == 2
    assert result.head_hash == second["row_hash"]


async def test_a_real_decision_is_logged_without_its_token_or_secret(engine: Engine) -> None:
    with engine.begin() as conn:
        d.upsert_building(conn, d.Building("b1", "Building 1"),
                          [d.Floor("b1", 1, public=True), d.Floor("b1", 12)])
        d.create_unit(conn, "b1-1201", "b1", 12)
        d.create_resident(conn, "b1-1201", "Wang Fang", "owner", resident_id="r-1")
        enrolled = d.enrol_phone_credential(conn, "r-1")
    with engine.connect() as conn:
        index = build_index(d.load_snapshot(conn))
    cid, secret = enrolled.credential.credential_id, enrolled.secret
    now = time.time()
    token = mint_qr(cid, secret, now)
    lift = Reader("elev-b1-1", "elevator", "b1")
    granted = decide(index, lift, Credential("qr", token), now)
    forged = decide(index, lift, Credential("qr", mint_qr(cid, b"x" * 32, now)), now)
    assert granted.granted and not forged.granted
    async with AuditLog(engine) as audit:
        audit.record_decision("elev-b1-1", "elevator", granted, now, request_id="q-1")
        audit.record_decision("elev-b1-1", "elevator", forged, now, request_id="q-2")
    with engine.connect() as conn:
        rows = conn.execute(select(audit_log).order_by(audit_log.c.id)).mappings().all()
    ok, bad = rows
    assert (ok["granted"], ok["action"], ok["floors"]) == (True, "enable_floors", "[1, 12]")
    assert (ok["credential_type"], ok["credential_ref"], ok["resident_id"]) == ("qr", cid, "r-1")
    assert (bad["granted"], bad["reason"], bad["resident_id"]) == (False, "invalid_token", None)
    stored = " ".join(str(v) for row in rows for v in row.values())
    assert token not in stored and token[4:24] not in stored
    assert secret.hex() not in stored


async def test_clean_shutdown_writes_everything_pending(engine: Engine) -> None:
    audit = AuditLog(engine, flush_interval_s=3600, batch_size=10_000)
    async with audit:
        for i in range(1200):
            audit.record(entry(i))
        assert count(engine) == 0  # nothing is written on the hot path
    assert audit.pending == 0 and audit.written == 1200
    assert count(engine) == 1200
    assert check(engine).ok
    with pytest.raises(AuditError, match="closed"):
        audit.record(entry(0))


async def test_a_full_batch_is_written_without_waiting_for_the_interval(engine: Engine) -> None:
    audit = AuditLog(engine, flush_interval_s=3600, batch_size=10)
    async with audit:
        for i in range(25):
            audit.record(entry(i))
        async with asyncio.timeout(20):
            while audit.written < 20:
                await asyncio.sleep(0.01)
        assert count(engine) >= 20
    assert count(engine) == 25


async def test_the_interval_flushes_a_trickle(engine: Engine) -> None:
    audit = AuditLog(engine, flush_interval_s=0.05, batch_size=1000)
    async with audit:
        audit.record(entry(1))
        async with asyncio.timeout(20):
            while count(engine) < 1:
                await asyncio.sleep(0.02)


async def test_failed_writes_are_retried_and_nothing_is_lost_or_doubled(engine: Engine) -> None:
    audit = AuditLog(engine, flush_interval_s=0.01, retry_max_s=0.05)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_log RENAME TO audit_log_away"))
    async with audit:
        for i in range(30):
            audit.record(entry(i))
        async with asyncio.timeout(20):
            while audit.write_errors < 2:
                await asyncio.sleep(0.01)
        assert audit.pending == 30
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE audit_log_away RENAME TO audit_log"))
    assert audit.pending == 0
    with engine.connect() as conn:
        refs = conn.execute(select(audit_log.c.request_id).order_by(audit_log.c.id)).scalars()
        assert list(refs) == [f"req-{i}" for i in range(30)]
    assert check(engine).ok


async def test_a_decisions_own_failed_write_is_retried_by_the_writer_and_closed_with_it(
    engine: Engine,
) -> None:
    audit = AuditLog(engine, flush_interval_s=0.01, retry_max_s=0.05)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_log RENAME TO audit_log_away"))
    async with audit:
        assert await audit.commit(entry(0)) is None  # not recorded in time: from memory
        async with asyncio.timeout(20):
            while audit.write_errors < 1:  # the writer has the batch now
                await asyncio.sleep(0.01)
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE audit_log_away RENAME TO audit_log"))
    left = asyncio.all_tasks() - {asyncio.current_task()}
    assert left == set()  # nothing the audit log started outlives it
    assert count(engine) == 1 and check(engine).ok


async def test_shutdown_with_the_database_gone_says_how_much_was_not_written(
    engine: Engine,
) -> None:
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_log RENAME TO audit_log_away"))
    audit = AuditLog(engine, flush_interval_s=0.01, retry_max_s=0.02, shutdown_attempts=2)
    with pytest.raises(AuditError, match="3 audit entries"):
        async with audit:
            for i in range(3):
                audit.record(entry(i))


async def test_two_writers_on_one_database_extend_one_chain(database_url: str) -> None:
    upgrade(database_url)
    engines = [make_engine(database_url), make_engine(database_url)]
    try:
        async with AuditLog(engines[0], batch_size=7) as a, AuditLog(engines[1], batch_size=5) as b:
            for i in range(200):
                (a if i % 2 else b).record(entry(i))
                if i % 20 == 0:
                    await asyncio.sleep(0.01)
        # The table lock queues the second writer; without it one would hit the primary key.
        assert a.write_errors == b.write_errors == 0
        assert count(engines[0]) == 200
        result = check(engines[0])
        assert result.ok and result.rows == 200
    finally:
        for eng in engines:
            eng.dispose()


def test_an_edited_row_is_named(engine: Engine) -> None:
    fill(engine, 6)
    with engine.begin() as conn:
        # Row 4 was a denial; the edit turns it into a grant.
        conn.execute(update(audit_log).where(audit_log.c.id == 4).values(granted=True,
                                                                       reason=None))
    result = check(engine)
    assert not result.ok and result.first_bad_id == 4 and "edited" in (result.problem or "")
    assert result.rows == 3


def test_a_deleted_row_is_named(engine: Engine) -> None:
    fill(engine, 6)
    with engine.begin() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.id == 3))
    result = check(engine)
    assert not result.ok and result.first_bad_id == 4
    assert "row 3 is missing" in (result.problem or "")


def test_a_deleted_first_row_is_named(engine: Engine) -> None:
    fill(engine, 3)
    with engine.begin() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.id == 1))
    result = check(engine)
    assert not result.ok and result.first_bad_id == 2


def _row(engine: Engine, row_id: int) -> dict[str, object]:
    with engine.connect() as conn:
        return dict(conn.execute(select(audit_log).where(audit_log.c.id == row_id))
                    .mappings().one())


def test_an_inserted_row_is_named_even_with_a_correct_hash(engine: Engine) -> None:
    fill(engine, 5)
    prev = _row(engine, 2)
    with engine.begin() as conn:
        # Make room after row 2 by renumbering, then insert a forged row chained onto it.
        for row_id in (5, 4, 3):
            conn.execute(update(audit_log).where(audit_log.c.id == row_id).values(id=row_id + 1))
        forged = entry(99).content(3)
        conn.execute(insert(audit_log).values(
            **forged, prev_hash=prev["row_hash"], row_hash=chain_hash(str(prev["row_hash"]),
                                                                     forged)))
    result = check(engine)
    assert not result.ok and result.first_bad_id == 4  # the first row after the forgery


def test_an_appended_forged_row_is_named(engine: Engine) -> None:
    fill(engine, 4)
    head = _row(engine, 4)
    with engine.begin() as conn:
        conn.execute(insert(audit_log).values(
            **entry(50).content(5), prev_hash=head["row_hash"], row_hash="f" * 64))
    result = check(engine)
    assert not result.ok and result.first_bad_id == 5


def test_deleting_the_newest_rows_is_caught_by_an_anchor(engine: Engine) -> None:
    fill(engine, 5)
    before = check(engine)
    assert before.ok and before.head_id == 5 and before.head_hash is not None
    anchor = (before.head_id, before.head_hash)
    fill(engine, 2)  # the log grows after the anchor was noted: still fine
    assert check(engine, anchor).ok
    with engine.begin() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.id >= 5))
    assert check(engine).ok  # the chain alone cannot see a cut tail...
    result = check(engine, anchor)
    assert not result.ok and result.first_bad_id == 5  # ...the anchor can


def test_empty_log_verifies(engine: Engine) -> None:
    result = check(engine)
    assert result.ok and result.rows == 0 and result.head_id is None


def test_over_long_values_are_cut_rather_than_failing_the_batch(engine: Engine) -> None:
    long = AuditEntry(ts=1.0, device_id="gate-1", device_kind="gate", granted=False,
                      action="none", reason="malformed_request", request_id="x" * 1000)
    fill(engine, 1)
    with engine.begin() as conn:
        append_entries(conn, [long])
    assert _row(engine, 2)["request_id"] == "x" * 128
    assert check(engine).ok


def _cli() -> typer.Typer:
    root = typer.Typer()
    root.add_typer(audit_app, name="audit")  # as the lead mounts it under `scgw`
    return root


def test_cli_verify_exit_codes(engine: Engine, database_url: str, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./site.yaml: the URL must be given explicitly
    fill(engine, 4)
    runner = CliRunner()
    ok = runner.invoke(_cli(), ["audit", "verify", "--database-url", database_url])
    assert ok.exit_code == 0, ok.output
    assert "OK: 4 rows" in ok.output
    head = ok.output.strip().rsplit("head ", 1)[1]
    anchored = runner.invoke(_cli(), ["audit", "verify", "--anchor", head],
                             env={"SCGW__DATABASE__URL": database_url})
    assert anchored.exit_code == 0, anchored.output
    with engine.begin() as conn:
        conn.execute(update(audit_log).where(audit_log.c.id == 2).values(device_id="gate-x"))
    broken = runner.invoke(_cli(), ["audit", "verify"], env={"SCGW__DATABASE__URL": database_url})
    assert broken.exit_code == 1
    assert "BROKEN at row 2" in broken.output
    bad_anchor = runner.invoke(_cli(), ["audit", "verify", "--database-url", database_url,
                                        "--anchor", "nonsense"])
    assert bad_anchor.exit_code == 2


def test_cli_verify_without_a_database_or_table(tmp_path: Path, database_url: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    missing = runner.invoke(_cli(), ["audit", "verify", "--database-url",
                                     f"sqlite:///{tmp_path}/nothing.db"])
    assert missing.exit_code == 2 and "no database" in missing.output
    assert not (tmp_path / "nothing.db").exists()
    eng = make_engine(database_url)
    with eng.begin() as conn:
        conn.execute(text("CREATE TABLE other (x INTEGER)"))
    eng.dispose()
    no_table = runner.invoke(_cli(), ["audit", "verify", "--database-url", database_url])
    assert no_table.exit_code == 2 and "db upgrade" in no_table.output


def test_cli_verify_reads_the_site_files_database(
    engine: Engine, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check must read the database the gateway writes: the site file's, not a default."""
    fill(engine, 3)
    tmp_path = tmp_path / "cwd"  # beside the fixture's scgw.db, not on it
    tmp_path.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SCGW__DATABASE__URL", raising=False)
    runner = CliRunner()
    nothing = runner.invoke(_cli(), ["audit", "verify"])
    assert nothing.exit_code == 2
    assert "site.yaml: no such site file; give --config FILE, or --database-url" in nothing.output
    assert list(tmp_path.iterdir()) == []
    site = tmp_path / "elsewhere.yaml"
    site.write_text(f"site: {{id: s}}\ndatabase: {{url: '{database_url}'}}\n")
    named = runner.invoke(_cli(), ["audit", "verify", "--config", str(site)])
    assert named.exit_code == 0 and "OK: 3 rows" in named.output, named.output
    site.rename(tmp_path / "site.yaml")
    default = runner.invoke(_cli(), ["audit", "verify"])
    assert default.exit_code == 0 and "OK: 3 rows" in default.output, default.output
    overridden = runner.invoke(_cli(), ["audit", "verify", "-c", "site.yaml", "--database-url",
                                        f"sqlite:///{tmp_path}/none.db"])
    assert overridden.exit_code == 2 and "no database" in overridden.output
    (tmp_path / "site.yaml").write_text("site: {id: Not Valid}\n")
    invalid = runner.invoke(_cli(), ["audit", "verify"])
    assert invalid.exit_code == 2 and "line 1: site.id" in invalid.output
