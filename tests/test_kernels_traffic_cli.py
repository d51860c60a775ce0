"""The bytes each kernel version's record says it touches, and the kernel commands' CPU behaviour."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from sparseinfer.kernels import (DOWN, DOWN_QUANT, FAMILIES, GATE_UP, GATE_UP_QUANT, PACK_SIGNS, PACK_SIGNS_QUANT,
                                 PIPELINES, PREDICT, QUANT_PIPELINES)
from sparseinfer.sim.ops import dense_mlp_bytes
from sparseinfer.tools.cli import cli


def test_gate_up_bytes_count_only_the_rows_read():
    d, k, rows = 5120, 13824, {"gate": 1106, "up": 1000, "down": 1000}
    sparse = GATE_UP["v1_mask"].touched(d, k, "fp16", rows)
    assert sparse == (1106 + 1000) * d * 2 + d * 4 + 2 * k * 4 + k
    dense = GATE_UP["dense"].touched(d, k, "fp16", rows)
    assert dense == 2 * k * d * 2 + d * 4 + 2 * k * 4
    fused = GATE_UP["v3_fused"].touched(d, k, "fp16", rows)
    assert fused - sparse == k * 160 * 4 + 160 * 4 + k * 5 - k   # sign words in, counts out, no mask read
    assert GATE_UP["v2_list"].touched(d, k, "fp16", rows) - sparse == 1106 * 4 + 4 - k   # the list, not the mask
    assert PREDICT["v2"].touched(d, k, "fp16", rows) - PREDICT["v1"].touched(d, k, "fp16", rows) == k * 5 + 4


def test_down_and_mlp_bytes():
    d, k, rows = 4096, 11008, {"gate": 1000, "up": 900, "down": 900}
    v1 = DOWN["v1_chunks"].touched(d, k, "bf16", rows)
    assert v1 == 900 * d * 2 + k * 4 + 2 * 22 * d * 4 + d * 4        # 22 chunks of 512 rows
    assert DOWN["dense"].touched(d, k, "bf16", rows) - v1 == (k - 900) * d * 2
    assert DOWN["v2_atomic"].touched(d, k, "fp32", rows) == 900 * d * 4 + k * 4 + d * 4
    for p in PIPELINES.values():
        total = p.touched(d, k, "fp16", rows)
        assert total > DOWN[p.down].touched(d, k, "fp16", rows)
    # a pipeline: x packed, the predict version its gate_up reads, gate_up, down
    mask = PIPELINES["sparse-mask"]
    assert mask.touched(d, k, "fp16", rows) == sum(v.touched(d, k, "fp16", rows) for v in (
        PACK_SIGNS["v1"], PREDICT["v1"], GATE_UP[mask.gate_up], DOWN[mask.down]))
    assert PACK_SIGNS["v1"].touched(d, k, "fp16", rows) == d * 4 + 128 * 4
    assert dense_mlp_bytes(d, k, "fp16") == 3 * d * k * 2


def test_quantized_versions_count_the_blocks_they_read():
    d, k, rows = 4096, 11008, {"gate": 1100, "up": 1000, "down": 1000}
    n_chunks = 22
    for fmt, block_bytes in (("q8_0", 34), ("q4_0", 18), ("q4_1", 20)):
        row = d // 32 * block_bytes
        gate_up, down = GATE_UP_QUANT[fmt], DOWN_QUANT[fmt]
        # the paired kernel reads the up row of every predicted-active row (1100), v1_mask only where h1 != 0
        assert gate_up["v2_paired"].touched(d, k, fmt, rows) == 2 * 1100 * row + d * 4 + 2 * k * 4 + (
            PREDICT["v1"].touched(d, k, fmt, rows))
        assert gate_up["v1_mask"].touched(d, k, fmt, rows) == (1100 + 1000) * row + d * 4 + 2 * k * 4 + k
        assert gate_up["dense"].touched(d, k, fmt, rows) == 2 * k * row + d * 4 + 2 * k * 4
        assert down["v1_chunks"].touched(d, k, fmt, rows) == 1000 * row + k * 4 + 2 * n_chunks * d * 4 + d * 4
        assert down["dense"].touched(d, k, fmt, rows) - down["v1_chunks"].touched(d, k, fmt, rows) == (k - 1000) * row
        assert PACK_SIGNS_QUANT[fmt]["v1"].touched(d, k, fmt, rows) == k * row + k * 128 * 4
        sparse = QUANT_PIPELINES[f"sparse-{fmt}"]
        assert sparse.touched(d, k, fmt, rows) == sum(v.touched(d, k, fmt, rows) for v in (
            PACK_SIGNS["v1"], gate_up["v2_paired"], down["v1_chunks"]))
    # Q4_0 rows are 18 / 64 of fp16 rows' bytes
    assert GATE_UP_QUANT["q4_0"]["dense"].touched(d, k, "q4_0", rows) - d * 4 - 2 * k * 4 == \
        (GATE_UP["dense"].touched(d, k, "fp16", rows) - d * 4 - 2 * k * 4) * 18 // 64


def test_kernels_command_lists_every_version():
    res = CliRunner().invoke(cli, ["kernels", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert {(v["family"], v["name"]) for v in data["versions"]} == \
        {(f, n) for f, vs in FAMILIES.items() for n in vs}
    assert [p["name"] for p in data["pipelines"]] == [*PIPELINES, *QUANT_PIPELINES]
    assert {p["name"]: p["weights"] for p in data["pipelines"] if p["weights"]} == \
        {name: p.weights for name, p in QUANT_PIPELINES.items()}
    by_name = {p["name"]: p for p in data["pipelines"]}
    assert (by_name["fused-neuron-major"]["mlp_fused"], by_name["fused-neuron-major"]["layout"]) == ("v1", "neuron-major")
    assert (by_name["sparse-batched"]["mlp_fused"], by_name["sparse-batched"]["layout"]) == (None, "row-major")
    text = CliRunner().invoke(cli, ["kernels"]).output
    assert any(line.startswith("fused ") and "mlp_fused v1" in line for line in text.splitlines())


def test_bench_without_gpu_is_a_one_line_error(monkeypatch):
    from sparseinfer.kernels import device

    def no_gpu():
        raise device.GpuUnavailable("no CUDA device (test)")
    monkeypatch.setattr(device, "_cupy_module", no_gpu)     # the one seam: modules that bound cupy() keep it
    res = CliRunner().invoke(cli, ["bench"])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == ["error: sparseinfer bench needs a CUDA GPU: no CUDA device (test)"]


def test_bench_on_this_machine_without_gpu_prints_one_line_and_exits_2():
    from sparseinfer.kernels import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is None:
        pytest.skip("this machine has a GPU: sparseinfer bench would run")
    proc = subprocess.run([sys.executable, "-m", "sparseinfer.tools.cli", "bench"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert lines == [f"error: sparseinfer bench needs a CUDA GPU: {reason}"]


@pytest.mark.parametrize(("command", "words"), [("bench", ("GPU", "cuBLAS", "verified", "--sparsity", "--results-dir")),
                                                ("kernels", ("bit-exact", "--compile", "NVRTC", "sm_87"))])
def test_kernel_commands_explain_themselves(command, words):
    res = CliRunner().invoke(cli, [command, "--help"])
    assert res.exit_code == 0, res.output
    for word in words:
        assert word in res.output, f"{command} --help does not mention {word}"


def test_bench_rejects_bad_sparsity():
    res = CliRunner().invoke(cli, ["bench", "--sparsity", "0.9,abc"])
    assert res.exit_code == 2 and "not a comma-separated list" in res.output


@pytest.mark.emulated
@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_verify_kernels_on_the_emulator_checks_every_version(monkeypatch, order):
    """Threads run first-to-last or last-to-first between barriers: a race left by a missing
    barrier shows up in one order or the other."""
    from sparseinfer.kernels import emulator
    from sparseinfer.kernels.verify import bench_targets

    monkeypatch.setenv(emulator.ORDER_ENV, order)
    res = CliRunner().invoke(cli, ["verify-kernels", "--backend", "emulated", "--d", "97", "--k", "600", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)                       # progress goes to stderr
    assert out["backend"] == "emulated"
    assert [(r["kernel"], r["version"]) for r in out["rows"]] == bench_targets()
    assert all(r["verified"] and (r["d"], r["k"]) == (97, 600) for r in out["rows"])


@pytest.mark.emulated
def test_verify_kernels_exits_1_on_a_mismatch(monkeypatch):
    from sparseinfer.kernels import verify

    monkeypatch.setattr(verify, "same_bits", lambda got, want: False)       # every bit-exact check fails
    res = CliRunner().invoke(cli, ["verify-kernels", "--backend", "emulated", "--d", "33", "--k", "97"])
    assert res.exit_code == 1
    verdicts = {tuple(line.split()[:2]): line.split()[-1] for line in res.stdout.splitlines()[2:]}
    assert verdicts[("down", "v1_chunks")] == "NO" and verdicts[("mlp", "sparse-fused")] == "NO"
    assert verdicts[("down", "v2_atomic")] == "yes"                           # checked against the bound


def test_verify_kernels_on_gpu_without_one_is_a_one_line_error(monkeypatch):
    from sparseinfer.kernels import device

    monkeypatch.setattr(device, "gpu_unavailable_reason", lambda: "no CUDA device (test)")
    res = CliRunner().invoke(cli, ["verify-kernels", "--backend", "gpu"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == ["error: --backend gpu needs a CUDA GPU: no CUDA device (test)"]
