"""Calibration against the kernels benchmarks' results schema, on synthesised results."""
import json

import pytest
from click.testing import CliRunner

from sparseinfer.reference.errors import SparseInferError
from sparseinfer.sim import calibrate as cal
from sparseinfer.sim.hardware import load_hardware
from sparseinfer.tools.cli import cli

ORIN = load_hardware("jetson-orin-agx")
# a "true" device whose constants differ from the shipped ones
TRUE = ORIN.with_efficiency(dense_bandwidth_fraction=0.61, sparse_bandwidth_fraction=0.19, kernel_launch_us=6.5)

D, K = 5120, 13824
ROWS = [
    {"kernel": "dense_gemv", "version": "v1", "model": "prosparse-llama2-13b", "d": D, "k": K, "sparsity": 0.0,
     "bytes": D * K * 2},
    {"kernel": "predictor", "version": "v1", "model": "prosparse-llama2-13b", "d": D, "k": K, "sparsity": 0.888,
     "bytes": K * 160 * 4},
    {"kernel": "sparse_gemv", "version": "v1", "model": "prosparse-llama2-13b", "d": D, "k": K, "sparsity": 0.888,
     "bytes": int(0.112 * K) * D * 2},
    {"kernel": "sparse_gemv", "version": "v2", "model": "prosparse-llama2-13b", "d": D, "k": K, "sparsity": 0.5,
     "bytes": int(0.5 * K) * D * 2},
    {"kernel": "down", "version": "v1_chunks", "model": "prosparse-llama2-7b", "d": 4096, "k": 11008,
     "sparsity": 0.9, "bytes": 1101 * 4096 * 2},
    {"kernel": "gate_up", "version": "dense", "model": "prosparse-llama2-7b", "d": 4096, "k": 11008,
     "sparsity": 0.9, "bytes": 2 * 11008 * 4096 * 2},
]


def test_calibration_recovers_known_constants_and_reports_each_row():
    results = cal.synthesise_results(TRUE, ROWS)
    cal.validate_results(results)
    report = cal.calibrate(ORIN, results)
    eff = report["efficiency"]
    assert eff["dense_bandwidth_fraction"] == pytest.approx(0.61, rel=1e-9)
    assert eff["sparse_bandwidth_fraction"] == pytest.approx(0.19, rel=1e-9)
    assert eff["kernel_launch_us"] == pytest.approx(6.5, rel=1e-9)
    assert report["previous_efficiency"]["dense_bandwidth_fraction"] == 0.70
    assert len(report["rows"]) == len(ROWS)
    assert report["max_abs_rel_error"] < 1e-9
    assert [r["class"] for r in report["rows"]] == ["dense", "dense", "sparse", "sparse", "sparse", "dense"]


def test_pipeline_rows_are_left_out_of_the_fit():
    results = cal.synthesise_results(TRUE, ROWS + [dict(ROWS[2], kernel="mlp", version="sparse-fused"),
                                                   dict(ROWS[2], kernel="mlp_quant", version="sparse-q4_0")])
    for row in results["rows"][-2:]:
        row["latency_us"] *= 3                       # several launches: would spoil the fit
    report = cal.calibrate(ORIN, results)
    assert report["skipped_pipelines"] == ["mlp sparse-fused", "mlp_quant sparse-q4_0"]
    assert report["max_abs_rel_error"] < 1e-9 and len(report["rows"]) == len(ROWS)


def test_per_row_error_is_reported_when_the_model_does_not_fit():
    results = cal.synthesise_results(TRUE, ROWS)
    results["rows"][2]["latency_us"] *= 1.5          # one slow measurement
    report = cal.calibrate(ORIN, results)
    errors = [abs(r["rel_error"]) for r in report["rows"]]
    assert report["max_abs_rel_error"] == max(errors) > 0.01
    assert sum(e > 1e-6 for e in errors) >= 2        # least squares spreads the misfit


def test_unverified_rows_are_skipped_and_launch_kept_when_underdetermined():
    rows = [dict(ROWS[0]), dict(ROWS[2], verified=False), dict(ROWS[3])]
    report = cal.calibrate(ORIN, cal.synthesise_results(TRUE, rows))
    assert report["skipped_unverified"] == ["sparse_gemv v1"]
    assert report["fitted"] == ["dense", "sparse"]          # 2 rows, 2 classes: launch not fitted
    assert report["efficiency"]["kernel_launch_us"] == ORIN.efficiency.kernel_launch_us
    with pytest.raises(SparseInferError, match="no verified rows"):
        cal.calibrate(ORIN, cal.synthesise_results(TRUE, [dict(ROWS[0], verified=False)]))


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r.pop("peak_bandwidth_gb_per_s"), "missing peak_bandwidth_gb_per_s"),
    (lambda r: r["rows"][0].pop("bytes"), r"rows\[0\]: missing bytes"),
    (lambda r: r["rows"][1].update(verified="yes"), r"rows\[1\]: verified has the wrong type"),
    (lambda r: r["rows"][0].update(latency_us=0), "latency_us > 0"),
])
def test_malformed_results(mutate, message):
    results = cal.synthesise_results(TRUE, ROWS)
    mutate(results)
    with pytest.raises(SparseInferError, match=message):
        cal.validate_results(results)


def test_cli_calibrate(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(cal.synthesise_results(TRUE, ROWS)))
    r = CliRunner().invoke(cli, ["latency", "--calibrate", str(path), "--calibrate-pipeline", "all", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["efficiency"]["sparse_bandwidth_fraction"] == pytest.approx(0.19)
    assert len(data["calibration"]["rows"]) == len(ROWS)
    text = CliRunner().invoke(cli, ["latency", "--calibrate", str(path), "--calibrate-pipeline", "all"])
    assert text.exit_code == 0 and "calibrated from" in text.stdout and "sparse_gemv" in text.stdout
    bad = CliRunner().invoke(cli, ["latency", "--calibrate", str(tmp_path / "none.json")])
    assert bad.exit_code == 2 and bad.stderr.strip().startswith("error: no such results file")


def _with_cublas_and_launch(rows, slow_version=None):
    """Synthesised results with a measured empty launch, cuBLAS timings on the dense gate_up
    row that follow TRUE's dense constants, and optionally one version made 3x slower."""
    results = cal.synthesise_results(TRUE, rows)
    eff, peak = TRUE.efficiency, TRUE.memory_bandwidth_gb_per_s
    for r in results["rows"]:
        if (r["kernel"], r["version"]) == ("gate_up", "dense"):
            r["dense_baseline_us"] = eff.kernel_launch_us + r["bytes"] / (eff.dense_bandwidth_fraction * peak * 1e9) * 1e6
            r["latency_us"] *= 1.7          # our own dense kernel is slower than cuBLAS: not fitted
        if (r["kernel"], r["version"]) == slow_version:
            r["latency_us"] *= 3.0
    results["empty_launch_us"] = eff.kernel_launch_us
    return results


def test_pipeline_calibration_fits_its_kernels_and_cublas_with_the_measured_launch():
    results = _with_cublas_and_launch(ROWS, slow_version=("sparse_gemv", "v2"))
    versions = {("sparse_gemv", "v1"), ("down", "v1_chunks")}
    report = cal.calibrate(ORIN, results, versions)
    assert report["launch_source"] == "empty_launch_us" and report["fitted"] == ["dense", "sparse"]
    assert report["versions"] == ["down v1_chunks", "sparse_gemv v1"]
    assert sorted((r["kernel"], r["version"]) for r in report["rows"]) == [
        ("down", "v1_chunks"), ("gate_up", "cublas"), ("sparse_gemv", "v1")]
    eff = report["efficiency"]
    assert eff["kernel_launch_us"] == TRUE.efficiency.kernel_launch_us
    assert eff["sparse_bandwidth_fraction"] == pytest.approx(0.19, rel=1e-9)
    assert eff["dense_bandwidth_fraction"] == pytest.approx(0.61, rel=1e-9)
    assert report["max_abs_rel_error"] < 1e-9
    every = cal.calibrate(ORIN, results)       # the slow v2 and our dense kernel pull the all-rows fit off
    assert every["launch_source"] == "empty_launch_us" and every["max_abs_rel_error"] > 0.1
    with pytest.raises(SparseInferError, match="no verified rows of gate_up v9"):
        cal.calibrate(ORIN, results, {("gate_up", "v9"), ("down", "v1_chunks")})


def test_cli_calibrate_pipeline(tmp_path):
    path = tmp_path / "results.json"
    results = _with_cublas_and_launch(ROWS)
    results["rows"].append(dict(results["rows"][4], kernel="gate_up", version="v5_batched"))
    results["rows"].append(dict(results["rows"][4], version="v4_batched"))
    path.write_text(json.dumps(results))
    r = CliRunner().invoke(cli, ["latency", "--calibrate", str(path), "--calibrate-pipeline", "sparse-batched",
                                 "--json"])
    assert r.exit_code == 0, r.output
    fitted = json.loads(r.stdout)["calibration"]
    assert fitted["versions"] == ["down v4_batched", "gate_up v5_batched"]
    assert {row["version"] for row in fitted["rows"]} == {"v5_batched", "v4_batched", "cublas"}
    r = CliRunner().invoke(cli, ["latency", "--calibrate", str(path)])          # the default pipeline's rows
    assert r.exit_code == 0 and "launch time: empty_launch_us" in r.stdout and "gate_up v5_batched" in r.stdout
    bad = CliRunner().invoke(cli, ["latency", "--calibrate", str(path), "--calibrate-pipeline", "sparse-nope"])
    assert bad.exit_code == 2 and "unknown pipeline 'sparse-nope'" in bad.output
    bad = CliRunner().invoke(cli, ["latency", "--calibrate-pipeline", "all"])
    assert bad.exit_code == 2 and "--calibrate-pipeline needs --calibrate" in bad.output
    missing = CliRunner().invoke(cli, ["latency", "--calibrate", str(path), "--calibrate-pipeline", "sparse-fused"])
    assert missing.exit_code != 0 and "no verified rows of" in missing.output
