"""sim.traffic byte counts and the kernel commands' CPU behaviour."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from sparseinfer.kernels import FAMILIES, PIPELINES
from sparseinfer.sim import traffic
from sparseinfer.tools.cli import cli


def test_gate_up_bytes_count_only_the_rows_read():
    d, k = 5120, 13824
    sparse = traffic.gate_up_bytes("v1_mask", d, k, "fp16", 1106, 1000)
    assert sparse == (1106 + 1000) * d * 2 + d * 4 + 2 * k * 4 + k
    dense = traffic.gate_up_bytes("dense", d, k, "fp16", 1106, 1000)
    assert dense == 2 * k * d * 2 + d * 4 + 2 * k * 4
    fused = traffic.gate_up_bytes("v3_fused", d, k, "fp16", 1106, 1000)
    assert fused - sparse == k * 160 * 4 + 160 * 4 + k * 5 - k   # sign words in, counts out, no mask read


def test_down_and_mlp_bytes():
    d, k = 4096, 11008
    v1 = traffic.down_bytes("v1_chunks", d, k, "bf16", 900)
    assert v1 == 900 * d * 2 + k * 4 + 2 * 22 * d * 4 + d * 4        # 22 chunks of 512 rows
    assert traffic.down_bytes("dense", d, k, "bf16", 900) - v1 == (k - 900) * d * 2
    assert traffic.down_bytes("v2_atomic", d, k, "fp32", 900) == 900 * d * 4 + k * 4 + d * 4
    rows = {"gate": 1000, "up": 900, "down": 900}
    for p in PIPELINES.values():
        total = traffic.mlp_bytes(p.gate_up, p.down, d, k, "fp16", rows)
        assert total > traffic.down_bytes(p.down, d, k, "fp16", 900)
    assert traffic.dense_mlp_bytes(d, k, "fp16") == 3 * d * k * 2
    with pytest.raises(ValueError, match="unknown gate_up version"):
        traffic.gate_up_bytes("v9", d, k, "fp16", 1, 1)


def test_kernels_command_lists_every_version():
    res = CliRunner().invoke(cli, ["kernels", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert {(v["family"], v["name"]) for v in data["versions"]} == \
        {(f, n) for f, vs in FAMILIES.items() for n in vs}
    assert [p["name"] for p in data["pipelines"]] == list(PIPELINES)
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
    from sparseinfer.benchmarks.harness import bench_targets
    from sparseinfer.kernels import emulator

    monkeypatch.setenv(emulator.ORDER_ENV, order)
    res = CliRunner().invoke(cli, ["verify-kernels", "--backend", "emulated", "--d", "97", "--k", "600", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)                       # progress goes to stderr
    assert out["backend"] == "emulated"
    assert [(r["kernel"], r["version"]) for r in out["rows"]] == bench_targets()
    assert all(r["verified"] and (r["d"], r["k"]) == (97, 600) for r in out["rows"])


@pytest.mark.emulated
def test_verify_kernels_exits_1_on_a_mismatch(monkeypatch):
    from sparseinfer.benchmarks import harness

    monkeypatch.setattr(harness, "same_bits", lambda got, want: False)      # every bit-exact check fails
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
