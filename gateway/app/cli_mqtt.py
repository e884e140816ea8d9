"""`scgw mqtt-config`: the broker's logins, ACL and configuration for a site.

    scgw mqtt-config --config site.yaml --out /etc/mosquitto/scgw [--rotate]
        [--bridge-to HOST:PORT --bridge-username U --bridge-password-file F]

Writes DIR/mosquitto.conf, DIR/passwd, DIR/acl and DIR/credentials.json (mode 0600); with
`--bridge-to`, DIR/bridge.d/bridge.conf, the site's bridge to a central broker (see
gateway/app/mqtt_bridge.py, docs/scale.md); see gateway/app/mqtt_config.py and
docs/deploy-mqtt.md. Prints where the files went and what changed, never a password.
Exit 2 when the site file or the options cannot be used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from gateway.app.mqtt_bridge import (
    BRIDGE_DIR,
    BRIDGE_FILE,
    PASSWORD_ENV,
    BridgeError,
    BridgeSettings,
    check_username,
    parse_address,
    parse_backoff,
    read_password,
)
from gateway.app.mqtt_config import (
    DEFAULT_GATEWAY_USER,
    MqttConfigError,
    TlsFiles,
    broker_settings_for,
    write_mqtt_files,
)
from gateway.config import ENV_PREFIX, ConfigError, load_config


def register(app: typer.Typer) -> None:
    app.command("mqtt-config")(mqtt_config)


def _existing(path: Path | None, option: str) -> Path | None:
    if path is None:
        return None
    if not path.is_file():
        raise MqttConfigError(f"{option} {path}: no such file")
    return path.absolute()


def _bridge(
    to: str | None, username: str | None, password_file: Path | None, cafile: Path | None,
    protocol: str, backoff: str,
) -> BridgeSettings | None:
    if to is None:
        if username is not None or password_file is not None or cafile is not None:
            raise BridgeError("the --bridge-* options need --bridge-to HOST:PORT")
        return None
    if username is None:
        raise BridgeError("--bridge-to needs --bridge-username (the site's login on the "
                          "central broker)")
    if protocol not in ("mqttv311", "mqttv50"):
        raise BridgeError(f"--bridge-protocol {protocol!r}: mqttv311 or mqttv50")
    host, port = parse_address(to)
    return BridgeSettings(
        host, port, check_username(username), read_password(password_file, dict(os.environ)),
        cafile=_existing(cafile, "--bridge-cafile"),
        protocol="mqttv50" if protocol == "mqttv50" else "mqttv311",
        backoff_s=parse_backoff(backoff))


def _fail(message: str) -> typer.Exit:
    typer.echo(f"scgw mqtt-config: {message}", err=True)
    return typer.Exit(2)


def mqtt_config(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the four files.")],
    config_path: Annotated[
        Path, typer.Option("--config", "-c", help="Site YAML file.")] = Path("site.yaml"),
    rotate: Annotated[bool, typer.Option(
        "--rotate", help="New passwords for every login (default: keep those in credentials.json).")
    ] = False,
    rotate_login: Annotated[list[str] | None, typer.Option(
        "--rotate-login", help="New password for this login only (a device id, or the "
        "gateway or monitor username); repeatable.")] = None,
    bind: Annotated[str | None, typer.Option(
        help="Address the listeners bind to (default: every interface).")] = None,
    certfile: Annotated[Path | None, typer.Option(
        help="Broker certificate (PEM): adds a TLS listener.")] = None,
    keyfile: Annotated[Path | None, typer.Option(help="Its private key (PEM).")] = None,
    cafile: Annotated[Path | None, typer.Option(
        help="CA of client certificates (optional).")] = None,
    tls_port: Annotated[int | None, typer.Option(
        help="TLS listener port for an mqtt:// site (default 8883; an mqtts:// site's own "
        "port otherwise).")] = None,
    plain_port: Annotated[int | None, typer.Option(
        help="With an mqtts:// site, also a plain listener on this port.")] = None,
    persistence_dir: Annotated[Path, typer.Option(
        help="Mosquitto's persistence_location.")] = Path("/var/lib/mosquitto"),
    bridge_to: Annotated[str | None, typer.Option(
        help="Central broker HOST:PORT: bridge alerts, telemetry and status to it under "
        "sites/{site id}/ (docs/scale.md).")] = None,
    bridge_username: Annotated[str | None, typer.Option(
        help="The site's login on the central broker.")] = None,
    bridge_password_file: Annotated[Path | None, typer.Option(
        help=f"File whose first line is that login's password (else ${PASSWORD_ENV}).")
    ] = None,
    bridge_cafile: Annotated[Path | None, typer.Option(
        help="CA of the central broker's certificate: the bridge then uses TLS.")] = None,
    bridge_protocol: Annotated[str, typer.Option(
        help="mqttv311 or mqttv50.")] = "mqttv311",
    bridge_backoff: Annotated[str, typer.Option(
        help="Reconnect back-off BASE:CAP seconds (jittered).")] = "5:60",
) -> None:
    """Broker logins (one per MQTT device, the gateway, a read-only monitor), ACL and
    mosquitto.conf for a site (CONTRACT.md section 6)."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            typer.echo(f"{exc.source}: {problem}", err=True)
        raise typer.Exit(2) from None
    try:
        if (certfile is None) != (keyfile is None):
            raise MqttConfigError("--certfile and --keyfile go together")
        cert, key = _existing(certfile, "--certfile"), _existing(keyfile, "--keyfile")
        tls = None if cert is None or key is None else TlsFiles(
            cert, key, _existing(cafile, "--cafile"))
        if tls is None and cafile is not None:
            raise MqttConfigError("--cafile needs --certfile and --keyfile")
        settings = broker_settings_for(config, bind=bind, tls=tls, tls_port=tls_port,
                                       plain_port=plain_port,
                                       persistence_dir=persistence_dir.absolute())
        bridge = _bridge(bridge_to, bridge_username, bridge_password_file, bridge_cafile,
                         bridge_protocol, bridge_backoff)
        had_bridge = (out / BRIDGE_DIR / BRIDGE_FILE).is_file()
        written = write_mqtt_files(config, out, settings, rotate=rotate,
                                   rotate_users=rotate_login or (), bridge=bridge)
    except (MqttConfigError, BridgeError) as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot write {exc.filename or out}: {exc.strerror}") from None

    changes, credentials = written.changes, written.credentials
    typer.echo(f"wrote {written.conf}")
    typer.echo(f"wrote {written.passwd} ({len(credentials.logins())} logins: gateway, "
               f"monitor, {len(credentials.devices)} devices)")
    typer.echo(f"wrote {written.acl}")
    typer.echo(f"wrote {written.credentials_file} (mode 0600: the passwords)")
    if bridge is not None:
        typer.echo(f"wrote {written.bridge_conf} (mode 0640: bridge to {bridge.host}:"
                   f"{bridge.port} as {bridge.username}, topics under sites/{config.site.id}/)")
    elif had_bridge:
        typer.echo(f"removed {written.bridge_conf}: no --bridge-to given, so this site no "
                   "longer bridges to a central broker", err=True)
    typer.echo(f"passwords: {changes.kept} kept, {changes.created} new, "
               f"{changes.rotated} rotated; logins removed: "
               f"{', '.join(changes.removed) or 'none'}")
    polled = [d.device_id for d in config.devices if d.profile is not None]
    if polled:
        typer.echo(f"no login for {len(polled)} Modbus-polled unit(s): the gateway publishes "
                   "for them")
    gateway = credentials.gateway.username
    if config.mqtt.username is None:
        typer.echo(f"site file: add `username: {DEFAULT_GATEWAY_USER}` under `mqtt:`", err=True)
    env = f"{ENV_PREFIX}MQTT__PASSWORD"
    if config.mqtt.password is None:
        typer.echo(f"gateway: log in as {gateway} with {env} set to credentials.json's "
                   "gateway.password")
    elif config.mqtt.password.get_secret_value() != credentials.gateway.password:
        typer.echo(f"warning: {env} in this environment is not the gateway's password in "
                   f"{written.credentials_file}: update it before restarting the gateway",
                   err=True)
    typer.echo("reload the broker to apply: systemctl reload mosquitto (or restart)")
