"""Supervision: a crashed component is restarted with backoff or ends the process, never a zombie.

The unit tests pin the policy; the gateway test injects one crash into each long-lived
component of a running gateway (over a real Mosquitto) and shows which of the two happens.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from device_drivers.modbus.fleet import _Unit
from device_drivers.mqtt import MqttLink
from device_drivers.supervision import ComponentFailed, Supervisor, cancel_until_done
from gateway.access.audit import AuditLog
from gateway.access.service import AccessService
from gateway.app.runtime import _ApiServer
from gateway.telemetry.latest_store import LatestCache
from simulators.demo.broker import Mosquitto
from simulators.readers import ReaderSimulator
from tests.community import running_gateway


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


async def test_a_crashed_task_is_logged_by_name_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("boom")
        await asyncio.Event().wait()

    async with Supervisor("t", backoff_min_s=0.01) as supervisor:
        handle = supervisor.spawn("flaky-worker", flaky)
        await _until(lambda: runs == 2)
        assert handle.running and handle.crashes == 1
        await handle.stop()
    assert "task flaky-worker crashed; restarting" in caplog.text


async def test_a_cancel_lost_in_wait_for_is_repeated_until_the_task_stops() -> None:
    """aiomqtt's publish waits for its PUBACK with asyncio.wait_for; on Python 3.11 a cancel
    arriving with the reply is lost, and a loop around it walks on (CI: a demo resident
    kept using the gates after SIGTERM)."""
    replies: list[asyncio.Future[None]] = []

    async def walker() -> None:
        while True:
            reply = asyncio.get_running_loop().create_future()
            replies.append(reply)
            await asyncio.wait_for(reply, 5)

    task = asyncio.create_task(walker())
    await _until(lambda: len(replies) == 1)
    replies[0].set_result(None)  # the PUBACK and the cancel in the same loop iteration
    task.cancel()
    await _until(lambda: len(replies) == 2 or task.done())
    if sys.version_info < (3, 12):
        assert not task.done()  # the cancel was swallowed: what cancel_until_done is for
    assert await cancel_until_done(task, timeout_s=2.0)
    assert task.cancelled()


async def test_a_crash_without_restart_ends_the_supervisor() -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    async def healthy() -> None:
        await asyncio.Event().wait()

    with pytest.raises(ExceptionGroup) as caught:
        async with Supervisor("t") as supervisor:
            other = supervisor.spawn("healthy", healthy)
            supervisor.spawn("critical", broken, restart=False)
            await asyncio.Event().wait()  # cancelled by the failure
    failed = caught.value.exceptions[0]
    assert isinstance(failed, ComponentFailed) and failed.name == "critical"
    assert not other.running


async def test_a_component_that_keeps_crashing_escalates() -> None:
    async def always() -> None:
        raise RuntimeError("boom")

    with pytest.raises(ExceptionGroup) as caught:
        async with Supervisor("t", max_restarts=3, backoff_min_s=0.001,
                              backoff_max_s=0.002) as supervisor:
            supervisor.spawn("crashloop", always)
            await asyncio.Event().wait()
    assert isinstance(caught.value.exceptions[0], ComponentFailed)


def _crash_once(original: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Wrap a component's loop so its first run crashes shortly after starting."""
    crashed = False

    async def wrapper(*args: Any, **kwargs: Any) -> None:
        nonlocal crashed
        if not crashed:
            crashed = True
            await asyncio.sleep(0.05)
            raise RuntimeError("injected crash")
        await original(*args, **kwargs)

    return wrapper


RESTARTED = [
    (AccessService, "_watch", "access-index-watch"),
    (AuditLog, "_run", "audit-writer"),
    (LatestCache, "_run", "latest-cache"),
    (MqttLink, "_run", "mqtt-link-"),
    (_Unit, "run", "modbus:"),
]


@pytest.mark.parametrize(("cls", "method", "task"), RESTARTED,
                         ids=[name for _, _, name in RESTARTED])
async def test_each_gateway_component_is_restarted_after_a_crash(
    mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, cls: type, method: str, task: str,
) -> None:
    caplog.set_level(logging.ERROR, logger="device_drivers.supervision")
    monkeypatch.setattr(cls, method, _crash_once(getattr(cls, method)))
    unit = {"device_id": "ahu-1", "kind": "hvac", "host": "127.0.0.1", "port": 1,
            "profile": "heat-pump-split", "poll_interval_s": 0.2}
    async with running_gateway(mosquitto, tmp_path, extra_devices=[unit]) as run:
        supervisor = run.gateway.supervisor
        assert supervisor is not None
        await _until(lambda: any(h.crashes for n, h in supervisor.tasks.items()
                                 if n.startswith(task)))
        name, handle = next((n, h) for n, h in supervisor.tasks.items() if n.startswith(task))
        await _until(lambda: handle.running)
        assert f"task {name} crashed; restarting" in caplog.text
        # The gateway still decides: the access path survived the crash and the restart.
        async with ReaderSimulator(mosquitto.host, mosquitto.port, "gate-north", "gate",
                                   run.root) as gate:
            card = run.people.residents[0].cards["gate"]
            decision = await gate.present("card", card, timeout_s=10)
            assert decision["granted"] is True


async def test_a_crashed_api_server_ends_the_gateway_with_an_error(
    mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = _ApiServer.serve

    async def serve_then_crash(self: _ApiServer, *args: Any, **kwargs: Any) -> None:
        serving = asyncio.ensure_future(original(self, *args, **kwargs))
        await _until(lambda: self.started)
        await asyncio.sleep(0.2)
        serving.cancel()
        raise RuntimeError("injected crash")

    monkeypatch.setattr(_ApiServer, "serve", serve_then_crash)
    with pytest.raises(ExceptionGroup) as caught:
        async with running_gateway(mosquitto, tmp_path) as run:
            supervisor = run.gateway.supervisor
            assert supervisor is not None
            await _until(lambda: not supervisor.tasks["api-server"].running)
    failed = caught.value.exceptions[0]
    assert isinstance(failed, ComponentFailed) and failed.name == "api-server"
