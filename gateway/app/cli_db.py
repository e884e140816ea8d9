"""`scgw db backup FILE` / `scgw db restore FILE`: the store, copied consistently.

SQLite goes through SQLite's online backup API: one read transaction copies every page, so
the copy is a snapshot even while the gateway writes payments (WAL: the writers do not
wait). PostgreSQL goes through `pg_dump -Fc` (one REPEATABLE READ snapshot) and
`pg_restore`. The password never appears on a command line (PGPASSWORD, read by libpq), so
`ps` does not show it.

Restore overwrites a database, so it refuses to run under a live gateway (`--force` to
override) and refuses a backup whose schema revision this version does not know (a backup
from a newer scgw): restoring it would leave a schema the code cannot read. An older
backup is restored as it is; `scgw db upgrade` then migrates it.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy import MetaData, make_url, text

from gateway.config import ConfigError, operator_settings
from gateway.store import db

log = logging.getLogger(__name__)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Site YAML (default ./site.yaml).")
]
UrlOption = Annotated[
    str | None,
    typer.Option(envvar="SCGW__DATABASE__URL",
                 help="Override the site file's database (SQLAlchemy URL)."),
]
FileArgument = Annotated[Path, typer.Argument(help="The backup file.")]


class BackupError(Exception):
    """A backup or restore that must not go ahead; the message says why and what to do."""


def _url(config_path: Path | None, database_url: str | None) -> str:
    try:
        return operator_settings(config_path, database_url=database_url).database_url
    except ConfigError as exc:
        for problem in exc.problems:
            typer.echo(f"{exc.source}: {problem}", err=True)
        raise typer.Exit(2) from None


def backup(
    file: FileArgument, config_path: ConfigOption = None, database_url: UrlOption = None,
) -> None:
    """Copy the site's database to FILE, consistently, while the gateway runs."""
    url = _url(config_path, database_url)
    try:
        backup_database(url, file)
    except BackupError as exc:
        typer.echo(f"backup refused: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"backed up {db.display_url(url)} at schema {backup_revision(file)} to {file}")


def restore(
    file: FileArgument, config_path: ConfigOption = None, database_url: UrlOption = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Restore even though something (a gateway?) uses the database.")] = False,
) -> None:
    """Replace the site's database with FILE; then run `scgw db upgrade`."""
    url = _url(config_path, database_url)
    try:
        revision = restore_database(url, file, force=force)
    except BackupError as exc:
        typer.echo(f"restore refused: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"restored {file} (schema {revision}) into {db.display_url(url)}; "
               "run `scgw db upgrade` before starting the gateway")


def register(db_app: typer.Typer) -> None:
    db_app.command("backup")(backup)
    db_app.command("restore")(restore)


# --- the work, callable from tests and scripts ----------------------------------------------


@dataclass(frozen=True)
class _Pg:
    """A libpq connection string without the password, and the environment carrying it."""

    dsn: str
    env: dict[str, str]


def _pg(url: str) -> _Pg:
    parsed = make_url(url)
    env = dict(os.environ)
    if parsed.password is not None:
        env["PGPASSWORD"] = str(parsed.password)
    plain = parsed.set(drivername="postgresql", password=None)
    return _Pg(plain.render_as_string(hide_password=False), env)


def _sqlite_file(url: str) -> Path:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise BackupError(f"{db.display_url(url)} is not a database file")
    return Path(database)


def backup_database(url: str, file: Path) -> None:
    """Write a consistent copy of `url` to `file` (replaced atomically when complete)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_name(file.name + ".partial")
    partial.unlink(missing_ok=True)
    if db.is_sqlite(url):
        source_path = _sqlite_file(url)
        if not source_path.exists():
            raise BackupError(f"{source_path} does not exist")
        source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True, timeout=30)
        target = sqlite3.connect(partial)
        try:
            source.backup(target)  # all pages in one step: one read snapshot
        finally:
            target.close()
            source.close()
    else:
        pg = _pg(url)
        _run(["pg_dump", "-Fc", "--no-owner", "-f", str(partial), "--dbname", pg.dsn], pg.env)
    with partial.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, file)


def backup_revision(file: Path) -> str:
    """The alembic revision (several heads joined by '+') stored in a backup file."""
    if not file.is_file():
        raise BackupError(f"{file}: no such file")
    with file.open("rb") as handle:
        magic = handle.read(16)
    if magic.startswith(b"SQLite format 3"):
        conn = sqlite3.connect(f"file:{file}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        except sqlite3.DatabaseError as exc:
            raise BackupError(f"{file}: not an scgw backup ({exc})") from None
        finally:
            conn.close()
        heads = [str(r[0]) for r in rows]
    elif magic.startswith(b"PGDMP"):
        out = _run(["pg_restore", "--data-only", "--table=alembic_version", "-f", "-",
                    str(file)], dict(os.environ))
        match = re.search(r"^COPY \S*alembic_version .*? FROM stdin;\n(.*?)^\\\.$", out,
                          re.MULTILINE | re.DOTALL)
        heads = match.group(1).split() if match else []
    else:
        raise BackupError(f"{file}: neither a SQLite database nor a pg_dump custom archive")
    if not heads:
        raise BackupError(f"{file}: no schema revision in it (not an scgw backup)")
    return "+".join(sorted(heads))


def _check_known(revision: str, url: str) -> None:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    script = ScriptDirectory.from_config(db.alembic_config(url))
    head = "+".join(sorted(script.get_heads()))
    for rev in revision.split("+"):
        try:
            known = script.get_revision(rev)
        except CommandError:
            known = None
        if known is None:
            raise BackupError(
                f"the backup's schema revision {rev} is unknown to this scgw (newest known: "
                f"{head}): it comes from a newer version; restore it with that version")


def users_of(url: str) -> list[str]:
    """Who else has the database open: processes (SQLite, found through /proc) or
    sessions (PostgreSQL); empty when nothing does."""
    if db.is_sqlite(url):
        path = _sqlite_file(url)
        if not path.exists():
            return []
        names = {str(path.resolve())} | {str(path.resolve()) + s for s in ("-wal", "-shm")}
        users = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if any(os.readlink(fd) in names for fd in (proc / "fd").iterdir()):
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                    users.append(f"pid {proc.name} ({cmd[:80]})")
            except OSError:  # gone meanwhile, or another user's
                continue
        return users
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT pid, coalesce(application_name, ''), coalesce(client_addr::text, "
                "'local') FROM pg_stat_activity WHERE datname = current_database() "
                # not autovacuum, which visits a fresh database and is no user of it
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid()")).all()
    finally:
        engine.dispose()
    return [f"session {pid} ({app or 'no name'} from {addr})" for pid, app, addr in rows]


CLOSING_GRACE_S = 3.0


def _users_after_grace(url: str) -> list[str]:
    """Users still there after a short wait: a gateway stopped a moment ago leaves
    PostgreSQL backends (and our own check's) exiting for some milliseconds, and an operator
    who just ran `systemctl stop scgw` should not be told to stop it again."""
    deadline = time.monotonic() + CLOSING_GRACE_S
    while (users := users_of(url)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return users


def restore_database(url: str, file: Path, *, force: bool = False) -> str:
    """Replace the database at `url` with the backup `file`; returns its revision."""
    revision = backup_revision(file)
    _check_known(revision, url)
    users = _users_after_grace(url) if not force else []
    if users:
        raise BackupError(
            f"{db.display_url(url)} is in use by {'; '.join(users)}: stop the gateway "
            "(systemctl stop scgw) first, or pass --force")
    if db.is_sqlite(url):
        target_path = _sqlite_file(url)
        target_path.parent.mkdir(parents=True, exist_ok=True)
        source = sqlite3.connect(f"file:{file}?mode=ro", uri=True)
        target = sqlite3.connect(target_path, timeout=10, isolation_level=None)
        try:
            try:  # the backup API retries a locked target forever: find out first
                target.execute("BEGIN EXCLUSIVE")
                target.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                raise BackupError(f"{target_path}: {exc} (something writes to it: stop the "
                                  "gateway first)") from None
            source.backup(target)  # every page replaced: tables the backup lacks vanish too
        finally:
            target.close()
            source.close()
    else:
        _drop_everything(url)  # a newer schema's extra tables would break `db upgrade`
        pg = _pg(url)
        _run(["pg_restore", "--clean", "--if-exists", "--no-owner", "--single-transaction",
              "--dbname", pg.dsn, str(file)], pg.env)
    log.info("restored %s at %s into %s", file, revision, db.display_url(url))
    return revision


def _drop_everything(url: str) -> None:
    engine = db.make_engine(url)
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.begin() as conn:
            meta.drop_all(conn)
    finally:
        engine.dispose()


def _run(command: list[str], env: dict[str, str]) -> str:
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BackupError(f"{command[0]} is not installed (apt-get install "
                          "postgresql-client)") from None
    if done.returncode != 0:
        raise BackupError(f"{command[0]} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout
