"""predictor-stats and sweep on onnxruntime debug exports, checked against
the NumPy reference path on a tiny synthetic checkpoint: the same masks, so the same
statistics and simulated latency, and logits (so quality) within float tolerance."""
import json

import numpy as np
import pytest
from helpers import one_line_error, run_cli as run

pytest.importorskip("onnxruntime", reason="onnxruntime not installed")

from sparseinfer.evaluation.ort_runner import OrtRunner  # noqa: E402
from sparseinfer.methods.model_runner import ReferenceRunner  # noqa: E402
from sparseinfer.methods.predictor_stats import per_layer_stats  # noqa: E402
from sparseinfer.model_export.loaders import load_checkpoint  # noqa: E402
from sparseinfer.model_export.synthetic import make_checkpoint  # noqa: E402

PROMPTS = ["The quick brown fox", "def fibonacci(n):"]
SCHEDULE = "1.02@0,1.00"


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return make_checkpoint("tiny", tmp_path_factory.mktemp("ortdse") / "ck", layers=2, target_sparsity=0.9)


@pytest.fixture(scope="module")
def runners(ck, tmp_path_factory):
    ref = ReferenceRunner(load_checkpoint(ck), PROMPTS, max_new_tokens=5)
    ort = OrtRunner(ck, PROMPTS, max_new_tokens=5, provider="cpu", export_dir=tmp_path_factory.mktemp("exports"))
    return ref, ort


def test_ort_masks_and_stats_equal_the_reference(runners):
    ref, ort = runners
    assert ort.continuations == ref.continuations
    np.testing.assert_allclose(ort.dense_logits(), ref.dense_logits(), rtol=0, atol=1e-3)
    ref_logits, ref_traces = ref.sparse(SCHEDULE)
    ort_logits, ort_traces = ort.sparse(SCHEDULE)
    assert len(ort_traces) == len(ref_traces) == 2 * 5
    for a, b in zip(ref_traces, ort_traces):
        for ta, tb in zip(a, b):
            for field in ("predicted_zero", "actual_zero", "computed_gate", "computed_up", "computed_down"):
                assert np.array_equal(getattr(ta, field), getattr(tb, field)), field
            assert (ta.d, ta.k, ta.weight_dtype, ta.alpha_milli) == (tb.d, tb.k, tb.weight_dtype, tb.alpha_milli)
            assert 0 < tb.predicted_zero.sum() < tb.k and tb.computed_up.sum() < (~tb.predicted_zero).sum()
    assert [t.alpha_milli for t in ort_traces[0]] == [1020, 1000]
    assert [s.to_dict() for s in per_layer_stats(ort_traces)] == [s.to_dict() for s in per_layer_stats(ref_traces)]
    np.testing.assert_allclose(ort_logits, ref_logits, rtol=0, atol=1e-3)


def test_predictor_stats_and_sweep_commands_on_ort(ck, tmp_path):
    common = ["--max-prompts", "2", "--max-new-tokens", "4", "--json"]
    ref = run("predictor-stats", str(ck), "--alpha", SCHEDULE, *common)
    ort = run("predictor-stats", str(ck), "--alpha", SCHEDULE, *common, "--provider", "cpu",
              "--export-dir", str(tmp_path / "x"))
    assert ref.exit_code == 0 and ort.exit_code == 0, ref.output + ort.output
    a, b = json.loads(ref.stdout), json.loads(ort.stdout)
    assert (a["engine"], b["engine"]) == ("numpy reference", "onnxruntime cpu")
    assert a["layers"] == b["layers"] and a["mean"] == b["mean"] and a["tokens"] == b["tokens"] == 8
    assert (tmp_path / "x").is_dir() and len(list((tmp_path / "x").glob("*/*/model.onnx"))) == 2   # dense + α

    sw = ["sweep", str(ck), "--alpha", "1.00:1.04:0.02", "--layers", "all", *common]
    ref = run(*sw)
    ort = run(*sw, "--provider", "cpu", "--export-dir", str(tmp_path / "x"))
    assert ref.exit_code == 0 and ort.exit_code == 0, ref.output + ort.output
    a, b = json.loads(ref.stdout), json.loads(ort.stdout)
    assert len(b["rows"]) == 3 and b["engine"] == "onnxruntime cpu"
    for ra, rb in zip(a["rows"], b["rows"]):
        for k in ("alpha", "schedule", "latency_ms", "speedup_vs_llama.cpp", "predicted_sparsity",
                  "actual_sparsity", "union_sparsity", "precision", "recall"):
            assert ra[k] == rb[k], k                          # from the masks: identical
        assert rb["top1_agreement"] == ra["top1_agreement"]
        assert rb["mean_kl"] == pytest.approx(ra["mean_kl"], abs=1e-5)
    assert [r["predicted_sparsity"] for r in b["rows"]] == sorted(r["predicted_sparsity"] for r in b["rows"])[::-1]


def test_provider_refuses_other_methods(ck):
    one_line_error(run("predictor-stats", ck, "--method", "teal", "--sparsity", "0.5", "--provider", "cpu"),
                   "--method teal needs the NumPy reference model")


@pytest.mark.ort_cuda
def test_ort_masks_on_the_cuda_provider_equal_the_reference(ck, tmp_path):
    """The design-space runner on onnxruntime's CUDA provider (debug exports, the function
    bodies' masks): the same continuations and masks as the NumPy reference, logits within 1e-3."""
    ref = ReferenceRunner(load_checkpoint(ck), PROMPTS, max_new_tokens=5)
    cuda = OrtRunner(ck, PROMPTS, max_new_tokens=5, provider="cuda", export_dir=tmp_path)
    assert cuda.continuations == ref.continuations
    ref_logits, ref_traces = ref.sparse(SCHEDULE)
    cuda_logits, cuda_traces = cuda.sparse(SCHEDULE)
    for a, b in zip(ref_traces, cuda_traces):
        for ta, tb in zip(a, b):
            assert np.array_equal(ta.predicted_zero, tb.predicted_zero)
            assert np.array_equal(ta.computed_up, tb.computed_up)
    np.testing.assert_allclose(cuda_logits, ref_logits, rtol=0, atol=1e-3)
