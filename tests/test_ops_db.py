"""`scgw db backup` / `scgw db restore` against real SQLite and PostgreSQL.

A backup taken while payments and audit rows are being written is a consistent snapshot
(the ledger balances, the audit chain verifies, nothing half-written), restores into a
fresh database, and a quiescent one restores to exactly the same rows.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, MetaData, select, text
from typer.testing import CliRunner

from gateway.access.audit import AuditEntry, append_entries, verify
from gateway.app.cli import app
from gateway.canteen import reports
from gateway.canteen.ledger import Ledger
from gateway.canteen.tables import canteen_journal
from gateway.store import db
from tests.servers import Postgres

RESIDENTS = [f"r-{n}" for n in range(5)]


def _fresh(database_url: str, request: pytest.FixtureRequest, tmp_path: Path, name: str) -> str:
    """A second, empty database of the same kind as `database_url`."""
    if db.is_sqlite(database_url):
        return f"sqlite:///{tmp_path / f'{name}.db'}"
    server: Postgres = request.getfixturevalue("postgres")
    return server.create_database()


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _rows(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows, in primary-key order: the whole store, for comparison."""
    meta = MetaData()
    meta.reflect(engine)
    out = {}
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            order = list(table.primary_key.columns) or list(table.columns)
            out[table.name] = [tuple(r) for r in conn.execute(select(table).order_by(*order))]
    return out


def _balances(engine: Engine) -> dict[str, int]:
    ledger = Ledger(engine)
    return {r: ledger.balance(r) for r in RESIDENTS}


class Shop:
    """Payments and access decisions written continuously, like a busy gateway."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.ledger = engine, Ledger(engine)
        self.stop = threading.Event()
        self.count = 0
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="shop")

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                n = self.count
                resident = RESIDENTS[n % len(RESIDENTS)]
                self.ledger.pay("till-1", f"t-{n}", 100 + n % 7, resident, time.time())
                with self.engine.begin() as conn:
                    append_entries(conn, [AuditEntry(
                        ts=time.time(), device_id="gate-1", device_kind="gate", granted=True,
                        action="unlock", resident_id=resident, gw_instance="test", gw_seq=n)])
                self.count += 1
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)

    def __enter__(self) -> Shop:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.errors, self.errors


def _sound(engine: Engine) -> None:
    with engine.connect() as conn:
        assert reports.audit(conn) == []  # every journal balances, cached == entries
        assert verify(conn).ok
        txns = sorted(int(t[2:]) for t in conn.execute(
            select(canteen_journal.c.txn_id).where(canteen_journal.c.kind == "payment"))
            .scalars())
        audited = sorted(conn.execute(text("SELECT gw_seq FROM audit_log")).scalars())
    # a prefix of what was written: nothing half-written, no hole
    assert txns == list(range(len(txns)))
    assert audited == list(range(len(audited)))


def test_backup_while_paying_restores_into_a_fresh_database(
    database_url: str, request: pytest.FixtureRequest, tmp_path: Path,
) -> None:
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    try:
        ledger = Ledger(engine)
        for resident in RESIDENTS:
            ledger.topup(resident, 1_000_000, f"welcome-{resident}")
        live = tmp_path / "live.backup"
        with Shop(engine) as shop:
            deadline = time.monotonic() + 60
            while shop.count < 30 and time.monotonic() < deadline and not shop.errors:
                time.sleep(0.05)
            code, output = _cli("db", "backup", str(live), "--database-url", database_url)
            assert code == 0, output
            written_during = shop.count
            while shop.count < written_during + 20 and time.monotonic() < deadline \
                    and not shop.errors:
                time.sleep(0.05)  # the shop went on writing after the backup
        assert f"to {live}" in output

        restored_url = _fresh(database_url, request, tmp_path, "restored")
        code, output = _cli("db", "restore", str(live), "--database-url", restored_url)
        assert code == 0, output
        assert "scgw db upgrade" in output
        restored = db.make_engine(restored_url)
        try:
            _sound(restored)
            assert len(_rows(restored)["audit_log"]) < shop.count  # a snapshot, not the end
            assert db.current_revision(restored_url) == db.current_revision(database_url)
        finally:
            restored.dispose()  # else the restore below refuses: the database is in use

        # Quiescent now: a second backup restores to exactly the same store.
        final = tmp_path / "final.backup"
        assert _cli("db", "backup", str(final), "--database-url", database_url)[0] == 0
        code, output = _cli("db", "restore", str(final), "--database-url", restored_url)
        assert code == 0, output
        restored = db.make_engine(restored_url)
        try:
            assert _balances(restored) == _balances(engine)
            assert _rows(restored) == _rows(engine)
        finally:
            restored.dispose()
    finally:
        engine.dispose()


def test_restore_refuses_a_database_in_use_and_a_newer_backup(
    database_url: str, request: pytest.FixtureRequest, tmp_path: Path,
) -> None:
    db.upgrade(database_url)
    backup = tmp_path / "site.backup"
    assert _cli("db", "backup", str(backup), "--database-url", database_url)[0] == 0

    target_url = _fresh(database_url, request, tmp_path, "target")
    db.upgrade(target_url)
    with _holding_open(target_url):  # like a running gateway
        code, output = _cli("db", "restore", str(backup), "--database-url", target_url)
    assert code == 1
    assert "restore refused" in output and "in use by" in output and "--force" in output
    if not db.is_sqlite(target_url):
        assert "(scgw from 127.0.0.1" in output  # the gateway's sessions carry our name
    # At once after the holder stopped, as an operator runs it after `systemctl stop
    # scgw`: PostgreSQL backends exit a moment after their client; that is no refusal.
    code, output = _cli("db", "restore", str(backup), "--database-url", target_url)
    assert code == 0, output

    newer = tmp_path / "newer.backup"
    _backup_claiming_revision(database_url, newer, "ffffffffffff")
    code, output = _cli("db", "restore", str(newer), "--database-url", target_url)
    assert code == 1
    assert "ffffffffffff is unknown to this scgw" in output and "newer version" in output


@contextlib.contextmanager
def _holding_open(url: str) -> Iterator[None]:
    """Another process with the database open and idle, as a running gateway has it."""
    code = ("import sys; from gateway.store import db; e = db.make_engine(sys.argv[1]); "
            "c = e.connect(); c.exec_driver_sql('SELECT 1'); c.commit(); print('ready', "
            "flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, url], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        yield
    finally:
        holder.kill()
        holder.wait()


def _backup_claiming_revision(database_url: str, file: Path, revision: str) -> None:
    """A backup as a newer scgw would write it: a schema revision this version lacks."""
    stamped = db.make_engine(database_url)
    try:
        with stamped.begin() as conn:
            old = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
            conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
        try:
            assert _cli("db", "backup", str(file), "--database-url", database_url)[0] == 0
        finally:
            with stamped.begin() as conn:
                conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": old})
    finally:
        stamped.dispose()


def test_an_older_backup_is_restored_then_upgraded(
    database_url: str, request: pytest.FixtureRequest, tmp_path: Path,
) -> None:
    """The upgrade path of docs/deploy.md: a backup at an older revision, restored over the
    current schema, then `scgw db upgrade` migrates it."""
    db.upgrade(database_url, "0003_ledger")
    old = tmp_path / "old.backup"
    assert _cli("db", "backup", str(old), "--database-url", database_url)[0] == 0
    target_url = _fresh(database_url, request, tmp_path, "current")
    db.upgrade(target_url)
    code, output = _cli("db", "restore", str(old), "--database-url", target_url)
    assert code == 0, output
    assert db.current_revision(target_url) == db.current_revision(database_url)
    code, output = _cli("db", "upgrade", "--database-url", target_url)
    assert code == 0, output
    engine = db.make_engine(target_url)
    try:
        assert "audit_log" in _rows(engine)  # created by a later migration
    finally:
        engine.dispose()
    if db.is_sqlite(target_url):
        path = target_url.split("///", 1)[1]
        assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone() == ("ok",)
