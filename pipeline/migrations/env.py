"""Alembic's entry point for the prediction log's schema (see ``pipeline.prediction_log``).

The project runs it through ``pipeline.prediction_log.migrate``, which hands over a connection;
``alembic revision --autogenerate -m "..."`` from the project folder (``[tool.alembic]`` in
pyproject.toml) connects to the configured log itself.
"""

from alembic import context

from pipeline.prediction_log import connect, metadata
from pipeline.settings import get_settings

connection = context.config.attributes.get("connection")
if connection is None:
    with connect(get_settings().prediction_log_url).connect() as own:
        context.configure(connection=own, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
