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
