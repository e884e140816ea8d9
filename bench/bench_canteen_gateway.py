"""Canteen payments over MQTT through the real gateway process (`scgw run`).

Four simulated terminals offer lunch-hour traffic at a fixed rate; every payment is a
durable SQLite transaction (WAL, synchronous=FULL). Reported: p50/p99 of the terminal's
round trip (publish request -> result received).

Target (issue 4): p99 <= 30 ms at 100 payments/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path

from bench.harness import gateway_process, percentile
from simulators.canteen import CanteenTerminal, card_credential, lunch_hour
from simulators.demo.broker import Mosquitto


async def measure(rate: float, seconds: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp, Mosquitto() as broker:
        terminals_config = [{"device_id": f"pos-{i}", "kind": "canteen"} for i in range(4)]
        with gateway_process(broker, Path(tmp), terminals_config, purse_cents=10_000_000) as people:
            terminals = [CanteenTerminal(broker.host, broker.port, f"pos-{i}", root="scgw",
                                         timeout_s=2.0) for i in range(4)]
            for terminal in terminals:
                await terminal.__aenter__()
            try:
                customers = [card_credential(r.cards["canteen"]) for r in people.residents]
                for _ in range(100):  # wait until the gateway answers
                    sale = await terminals[0].sell(100, customers[0])
                    if sale.outcome == "approved":
                        break
                    terminals[0].online = True
                    await asyncio.sleep(0.2)
                stats = await lunch_hour(terminals, customers, rate_per_s=rate,
                                         duration_s=seconds)
            finally:
                for terminal in terminals:
                    await terminal.__aexit__(None, None, None)
    latencies = [s * 1000 for s in stats.latencies_s]
    return {
        "rate_per_s": rate,
        "payments": len(latencies),
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
        "max_ms": round(max(latencies), 3),
        "outcomes": dict(stats.outcomes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    result = asyncio.run(measure(args.rate, args.seconds))
    print(json.dumps({"bench": "canteen_gateway", **result}, indent=2))


if __name__ == "__main__":
    main()
