"""Merge: one head again after 0002 (directory), 0003 (ledger) and 0004 (audit).

Revision ID: 0005_merge_heads
Revises: 0002_directory, 0003_ledger, 0004_audit

The three were written side by side and each revised 0001, so the history had three heads
and `alembic upgrade head` (and anything asking for "the" current revision) failed with
"more than one head". Rewriting their `down_revision`s into a chain would change the
meaning of databases already stamped with the three heads (every install so far); a merge
revision keeps them valid: such a database upgrades by applying this no-op, a new one runs
0001, the three branches, then this. Later revisions revise this one.
"""

revision = "0005_merge_heads"
down_revision = ("0002_directory", "0003_ledger", "0004_audit")
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Nothing to change: the branches touch disjoint tables."""


def downgrade() -> None:
    """Nothing to undo; downgrading further reopens the three branches."""
