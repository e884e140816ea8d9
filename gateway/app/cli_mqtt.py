"""`scgw mqtt-config`: the broker's logins, ACL and configuration for a site.

    scgw mqtt-config --config site.yaml --out /etc/mosquitto/scgw [--rotate]

Writes DIR/mosquitto.conf, DIR/passwd, DIR/acl and DIR/credentials.json (mode 0600); see
gateway/app/mqtt_config.py and docs/deploy-mqtt.md. Prints where the files went and what
changed, never a password. Exit 2 when the site file or the options cannot be used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
        written = write_mqtt_files(config, out, settings, rotate=rotate,
                                   rotate_users=rotate_login or ())
    except MqttConfigError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot write {exc.filename or out}: {exc.strerror}") from None

    changes, credentials = written.changes, written.credentials
    typer.echo(f"wrote {written.conf}")
    typer.echo(f"wrote {written.passwd} ({len(credentials.logins())} logins: gateway, "
               f"monitor, {len(credentials.devices)} devices)")
    typer.echo(f"wrote {written.acl}")
    typer.echo(f"wrote {written.credentials_file} (mode 0600: the passwords)")
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
