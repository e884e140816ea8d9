"""README's "Running a real site" works as written, on a fresh database.

The commands are parsed out of README.md's shell block and run by bash one by one, with
the installed `scgw` first on PATH, so a README edit that breaks the path (a missing
`--config`, a command that no longer exists, an import that looks at another database)
fails here instead of on an operator's first day. Only what a test cannot use from
examples/site.yaml is overridden, the way an operator would: through SCGW__ variables
(the test's broker and database, a free API port on loopback).
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import func, select

from gateway.store import db
from gateway.store.directory_schema import residents
from simulators.demo.broker import Mosquitto

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STEP_TIMEOUT_S = 120.0
START_DEADLINE_S = 60.0
STOP_DEADLINE_S = 30.0


def readme_commands() -> list[str]:
    """The non-blank lines of the first ```sh block under "## Running a real site"."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Running a real site\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```sh\n(.*?)^```", section, re.S | re.M)
    assert block is not None, "README's 'Running a real site' has no ```sh block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def _words(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def _run_step(command: str, cwd: Path, env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Run one README line in bash; return its output and the environment it leaves (for
    `export` lines, which a later command must see as an operator's shell would)."""
    env_file = cwd / ".step-env"
    script = f'{command}\nenv -0 > "$SCGW_TEST_ENV_FILE"\n'
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd,
        env={**env, "SCGW_TEST_ENV_FILE": str(env_file)},
        capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"README step failed ({done.returncode}): {command}\n{output}"
    after = dict(item.split("=", 1) for item in env_file.read_text().split("\0") if "=" in item)
    env_file.unlink()
    after.pop("SCGW_TEST_ENV_FILE", None)
    return output, after


class _Output:
    """Collects a process's output lines in a thread and lets a test wait for a pattern."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        self._thread.start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, pattern: str, deadline: float, proc: subprocess.Popen[str]) -> re.Match[str]:
        regex = re.compile(pattern)
        with self._changed:
            while True:
                for line in self.lines:
                    if match := regex.search(line):
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or proc.poll() is not None:
                    raise AssertionError(f"no {pattern!r} in the output:\n{self.text}")
                self._changed.wait(min(remaining, 0.2))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def join(self) -> None:
        self._thread.join(timeout=STOP_DEADLINE_S)


def _wait_ready(base: str, deadline: float, proc: subprocess.Popen[str], out: _Output) -> None:
    """/readyz turns 200 once the broker connection is up; poll it against a deadline."""
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"scgw run exited with {proc.returncode}:\n{out.text}")
        try:
            response = httpx.get(f"{base}/readyz", timeout=2.0)
            if response.status_code == 200 and response.json()["ready"] is True:
                return
            last = f"{response.status_code} {response.text}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise AssertionError(f"/readyz not ready before the deadline ({last}):\n{out.text}")


def test_readme_real_site_commands_on_a_fresh_database(
    tmp_path: Path, mosquitto: Mosquitto, database_url: str
) -> None:
    commands = readme_commands()
    programs = [_words(c)[:3] for c in commands]
    assert programs[0][:2] == ["scgw", "check-config"], commands
    assert ["scgw", "db", "upgrade"] in programs, commands
    assert ["scgw", "import", "residents"] in programs, commands
    assert programs[-1][:2] == ["scgw", "run"], "the README must end by starting the gateway"
    assert (BIN / "scgw").exists(), f"scgw is not installed in {BIN}"
    if shutil.which("openssl") is None and any("openssl" in c for c in commands):
        pytest.fail("the README uses openssl, which is not installed")

    site = tmp_path / "site"
    site.mkdir()
    for name in ("site.yaml", "residents.csv"):
        shutil.copy(ROOT / "examples" / name, site / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCGW__")}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "SCGW__MQTT__URL": mosquitto.url,
        "SCGW__MQTT__ROOT": f"t{secrets.token_hex(4)}",  # isolates it on the shared broker
        "SCGW__DATABASE__URL": database_url,
        "SCGW__API__HOST": "127.0.0.1",
        "SCGW__API__PORT": "0",
    })

    outputs = []
    for command in commands[:-1]:
        output, env = _run_step(command, site, env)
        outputs.append(output)
    everything = "\n".join(outputs)
    assert "site.yaml: OK (site maple-court" in everything
    head = ScriptDirectory.from_config(db.alembic_config(database_url)).get_current_head()
    assert f"schema at {head}" in everything
    assert "would import 7 rows" in everything
    assert re.fullmatch(r"[0-9a-f]{64}", env.get("SCGW__API__JWT_SECRET", "")), (
        "the README's export did not reach the next commands")
    engine = db.make_engine(database_url)
    try:
        with engine.connect() as conn:  # a dry run writes nothing
            assert conn.execute(select(func.count()).select_from(residents)).scalar_one() == 0
    finally:
        engine.dispose()

    proc = subprocess.Popen(
        ["bash", "-c", f"exec {commands[-1]}"], cwd=site, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    out = _Output(proc)
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        port = int(out.wait_for(r"API listening on http://[^:]+:(\d+)", deadline, proc)[1])
        _wait_ready(f"http://127.0.0.1:{port}", deadline, proc, out)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=STOP_DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out.join()
    assert code == 0, f"scgw run exited with {code} on SIGTERM:\n{out.text}"
    assert "gateway stopped" in out.text
    assert "Traceback" not in out.text, out.text
