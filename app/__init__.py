"""The use cases: what the front ends (the Prefect flows, the ``digits`` command, ``dvc.yaml``'s stages) ask for.

Each use case is one function with one name, built from the library in ``pipeline/``; it imports
neither Prefect nor BentoML, so every front end runs the same code.
"""
