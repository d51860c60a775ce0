"""``python -m sparseinfer.benchmarks.genai_builder``: the benchmark's command line."""
from .cli import cli

cli()
