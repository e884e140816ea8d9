"""`scgw mqtt-config` (CONTRACT.md section 6): the files, their formats and modes, keeping
and rotating passwords, TLS; checked against the real mosquitto_passwd and mosquitto."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import ssl
import stat
import subprocess
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from typer.testing import CliRunner

from gateway.app.cli import app
from gateway.app.mqtt_config import (
    PBKDF2_ITERATIONS,
    AclEntry,
    acl_allows,
    filter_within,
    hash_password,
    parse_acl,
    parse_passwd,
    topic_matches,
    verify_password,
)
from simulators.demo.broker import Mosquitto, free_port, mosquitto_binary
from tests.servers import require

DEPLOY_MOSQUITTO = Path(__file__).parents[1] / "deploy" / "mosquitto" / "mosquitto.conf"

SITE = """\
site: {{id: acme}}
mqtt:
  url: {url}
  root: acme
{username}buildings:
  - {{id: b1, floors: [{{number: 1}}]}}
devices:
  - {{device_id: gate-north, kind: gate}}
  - {{device_id: elev-1, kind: elevator, building: b1}}
  - {{device_id: canteen-1, kind: canteen}}
  - {{device_id: meter-mqtt, kind: meter}}
  - {{device_id: meter-polled, kind: meter, profile: eastron-sdm630, host: 127.0.0.1}}
{more}"""


def site_file(tmp_path: Path, *, url: str = "mqtt://127.0.0.1:1883", more: str = "",
              username: str | None = "gw-acme") -> Path:
    path = tmp_path / "site.yaml"
    user = f"  username: {username}\n" if username else ""
    path.write_text(SITE.format(url=url, more=more, username=user))
    return path


def mqtt_config(*args: str | Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    environ: dict[str, str | None] = {"SCGW__MQTT__PASSWORD": None, **(env or {})}
    result = CliRunner().invoke(app, ["mqtt-config", *map(str, args)], env=environ)
    return result.exit_code, result.output


def credentials(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "credentials.json").read_text())
    return data


def passwords(out: Path) -> dict[str, str]:
    data = json.loads((out / "credentials.json").read_text())
    found = {data["gateway"]["username"]: data["gateway"]["password"],
             data["monitor"]["username"]: data["monitor"]["password"]}
    found.update({login["username"]: login["password"] for login in data["devices"].values()})
    return found


# ---- the password file ----------------------------------------------------------------

def test_hashes_have_mosquitto_passwd_format_and_verify_its_hashes(tmp_path: Path) -> None:
    require(shutil.which("mosquitto_passwd") is not None, "mosquitto (mosquitto_passwd)")
    encoded = hash_password("correct horse")
    assert re.fullmatch(rf"\$7\${PBKDF2_ITERATIONS}\$[A-Za-z0-9+/]{{16}}\$[A-Za-z0-9+/]{{86}}==",
                        encoded), encoded
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct horse ", encoded)
    # The other way round: a file written by the real tool verifies here (the embedded
    # broker reads Mosquitto's files), and its format is the one we write.
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "alice", "s3cret"], check=True)
    theirs = parse_passwd(passwd.read_text())["alice"]
    assert theirs.split("$")[:3] == encoded.split("$")[:3]  # '', '7', iterations
    assert verify_password("s3cret", theirs) and not verify_password("s3cret!", theirs)
    # Mosquitto 1.x's salted SHA-512 (`-H sha512`), which a hand-kept file may still hold.
    subprocess.run(["mosquitto_passwd", "-H", "sha512", "-b", str(passwd), "bob", "pw"],
                   check=True)
    old = parse_passwd(passwd.read_text())["bob"]
    assert old.startswith("$6$") and verify_password("pw", old) and not verify_password("p", old)
    assert not verify_password("x", "$7$notanumber$AAAA$AAAA")
    assert not verify_password("x", "plaintext")


# ---- scgw mqtt-config -----------------------------------------------------------------

def test_writes_the_four_files_with_logins_for_mqtt_devices_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, output = mqtt_config("--config", site_file(tmp_path), "--out", out)
    assert code == 0, output
    assert {p.name for p in out.iterdir()} == {"mosquitto.conf", "passwd", "acl",
                                               "credentials.json"}
    assert stat.S_IMODE((out / "credentials.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "passwd").stat().st_mode) & 0o007 == 0  # hashes: not world
    data = credentials(out)
    assert data["gateway"] == {"username": "gw-acme", "password": data["gateway"]["password"]}
    assert data["monitor"]["username"] == "scgw-monitor"
    devices = data["devices"]
    assert isinstance(devices, dict)
    assert sorted(devices) == ["canteen-1", "elev-1", "gate-north", "meter-mqtt"]  # no polled
    assert all(devices[d]["username"] == d for d in devices)
    secrets_ = passwords(out)
    assert len(set(secrets_.values())) == len(secrets_) == 6
    assert all(len(p) >= 22 for p in secrets_.values())  # >= 128 bits of URL-safe base64
    for secret in secrets_.values():  # never printed
        assert secret not in output
    assert "meter-polled" not in (out / "passwd").read_text()
    hashes = parse_passwd((out / "passwd").read_text())
    assert set(hashes) == set(secrets_)
    assert all(verify_password(secrets_[u], h) for u, h in hashes.items())
    assert "SCGW__MQTT__PASSWORD" in output and str(out / "credentials.json") in output


def test_acl_confines_each_device_to_its_own_topics(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert mqtt_config("--config", site_file(tmp_path), "--out", out)[0] == 0
    rules = parse_acl((out / "acl").read_text())
    assert rules["gw-acme"] == [AclEntry("readwrite", "acme/#")]
    assert rules["scgw-monitor"] == [AclEntry("read", "acme/#")]
    assert "meter-polled" not in rules

    def can(user: str, access: str, topic: str) -> bool:
        return acl_allows(rules, user, topic, access)  # type: ignore[arg-type]

    own = "acme/devices/gate-north"
    for channel in ("status", "access/request", "telemetry", "event"):
        assert can("gate-north", "write", f"{own}/{channel}"), channel
    for channel in ("command", "access/decision", "payment/result", "payment/batch_result"):
        assert not can("gate-north", "write", f"{own}/{channel}"), channel
        assert can("gate-north", "read", f"{own}/{channel}"), channel
        assert not can("gate-north", "read", f"acme/devices/elev-1/{channel}"), channel
    assert not can("gate-north", "write", f"{own}/payment/request")  # a gate never pays
    assert can("canteen-1", "write", "acme/devices/canteen-1/payment/batch")
    assert not can("meter-mqtt", "write", "acme/devices/meter-mqtt/access/request")
    assert not can("gate-north", "write", "acme/devices/elev-1/access/request")
    assert not can("gate-north", "write", "acme/devices/meter-polled/telemetry")
    assert not can("gate-north", "read", f"{own}/telemetry")
    assert not can("gate-north", "subscribe", "#")
    assert not can("gate-north", "subscribe", f"{own}/#")
    assert can("gate-north", "subscribe", f"{own}/command")
    assert can("scgw-monitor", "subscribe", "acme/#")
    assert not can("scgw-monitor", "write", f"{own}/command")
    assert can("gw-acme", "write", f"{own}/command")
    assert can("gw-acme", "write", "acme/gateway/acme/telemetry")
    assert not can("gw-acme", "write", "other/devices/gate-north/command")
    assert not can("nobody", "read", f"{own}/command")
    assert not acl_allows(rules, None, f"{own}/command", "read")


def test_topic_matching_follows_mqtt() -> None:
    assert topic_matches("a/#", "a") and topic_matches("a/#", "a/b/c")
    assert topic_matches("a/+/c", "a/b/c") and not topic_matches("a/+/c", "a/b/d")
    assert not topic_matches("a/b", "a/b/c") and not topic_matches("#", "$SYS/x")
    assert filter_within("a/b/+", "a/#") and filter_within("a/+", "a/+")
    assert not filter_within("a/+", "a/b") and not filter_within("#", "a/#")
    assert not filter_within("a/b/#", "a/b/c") and filter_within("a/b/c", "a/+/c")


def test_regenerating_keeps_passwords_adds_and_drops_devices(tmp_path: Path) -> None:
    out = tmp_path / "out"
    site = site_file(tmp_path)
    assert mqtt_config("--config", site, "--out", out)[0] == 0
    before, passwd_before = passwords(out), (out / "passwd").read_text()
    code, output = mqtt_config("--config", site, "--out", out)
    assert code == 0 and "6 kept, 0 new" in output, output
    assert passwords(out) == before
    assert (out / "passwd").read_text() == passwd_before  # same hashes: nothing to reload

    text = site.read_text().replace("  - {device_id: elev-1, kind: elevator, building: b1}\n",
                                    "  - {device_id: gate-south, kind: gate}\n")
    site.write_text(text)
    code, output = mqtt_config("--config", site, "--out", out)
    assert code == 0 and "5 kept, 1 new" in output and "removed: elev-1" in output, output
    after = passwords(out)
    assert "elev-1" not in after and "gate-south" in after
    assert {u: p for u, p in after.items() if u != "gate-south"} == {
        u: p for u, p in before.items() if u != "elev-1"}
    assert "elev-1" not in (out / "passwd").read_text() + (out / "acl").read_text()


def test_rotate_changes_every_password_or_just_the_named_ones(tmp_path: Path) -> None:
    out = tmp_path / "out"
    site = site_file(tmp_path)
    assert mqtt_config("--config", site, "--out", out)[0] == 0
    first = passwords(out)
    code, output = mqtt_config("--config", site, "--out", out, "--rotate-login", "gate-north")
    assert code == 0 and "1 rotated" in output, output
    second = passwords(out)
    assert second["gate-north"] != first["gate-north"]
    assert {u: p for u, p in second.items() if u != "gate-north"} == {
        u: p for u, p in first.items() if u != "gate-north"}
    assert not verify_password(first["gate-north"],
                               parse_passwd((out / "passwd").read_text())["gate-north"])
    code, output = mqtt_config("--config", site, "--out", out, "--rotate")
    assert code == 0 and "6 rotated" in output, output
    third = passwords(out)
    assert all(third[u] != second[u] for u in third)
    assert mqtt_config("--config", site, "--out", out, "--rotate-login", "nobody")[0] == 2


def test_a_damaged_credentials_file_is_never_silently_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    site = site_file(tmp_path)
    assert mqtt_config("--config", site, "--out", out)[0] == 0
    (out / "credentials.json").write_text("{not json")
    passwd = (out / "passwd").read_text()
    code, output = mqtt_config("--config", site, "--out", out)
    assert code == 2 and "--rotate" in output, output
    assert (out / "passwd").read_text() == passwd  # devices keep working meanwhile
    assert mqtt_config("--config", site, "--out", out, "--rotate")[0] == 0
    assert stat.S_IMODE((out / "credentials.json").stat().st_mode) == 0o600


def test_usernames_must_not_collide_and_the_default_gateway_user_is_announced(
    tmp_path: Path,
) -> None:
    site = site_file(tmp_path, more="  - {device_id: scgw-monitor, kind: gate}\n")
    code, output = mqtt_config("--config", site, "--out", tmp_path / "a")
    assert code == 2 and "scgw-monitor" in output, output
    code, output = mqtt_config("--config", site_file(tmp_path, username=None), "--out",
                               tmp_path / "b")
    assert code == 0 and "add `username: scgw-gateway` under `mqtt:`" in output, output
    assert credentials(tmp_path / "b")["gateway"]["username"] == "scgw-gateway"


def test_a_stale_gateway_password_in_the_environment_is_pointed_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    site = site_file(tmp_path)
    code, output = mqtt_config("--config", site, "--out", out,
                               env={"SCGW__MQTT__PASSWORD": "old-password"})
    assert code == 0 and "is not the gateway's password" in output, output
    assert "old-password" not in output
    right = passwords(out)["gw-acme"]
    code, output = mqtt_config("--config", site, "--out", out,
                               env={"SCGW__MQTT__PASSWORD": right})
    assert code == 0 and "is not the gateway's password" not in output


def _settings(text: str) -> list[tuple[str, str]]:
    pairs = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            pairs.append((key, value))
    return pairs


def test_conf_has_the_shipped_settings_and_refuses_anonymous(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert mqtt_config("--config", site_file(tmp_path), "--out", out, "--bind",
                       "10.0.0.2")[0] == 0
    ours = dict(_settings((out / "mosquitto.conf").read_text()))
    shipped = dict(_settings(DEPLOY_MOSQUITTO.read_text()))
    assert ours["listener"] == "1883 10.0.0.2"
    assert ours["allow_anonymous"] == "false" and ours["per_listener_settings"] == "false"
    assert ours["password_file"] == str(out / "passwd") and ours["acl_file"] == str(out / "acl")
    for key in ("set_tcp_nodelay", "max_queued_messages", "max_queued_bytes",
                "queue_qos0_messages", "max_inflight_messages", "persistent_client_expiration",
                "persistence", "persistence_location", "autosave_interval", "log_dest"):
        assert ours[key] == shipped[key], key
    assert not {"certfile", "keyfile", "cafile"} & ours.keys()


def test_tls_lines_when_certificates_are_given(tmp_path: Path) -> None:
    for name in ("ca.crt", "broker.crt", "broker.key"):
        (tmp_path / name).write_text("placeholder\n")
    out = tmp_path / "out"
    code, output = mqtt_config("--config", site_file(tmp_path), "--out", out, "--certfile",
                               tmp_path / "broker.crt", "--keyfile", tmp_path / "broker.key",
                               "--cafile", tmp_path / "ca.crt")
    assert code == 0, output
    pairs = _settings((out / "mosquitto.conf").read_text())
    assert ("listener", "1883") in pairs and ("listener", "8883") in pairs  # gateway + TLS
    tls_at = pairs.index(("listener", "8883"))
    assert pairs[tls_at + 1:tls_at + 4] == [("certfile", str(tmp_path / "broker.crt")),
                                            ("keyfile", str(tmp_path / "broker.key")),
                                            ("cafile", str(tmp_path / "ca.crt"))]
    # An mqtts:// site: its port is the TLS listener, and there is no plain one.
    secure = site_file(tmp_path, url="mqtts://broker.acme:8884")
    code, output = mqtt_config("--config", secure, "--out", out, "--certfile",
                               tmp_path / "broker.crt", "--keyfile", tmp_path / "broker.key")
    assert code == 0, output
    listeners = [v for k, v in _settings((out / "mosquitto.conf").read_text()) if k == "listener"]
    assert listeners == ["8884"]
    code, output = mqtt_config("--config", secure, "--out", out)
    assert code == 2 and "--certfile" in output
    code, output = mqtt_config("--config", secure, "--out", out, "--certfile",
                               tmp_path / "missing.crt", "--keyfile", tmp_path / "broker.key")
    assert code == 2 and "missing.crt" in output


# ---- the real broker ------------------------------------------------------------------

def _pwd_name() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


async def test_mosquitto_runs_the_generated_files_and_verifies_the_hashes(
    tmp_path: Path,
) -> None:
    require(mosquitto_binary() is not None, "mosquitto")
    out = tmp_path / "out"
    port = free_port()
    site = site_file(tmp_path, url=f"mqtt://127.0.0.1:{port}")
    (tmp_path / "data").mkdir()
    code, output = mqtt_config("--config", site, "--out", out, "--bind", "127.0.0.1",
                               "--persistence-dir", tmp_path / "data")
    assert code == 0, output
    conf = out / "mosquitto.conf"
    conf.write_text(conf.read_text() + f"user {_pwd_name()}\n")
    logins = passwords(out)
    broker = Mosquitto(port, conf_path=conf)
    broker.start()
    try:
        for username, password in logins.items():  # every hash accepted by the real broker
            async with aiomqtt.Client("127.0.0.1", port, username=username, password=password):
                pass
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", port):
                pass
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", port, username="gate-north",
                                      password=logins["elev-1"]):
                pass
    finally:
        broker.close()
    assert (tmp_path / "data" / "mosquitto.db").exists()  # persistence where we said


def self_signed(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA and a broker certificate for 127.0.0.1/localhost, made with openssl."""
    ca_key, ca_crt = tmp_path / "ca.key", tmp_path / "ca.crt"
    key, csr, crt = tmp_path / "broker.key", tmp_path / "broker.csr", tmp_path / "broker.crt"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = {"check": True, "capture_output": True, "timeout": 60}
    subprocess.run(["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_crt,
                    "-days", "2", "-subj", "/CN=scgw test CA"], **run)  # type: ignore[call-overload]
    subprocess.run(["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj",
                    "/CN=localhost"], **run)  # type: ignore[call-overload]
    ext = tmp_path / "ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
                    "-CAcreateserial", "-out", crt, "-days", "2", "-extfile", ext],
                   **run)  # type: ignore[call-overload]
    return ca_crt, crt, key


async def test_a_real_tls_listener_with_a_self_signed_ca(tmp_path: Path) -> None:
    require(mosquitto_binary() is not None, "mosquitto")
    require(shutil.which("openssl") is not None, "openssl")
    ca, crt, key = self_signed(tmp_path)
    out = tmp_path / "out"
    port, tls_port = free_port(), free_port()
    site = site_file(tmp_path, url=f"mqtt://127.0.0.1:{port}")
    (tmp_path / "data").mkdir()
    code, output = mqtt_config("--config", site, "--out", out, "--bind", "127.0.0.1",
                               "--persistence-dir", tmp_path / "data", "--certfile", crt,
                               "--keyfile", key, "--cafile", ca, "--tls-port", str(tls_port))
    assert code == 0, output
    conf = out / "mosquitto.conf"
    conf.write_text(conf.read_text() + f"user {_pwd_name()}\n")
    logins = passwords(out)
    broker = Mosquitto(port, conf_path=conf)
    broker.start()
    try:
        trusted = ssl.create_default_context(cafile=str(ca))
        async with (
            aiomqtt.Client("127.0.0.1", tls_port, username="scgw-monitor",
                           password=logins["scgw-monitor"], tls_context=trusted) as monitor,
            aiomqtt.Client("127.0.0.1", port, username="gw-acme",
                           password=logins["gw-acme"]) as gateway,
        ):
            await monitor.subscribe("acme/#", qos=1)
            await gateway.publish("acme/devices/gate-north/command", b'{"x": 1}', qos=1)
            async with asyncio.timeout(5):
                async for message in monitor.messages:
                    assert message.payload == b'{"x": 1}'
                    break
        with pytest.raises(aiomqtt.MqttError):  # TLS, but no login
            async with aiomqtt.Client("127.0.0.1", tls_port, tls_context=trusted):
                pass
        with pytest.raises(aiomqtt.MqttError):  # a certificate nobody vouched for
            async with aiomqtt.Client("127.0.0.1", tls_port, username="scgw-monitor",
                                      password=logins["scgw-monitor"],
                                      tls_context=ssl.create_default_context(), timeout=3):
                pass
    finally:
        broker.close()


# ---- the bridge to a central broker (docs/scale.md; end to end in test_scale_bridge.py) --

DEPLOY_BRIDGE = DEPLOY_MOSQUITTO.parent / "bridge.conf.example"


def test_the_shipped_bridge_example_is_what_the_generator_writes(tmp_path: Path) -> None:
    from gateway.app.mqtt_bridge import BridgeSettings, bridge_conf_text

    example = [line for line in DEPLOY_BRIDGE.read_text().splitlines()
               if not line.startswith("# Example") and not line.startswith("# (docs/")
               and not line.startswith("# the generator")]
    generated = bridge_conf_text(
        BridgeSettings("central.example.net", 8883, "site-maple-court",
                       "CENTRAL_PASSWORD_HERE", cafile=Path("/etc/scgw/central-ca.crt")),
        "scgw", "maple-court").splitlines()
    assert example == generated


def test_bridge_password_from_the_environment_and_mqtt5(tmp_path: Path) -> None:
    out = tmp_path / "out"
    site = site_file(tmp_path)
    code, output = mqtt_config("--config", site, "--out", out, "--bridge-to",
                               "central.example.net:8883", "--bridge-username", "site-acme",
                               "--bridge-protocol", "mqttv50",
                               env={"SCGW_BRIDGE_PASSWORD": "from-the-env"})
    assert code == 0, output
    assert "from-the-env" not in output
    bridge = (out / "bridge.d" / "bridge.conf").read_text().splitlines()
    assert "remote_password from-the-env" in bridge
    assert "bridge_protocol_version mqttv50" in bridge
    assert "topic alerts/# out 1 acme/ sites/acme/" in bridge
    # No password anywhere: refused, and nothing half-written is left behind.
    code, output = mqtt_config("--config", site, "--out", tmp_path / "none", "--bridge-to",
                               "central.example.net:8883", "--bridge-username", "site-acme",
                               env={"SCGW_BRIDGE_PASSWORD": ""})
    assert code == 2 and "SCGW_BRIDGE_PASSWORD" in output
    (tmp_path / "spaced").write_text("two words\n")
    code, output = mqtt_config("--config", site, "--out", tmp_path / "none", "--bridge-to",
                               "central.example.net:8883", "--bridge-username", "site-acme",
                               "--bridge-password-file", tmp_path / "spaced")
    assert code == 2 and "spaces" in output
    assert not (tmp_path / "none").exists()
