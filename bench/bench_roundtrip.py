"""Reader -> broker -> decision -> broker -> reader round trip over Mosquitto on loopback.

The gateway runs as its own process (`scgw run`), as in production. A reader in this
process presents fresh QR tokens one at a time, while a third process publishes telemetry
load. Measured twice in the same run: Mosquitto with `set_tcp_nodelay true` (what scgw
ships) and with the broker default (Nagle on), to show why the setting matters.

Target (issue 2): p50 <= 5 ms, p99 <= 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import gateway_process, percentile
from simulators.demo.broker import MOSQUITTO_CONF, Mosquitto
from simulators.phone import SimulatedPhone
from simulators.readers import ReaderSimulator

TELEMETRY_LOADER = """
import asyncio, json, sys, time, aiomqtt
async def main(host, port, rate):
    async with aiomqtt.Client(host, int(port)) as c:
        seq = 0
        while True:
            t0 = time.monotonic()
            for i in range(int(rate) // 10):
                seq += 1
                await c.publish(f"scgw/devices/meter-{i % 20}/telemetry", json.dumps(
                    {"ts": time.time(), "seq": seq, "metrics": {"power_w": 1000.0 + i}}), qos=0)
            await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - t0)))
asyncio.run(main(*sys.argv[1:]))
"""


async def measure(
    broker: Mosquitto, work: Path, requests: int, telemetry_rate: int
) -> dict[str, float]:
    meters = [{"device_id": f"meter-{i}", "kind": "meter"} for i in range(20)]
    loader = subprocess.Popen(
        [sys.executable, "-c", TELEMETRY_LOADER, broker.host, str(broker.port), str(telemetry_rate)]
    )
    try:
        with gateway_process(broker, work, meters) as people:
            resident = people.residents[0]
            phone = SimulatedPhone(resident.credential_id, resident.secret)
            async with ReaderSimulator(broker.host, broker.port, "gate-north", "gate") as reader:
                for _ in range(200):  # wait for the gateway to answer
                    try:
                        await reader.present("qr", phone.qr(), timeout_s=0.5)
                        break
                    except TimeoutError:
                        continue
                samples = []
                for _ in range(requests):
                    started = time.perf_counter()
                    decision = await reader.present("qr", phone.qr())
                    samples.append((time.perf_counter() - started) * 1000)
                    assert decision["granted"], decision
                    await asyncio.sleep(0.005)
    finally:
        loader.terminate()
        loader.wait(10)
    return {
        "p50_ms": statistics.median(samples),
        "p99_ms": percentile(samples, 0.99),
        "max_ms": max(samples),
        "n": float(len(samples)),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--telemetry-rate", type=int, default=500, help="messages/s of load")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for label, nodelay in (("nodelay", True), ("nagle", False)):
            broker = Mosquitto()
            if not nodelay:
                broker.conf_path.write_text(
                    MOSQUITTO_CONF.replace("set_tcp_nodelay true\n", "").format(
                        port=broker.port, host=broker.host)
                )
            with broker:
                results[label] = await measure(broker, work, args.requests, args.telemetry_rate)
    print(json.dumps({"bench": "roundtrip", "telemetry_rate": args.telemetry_rate,
                      **{k: {m: round(v, 3) for m, v in r.items()} for k, r in results.items()}},
                     indent=2))


if __name__ == "__main__":
    asyncio.run(main())
