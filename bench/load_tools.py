"""Load and probes that run as processes of their own beside a measured gateway.

Why processes, and why these: a benchmark measures the gateway, not its apparatus. A card
reader in the process that also parses InfluxDB query results and samples RSS is delayed by
that work and reports it as access latency (measured: 39 ms p99 against 17 ms for the same
run from its own process). A Python paho publisher at 2,000 msg/s takes a fifth of a core of
the same two cores the gateway has; `mosquitto_pub -l` fed lines at a paced rate costs a
fraction of that, as devices on the network would cost the gateway box nothing.

    python -m bench.load_tools cards HOST PORT CARD COUNT INTERVAL_S   -> JSON summary
    python -m bench.load_tools echo HOST PORT COUNT INTERVAL_S         -> JSON summary
    python -m bench.load_tools telemetry HOST PORT RATE SECONDS METERS [TICKS_PER_S [FIRST_SEQ]]
                                                                        -> readings sent
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from typing import Any

FIRST_SEQ = 10_000_000
"""Seqs of the paced load start here, so an observer can tell its readings from others."""


SMOOTH_TICKS_PER_S = 200
"""How often the paced load publishes: 2,000 readings/s as 10 every 5 ms, round-robin over
the devices, the way many meters reporting on their own clocks arrive."""
BURST_TICKS_PER_S = 10
"""The stress shape: the same rate as 200 readings at once every 100 ms (meters that all
report on the same clock tick)."""


def paced_telemetry(host: str, port: int, rate: int, seconds: float, meters: int,
                    root: str = "scgw", ticks_per_s: int = SMOOTH_TICKS_PER_S,
                    first_seq: int = FIRST_SEQ) -> int:
    """`rate` single-reading messages a second (QoS 1) over `meters` devices, one
    `mosquitto_pub -l` per device; each of `ticks_per_s` ticks sends `rate / ticks_per_s`
    readings, the devices taking turns. Each device counts its seqs up from `first_seq`; a
    second load in the same run takes a range of its own, so an observer tells their
    readings apart and none can look like a redelivery. Returns the readings sent."""
    pub = shutil.which("mosquitto_pub")
    assert pub is not None, "mosquitto_pub missing (apt-get install mosquitto-clients)"
    pubs = [subprocess.Popen([pub, "-h", host, "-p", str(port), "-q", "1", "-l",
                              "-t", f"{root}/devices/meter-{m}/telemetry"],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
            for m in range(meters)]
    per_tick = max(1, rate // ticks_per_s)
    seqs = [first_seq] * meters  # each device counts its own, without gaps
    sent, started, tick, turn = 0, time.monotonic(), 0, 0
    while time.monotonic() - started < seconds:
        now = time.time()
        lines: dict[int, list[str]] = {}
        for _ in range(per_tick):  # a millisecond apart per device: one point each in InfluxDB
            meter, turn = turn % meters, turn + 1
            seqs[meter] += 1
            mine = lines.setdefault(meter, [])
            mine.append(f'{{"ts":{now + len(mine) / 1000:.3f},"seq":{seqs[meter]},'
                        f'"metrics":{{"power_w":1.0}}}}\n')
        for meter, mine in lines.items():
            stdin = pubs[meter].stdin
            assert stdin is not None
            stdin.write("".join(mine).encode())
            stdin.flush()
        sent += per_tick
        tick += 1
        time.sleep(max(0.0, started + tick / ticks_per_s - time.monotonic()))
    for proc in pubs:
        assert proc.stdin is not None
        proc.stdin.close()
    for proc in pubs:
        proc.wait(30)
    return sent


async def run_cards(host: str, port: int, card: str, count: int,
                    interval_s: float) -> dict[str, object]:
    from bench.bench_flood import present_cards
    return await present_cards(host, port, card, count, interval_s)


def main(argv: list[str]) -> None:
    what, host, port = argv[0], argv[1], int(argv[2])
    if what == "cards":
        print(json.dumps(asyncio.run(run_cards(host, port, argv[3], int(argv[4]),
                                               float(argv[5])))))
    elif what == "echo":
        from bench.bench_flood import broker_echo
        print(json.dumps(asyncio.run(broker_echo(host, port, int(argv[3]), float(argv[4])))))
    elif what == "telemetry":
        ticks = int(argv[6]) if len(argv) > 6 else SMOOTH_TICKS_PER_S
        first = int(argv[7]) if len(argv) > 7 else FIRST_SEQ
        print(paced_telemetry(host, port, int(argv[3]), float(argv[4]), int(argv[5]),
                              ticks_per_s=ticks, first_seq=first))
    else:
        raise SystemExit(f"unknown load {what!r}: cards, echo or telemetry")


async def probe_process(*args: str) -> dict[str, Any]:
    """A probe (`cards` or `echo`, see the module docstring) from a process of its own."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.load_tools", *args, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, f"probe {args[0]} failed ({proc.returncode})"
    result: dict[str, Any] = json.loads(out)
    return result


async def access_and_floor(host: str, port: int, card: str, count: int,
                           interval_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Card decisions and, at the same time, the floor under them: a message through the
    same broker and back with no gateway involved (both cross the broker, a card decision
    twice)."""
    cards, echo = await asyncio.gather(
        probe_process("cards", host, str(port), card, str(count), str(interval_s)),
        probe_process("echo", host, str(port), str(count), str(interval_s)))
    return cards, echo


if __name__ == "__main__":
    main(sys.argv[1:])
