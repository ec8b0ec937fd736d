"""The prediction log: answers and their corrections.

Revision ID: 0001
Revises:
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("route", sa.String(length=16), nullable=False),
        sa.Column("model_name", sa.String(length=255), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=True),
        sa.Column("runtime", sa.String(length=16), nullable=False),
        sa.Column("digit", sa.SmallInteger(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("unsure", sa.Boolean(), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("ink_share", sa.Float(), nullable=False),
        sa.Column("box_top", sa.SmallInteger(), nullable=False),
        sa.Column("box_left", sa.SmallInteger(), nullable=False),
        sa.Column("box_bottom", sa.SmallInteger(), nullable=False),
        sa.Column("box_right", sa.SmallInteger(), nullable=False),
        sa.Column("centre_row", sa.Float(), nullable=False),
        sa.Column("centre_col", sa.Float(), nullable=False),
        sa.Column("stroke_width", sa.Float(), nullable=False),
        sa.Column("image", sa.LargeBinary(), nullable=False),
        sa.Column("upload", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index("ix_predictions_created_at", "predictions", ["created_at"])
    op.create_index("ix_predictions_model_version", "predictions", ["model_version"])
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("label", sa.SmallInteger(), nullable=False),
        sa.Column("client", sa.String(length=16), nullable=True),
        sa.Column("status", sa.String(length=16), server_default="accepted", nullable=False),
        sa.Column("reason", sa.String(length=160), nullable=True),
        sa.Column("harvested_at", sa.DateTime(), nullable=True),
        sa.Column("data_version", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(["request_id"], ["predictions.request_id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_index("ix_predictions_model_version", table_name="predictions")
    op.drop_index("ix_predictions_created_at", table_name="predictions")
    op.drop_table("predictions")
