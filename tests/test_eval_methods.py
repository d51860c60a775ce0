"""eval --method (any methods.registry method on the NumPy reference model through lm-eval), the
per-token random control, and the accuracy columns of compare-methods / sweep --tasks, on a
tiny synthetic checkpoint and tiny data fixtures (never ../shared/data)."""
import json
import math

import numpy as np
import pytest
from helpers import one_line_error, run_cli as run, write_eval_data

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install -e '.[eval]')")

from sparseinfer.evaluation import exports  # noqa: E402
from sparseinfer.evaluation.backend import SparseInferLM  # noqa: E402
from sparseinfer.evaluation.method_backend import MethodLM, request_seed  # noqa: E402
from sparseinfer.methods.calibration import load_calibration  # noqa: E402
from sparseinfer.methods.registry import MethodReference, make_method  # noqa: E402
from sparseinfer.model_export.export_folder import prompt_ids  # noqa: E402
from sparseinfer.model_export.loaders import load_checkpoint  # noqa: E402
from sparseinfer.model_export.synthetic import make_checkpoint  # noqa: E402
from sparseinfer.reference.errors import SparseInferError  # noqa: E402

GSM8K = [
    ("Tom has 3 boxes of 12 pencils and gives away 5. How many pencils are left?", "36 - 5 = 31\n#### 31"),
    ("A baker makes 40 rolls and sells 3 dozen. How many rolls remain?", "40 - 36 = 4\n#### 4"),
]
PROMPT = "Once the river rose, the village"
TASKS_FAST = ["--limit", "1", "--max-gen-toks", "4"]
FAST = [*TASKS_FAST, "--quiet"]                               # eval's


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalm")
    ck = make_checkpoint("tiny", root / "ck", layers=2, target_sparsity=0.9, seed=5)
    return {"ck": ck, "data": write_eval_data(root / "data", GSM8K, {"navigate": 2}), "root": root,
            "loaded": load_checkpoint(ck)}


def direct_tokens(ck, name, sparsity, params, prompt, n):
    """Greedy tokens of the reference model decoding with the method's masks (no lm-eval);
    random draws from the request's own stream, as the backend does."""
    if name == "random":
        params = {**params, "seed": str(request_seed(int(params.get("seed", 0)), prompt))}
    method = make_method(name, params)
    method.prepare(ck.weights, load_calibration(ck, None, 64, []), sparsity)
    ids = prompt_ids(ck.tokenizer, ck.bos_token_id, prompt)
    return MethodReference(ck.weights, method, sparsity).greedy(ids, n)


@pytest.mark.parametrize("name, sparsity, params", [("teal", 0.7, {}), ("random", 0.9, {"seed": "4"}),
                                                     ("sparseinfer", 0.8, {"alpha": "auto"})])
def test_backend_decodes_as_the_reference_with_the_methods_masks(fx, name, sparsity, params):
    arg = ";".join(f"{k}={v}" for k, v in params.items())
    lm = SparseInferLM.create_from_arg_string(
        f"model={fx['ck']},method={name},sparsity={sparsity},params={arg},max_gen_toks=12,progress=false")
    assert isinstance(lm, MethodLM) and lm.row.kind == "method" and lm.row.method == name
    lm.greedy(PROMPT, [], 12)
    tokens = lm.last_tokens
    want = direct_tokens(fx["loaded"], name, sparsity, params, PROMPT, 12)
    assert len(tokens) >= 3, tokens                            # non-trivial: a real continuation
    assert tokens == want[:len(tokens)], (name, tokens, want)
    if len(tokens) < 12:                                       # the backend stopped at EOS, where the reference made it
        assert want[len(tokens)] == lm.eos, (tokens, want)
    st = lm.stats()
    steps = len(tokens) - 1 if len(tokens) == 12 else len(tokens)      # the EOS came from a decode step
    assert st["decode_steps_counted"] == steps and st["decode_sparsity"] > 0.5
    assert st["mlp_kernels"] == "numpy reference"


def test_methods_change_the_tokens(fx):
    """The comparison above is not between two dense decodes: random 0.9 per token changes the
    continuation of the dense model."""
    dense = direct_tokens(fx["loaded"], "dense", 0.0, {}, PROMPT, 12)
    assert direct_tokens(fx["loaded"], "random", 0.9, {"seed": "4"}, PROMPT, 12) != dense


def test_per_token_random_draws_a_fresh_mask_of_exactly_floor_s_k_rows(fx, monkeypatch):
    from sparseinfer.methods.random_rows import RandomRows

    masks = []
    select = RandomRows.select

    def record(self, inp):
        plan = select(self, inp)
        masks.append((inp.layer, plan.skip_rows.copy()))
        return plan

    monkeypatch.setattr(RandomRows, "select", record)

    def draws(lm, prompt):
        masks.clear()
        lm.greedy(prompt, [], 8)
        return list(masks), lm.stats()["decode_steps_counted"]

    lm = MethodLM(model=str(fx["ck"]), method="random", sparsity=0.9, params="seed=2", loaded=fx["loaded"],
                  progress=False)
    first, steps = draws(lm, PROMPT)
    k = fx["loaded"].shape.k
    assert steps >= 3 and len(first) == 2 * steps                # every decode step, every layer; none in prefill
    for _, m in first:
        assert m.sum() == math.floor(0.9 * k)
    for layer in (0, 1):
        mine = [m for li, m in first if li == layer]
        assert len({m.tobytes() for m in mine}) == len(mine)     # a new draw each step
    assert not np.array_equal(first[0][1], first[1][1])          # and each layer
    # a stream per request: the same prompt draws the same masks after another request ran,
    # another prompt or another seed draws others
    other_prompt, _ = draws(lm, "A different prompt entirely")
    again, _ = draws(lm, PROMPT)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(first, again)) and len(again) == len(first)
    assert not np.array_equal(first[0][1], other_prompt[0][1])
    reseeded = MethodLM(model=str(fx["ck"]), method="random", sparsity=0.9, params="seed=3", loaded=fx["loaded"],
                        progress=False)
    assert not np.array_equal(first[0][1], draws(reseeded, PROMPT)[0][0][1])


def test_row_labels_tell_fixed_from_per_token_random():
    rows = exports.make_rows(["1.00"], 0.9, methods=exports.parse_method_rows(["random", "teal@0.5"], ["0.9"]))
    assert [r.label for r in rows] == ["dense", "α 1.00", "random 0.90 fixed mask", "random@0.9 (per token)",
                                       "teal@0.5"]
    assert [r.engine for r in rows] == ["onnxruntime"] * 3 + ["numpy reference"] * 2
    si = exports.parse_method_rows(["sparseinfer"], ["0.5,0.9"])
    assert [(r.sparsity, r.params) for r in si] == [(0.5, (("alpha", "auto"),)), (0.9, (("alpha", "auto"),))]


def test_eval_method_rows_in_the_table(fx, tmp_path):
    args = ["eval", fx["ck"], "--tasks", "gsm8k,bbh_navigate", "--random", "0.9", "--method", "random",
            "--method", "teal", "--sparsity", "0.7", "--data-dir", fx["data"], "--out", tmp_path / "o", *FAST]
    r = run(*args)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["row", "GSM8K", "bbh_navigate", "average"]
    labels = [line.split("  ")[0].strip() for line in lines[2:6]]
    assert labels == ["dense", "random 0.90 fixed mask", "random@0.7 (per token)", "teal@0.7"]
    assert any("per token" in line and "floor(S·k)" in line for line in lines)
    assert any(line.startswith("method@S rows: decoded on the NumPy reference model") for line in lines)
    data = json.loads((tmp_path / "o" / "eval.json").read_text())
    teal = data["rows"][3]
    assert teal["kind"] == "method" and teal["engine"] == "numpy reference" and teal["export"] is None
    assert teal["stats"]["generations"] == 2 and teal["stats"]["decode_sparsity"] > 0.5
    assert data["calibration"]["prompts"] == 8 and "delta" in teal
    # resumed from lm-eval's cache: the same scores, nothing generated
    again = run(*args[:-1], "--json")
    assert again.exit_code == 0, again.output
    rows = json.loads(again.stdout)["rows"]
    assert [x["scores"] for x in rows] == [x["scores"] for x in data["rows"]]
    assert rows[3]["stats"]["generations"] == 0


@pytest.mark.parametrize("extra, message", [
    (["--method", "magic", "--sparsity", "0.5"], "unknown method 'magic'"),
    (["--method", "teal", "--sparsity", "1.0"], "sparsity must be in [0, 1), got 1.0"),
    (["--method", "teal@-0.1"], "sparsity must be in [0, 1), got -0.1"),
    (["--method", "teal"], "--method teal needs a target sparsity"),
    (["--sparsity", "0.5"], "--sparsity is the target of a --method"),
    (["--method", "teal@0.5", "--param", "dejavu.rank=4"], "--param names dejavu, which is not a --method"),
    (["--method", "teal@0.5", "--param", "teal.nope=1"], "unknown parameter 'nope'"),
    (["--method", "teal@0.5", "--data-dir", "/nonexistent/data"], "data directory /nonexistent/data does not exist"),
    (["--method", "teal@0.5", "--calibration", "/nonexistent/cal.txt"], "no such calibration file"),
    (["--method", "teal@0.5", "--ray", "local"], "--ray runs onnxruntime exports"),
])
def test_method_errors_are_one_line_exit_2(fx, tmp_path, extra, message):
    base = ["eval", fx["ck"], "--tasks", "gsm8k", "--out", tmp_path]
    one_line_error(run(*base, *(["--data-dir", fx["data"]] if "--data-dir" not in extra else []), *extra), message)


@pytest.mark.parametrize("text", [GSM8K[1][0], "Intro line. " + GSM8K[0][0] + " Answer:", "navigate question 1?"])
def test_calibration_overlapping_a_task_document_is_refused(fx, tmp_path, text):
    cal = tmp_path / "cal.txt"
    cal.write_text("A sentence about rivers and their deltas, long enough to count.\n" + text + "\n")
    r = run("eval", fx["ck"], "--tasks", "gsm8k,bbh_navigate", "--method", "teal@0.5", "--calibration", cal,
            "--data-dir", fx["data"], "--out", tmp_path / "o")
    line = one_line_error(r)
    assert line.startswith("error: calibration and gsm8k, bbh_navigate documents overlap (1 shared"), line
    assert not (tmp_path / "o").exists()                        # refused before any work
    # the same with compare-methods --tasks, before its comparison runs
    one_line_error(run("compare-methods", fx["ck"], "--methods", "teal", "--sparsity", "0.5", "--calibration", cal,
                       "--tasks", "gsm8k,bbh_navigate", "--data-dir", fx["data"], "--eval-out", tmp_path / "c"),
                   "documents overlap")


def test_compare_methods_tasks_equal_a_direct_eval(fx, tmp_path):
    out, plot = tmp_path / "cmp.json", tmp_path / "cmp.png"
    r = run("compare-methods", fx["ck"], "--methods", "teal,random", "--sparsity", "0.6,0.9", "--max-prompts", "1",
            "--max-new-tokens", "3", "--tasks", "gsm8k,bbh_navigate", "--data-dir", fx["data"], "--eval-out",
            tmp_path / "ev", "--out", out, "--plot", plot, *TASKS_FAST)
    assert r.exit_code == 0, r.output
    assert "Δ acc" in r.stdout.splitlines()[1] and plot.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(out.read_text())
    acc = data["accuracy"]
    assert acc["tasks"] == ["gsm8k", "bbh_navigate"] and acc["samples"] == {"gsm8k": 1, "bbh_navigate": 1}
    assert acc["dense"]["engine"] == "onnxruntime" and set(acc["dense"]["accuracy"]) == {"gsm8k", "bbh_navigate"}
    for row in data["rows"]:
        for key in ("accuracy", "accuracy_average", "accuracy_delta", "accuracy_delta_average", "accuracy_row"):
            assert key in row, key
        assert row["accuracy_delta_average"] == pytest.approx(row["accuracy_average"] -
                                                              acc["dense"]["accuracy_average"])
    # the same row evaluated on its own gives the same scores
    direct = run("eval", fx["ck"], "--tasks", "gsm8k,bbh_navigate", "--method", "random@0.9", "--data-dir",
                 fx["data"], "--out", tmp_path / "direct", "--json", *FAST)
    assert direct.exit_code == 0, direct.output
    row = json.loads(direct.stdout)["rows"][1]
    mine = next(r for r in data["rows"] if (r["method"], r["target_sparsity"]) == ("random", 0.9))
    assert mine["accuracy"] == {t: s["score"] for t, s in row["scores"].items()}
    assert mine["accuracy_row"] == row["label"] == "random@0.9 (per token)"
    def generations(root):
        files = sorted((root / "method-random-0.9").glob("samples_sparseinfer_gsm8k_cot_*.jsonl"))
        return [json.loads(line)["resps"] for p in files for line in p.read_text().splitlines()]

    resps, resps_cmp = generations(tmp_path / "direct"), generations(tmp_path / "ev")
    assert resps and resps == resps_cmp                           # the same generations, not only equal scores


def test_sweep_tasks_adds_the_accuracy_column(fx, tmp_path):
    plot = tmp_path / "sweep.png"
    r = run("sweep", fx["ck"], "--alpha", "1.00:1.10:0.10", "--max-prompts", "1", "--max-new-tokens", "3",
            "--tasks", "gsm8k", "--data-dir", fx["data"], "--eval-out", tmp_path / "ev", "--plot", plot, "--json",
            *TASKS_FAST)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [x["schedule"] for x in data["rows"]] == ["1@0-1,1.00", "1.1@0-1,1.00"]
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    by = {x["alpha"]: x for x in ev["rows"] if x["kind"] == "sparse"}
    for row in data["rows"]:
        assert row["accuracy"] == {"gsm8k": by[row["schedule"]]["scores"]["gsm8k"]["score"]}
        assert isinstance(row["pareto_accuracy"], bool) and "accuracy_delta_average" in row
    assert data["accuracy"]["samples"] == {"gsm8k": 1} and plot.read_bytes()[:4] == b"\x89PNG"
    text = run("sweep", fx["ck"], "--method", "random", "--sparsity", "0.5", "--max-prompts", "1",
               "--max-new-tokens", "3", "--tasks", "gsm8k", "--data-dir", fx["data"], "--eval-out", tmp_path / "ev2",
               *TASKS_FAST)
    assert text.exit_code == 0, text.output
    header = text.stdout.splitlines()[1]
    assert "gsm8k  Δ acc  acc front  pareto" in " ".join(header.split("  ")).replace("   ", "  ") or \
        all(h in header for h in ("gsm8k", "Δ acc", "acc front"))
    assert text.stdout.splitlines()[-1].startswith("accuracy (gsm8k 1 samples")


def test_sweep_and_compare_tasks_errors(fx, tmp_path):
    one_line_error(run("sweep", fx["ck"], "--tasks", "gsm8k", "--data-dir", tmp_path / "none"), "does not exist")
    one_line_error(run("compare-methods", fx["ck"], "--methods", "teal", "--tasks", "mmlu", "--data-dir", fx["data"]),
                   "unknown task 'mmlu'")


def test_lm_evals_own_command_line_reaches_the_method_backend(fx):
    """lm-eval's CLI hands model_args over as a dict (create_from_arg_obj), with numbers parsed."""
    from lm_eval.api.registry import get_model

    lm = get_model("sparseinfer").create_from_arg_obj(
        {"model": str(fx["ck"]), "method": "random", "sparsity": 0.9, "params": "seed=3"}, {"batch_size": 1})
    assert isinstance(lm, MethodLM) and lm.row.label == "random@0.9 (per token, seed=3)"


def test_model_args_errors(fx):
    with pytest.raises(SparseInferError, match="needs sparsity=S"):
        SparseInferLM.create_from_arg_string(f"model={fx['ck']},method=teal")
    with pytest.raises(SparseInferError, match="not KEY=VALUE"):
        SparseInferLM.create_from_arg_string(f"model={fx['ck']},method=teal,sparsity=0.5,params=rank")


def test_run_time_estimate_is_the_latency_model_times_the_tokens():
    from sparseinfer.evaluation import estimate
    from sparseinfer.reference.shapes import load_model
    from sparseinfer.sim import latency as lat
    from sparseinfer.sim.hardware import load_hardware

    data = estimate.estimate("prosparse-llama2-7b", "h200", tokens=100, limit=10, max_gen_toks=64)
    assert data["samples"] == {"gsm8k": 10, "bbh": 270} and "not a measurement" in data["kind"]
    m, hw = load_model("prosparse-llama2-7b"), load_hardware("h200")
    dense, sparse = data["rows"][0]["tasks"]["gsm8k"], data["rows"][2]["tasks"]["bbh"]
    assert dense["generated_tokens"] == 64 and dense["context_tokens"] == 900 + 32
    ms = lat.decode_latency(m, hw, "1.00", None, ("llama.cpp",), 932)["methods"][0]["ms_per_token"]
    prefill = 2.0 * estimate.parameters(m) * 900 / (hw.fp16_tensor_tflops * 1e12 * hw.efficiency.compute_fraction)
    assert dense["seconds_fp16"] == pytest.approx(10 * (64 * ms / 1000 + prefill), rel=1e-12)
    assert 6.0e9 < estimate.parameters(m) < 7.0e9                      # ProSparse-Llama2-7B
    assert sparse["decode_ms_per_token_fp16"] < dense["decode_ms_per_token_fp16"]
    random = data["rows"][3]["tasks"]["gsm8k"]
    assert random["seconds_fp32"] == pytest.approx(10 * 64 * estimate.parameters(m) * 4 / 20e9)


def test_method_rows_cache_key_reads_every_method_module(monkeypatch):
    """A method row's lm-eval cache key hashes the sources of every method module (and the
    reference model's and the method backend's, its requests' ``decoder_lm`` too), so that
    changed method code never resumes from old answers."""
    from pathlib import Path

    from sparseinfer.evaluation import runner

    read, real = [], Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self.name) or real(self))
    key = runner.method_sources_hash()
    assert len(key) == 16 and key == runner.method_sources_hash()
    assert {"base.py", "registry.py", "sign_predictor.py", "baselines.py", "random_rows.py", "dejavu.py", "teal.py",
            "cats.py", "cluster.py", "wisparse.py", "llama.py", "method_backend.py", "decoder_lm.py"} <= set(read)


def test_overlap_rule():
    """Equal up to whitespace, an evaluation text inside a calibration prompt, or a calibration
    prompt of at least MIN_CONTAINED_CHARS inside an evaluation text; a short phrase is not."""
    from sparseinfer.methods.calibration import MIN_CONTAINED_CHARS, check_disjoint

    doc = "Tom has 3 boxes of 12 pencils and gives away 5. How many pencils are left?"
    check_disjoint(["How many pencils", "Something else entirely."], [doc])            # short phrase: allowed
    long_part = doc[-MIN_CONTAINED_CHARS:]                                          # no space at either end
    for cal in (doc.replace(" ", "  "), "Q: " + doc + " A:", long_part):
        with pytest.raises(SparseInferError, match="overlap"):
            check_disjoint(["unrelated", cal], [doc])
    check_disjoint([long_part[1:]], [doc])                                               # one character short
