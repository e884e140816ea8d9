"""A payment-applying process to SIGKILL: the crash-safety harness for the ledger.

`python -m tests.ledger_stress_worker --database-url URL --socket PATH` starts a fork
server: it imports everything once, then for every `spawn` line on stdin forks a worker and
answers `pid N`. The worker connects to the Unix socket PATH (where the test listens),
reads JSON-lines payment requests, applies them through `Ledger.pay_many` in groups of up to
`--group`, and writes one JSON line per result *after* the commit, like the gateway does.
Forking from a warm parent makes a restart cost milliseconds instead of the ~0.7 s of a cold
interpreter, so a test can afford hundreds of kills; the killed process is still a real
process holding a real database connection mid-transaction.

Request line: {"terminal", "txn", "amount", "account", "offline", "ts"}
Result line:  {"terminal", "txn", "result": <CONTRACT.md payment result>}
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from gateway.canteen import reports
from gateway.canteen.ledger import Ledger
from gateway.canteen.policy import PaymentRequest, as_resolution
from gateway.canteen.tables import canteen_journal, canteen_payments
from gateway.store.db import make_engine

log = logging.getLogger(__name__)


def _request(raw: bytes) -> PaymentRequest:
    data = json.loads(raw)
    return PaymentRequest(
        terminal_id=data["terminal"],
        txn_id=data["txn"],
        amount_cents=data["amount"],
        resolution=as_resolution(data["account"]),
        ts=data.get("ts", 0.0),
        offline=bool(data.get("offline", False)),
    )


def serve(ledger: Ledger, socket_path: str, group: int) -> None:
    """Apply requests from the socket until it closes."""
    engine = ledger.engine
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    pending = b""
    try:
        while chunk := sock.recv(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            requests = [_request(line) for line in lines if line.strip()]
            for start in range(0, len(requests), group):
                part = requests[start : start + group]
                results = ledger.pay_many(part)
                sock.sendall(b"".join(
                    json.dumps({"terminal": req.terminal_id, "txn": req.txn_id,
                                "result": res.to_wire()}).encode() + b"\n"
                    for req, res in zip(part, results, strict=True)
                ))
    finally:
        sock.close()
        engine.dispose()


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def fork_server(database_url: str, socket_path: str, group: int) -> None:
    ledger = Ledger(make_engine(database_url))
    ledger.warm_up()
    # No connection may cross the fork; the compiled-statement cache may and should.
    ledger.engine.dispose()
    for line in sys.stdin:
        command = line.strip()
        _reap()
        if command == "quit":
            break
        if command != "spawn":
            sys.stdout.write(f"error unknown command {command!r}\n")
            sys.stdout.flush()
            continue
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                serve(ledger, socket_path, group)
            except BaseException:
                log.exception("stress worker failed")
                code = 1
            finally:
                os._exit(code)
        sys.stdout.write(f"pid {pid}\n")
        sys.stdout.flush()
    _reap()


@dataclass
class KillReport:
    """What the client saw across all kills: every answer, per (terminal, txn_id)."""

    seed: int = 0
    trials: int = 0
    partial_trials: int = 0  # kills that landed after some answers of a burst but not all
    sent: int = 0
    topup_cents: int = 0
    amounts: dict[tuple[str, str], int] = field(default_factory=dict)
    answers: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)


class _Client:
    def __init__(self, database_url: str, group: int, workdir: Path) -> None:
        self.path = str(workdir / "worker.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(30)
        root = Path(__file__).resolve().parents[2]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.ledger_stress_worker", "--database-url",
             database_url, "--socket", self.path, "--group", str(group)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root,
        )

    def spawn(self) -> tuple[int, socket.socket]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("spawn\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().split()
        if len(reply) != 2 or reply[0] != "pid":
            raise RuntimeError(f"fork server said {reply!r}")
        conn, _ = self.listener.accept()
        return int(reply[1]), conn

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.listener.close()


def _read(
    conn: socket.socket, until: float, buffer: bytearray, want: int | None = None
) -> list[dict[str, Any]]:
    """Complete result lines received before `until` (monotonic), the end of the stream, or
    once `want` lines are in."""
    lines: list[dict[str, Any]] = []
    while (want is None or len(lines) < want) and (left := until - time.monotonic()) > 0:
        conn.settimeout(left)
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            break
        buffer.extend(chunk)
        *complete, rest = bytes(buffer).split(b"\n")
        buffer[:] = rest
        lines.extend(json.loads(line) for line in complete if line)
    return lines


def run_kill_trials(
    database_url: str, trials: int, seed: int, group: int = 1, new_per_trial: int = 4,
    max_burst: int = 10, max_delay_s: float = 0.002, workdir: Path | None = None,
) -> KillReport:
    """SIGKILL a payment worker `trials` times mid-stream; retry everything unanswered."""
    rng = random.Random(seed)
    report = KillReport(seed=seed)
    ledger = Ledger(make_engine(database_url))
    accounts = [f"kill-{seed}-{i}" for i in range(4)]
    requests: dict[tuple[str, str], bytes] = {}
    pending: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="scgw-kill-", dir=workdir) as tmp:
        client = _Client(database_url, group, Path(tmp))
        try:
            for trial in range(trials):
                if trial % 10 == 0:
                    for account in accounts:
                        amount = rng.randrange(1000, 4000)
                        ledger.topup(account, amount, f"kill-topup-{seed}-{trial}-{account}")
                        report.topup_cents += amount
                for _ in range(new_per_trial):
                    key = (f"pos-{rng.randrange(3)}", f"{seed}-{len(requests)}")
                    account = rng.choice([*accounts, "unknown_card"])
                    report.amounts[key] = rng.randrange(100, 900)
                    requests[key] = json.dumps({
                        "terminal": key[0], "txn": key[1], "amount": report.amounts[key],
                        "account": account, "offline": rng.random() < 0.25,
                        "ts": float(trial),
                    }).encode() + b"\n"
                    pending.append(key)
                answered = [k for k in report.answers if k not in pending]
                again = rng.sample(answered, min(2, len(answered)))
                pid, conn = client.spawn()
                burst = [*pending[:max_burst], *again]
                conn.sendall(b"".join(requests[k] for k in burst))
                report.sent += len(burst)
                buffer = bytearray()
                # Kill while the worker is somewhere inside request number `survive` + 1:
                # deciding, writing, or in the middle of its commit.
                survive = rng.randrange(len(burst) + 1)
                seen = _read(conn, time.monotonic() + 10, buffer, want=survive)
                time.sleep(rng.uniform(0, max_delay_s))
                os.kill(pid, signal.SIGKILL)
                seen += _read(conn, time.monotonic() + 10, buffer)
                conn.close()
                fresh = {(line["terminal"], line["txn"]) for line in seen} & set(pending)
                if 0 < len(fresh) < len(pending):
                    report.partial_trials += 1
                for line in seen:
                    key = (line["terminal"], line["txn"])
                    report.answers.setdefault(key, []).append(line["result"])
                pending = [k for k in pending if k not in report.answers]
                report.trials += 1
            pid, conn = client.spawn()
            conn.sendall(b"".join(requests[k] for k in pending))
            buffer = bytearray()
            deadline = time.monotonic() + 60
            while pending and time.monotonic() < deadline:
                for line in _read(conn, min(deadline, time.monotonic() + 1), buffer):
                    key = (line["terminal"], line["txn"])
                    report.answers.setdefault(key, []).append(line["result"])
                pending = [k for k in pending if k not in report.answers]
            conn.close()
        finally:
            client.close()
            ledger.engine.dispose()
    return report


def verify_kill_run(engine: Engine, report: KillReport) -> list[str]:
    """Every way the ledger disagrees with what the client was told; empty when exact."""
    problems = [f"audit: {p}" for p in reports.audit_engine(engine)]
    j = canteen_journal.c
    with engine.connect() as conn:
        journals: dict[tuple[str, str], list[int]] = {}
        for terminal, txn, amount in conn.execute(
            select(j.terminal_id, j.txn_id, j.amount_cents).where(j.kind == "payment")
        ).all():
            journals.setdefault((terminal, txn), []).append(amount)
        stored = {(row["terminal_id"], row["txn_id"]): row
                  for row in conn.execute(select(canteen_payments)).mappings().all()}
    mine = {key for key in journals if key[1].startswith(f"{report.seed}-")}
    for key in mine - report.amounts.keys():
        problems.append(f"{key}: in the ledger but never requested")
    for key, amount in report.amounts.items():
        seen = report.answers.get(key, [])
        if not seen:
            problems.append(f"{key}: never answered")
            continue
        first = seen[0]
        if any(answer != first for answer in seen):
            problems.append(f"{key}: answers differ between retries: {seen}")
        row = stored.get(key)
        if row is None:
            problems.append(f"{key}: answered {first} but no stored payment")
            continue
        if first["approved"] != (row["status"] == "approved") or (
            first.get("shortfall_cents", 0) != row["shortfall_cents"]
        ):
            problems.append(f"{key}: answered {first} but stored {dict(row)}")
        shortfall = first.get("shortfall_cents", 0)
        expected_debit = amount if first["approved"] else amount - shortfall if shortfall else 0
        posted = journals.get(key, [])
        if sum(posted) != expected_debit or len(posted) > 1:
            problems.append(f"{key}: answered {first} but the ledger holds debits {posted}")
    return problems


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--socket", required=True, help="Unix socket the client listens on")
    parser.add_argument("--group", type=int, default=1, help="payments per transaction")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    fork_server(args.database_url, args.socket, max(1, args.group))


if __name__ == "__main__":
    main()
