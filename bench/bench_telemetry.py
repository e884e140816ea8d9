"""Energy telemetry (issue 9): ingest, writer, freshness, memory and access under load.

Everything runs against real Mosquitto and InfluxDB 1.x, with `scgw run` (and its telemetry
worker child) as separate processes. Each ratio is against a peer measured in the same run:

- ingest: two `mosquitto_pub -l` floods of single-reading messages for 6 s; the worker's
  own count (its health report) vs `mosquitto_sub | wc -l` on the same flood, in three
  rounds (each has its own fresh seqs), the median round reported (target >= 0.35x);
- writer: the spool + v1 writer draining M points into InfluxDB vs raw gzip `/write` POSTs
  of 5,000 lines (target >= 0.5x);
- at 2,000 readings/s for 20 s (paced `mosquitto_pub`, QoS 1): reading -> queryable p99 of
  one device's readings (target <= 2 s), RSS of gateway plus worker (target <= 150 MB), and
  card access p99 vs idle, both from a probe process of their own (target within 1.5x).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.bench_flood import wait_for_gateway
from bench.harness import gateway_process, percentile
from bench.load_tools import FIRST_SEQ, access_and_floor
from device_drivers.vocabulary import Reading
from gateway.telemetry.records import encode_readings
from gateway.telemetry.spool import Spool
from gateway.telemetry.writers import build_writer
from simulators.demo.broker import Mosquitto
from tests.influx_servers import InfluxDB, influxdb_server

METERS = 20
SAMPLED = "meter-0"  # the device whose readings the freshness observer follows


def reading_lines(path: Path, count: int, first_seq: int = 1) -> None:
    now = time.time()
    with path.open("w") as out:
        for i in range(count):
            out.write(json.dumps({"ts": now + i * 1e-4, "seq": first_seq + i,
                                  "metrics": {"power_w": 1000.0 + i % 97}}) + "\n")


WINDOW_S = 6.0


def flood(broker: Mosquitto, lines: Path, root: str, devices: int = 2
          ) -> list[subprocess.Popen[bytes]]:
    """Two `mosquitto_pub -l -q 0` processes, one per device, as fast as they go."""
    pub = shutil.which("mosquitto_pub")
    assert pub is not None, "mosquitto_pub missing (apt-get install mosquitto-clients)"
    return [subprocess.Popen([pub, "-h", broker.host, "-p", str(broker.port), "-q", "0", "-l",
                              "-t", f"{root}/devices/meter-{d}/telemetry"],
                             stdin=lines.open("rb"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for d in range(devices)]


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait(5)


def peer_sub_rate(broker: Mosquitto, lines: Path) -> float:
    """`mosquitto_sub | wc -l` over a window of the same flood: the peer of the ingest rate."""
    sub = shutil.which("mosquitto_sub")
    assert sub is not None
    reader = subprocess.Popen(f"timeout {WINDOW_S + 2} {sub} -h {broker.host} -p {broker.port}"
                              f" -q 1 -t 'peer/#' | wc -l", shell=True, stdout=subprocess.PIPE)
    time.sleep(1.0)
    floods = flood(broker, lines, "peer")
    time.sleep(WINDOW_S)
    stop_all(floods)
    out, _ = reader.communicate(timeout=30)
    return int(out) / WINDOW_S


def worker_ingest_rate(broker: Mosquitto, lines: Path) -> float:
    """The worker's own count (health report `ingest.messages`) across the same window."""
    reports: list[tuple[float, int]] = []
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        report = json.loads(message.payload)
        reports.append((time.monotonic(), int(report["ingest"]["messages"])))

    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.subscribe("scgw/gateway/bench/telemetry")
    client.loop_start()
    floods = flood(broker, lines, "scgw")
    started = time.monotonic()
    time.sleep(WINDOW_S)
    stop_all(floods)
    time.sleep(2.5)
    client.loop_stop()
    window = [r for r in reports if started + 1.0 <= r[0] <= started + WINDOW_S + 2.5]
    assert len(window) >= 2, reports
    (t0, n0), (t1, n1) = window[0], window[-1]
    return (n1 - n0) / (t1 - t0)


def points(influx: InfluxDB, device: str | None = None) -> int:
    where = f" WHERE device_id = '{device}'" if device else ""
    rows = influx.query(f"SELECT count(seq) FROM telemetry{where}", database="scgw")
    return int(rows[0]["values"][0][1]) if rows and rows[0].get("values") else 0


def rss_mb(pid: int) -> float:
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def _children(pid: int) -> list[int]:
    try:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(c) for c in found]


def wait_until_drained(broker: Mosquitto) -> None:
    """The flood left a backlog at the broker; the steady phase starts once it is ingested."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    rates: list[float] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.on_message = lambda _c, _u, m: rates.append(
        float(json.loads(m.payload)["ingest"]["msg_per_s"]))
    client.connect(broker.host, broker.port)
    client.subscribe("scgw/gateway/bench/telemetry")
    client.loop_start()
    deadline = time.monotonic() + 300
    while len(rates) < 3 or any(r > 50 for r in rates[-2:]):
        assert time.monotonic() < deadline, "the worker never drained the flood"
        time.sleep(0.5)
    client.loop_stop()


def measure_writer(influx: InfluxDB, work: Path, count: int) -> dict[str, float]:
    readings = [Reading(f"w-{i % METERS}", "meter", 1.7e9 + i * 1e-3, {"power_w": float(i)}, i)
                for i in range(count)]
    records, _ = encode_readings(readings, "bench-raw")
    body = [b"\n".join(records[i:i + 5000]) for i in range(0, len(records), 5000)]
    influx.query("CREATE DATABASE raw")
    started = time.monotonic()
    with httpx.Client() as http:
        for chunk in body:
            http.post(f"{influx.url}/write", params={"db": "raw", "precision": "ms"},
                      content=gzip.compress(chunk, 1),
                      headers={"Content-Encoding": "gzip"}).raise_for_status()
    raw = count / (time.monotonic() - started)
    records, _ = encode_readings(readings, "bench-writer")
    with Spool(work / "writer-spool", ["influxdb"]) as spool:
        spool.append(records)
        writer = build_writer(spool, api="v1", url=influx.url, database="scgw")
        thread = threading.Thread(target=writer.run, daemon=True)
        started = time.monotonic()
        thread.start()
        while writer.written < count:
            time.sleep(0.01)
        ours = count / (time.monotonic() - started)
        writer.stop()
        thread.join(10)
    return {"raw_points_per_s": round(raw), "writer_points_per_s": round(ours),
            "ratio": round(ours / raw, 2)}


async def steady_load(broker: Mosquitto, influx: InfluxDB, gateway_pid: int, card: str,
                      rate: int, seconds: float) -> dict[str, Any]:
    """The load and the card reader each run as a process of their own (bench.load_tools);
    this process only observes: freshness from a sample and RSS."""
    latencies: list[float] = []
    rss: list[float] = []
    worker_rss: list[float] = []
    producer = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.load_tools", "telemetry", broker.host, str(broker.port),
        str(rate), str(seconds), str(METERS), stdout=asyncio.subprocess.PIPE)

    async def observe() -> None:
        """Reading -> queryable, from the readings of one device of the load (a twentieth,
        ~2,000 samples): polling InfluxDB for every point at 10 Hz made influxd itself a
        large part of the load being measured."""
        newest_ms = 0
        seen: set[int] = set()
        while True:
            rows = await asyncio.to_thread(
                influx.query, f"SELECT seq FROM telemetry WHERE device_id = '{SAMPLED}' AND "
                              f"seq > {FIRST_SEQ} AND time > {newest_ms - 5000}ms",
                database="scgw")
            now = time.time()
            fresh = 0
            for row in rows:
                for stamp, seq in row["values"]:
                    if seq in seen:
                        continue
                    seen.add(seq)
                    fresh += 1
                    latencies.append(now - stamp / 1000)
                    newest_ms = max(newest_ms, int(stamp))
            rss.append(rss_mb(gateway_pid))
            children = _children(gateway_pid)
            worker_rss.append(rss_mb(children[0]) if children else 0.0)
            if producer.returncode is not None and not fresh:
                return
            await asyncio.sleep(0.1)

    observer = asyncio.create_task(observe())
    access, echo = await access_and_floor(broker.host, broker.port, card, int(seconds / 0.05),
                                          0.05)
    out, _ = await producer.communicate()
    await asyncio.wait_for(observer, 60)
    return {"readings_sent": int(out), "queryable_sampled": len(latencies),
            "queryable_p50_s": round(percentile(latencies, 0.5), 3),
            "queryable_p99_s": round(percentile(latencies, 0.99), 3),
            "rss_max_mb_gateway_plus_worker": round(max(rss), 1),
            "rss_max_mb_worker": round(max(worker_rss), 1), "access": access,
            "broker_echo": echo}


async def main(count: int, rounds: int) -> dict[str, Any]:
    meters = [{"device_id": f"meter-{i}", "kind": "meter"} for i in range(METERS)]
    with tempfile.TemporaryDirectory() as tmp, influxdb_server() as influx, \
            Mosquitto() as broker:
        work = Path(tmp)
        floods = []  # fresh seqs each round: a repeated one would be a cheap duplicate
        for number in range(rounds):
            floods.append(work / f"flood-{number}.jsonl")
            reading_lines(floods[-1], count, first_seq=1 + number * count)
        writer = measure_writer(influx, work, 100_000)
        procs: list[subprocess.Popen[bytes]] = []
        site = {"influxdb": {"url": influx.url, "api": "v1", "database": "scgw"},
                "telemetry": {"spool_dir": str(work / "spool")}}
        with gateway_process(broker, work, meters, site_extra=site, processes=procs) as people:
            card = people.residents[0].cards["gate"]
            await wait_for_gateway(broker.host, broker.port, card)
            idle, idle_echo = await access_and_floor(broker.host, broker.port, card, 200, 0.05)
            ingest: list[tuple[float, float]] = []
            for flood_lines in floods:  # the peer and the worker in turn, on one flood each
                peer = peer_sub_rate(broker, flood_lines)
                ours = await asyncio.to_thread(worker_ingest_rate, broker, flood_lines)
                await asyncio.to_thread(wait_until_drained, broker)
                ingest.append((ours, peer))
            load = await steady_load(broker, influx, procs[0].pid, card, 2000, 20.0)
    flood_p99 = load["access"]["p99_ms"]
    ratios = sorted(ours / peer for ours, peer in ingest)
    ours, peer = sorted(ingest, key=lambda pair: pair[0] / pair[1])[len(ingest) // 2]
    return {
        "ingest": {"gateway_msg_per_s": round(ours), "mosquitto_sub_msg_per_s": round(peer),
                   "ratio": round(ours / peer, 2), "ratio_of_each_round": [
                       round(r, 2) for r in ratios], "target": ">= 0.35 (the median round)"},
        "writer": {**writer, "target": ">= 0.5"},
        "at_2000_per_s": {**load, "access_idle": idle, "broker_echo_idle": idle_echo,
                          "access_p99_ratio": round(flood_p99 / idle["p99_ms"], 2)
                          if flood_p99 and idle["p99_ms"] else None,
                          "targets": "queryable p99 <= 2 s, RSS <= 150 MB, access <= 1.5x"},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=500_000, help="lines in the flood file")
    parser.add_argument("--rounds", type=int, default=3,
                        help="ingest rounds (peer, then worker); the median is reported")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.messages, args.rounds)), indent=2))
