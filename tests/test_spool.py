"""The telemetry spool: independent cursors, bounded size, torn tails and kill -9 recovery."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gateway.telemetry.spool import Spool
from gateway.telemetry.spool_format import HEADER_BYTES, frame

ROOT = Path(__file__).resolve().parents[1]


def payload(seq: int) -> bytes:
    return b"telemetry,device_id=m-01,kind=meter,site=t power_w=1.5,seq=%di %d" % (seq, seq)


def seq_of(record: bytes) -> int:
    return int(record.rsplit(b" ", 1)[1])


def drain(spool: Spool, name: str, ack: bool = True, max_records: int = 5000) -> list[int]:
    seqs: list[int] = []
    while True:
        batch = spool.read(name, max_records)
        if not batch.records:
            return seqs
        seqs.extend(seq_of(r) for r in batch.records)
        if ack:
            spool.ack(name, batch.end)
        else:
            return seqs


def test_consumers_drain_independently_and_resume_after_reopen(tmp_path: Path) -> None:
    with Spool(tmp_path, ["influxdb", "local"], max_bytes=8 << 20) as spool:
        assert spool.append(payload(i) for i in range(10_000)) == 10_000
        assert drain(spool, "influxdb") == list(range(10_000))
        half = spool.read("local", 4_000)
        spool.ack("local", half.end)
        stats = spool.stats()
        assert stats.consumers["influxdb"].depth_records == 0
        assert stats.consumers["influxdb"].oldest_age_s is None
        assert stats.consumers["local"].depth_records == 6_000
        age = stats.consumers["local"].oldest_age_s
        assert age is not None and age >= 0
    with Spool(tmp_path, ["influxdb", "local"], max_bytes=8 << 20) as spool:
        assert drain(spool, "influxdb") == []
        assert drain(spool, "local") == list(range(4_000, 10_000))
        spool.append([payload(10_000)])
        assert drain(spool, "influxdb") == [10_000]


def test_segments_are_deleted_once_every_cursor_passed_them(tmp_path: Path) -> None:
    with Spool(tmp_path, ["a", "b"], max_bytes=1 << 20, segment_bytes=64 << 10) as spool:
        spool.append(payload(i) for i in range(20_000))
        spool.sync()
        many = spool.stats().segments
        assert many > 3
        drain(spool, "a")
        assert spool.stats().segments == many  # b still needs them
        drain(spool, "b")
        assert spool.stats().segments == 1
        assert len(list(tmp_path.glob("*.seg"))) == 1


def test_full_spool_drops_the_oldest_and_counts_per_consumer(tmp_path: Path) -> None:
    total = 30_000
    with Spool(tmp_path, ["slow", "fast"], max_bytes=512 << 10,
               segment_bytes=64 << 10) as spool:
        fast: list[int] = []
        for start in range(0, total, 500):
            spool.append(payload(i) for i in range(start, start + 500))
            fast.extend(drain(spool, "fast"))
        stats = spool.stats()
        assert sum(p.stat().st_size for p in tmp_path.glob("*.seg")) <= 512 << 10
        assert stats.disk_bytes + stats.buffered_bytes <= 512 << 10
        slow = drain(spool, "slow")
        dropped = stats.consumers["slow"].dropped
        assert dropped > 0 and stats.dropped == dropped
        assert slow == list(range(dropped, total))  # exactly the oldest went
        assert stats.consumers["fast"].dropped == 0
        assert fast == list(range(total))


def test_torn_tail_is_cut_on_open_and_logged(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    with Spool(tmp_path, ["w"]) as spool:
        spool.append(payload(i) for i in range(100))
    segment = sorted(tmp_path.glob("*.seg"))[-1]
    whole = frame(payload(100), time.time())
    with segment.open("ab") as out:
        out.write(whole[: HEADER_BYTES + 5])  # a record cut short by the crash
    caplog.set_level(logging.WARNING)
    with Spool(tmp_path, ["w"]) as spool:
        assert spool.stats().truncated_bytes == HEADER_BYTES + 5
        assert "torn or corrupt tail" in caplog.text
        spool.append([payload(100)])
        assert drain(spool, "w") == list(range(101))


@pytest.mark.parametrize("damage", ["flip_payload", "zeros"])
def test_corrupt_last_record_is_detected_by_crc(tmp_path: Path, damage: str) -> None:
    with Spool(tmp_path, ["w"]) as spool:
        spool.append(payload(i) for i in range(50))
    segment = sorted(tmp_path.glob("*.seg"))[-1]
    data = bytearray(segment.read_bytes())
    if damage == "flip_payload":
        data[-3] ^= 0xFF  # inside the last record's payload
    else:
        data += bytes(4096)  # a zero-filled tail, as after a power cut on some filesystems
    segment.write_bytes(bytes(data))
    with Spool(tmp_path, ["w"]) as spool:
        expected = 49 if damage == "flip_payload" else 50
        assert drain(spool, "w") == list(range(expected))


def test_unconfigured_consumer_does_not_pin_segments(tmp_path: Path) -> None:
    with Spool(tmp_path, ["influxdb", "local"]) as spool:
        spool.append(payload(i) for i in range(10))
        drain(spool, "local")
    with Spool(tmp_path, ["local", "newcomer"]) as spool:
        assert not (tmp_path / "cursors" / "influxdb.pos").exists()
        assert drain(spool, "local") == []
        assert drain(spool, "newcomer") == list(range(10))  # a new sink gets what is kept


def test_a_second_opener_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    first = Spool(tmp_path, ["w"])
    with pytest.raises(RuntimeError, match="in use"):
        Spool(tmp_path, ["w"])
    first.close()
    Spool(tmp_path, ["w"]).close()


def test_record_larger_than_one_read_is_still_delivered(tmp_path: Path) -> None:
    big = b"x" * 100_000
    with Spool(tmp_path, ["w"], max_bytes=8 << 20) as spool:
        spool.append([big, b"small"])
        first = spool.read("w", max_bytes=4096)
        assert first.records == [big]
        spool.ack("w", first.end)
        assert spool.read("w").records == [b"small"]
        with pytest.raises(ValueError, match="record of 0 bytes"):
            spool.append([b""])


def test_wait_wakes_a_reader_when_records_arrive(tmp_path: Path) -> None:
    with Spool(tmp_path, ["w"]) as spool:
        assert spool.wait("w", 0.01) is False
        timer = threading.Timer(0.05, lambda: spool.append([payload(1)]))
        timer.start()
        assert spool.wait("w", 30.0) is True
        timer.join()
        assert drain(spool, "w") == [1]


def test_concurrent_appender_and_consumers_see_everything_once_in_order(
        tmp_path: Path) -> None:
    total = 40_000
    with Spool(tmp_path, ["a", "b"], max_bytes=64 << 20, segment_bytes=256 << 10) as spool:
        got: dict[str, list[int]] = {"a": [], "b": []}
        done = threading.Event()

        def consume(name: str) -> None:
            while len(got[name]) < total:
                batch = spool.read(name, 700)
                if not batch.records:
                    spool.wait(name, 0.2)
                    continue
                got[name].extend(seq_of(r) for r in batch.records)
                spool.ack(name, batch.end)

        def produce() -> None:
            for start in range(0, total, 40):
                spool.append(payload(i) for i in range(start, start + 40))
            done.set()

        threads = [threading.Thread(target=f, args=a) for f, a in
                   ((consume, ("a",)), (consume, ("b",)), (produce, ()))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert done.is_set()
        assert got["a"] == list(range(total))
        assert got["b"] == list(range(total))
        assert spool.stats().segments == 1


CHILD = """
import sys, time
from gateway.telemetry.spool import Spool
spool = Spool(sys.argv[1], ["w"], fsync_interval_s=float(sys.argv[2]))
seq = 0
while True:
    spool.append(b"telemetry,device_id=m,kind=meter,site=t seq=%di %d" % (i, i)
                 for i in range(seq, seq + 20))
    seq += 20
    print("A", seq, time.monotonic(), spool.stats().synced_recno, flush=True)
"""


def test_kill_9_while_appending_loses_at_most_one_fsync_interval(tmp_path: Path) -> None:
    """SIGKILL a process in the middle of appends; reopen: a clean prefix, nothing corrupt.

    Everything the child appended more than one fsync interval (plus scheduling slack on a
    loaded 2-core box) before its last report must be there, and so must everything the
    spool had reported as fsynced.
    """
    interval = 0.2
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(interval)],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    reports: list[tuple[int, float, int]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        _, seq, at, synced = line.split()
        reports.append((int(seq), float(at), int(synced)))
        ran = reports[-1][1] - reports[0][1]
        if ran >= 2 * (interval + 1.0) and reports[-1][0] > reports[-1][2]:
            break  # well past several fsyncs, and some records are not yet synced
    os.kill(child.pid, signal.SIGKILL)
    rest = child.stdout.read()
    child.wait()
    for line in rest.splitlines():
        if line.count(" ") == 3:
            _, seq, at, synced = line.split()
            reports.append((int(seq), float(at), int(synced)))
    assert reports, "the child never appended"
    last_at = reports[-1][1]
    must_have = max((seq for seq, at, _ in reports if at <= last_at - interval - 1.0),
                    default=0)
    synced = max(s for _, _, s in reports)

    with Spool(tmp_path, ["w"], fsync_interval_s=interval) as spool:
        recovered: list[int] = []
        while batch := spool.read("w"):
            if not batch.records:
                break
            recovered.extend(seq_of(r) for r in batch.records)
            spool.ack("w", batch.end)
        assert recovered == list(range(len(recovered)))  # a clean prefix, in order
        assert len(recovered) >= max(must_have, synced)
        assert len(recovered) <= reports[-1][0] + 20
        spool.append([b"telemetry,device_id=m,kind=meter,site=t seq=%di %d"
                      % (len(recovered), len(recovered))])
        assert drain(spool, "w") == [len(recovered)]


def test_a_trickle_is_gathered_and_a_full_batch_is_not(tmp_path: Path) -> None:
    """`read_gathered`: a sink with a fixed cost per batch gets what came during the linger
    in one batch; a batch already at `fill` is returned at once; a stop ends the wait."""
    with Spool(tmp_path / "s", ["sink"]) as spool:
        stop = threading.Event()
        spool.append([b"a"])
        threading.Timer(0.05, lambda: spool.append([b"b", b"c"])).start()
        batch = spool.read_gathered("sink", fill=10, linger_s=0.5, stop=stop)
        assert batch is not None and batch.records == [b"a", b"b", b"c"]
        spool.ack("sink", batch.end)

        spool.append([b"d", b"e"])
        started = time.monotonic()
        batch = spool.read_gathered("sink", fill=2, linger_s=30.0, stop=stop)
        assert batch is not None and batch.records == [b"d", b"e"]
        assert time.monotonic() - started < 10.0  # not the 30 s linger
        spool.ack("sink", batch.end)

        spool.append([b"f"])
        stop.set()
        assert spool.read_gathered("sink", fill=10, linger_s=30.0, stop=stop) is None
