"""Alembic migrations create exactly the tables the code defines, on both databases."""

from __future__ import annotations

import importlib
import pkgutil

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import gateway
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
