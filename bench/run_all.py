"""`make bench`: every benchmark in this folder, one after another, and the summary table at
the top of docs/benchmarks.md.

Benchmarks run one at a time so they do not compete for the cores. Each prints its figures
(a JSON object, or for the older ones lines of text); SPECS below names, per benchmark, the
figures of the summary and, beside each, its peer measured in the same run (the baseline a
figure is judged against: idle vs loaded, raw library vs ours, Nagle vs nodelay). A bench
that fails, times out or prints something unexpected is reported in its rows and the others
still run; the exit status is 1 when any failed.

The table goes between BEGIN and END in docs/benchmarks.md, with the machine (`nproc`, CPU
model, RAM, load) and the date; everything outside the markers is hand-written and kept.

    python bench/run_all.py                      # all, writes docs/benchmarks.md
    python bench/run_all.py --only rules_replay --quick --out -   # plumbing check, stdout
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # `python bench/run_all.py` from the checkout

from bench.harness import machine  # noqa: E402

DOC = HERE.parent / "docs" / "benchmarks.md"
BEGIN = "<!-- bench:begin (written by `make bench`, bench/run_all.py: edits here are lost) -->"
END = "<!-- bench:end -->"
TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Row:
    what: str
    figure: str  # dotted path into the bench's results
    peer_what: str = ""
    peer: str = ""  # "" : no peer figure for this row


@dataclass(frozen=True)
class Spec:
    rows: tuple[Row, ...]
    args: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()  # small sizes: checks the plumbing, not the product
    parse: Callable[[str], dict[str, Any]] | None = None  # default: the last JSON object


def last_json(out: str) -> dict[str, Any]:
    """The last top-level JSON object in the output (indented or not)."""
    decoder = json.JSONDecoder()
    found: dict[str, Any] = {}
    for match in re.finditer(r"^\{", out, re.MULTILINE):
        try:
            value, _ = decoder.raw_decode(out, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            found = value
    return found


def text_figures(out: str) -> dict[str, Any]:
    """`label   number [unit]` lines of the older benches, keyed by their label."""
    figures: dict[str, Any] = {}
    for line in out.splitlines():
        rate = re.match(r"^(\S.*?)\s+([\d.]+) payments/s(?:\s+p50\s+([\d.]+) ms\s+p99\s+"
                        r"([\d.]+) ms)?", line)
        if rate:
            figures[rate.group(1).strip()] = float(rate.group(2))
            if rate.group(4):
                figures[rate.group(1).strip() + " p99 ms"] = float(rate.group(4))
            continue
        mqtt = re.match(r"^MQTT round trip.*p50\s+([\d.]+) ms\s+p99\s+([\d.]+) ms", line)
        if mqtt:
            figures["mqtt p50 ms"], figures["mqtt p99 ms"] = map(float, mqtt.groups())
            continue
        pair = re.match(r"^\s*([A-Za-z][\w /.-]*?)\s{2,}(-?[\d.]+)(?:\s|$)", line)
        if pair:
            figures[pair.group(1).strip()] = float(pair.group(2))
    return figures


SPECS: dict[str, Spec] = {
    "access": Spec((
        Row("access decision in-process, 20k residents, p99 (us)", "decision_us.p99",
            "admit (recorded before it returns) p99", "admit.sequential_us.p99"),
        Row("index rebuild, full, median (s)", "rebuild_s.full_median",
            "after one lost card", "rebuild_s.after_card_revocation_median"),
        Row("gateway RSS with the index (MB)", "rss_with_index_mb", "peak", "rss_peak_mb"),
    ), quick=("--decisions", "2000")),
    "canteen_gateway": Spec((
        Row("payment round trip over MQTT, p99 (ms)", "p99_ms", "p50", "p50_ms"),
    ), quick=("--seconds", "3")),
    "flood": Spec((
        Row("gate card p99 under a telemetry flood (ms)", "flood.p99_ms", "idle p99",
            "idle.p99_ms"),
        Row("broker echo p99 under the flood (ms)", "broker_echo_flood.p99_ms", "idle p99",
            "broker_echo_idle.p99_ms"),
    ), quick=("--requests", "30")),
    "ledger": Spec((
        Row("durable payments/s, one fsync each", "pay(), one fsync per payment, 1 thread(s)",
            "16 per fsync", "pay_many(), 16 payments per fsync"),
        Row("payment over MQTT p99 (ms)", "mqtt p99 ms", "p50", "mqtt p50 ms"),
    ), quick=("--seconds", "1"), parse=text_figures),
    "login_flood": Spec((
        Row("payment p99 during a one-user sign-in flood (ms)", "one-user.p99_ms",
            "idle p99", "idle.p99_ms"),
        Row("payment p99 during a sustained sign-in flood (ms)", "sustained.p99_ms",
            "idle p99", "idle.p99_ms"),
    ), quick=("--cycles", "1", "--idle", "2", "--seconds", "2")),
    "modbus": Spec((
        Row("Modbus driver requests/s", "driver requests/s", "raw pymodbus",
            "raw pymodbus requests/s"),
        Row("poll-cycle jitter p99 (ms)", "jitter_p99_ms", "CPU % of one core",
            "cpu_pct_one_core"),
    ), quick=("--units", "10", "--seconds", "3", "--rate-seconds", "1", "--rounds", "1"),
        parse=text_figures),
    "roundtrip": Spec((
        Row("QR decision round trip p50, 500 msg/s telemetry (ms)", "sqlite.qr.p50_ms",
            "Mosquitto with Nagle", "sqlite-nagle.qr.p50_ms"),
        Row("QR decision round trip p99 (ms)", "sqlite.qr.p99_ms",
            "Mosquitto with Nagle", "sqlite-nagle.qr.p99_ms"),
        Row("gate card round trip p99 (ms)", "sqlite.card.p99_ms",
            "Mosquitto with Nagle", "sqlite-nagle.card.p99_ms"),
    ), args=("--nagle",), quick=("--nagle", "--requests", "40", "--telemetry-rate", "50")),
    "rules": Spec((
        Row("rules engine readings per CPU-second (columns)",
            "columns_readings_per_cpu_s_median", "Reading objects",
            "objects_readings_per_cpu_s"),
    ), quick=("--readings", "100000", "--batch", "10000", "--repeat", "1",
              "--small-total", "20000", "--objects", "20000")),
    "rules_replay": Spec((
        Row("`scgw rules replay` readings/s", "replay_readings_per_s", "", ""),
        Row("replay of the file (s)", "replay_s", "`wc -l` of it (s)", "wc_l_s"),
    ), quick=("--readings", "20000")),
    "telemetry": Spec((
        Row("telemetry ingest msg/s", "ingest.gateway_msg_per_s", "`mosquitto_sub | wc -l`",
            "ingest.mosquitto_sub_msg_per_s"),
        Row("InfluxDB writer points/s", "writer.writer_points_per_s", "raw gzip /write",
            "writer.raw_points_per_s"),
        Row("reading -> queryable at 2,000/s, p99 (s)", "at_2000_per_s.queryable_p99_s",
            "p50", "at_2000_per_s.queryable_p50_s"),
        Row("gate card p99 at 2,000 readings/s (ms)", "at_2000_per_s.access.p99_ms",
            "idle p99", "at_2000_per_s.access_idle.p99_ms"),
        Row("broker echo p99 at 2,000 readings/s (ms)", "at_2000_per_s.broker_echo.p99_ms",
            "idle p99", "at_2000_per_s.broker_echo_idle.p99_ms"),
        Row("RSS at 2,000 readings/s: gateway + worker (MB)",
            "at_2000_per_s.rss_max_mb_gateway_plus_worker", "worker alone",
            "at_2000_per_s.rss_max_mb_worker"),
        Row("PSS at 2,000 readings/s: gateway + worker (MB)",
            "at_2000_per_s.pss_max_mb_gateway_plus_worker", "RSS",
            "at_2000_per_s.rss_max_mb_gateway_plus_worker"),
        Row("RSS at 2,000 readings/s before any flood (MB)",
            "at_2000_per_s.memory_before_any_flood.rss_max_mb_gateway_plus_worker", "PSS",
            "at_2000_per_s.memory_before_any_flood.pss_max_mb_gateway_plus_worker"),
        Row("gate card p99 ratio, 2,000/s in 10 bursts a second",
            "at_2000_per_s_in_bursts.access_p99_ratio", "same, worker replaced by mosquitto_sub",
            "at_2000_per_s_in_bursts.floor_access_p99_ratio"),
    ), quick=("--messages", "20000", "--rounds", "1", "--seconds", "6", "--idle", "100")),
}


@dataclass
class Outcome:
    name: str
    seconds: float = 0.0
    exit: int | None = None  # None: timed out
    problem: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    log: Path | None = None


def dig(figures: Mapping[str, Any], path: str) -> Any:
    """A flat key (text benches) or a dotted path into nested JSON; None when absent."""
    if path in figures:
        return figures[path]
    value: Any = figures
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def run_one(script: Path, quick: bool, logs: Path) -> Outcome:
    name = script.stem.removeprefix("bench_")
    spec = SPECS.get(name)
    args = list((spec.quick if quick else spec.args) if spec else ())
    outcome = Outcome(name, log=logs / f"{name}.log")
    print(f"== {script.name} {' '.join(args)}", flush=True)
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", f"bench.{script.stem}", *args],
                              cwd=HERE.parent, capture_output=True, text=True,
                              timeout=TIMEOUT_S, check=False)
        out, err, outcome.exit = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode()
        err = exc.stderr if isinstance(exc.stderr, str) else (exc.stderr or b"").decode()
        outcome.problem = f"timed out after {TIMEOUT_S:.0f} s"
    outcome.seconds = time.monotonic() - started
    assert outcome.log is not None
    outcome.log.write_text(f"$ {script.name} {' '.join(args)}\n{out}\n--- stderr\n{err}")
    sys.stdout.write(out)
    if outcome.exit not in (0, None):
        last = (err.strip().splitlines() or ["no output on stderr"])[-1]
        outcome.problem = f"exit {outcome.exit}: {last[:160]}"
    try:
        outcome.figures = (spec.parse if spec and spec.parse else last_json)(out)
    except Exception as exc:  # one bench's odd output must not end the run
        outcome.problem = outcome.problem or f"unreadable output ({type(exc).__name__})"
    print(f"== {script.name}: {outcome.problem or 'ok'} in {outcome.seconds:.0f} s", flush=True)
    return outcome


def fmt(value: Any) -> str:
    if value is None:
        return "missing"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(outcomes: list[Outcome], quick: bool, info: Mapping[str, str]) -> str:
    lines = [
        BEGIN,
        f"## Summary of the last `make bench` ({info['date']})",
        "",
        f"Machine: {info['nproc']} CPUs (`nproc`), {info['cpu']}, {info['ram_gb']} GB RAM, "
        f"load average {info['load']} at the start; Python {info['python']}; source "
        f"{info['commit']}. Each figure and its peer were measured in the same run of the "
        "same bench; the sections below explain method and history.",
    ]
    if quick:
        lines += ["", "**Quick run (`--quick`): small sizes to check the plumbing; these "
                  "figures are not the product's.**"]
    lines += ["", "| bench | figure | value | peer (same run) | peer value | run |",
              "|---|---|---|---|---|---|"]
    for outcome in outcomes:
        status = outcome.problem or f"ok, {outcome.seconds:.0f} s"
        spec = SPECS.get(outcome.name)
        if spec is None:
            lines.append(f"| {outcome.name} | (no summary rows in bench/run_all.py SPECS) | - "
                         f"| - | - | {status} |")
            continue
        for row in spec.rows:
            peer_value = fmt(dig(outcome.figures, row.peer)) if row.peer else "-"
            lines.append(f"| {outcome.name} | {row.what} | "
                         f"{fmt(dig(outcome.figures, row.figure))} | {row.peer_what or '-'} | "
                         f"{peer_value} | {status} |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_block(doc: Path, block: str) -> None:
    """Replace the block between the markers; without markers, put it under the title."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].removeprefix("\n")
        text = head + block + tail
    else:
        title, newline, body = text.partition("\n")
        text = title + newline + "\n" + block + "\n" + body.lstrip("\n")
    doc.write_text(text, encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="these benches only (e.g. rules_replay telemetry)")
    parser.add_argument("--quick", action="store_true", help="small sizes (plumbing check)")
    parser.add_argument("--out", default=str(DOC),
                        help="file whose marked block gets the table; - for stdout")
    args = parser.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        known = {s.stem.removeprefix("bench_") for s in scripts}
        unknown = set(args.only) - known
        if unknown:
            parser.error(f"no such bench: {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(known))})")
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.only]
    logs = Path(tempfile.mkdtemp(prefix="scgw-bench-"))
    info = machine()  # the load before the benches add theirs
    outcomes = [run_one(script, args.quick, logs) for script in scripts]
    block = table(outcomes, args.quick, info)
    if args.out == "-":
        sys.stdout.write(block)
    else:
        write_block(Path(args.out), block)
        print(f"wrote the summary into {args.out}; full outputs in {logs}")
    failed = [o.name for o in outcomes if o.problem]
    if failed:
        print(f"failed: {', '.join(failed)} (logs in {logs})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
