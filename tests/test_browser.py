"""The dashboard in headless Chromium against `scgw demo`, as a newcomer would use it.

One demo for the module (real Mosquitto with logins, simulated readers, canteen terminal and
Modbus units, the gateway with its API and dashboard) and one browser (Debian's chromium
driven by Playwright, a fresh profile). Each role signs in on its own page (sessionStorage is
per tab). The resident's QR is read back from a screenshot of the page with zxing-cpp and
shown to the gate over MQTT as a reader would; the staff page, already open, shows that
opening by itself (live events). Each role's main page is saved to docs/screenshots/ at
desktop and phone (390x844) size, and the phone size must not scroll sideways.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
import zxingcpp
from PIL import Image
from playwright.sync_api import BrowserContext, Page, sync_playwright

from simulators.demo.broker import mosquitto_binary
from tests.servers import require

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 45_000  # the box is shared: generous, and every wait is for a condition


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require(mosquitto_binary() is not None, "mosquitto")
    data = tmp_path_factory.mktemp("demo")
    scgw = shutil.which("scgw", path=str(Path(sys.executable).parent))
    assert scgw is not None
    log_path = data / "demo.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([scgw, "demo", "--data-dir", str(data), "--port", "0"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        info = _wait_for_demo(proc, data / "demo.json", log_path)
        yield info
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_demo(proc: subprocess.Popen[bytes], demo_json: Path, log: Path
                   ) -> dict[str, Any]:
    """demo.json is written once the gateway and its API run (the simulators start next)."""
    deadline = time.monotonic() + 180  # a loaded box; a quiet one takes seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if demo_json.exists() and demo_json.stat().st_size > 0:
            info: dict[str, Any] = json.loads(demo_json.read_text())
            return info
        time.sleep(0.1)
    raise AssertionError(f"the demo did not come up: {log.read_text()[-3000:]}")


class Browser:
    """Playwright's sync API in a thread of its own: it runs an event loop in the thread that
    starts it, and pytest-asyncio's fixtures need the test's thread free of one."""

    def __init__(self, profile: Path) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="browser")
        self._pool.submit(self._start, profile).result()

    def _start(self, profile: Path) -> None:
        self._playwright = sync_playwright().start()
        self.context = self._playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport=DESKTOP)  # type: ignore[arg-type]
        self.context.set_default_timeout(WAIT_MS)

    def _stop(self) -> None:
        self.context.close()
        self._playwright.stop()

    def run(self, scenario: Callable[[BrowserContext, dict[str, Any]], None],
            demo: dict[str, Any]) -> None:
        self._pool.submit(scenario, self.context, demo).result()

    def close(self) -> None:
        try:
            self._pool.submit(self._stop).result()
        finally:
            self._pool.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    require(Path(CHROMIUM).exists(), "chromium")
    running = Browser(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield running
    finally:
        running.close()


def _user(demo: dict[str, Any], role: str, index: int = 0) -> dict[str, Any]:
    users = [u for u in demo["users"] if u["role"] == role]
    return dict(users[index])


def _open(browser: BrowserContext, demo: dict[str, Any], clock: bool = False
          ) -> tuple[Page, list[str]]:
    """A new tab on the dashboard; the list collects the page's uncaught script errors.
    `clock`: the page's timers run on Playwright's clock (it flows, and can jump ahead)."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    if clock:
        page.clock.install()
    page.goto(demo["api"])
    return page, errors


def _sign_in(browser: BrowserContext, demo: dict[str, Any], role: str, index: int = 0,
             clock: bool = False) -> tuple[Page, list[str]]:
    page, errors = _open(browser, demo, clock)
    user = _user(demo, role, index)
    page.fill("#login-form input[name=username]", user["username"])
    page.fill("#login-form input[name=password]", user["password"])
    page.click("#login-form button")
    page.wait_for_selector(f"body[data-role={role}]")
    return page, errors


def _no_sideways_scroll(page: Page) -> bool:
    return bool(page.evaluate(
        "document.documentElement.scrollWidth <= document.documentElement.clientWidth"))


def _screenshots(page: Page, name: str) -> None:
    """Desktop and phone pictures of the page, and the phone size must not scroll sideways."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.set_viewport_size(DESKTOP)  # type: ignore[arg-type]
    _save(page.screenshot(), SCREENSHOTS / f"{name}-desktop.png")
    page.set_viewport_size(PHONE)  # type: ignore[arg-type]
    page.wait_for_function(
        "() => document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    _save(page.screenshot(), SCREENSHOTS / f"{name}-phone.png")
    assert _no_sideways_scroll(page), f"{name}: the 390x844 page scrolls sideways"
    page.set_viewport_size(DESKTOP)  # type: ignore[arg-type]


def _save(png: bytes, path: Path) -> None:
    """A palette PNG: a fraction of the size of the raw screenshot, sharp for a UI."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _points(page: Page, chart: str) -> int:
    return int(page.get_attribute(chart, "data-points") or 0)


def _wait_for_points(page: Page, chart: str, at_least: int) -> None:
    """Functions, not expressions: the dashboard's CSP forbids eval(), Playwright's too."""
    page.wait_for_function("([sel, n]) => Number(document.querySelector(sel).dataset.points) >= n",
                           arg=[chart, at_least])


def test_engineer_watches_the_power_chart_fill_live(demo: dict[str, Any],
                                                    browser: Browser) -> None:
    browser.run(_engineer, demo)


def _engineer(browser: BrowserContext, demo: dict[str, Any]) -> None:
    page, errors = _sign_in(browser, demo, "engineer")
    page.wait_for_selector("#live.on")  # the event stream is open, so the chart is fed by it
    page.wait_for_selector("#power-chart canvas")
    first = _points(page, "#power-chart")
    _wait_for_points(page, "#power-chart", first + 3)
    page.wait_for_selector("#power-stats .stat b")  # community power now, per building, kind

    # Every device of every kind has a tile saying online or offline (never unknown), and the
    # Modbus units the gateway polls (no broker login in demo.json) are online.
    ids = sorted(d["device_id"] for d in demo["devices"])
    polled = [d["device_id"] for d in demo["devices"] if d["mqtt_username"] is None]
    assert polled
    page.wait_for_function(
        "(ids) => ids.every(id => document.querySelector("
        "`#device-grid .dev[data-device='${id}'][data-state=online]`))", arg=polled)
    tiles = page.eval_on_selector_all(
        "#device-grid .dev", "els => els.map(e => [e.dataset.device, e.dataset.state])")
    assert sorted(t[0] for t in tiles) == ids
    assert {t[1] for t in tiles} <= {"online", "offline"}, tiles

    # Control offers only what the unit can be told, and asks before sending it.
    field = page.wait_for_selector("#control-form input[type=number]")
    assert field is not None
    page.wait_for_function("(el) => el.value !== ''", arg=field)  # the unit's current value
    field.fill("1" if field.input_value() != "1" else "2")
    page.click("#control-form button")
    page.wait_for_selector("#control-confirm")
    page.click("#control-confirm button.secondary")  # cancel: nothing is sent
    assert page.query_selector("#control-confirm") is None

    _wait_for_points(page, "#power-chart", _points(page, "#power-chart") + 1)
    _screenshots(page, "engineer")
    assert errors == []


def _decode_qr(page: Page) -> str:
    image = Image.open(io.BytesIO(page.locator("#qr").screenshot()))
    found = zxingcpp.read_barcodes(image)
    assert found, "no QR code found in the resident page's picture"
    return str(found[0].text)


async def _present_at_gate(demo: dict[str, Any], gate: str, token: str, request_id: str
                           ) -> dict[str, Any]:
    """Shows `token` to `gate` as its reader does (CONTRACT.md section 1), with its login."""
    mqtt = demo["mqtt"]
    device = next(d for d in demo["devices"] if d["device_id"] == gate)
    base = f"{mqtt['root']}/devices/{gate}/access"
    async with aiomqtt.Client(mqtt["host"], mqtt["port"], username=device["mqtt_username"],
                              password=device["mqtt_password"],
                              identifier=f"{gate}-browser-test") as client:
        await client.subscribe(f"{base}/decision", qos=1)
        request = {"request_id": request_id, "credential": {"type": "qr", "value": token},
                   "ts": time.time()}
        await client.publish(f"{base}/request", json.dumps(request).encode(), qos=1)
        async with asyncio.timeout(WAIT_MS / 1000):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                decision: dict[str, Any] = json.loads(message.payload)
                if decision.get("request_id") == request_id:
                    return decision
    raise AssertionError("unreachable")


def test_resident_qr_opens_a_gate_and_the_staff_page_shows_it(
        demo: dict[str, Any], browser: Browser) -> None:
    browser.run(_resident_and_staff, demo)


def _resident_and_staff(browser: BrowserContext, demo: dict[str, Any]) -> None:
    resident = _user(demo, "resident")
    staff, staff_errors = _sign_in(browser, demo, "staff")
    staff.wait_for_selector("#live.on")
    staff.select_option("#access-filters select[name=resident_id]", resident["resident_id"])
    staff.wait_for_selector("#access-log table, #access-log p")

    page, errors = _sign_in(browser, demo, "resident", clock=True)
    page.wait_for_selector("#qr[data-expires-at]")
    shown_until = float(page.get_attribute("#qr", "data-expires-at") or 0)
    token = _decode_qr(page)
    assert token.startswith("SC1.")
    request_id = f"browser-{secrets.token_hex(4)}"
    with ThreadPoolExecutor(1, thread_name_prefix="reader") as reader:  # a loop of its own
        decision = reader.submit(asyncio.run, _present_at_gate(demo, "gate-north", token,
                                                               request_id)).result()
    assert decision["granted"] is True and decision["action"] == "unlock", decision

    # The staff page, open all along, shows the opening without a reload.
    row = staff.wait_for_selector(f"#access-log tr[data-request='{request_id}']")
    assert row is not None
    assert row.get_attribute("data-granted") == "true"
    assert row.get_attribute("data-device") == "gate-north"
    assert row.get_attribute("data-resident") == resident["resident_id"]
    _screenshots(staff, "staff")

    page.wait_for_function("() => document.querySelector('#balance').textContent.includes('¥')")
    assert "¥" in (page.text_content("#balance") or "")
    assert "Invalid Date" not in (page.text_content("#view-resident") or "")
    _screenshots(page, "resident")

    # The QR renews itself before the shown one expires (the page's clock jumps to 6 s short
    # of expiry; nobody clicks), and the new code decodes to a new token.
    shown = int(page.get_attribute("#qr", "data-shown") or 0)
    page_now = float(page.evaluate("Date.now() / 1000"))
    page.clock.fast_forward(max(0, int((shown_until - 6 - page_now) * 1000)))
    page.wait_for_function("(n) => Number(document.querySelector('#qr').dataset.shown) > n",
                           arg=shown)
    assert float(page.get_attribute("#qr", "data-shown-at") or "inf") < shown_until
    assert _decode_qr(page) not in ("", token)
    assert errors == [] and staff_errors == []


def test_admin_manages_users_and_the_session_survives_a_reload(
        demo: dict[str, Any], browser: Browser) -> None:
    browser.run(_admin, demo)


def _admin(browser: BrowserContext, demo: dict[str, Any]) -> None:
    admin = _user(demo, "admin")
    page, errors = _open(browser, demo)
    page.fill("#login-form input[name=username]", admin["username"])
    page.fill("#login-form input[name=password]", "not-the-password")
    page.click("#login-form button")
    page.wait_for_selector("#login-error:not(:empty)")
    refused = httpx.post(f"{demo['api']}/api/v1/auth/token",
                         data={"username": admin["username"], "password": "not-the-password"})
    assert page.text_content("#login-error") == refused.json()["detail"]

    page.close()
    page, errors = _sign_in(browser, demo, "admin")
    tabs = page.eval_on_selector_all("#tabs a", "els => els.map(e => e.dataset.view)")
    assert tabs == ["engineer", "staff", "admin", "account"]
    page.click("#tabs a[data-view=admin]")
    page.wait_for_selector(f"#users tr[data-user='{admin['username']}']")
    for user in demo["users"]:
        assert page.query_selector(f"#users tr[data-user='{user['username']}']") is not None
    _screenshots(page, "admin")

    page.reload()  # the session survives a reload, on the same view
    page.wait_for_selector(f"#users tr[data-user='{admin['username']}']")
    page.click("#logout")
    page.wait_for_selector("#login:not([hidden])")
    page.reload()
    page.wait_for_selector("#login:not([hidden])")
    assert page.query_selector("body[data-role]") is None
    assert errors == []
