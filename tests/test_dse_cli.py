"""The DSE commands through click's runner: JSON shapes, help, one-line errors (exit 2)."""
import json

import pytest

from helpers import run_cli as run


def test_latency_json_breakdown():
    r = run("latency", "--model", "prosparse-llama2-13b", "--hw", "jetson-orin-agx", "--alpha", "1.02@0-19,1.00",
            "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    methods = [m["method"] for m in data["methods"]]
    assert methods == ["llama.cpp", "PowerInfer", "SparseInfer", "SparseInfer+KF", "SparseInfer+AS",
                       "SparseInfer+KF+AS"]
    dense = data["methods"][0]
    assert dense["speedup_vs_llama.cpp"] == 1.0
    assert {o["bound"] for o in dense["ops"]} <= {"memory", "compute", "launch"}
    assert "memory" in {o["bound"] for o in dense["ops"]} and "launch" in {o["bound"] for o in dense["ops"]}
    assert len(data["sparseinfer_layers"]) == 40
    assert data["sparseinfer_layers"][0]["predicted"] < data["sparseinfer_layers"][39]["predicted"]


def test_latency_text_with_ops_and_sparsity_override():
    r = run("latency", "--model", "prosparse-llama2-7b", "--sparsity", "0.5", "--ops", "PowerInfer")
    assert r.exit_code == 0, r.output
    assert "predictor_fc1" in r.stdout and "mlp_down_sparse" in r.stdout and "PowerInfer" in r.stdout


def test_latency_on_every_platform_and_hw_file(tmp_path):
    for hw in ("jetson-orin-agx", "a100-80gb-sxm", "h100-sxm", "h200", "rtx-4090"):
        r = run("latency", "--hw", hw, "--json")
        assert r.exit_code == 0, (hw, r.output)
    r = run("latency", "--model", "prosparse-llama2-7b", "--json")
    orin = json.loads(r.stdout)["methods"][0]["total_us"]
    src = json.loads(run("hardware", "--json").stdout)
    orin_path = next(s["path"] for s in src if s["name"] == "jetson-orin-agx")
    text = open(orin_path).read().replace("memory_bandwidth_gb_per_s = 204.8", "memory_bandwidth_gb_per_s = 409.6")
    (tmp_path / "fast.toml").write_text(text)
    r = run("latency", "--model", "prosparse-llama2-7b", "--hw-file", str(tmp_path / "fast.toml"), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["methods"][0]["total_us"] < 0.6 * orin


def test_fig4_json_rows():
    r = run("fig4", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == 8
    for row in rows:
        assert set(row) >= {"model", "alpha", "vs", "paper", "simulated"}
        assert row["vs"] in ("llama.cpp", "PowerInfer")
        assert abs(row["simulated"] / row["paper"] - 1) <= 0.10


@pytest.mark.parametrize("args,message", [
    (["latency", "--hw", "tpu-v9"], "unknown hardware 'tpu-v9'"),
    (["fig4", "--hw", "tpu-v9"], "unknown hardware 'tpu-v9'"),
    (["latency", "--hw-file", "/nonexistent/hw.toml"], "no such hardware file"),
    (["latency", "--alpha", "1.02@0-99,1.00"], "names layer 99"),
    (["latency", "--sparsity", "1.5"], "sparsity must be in [0, 1)"),
    (["latency", "--context", "-1"], "'--context': -1 is not in the range 0<=x<=16777216"),
    (["sweep", "/nonexistent", "--alpha", "1.05:1.00:0.01"], "STOP is below START"),
    (["sweep", "/nonexistent", "--alpha", "1.00:x"], "alpha range"),
    (["sweep", "/nonexistent", "--hw", "tpu-v9"], "unknown hardware"),
    (["fig4", "--plot", "/nonexistent/dir/x.png"], "no such directory"),
])
def test_errors_are_one_line_exit_2(args, message):
    r = run(*args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


@pytest.mark.parametrize("layers", ["x", "3-x", "5-3", "-1"])
def test_sweep_rejects_bad_layers_before_loading_the_checkpoint(tmp_path, layers):
    # tmp_path is a directory but not a checkpoint: loading it would fail with "no such config file"
    r = run("sweep", str(tmp_path), "--layers", layers)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: layers {layers!r}: bad layer range"), r.stderr
    r = run("sweep", str(tmp_path), "--layers", "0-1")        # well-formed: it gets as far as the load
    assert r.exit_code == 2 and "config" in r.stderr, r.stderr
