"""The one exception type the suite raises for bad input.

Every message is one line that names the problem (shape, dtype, NaN, missing file,
unknown model). The CLI turns it into ``error: <message>`` on stderr and exit code 2.
It subclasses ValueError so that callers may catch either.
"""


class SparseInferError(ValueError):
    """Bad input to a SparseInfer function or command."""
