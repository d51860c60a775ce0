"""Each activation-sparsity method on constructed inputs with a known answer."""
import math

import numpy as np
import pytest

from sparseinfer.methods.base import (Calibration, LayerInput, Plan, check_sparsity, magnitude_threshold,
                                     parse_sparsities, run_mlp, smallest_rows)
from sparseinfer.methods.cluster import (binarise, capacity_assign, cluster_masks, clustering_precision,
                                         one_sided_hamming)
from sparseinfer.methods.compare import method_latency
from sparseinfer.methods.dejavu import load_predictors, train_predictor
from sparseinfer.methods.registry import METHODS, make_method, parse_method_list, parse_param_options
from sparseinfer.methods.sign_predictor import calibrated_alpha_milli
from sparseinfer.methods.wisparse import evolve_allocation, split
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.llama import LayerWeights, LlamaWeights
from sparseinfer.reference.mlp import mlp_sparse
from sparseinfer.reference.shapes import ModelShape
from sparseinfer.reference.signs import pack_signs
from sparseinfer.sim import latency as lat
from sparseinfer.sim.hardware import load_hardware
from sparseinfer.sim.sparsity_model import LayerSparsity

F32 = np.float32


def toy_model(d=64, k=96, layers=2, act="relu", seed=0):
    """LlamaWeights with random MLPs (attention unused by the method-level tests)."""
    rng = np.random.default_rng(seed)
    shape = ModelShape("toy", d, k, layers, 4, 4, 32, act)
    lws = []
    for _ in range(layers):
        lws.append(LayerWeights(
            input_norm=np.ones(d, F32), q=np.zeros((d, d), F32), k=np.zeros((d, d), F32), v=np.zeros((d, d), F32),
            o=np.zeros((d, d), F32), post_norm=np.ones(d, F32),
            gate=(rng.standard_normal((k, d)) / math.sqrt(d) - 0.05).astype(F32),
            up=(rng.standard_normal((k, d)) / math.sqrt(d)).astype(F32),
            down=(rng.standard_normal((d, k)) / math.sqrt(k)).astype(F32)))
    return LlamaWeights(shape, np.zeros((32, d), F32), lws, np.ones(d, F32), np.zeros((32, d), F32))


def calib(weights, tokens=400, seed=1):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((tokens, weights.shape.d)).astype(F32) for _ in weights.layers]
    return Calibration(weights, xs, "test", 1)


def layer_input(weights, i, x):
    lw = weights.layers[i]
    return LayerInput(i, x, lw.gate, lw.up, lw.down, weights.activation)


def run(method, weights, x, i=0, target=0.0):
    inp = layer_input(weights, i, x)
    return run_mlp(method.select(inp), inp, target, method.name, method.axis, method.cost(weights.shape))


def test_oracle_recall_one_and_equals_dense_on_relu():
    w = toy_model()
    x = np.random.default_rng(5).standard_normal(64).astype(F32)
    dense, oracle = make_method("dense"), make_method("oracle")
    for m in (dense, oracle):
        m.prepare(w, None, 0.5)
    out_d, _ = run(dense, w, x)
    out_o, tr = run(oracle, w, x, target=0.5)
    zeros = tr.actual_zero
    assert 0.2 < zeros.mean() < 0.9                        # non-trivial
    assert np.array_equal(tr.predicted_zero, zeros) and tr.recall == 1.0 and tr.precision == 1.0
    assert np.array_equal(out_d.view(np.uint32), out_o.view(np.uint32))     # skipping true zeros is exact
    assert tr.rows["gate"] == int((~zeros).sum()) and tr.weight_bytes_read["gate"] == tr.rows["gate"] * 64 * 4


def test_cats_at_threshold_zero_equals_oracle_on_relu():
    w = toy_model()
    rng = np.random.default_rng(7)
    cats, oracle = make_method("cats", {"threshold": "0"}), make_method("oracle")
    assert cats.exact_for_relu and not make_method("cats").exact_for_relu
    for m in (cats, oracle):
        m.prepare(w, None, 0.9)
    for _ in range(5):
        x = rng.standard_normal(64).astype(F32)
        out_c, tc = run(cats, w, x)
        out_o, to = run(oracle, w, x)
        assert np.array_equal(tc.predicted_zero, to.predicted_zero) and tc.predicted_zero.any()
        assert np.array_equal(out_c, out_o)
        assert tc.rows["gate"] == 96 and tc.rows["up"] == to.rows["up"]           # CATS: gate dense


def test_cats_calibrated_threshold_skips_the_target():
    w = toy_model(act="silu")
    cal = calib(w)
    cats = make_method("cats")
    cats.prepare(w, cal, 0.6)
    held = np.random.default_rng(9).standard_normal((200, 64)).astype(F32)
    frac = np.mean([run(cats, w, x, target=0.6)[1].sparsity for x in held])
    assert abs(frac - 0.6) < 0.02


def test_teal_calibrated_sparsity_within_one_point_on_held_out_data():
    w = toy_model(d=256, k=384, layers=1)
    cal = calib(w, tokens=2000, seed=2)
    held = np.random.default_rng(3).standard_normal((400, 256)).astype(F32)
    for target in (0.3, 0.5, 0.7):
        teal = make_method("teal")
        teal.prepare(w, cal, target)
        s_x = np.mean([(np.abs(x) <= teal.t_x[0]).mean() for x in held])
        assert abs(s_x - target) <= 0.01, (target, s_x)
        traces = [run(teal, w, x, target=target)[1] for x in held]
        assert all(t.x_kept < 256 for t in traces)
        # the down input's channels: on ReLU the true zeros fall below any threshold >= 0
        s_h = np.mean([t.predicted_zero.mean() for t in traces])
        assert s_h >= min(target, np.mean([t.actual_zero.mean() for t in traces])) - 0.01
    assert magnitude_threshold(np.arange(101.0), 0.5) == 50.0 and magnitude_threshold(np.ones(3), 0.0) < 0


def test_dejavu_learns_a_planted_low_rank_rule(tmp_path):
    rng = np.random.default_rng(0)
    d, k, r, t = 24, 40, 3, 3000
    u = rng.standard_normal((d, r))
    v = rng.standard_normal((r, k))
    x = rng.standard_normal((t, d)).astype(F32)
    y = (x @ u @ v) > 0.3
    pred = train_predictor(x[:2000], y[:2000], rank=2 * r, epochs=150, lr=2e-2, seed=0, batch=500)
    acc = float(((pred.logits(x[2000:]) > 0) == y[2000:]).mean())
    assert 0.3 < y.mean() < 0.7 and acc > 0.95, acc
    chance = max(y[2000:].mean(), 1 - y[2000:].mean())
    assert acc > chance + 0.3


def test_dejavu_trains_saves_and_reloads(tmp_path):
    w = toy_model(layers=2)
    cal = calib(w, tokens=300)
    path = tmp_path / "dv.npz"
    a = make_method("dejavu", {"rank": "8", "epochs": "30", "save": str(path)})
    a.prepare(w, cal, 0.7)
    assert path.is_file() and not list(tmp_path.glob(".*"))             # written whole, no temp left
    b = make_method("dejavu", {"load": str(path), "threshold": "0"})
    b.prepare(w, None, 0.7)                                              # no calibration needed
    x = cal.xs[1][0]
    assert np.array_equal(a.predictors[1].logits(x), b.predictors[1].logits(x))
    assert b.cost(w.shape).ops == 64 * 8 + 8 * 96 and b.cost(w.shape).unit == "fp16_tensor"
    # auto threshold hits the target on the calibration tokens
    skip = np.mean([a.select(layer_input(w, 0, xx)).skip_rows.mean() for xx in cal.xs[0]])
    assert abs(skip - 0.7) < 0.02
    with pytest.raises(SparseInferError, match="the model has d 32, k 96"):
        load_predictors(path, 32, 96, 2)
    with pytest.raises(SparseInferError, match="no such dejavu predictor file"):
        make_method("dejavu", {"load": str(tmp_path / "none.npz"), "threshold": "0"}).prepare(w, None, 0.5)


def test_sparseinfer_matches_the_reference_mlp_sparse():
    w = toy_model(d=70, k=50)
    si = make_method("sparseinfer", {"alpha": "1.02"})
    si.prepare(w, None, 0.9)
    rng = np.random.default_rng(4)
    for _ in range(4):
        x = rng.standard_normal(70).astype(F32)
        lw = w.layers[0]
        _, ref = mlp_sparse(x, lw.gate, lw.up, lw.down, "relu", alpha=1.02)
        _, tr = run(si, w, x)
        for f in ("predicted_zero", "actual_zero", "computed_gate", "computed_up", "computed_down"):
            assert np.array_equal(getattr(ref, f), getattr(tr, f)), f
        assert tr.weight_bytes_read["predictor"] == 50 * 3 * 4


def test_sparseinfer_auto_alpha_and_silu_needs_approximate():
    w = toy_model(d=512)
    cal = calib(w)
    si = make_method("sparseinfer", {"alpha": "auto"})
    si.prepare(w, cal, 0.5)
    pred = np.mean([si.select(layer_input(w, 0, x)).skip_rows.mean() for x in cal.xs[0]])
    assert abs(pred - 0.5) < 0.03
    lower = make_method("sparseinfer", {"alpha": "auto"})
    lower.prepare(w, cal, 0.2)
    assert lower.alpha_milli[0] > si.alpha_milli[0]                # skipping less needs a larger α (eq. 2)
    n_neg = np.bitwise_count(np.bitwise_xor(pack_signs(w.layers[0].gate)[None], pack_signs(cal.xs[0])[:, None])).sum(-1)
    assert calibrated_alpha_milli(n_neg, 512, 0.5) == si.alpha_milli[0]
    silu = toy_model(act="silu")
    with pytest.raises(SparseInferError, match="--approximate"):
        make_method("sparseinfer").prepare(silu, None, 0.5)
    with pytest.raises(SparseInferError, match="--approximate"):
        make_method("cluster").prepare(silu, calib(silu), 0.5)
    m = make_method("sparseinfer", approximate=True)
    m.prepare(silu, None, 0.5)
    x = cal.xs[0][0][:64]
    _, tr = run(m, silu, x, target=0.5)
    assert tr.predicted_zero.any() and tr.rows["up"] == int((~tr.predicted_zero).sum())   # no exact zeros on SiLU
    assert tr.actual_zero.sum() == 48                                # reference: smallest |h1| at the target


def test_random_drops_the_target_fraction_reproducibly():
    w = toy_model()
    a, b = make_method("random", {"seed": "3"}), make_method("random", {"seed": "3"})
    a.prepare(w, None, 0.75)
    b.prepare(w, None, 0.75)
    x = np.ones(64, F32)
    pa, pb = a.select(layer_input(w, 0, x)), b.select(layer_input(w, 0, x))
    assert pa.skip_rows.sum() == 72 and np.array_equal(pa.skip_rows, pb.skip_rows)
    assert not np.array_equal(pa.skip_rows, a.select(layer_input(w, 0, x)).skip_rows)   # fresh per token


def test_clustering_precision_by_hand():
    masks = np.array([[1, 1, 0, 0, 0, 0],
                      [1, 0, 1, 0, 0, 0],
                      [0, 0, 0, 1, 1, 0],
                      [0, 0, 0, 1, 0, 1]], dtype=bool)
    cents = np.array([[1, 1, 1, 0, 0, 0],
                      [0, 0, 0, 1, 1, 0]], dtype=bool)
    dist = one_sided_hamming(masks, cents)
    assert dist.tolist() == [[0, 2], [0, 2], [2, 0], [2, 1]]
    assert capacity_assign(dist, 2).tolist() == [0, 0, 1, 1]
    assert capacity_assign(dist, 3).tolist() == [0, 0, 1, 1]
    # capacity 1 per centroid with 2 centroids cannot hold 4 tokens
    with pytest.raises(SparseInferError, match="cannot hold"):
        capacity_assign(dist, 1)
    # capacity forces token 1 away from its nearest centroid when centroid 0 is full
    assert capacity_assign(np.array([[0, 5], [1, 2], [0, 3]]), 2).tolist() == [0, 1, 0]
    p = clustering_precision(masks, cents, np.array([0, 0, 1, 1]))
    # hits: 2 + 2 + 2 + 1 = 7; centroid ones: 3 + 3 + 2 + 2 = 10; mask ones: 8
    assert p == {"precision": 0.7, "coverage": 7 / 8}
    assert binarise(np.array([0.5, 0.9, 0.1, 0.9]), 2).tolist() == [False, True, False, True]
    c, a = cluster_masks(masks, 2, density=2 / 6, capacity=1.0, iters=5, seed=0)
    assert c.sum(axis=1).tolist() == [2, 2]                                # re-binarised at the density quantile
    assert sorted(np.bincount(a, minlength=2).tolist()) == [2, 2]          # capacity respected
    assert {tuple(np.flatnonzero(row)) for row in c} <= {(0, 1), (0, 2), (3, 4), (3, 5), (1, 2), (4, 5)}


def test_cluster_method_reports_precision_and_oracle_bound():
    w = toy_model()
    cal = calib(w, tokens=200)
    co = make_method("cluster-oracle", {"clusters": "4"})
    co.prepare(w, cal, 0.6)
    for x in cal.xs[0][:20]:
        plan = co.select(layer_input(w, 0, x))
        assert plan.skip_rows.sum() == 96 - round(0.4 * 96)
    s = co.extra_stats()
    assert s["clusters"] == 4 and 0 < s["calibration_clustering_precision"] <= 1
    assert 0 < s["online_clustering_precision"] <= 1 and co.bound
    c = make_method("cluster", {"clusters": "4"})
    c.prepare(w, cal, 0.6)
    assert c.cost(w.shape).ops == 96 * 2 + 4 * 3 and not c.bound


def test_wisparse_allocation_and_split():
    assert split(0.5, 0.1) == pytest.approx((0.6, 0.3)) and split(0.9, 0.15) is None
    grid = np.round(np.arange(0.0, 0.951, 0.05), 3)
    # layer 0 is cheap to sparsify, layer 1 expensive: the search moves budget to layer 0
    curves = np.stack([grid ** 2 * 0.1, grid ** 2 * 10.0])
    s = evolve_allocation(curves, grid, 0.5, generations=60)
    assert s.mean() == pytest.approx(0.5) and s[0] > 0.8 and s[1] < 0.2
    w = toy_model(layers=2)
    cal = calib(w, tokens=300)
    ws = make_method("wisparse")
    ws.prepare(w, cal, 0.5)
    assert np.mean(ws.allocation) == pytest.approx(0.5)
    held = np.random.default_rng(11).standard_normal((100, 64)).astype(F32)
    sp = np.mean([run(ws, w, x, i=i, target=0.5)[1].sparsity for x in held for i in range(2)])
    assert abs(sp - 0.5) < 0.05
    info = ws.describe()["params"]
    assert len(info["layer_sparsity"]) == 2 and all(a in (0.0, 0.5, 1.0) for a in info["layer_exponent"])


def test_channel_plan_bytes_follow_the_axis():
    w = toy_model()
    x = np.random.default_rng(1).standard_normal(64).astype(F32)
    keep = np.zeros(64, bool)
    keep[:16] = True
    inp = layer_input(w, 0, x)
    out, tr = run_mlp(Plan(x_keep=keep, h_threshold=-1.0), inp, 0.5, "t", "channels")
    lw = w.layers[0]
    xk = np.where(keep, x, 0).astype(F32)
    expect = lw.down @ (np.maximum(xk @ lw.gate.T, 0) * (xk @ lw.up.T))
    assert np.allclose(out, expect, atol=1e-5)
    assert tr.x_kept == 16 and tr.macs["gate"] == tr.rows["gate"] * 16 and tr.sparsity == pytest.approx(2 * 0.75 / 3)


def test_method_latency_reproduces_the_sparseinfer_model():
    """The generic per-method ops give latency.py's SparseInfer+AS for the sign predictor's rows."""
    from sparseinfer.reference.shapes import BUILTIN_MODELS

    m = BUILTIN_MODELS["prosparse-llama2-7b"]
    hw = load_hardware("jetson-orin-agx")
    si = make_method("sparseinfer")
    pred, union = 0.88, 0.9
    rows = [{"gate": m.k * (1 - pred), "up": m.k * (1 - union), "down": m.k * (1 - union), "x_cols": m.d}] * m.num_layers
    ours = method_latency(m, hw, si.cost(m), rows, False)
    theirs = lat.method_latency(m, hw, "SparseInfer+AS", [LayerSparsity(pred, union)] * m.num_layers).total_us
    assert ours == pytest.approx(theirs, rel=1e-12)
    dv = make_method("dejavu", {"rank": "1024"})
    rows = [{"gate": m.k * (1 - pred), "up": m.k * (1 - pred), "down": m.k * (1 - pred), "x_cols": m.d}] * m.num_layers
    ours = method_latency(m, hw, dv.cost(m), rows, False)
    theirs = lat.method_latency(m, hw, "PowerInfer", [LayerSparsity(pred, pred)] * m.num_layers, rank=1024).total_us
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_registry_and_parsing_errors():
    assert set(METHODS) >= {"sparseinfer", "oracle", "random", "dejavu", "teal", "cats", "wisparse", "cluster"}
    for cls in METHODS.values():
        assert cls.paper and cls.__doc__ and cls.axis in ("rows", "channels")
    assert parse_method_list("teal, cats") == ["teal", "cats"]
    with pytest.raises(SparseInferError, match="unknown method 'bogus'"):
        parse_method_list("teal,bogus")
    with pytest.raises(SparseInferError, match="twice"):
        parse_method_list("teal,teal")
    assert parse_param_options(["dejavu.rank=8", "sparseinfer.alpha=1.03@0-19,1.00"]) == {
        "dejavu": {"rank": "8"}, "sparseinfer": {"alpha": "1.03@0-19,1.00"}}
    with pytest.raises(SparseInferError, match="METHOD.KEY=VALUE"):
        parse_param_options(["rank=8"])
    with pytest.raises(SparseInferError, match="unknown parameter 'depth'"):
        make_method("dejavu", {"depth": "2"})
    with pytest.raises(SparseInferError, match="rank='0': rank must be >= 1"):
        make_method("dejavu", {"rank": "0"})
    for bad in ("1", "1.5", "-0.1", "nan", "x"):
        with pytest.raises(SparseInferError):
            check_sparsity(bad)
    assert parse_sparsities("0.5,0.7,0") == [0.5, 0.7, 0.0]
    assert smallest_rows(np.array([[3.0, 1.0, 2.0, 0.5]]), 0.5).tolist() == [[False, True, False, True]]
    with pytest.raises(SparseInferError, match="needs calibration"):
        make_method("teal").prepare(toy_model(), None, 0.5)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_gelu_models_the_thresholding_methods_and_the_approximate_sign_predictor(act):
    """On a GELU model, as on SiLU: teal, cats and wisparse calibrate to their target on
    held-out inputs; the sign predictor needs approximate=True, then skips exactly the
    reference's predicted rows and computes up and down for every other row (no exact zeros)."""
    w = toy_model(d=128, k=192, layers=2, act=act)
    cal = calib(w, tokens=800, seed=4)
    held = np.random.default_rng(12).standard_normal((200, 128)).astype(F32)
    for name, tol in (("teal", 0.02), ("cats", 0.03), ("wisparse", 0.05)):
        m = make_method(name)
        m.prepare(w, cal, 0.6)
        sp = np.mean([run(m, w, x, i=i, target=0.6)[1].sparsity for x in held[:60] for i in range(2)])
        assert abs(sp - 0.6) < tol, (name, sp)
    with pytest.raises(SparseInferError, match="--approximate"):
        make_method("sparseinfer").prepare(w, None, 0.5)
    si = make_method("sparseinfer", approximate=True)
    si.prepare(w, None, 0.5)
    x = held[0]
    out, tr = run(si, w, x, target=0.5)
    lw = w.layers[0]
    want, ref = mlp_sparse(x, lw.gate, lw.up, lw.down, act, alpha=si.alpha_milli[0] / 1000, approximate=True)
    assert np.array_equal(tr.predicted_zero, ref.predicted_zero) and 0 < tr.predicted_zero.mean() < 1
    assert tr.rows["up"] == int((~tr.predicted_zero).sum())
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
