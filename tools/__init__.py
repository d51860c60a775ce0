"""The ``sparseinfer`` command-line interface."""
