"""sparseinfer eval and the lm-eval model 'sparseinfer', on a tiny synthetic
checkpoint and tiny data fixtures (never ../shared/data)."""
import json
import math

import numpy as np
import pytest
from helpers import eval_fixtures, one_line_error, run_cli as run, write_eval_data

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install -e '.[eval]')")

from sparseinfer.evaluation import backend, data, exports, runner, taskgen  # noqa: E402
from sparseinfer.evaluation.backend import SparseInferLM  # noqa: E402
from sparseinfer.evaluation.decoder_lm import parse_model_args, stop_cut  # noqa: E402
from sparseinfer.reference.errors import SparseInferError  # noqa: E402

GSM8K = [  # (question, answer): answers end in '#### N' as in the real file
    ("Janet has 16 eggs and sells 9 at $2. How much does she make?", "She makes 9 * 2 = 18.\n#### 18"),
    ("A robe takes 2 bolts of blue and half that of white. How many bolts?", "2 + 1 = 3\n#### 3"),
    ("Josh flips a house for a profit. How much?", "The profit is 70,000.\n#### 70000"),
]
BBH_SIZES = {t: (4 if t == "boolean_expressions" else 2) for t in data.BBH_TASKS}


def write_data(root):
    return write_eval_data(root, GSM8K, BBH_SIZES)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return eval_fixtures(tmp_path_factory.mktemp("eval"), GSM8K, BBH_SIZES)


# -- pieces --------------------------------------------------------------------------------
def test_model_args_keep_commas_of_an_alpha_schedule():
    assert parse_model_args("model=/x,alpha=1.03@0-19,1.00,provider=cpu") == {
        "model": "/x", "alpha": "1.03@0-19,1.00", "provider": "cpu"}
    with pytest.raises(SparseInferError, match="not key=value"):
        parse_model_args("1.00,model=/x")


def test_stop_cut_takes_the_earliest_stop():
    assert stop_cut("a b\n\nQ: c", ["Q:", "\n\n"]) == ("a b", True)
    assert stop_cut("no stop here", ["Q:"]) == ("no stop here", False)
    assert stop_cut("x", []) == ("x", False)


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("sparseinfer") is SparseInferLM


def test_shipped_task_configs_are_lm_evals_own(tmp_path):
    """The shipped folder is exactly what taskgen writes from the installed lm-eval, and differs
    from lm-eval's definitions only in data source, names and the BBH group's weighting."""
    taskgen.generate(tmp_path)
    shipped = sorted(p.relative_to(taskgen.TASKS_DIR) for p in taskgen.TASKS_DIR.rglob("*") if p.is_file())
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert shipped == fresh and len(shipped) == 2 + 27 + 1
    for rel in shipped:
        assert (taskgen.TASKS_DIR / rel).read_text() == (tmp_path / rel).read_text(), f"{rel}: rerun taskgen"
    from lm_eval.tasks._yaml_loader import load_yaml

    ours = load_yaml(taskgen.TASKS_DIR / "gsm8k" / "gsm8k-cot.yaml", resolve_func=False)
    theirs = taskgen.lm_eval_config("gsm8k/gsm8k-cot.yaml")
    assert ours["num_fewshot"] == 8 and len(ours["fewshot_config"]["samples"]) == 8
    assert {k: v for k, v in ours.items() if k not in ("task", "custom_dataset")} == \
        {k: v for k, v in theirs.items() if k not in ("task", "tag", "dataset_path", "dataset_name")}
    nav = load_yaml(taskgen.TASKS_DIR / "bbh" / "navigate.yaml", resolve_func=False)
    assert nav["num_fewshot"] == 3 and nav["dataset_kwargs"] == {"task": "navigate"}
    assert nav["filter_list"] == taskgen.lm_eval_config("bbh/cot_fewshot/navigate.yaml")["filter_list"]


def test_random_rows_dropped(fixtures):
    from sparseinfer.model_export.loaders import load_checkpoint

    w = load_checkpoint(fixtures["ck"]).weights
    out = exports.drop_random_rows(w, 0.9, seed=1)
    k = w.layers[0].gate.shape[0]
    for a, b in zip(w.layers, out.layers):
        zero = ~b.gate.any(axis=1)
        assert zero.sum() == round(0.9 * k) and (~b.up[zero].any()) and (~b.down[:, zero].any())
        np.testing.assert_array_equal(a.gate[~zero], b.gate[~zero])
        assert a.gate.any(axis=1).all()                  # the original had no zero rows: the drop did it
    assert not np.array_equal(~out.layers[0].gate.any(axis=1), ~out.layers[1].gate.any(axis=1))


# -- the backend on a real export ----------------------------------------------------------
@pytest.fixture(scope="module")
def sparse_lm(fixtures):
    return SparseInferLM.create_from_arg_string(
        f"model={fixtures['ck']},alpha=1.03@0-0,1.00,cache_dir={fixtures['root'] / 'exports'},max_gen_toks=8,"
        f"progress=false")


def test_checkpoint_exported_once_and_cached(fixtures, sparse_lm):
    assert sparse_lm.row == exports.Row("sparse", alpha="1.03@0-0,1.00") and sparse_lm.decoder.sparse
    mtime = sparse_lm.path.stat().st_mtime_ns
    again = SparseInferLM(model=str(fixtures["ck"]), alpha="1.03@0-0,1.00", cache_dir=str(fixtures["root"] / "exports"))
    assert again.path == sparse_lm.path and again.path.stat().st_mtime_ns == mtime
    semi = SparseInferLM(model=str(fixtures["ck"]), alpha="1.03@0-0;1.00", cache_dir=str(fixtures["root"] / "exports"))
    assert semi.path == sparse_lm.path                    # lm-eval's CLI form (it splits model_args at commas)
    # the export itself as model=, with a different alpha: refused, not silently mislabelled
    with pytest.raises(SparseInferError, match="not alpha 1.05"):
        SparseInferLM(model=str(sparse_lm.path.parent), alpha="1.05")


def test_loglikelihood_is_the_dense_prefill(fixtures, sparse_lm):
    """A dense export's greedy tokens score as greedy, with the sum of its log-softmax; the
    sparse export scores them identically (prefill is dense); rolling over a string equals
    loglikelihood after the prefix token."""
    from lm_eval.api.instance import Instance

    dense = SparseInferLM(model=str(fixtures["ck"]), cache_dir=str(fixtures["root"] / "exports"), progress=False)
    assert not dense.decoder.sparse
    ids = dense.tok_encode("The quick brown fox")
    dense.greedy("The quick brown fox", [], 6)
    cont = dense.last_tokens
    assert len(cont) == 6
    lp, greedy = dense._score(ids, cont)
    assert greedy and lp < 0
    dense.decoder.reset()
    logits = dense.decoder.step(ids + cont[:-1])[0].astype(np.float64)
    manual = 0.0
    for j, t in enumerate(cont):
        row = logits[len(ids) - 1 + j]
        manual += row[t] - row.max() - math.log(np.exp(row - row.max()).sum())
    assert lp == pytest.approx(manual, rel=1e-9)
    wrong = [(t + 1) % 256 for t in cont]
    assert dense._score(ids, wrong)[1] is False and dense._score(ids, wrong)[0] < lp
    assert sparse_lm._score(ids, cont) == pytest.approx(dense._score(ids, cont), rel=1e-5)
    (lw, _), = dense.loglikelihood([Instance("loglikelihood", {}, ("", "abc"), 0)])
    roll, = dense.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("abc",), 0)])
    assert roll == pytest.approx(lw, rel=1e-9)


def test_generate_until_stops_and_counts_rows(sparse_lm):
    from lm_eval.api.instance import Instance

    sparse_lm.reset_stats()
    free = sparse_lm.greedy("Hello", [], 8)
    stop = free[2:4]
    req = Instance("generate_until", {}, ("Hello", {"until": [stop], "max_gen_toks": 8}), 0)
    out, = sparse_lm.generate_until([req])
    assert out == free[:free.find(stop)]
    st = sparse_lm.stats()
    assert st["generations"] == 2 and st["decode_tokens"] > 0 and st["decode_tokens_per_s"] > 0
    if st["mlp_kernels"] == "native":
        assert 0.3 < st["decode_sparsity"] < 1.0 and 0.0 < st["predicted_sparsity"] <= st["decode_sparsity"]


# -- answer extraction through the shipped tasks -------------------------------------------
class Scripted(SparseInferLM):
    """Canned generations (cut at the request's stop strings like the real ones)."""
    script = {}

    def greedy(self, context, until, max_gen):
        self._stats["generations"] += 1
        question = context.rsplit("Q: ", 1)[-1]
        for key, text in self.script.items():
            if question.startswith(key):
                return stop_cut(text, until)[0]
        return "I do not know."


def test_answer_extraction_and_bbh_macro_average(fixtures, tmp_path):
    lm = Scripted(model=str(fixtures["ck"]), cache_dir=str(fixtures["root"] / "exports"), progress=False)
    lm.script = {
        GSM8K[0][0]: "9 * 2 = 18. The answer is 18.\n\nQ: What is 5? A: The answer is 5.",    # strict and flexible
        GSM8K[1][0]: "It takes 2 + 1 = 3 bolts in total.",                                    # flexible only
        GSM8K[2][0]: "The answer is 7.\nQ: The answer is 70000.",                              # cut at 'Q:': wrong
        **{f"boolean_expressions question {i}?": f"Let's see. So the answer is {'Yes' if i % 2 else 'No'}.\n\nQ"
           for i in range(4)},
        "navigate question 0?": "So the answer is Yes.",                                        # target No: wrong
    }
    one = runner.evaluate_row(lm, ["gsm8k", "bbh"], fixtures["data"], tmp_path / "row", str(tmp_path / "cache"))
    g = one["scores"]["gsm8k"]
    assert g["n"] == 3 and g["score"] == pytest.approx(100 / 3) and g["flexible"] == pytest.approx(200 / 3)
    b = one["scores"]["bbh"]
    assert b["n"] == sum(BBH_SIZES.values()) and b["subtasks"]["boolean_expressions"] == 100.0
    assert sum(v for k, v in b["subtasks"].items() if k != "boolean_expressions") == 0.0
    assert b["score"] == pytest.approx(100 / 27)            # macro; the size-weighted mean would be 4/56
    samples = [json.loads(x) for x in next((tmp_path / "row").glob("samples_sparseinfer_gsm8k_cot_*.jsonl"))
               .read_text().splitlines()]
    by_target = {s["target"]: s for s in samples if s["filter"] == "strict-match"}
    assert by_target["18"]["exact_match"] == 1.0 and by_target["18"]["filtered_resps"] == ["18"]
    assert by_target["3"]["exact_match"] == 0.0 and by_target["70000"]["filtered_resps"] == ["7"]
    assert by_target["18"]["resps"] == [["9 * 2 = 18. The answer is 18.\n\n"]]   # GSM8K stops at Q:, not at a blank line


# -- the command ---------------------------------------------------------------------------
def test_table_layout():
    result = {"tasks": ["gsm8k", "bbh"], "limit": 5, "max_gen_toks": None, "rows": [
        {"kind": kind, "label": label, "scores": {"gsm8k": {"score": g, "n": 5}, "bbh": {"score": b, "n": 135}},
         "stats": {"generations": 10, "decode_sparsity": sp, "decode_tokens_per_s": tps}}
        for kind, label, g, b, sp, tps in [("dense", "dense", 30.71, 44.80, None, 10.0),
                                           ("sparse", "α 1.03@0-19,1.00", 30.63, 44.34, 0.8766, 17.25),
                                           ("random", "random 0.90", 0.0, 0.0, None, 9.5)]]}
    runner.finish(result)
    headers, rows = runner.table(result)
    assert headers == ["row", "GSM8K", "BBH", "average", "Δ vs dense", "decode sparsity", "decode tok/s"]
    assert rows[0] == ["dense", "30.71", "44.80", "37.75", "—", "—", "10.0"]
    assert rows[1] == ["α 1.03@0-19,1.00", "30.63", "44.34", "37.48", "-0.27", "0.877", "17.2"]
    assert rows[2][3:5] == ["0.00", "-37.75"]
    assert result["rows"][1]["delta"] == pytest.approx({"gsm8k": -0.08, "bbh": -0.46})


def test_eval_command_resumes_after_interruption(fixtures, tmp_path, monkeypatch):
    args = ["eval", str(fixtures["ck"]), "--tasks", "gsm8k,bbh_navigate", "--alpha", "1.00", "--limit", "2",
            "--data-dir", str(fixtures["data"]), "--max-gen-toks", "6", "--quiet", "--json"]
    whole = run(*args, "--out", str(tmp_path / "whole"))
    assert whole.exit_code == 0, whole.output
    full = json.loads(whole.stdout)
    assert [r["label"] for r in full["rows"]] == ["dense", "α 1.00"]
    assert all(r["stats"]["generations"] == 4 for r in full["rows"])
    assert full["rows"][1]["export"].endswith("alpha-1.00/model.onnx")

    calls = {"n": 0}
    real = SparseInferLM.greedy

    def flaky(self, *a):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(SparseInferLM, "greedy", flaky)
    cut = run(*args, "--out", str(tmp_path / "cut"))
    assert cut.exit_code != 0 and not (tmp_path / "cut" / "eval.json").exists()
    monkeypatch.setattr(SparseInferLM, "greedy", real)
    resumed = run(*args, "--out", str(tmp_path / "cut"))
    assert resumed.exit_code == 0, resumed.output
    again = json.loads(resumed.stdout)
    # the two answers made before the interruption came from lm-eval's cache
    assert [r["stats"]["generations"] for r in again["rows"]] == [2, 4]
    for a, b in zip(full["rows"], again["rows"]):
        assert a["scores"] == b["scores"]
    text = run(*args[:-1], "--out", str(tmp_path / "cut"))         # all cached now: the table, no speed
    assert text.exit_code == 0
    lines = text.stdout.splitlines()
    assert lines[0].split()[:4] == ["row", "GSM8K", "bbh_navigate", "average"]
    assert lines[2].startswith("dense") and lines[3].startswith("α 1.00") and "—" in lines[3]


@pytest.mark.parametrize("extra, message", [
    (["--data-dir", "/nonexistent/data"], "data directory /nonexistent/data does not exist"),
    (["--tasks", "gsm8k,mmlu"], "unknown task 'mmlu'"),
    (["--alpha", "1.0x"], "alpha"),
    (["--alpha", "1.03@0-19,1.00"], "names layer 19, but the model has 2 layers"),
    (["--random", "1.5"], "--random 1.5"),
    (["--limit", "0"], "'--limit': 0 is not in the range x>=1"),
    (["--quantize", "q4_0", "--dtype", "float16"], "--quantize computes in float32"),
    (["--quantize", "q4_0", "--provider", "cuda"], "--quantize q4_0 runs on the cpu provider"),
    (["--quantize", "q4_0"], "hidden size d = 200 is not a multiple of 32"),
    (["--quantize", "q5_1"], "Invalid value for '--quantize'"),
])
def test_errors_are_one_line_exit_2(fixtures, tmp_path, extra, message):
    args = ["eval", str(fixtures["ck"]), "--data-dir", str(fixtures["data"]), "--out", str(tmp_path), *extra]
    one_line_error(run(*args), message)


def test_missing_task_file_is_named(fixtures, tmp_path):
    write_data(tmp_path / "d")
    (tmp_path / "d" / "bbh" / "bbh" / "snarks.json").unlink()
    one_line_error(run("eval", fixtures["ck"], "--tasks", "bbh", "--data-dir", tmp_path / "d", "--out", tmp_path),
                   "snarks.json")


@pytest.mark.ort_cuda
def test_eval_on_the_cuda_provider_gives_the_cpu_runs_scores_and_sparsity(fixtures, tmp_path):
    """The same rows on onnxruntime's CUDA provider (the op library's CUDA kernel for the α row)
    as on the CPU: the same per-task scores and generations counted. The CUDA kernel keeps no
    row counters (they would cost a host sync per call), so its decode sparsity is measured
    only where it counts; where it does, it is within a point of the CPU's."""
    args = ["eval", str(fixtures["ck"]), "--tasks", "gsm8k,bbh_navigate", "--alpha", "1.00", "--limit", "2",
            "--data-dir", str(fixtures["data"]), "--max-gen-toks", "6", "--quiet", "--json"]
    runs = {}
    for provider in ("cpu", "cuda"):
        r = run(*args, "--provider", provider, "--out", str(tmp_path / provider))
        assert r.exit_code == 0, r.output
        runs[provider] = json.loads(r.stdout)
    for a, b in zip(runs["cpu"]["rows"], runs["cuda"]["rows"]):
        assert a["label"] == b["label"] and a["scores"] == b["scores"]
        assert a["stats"]["generations"] == b["stats"]["generations"] == 4
    sparse_cpu, sparse_cuda = runs["cpu"]["rows"][1]["stats"], runs["cuda"]["rows"][1]["stats"]
    assert 0 < sparse_cpu["decode_sparsity"] < 1
    if sparse_cuda["decode_sparsity"] is not None:
        assert abs(sparse_cuda["decode_sparsity"] - sparse_cpu["decode_sparsity"]) < 0.01


def test_eval_in_float16_exports_each_row_in_its_own_folder(fixtures, tmp_path):
    import onnx

    args = ["eval", str(fixtures["ck"]), "--tasks", "bbh_navigate", "--alpha", "1.00", "--limit", "1",
            "--data-dir", str(fixtures["data"]), "--max-gen-toks", "4", "--quiet", "--json", "--out", str(tmp_path)]
    r = run(*args, "--dtype", "float16")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["dtype"] == "float16"
    exports = [row["export"] for row in result["rows"]]
    assert exports[0].endswith("dense-float16/model.onnx") and exports[1].endswith("alpha-1.00-float16/model.onnx")
    model = onnx.load(exports[1], load_external_data=False)
    kinds = {i.data_type for i in model.graph.initializer if len(i.dims) == 2}
    assert onnx.TensorProto.FLOAT16 in kinds
    assert result["rows"][1]["stats"]["generations"] == 1 and 0 < result["rows"][1]["stats"]["decode_sparsity"] < 1
    r = run(*args)                                   # float32 beside it: its own exports, not the float16 ones
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"][1]["export"].endswith("alpha-1.00/model.onnx")


def test_eval_quantized_rows_have_their_own_labels_folders_and_cache_keys(fixtures, tmp_path):
    """--quantize: the export rows in the block format, labelled, exported and cached apart from
    the float32 rows, whose keys stay what they were (their caches remain valid)."""
    from dataclasses import replace

    from sparseinfer.model_export.export_check import export_info
    from sparseinfer.model_export.synthetic import make_weights, synthetic_shape, write_checkpoint

    shape = replace(synthetic_shape("tiny", layers=2), hidden_size=256, intermediate_size=576)    # whole blocks
    ck = write_checkpoint(make_weights(shape, 0.9), tmp_path / "ck")
    r = run("eval", str(ck), "--tasks", "bbh_navigate", "--alpha", "1.00", "--limit", "1", "--max-gen-toks", "4",
            "--data-dir", str(fixtures["data"]), "--quiet", "--json", "--out", str(tmp_path / "out"),
            "--quantize", "q4_0")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["quantize"] == "q4_0"
    assert [row["label"] for row in result["rows"]] == ["dense q4_0", "α 1.00 q4_0"]
    paths = [row["export"] for row in result["rows"]]
    assert paths[0].endswith("/dense-q4_0/model.onnx") and paths[1].endswith("/alpha-1.00-q4_0/model.onnx")
    assert [export_info(p).quantize for p in paths] == ["q4_0", "q4_0"]
    assert result["rows"][1]["stats"]["generations"] == 1 and 0 < result["rows"][1]["stats"]["decode_sparsity"] < 1
    assert any("block-quantized to q4_0" in line for line in runner.notes(result))
    # the float32 rows' keys as they were before formats existed; a quantized row's differ
    assert exports.export_key(ck, exports.Row("dense"), "cpu")["row"] == {
        "kind": "dense", "alpha": None, "random": None, "seed": 0, "label": "dense"}
    rows = exports.make_rows(["1.00"], 0.5, methods=[exports.method_row("teal", 0.5)])
    quantized = exports.make_rows(["1.00"], 0.5, methods=[exports.method_row("teal", 0.5)], quantize="Q4_0")
    for row, q in zip(rows[:3], quantized[:3]):
        assert q.quantize == "q4_0" and q.label == f"{row.label} q4_0" and q.slug == f"{row.slug}-q4_0"
        assert runner.row_cache_key(ck, q, "cpu") != runner.row_cache_key(ck, row, "cpu")
    assert quantized[3] == rows[3] and quantized[3].quantize is None         # a method row has no export
    # an export given as the model: its format is read from it, and another one asked for is refused
    lm = SparseInferLM(model=paths[0], progress=False)
    assert lm.row == exports.Row("dense", quantize="q4_0")
    with pytest.raises(SparseInferError, match="was exported in q4_0, not quantize=q8_0"):
        SparseInferLM(model=paths[0], quantize="q8_0")
    with pytest.raises(SparseInferError, match="unknown block format 'q5_0'"):
        exports.make_rows(quantize="q5_0")
