"""Directory: buildings, floors, units, residents, cards, phone credentials, access groups,
visitor passes and the change log gateways poll (gateway/store/directory_schema.py).

Revision ID: 0002_directory
Revises: 0001_core
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_directory"
down_revision = "0001_core"
branch_labels = None
depends_on = None

_FLOOR_REF = ["floors.building_id", "floors.number"]


def upgrade() -> None:
    op.create_table(
        "buildings",
        sa.Column("building_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("building_id", name="pk_buildings"),
    )
    op.create_table(
        "floors",
        sa.Column("building_id", sa.String(64), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("public", sa.Boolean, nullable=False),
        sa.PrimaryKeyConstraint("building_id", "number", name="pk_floors"),
        sa.ForeignKeyConstraint(["building_id"], ["buildings.building_id"],
                                name="fk_floors_building_id_buildings"),
    )
    op.create_table(
        "units",
        sa.Column("unit_id", sa.String(64), nullable=False),
        sa.Column("building_id", sa.String(64), nullable=False),
        sa.Column("floor", sa.Integer, nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("unit_id", name="pk_units"),
        sa.ForeignKeyConstraint(["building_id", "floor"], _FLOOR_REF,
                                name="fk_units_building_id_floors"),
    )
    op.create_table(
        "residents",
        sa.Column("resident_id", sa.String(64), nullable=False),
        sa.Column("unit_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("moved_out_at", sa.Float, nullable=True),
        sa.PrimaryKeyConstraint("resident_id", name="pk_residents"),
        sa.ForeignKeyConstraint(["unit_id"], ["units.unit_id"],
                                name="fk_residents_unit_id_units"),
    )
    op.create_index("ix_residents_unit_id", "residents", ["unit_id"])
    op.create_table(
        "cards",
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("card_number", sa.String(64), nullable=False),
        sa.Column("resident_id", sa.String(64), nullable=False),
        sa.Column("issued_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.PrimaryKeyConstraint("kind", "card_number", name="pk_cards"),
        sa.ForeignKeyConstraint(["resident_id"], ["residents.resident_id"],
                                name="fk_cards_resident_id_residents"),
    )
    op.create_index("ix_cards_resident_id", "cards", ["resident_id"])
    op.create_table(
        "phone_credentials",
        sa.Column("credential_id", sa.String(16), nullable=False),
        sa.Column("resident_id", sa.String(64), nullable=False),
        sa.Column("secret", sa.LargeBinary(32), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("enrolled_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.PrimaryKeyConstraint("credential_id", name="pk_phone_credentials"),
        sa.ForeignKeyConstraint(["resident_id"], ["residents.resident_id"],
                                name="fk_phone_credentials_resident_id_residents"),
    )
    op.create_index("ix_phone_credentials_resident_id", "phone_credentials", ["resident_id"])
    op.create_table(
        "access_groups",
        sa.Column("group_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("group_id", name="pk_access_groups"),
        sa.UniqueConstraint("name", name="uq_access_groups_name"),
    )
    op.create_table(
        "access_group_gates",
        sa.Column("group_id", sa.String(64), nullable=False),
        sa.Column("gate_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("group_id", "gate_id", name="pk_access_group_gates"),
        sa.ForeignKeyConstraint(["group_id"], ["access_groups.group_id"],
                                name="fk_access_group_gates_group_id_access_groups"),
    )
    op.create_table(
        "access_group_floors",
        sa.Column("group_id", sa.String(64), nullable=False),
        sa.Column("building_id", sa.String(64), nullable=False),
        sa.Column("floor", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("group_id", "building_id", "floor",
                                name="pk_access_group_floors"),
        sa.ForeignKeyConstraint(["group_id"], ["access_groups.group_id"],
                                name="fk_access_group_floors_group_id_access_groups"),
        sa.ForeignKeyConstraint(["building_id", "floor"], _FLOOR_REF,
                                name="fk_access_group_floors_building_id_floors"),
    )
    op.create_table(
        "access_group_windows",
        sa.Column("group_id", sa.String(64), nullable=False),
        sa.Column("weekday", sa.Integer, nullable=False),
        sa.Column("start_minute", sa.Integer, nullable=False),
        sa.Column("end_minute", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("group_id", "weekday", "start_minute",
                                name="pk_access_group_windows"),
        sa.ForeignKeyConstraint(["group_id"], ["access_groups.group_id"],
                                name="fk_access_group_windows_group_id_access_groups"),
    )
    op.create_table(
        "access_group_members",
        sa.Column("group_id", sa.String(64), nullable=False),
        sa.Column("resident_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("group_id", "resident_id", name="pk_access_group_members"),
        sa.ForeignKeyConstraint(["group_id"], ["access_groups.group_id"],
                                name="fk_access_group_members_group_id_access_groups"),
        sa.ForeignKeyConstraint(["resident_id"], ["residents.resident_id"],
                                name="fk_access_group_members_resident_id_residents"),
    )
    op.create_index("ix_access_group_members_resident_id", "access_group_members",
                    ["resident_id"])
    op.create_table(
        "visitor_passes",
        sa.Column("pass_id", sa.String(64), nullable=False),
        sa.Column("issued_by", sa.String(64), nullable=False),
        sa.Column("visitor_name", sa.String(128), nullable=False),
        sa.Column("credential_id", sa.String(16), nullable=False),
        sa.Column("secret", sa.LargeBinary(32), nullable=False),
        sa.Column("building_id", sa.String(64), nullable=True),
        sa.Column("floor", sa.Integer, nullable=True),
        sa.Column("valid_from", sa.Float, nullable=False),
        sa.Column("valid_until", sa.Float, nullable=False),
        sa.Column("max_uses", sa.Integer, nullable=False),
        sa.Column("uses", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.PrimaryKeyConstraint("pass_id", name="pk_visitor_passes"),
        sa.ForeignKeyConstraint(["issued_by"], ["residents.resident_id"],
                                name="fk_visitor_passes_issued_by_residents"),
        sa.ForeignKeyConstraint(["building_id", "floor"], _FLOOR_REF,
                                name="fk_visitor_passes_building_id_floors"),
        sa.UniqueConstraint("credential_id", name="uq_visitor_passes_credential_id"),
    )
    op.create_index("ix_visitor_passes_issued_by", "visitor_passes", ["issued_by"])
    op.create_table(
        "visitor_pass_gates",
        sa.Column("pass_id", sa.String(64), nullable=False),
        sa.Column("gate_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("pass_id", "gate_id", name="pk_visitor_pass_gates"),
        sa.ForeignKeyConstraint(["pass_id"], ["visitor_passes.pass_id"],
                                name="fk_visitor_pass_gates_pass_id_visitor_passes"),
    )
    op.create_table(
        "directory_changes",
        sa.Column("change_id", sa.Integer, nullable=False, autoincrement=True),
        sa.Column("changed_at", sa.Float, nullable=False),
        sa.Column("what", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("change_id", name="pk_directory_changes"),
    )


def downgrade() -> None:
    for index, table in (("ix_visitor_passes_issued_by", "visitor_passes"),
                         ("ix_access_group_members_resident_id", "access_group_members"),
                         ("ix_phone_credentials_resident_id", "phone_credentials"),
                         ("ix_cards_resident_id", "cards"),
                         ("ix_residents_unit_id", "residents")):
        op.drop_index(index, table_name=table)
    for table in ("directory_changes", "visitor_pass_gates", "visitor_passes",
                  "access_group_members", "access_group_windows", "access_group_floors",
                  "access_group_gates", "access_groups", "phone_credentials", "cards",
                  "residents", "units", "floors", "buildings"):
        op.drop_table(table)
