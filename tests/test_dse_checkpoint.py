"""predictor-stats and sweep on a tiny synthetic checkpoint (the checkpoint maker and the reference model)."""
import json

import pytest

from sparseinfer.methods.model_runner import DEFAULT_PROMPTS, read_prompts
from sparseinfer.reference.errors import SparseInferError

from helpers import run_cli as run, tiny_sparse_checkpoint

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_sparse_checkpoint(tmp_path_factory)


def test_predictor_stats_on_a_checkpoint(checkpoint, tmp_path):
    plot = tmp_path / "fig3.png"
    r = run("predictor-stats", checkpoint, "--max-prompts", "2", "--max-new-tokens", "3", "--json", "--plot", str(plot))
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["tokens"] == 6 and len(data["layers"]) == 2
    for s in data["layers"]:
        assert 0 < s["predicted_sparsity"] < 1 and 0 < s["actual_sparsity"] < 1     # non-trivial
        assert 0 < s["precision"] <= 1 and 0 < s["recall"] <= 1
        assert s["union_sparsity"] >= max(s["predicted_sparsity"], s["actual_sparsity"]) - 1e-12
        # predicted+actual mode: gate skips the predicted rows, up and down the union
        expected = 1 - ((1 - s["predicted_sparsity"]) + 2 * (1 - s["union_sparsity"])) / 3
        assert s["bytes_skipped"] == pytest.approx(expected, abs=1e-12)
    assert plot.read_bytes()[:8] == PNG and plot.stat().st_size > 2000


def test_sweep_on_a_checkpoint(checkpoint, tmp_path):
    plot = tmp_path / "sweep.png"
    args = ["--max-prompts", "2", "--max-new-tokens", "3"]
    r = run("sweep", checkpoint, "--alpha", "0.95:1.05:0.05", "--layers", "0-1", "--json", "--plot", str(plot), *args)
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    rows = result["rows"]
    assert [row["alpha"] for row in rows] == [0.95, 1.0, 1.05]
    assert rows[0]["predicted_sparsity"] > rows[1]["predicted_sparsity"] > rows[2]["predicted_sparsity"] > 0
    assert rows[0]["latency_ms"] < rows[2]["latency_ms"] < result["dense_latency_ms"]
    for row in rows:
        assert 0 <= row["top1_agreement"] <= 1 and row["mean_kl"] >= 0 and row["max_abs_logit_delta"] > 0
    assert any(row["pareto"] for row in rows)
    assert plot.read_bytes()[:8] == PNG
    # the α = 1.00 point is the plain predictor-stats run
    stats = json.loads(run("predictor-stats", checkpoint, "--json", *args).stdout)
    assert rows[1]["predicted_sparsity"] == pytest.approx(stats["mean"]["predicted_sparsity"], abs=1e-12)
    text = run("sweep", checkpoint, "--alpha", "1.00", *args)
    assert text.exit_code == 0 and "pareto" in text.stdout and "[1/1]" in text.stderr


def test_prompt_files(tmp_path):
    jl = tmp_path / "q.jsonl"
    jl.write_text('{"question": "What is 2+2?", "answer": "4"}\n\n{"question": "Name a colour."}\n{"question": "x"}\n')
    assert read_prompts(jl, 2) == ["What is 2+2?", "Name a colour."]
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\nsecond prompt\n")
    assert read_prompts(txt, 5) == ["first prompt", "second prompt"]
    assert read_prompts(None, 2) == list(DEFAULT_PROMPTS[:2])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"answer": "4"}\n')
    with pytest.raises(SparseInferError, match="no question/prompt/text field"):
        read_prompts(bad)
    with pytest.raises(SparseInferError, match="no such prompts file"):
        read_prompts(tmp_path / "none.txt")


def test_checkpoint_command_errors(checkpoint):
    r = run("sweep", checkpoint, "--layers", "0-5")
    assert r.exit_code == 2 and "need 0 <= A <= B <= 1" in r.stderr
    r = run("predictor-stats", "/nonexistent/ck")
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
