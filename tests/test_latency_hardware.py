"""Hardware specs as data: the five shipped platforms, sources, and user-added files."""
import pytest

from sparseinfer.reference.errors import SparseInferError
from sparseinfer.sim.hardware import builtin_hardware, load_hardware, read_hardware_file

PLATFORMS = ("jetson-orin-agx", "a100-80gb-sxm", "h100-sxm", "h200", "rtx-4090")


def test_every_platform_is_shipped_with_a_source_for_every_figure():
    table = builtin_hardware()
    assert set(PLATFORMS) <= set(table)
    for spec in table.values():
        figures = [k for k in spec.to_dict() if k.endswith(("_gb_per_s", "_gib", "_mib", "_count", "_ghz", "_tflops", "_per_s"))]
        assert len(figures) == 8
        assert all(len(spec.sources[f]) > 10 for f in figures), spec.name
        assert set(spec.efficiency_notes) == {"dense_bandwidth_fraction", "sparse_bandwidth_fraction",
                                              "kernel_launch_us", "compute_fraction"}


def test_orin_is_the_papers_platform():
    orin = load_hardware("jetson-orin-agx")
    assert orin.memory_bandwidth_gb_per_s == 204.8      # paper Sec. V
    assert orin.memory_gib == 64 and orin.l2_cache_mib == 4
    # derived figures agree with their stated derivations
    assert orin.fp32_cuda_tflops == pytest.approx(2048 * 2 * 1.3e9 / 1e12, rel=1e-3)
    assert orin.popc_tera_per_s == pytest.approx(16 * 16 * 1.3e9 / 1e12, rel=1e-2)



def _write_variant(tmp_path, text_edit):
    src = (builtin_hardware()["jetson-orin-agx"].path)
    text = open(src).read()
    p = tmp_path / "mine.toml"
    p.write_text(text_edit(text))
    return p


def test_a_platform_can_be_added_from_a_small_file(tmp_path):
    p = _write_variant(tmp_path, lambda t: t.replace('name = "jetson-orin-agx"', 'name = "orin-overclocked"')
                       .replace("memory_bandwidth_gb_per_s = 204.8", "memory_bandwidth_gb_per_s = 250.0"))
    spec = load_hardware(str(p))
    assert spec.name == "orin-overclocked" and spec.memory_bandwidth_gb_per_s == 250.0


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace("popc_tera_per_s = \"derived", "other = \"derived"), "no source given for popc_tera_per_s"),
    (lambda t: t.replace("dense_bandwidth_fraction = 0.70", "dense_bandwidth_fraction = 1.5"), "must be <= 1"),
    (lambda t: t.replace("memory_bandwidth_gb_per_s = 204.8", "memory_bandwidth_gb_per_s = -1"), "must be a finite number > 0"),
    (lambda t: t.replace("memory_bandwidth_gb_per_s = 204.8", "memory_bandwidth_gb_per_s = inf"),
     "mine.toml: memory_bandwidth_gb_per_s must be a finite number > 0, got inf"),
    (lambda t: t.replace("memory_bandwidth_gb_per_s = 204.8", "memory_bandwidth_gb_per_s = nan"),
     "memory_bandwidth_gb_per_s must be a finite number > 0, got nan"),
    (lambda t: t.replace("kernel_launch_us = ", "kernel_launch_us = +inf #"), "kernel_launch_us must be a finite number"),
    (lambda t: t.replace("sm_count = 16", "sm_count = 16.5"), "sm_count must be a whole number, got 16.5"),
    (lambda t: t.replace("sm_count = 16", "sm_count = \"16\""), "sm_count must be a number"),
    (lambda t: t.replace("[efficiency]", "[efficiencyx]"), "missing [efficiency] table"),
    (lambda t: t + "\n[[[", "cannot read hardware file"),
    (lambda t: t.replace('name = "jetson-orin-agx"', "name = 5"), "toml: 'name' must be a non-empty string, got 5"),
    (lambda t: t.replace('name = "jetson-orin-agx"', 'name = " "'), "'name' must be a non-empty string, got ' '"),
    (lambda t: t.replace('name = "jetson-orin-agx"', 'label = "x"'), "mine.toml: missing 'name'"),
])
def test_bad_hardware_files_give_one_line_errors(tmp_path, edit, message):
    p = _write_variant(tmp_path, edit)
    with pytest.raises(SparseInferError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_hardware_file(p)


def test_unknown_hardware():
    with pytest.raises(SparseInferError, match="unknown hardware 'tpu-v9'"):
        load_hardware("tpu-v9")
    with pytest.raises(SparseInferError, match="no such hardware file"):
        load_hardware("/nonexistent/x.toml")
