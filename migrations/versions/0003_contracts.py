"""contract envelopes

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "contract_envelopes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("envelope_id", sa.String(length=64), nullable=True),
        sa.Column("deal_id", sa.Integer(), nullable=False),
        sa.Column("contract", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("event_id", sa.String(length=32), nullable=True),
        sa.Column("status_changed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_message_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_polled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
        sa.UniqueConstraint("envelope_id"),
    )
    op.create_index("ix_contract_envelopes_deal_id", "contract_envelopes", ["deal_id"])
    op.create_index("ix_contract_envelopes_status", "contract_envelopes", ["status"])


def downgrade() -> None:
    op.drop_index("ix_contract_envelopes_status", table_name="contract_envelopes")
    op.drop_index("ix_contract_envelopes_deal_id", table_name="contract_envelopes")
    op.drop_table("contract_envelopes")
