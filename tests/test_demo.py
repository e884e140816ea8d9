"""`scgw demo` end to end, as a newcomer runs it: a subprocess, demo.json, the API, MQTT."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import aiomqtt
import httpx

from simulators.demo.broker import mosquitto_binary
from tests.servers import require


async def test_demo_runs_a_community_a_resident_can_use(tmp_path: Path) -> None:
    require(mosquitto_binary() is not None, "mosquitto")
    scgw = shutil.which("scgw", path=str(Path(sys.executable).parent))
    assert scgw is not None
    proc = await asyncio.create_subprocess_exec(
        scgw, "demo", "--data-dir", str(tmp_path), "--port", "0", "--duration", "20",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    demo_json = tmp_path / "demo.json"
    try:
        for _ in range(300):
            if demo_json.exists() and demo_json.stat().st_size > 0:
                break
            await asyncio.sleep(0.1)
        demo = json.loads(demo_json.read_text())
        roles = {u["role"] for u in demo["users"]}
        assert roles == {"resident", "staff", "engineer", "admin"}
        residents = [u for u in demo["users"] if u["role"] == "resident"]
        assert len(residents) >= 2
        kinds = {d["kind"] for d in demo["devices"]}
        assert kinds == {"gate", "elevator", "canteen", "hvac", "fresh_air", "air_purifier",
                         "meter"}
        passwords = [u["password"] for u in demo["users"]]
        assert len(set(passwords)) == len(passwords) and all(len(p) >= 12 for p in passwords)

        mqtt = demo["mqtt"]
        async with (
            httpx.AsyncClient(base_url=demo["api"], timeout=10) as http,
            aiomqtt.Client(mqtt["host"], mqtt["port"]) as observer,
        ):
            await observer.subscribe(f"{mqtt['root']}/devices/gate-north/command", qos=1)
            login = await http.post("/api/v1/auth/token", data={
                "username": residents[0]["username"], "password": residents[0]["password"]})
            assert login.status_code == 200, login.text
            auth = {"Authorization": f"Bearer {login.json()['access_token']}"}
            token = await http.post("/api/v1/me/access-token", headers=auth)
            assert token.status_code == 200 and token.json()["qr"].startswith("SC1.")
            unlock = await http.post("/api/v1/gates/gate-north/unlock", headers=auth)
            assert unlock.status_code == 202, unlock.text
            async with asyncio.timeout(10):
                async for message in observer.messages:
                    assert isinstance(message.payload, bytes)
                    command = json.loads(message.payload)
                    if command.get("command_id") == unlock.json()["command_id"]:
                        assert command["action"] == "unlock"
                        break
        output, _ = await asyncio.wait_for(proc.communicate(), 40)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, output.decode()[-3000:]
    log = output.decode()
    assert "gate-north: unlocked" in log or "gate-south: unlocked" in log
    assert "enabled" in log  # elevator floors
