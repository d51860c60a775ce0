"""``sparseinfer bench``: the kernel benchmark (``harness.run``) on this machine's GPU, its
result saved as it grows, so that a run cut short keeps the rows it has."""
from __future__ import annotations

from sparseinfer.kernels.shapes import BENCH_SHAPES
from sparseinfer.reference.files import make_folder, write_json


def results_name(device: str) -> str:
    """The file name of a device's results under a results folder: ``<device>.json``, the
    device's name lower-cased with every other character a dash."""
    return "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-") + ".json"


def bench_kernels(models, sparsities, repeats: int, loop_layers: int, json_path=None, results_dir=None,
                  plot_file=None, log=print) -> dict:
    """Every kernel version and MLP pipeline timed at the shapes of ``models`` (all when empty)
    and ``sparsities``; written to ``json_path`` and ``results_dir/<device>.json`` after every
    case. ``plot_file``: a PNG drawn later, its path checked first. Needs CuPy and a CUDA
    device (``kernels.device.GpuUnavailable``, one line, otherwise)."""
    from sparseinfer.kernels import device

    from .harness import run

    if plot_file:                          # a bad plot path fails now, not after the whole run
        from sparseinfer.sim.plots import check_png_path
        check_png_path(plot_file)
    try:
        device.cupy()
    except device.GpuUnavailable as e:     # one line, exit 2
        raise device.GpuUnavailable(f"sparseinfer bench needs a CUDA GPU: {e}") from None
    shapes = [s for s in BENCH_SHAPES if not models or s.model in models]

    def save(result):                      # after every case too: a run cut short keeps its rows
        if json_path:
            write_json(json_path, result)
        if results_dir:
            write_json(make_folder(results_dir) / results_name(result["device"]), result)

    result = run(shapes, sparsities, repeats=repeats, loop_layers=loop_layers, log=log, save=save)
    save(result)
    return result
