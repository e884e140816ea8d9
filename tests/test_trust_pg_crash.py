"""Issue 11: a kill -9 of the PostgreSQL server itself, fsync on, loses no approved payment.

The shared test cluster runs with fsync off for speed; this one runs as in production
(fsync and synchronous_commit on). Four threads pay through the ledger as the gateway's
canteen worker does; every payment answered as approved is one whose transaction has
committed. In the middle, every process of the server gets SIGKILL at once (no shutdown
checkpoint, no flushing); it is restarted, recovers from its WAL, and the payers carry on.
Afterwards every approved answer is in the ledger exactly once, and the ledger balances.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.pool import NullPool

from gateway.canteen.ledger import Ledger
from gateway.canteen.tables import canteen_journal, canteen_payments
from gateway.store.db import make_engine, upgrade
from simulators.demo.broker import wait_for_port
from tests.servers import Postgres

ACCOUNTS = [f"crash-r{i}" for i in range(4)]


class DurablePostgres(Postgres):
    """A cluster with fsync on, that can be killed like a power cut and started again."""

    def _options(self) -> str:
        return (f"-p {self.port} -k {self.tmp} -c listen_addresses=127.0.0.1 "
                "-c fsync=on -c synchronous_commit=on -c full_page_writes=on")

    def start(self) -> None:
        self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8")
        self.boot()

    def boot(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-o", self._options(), "-w", "-l",
                  str(Path(self.tmp) / "log"), "start")
        wait_for_port("127.0.0.1", self.port)

    def kill9(self) -> int:
        """SIGKILL the postmaster and every backend at once; returns how many died."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        victims = [postmaster, *_children(postmaster)]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in victims):
            assert time.monotonic() < deadline, "postgres did not die"
            time.sleep(0.02)
        # A container's init may never reap the dead postmaster, and its zombie keeps the
        # PID "running" for postgres's stale-lock check; after a real crash and reboot that
        # PID is gone, which removing the stale lock file stands for.
        (self.data / "postmaster.pid").unlink()
        for stale in Path(self.tmp).glob(f".s.PGSQL.{self.port}*"):  # the socket and its lock
            stale.unlink()
        return len(victims)


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == parent:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


def test_a_killed_postgres_server_loses_no_approved_payment(tmp_path: Path) -> None:
    server = DurablePostgres()
    server.start()
    try:
        url = server.create_database()
        upgrade(url)
        setup = Ledger(make_engine(url))
        for account in ACCOUNTS:
            setup.topup(account, 10_000_000, f"crash-topup-{account}")
        setup.engine.dispose()
        approved: dict[tuple[str, str], int] = {}
        failed: list[str] = []
        stop = threading.Event()
        lock = threading.Lock()

        def pay(worker: int) -> None:
            engine = make_engine(url, poolclass=NullPool)
            ledger = _ledger_when_up(engine, stop)
            n = 0
            try:
                while not stop.is_set() and ledger is not None:
                    n += 1
                    terminal, txn = f"pos-{worker}", f"w{worker}-{n}"
                    try:
                        result = ledger.pay(terminal, txn, 100 + n % 50, ACCOUNTS[worker],
                                            time.time())
                    except Exception as exc:  # the server is down: the terminal retries later
                        with lock:
                            failed.append(type(exc).__name__)
                        time.sleep(0.05)
                        continue
                    if result.approved:
                        with lock:
                            approved[(terminal, txn)] = 100 + n % 50
            finally:
                engine.dispose()

        threads = [threading.Thread(target=pay, args=(w,), name=f"payer-{w}") for w in range(4)]
        for thread in threads:
            thread.start()
        _wait_for(lambda: len(approved) >= 200, 30)
        before = len(approved)
        assert server.kill9() >= 2
        time.sleep(0.3)  # the payers hit the dead server
        server.boot()  # crash recovery from the WAL
        _wait_for(lambda: len(approved) >= before + 200, 60)
        stop.set()
        for thread in threads:
            thread.join(30)
        assert failed, "the kill did not land while payments were being made"

        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                stored = {(t, x): (s, debited) for t, x, s, debited in conn.execute(
                    select(canteen_payments.c.terminal_id, canteen_payments.c.txn_id,
                           canteen_payments.c.status, canteen_payments.c.debited_cents))}
                journals: dict[tuple[str, str], list[int]] = {}
                for t, x, amount in conn.execute(
                    select(canteen_journal.c.terminal_id, canteen_journal.c.txn_id,
                           canteen_journal.c.amount_cents)
                    .where(canteen_journal.c.kind == "payment")
                ):
                    journals.setdefault((t, x), []).append(amount)
            lost = [key for key in approved if stored.get(key, ("", 0))[0] != "approved"]
            assert lost == [], f"{len(lost)} approved payments lost: {lost[:5]}"
            assert all(journals[key] == [amount] for key, amount in approved.items())
            assert Ledger(engine).audit() == []
        finally:
            engine.dispose()
    finally:
        server.stop()


def _ledger_when_up(engine: Engine, stop: threading.Event) -> Ledger | None:
    while not stop.is_set():
        try:
            return Ledger(engine)
        except Exception:
            time.sleep(0.05)
    return None


def _wait_for(condition: object, timeout_s: float) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


async def test_the_audit_writer_rides_out_a_dead_postgres_server(tmp_path: Path) -> None:
    """Decisions go on from memory while the server is down, their entries wait in the spill
    file and in memory, and all of them are in the log once it is back; none twice."""
    from gateway.access.audit import AuditEntry, AuditLog, audit_log, verify
    from gateway.access.spent import TokenClaim

    server = DurablePostgres()
    server.start()
    try:
        url = server.create_database()
        upgrade(url)
        engine = make_engine(url)
        try:
            async with AuditLog(engine, spill_dir=tmp_path / "spill", retry_max_s=0.2,
                                commit_timeout_s=0.5) as audit:

                def entry(i: int) -> AuditEntry:
                    return AuditEntry(ts=time.time(), device_id="gate-north",
                                      device_kind="gate", granted=True, action="unlock",
                                      request_id=f"req-{i}")

                def claim(i: int) -> TokenClaim:
                    return TokenClaim(f"qr:c:{i}:00", 30.0, "gate-north", f"gate-north/{i}")

                assert (await audit.commit(entry(0), claim(0))) is not None
                server.kill9()
                down = [await audit.commit(entry(i), claim(i)) for i in range(1, 6)]
                assert down == [None] * 5  # answered from memory, spilled
                server.boot()
                while audit.pending:
                    await asyncio.sleep(0.05)
                again = await audit.commit(entry(6), claim(6))
                assert again is not None and again.outcome is not None
            with engine.connect() as conn:
                ids = list(conn.execute(select(audit_log.c.request_id)
                                        .order_by(audit_log.c.id)).scalars())
                assert verify(conn).ok
        finally:
            engine.dispose()
        assert ids == [f"req-{i}" for i in range(7)]
        assert list((tmp_path / "spill").glob("*.jsonl")) == []
    finally:
        server.stop()
