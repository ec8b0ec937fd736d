"""The ``digits`` command: one front end of the use cases in ``app/``, a module per topic."""
