"""compare-methods and the --method options of predictor-stats / sweep on a tiny synthetic checkpoint."""
import json

import pytest

from helpers import one_line_error, run_cli as run, tiny_sparse_checkpoint

PNG = b"\x89PNG\r\n\x1a\n"
FAST = ["--max-prompts", "2", "--max-new-tokens", "3", "--max-calibration-prompts", "4"]
ROW_SCHEMA = {"method": str, "target_sparsity": float, "sparsity": float, "bytes_skipped": float, "precision": float,
              "recall": float, "predictor_ops_per_token": float, "predictor_unit": str,
              "predictor_bytes_per_token": float, "predictor_memory_bytes": float, "mean_kl": float,
              "top1_agreement": float, "max_abs_logit_delta": float, "latency_ms": float, "speedup": float,
              "pareto": bool, "axis": str, "exact_for_relu": bool, "bound": bool, "approximate": bool, "paper": str,
              "params": dict, "layer_sparsity": list, "extra": dict, "quantile_threshold": bool,
              "channels_dropped": (dict, type(None))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_sparse_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def silu_checkpoint(tmp_path_factory):
    from sparseinfer.model_export.synthetic import make_checkpoint

    return str(make_checkpoint("tiny", tmp_path_factory.mktemp("silu") / "ck", layers=1, hidden_act="silu"))


def test_compare_methods_json_schema_plot_and_file(checkpoint, tmp_path):
    plot, out = tmp_path / "pareto.png", tmp_path / "cmp.json"
    r = run("compare-methods", checkpoint, "--methods", "sparseinfer,oracle,random,teal,cats,cluster",
            "--param", "cluster.clusters=4", "--sparsity", "0.5,0.9", "--plot", str(plot), "--out", str(out),
            "--json", *FAST)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert json.loads(out.read_text()) == data and plot.read_bytes()[:8] == PNG
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]          # temp files renamed away
    for key in ("model", "activation", "hardware", "latency_model", "reference_set", "date", "machine", "calibration",
                "evaluation", "dense_latency_ms", "methods", "targets", "rows", "dense_zero_fraction"):
        assert key in data, key
    assert data["calibration"]["prompts"] == 4 and data["calibration"]["tokens"] > 100
    assert data["evaluation"] == {"prompts": 2, "tokens": 6}
    rows = data["rows"]
    assert [(r["method"], r["target_sparsity"]) for r in rows] == [
        (m, s) for s in (0.5, 0.9) for m in ("sparseinfer", "oracle", "random", "teal", "cats", "cluster")]
    for row in rows:
        assert set(row) == set(ROW_SCHEMA), set(row) ^ set(ROW_SCHEMA)
        for key, typ in ROW_SCHEMA.items():
            assert isinstance(row[key], typ) or (typ is float and isinstance(row[key], int)), (key, row[key])
        assert 0 <= row["sparsity"] <= 1 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert row["mean_kl"] >= 0 and row["speedup"] > 0 and len(row["layer_sparsity"]) == 2
    by = {(r["method"], r["target_sparsity"]): r for r in rows}
    oracle = by[("oracle", 0.9)]
    assert oracle["mean_kl"] == 0 and oracle["top1_agreement"] == 1 and oracle["recall"] == 1 and oracle["bound"]
    assert not oracle["pareto"]                                                    # bounds are not on the front
    assert by[("random", 0.9)]["sparsity"] == pytest.approx(0.9, abs=0.01) and by[("random", 0.9)]["mean_kl"] > 0
    assert by[("sparseinfer", 0.5)]["sparsity"] < by[("sparseinfer", 0.9)]["sparsity"]   # alpha=auto follows the target
    assert by[("sparseinfer", 0.9)]["predictor_unit"] == "popc" and by[("teal", 0.5)]["axis"] == "channels"
    assert by[("cluster", 0.9)]["extra"]["clusters"] == 4
    assert 0 < by[("cluster", 0.9)]["extra"]["online_clustering_precision"] <= 1
    assert any(r["pareto"] for r in rows)
    text = run("compare-methods", checkpoint, "--methods", "cats", "--sparsity", "0.9", *FAST)
    assert text.exit_code == 0 and "speed-up" in text.stdout and "[1/1] cats" in text.stderr


def test_calibration_file_and_overlap(checkpoint, tmp_path):
    cal = tmp_path / "cal.txt"
    cal.write_text("Some calibration text about rivers and mountains.\nAnother line on cooking pasta.\n")
    r = run("compare-methods", checkpoint, "--methods", "teal", "--sparsity", "0.5", "--calibration", str(cal),
            "--json", *FAST)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["calibration"]["source"] == str(cal)
    evalp = tmp_path / "eval.txt"
    evalp.write_text("Another line on cooking pasta.\n")
    r = run("compare-methods", checkpoint, "--methods", "teal", "--calibration", str(cal), "--prompts", str(evalp))
    assert r.exit_code == 2 and "calibration and evaluation prompts overlap" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--methods", "teal,bogus"], "unknown method 'bogus'"),
    (["--sparsity", "0.5,1.0"], "sparsity must be in [0, 1), got 1.0"),
    (["--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
    (["--calibration", "/nonexistent/cal.txt"], "no such calibration file: /nonexistent/cal.txt"),
    (["--param", "teal.depth=3", "--methods", "teal"], "unknown parameter 'depth'"),
    (["--param", "nodot=3"], "use METHOD.KEY=VALUE"),
    (["--plot", "x.jpg"], "plot file must end in .png"),
])
def test_compare_methods_errors_are_one_line(checkpoint, args, message):
    r = run("compare-methods", checkpoint, *args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_predictor_stats_and_sweep_take_a_method(checkpoint):
    args = ["--max-prompts", "2", "--max-new-tokens", "3"]
    plain = json.loads(run("predictor-stats", checkpoint, "--json", *args).stdout)
    assert "method" not in plain and plain["alpha"] == "1.00"              # the default is today's run
    r = run("predictor-stats", checkpoint, "--method", "oracle", "--sparsity", "0.5", "--json", *args)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["method"] == "oracle" and data["mean"]["precision"] == 1 and data["mean"]["recall"] == 1
    # the oracle skips the true zeros, which the sign predictor's run also measures; layer 0's
    # MLP inputs do not depend on any MLP, so both runs see the same ones there
    assert data["layers"][0]["predicted_sparsity"] == pytest.approx(plain["layers"][0]["actual_sparsity"], abs=1e-12)
    r = run("sweep", checkpoint, "--method", "random", "--sparsity", "0.3,0.8", "--json", *args)
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert [row["sparsity"] for row in rows] == [0.3, 0.8]
    assert rows[0]["achieved_sparsity"] == pytest.approx(0.3, abs=0.01) and rows[0]["latency_ms"] > rows[1]["latency_ms"]
    assert rows[0]["mean_kl"] < rows[1]["mean_kl"]
    r = run("predictor-stats", checkpoint, "--method", "bogus")
    assert r.exit_code == 2 and "unknown method 'bogus'" in r.stderr
    r = run("predictor-stats", checkpoint, "--method", "teal", "--sparsity", "0.5,0.7")
    assert r.exit_code == 2 and "one target sparsity" in r.stderr
    r = run("sweep", checkpoint, "--method", "teal", "--calibration", "/nonexistent.txt")
    assert r.exit_code == 2 and "no such calibration file" in r.stderr


def test_approximate_predictor_stats_runs_the_sign_predictor_at_alpha(silu_checkpoint):
    """On a SiLU model --approximate runs the sign predictor as a method; its α is --alpha
    (a larger α predicts fewer rows negative), unless --param sparseinfer.alpha gives one."""
    args = ["predictor-stats", silu_checkpoint, "--approximate", "--max-prompts", "1", "--max-new-tokens", "1", "--json"]
    runs = {}
    for alpha in ("0.50", "2.00"):
        r = run(*args, "--alpha", alpha)
        assert r.exit_code == 0, r.output
        runs[alpha] = json.loads(r.stdout)
        assert runs[alpha]["params"]["alpha"] == alpha
    low, high = (runs[a]["mean"]["predicted_sparsity"] for a in ("0.50", "2.00"))
    assert low > 0.5 and high < low - 0.3, (low, high)
    r = run(*args, "--param", "sparseinfer.alpha=0.50")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["mean"]["predicted_sparsity"] == low


@pytest.mark.parametrize("command,alpha", [("predictor-stats", "1.02"), ("sweep", "1.00:1.02:0.01")])
@pytest.mark.parametrize("extra,why", [(["--param", "sparseinfer.alpha=0.50"], "--param sparseinfer.alpha gives α"),
                                       (["--sparsity", "0.5"], "--sparsity calibrates α per layer"),
                                       (["--method", "teal"], "--method teal has no α")])
def test_an_alpha_that_something_else_overrides_is_refused(silu_checkpoint, command, alpha, extra, why):
    """An explicit --alpha is never silently dropped: where --sparsity, another method or
    --param sparseinfer.alpha decides α, the command refuses it and names what does."""
    verb = "used" if command == "predictor-stats" else "swept"
    one_line_error(run(command, silu_checkpoint, "--alpha", alpha, *extra), f"--alpha is not {verb} here: {why}")


def test_approximate_sweep_refuses_an_alpha_range_it_cannot_sweep(silu_checkpoint):
    one_line_error(run("sweep", silu_checkpoint, "--approximate", "--alpha", "1.00:1.04:0.02"),
                   "--alpha sweeps the exact sign predictor only; with --approximate")
