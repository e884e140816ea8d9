"""What the gateway's processes import: memory an edge box pays for every running minute."""

from __future__ import annotations

import subprocess
import sys


def imported(module: str, candidates: tuple[str, ...]) -> list[str]:
    """Which of `candidates` a fresh interpreter has loaded after importing `module`."""
    probe = (f"import sys, {module}; "
             f"print(','.join(sorted(m for m in {candidates!r} if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, check=True)
    return [name for name in done.stdout.strip().split(",") if name]


def test_the_gateway_process_does_not_import_the_rules_engine_or_numpy() -> None:
    """`scgw run` evaluates no rules (its telemetry worker does): numpy and the engine cost
    ~15 MB of RSS there for nothing. Guards against a module-level import creeping back in
    through the command line's sub-commands or plugins."""
    assert imported("gateway.app.cli, gateway.app.runtime",
                    ("numpy", "rules.engine", "rules.scoring",
                     "simulators.faults.generator")) == []


def test_the_telemetry_worker_does_not_import_the_gateways_web_and_metrics_stack() -> None:
    """The worker is a second interpreter on the same box: httpx (with its command line's
    rich, click and pygments), prometheus_client and the API stack are ~10 MB of RSS it has
    no use for; SQLAlchemy (15 MB) and pydantic with the site model (10 MB) are replaced by
    the DB-API (local_db.py) and a plain view of the site file (worker_config.py); psycopg
    comes only with a PostgreSQL database."""
    assert imported("gateway.telemetry.worker",
                    ("httpx", "rich", "click", "prometheus_client", "fastapi", "uvicorn",
                     "argon2", "sqlalchemy", "pydantic", "gateway.config", "psycopg",
                     "alembic")) == []


def test_scgw_run_does_not_mount_the_operator_tools_or_the_simulators() -> None:
    """The one long-lived command pays only for itself (1.3 MB of the gateway's RSS); any
    other command line mounts them all, as does an import by a test or a tool."""
    heavy = ("simulators.demo.cli", "simulators.simulate.cli", "gateway.app.cli_audit",
             "gateway.app.cli_users", "gateway.access.importer")
    probe = (f"import sys; sys.argv = ['scgw', *sys.argv[1:]]; import gateway.app.cli; "
             f"print(','.join(sorted(m for m in {heavy!r} if m in sys.modules)))")

    def loaded(*args: str) -> list[str]:
        done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True,
                              text=True, timeout=120, check=True)
        return [name for name in done.stdout.strip().split(",") if name]

    assert loaded("run", "--config", "site.yaml") == []
    assert loaded("audit", "verify") == sorted(heavy)
    assert imported("gateway.app.cli", heavy) == sorted(heavy)
