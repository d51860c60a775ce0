"""The sparseinfer CLI through click's runner: outputs and one-line errors with exit code 2."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sparseinfer.benchmarks.decode_bench import timed_rows
from sparseinfer.model_export.op_library import OP_TYPE
from sparseinfer.tools.cli import cli

from helpers import run_cli as run


def test_table1_json():
    r = run("table1", "--json")
    assert r.exit_code == 0, r.output
    t = json.loads(r.stdout)
    assert set(t) >= {"model", "sparsity", "rows", "predictor_memory_mib"}
    assert [row["method"] for row in t["rows"]] == ["llama.cpp", "PowerInfer", "SparseInfer"]
    assert [row["prediction_ops"] for row in t["rows"]] == [0, 19_398_656, 2_211_840]
    assert t["rows"][0]["mlp_ops"] == 212_336_640


def test_table1_text_shows_paper_beside_ours():
    r = run("table1")
    assert r.exit_code == 0
    assert "2,211,840" in r.stdout and "2.211e+06" in r.stdout and "337.5" in r.stdout and "1480.0" in r.stdout


def test_ops_memory_models():
    r = run("ops", "--model", "prosparse-llama2-7b", "--sparsity", "0.9", "--json")
    assert r.exit_code == 0
    ops = json.loads(r.stdout)
    assert ops["per_layer"][2]["prediction_ops"] == 11008 * 128
    r = run("memory", "--model", "prosparse-llama2-13b", "--json")
    assert json.loads(r.stdout)["predictor_memory_mib"]["SparseInfer"] == 337.5
    r = run("models")
    assert "prosparse-llama2-13b" in r.stdout and "13824" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["ops", "--model", "gpt-17"], "unknown model 'gpt-17'"),
    (["ops", "--model", "prosparse-llama2-7b", "--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    (["memory", "--model", "/nonexistent/config.json"], "no such config file"),
    (["table1", "--rank", "0"], "'--rank': 0 is not in the range 1<=x<=1048576"),
    (["ops", "--rank", "x", "--model", "prosparse-llama2-7b"], "Invalid value for '--rank'"),
    (["frobnicate"], "No such command"),
])
def test_errors_are_one_line_exit_2(args, message):
    r = run(*args)
    assert r.exit_code == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


@pytest.mark.parametrize("args,needles", [
    (["export", "ck", "--out", "o", "--target", "tpu"], ["'--target'", "'tpu' is not one of 'cpu', 'cuda'"]),
    (["compare", "ck", "--prompt", "x", "--provider", "tpu"], ["'--provider'", "'cpu', 'cuda'"]),
    (["latency", "--ops", "nope"], ["'--ops'", "'llama.cpp'", "'SparseInfer+KF+AS'"]),
    (["quant-quality", "ck"], ["Missing option '--quantize'. Choose from: q8_0, q4_0, q4_1"]),
    (["export", "--out", "o"], ["Missing argument 'CHECKPOINT'"]),
    (["table1", "--bogus"], ["No such option '--bogus'"]),
    (["latency", "--contxt", "3"], ["No such option '--contxt'", "'--context'"]),
    (["table1", "--rank"], ["Option '--rank' requires an argument"]),
    (["export", "ck", "--out", "o", "--accuracy-level", "9"], ["'--accuracy-level': 9 is not in the range 0<=x<=4"]),
])
def test_click_usage_errors_of_every_command_are_one_line_naming_the_option(args, needles):
    r = run(*args)
    assert (r.exit_code, r.stdout) == (2, ""), r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_the_installed_command_prints_a_bad_choice_on_one_line():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "sparseinfer.tools.cli", "export", "ck", "--out", "o", "--dtype", "x"],
                       capture_output=True, text=True)
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == "error: Invalid value for '--dtype': 'x' is not one of 'float32', 'float16'.\n"


def test_sparseinfer_alone_prints_its_help():
    alone, asked = run(), run("--help")
    assert (alone.exit_code, alone.stderr) == (0, "") and alone.stdout == asked.stdout
    assert "Commands:" in alone.stdout and "predictor-stats" in alone.stdout


def test_every_command_has_help():
    for name, command in cli.commands.items():
        r = run(name, "--help")
        assert r.exit_code == 0 and len(command.help or "") > 20, name


def test_tour_runs_every_part_and_writes_its_files(tmp_path):
    r = CliRunner().invoke(cli, ["tour", "--out", str(tmp_path), "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert "2,211,840" in r.stdout and "1.79x" in r.stdout and "token agreement" in r.stdout
    from sparseinfer.kernels.verify import bench_targets
    from sparseinfer.kernels import emulator, gpu_unavailable_reason
    if gpu_unavailable_reason() is None or emulator.unavailable_reason() is None:    # the kernels' step ran
        kernel_rows = [line for line in r.stdout.splitlines() if line.split()[-1:] in (["yes"], ["NO"])]
        assert len(kernel_rows) == len(bench_targets()) and all(line.endswith("yes") for line in kernel_rows)
        # once, as the table: not also verify-kernels' progress line per version ("  gate_up v1: verified")
        assert not [line for line in r.output.splitlines() if line.endswith((": verified", ": MISMATCH"))]
    for name in ("fig4.png", "fig3.png", "tiny/config.json", "onnx/sparse/model.onnx"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_bench_decode_alternates_dense_and_sparse_and_reports_per_round_ratios(tmp_path):
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(cli, ["bench-decode", "--shape", "tiny", "--layers", "2", "--tokens", "4", "--repeats", "2",
                                 "--profile-tokens", "3", "--work-dir", str(tmp_path), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert len(result["dense"]["tokens_per_s_runs"]) == len(result["sparse"]["tokens_per_s_runs"]) == 2
    ratios = [s / d for s, d in zip(result["sparse"]["tokens_per_s_runs"], result["dense"]["tokens_per_s_runs"])]
    assert result["speedup_per_round"] == pytest.approx(ratios)
    assert result["speedup"] == pytest.approx(sorted(ratios)[0] / 2 + sorted(ratios)[1] / 2)
    # one round in each creation order: every resample keeps one of each, so the interval is the median
    assert result["speedup_interval"] == pytest.approx([round(result["speedup"], 4)] * 2)
    assert all(v > 0 for v in ratios)
    # where a model runs in a round and when its session was created matter by themselves: the
    # run order is reversed every other round, and the second half of the rounds runs on
    # sessions created anew in the reverse order
    first, second = result["order_per_round"]
    assert first[:2] == ["dense", "sparse"] and set(first) == set(timed_rows(result)) and second == first[::-1]
    assert result["created_per_round"] == [first, second]
    if result["sparse"]["mlp_kernels"] == "native":          # the kernels' own counts of the last sparse run
        counts = result["sparse"]["rows_of_last_run"]
        assert counts["decode_steps_counted"] == 3 and 0 < counts["rows_computed"] < 1 - counts["predicted_sparsity"] + 1e-12
        assert "rows_of_last_run" not in result["dense"] and "rows_of_last_run" not in result["sparse-function"]
    # onnxruntime's profile of 3 more tokens per model: the 2 decode runs after the prefill
    assert result["complete"] is True
    profile = result["profile"]
    assert profile["decode_tokens"] == 3 and set(profile) - {"decode_tokens"} == set(result) & {"dense", "sparse",
                                                                                                  "sparse-function"}
    ops = {kind: {o["op"] for o in profile[kind]["top_ops"]} for kind in profile if kind != "decode_tokens"}
    for kind, summary in profile.items():
        if kind == "decode_tokens":
            continue
        assert summary["runs"] == 2 and list(summary["by_provider"]) == ["CPUExecutionProvider"]
        assert 0 < summary["node_us_per_run"] <= summary["us_per_run"]
        assert (tmp_path / "profiles").is_dir() and str(tmp_path / "profiles" / kind) in summary["profile_file"]
    assert "NonZero" not in ops["dense"] and OP_TYPE not in ops["dense"]
    if result["sparse"]["mlp_kernels"] == "native":
        assert OP_TYPE in ops["sparse"] and OP_TYPE not in ops["sparse-function"]


def test_bench_decode_keeps_the_timed_rounds_when_the_profiles_fail(tmp_path, monkeypatch):
    from sparseinfer.benchmarks import decode_bench

    def cut_short(*a, **k):
        raise KeyboardInterrupt        # as the device's time limit would end it
    monkeypatch.setattr(decode_bench, "profile_decodes", cut_short)
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(cli, ["bench-decode", "--shape", "tiny", "--layers", "1", "--tokens", "3", "--repeats", "1",
                                 "--profile-tokens", "3", "--work-dir", str(tmp_path), "--out", str(out), "--json"])
    assert r.exit_code != 0
    result = json.loads(out.read_text())
    assert result["complete"] is False and "profile" not in result and len(result["dense"]["tokens_per_s_runs"]) == 1


def test_machine_description_names_the_gpus_nvidia_smi_lists(tmp_path, monkeypatch):
    from sparseinfer.model_export.machine import gpu_names, machine_description

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 580.159.04, 81559 MiB'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_names() == ["NVIDIA H100 80GB HBM3, 580.159.04, 81559 MiB"]
    assert machine_description("cuda")["gpu"] == gpu_names() and "gpu" not in machine_description("cpu")
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert gpu_names() == []
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert gpu_names() == []


def test_bench_decode_times_a_long_prompt_s_prefill_and_refuses_one_past_the_context(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench-decode", "--shape", "tiny", "--layers", "1", "--tokens", "3", "--repeats", "2",
            "--work-dir", str(tmp_path)]
    r = CliRunner().invoke(cli, [*args, "--prompt-tokens", "40", "--out", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["prompt_tokens"] == 40 and "prefill ms (40 tokens)" in r.output
    assert all(result[k]["prefill_ms_median"] > 0 for k in ("dense", "sparse"))
    r = CliRunner().invoke(cli, [*args, "--prompt-tokens", "1000000"])
    assert r.exit_code == 2 and "exceed the model's context" in r.output


def test_bench_decode_times_the_genai_int4_peer_beside_our_sparse_export(tmp_path, monkeypatch):
    """--peer genai-int4 with a peer folder of the same shape, on stub genai runners whose speeds
    are known: the JSON's peer entry holds the peer's median and our sparse / peer ratio."""
    from sparseinfer.benchmarks.genai_builder import runners
    from sparseinfer.benchmarks.genai_builder.runners import Run
    from sparseinfer.model_export.export_folder import export_checkpoint
    from sparseinfer.model_export.synthetic import make_checkpoint

    ck = make_checkpoint("tiny", tmp_path / "ck", layers=2, target_sparsity=0.9)
    peer_folder = export_checkpoint(ck, tmp_path / "peer" / "model.onnx", sparse=False).parent
    speeds = {"sparse-cpu": 30.0, "peer": 12.0}               # tokens/s of each stub, by folder name

    def stub(folder, threads):
        def run(prompt_ids, new_tokens):
            return Run(tokens=list(range(new_tokens)), prefill_s=0.01,
                       decode_s=(new_tokens - 1) / speeds[Path(folder).name])
        return run

    monkeypatch.setattr(runners, "GenaiRunner", stub)
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(cli, ["bench-decode", "--checkpoint", str(ck), "--tokens", "4", "--repeats", "2",
                                 "--peer", "genai-int4", "--peer-model", str(peer_folder),
                                 "--work-dir", str(tmp_path / "w"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    peer = json.loads(out.read_text())["peer"]
    assert peer["name"] == "genai-int4" and peer["folder"] == str(peer_folder)
    assert peer["tokens_per_s_median"] == pytest.approx(12.0)
    assert peer["ours_tokens_per_s_median"] == pytest.approx(30.0) and peer["speedup"] == pytest.approx(2.5)
    assert "sparse / genai-int4: 2.50x" in r.output
    bad = CliRunner().invoke(cli, ["bench-decode", "--checkpoint", str(ck), "--peer", "genai-int4",
                                   "--peer-model", str(tmp_path), "--work-dir", str(tmp_path / "w")])
    assert bad.exit_code == 2 and "no genai_config.json there" in bad.output
