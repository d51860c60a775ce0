"""Plots are written as non-empty PNG files."""

import pytest
from click.testing import CliRunner

from sparseinfer.reference.errors import SparseInferError
from sparseinfer.sim import latency as lat
from sparseinfer.sim import plots
from sparseinfer.sim.hardware import load_hardware
from sparseinfer.tools.cli import cli

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 2000


def test_precision_recall_plot(tmp_path):
    stats = [{"layer": i, "precision": 0.9 + i / 100, "recall": 0.8 + i / 50} for i in range(5)]
    assert _is_png(plots.plot_precision_recall(stats, tmp_path / "fig3.png"))


def test_fig4_plot_via_cli(tmp_path):
    out = tmp_path / "fig4.png"
    r = CliRunner().invoke(cli, ["fig4", "--plot", str(out)])
    assert r.exit_code == 0, r.output
    assert _is_png(out)


def test_sweep_plot(tmp_path):
    rows = [{"alpha": a, "latency_ms": 1 + a, "mean_kl": 1 / a, "pareto": i % 2 == 0} for i, a in enumerate((1.0, 1.01, 1.02))]
    result = {"rows": rows, "hardware": "jetson-orin-agx", "layers": "0-19", "model": "toy"}
    assert _is_png(plots.plot_sweep(result, tmp_path / "sweep.png"))


def test_plot_needs_png_suffix(tmp_path):
    with pytest.raises(SparseInferError, match="must end in .png"):
        plots.plot_fig4(lat.fig4_variants(load_hardware("jetson-orin-agx")), tmp_path / "x.svg")
