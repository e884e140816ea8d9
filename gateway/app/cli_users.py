"""`scgw users ...`: logins on a real site, starting with its first admin.

    scgw users add admin --role admin --config site.yaml        # prompts twice, hidden
    scgw users add ann --role resident --resident-id r-1 --generate
    scgw users list | disable NAME | enable NAME | reset-password NAME

Passwords never appear on the command line (where `ps` and the shell history would keep
them): they are typed at a hidden prompt (twice), read from stdin (`--password-stdin`,
for scripts), or generated (`--generate`, printed once). Disabling or resetting a password
ends the user's sessions at once. The site keeps one enabled admin: disabling the last one
is refused.

Exit 0 done, 2 refused or cannot run (the message says why: a taken name, an unknown or
moved-out resident, a bad role or password, no site file, schema not migrated).
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import typer
from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.exc import SQLAlchemyError

from gateway.config import ConfigError, operator_settings
from gateway.store import users as u
from gateway.store.db import is_sqlite, make_engine
from gateway.store.directory_schema import DirectoryError
from gateway.store.invitations import user_invitations

app = typer.Typer(help="Users of the API and dashboard: add, list, disable, reset passwords.",
                  no_args_is_help=True)
T = TypeVar("T")

ConfigPath = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Site YAML (default ./site.yaml): its database."),
]
DatabaseUrl = Annotated[
    str | None,
    typer.Option("--database-url", envvar="SCGW__DATABASE__URL",
                 help="Override the site file's database (SQLAlchemy URL)."),
]
Username = Annotated[str, typer.Argument(help="The login name.")]
PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from the first line of "
                       "stdin instead of prompting.")]
Generate = Annotated[
    bool, typer.Option("--generate", help="Generate a strong password and print it once.")]


@app.callback()
def _users() -> None:
    """Users of the API and dashboard: add, list, disable, reset passwords."""


def _fail(message: str) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(2)


@contextmanager
def _engine(config_path: Path | None, database_url: str | None) -> Iterator[Engine]:
    """The site's database, migrated far enough for users (else a clear exit 2)."""
    try:
        url = operator_settings(config_path, database_url=database_url).database_url
    except ConfigError as exc:
        _fail("\n".join(f"{exc.source}: {p}" for p in exc.problems))
    if is_sqlite(url):
        path = url.split("///", 1)[-1]
        if not path or path == ":memory:" or not Path(path).exists():
            _fail(f"no database at {url}: run `scgw db upgrade --config ...` first")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table(user_invitations.name):
                _fail("the database schema is older than this scgw: run `scgw db upgrade` "
                      "first")
        yield engine
    except SQLAlchemyError as exc:
        _fail(f"database error: {exc.__class__.__name__}: {exc}")
    finally:
        engine.dispose()


def _write(engine: Engine, work: Callable[[Connection], T]) -> T:
    try:
        with engine.begin() as conn:
            return work(conn)
    except DirectoryError as exc:  # NotFound, Conflict, policy: all say what is wrong
        _fail(str(exc))


def _password(username: str, from_stdin: bool, generate: bool) -> str:
    """The new password from exactly one source; the policy is checked before any write."""
    if from_stdin and generate:
        _fail("give --password-stdin or --generate, not both")
    if generate:
        password = secrets.token_urlsafe(18)  # 144 random bits, 24 characters
    elif from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt(f"password for {username}", hide_input=True,
                                confirmation_prompt=True)
    try:
        u.check_password(username, password)
    except DirectoryError as exc:
        _fail(str(exc))
    return password


@app.command("add")
def add(
    username: Username,
    role: Annotated[str, typer.Option("--role", help="resident, staff, engineer or admin.")],
    resident_id: Annotated[
        str | None, typer.Option("--resident-id", help="The resident (required for, and "
                                 "only for, --role resident).")] = None,
    password_stdin: PasswordStdin = False,
    generate: Generate = False,
    config_path: ConfigPath = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Add a user. The first admin of a site comes from here:
    `scgw users add admin --role admin`."""
    try:
        parsed = u.parse_role(role)
        u.check_username(username)
    except DirectoryError as exc:
        _fail(str(exc))
    with _engine(config_path, database_url) as engine:
        password = _password(username, password_stdin, generate)
        user = _write(engine, lambda c: u.create_user(c, username, password, parsed,
                                                      resident_id))
    typer.echo(f"added {user.username} ({user.role.value}"
               + (f", resident {user.resident_id}" if user.resident_id else "")
               + f"), user id {user.user_id}")
    if generate:
        typer.echo(f"password: {password}")
        typer.echo("(shown once: hand it over now; it is stored only as a hash)")


@app.command("list")
def list_command(config_path: ConfigPath = None, database_url: DatabaseUrl = None) -> None:
    """Every user, one a line: name, role, resident, state, created (UTC)."""
    with _engine(config_path, database_url) as engine, engine.connect() as conn:
        records = u.list_users(conn)
    for r in records:
        created = datetime.fromtimestamp(r.created_at, UTC).strftime("%Y-%m-%d %H:%M")
        typer.echo(f"{r.username}\t{r.role.value}\t{r.resident_id or '-'}\t"
                   f"{'disabled' if r.disabled else 'enabled'}\t{created}\t{r.user_id}")
    if not records:
        typer.echo("no users yet: add the first admin with "
                   "`scgw users add NAME --role admin`", err=True)


def _set_disabled(username: str, disabled: bool, config_path: Path | None,
                  database_url: str | None) -> None:
    with _engine(config_path, database_url) as engine:
        record = _write(engine, lambda c: u.update_user(
            c, u.find_user(c, username).user_id, disabled=disabled))
    state = "disabled; its sessions have ended" if record.disabled else "enabled"
    typer.echo(f"{record.username} {state}")


@app.command("disable")
def disable(username: Username, config_path: ConfigPath = None,
            database_url: DatabaseUrl = None) -> None:
    """Disable a user: no more sign-ins, and its sessions end at once."""
    _set_disabled(username, True, config_path, database_url)


@app.command("enable")
def enable(username: Username, config_path: ConfigPath = None,
           database_url: DatabaseUrl = None) -> None:
    """Enable a disabled user again (its old sessions stay ended)."""
    _set_disabled(username, False, config_path, database_url)


@app.command("reset-password")
def reset_password(
    username: Username,
    password_stdin: PasswordStdin = False,
    generate: Generate = False,
    config_path: ConfigPath = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Set a new password; the user's sessions end at once."""
    with _engine(config_path, database_url) as engine:
        record = _write(engine, lambda c: u.find_user(c, username))
        password = _password(record.username, password_stdin, generate)
        _write(engine, lambda c: u.set_password_hash(c, record.user_id,
                                                     u.hash_password(password)))
    typer.echo(f"password of {record.username} reset; its sessions have ended")
    if generate:
        typer.echo(f"password: {password}")
        typer.echo("(shown once: hand it over now; it is stored only as a hash)")
