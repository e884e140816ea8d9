"""Alembic migrations create exactly the tables the code defines, on both databases, along
one line of history that databases made by the old branched history can still follow."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from typer.testing import CliRunner

import gateway
from gateway.app.cli import app
from gateway.store import db
from gateway.store.metadata import metadata


def _import_all_table_modules() -> None:
    for module in pkgutil.walk_packages(gateway.__path__, "gateway."):
        if module.name.endswith(("cli", "demo", "__main__")):
            continue
        importlib.import_module(module.name)


def test_upgrade_matches_table_definitions_and_is_idempotent(database_url: str) -> None:
    _import_all_table_modules()
    db.upgrade(database_url)
    db.upgrade(database_url)  # a second run changes nothing and does not fail
    engine = db.make_engine(database_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()
    # Index/constraint naming differences would show up here too; the list must be empty.
    assert diff == []


OLD_HEADS = ("0002_directory", "0003_ledger", "0004_audit")


def test_history_has_one_head() -> None:
    """Two revisions revising the same parent make `alembic upgrade head` fail after the
    fact ("more than one head"); a new revision must revise the current head."""
    script = ScriptDirectory.from_config(db.alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1, script.get_heads()
    assert [r.revision for r in script.walk_revisions()][-1] == "0001_core"


def test_upgrade_reports_one_revision(database_url: str) -> None:
    db.upgrade(database_url)
    head = ScriptDirectory.from_config(db.alembic_config(database_url)).get_current_head()
    assert db.current_revision(database_url) == head
    command.upgrade(db.alembic_config(database_url), "head")  # what an operator would type


def test_a_database_stamped_with_the_three_old_heads_upgrades(database_url: str) -> None:
    """Every install before the merge revision has 0002, 0003 and 0004 as its heads."""
    cfg = db.alembic_config(database_url)
    for old_head in OLD_HEADS:  # what `upgrade heads` did with the branched history
        command.upgrade(cfg, old_head)
    assert db.current_revision(database_url) == "+".join(OLD_HEADS)
    engine = db.make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO buildings (building_id, name) VALUES ('b1', 'B1')"))
        db.upgrade(database_url)
        db.upgrade(database_url)
        assert db.current_revision(database_url) == ScriptDirectory.from_config(
            cfg).get_current_head()
        _import_all_table_modules()
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
            assert conn.execute(text("SELECT name FROM buildings")).scalar_one() == "B1"
    finally:
        engine.dispose()


def test_db_upgrade_command_uses_the_site_file(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    nothing = runner.invoke(app, ["db", "upgrade"], env={"SCGW__DATABASE__URL": None})
    assert nothing.exit_code == 2
    assert "site.yaml: no such site file; give --config FILE, or --database-url" in (
        nothing.output)
    assert list(tmp_path.iterdir()) == []  # no default database was created
    (tmp_path / "site.yaml").write_text(
        f"site: {{id: s}}\ndatabase: {{url: 'sqlite:///{tmp_path}/site.db'}}\n")
    done = runner.invoke(app, ["db", "upgrade"], env={"SCGW__DATABASE__URL": None})
    assert done.exit_code == 0, done.output
    head = ScriptDirectory.from_config(db.alembic_config("sqlite://")).get_current_head()
    assert f"schema at {head}" in done.output and (tmp_path / "site.db").exists()
    other = tmp_path / "other.yaml"
    other.write_text(f"site: {{id: s}}\ndatabase: {{url: 'sqlite:///{tmp_path}/o.db'}}\n")
    again = runner.invoke(app, ["db", "upgrade", "-c", str(other)],
                          env={"SCGW__DATABASE__URL": None})
    assert again.exit_code == 0 and (tmp_path / "o.db").exists()
    override = runner.invoke(app, ["db", "upgrade", "--config", str(other), "--database-url",
                                   f"sqlite:///{tmp_path}/x.db"])
    assert override.exit_code == 0 and (tmp_path / "x.db").exists()
    missing = runner.invoke(app, ["db", "upgrade", "--config", str(tmp_path / "nope.yaml"),
                                  "--database-url", f"sqlite:///{tmp_path}/y.db"])
    assert missing.exit_code == 2 and "nope.yaml: cannot read" in missing.output
