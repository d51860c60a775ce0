"""sparseinfer eval --ray: a row's requests on Ray workers give what one
process gives, on a tiny synthetic checkpoint and a local two-worker Ray instance."""
import json
import sys

import pytest
from helpers import eval_fixtures, one_line_error, run_cli as run

pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install -e '.[eval]')")

from sparseinfer.evaluation import ray_shards  # noqa: E402
from sparseinfer.evaluation.backend import SparseInferLM  # noqa: E402
from sparseinfer.evaluation.exports import Row  # noqa: E402
from sparseinfer.reference.errors import SparseInferError  # noqa: E402

GSM8K = [("Janet has 16 eggs and sells 9 at $2. How much does she make?", "9 * 2 = 18.\n#### 18"),
         ("A robe takes 2 bolts of blue and half that of white. How many bolts?", "2 + 1 = 3\n#### 3"),
         ("Josh flips a house for a profit. How much?", "The profit is 70,000.\n#### 70000"),
         ("Tom reads 12 pages a day for 5 days. How many pages?", "12 * 5 = 60\n#### 60")]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    from sparseinfer.evaluation.data import BBH_TASKS

    return eval_fixtures(tmp_path_factory.mktemp("eval_ray"), GSM8K, {task: 3 for task in BBH_TASKS},
                         "{task} question {i}: is it {i}?")


def eval_args(fixtures, out, *extra):
    return ["eval", str(fixtures["ck"]), "--tasks", "gsm8k,bbh_navigate", "--alpha", "1.00", "--limit", "3",
            "--data-dir", str(fixtures["data"]), "--max-gen-toks", "6", "--out", str(out), "--quiet", "--json",
            *extra]


# -- without Ray ---------------------------------------------------------------------------
def test_ray_not_installed_is_one_line_error_naming_the_extra(fixtures, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)             # import ray -> ImportError
    line = one_line_error(run(*eval_args(fixtures, tmp_path / "out", "--ray", "auto")), "pip install -e '.[ray]'")
    assert line.startswith("error: --ray needs Ray"), line
    assert not (tmp_path / "out").exists()                    # refused before any export was made


class FakeRay:
    def __init__(self, **resources):
        self.resources = resources

    def cluster_resources(self):
        return self.resources


def test_workers_planned_from_the_cluster():
    # cuda: one worker per GPU, each pinned to one (num_gpus=1)
    assert ray_shards.plan_workers(FakeRay(CPU=16, GPU=4), "cuda", None, None) == (4, {"num_cpus": 1, "num_gpus": 1})
    assert ray_shards.plan_workers(FakeRay(CPU=16, GPU=4), "cuda", 2, 3) == (2, {"num_cpus": 3, "num_gpus": 1})
    # cpu: one per --threads CPUs
    assert ray_shards.plan_workers(FakeRay(CPU=8), "cpu", None, None) == (8, {"num_cpus": 1, "num_gpus": 0})
    assert ray_shards.plan_workers(FakeRay(CPU=8, GPU=2), "cpu", None, 4) == (2, {"num_cpus": 4, "num_gpus": 0})
    with pytest.raises(SparseInferError, match="no GPUs"):
        ray_shards.plan_workers(FakeRay(CPU=8), "cuda", None, None)
    with pytest.raises(SparseInferError, match="has 4 GPUs"):
        ray_shards.plan_workers(FakeRay(CPU=8, GPU=4), "cuda", 5, None)
    with pytest.raises(SparseInferError, match="needs 6 CPUs; the Ray cluster has 4"):
        ray_shards.plan_workers(FakeRay(CPU=4), "cpu", 3, 2)
    with pytest.raises(SparseInferError, match="at least 1"):
        ray_shards.plan_workers(FakeRay(CPU=4), "cpu", 0, None)


# -- on a local Ray instance with two workers ----------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray not installed (pip install -e '.[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def samples(out):
    """{(row, task file without its date): [records]} of a run's per-sample JSONL."""
    found = {}
    for f in sorted(out.glob("*/samples_*.jsonl")):
        task = f.name.rsplit("_", 1)[0]
        found[(f.parent.name, task)] = [json.loads(line) for line in f.read_text().splitlines()]
    return found


COUNTERS = ("generations", "prompts_truncated", "prefill_tokens", "decode_tokens", "decode_steps_counted",
            "scored_requests", "scored_tokens", "mlp_kernels")


def test_ray_run_equals_in_process_run(fixtures, tmp_path, ray_local):
    local = run(*eval_args(fixtures, tmp_path / "local"))
    assert local.exit_code == 0, local.output
    sharded = run(*eval_args(fixtures, tmp_path / "ray", "--ray", "auto", "--ray-workers", "2"))
    assert sharded.exit_code == 0, sharded.output
    a, b = json.loads(local.stdout), json.loads(sharded.stdout)
    assert b["ray"] == "auto" and a["ray"] is None
    assert [r["label"] for r in a["rows"]] == [r["label"] for r in b["rows"]] == ["dense", "α 1.00"]
    for ra, rb in zip(a["rows"], b["rows"]):
        assert ra["scores"] == rb["scores"] and \
            ra["export"].split("/local/")[1] == rb["export"].split("/ray/")[1]
        assert {k: ra["stats"][k] for k in COUNTERS} == {k: rb["stats"][k] for k in COUNTERS}
        for k in ("predicted_sparsity", "decode_sparsity"):
            x, y = ra["stats"][k], rb["stats"][k]
            assert (x is None and y is None) or y == pytest.approx(x, rel=1e-12, abs=0)
        # the requests were shared by both workers: 3 GSM8K + 3 navigate generations
        per = rb["stats"]["requests_per_worker"]
        assert rb["stats"]["ray_workers"] == 2 and sum(per) == 6 and min(per) >= 1
    # the per-sample records lm-eval logged are the same, record for record, in the same order
    sa, sb = samples(tmp_path / "local"), samples(tmp_path / "ray")
    assert sorted(sa) == sorted(sb) and len(sa) == 4
    assert sa == sb
    assert sorted(len(v) for v in sa.values()) == [3, 3, 6, 6]    # GSM8K: a strict and a flexible record each

    # a second Ray run on the same --out takes every answer from lm-eval's cache
    again = run(*eval_args(fixtures, tmp_path / "ray", "--ray", "auto", "--ray-workers", "2"))
    assert again.exit_code == 0, again.output
    c = json.loads(again.stdout)
    assert [r["stats"]["generations"] for r in c["rows"]] == [0, 0]
    assert [r["scores"] for r in c["rows"]] == [r["scores"] for r in a["rows"]]


class Hook:
    """Records lm-eval's cache-hook calls."""

    def __init__(self):
        self.calls = []

    def add_partial(self, attr, req, res):
        self.calls.append((attr, req, res))


def test_requests_on_ray_equal_in_process(fixtures, ray_local):
    from lm_eval.api.instance import Instance

    local = SparseInferLM(model=str(fixtures["ck"]), cache_dir=str(fixtures["root"] / "exports"), progress=False)
    lm = ray_shards.RayLM(local.path, Row("dense"), workers=2, progress=False, max_gen_toks=4)
    hook = Hook()
    lm.set_cache_hook(hook)
    try:
        pairs = [("The quick brown", " fox"), ("", "abc"), ("Q: 2 + 2?", " A: 4"), ("x", " y z")]
        reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
        got = lm.loglikelihood(reqs)
        want = local.loglikelihood(reqs)
        assert got == want and len({g[0] for g in got}) == len(pairs)
        # every answer went to lm-eval's cache hook (what an interrupted run resumes from), keyed as lm-eval keys it
        assert sorted(hook.calls) == sorted(("loglikelihood", p, w) for p, w in zip(pairs, want))
        hook.calls.clear()
        rolling = [Instance("loglikelihood_rolling", {}, (s,), i) for i, s in enumerate(["abc", "hello world"])]
        assert lm.loglikelihood_rolling(rolling) == local.loglikelihood_rolling(rolling)
        assert sorted(c[:2] for c in hook.calls) == [("loglikelihood_rolling", ("abc",)),
                                                     ("loglikelihood_rolling", ("hello world",))]
        hook.calls.clear()
        assert sum(lm.stats()["requests_per_worker"]) == len(pairs) + 2
        # generations of different lengths (the tiny model repeats itself, so the length tells
        # them apart): they come back in request order, as in one process
        gens = [Instance("generate_until", {}, (f"Q{i}: {'ab' * i}", {"until": ["\n\n"], "max_gen_toks": 1 + i}), i)
                for i in range(6)]
        out = lm.generate_until(gens)
        assert out == local.generate_until(gens) and len(set(out)) == len(gens)
        assert len(hook.calls) == len(gens) and \
            {json.dumps(c[1]): c[2] for c in hook.calls} == {json.dumps(g.args): o for g, o in zip(gens, out)}
        # a worker's SparseInferError arrives as itself, a one-line error
        too_long = Instance("generate_until", {}, ("Hi", {"until": [], "max_gen_toks": 10 ** 6}), 0)
        with pytest.raises(SparseInferError, match="leaves no room for a prompt"):
            lm.generate_until([too_long])
    finally:
        lm.close()
