"""Canteen ledger: accounts, journal, entries, payments, shortfalls, idempotency keys.

Revision ID: 0003_ledger
Revises: 0001_core

Journal, entries and payments are append-only: triggers refuse UPDATE and DELETE (and
TRUNCATE on PostgreSQL) so history cannot be rewritten even by hand.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_ledger"
down_revision = "0001_core"
branch_labels = None
depends_on = None

_IMMUTABLE = ("canteen_journal", "canteen_entries", "canteen_payments")


def upgrade() -> None:
    op.create_table(
        "canteen_accounts",
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("balance_cents", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("account_id", name="pk_canteen_accounts"),
        sa.CheckConstraint("kind IN ('purse', 'system')", name="ck_canteen_accounts_kind"),
        sa.CheckConstraint(
            "kind = 'system' OR balance_cents >= 0",
            name="ck_canteen_accounts_balance_not_negative",
        ),
    )
    op.create_table(
        "canteen_journal",
        sa.Column("journal_id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("amount_cents", sa.BigInteger, nullable=False),
        sa.Column("terminal_id", sa.String(64), nullable=True),
        sa.Column("txn_id", sa.String(64), nullable=True),
        sa.Column("idempotency_key", sa.String(128), nullable=True),
        sa.Column("posted_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("journal_id", name="pk_canteen_journal"),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["canteen_accounts.account_id"],
            name="fk_canteen_journal_account_id_canteen_accounts",
        ),
        sa.CheckConstraint(
            "kind IN ('payment', 'topup', 'refund')", name="ck_canteen_journal_kind"
        ),
        sa.CheckConstraint("amount_cents > 0", name="ck_canteen_journal_amount_positive"),
    )
    op.create_index("ix_canteen_journal_posted_at", "canteen_journal", ["posted_at"])
    op.create_index("ix_canteen_journal_payment", "canteen_journal", ["terminal_id", "txn_id"])
    op.create_table(
        "canteen_entries",
        sa.Column("entry_id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("journal_id", sa.Integer, nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("amount_cents", sa.BigInteger, nullable=False),
        sa.Column("balance_after_cents", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("entry_id", name="pk_canteen_entries"),
        sa.ForeignKeyConstraint(
            ["journal_id"],
            ["canteen_journal.journal_id"],
            name="fk_canteen_entries_journal_id_canteen_journal",
        ),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["canteen_accounts.account_id"],
            name="fk_canteen_entries_account_id_canteen_accounts",
        ),
        sa.CheckConstraint("amount_cents <> 0", name="ck_canteen_entries_amount_not_zero"),
    )
    op.create_index("ix_canteen_entries_account_id", "canteen_entries", ["account_id"])
    op.create_index("ix_canteen_entries_journal_id", "canteen_entries", ["journal_id"])
    op.create_table(
        "canteen_payments",
        sa.Column("terminal_id", sa.String(64), nullable=False),
        sa.Column("txn_id", sa.String(64), nullable=False),
        sa.Column("amount_cents", sa.BigInteger, nullable=False),
        sa.Column("account_id", sa.String(64), nullable=True),
        sa.Column("offline", sa.Boolean, nullable=False),
        sa.Column("request_ts", sa.Float, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=True),
        sa.Column("debited_cents", sa.BigInteger, nullable=False),
        sa.Column("shortfall_cents", sa.BigInteger, nullable=False),
        sa.Column("balance_cents", sa.BigInteger, nullable=True),
        sa.Column("journal_id", sa.Integer, nullable=True),
        sa.Column("batch_id", sa.String(64), nullable=True),
        sa.Column("posted_at", sa.Float, nullable=False),
        sa.Column("token_key", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("terminal_id", "txn_id", name="pk_canteen_payments"),
        sa.ForeignKeyConstraint(
            ["journal_id"],
            ["canteen_journal.journal_id"],
            name="fk_canteen_payments_journal_id_canteen_journal",
        ),
        sa.CheckConstraint(
            "status IN ('approved', 'refused', 'shortfall')", name="ck_canteen_payments_status"
        ),
        sa.CheckConstraint(
            "debited_cents + shortfall_cents <= amount_cents", name="ck_canteen_payments_covered"
        ),
    )
    op.create_index("ix_canteen_payments_posted_at", "canteen_payments", ["posted_at"])
    op.create_index(
        "ix_canteen_payments_token_key", "canteen_payments", ["token_key"], unique=True
    )
    op.create_table(
        "canteen_shortfalls",
        sa.Column("terminal_id", sa.String(64), nullable=False),
        sa.Column("txn_id", sa.String(64), nullable=False),
        sa.Column("account_id", sa.String(64), nullable=True),
        sa.Column("amount_cents", sa.BigInteger, nullable=False),
        sa.Column("covered_cents", sa.BigInteger, nullable=False),
        sa.Column("shortfall_cents", sa.BigInteger, nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("over_limit", sa.String(16), nullable=True),
        sa.Column("request_ts", sa.Float, nullable=False),
        sa.Column("posted_at", sa.Float, nullable=False),
        sa.Column("resolved_at", sa.Float, nullable=True),
        sa.PrimaryKeyConstraint("terminal_id", "txn_id", name="pk_canteen_shortfalls"),
        sa.CheckConstraint(
            "shortfall_cents > 0", name="ck_canteen_shortfalls_shortfall_positive"
        ),
    )
    op.create_index("ix_canteen_shortfalls_posted_at", "canteen_shortfalls", ["posted_at"])
    op.create_table(
        "canteen_idempotency",
        sa.Column("idempotency_key", sa.String(128), nullable=False),
        sa.Column("operation", sa.String(16), nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("amount_cents", sa.BigInteger, nullable=False),
        sa.Column("terminal_id", sa.String(64), nullable=True),
        sa.Column("txn_id", sa.String(64), nullable=True),
        sa.Column("journal_id", sa.Integer, nullable=False),
        sa.Column("balance_cents", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("idempotency_key", name="pk_canteen_idempotency"),
        sa.ForeignKeyConstraint(
            ["journal_id"],
            ["canteen_journal.journal_id"],
            name="fk_canteen_idempotency_journal_id_canteen_journal",
        ),
    )
    _create_immutability_triggers()


def _create_immutability_triggers() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(
            """
            CREATE FUNCTION canteen_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION '% on % refused: ledger rows are append-only',
                    TG_OP, TG_TABLE_NAME USING ERRCODE = 'integrity_constraint_violation';
            END $$
            """
        )
        for table in _IMMUTABLE:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION canteen_refuse_change()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION canteen_refuse_change()"
            )
    elif dialect == "sqlite":
        for table in _IMMUTABLE:
            for operation in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{operation.lower()} BEFORE {operation} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{operation} on {table} refused: "
                    "ledger rows are append-only'); END"
                )
    else:
        raise NotImplementedError(f"no append-only triggers for {dialect}")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table in _IMMUTABLE:
        if dialect == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_update")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")
    if dialect == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS canteen_refuse_change()")
    for table in ("canteen_idempotency", "canteen_shortfalls", "canteen_payments"):
        op.drop_table(table)
    op.drop_table("canteen_entries")
    op.drop_table("canteen_journal")
    op.drop_table("canteen_accounts")

