"""`scgw demo` end to end, as a newcomer runs it: a subprocess, demo.json, the API, MQTT.

The demo's broker requires logins (CONTRACT.md section 6): demo.json carries each device's
login and a read-only monitor; anonymous clients are refused and a device cannot speak on
another device's topics, with Mosquitto and with the embedded fallback broker alike.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

from simulators.demo.broker import mosquitto_binary
from tests.servers import require

MODBUS_UNITS = {"hvac-b1-lobby", "erv-b1", "purifier-b2-gym", "meter-plant"}


async def _start_demo(tmp_path: Path, *args: str) -> tuple[asyncio.subprocess.Process,
                                                          dict[str, Any]]:
    scgw = shutil.which("scgw", path=str(Path(sys.executable).parent))
    assert scgw is not None
    proc = await asyncio.create_subprocess_exec(
        scgw, "demo", "--data-dir", str(tmp_path), "--port", "0", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    demo_json = tmp_path / "demo.json"
    for _ in range(300):
        if demo_json.exists() and demo_json.stat().st_size > 0:
            break
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.1)
    if not demo_json.exists():
        if proc.returncode is None:
            proc.kill()
        output, _ = await proc.communicate()
        raise AssertionError(f"the demo did not write demo.json: {output.decode()[-3000:]}")
    assert stat.S_IMODE(demo_json.stat().st_mode) == 0o600  # every login of the run
    return proc, json.loads(demo_json.read_text())


async def _stop(proc: asyncio.subprocess.Process) -> str:
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = output.decode()
    assert proc.returncode == 0, text[-3000:]
    return text


def _device_logins_and_monitor(demo: dict[str, Any]) -> None:
    mqtt = demo["mqtt"]
    assert mqtt["username"] and len(mqtt["password"]) >= 22
    for device in demo["devices"]:
        if device["device_id"] in MODBUS_UNITS:  # polled by the gateway: no broker login
            assert device["mqtt_username"] is None and device["mqtt_password"] is None
        else:
            assert device["mqtt_username"] == device["device_id"]
            assert len(device["mqtt_password"]) >= 22
    passwords = [d["mqtt_password"] for d in demo["devices"] if d["mqtt_password"]]
    assert len(set(passwords)) == len(passwords)


def _login(demo: dict[str, Any], device_id: str) -> tuple[str, str]:
    device = next(d for d in demo["devices"] if d["device_id"] == device_id)
    return device["mqtt_username"], device["mqtt_password"]


async def _refuses_anonymous_and_forgery(demo: dict[str, Any], http: httpx.AsyncClient,
                                         auth: dict[str, str]) -> dict[str, Any]:
    """As the monitor, watch gate-north's commands while gate-south forges one and a resident
    unlocks through the API: only the API's command arrives. Returns it."""
    mqtt = demo["mqtt"]
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(mqtt["host"], mqtt["port"], timeout=5):
            pass
    command_topic = f"{mqtt['root']}/devices/gate-north/command"
    intruder_user, intruder_password = _login(demo, "gate-south")
    async with (
        aiomqtt.Client(mqtt["host"], mqtt["port"], username=mqtt["username"],
                       password=mqtt["password"]) as monitor,
        aiomqtt.Client(mqtt["host"], mqtt["port"], identifier="intruder",
                       username=intruder_user, password=intruder_password) as intruder,
    ):
        await monitor.subscribe(command_topic, qos=1)
        await intruder.publish(command_topic, b'{"forged": true, "action": "unlock", '
                               b'"duration_s": 3600}', qos=1)
        await monitor.publish(command_topic, b'{"forged": true, "action": "unlock"}', qos=1)
        unlock = await http.post("/api/v1/gates/gate-north/unlock", headers=auth)
        assert unlock.status_code == 202, unlock.text
        async with asyncio.timeout(10):
            async for message in monitor.messages:
                assert isinstance(message.payload, bytes)
                command: dict[str, Any] = json.loads(message.payload)
                assert "forged" not in command, command
                if command.get("command_id") == unlock.json()["command_id"]:
                    assert command["action"] == "unlock"
                    return command
    raise AssertionError("unreachable")


async def _resident(http: httpx.AsyncClient, demo: dict[str, Any]) -> dict[str, str]:
    resident = next(u for u in demo["users"] if u["role"] == "resident")
    login = await http.post("/api/v1/auth/token", data={
        "username": resident["username"], "password": resident["password"]})
    assert login.status_code == 200, login.text
    return {"Authorization": f"Bearer {login.json()['access_token']}"}


async def test_demo_runs_a_community_a_resident_can_use(tmp_path: Path) -> None:
    require(mosquitto_binary() is not None, "mosquitto")
    proc, demo = await _start_demo(tmp_path, "--duration", "20")
    try:
        roles = {u["role"] for u in demo["users"]}
        assert roles == {"resident", "staff", "engineer", "admin"}
        residents = [u for u in demo["users"] if u["role"] == "resident"]
        assert len(residents) >= 2
        kinds = {d["kind"] for d in demo["devices"]}
        assert kinds == {"gate", "elevator", "canteen", "hvac", "fresh_air", "air_purifier",
                         "meter"}
        passwords = [u["password"] for u in demo["users"]]
        assert len(set(passwords)) == len(passwords) and all(len(p) >= 12 for p in passwords)
        _device_logins_and_monitor(demo)

        async with httpx.AsyncClient(base_url=demo["api"], timeout=10) as http:
            auth = await _resident(http, demo)
            token = await http.post("/api/v1/me/access-token", headers=auth)
            assert token.status_code == 200 and token.json()["qr"].startswith("SC1.")
            await _refuses_anonymous_and_forgery(demo, http, auth)
    finally:
        log = await _stop(proc)
    assert "mosquitto broker" in log and "anonymous clients refused" in log
    assert "gate-north: unlocked" in log or "gate-south: unlocked" in log
    assert "enabled" in log  # elevator floors: the simulated readers logged in and work
    assert "for 3600 s" not in log  # the forged unlock never reached a gate
    conf = (tmp_path / "mqtt" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and f"acl_file {tmp_path / 'mqtt' / 'acl'}" in conf


async def test_demo_with_the_embedded_broker_requires_logins_too(tmp_path: Path) -> None:
    proc, demo = await _start_demo(tmp_path, "--duration", "15", "--broker", "amqtt")
    try:
        _device_logins_and_monitor(demo)
        async with httpx.AsyncClient(base_url=demo["api"], timeout=10) as http:
            await _refuses_anonymous_and_forgery(demo, http, await _resident(http, demo))
    finally:
        log = await _stop(proc)
    assert "amqtt broker" in log and "anonymous clients refused" in log
    assert "enabled" in log  # the simulators logged in through the embedded broker


def _alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie counts as gone: it has stopped)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def _broker_pid(data_dir: Path) -> int:
    """The demo's Mosquitto: the process running the demo's generated configuration."""
    conf = str(data_dir / "mqtt" / "mosquitto.conf")
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if conf.encode() in argv:
                return int(entry.name)
    raise AssertionError(f"no mosquitto runs {conf}")


async def _start_in_own_session(
    tmp_path: Path, log: Path, stale: dict[str, Any] | None = None,
) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    """`scgw demo` as a terminal's foreground job: its own process group, so that a SIGINT
    to the group reaches the demo and every child it did not detach, like Ctrl-C does.
    `stale`: a killed demo's demo.json, still there until the new demo replaces it.
    Output goes to `log`, not a pipe: a pipe would stay open as long as any descendant
    lives, and whether one outlives the demo is what these tests look at."""
    scgw = shutil.which("scgw", path=str(Path(sys.executable).parent))
    assert scgw is not None
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            scgw, "demo", "--data-dir", str(tmp_path), "--port", "0",
            stdout=out, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )
    demo_json = tmp_path / "demo.json"
    async with asyncio.timeout(120):
        while (demo := _read_demo_json(demo_json)) is None or demo == stale:
            if proc.returncode is not None:
                raise AssertionError(f"the demo stopped: {log.read_text()[-3000:]}")
            await asyncio.sleep(0.1)
    return proc, demo


def _holding(directory: Path) -> list[int]:
    """Processes with a file under `directory` open."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # gone meanwhile
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            if target.startswith(f"{directory}/"):
                pids.append(int(entry.name))
                break
    return pids


def _read_demo_json(path: Path) -> dict[str, Any] | None:
    try:
        demo: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet, or being written
        return None
    return demo


def _after_the_signal(text: str) -> str:
    """What the demo printed from the moment it was told to stop."""
    start = text.find("gateway.app.runtime: stopping")
    assert start >= 0, text[-3000:]
    return text[start:]


async def _second_demo(data_dir: Path) -> tuple[int, str]:
    scgw = shutil.which("scgw", path=str(Path(sys.executable).parent))
    assert scgw is not None
    second = await asyncio.create_subprocess_exec(
        scgw, "demo", "--data-dir", str(data_dir), "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, errs = await asyncio.wait_for(second.communicate(), 60)
    finally:
        if second.returncode is None:
            second.kill()
            await second.wait()
    assert second.returncode is not None
    return second.returncode, (out + errs).decode()


async def test_a_second_demo_refuses_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    """Issue 13: a second demo in the same directory re-migrated the running one's database;
    Ctrl-C printed a page of ExceptionGroup because Mosquitto got the SIGINT too."""
    require(mosquitto_binary() is not None, "mosquitto")
    log = tmp_path.parent / f"{tmp_path.name}.log"
    proc, demo = await _start_in_own_session(tmp_path, log)
    try:
        broker_pid = _broker_pid(tmp_path)
        db_file = tmp_path / "demo.db"
        inode = db_file.stat().st_ino

        code, text = await _second_demo(tmp_path)
        assert code != 0
        assert text.strip().splitlines() == [
            f"scgw demo: another demo (pid {proc.pid}) is running in {tmp_path}; stop it or "
            "pass another --data-dir"]
        assert db_file.stat().st_ino == inode  # the running demo's database was not touched
        async with httpx.AsyncClient(base_url=demo["api"], timeout=10) as http:
            await _resident(http, demo)  # the first demo still serves

        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
        started = time.monotonic()
        await asyncio.wait_for(proc.wait(), 30)
        elapsed = time.monotonic() - started
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    tail = _after_the_signal(log.read_text())
    assert proc.returncode == 0, tail[-3000:]
    assert "Traceback" not in tail and "ExceptionGroup" not in tail, tail[-3000:]
    assert tail.rstrip().endswith("scgw demo stopped")
    assert not _alive(broker_pid)  # the demo stopped its broker itself
    print(f"demo stopped {elapsed:.2f} s after SIGINT")  # measured, see docs/benchmarks.md


async def test_a_killed_demo_leaves_no_lock_behind(tmp_path: Path) -> None:
    """flock, not a pid file: kill -9 drops the lock, and the broker goes with the demo."""
    require(mosquitto_binary() is not None, "mosquitto")
    first_log = tmp_path.parent / f"{tmp_path.name}-first.log"
    again_log = tmp_path.parent / f"{tmp_path.name}-again.log"
    proc, first = await _start_in_own_session(tmp_path, first_log)
    again: asyncio.subprocess.Process | None = None
    try:
        broker_pid = _broker_pid(tmp_path)
        proc.kill()
        await proc.wait()
        async with asyncio.timeout(30):
            while _alive(broker_pid):  # the kernel's parent-death signal
                await asyncio.sleep(0.1)
        again, _ = await _start_in_own_session(tmp_path, again_log, stale=first)
        again.send_signal(signal.SIGTERM)
        await asyncio.wait_for(again.wait(), 30)
        tail = _after_the_signal(again_log.read_text())
        assert again.returncode == 0, tail[-3000:]
        assert "Traceback" not in tail and tail.rstrip().endswith("scgw demo stopped")
    finally:
        for p in (proc, again):
            if p is not None and p.returncode is None:
                p.kill()
                await p.wait()
        for pid in _holding(tmp_path):  # what the killed demo left running (by pid)
            os.kill(pid, signal.SIGKILL)
