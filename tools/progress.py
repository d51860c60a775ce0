"""Progress the commands show on stderr (stdout holds only the result): a bar, and exports
made under one with a line saying what was written."""
from __future__ import annotations

import contextlib

from sparseinfer.reference.alpha import DEFAULT_ALPHA
from sparseinfer.reference.files import check_replaceable

from .output import echo_err


@contextlib.contextmanager
def progress_bar(description: str, total: int):
    """A bar on stderr; yields the function to call after each of ``total`` steps. Off where
    stderr is not a terminal (rich would end it there with an empty line)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True, console=console, disable=not console.is_interactive) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def export_checkpoint(checkpoint, out, sparse=True, alpha=DEFAULT_ALPHA, target="cpu", debug=False, quiet=False,
                      portable=False, dtype="float32", approximate=False, quantize=None, accuracy_level=0):
    """model_export.export_folder.export_checkpoint with a progress bar and, unless ``quiet``,
    a line on stderr; what a quantized export converted is noted on stderr in any case. A
    quantized export of a path reads the checkpoint one layer at a time."""
    from sparseinfer.model_export.export import quantize_conflicts
    from sparseinfer.model_export.export_folder import export_checkpoint as export
    from sparseinfer.model_export.loaders import load_checkpoint, open_checkpoint
    from sparseinfer.reference.errors import SparseInferError

    check_replaceable(out, "model")                # before loading: a device or FIFO is refused at once
    why = quantize_conflicts(quantize, portable, dtype, target, accuracy_level)
    if why:
        raise SparseInferError(why)
    with contextlib.ExitStack() as stack:
        if hasattr(checkpoint, "tokenizer"):
            ck = checkpoint
        else:
            ck = stack.enter_context(open_checkpoint(checkpoint)) if quantize else load_checkpoint(checkpoint)
        with progress_bar(f"export {'sparse' if sparse else 'dense'}", ck.shape.num_layers) as advance:
            path = export(ck, out, sparse, alpha, target, debug, portable, progress=advance, dtype=dtype,
                          approximate=approximate, quantize=quantize, accuracy_level=accuracy_level,
                          note=lambda line: echo_err(f"note: {line}"))
    if not quiet:
        echo_err(f"wrote {path} ({'sparse, target ' + target + ', alpha ' + alpha if sparse else 'dense'}"
                 f"{', portable' if portable else ', fused attention'}{', debug outputs' if debug else ''}, {dtype}"
                 f"{', weights in ' + quantize if quantize else ''}"
                 f"{', accuracy level ' + str(accuracy_level) if accuracy_level else ''})")
    return path
