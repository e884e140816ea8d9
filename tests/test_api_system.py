"""Health, readiness, metrics, the device list and the dashboard, with role checks."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import jwt
from prometheus_client.parser import text_string_to_metric_families

from simulators.demo.broker import Mosquitto
from tests.community import Running, running_gateway


def assert_prometheus_types(text: str) -> None:
    """What Prometheus' own parser reads: every counter's samples end in `_total`, and
    nothing else's does (a gauge named `..._total` would be summed as a counter)."""
    families = list(text_string_to_metric_families(text))
    assert len(families) > 20
    for family in families:
        names = {s.name for s in family.samples}
        if family.type == "counter":
            assert names <= {f"{family.name}_total"}, (family.name, names)
        else:
            assert not any(n.endswith("_total") for n in names), (family.name, family.type)
            assert family.type in ("gauge", "histogram", "unknown", "info"), family.type
    assert {f.name for f in families if f.type == "counter"} >= {
        "scgw_sse_dropped", "scgw_access_decisions", "scgw_api_logins"}


async def _token(http: httpx.AsyncClient, run: Running, role: str) -> dict[str, str]:
    user = run.login(role)
    login = await http.post("/api/v1/auth/token",
                            data={"username": user["username"], "password": user["password"]})
    assert login.status_code == 200, login.text
    return {"Authorization": f"Bearer {login.json()['access_token']}"}


async def test_system_endpoints_and_roles(mosquitto: Mosquitto, tmp_path: Path) -> None:
    async with (
        running_gateway(mosquitto, tmp_path) as run,
        httpx.AsyncClient(base_url=run.api, timeout=10) as http,
    ):
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        assert (await http.get("/readyz")).json() == {"ready": True, "problems": []}
        metrics = (await http.get("/metrics")).text
        assert "# TYPE scgw_mqtt_connected gauge" in metrics
        assert "scgw_mqtt_connected 1" in metrics
        assert_prometheus_types(metrics)
        page = await http.get("/")
        assert page.status_code == 200 and "<title>scgw dashboard</title>" in page.text
        assert (await http.get("/openapi.json")).json()["info"]["title"] == "scgw"

        assert (await http.get("/api/v1/devices")).status_code == 401
        resident = await _token(http, run, "resident")
        assert (await http.get("/api/v1/devices", headers=resident)).status_code == 403
        for role in ("staff", "engineer", "admin"):
            devices = await http.get("/api/v1/devices", headers=await _token(http, run, role))
            assert devices.status_code == 200
            assert {d["device_id"] for d in devices.json()} >= {"gate-north", "elev-b1-1"}
        staff = await _token(http, run, "staff")
        assert (await http.post("/api/v1/me/access-token", headers=staff)).status_code == 403


async def test_pages_assets_and_not_found_answers_work_offline(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with (
        running_gateway(mosquitto, tmp_path) as run,
        httpx.AsyncClient(base_url=run.api, timeout=10) as http,
    ):
        page = await http.get("/")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'self'" in policy
        assert "unsafe-inline" not in policy.split("script-src", 1)[1].split(";", 1)[0]
        # The policy forbids inline scripts, so the page has none.
        scripts = re.findall(r"<script\b[^>]*>", page.text)
        assert scripts and all("src=" in tag for tag in scripts), scripts
        for src in re.findall(r'(?:src|href)="(/[^"]*)"', page.text):
            asset = await http.get(src)
            assert asset.status_code == 200, src
        icon = await http.get("/favicon.ico")
        assert icon.status_code == 200 and icon.content

        docs = await http.get("/docs")
        assert docs.status_code == 200
        assert "https://" not in docs.text.replace("https://swagger.io", "")  # no CDN
        for url in ("/static/swagger/swagger-ui-bundle.js", "/static/swagger/swagger-ui.css"):
            assert url in docs.text
            served = await http.get(url)
            assert served.status_code == 200 and len(served.content) > 100_000
            assert "max-age" in served.headers["cache-control"]
        assert (await http.get("/redoc")).status_code == 404

        nosuch = await http.get("/nosuch")
        assert nosuch.status_code == 404
        assert nosuch.json() == {"detail": "no route GET /nosuch"}
        wrong = await http.delete("/healthz")
        assert wrong.status_code == 405 and "DELETE /healthz" in wrong.json()["detail"]
        engineer = await _token(http, run, "engineer")
        latest = await http.get("/api/v1/devices/zz-none/latest", headers=engineer)
        assert latest.json() == {"detail": "no device 'zz-none'"}


async def test_tokens_with_wrong_algorithm_audience_or_expiry_are_refused(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with (
        running_gateway(mosquitto, tmp_path) as run,
        httpx.AsyncClient(base_url=run.api, timeout=10) as http,
    ):
        good = (await _token(http, run, "staff"))["Authorization"].split()[1]
        claims = jwt.decode(good, options={"verify_signature": False})
        secret = run.config.api.jwt_secret
        assert secret is not None
        key = secret.get_secret_value()
        forged = [
            jwt.encode({**claims, "exp": claims["iat"] - 10}, key, algorithm="HS256"),
            jwt.encode({**claims, "aud": "someone-else"}, key, algorithm="HS256"),
            jwt.encode(claims, key, algorithm="HS512"),
            jwt.encode(claims, "x" * 40, algorithm="HS256"),
            jwt.encode(claims, None, algorithm="none"),
        ]
        for token in forged:
            answer = await http.get("/api/v1/devices", headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 401, token
        assert (await http.get("/api/v1/devices",
                               headers={"Authorization": f"Bearer {good}"})).status_code == 200


async def test_bad_login_bodies_get_4xx(mosquitto: Mosquitto, tmp_path: Path) -> None:
    async with (
        running_gateway(mosquitto, tmp_path) as run,
        httpx.AsyncClient(base_url=run.api, timeout=10) as http,
    ):
        assert (await http.post("/api/v1/auth/token", data={})).status_code == 422
        assert (await http.post("/api/v1/auth/token", json={"x": 1})).status_code == 422
        nobody = await http.post("/api/v1/auth/token", data={"username": "nobody",
                                                              "password": "x" * 12})
        assert nobody.status_code == 401
        call = await http.post("/api/v1/elevators/elev-b1-1/call",
                               headers=await _token(http, run, "resident"), json={"floor": "x"})
        assert call.status_code == 422
