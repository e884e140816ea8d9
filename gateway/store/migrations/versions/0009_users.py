"""Users for a real site: resident invitations and sessions that end (issue 12).

Revision ID: 0009_users
Revises: 0008_edge_trust

- `user_invitations`: one-time invitations for residents to create their app login; only
  SHA-256 of the secret is stored (gateway/store/invitations.py).
- `users.session_epoch`: bumped by a password change or reset and by disabling; tokens of
  an older epoch are refused (gateway/store/users.py).
- `users.resident_id` indexed: "does this resident have a login" on every invitation.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_users"
down_revision = "0008_edge_trust"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("session_epoch", sa.Integer, nullable=False,
                                   server_default="0"))
    op.create_index("ix_users_resident_id", "users", ["resident_id"])
    op.create_table(
        "user_invitations",
        sa.Column("invitation_id", sa.String(32), nullable=False),
        sa.Column("resident_id", sa.String(64), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("created_by", sa.String(64), nullable=True),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("used_at", sa.Float, nullable=True),
        sa.Column("used_by", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("invitation_id", name="pk_user_invitations"),
        sa.ForeignKeyConstraint(["resident_id"], ["residents.resident_id"],
                                name="fk_user_invitations_resident_id_residents"),
    )
    op.create_index("ix_user_invitations_resident_id", "user_invitations", ["resident_id"])


def downgrade() -> None:
    op.drop_index("ix_user_invitations_resident_id", table_name="user_invitations")
    op.drop_table("user_invitations")
    op.drop_index("ix_users_resident_id", table_name="users")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("session_epoch")
