"""Access decisions while a telemetry flood hits the gateway (issue 8, point 4).

`scgw run` as its own process; a plain MQTT reader presents a gate card every 20 ms and
times each decision. Measured twice in the same run against the same broker and gateway:
idle, then while two `mosquitto_pub -l` processes publish telemetry as fast as they go.

Target: every request answered; flood p99 within 1.5x of idle p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt

from bench.harness import gateway_process, percentile
from device_drivers.mqtt import NO_DELAY
from simulators.demo.broker import Mosquitto
from simulators.readers import ReaderSimulator

FLOOD_METERS = 20


def flood_lines(path: Path, lines: int = 20_000) -> None:
    with path.open("w") as out:
        for seq in range(1, lines + 1):
            out.write(json.dumps({"ts": time.time(), "seq": seq,
                                  "metrics": {"power_w": 1000.0 + seq % 97}}) + "\n")


def start_flood(broker: Mosquitto, lines: Path, meter: int) -> subprocess.Popen[bytes]:
    """`mosquitto_pub -l` fed by an endless `cat` loop: as fast as the client goes."""
    pub = shutil.which("mosquitto_pub")
    if pub is None:
        raise SystemExit("mosquitto_pub not found (apt-get install mosquitto-clients)")
    script = (f"while :; do cat {lines}; done | {pub} -h {broker.host} -p {broker.port} "
              f"-l -q 0 -t scgw/devices/meter-{meter}/telemetry")
    return subprocess.Popen(["nice", "-n", "19", "bash", "-c", script], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def present_cards(host: str, port: int, card: str, count: int,
                        interval_s: float) -> dict[str, Any]:
    latencies: list[float] = []
    unanswered = 0
    async with ReaderSimulator(host, port, "gate-north", "gate") as reader:
        for _ in range(count):
            started = time.perf_counter()
            try:
                decision = await reader.present("card", card, timeout_s=5.0)
                assert decision["granted"], decision
                latencies.append(time.perf_counter() - started)
            except TimeoutError:
                unanswered += 1
            await asyncio.sleep(max(0.0, interval_s - (time.perf_counter() - started)))
    return {
        "requests": count,
        "answered": len(latencies),
        "unanswered": unanswered,
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2) if latencies else None,
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2) if latencies else None,
        "max_ms": round(max(latencies) * 1000, 2) if latencies else None,
    }


async def broker_echo(host: str, port: int, count: int, interval_s: float) -> dict[str, Any]:
    """The floor: a message through the same broker and back, no gateway involved."""
    latencies: list[float] = []
    async with aiomqtt.Client(host, port, socket_options=NO_DELAY) as client:
        await client.subscribe("bench/echo", qos=1)
        messages = client.messages
        for i in range(count):
            started = time.perf_counter()
            await client.publish("bench/echo", str(i).encode(), qos=1)
            async for message in messages:
                if message.payload == str(i).encode():
                    break
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(max(0.0, interval_s - (time.perf_counter() - started)))
    return {"p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 2)}


async def wait_for_gateway(host: str, port: int, card: str) -> None:
    async with ReaderSimulator(host, port, "gate-north", "gate") as reader:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                await reader.present("card", card, timeout_s=0.5)
                return
            except TimeoutError:
                continue
    raise SystemExit("the gateway never answered")


async def main(requests: int) -> dict[str, Any]:
    meters = [{"device_id": f"meter-{i}", "kind": "meter"} for i in range(FLOOD_METERS)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lines = work / "flood.jsonl"
        flood_lines(lines)
        with Mosquitto() as broker, \
                gateway_process(broker, work, meters) as people:
            card = people.residents[0].cards["gate"]
            await wait_for_gateway(broker.host, broker.port, card)
            idle = await present_cards(broker.host, broker.port, card, requests, 0.02)
            idle_echo = await broker_echo(broker.host, broker.port, requests, 0.02)
            floods = [start_flood(broker, lines, i) for i in range(2)]
            try:
                await asyncio.sleep(2.0)  # let the flood reach full speed first
                flooded = await present_cards(broker.host, broker.port, card, requests, 0.02)
                flood_echo = await broker_echo(broker.host, broker.port, requests, 0.02)
            finally:
                for proc in floods:
                    os.killpg(proc.pid, 15)
                    proc.wait(5)
    ratio = (flooded["p99_ms"] / idle["p99_ms"]) if flooded["p99_ms"] and idle["p99_ms"] else None
    return {"idle": idle, "flood": flooded,
            "broker_echo_idle": idle_echo, "broker_echo_flood": flood_echo,
            "p99_ratio_flood_vs_idle": round(ratio, 2) if ratio else None,
            "target": "all answered; p99 ratio <= 1.5"}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.requests)), indent=2))
