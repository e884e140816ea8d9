"""Residents CSV import, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from sqlalchemy import Engine
from typer.testing import CliRunner

from gateway.access.importer import ImportReport, import_residents, parse_csv
from gateway.app.cli import app as cli_app
from gateway.app.cli_import import app as import_app
from gateway.config import load_config
from gateway.store import directory as d
from gateway.store.db import make_engine, upgrade

ROOT = Path(__file__).resolve().parent.parent
HEADER = "unit_id,building_id,floor,unit_label,resident_id,name,role,gate_card,elevator_card,canteen_card\n"  # noqa: E501

GOOD = HEADER + """\
b1-1201,b1,12,1201,r-1,Wang Fang,owner,G1,E1,C1
b1-1201,b1,12,1201,r-2,Li Wei,family,G2,,
b2-0702,b2,7,702,,Liu Yang,tenant,G3,E3,
b2-0702,b2,7,702,,Liu Yang,tenant,G4,,
b1-0301,b1,3,,,,,,,
"""


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    upgrade(database_url)
    eng = make_engine(database_url)
    with eng.begin() as conn:
        d.upsert_building(conn, d.Building("b1", "Building 1"),
                          [d.Floor("b1", n, public=n == 1) for n in (1, 3, 12)])
        d.upsert_building(conn, d.Building("b2", "Building 2"),
                          [d.Floor("b2", n, public=n == 1) for n in (1, 7)])
    yield eng
    eng.dispose()


def version(engine: Engine) -> int:
    with engine.connect() as conn:
        return d.directory_version(conn)


def snapshot(engine: Engine) -> tuple[object, ...]:
    with engine.connect() as conn:
        snap = d.load_snapshot(conn)
    return (snap.units, snap.residents, snap.cards)


def lines(report: ImportReport) -> list[int]:
    return [e.line for e in report.errors]


def test_a_valid_file_creates_units_residents_and_cards(engine: Engine) -> None:
    report = import_residents(engine, GOOD)
    assert report.ok and report.committed, report.errors
    assert report.rows == 5
    assert report.counts == {"units_created": 3, "residents_created": 3, "cards_issued": 7}
    with engine.connect() as conn:
        assert [u.unit_id for u in d.list_units(conn)] == ["b1-0301", "b1-1201", "b2-0702"]
        assert d.get_unit(conn, "b2-0702").floor == 7
        wang = d.get_resident(conn, "r-1")
        assert (wang.unit_id, wang.name, wang.role) == ("b1-1201", "Wang Fang", "owner")
        assert {(c.kind, c.card_number) for c in d.list_cards(conn, "r-1")} == {
            ("gate", "G1"), ("elevator", "E1"), ("canteen", "C1")}
        (liu,) = d.list_residents(conn, "b2-0702")
        assert liu.name == "Liu Yang" and liu.resident_id.startswith("r-")
        assert {c.card_number for c in d.list_cards(conn, liu.resident_id)} == {"G3", "E3", "G4"}
        assert d.list_residents(conn, "b1-0301") == []


def test_reimporting_the_same_file_changes_nothing(engine: Engine) -> None:
    assert import_residents(engine, GOOD).committed
    before, state = version(engine), snapshot(engine)
    again = import_residents(engine, GOOD)
    assert again.ok and again.counts == {} and again.changes == []
    assert version(engine) == before
    assert snapshot(engine) == state


def test_dry_run_reports_the_changes_and_writes_nothing(engine: Engine) -> None:
    before = version(engine)
    report = import_residents(engine, GOOD, dry_run=True)
    assert report.ok and not report.committed
    assert report.counts["residents_created"] == 3
    assert any("create unit b1-1201" in c for c in report.changes)
    assert any(c.startswith("line 3: create resident r-2") for c in report.changes)
    assert version(engine) == before
    with engine.connect() as conn:
        assert d.list_units(conn) == []


def test_every_bad_row_is_reported_with_its_line_and_nothing_is_written(engine: Engine) -> None:
    text = HEADER + """\
b1-1201,b1,12,1201,r-1,Wang Fang,owner,G1,E1,C1
b1-1202,b1,twelve,,r-2,Li Wei,family,,,
b1-1203,b1,12,,r-3,Zhao Lei,landlord,,,
b1-1204,b1,12,,r-4,,owner,,,
b1-1201,b1,11,1201,r-5,Sun Li,owner,,,
b1-1205,b1,12,,r-6,Hu Bo,owner,G1,,
b1-1206,b1,12,,r 7,Ma Tao,owner,,,
b1-1207,b1,12,,r-8,Xu Ke,owner,has space,,
b1-1201,b1,12,1201,r-1,Wang Fang,tenant,,,
"""
    report = import_residents(engine, text)
    assert not report.ok and not report.committed
    assert lines(report) == [3, 4, 5, 6, 7, 8, 9, 10]
    messages = {e.line: e.message for e in report.errors}
    assert "floor must be a whole number" in messages[3]
    assert "role must be one of" in messages[4] and "landlord" in messages[4]
    assert "name must be text" in messages[5]
    assert "described differently on line 2" in messages[6]
    assert "card 'G1' is also given to another resident on line 2" in messages[7]
    assert "resident_id" in messages[8]
    assert "gate_card" in messages[9]
    assert "resident 'r-1' is described differently on line 2" in messages[10]
    with engine.connect() as conn:
        assert d.list_units(conn) == []


def test_refusals_by_the_store_are_reported_per_line_and_roll_everything_back(
    engine: Engine,
) -> None:
    with engine.begin() as conn:
        d.create_unit(conn, "b2-0101", "b2", 1)
        d.create_resident(conn, "b2-0101", "Old Owner", "owner", resident_id="r-old")
        d.issue_card(conn, "r-old", "gate", "TAKEN")
        d.issue_card(conn, "r-old", "gate", "LOST")
        d.revoke_card(conn, "gate", "LOST")
        d.create_resident(conn, "b2-0101", "Gone", "tenant", resident_id="r-gone")
        d.move_out(conn, "r-gone")
    before = version(engine)
    text = HEADER + """\
b1-1201,b1,12,1201,r-1,Wang Fang,owner,G1,,
b1-0901,b1,9,901,r-2,Nine Floors,owner,,,
b1-1201,b1,12,1201,r-3,Li Wei,family,TAKEN,,
b1-1201,b1,12,1201,r-4,Zhou Yu,family,LOST,,
b2-0101,b2,7,,,,,,,
b1-1201,b1,12,1201,r-gone,Gone,tenant,,,
"""
    report = import_residents(engine, text)
    assert not report.committed
    messages = {e.line: e.message for e in report.errors}
    assert sorted(messages) == [3, 4, 5, 6, 7], report.errors
    assert "has no floor 9" in messages[3]
    assert "belongs to another resident" in messages[4]
    assert "revoked" in messages[5]
    assert "unit 'b2-0101' exists with different details" in messages[6]
    assert "moved out" in messages[7]
    assert version(engine) == before
    with engine.connect() as conn:
        with pytest.raises(d.NotFound):
            d.get_resident(conn, "r-1")


def test_a_changed_row_updates_or_moves_the_resident(engine: Engine) -> None:
    assert import_residents(engine, GOOD).committed
    moved = GOOD.replace("b1-1201,b1,12,1201,r-2,Li Wei,family",
                         "b2-0702,b2,7,702,r-2,Li Wei,tenant")
    report = import_residents(engine, moved)
    assert report.committed and report.counts == {"residents_updated": 1}
    assert report.changes == [
        "line 3: update resident r-2 (Li Wei, tenant, moves b1-1201 -> b2-0702)"]
    with engine.connect() as conn:
        li = d.get_resident(conn, "r-2")
        assert (li.unit_id, li.role) == ("b2-0702", "tenant")
        assert [c.card_number for c in d.list_cards(conn, "r-2")] == ["G2"]  # cards kept


def test_header_problems_stop_before_any_row(engine: Engine) -> None:
    _, errors = parse_csv("unit,building_id,floor,name,name\nx,b1,1,a,b\n")
    assert [e.line for e in errors] == [1, 1, 1]
    assert "unknown column(s) 'unit'" in errors[0].message
    assert "missing column(s) unit_id" in errors[1].message
    assert "repeated: name" in errors[2].message
    _, errors = parse_csv("")
    assert errors and "no header row" in errors[0].message


def test_line_numbers_count_comments_blank_lines_and_quoted_newlines() -> None:
    text = ("# exported 2025-11-01\n" + HEADER + "\n"
            'b1-1201,b1,12,"twelve\no one",r-1,Wang Fang,owner,,,\n'
            "b1-1202,b1,x,,r-2,Li Wei,owner,,,\n"
            "b1-1203,b1,12,,r-3,Zhao Lei,owner\n")
    _, errors = parse_csv(text)
    assert [(e.line, e.message.split(" ")[0]) for e in errors] == [(6, "floor"), (7, "7")]
    assert "header has 10" in errors[1].message


def test_the_example_file_imports_with_the_example_site(engine: Engine,
                                                        database_url: str) -> None:
    config = load_config(ROOT / "examples" / "site.yaml",
                         environ={"SCGW__DATABASE__URL": database_url})
    text = (ROOT / "examples" / "residents.csv").read_text(encoding="utf-8")
    report = import_residents(engine, text, config=config)
    assert report.committed, report.errors
    assert report.counts["residents_created"] == 5
    with engine.connect() as conn:
        assert d.get_resident(conn, "r-1003").name == "Zhang, Min"
    assert import_residents(engine, text, config=config).changes == []


def _cli() -> typer.Typer:
    root = typer.Typer()
    root.add_typer(import_app, name="import")  # as the lead mounts it under `scgw`
    return root


def test_cli_exit_codes_and_output(engine: Engine, database_url: str, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./site.yaml: the URL comes from the environment
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())  # with the BOM spreadsheets write
    bad.write_text(HEADER + "b1-1201,b1,12,,r-1,Wang Fang,boss,,,\n", encoding="utf-8")
    runner = CliRunner()
    env = {"SCGW__DATABASE__URL": database_url}
    before = version(engine)
    dry = runner.invoke(_cli(), ["import", "residents", str(good), "--dry-run"], env=env)
    assert dry.exit_code == 0, dry.output
    assert "would import 5 rows" in dry.output and "create unit b1-1201" in dry.output
    assert version(engine) == before
    with engine.connect() as conn:
        assert d.list_units(conn) == []
    done = runner.invoke(_cli(), ["import", "residents", str(good)], env=env)
    assert done.exit_code == 0, done.output
    assert "imported 5 rows, 7 cards issued, 3 residents created, 3 units created" in done.output
    again = runner.invoke(_cli(), ["import", "residents", str(good)], env=env)
    assert "imported 5 rows, no changes" in again.output
    refused = runner.invoke(_cli(), ["import", "residents", str(bad)], env=env)
    assert refused.exit_code == 1
    assert f"{bad}:2: role must be one of" in refused.output
    assert "nothing was imported" in refused.output
    missing = runner.invoke(_cli(), ["import", "residents", str(tmp_path / "nope.csv")], env=env)
    assert missing.exit_code == 2
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(HEADER.encode() + "b1-1201,b1,12,,r-9,Jos\xe9,owner,,,\n".encode("latin-1"))
    assert runner.invoke(_cli(), ["import", "residents", str(latin1)], env=env).exit_code == 1


def test_cli_without_a_migrated_database(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    csv_file = tmp_path / "r.csv"
    csv_file.write_text(GOOD, encoding="utf-8")
    nowhere = runner.invoke(_cli(), ["import", "residents", str(csv_file), "--database-url",
                                     f"sqlite:///{tmp_path}/none.db"])
    assert nowhere.exit_code == 2 and "scgw db upgrade" in nowhere.output
    assert not (tmp_path / "none.db").exists()


def test_cli_uses_the_site_file_like_db_upgrade(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The README path: `db upgrade --config site.yaml`, then an import with no options.

    The import used to look for a default ./scgw.db instead of the site file's database, so
    it refused to run ("run `scgw db upgrade` first") right after a successful upgrade.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SCGW__DATABASE__URL", raising=False)
    runner = CliRunner()
    csv_file = tmp_path / "residents.csv"
    csv_file.write_bytes((ROOT / "examples" / "residents.csv").read_bytes())
    nothing = runner.invoke(_cli(), ["import", "residents", "residents.csv", "--dry-run"])
    assert nothing.exit_code == 2
    assert "site.yaml: no such site file; give --config FILE, or --database-url" in nothing.output
    db_url = f"sqlite:///{tmp_path}/var/site.db"
    (tmp_path / "site.yaml").write_text(
        (ROOT / "examples" / "site.yaml").read_text(encoding="utf-8")
        .replace("sqlite:////var/lib/scgw/scgw.db", db_url), encoding="utf-8")
    upgraded = runner.invoke(cli_app, ["db", "upgrade", "--config", "site.yaml"])
    assert upgraded.exit_code == 0, upgraded.output
    dry = runner.invoke(_cli(), ["import", "residents", "residents.csv", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would import 7 rows, 2 buildings synced" in dry.output
    done = runner.invoke(_cli(), ["import", "residents", "residents.csv", "-c", "site.yaml"])
    assert done.exit_code == 0, done.output
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            assert d.get_resident(conn, "r-1003").name == "Zhang, Min"
    finally:
        engine.dispose()
