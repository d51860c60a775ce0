"""SiLU and the GELUs (reference/activations.py): the float32 algorithm against float64, the
kernels' and the op library's copies of it, the ONNX bodies' library evaluation within
``Activation.error_bound``, Hugging Face names, and every CUDA pipeline (on a GPU, and on the
emulator) bit for bit against the reference with predicted-negative rows skipped
(``approximate``)."""
from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sparseinfer.model_export.loaders import load_checkpoint
from sparseinfer.model_export.loaders.config import check_config
from sparseinfer.model_export.mlp_functions import apply_activation
from sparseinfer.model_export.onnx_builder import FLOAT, IR_VERSION, OPSET, GraphBuilder
from sparseinfer.model_export.synthetic import make_checkpoint, make_weights, synthetic_shape
from sparseinfer.reference import mlp_dense, mlp_sparse
from sparseinfer.reference.activations import (APPROXIMATE_KINDS, ERF_CONSTANTS, KINDS, OWN_ERROR_UNITS,
                                               SUBNORMAL_ERROR, U, Activation, exp_nonpositive, recip)
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.llama import LlamaReference
from sparseinfer.reference.shapes import activation_from_config

from helpers import ACTIVATION_MAX_SLOPE

ROOT = Path(__file__).resolve().parents[1]
ACTIVATION_HEADER = ROOT / "kernels" / "cuda" / "activation.h"      # the kernels' and the op library's


def _exact(kind: str, z: np.ndarray) -> np.ndarray:
    """float64 values (sigmoid forms written so that nothing cancels or overflows)."""
    def z_sigmoid(y):
        e = np.exp(-np.abs(y))
        return np.where(y >= 0, z / (1 + e), z * e / (1 + e))
    if kind == "silu":
        return z_sigmoid(z)
    if kind == "gelu_tanh":
        return z_sigmoid(2 * math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3))
    return 0.5 * z * np.vectorize(math.erfc)(-z / math.sqrt(2))


def _sample_z() -> np.ndarray:
    rng = np.random.default_rng(0)
    edges = np.array([0.75, 2.5, 10.1]) * math.sqrt(2)                       # gelu's branch ends in z
    near = np.concatenate([e + np.arange(-300, 300) * 2.0 ** -20 for e in (*edges, 104.0)])
    return np.concatenate([rng.uniform(-20, 20, 200_000), 3 * rng.standard_normal(100_000), near, -near,
                           np.exp(rng.uniform(-100, 4.7, 50_000)), -np.exp(rng.uniform(-100, 4.7, 50_000)),
                           [0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 120.0, -120.0]]).astype(np.float32)


@pytest.mark.parametrize("kind", APPROXIMATE_KINDS)
def test_the_float32_algorithm_is_within_its_bound_of_float64(kind):
    z = _sample_z()
    z64 = z.astype(np.float64)
    with np.errstate(over="ignore"):
        exact = _exact(kind, z64)
    got = Activation.parse(kind)(z).astype(np.float64)
    err = np.abs(got - exact)
    bound = OWN_ERROR_UNITS * U * np.abs(z64) + SUBNORMAL_ERROR
    assert (err <= bound).all(), f"{kind}: {int((err > bound).sum())} past, worst z {z[np.argmax(err / bound)]}"
    assert (err / bound).max() > 0.25                 # the bound is not loose by orders of magnitude
    assert (np.signbit(got) == np.signbit(z)).all()   # the sign of the gate survives (actual_zero reads it)
    v = np.abs(z64) / math.sqrt(2)
    for lo, hi in ((0, 0.75), (0.75, 2.5), (2.5, 10.1), (10.1, np.inf)):  # every branch of gelu met
        assert ((v >= lo) & (v < hi) & (z < 0)).sum() > 100 and ((v >= lo) & (v < hi) & (z > 0)).sum() > 100


def test_exp_and_the_reciprocal_are_within_two_ulp():
    x = -np.concatenate([np.linspace(0, 87, 300_001), np.exp(np.linspace(-30, 4.4, 10_001))]).astype(np.float32)
    got, want = exp_nonpositive(x).astype(np.float64), np.exp(x.astype(np.float64))
    assert (np.abs(got - want) <= 2 * U * want).all() and exp_nonpositive(np.float32([0.0]))[0] == 1.0
    tiny = exp_nonpositive(np.float32([-100.0, -103.0, -104.5, -np.inf]))     # subnormal, then 0
    assert tiny[0] > 0 and tiny[1] > 0 and tiny[2] == 0 and tiny[3] == 0
    w = np.linspace(0.5, 2.6, 200_001).astype(np.float32)
    r = recip(w).astype(np.float64)
    assert (np.abs(r - 1 / w.astype(np.float64)) <= 2 * U * r).all()


def test_the_largest_slope_is_below_the_bounds_constant():
    z = np.linspace(-8, 8, 160_001)
    for kind in APPROXIMATE_KINDS:
        slope = np.abs(np.diff(_exact(kind, z)) / np.diff(z))
        assert 1.09 < slope.max() < ACTIVATION_MAX_SLOPE, kind


@pytest.mark.parametrize("kind", APPROXIMATE_KINDS)
def test_the_onnx_body_activation_is_within_error_bound(kind):
    """apply_activation (the bodies' Sigmoid / Erf on onnxruntime's CPU provider) against the
    reference within Activation.error_bound, which is tight enough to tell the GELUs apart."""
    act = Activation.parse(kind)
    b = GraphBuilder()
    b.add_input("z", FLOAT, ["n"])
    b.nodes.append(onnx.helper.make_node("Identity", [apply_activation(b, "z", act, "act")], ["h1"]))
    b.add_output("h1", FLOAT, ["n"])
    model = onnx.helper.make_model(b.make_graph("act"), opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    z = _sample_z()
    got = session.run(None, {"z": z})[0].astype(np.float64)
    want = act(z).astype(np.float64)
    bound = act.error_bound(z)
    assert (np.abs(got - want) <= bound).all(), f"worst z {z[np.argmax(np.abs(got - want) / bound)]}"
    other = Activation.parse("gelu_tanh" if kind == "gelu" else "gelu")
    assert (np.abs(other(z).astype(np.float64) - want) > bound).sum() > 1000       # the bound tells them apart


def test_kind_codes_and_constants_are_the_kernels():
    """The codes are KINDS' indices, and the polynomial coefficients of the kernels' and the op
    library's one C/C++ text (kernels/cuda/activation.h; its codes and values compiled:
    tests/test_activation_header.py) are reference/activations.py's."""
    assert [Activation(k).code for k in KINDS] == list(range(len(KINDS)))
    text = ACTIVATION_HEADER.read_text()
    enum = re.search(r"enum ActivationKind \{([^}]*)\}", text).group(1)
    codes = dict(re.findall(r"ACT_(\w+) = (\d+)", enum))
    assert {name.lower(): int(code) for name, code in codes.items()} == {k: i for i, k in enumerate(KINDS)}
    for name, key in (("erf_a", "A"), ("erfc_b", "B"), ("erfc_c", "C")):
        body = re.search(name + r"\[\d+\] = \{([^}]*)\}", text).group(1)
        values = np.float32([float(v.strip().rstrip("f")) for v in body.split(",")])
        assert np.array_equal(values, np.float32(ERF_CONSTANTS[key])), name


def test_hugging_face_names_and_the_loaders(tmp_path):
    assert Activation.parse("gelu_pytorch_tanh") == Activation.parse("GELU_NEW") == Activation("gelu_tanh")
    assert Activation.parse("gelu_tanh").hf_name == "gelu_pytorch_tanh" and Activation.parse("gelu").hf_name == "gelu"
    assert activation_from_config({"hidden_act": "gelu_pytorch_tanh"}) == "gelu_tanh"
    for act, hf in (("gelu", "gelu"), ("gelu_tanh", "gelu_pytorch_tanh")):
        path = make_checkpoint("tiny", tmp_path / act, layers=1, hidden_act=act, target_sparsity=0.0)
        assert json.loads((path / "config.json").read_text())["hidden_act"] == hf
        ck = load_checkpoint(path)
        assert ck.shape.hidden_act == act and ck.weights.activation == Activation(act)
    cfg = json.loads((tmp_path / "gelu" / "config.json").read_text())
    with pytest.raises(SparseInferError, match="unsupported hidden_act 'quick_gelu'; supported: relu, fatrelu, silu, "
                                               "gelu, gelu_tanh, gelu_pytorch_tanh, gelu_new"):
        check_config({**cfg, "hidden_act": "quick_gelu"}, "config.json")
    with pytest.raises(SparseInferError, match="expected relu, fatrelu:THRESHOLD, silu, gelu, gelu_tanh"):
        Activation.parse("swish")
    with pytest.raises(SparseInferError, match="activation gelu takes no threshold"):
        Activation.parse("gelu:0.1")


def test_the_reference_model_runs_gelu_and_sparse_needs_approximate():
    w = make_weights(synthetic_shape("tiny", layers=2, hidden_act="gelu"), seed=3)
    logits = LlamaReference(w).prefill([256, 84, 104, 101])
    tanh = make_weights(synthetic_shape("tiny", layers=2, hidden_act="gelu_tanh"), seed=3)
    other = LlamaReference(tanh).prefill([256, 84, 104, 101])
    assert np.isfinite(logits).all() and 0 < np.abs(logits - other).max() < 0.05 * np.abs(logits).max()
    rng = np.random.default_rng(1)
    x = rng.standard_normal(64).astype(np.float32)
    wg, wu, wd = (rng.standard_normal(s).astype(np.float32) for s in ((96, 64), (96, 64), (64, 96)))
    with pytest.raises(SparseInferError, match="activation gelu has no exact zeros"):
        mlp_sparse(x, wg, wu, wd, "gelu")
    out, trace = mlp_sparse(x, wg, wu, wd, "gelu", approximate=True)
    z = wg.astype(np.float64) @ x
    assert np.array_equal(trace.actual_zero, z < 0) and trace.predicted_zero.any()
    dense = mlp_dense(x, wg, wu, wd, "gelu")
    kept = trace.computed_up
    np.testing.assert_allclose(out, wd[:, kept] @ (Activation("gelu")(z[kept]) * (wu[kept] @ x)), rtol=1e-4,
                               atol=1e-3)
    assert not np.array_equal(out, dense)


@pytest.fixture(scope="module", params=[pytest.param("gpu", marks=pytest.mark.gpu),
                                        pytest.param("emulated", marks=pytest.mark.emulated)])
def backend(request):
    """gpu: skipped by conftest where there is no device; emulated: the kernels on the CPU."""
    from sparseinfer.kernels import emulator
    with emulator.installed() if request.param == "emulated" else contextlib.nullcontext():
        yield request.param


@pytest.mark.parametrize("kind", APPROXIMATE_KINDS)
def test_every_pipeline_equals_the_reference_bit_for_bit(backend, kind):
    """SparseMLP(approximate=True): predicted-negative rows skipped, the rest with the
    reference's activation bits; every deterministic sparse pipeline's output, masks and
    actual_zero (the gate's sign) equal mlp_sparse's, the dense pipeline mlp_dense's, and
    without approximate the activation is refused."""
    from sparseinfer.kernels import PIPELINES, SparseMLP
    from sparseinfer.kernels.expected import same_bits

    rng = np.random.default_rng(5)
    d, k = 97, 600
    x = rng.standard_normal(d).astype(np.float32)
    wg = (0.9 * rng.standard_normal((k, d))).astype(np.float32)          # gates to +-35: every branch
    wu = rng.standard_normal((k, d)).astype(np.float32)
    wd = (0.1 * rng.standard_normal((d, k))).astype(np.float32)
    want, trace = mlp_sparse(x, wg, wu, wd, kind, alpha=1.0, approximate=True)
    z = wg.astype(np.float64) @ x
    assert 0.3 < trace.predicted_zero.mean() < 0.7 and (z[~trace.predicted_zero] < -15).any()
    with pytest.raises(SparseInferError, match=f"activation {kind} has no exact zeros"):
        SparseMLP(wg, wu, wd, kind)
    layer = SparseMLP(wg, wu, wd, kind, approximate=True)
    checked = []
    for name, pipe in PIPELINES.items():
        if not pipe.deterministic:
            continue
        mlp = layer.with_pipeline(name)
        if not pipe.sparse:
            assert same_bits(mlp(x).get(), mlp_dense(x, wg, wu, wd, kind)), name
            continue
        out, got = mlp(x, trace=True)
        assert same_bits(out.get(), want), name
        for mask in ("predicted_zero", "actual_zero", "computed_up"):
            assert np.array_equal(getattr(got, mask), getattr(trace, mask)), (name, mask)
        checked.append(name)
    assert {"sparse-batched", "sparse-paired", "fused"} <= set(checked)
