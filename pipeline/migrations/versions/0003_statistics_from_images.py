"""The input statistics leave the predictions table: the monitor computes them from the stored images.

Writing them cost every answer a share of the writer's time; the image they come from is stored anyway.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATISTICS = {
    "ink_share": sa.Float(),
    "box_top": sa.SmallInteger(),
    "box_left": sa.SmallInteger(),
    "box_bottom": sa.SmallInteger(),
    "box_right": sa.SmallInteger(),
    "centre_row": sa.Float(),
    "centre_col": sa.Float(),
    "stroke_width": sa.Float(),
}


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:  # SQLite rebuilds the table; PostgreSQL drops in place
        for name in STATISTICS:
            batch.drop_column(name)


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        for name, kind in STATISTICS.items():
            batch.add_column(sa.Column(name, kind, nullable=False, server_default="0"))
