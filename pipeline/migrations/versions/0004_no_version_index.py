"""The predictions table loses its index on model_version: no query looks answers up by version.

Its queries group by version over rows they find by time or request id, and every answer paid to
keep the index up to date.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_predictions_model_version", table_name="predictions")


def downgrade() -> None:
    op.create_index("ix_predictions_model_version", "predictions", ["model_version"])
