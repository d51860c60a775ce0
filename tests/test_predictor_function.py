"""The --target cpu predictor body (SignPack + PredictZeroRows, standard ops only) on
adversarial sign patterns: its masks equal the reference's at every alpha boundary.

The function exposes only the mask, so the counts are pinned down by sweeping alpha over
the boundaries floor(1000 n / (d - n)) of every count n the reference sees: with d = 165
consecutive boundaries are > 6 apart, so any count off by one flips some mask. Larger d
(several groups of GROUP_WORDS words summed lane-wise, up to the largest supported d, where
the 16-bit lanes come closest to overflowing) are checked at the boundaries of the extreme
counts and a spread of alphas.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import pytest

from sparseinfer.model_export.mlp_functions import (GROUP_WORDS, MAX_GROUPS, WORD_BITS, pack_sign_words64,
                                                    sparse_mlp_function, words_per_row64)
from sparseinfer.model_export.op_library import DOMAIN, OP_TYPE
from sparseinfer.reference.activations import Activation
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.model_export.onnx_builder import IR_VERSION, OPSET
from sparseinfer.reference import pack_signs, predict_zero_rows as reference_predict

D = 165          # three uint64 words, the last one partly padding
D_MAX = MAX_GROUPS * GROUP_WORDS * WORD_BITS


def _adversarial_rows(d: int) -> np.ndarray:
    """Rows of W_gate: all negative, all positive, single negatives at word edges, patterns."""
    rows = [np.full(d, -1.0), np.full(d, 1.0), np.where(np.arange(d) % 2, -1.0, 1.0),
            np.where(np.arange(d) >= d // 2, -1.0, 1.0), np.where(np.arange(d) < 64, -1.0, 1.0)]
    for j in (0, 1, 31, 32, 62, 63, 64, 127, 128, d - 1):
        one = np.ones(d)
        one[j] = -1.0
        rows += [one, -one]                        # a single negative, a single positive
    rng = np.random.default_rng(5)
    rows += [np.where(rng.random(d) < p, -1.0, 1.0) for p in (0.1, 0.5, 0.9)]
    return np.array(rows, dtype=np.float32) * rng.uniform(0.5, 2.0, size=(len(rows), d)).astype(np.float32)


def _session(w: np.ndarray, alpha_milli: int, d: int = D):
    """The export's SparseMLP function body alone (no op library), its predicted_zero output."""
    k = w.shape[0]
    zeros = np.zeros((k, d), np.float32)
    names = ["out", "zero", "computed", "actual_zero"]
    node = helper.make_node(OP_TYPE, ["x", "w_gate", "w_up", "w_down_t", "w_words"], names, domain=DOMAIN,
                            alpha_milli=alpha_milli, activation="relu", threshold=0.0)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w, "w_gate"), (zeros, "w_up"), (zeros, "w_down_t"),
                                                        (pack_sign_words64(w), "w_words"))]
    graph = helper.make_graph([node], "predictor", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])],
                              [helper.make_tensor_value_info("zero", TensorProto.BOOL, [k])], initializer=inits)
    graph.output.extend([helper.make_tensor_value_info(n, t, None) for n, t in
                         (("out", TensorProto.FLOAT), ("computed", TensorProto.BOOL), ("actual_zero", TensorProto.BOOL))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
                              functions=[sparse_mlp_function(d, k, Activation.parse("relu"), "cpu", debug=True)])
    model.ir_version = IR_VERSION
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_cpu_predictor_counts_exactly_on_adversarial_words():
    w = _adversarial_rows(D)
    w_signs = pack_signs(w)
    xs = [np.full(D, -0.5), np.full(D, 0.5), np.where(np.arange(D) % 3 == 0, -1.0, 1.0),
          np.random.default_rng(9).standard_normal(D)]
    counts = {int(n) for x in xs for n in np.bitwise_count(w_signs ^ pack_signs(np.asarray(x, np.float32))).sum(-1)}
    assert {0, 1, D - 1, D} <= counts and len(counts) > 20          # the extremes and many in between
    alphas = sorted({max(1, 1000 * n // (D - n)) for n in counts if n < D} | {1000})
    checked = 0
    for alpha in alphas:
        session = _session(w, alpha)
        for x in xs:
            x = np.asarray(x, np.float32)
            got = session.run(None, {"x": x[None]})[0]
            want = reference_predict(w_signs, pack_signs(x), D, alpha / 1000)
            np.testing.assert_array_equal(got, want, err_msg=f"alpha_milli={alpha}")
            checked += int(want.any() and not want.all())
    assert checked > len(alphas)                     # most sweeps split rows into zero and kept


@pytest.mark.parametrize("d", [1024 + 1, 4096, 5120, D_MAX])
def test_cpu_predictor_exact_with_several_word_groups(d):
    assert words_per_row64(d) % GROUP_WORDS == 0 and words_per_row64(d) >= -(-d // WORD_BITS)
    w = _adversarial_rows(d)
    w_signs = pack_signs(w)
    xs = [np.full(d, -0.5), np.full(d, 0.5), np.random.default_rng(d).standard_normal(d)]
    counts = sorted({int(n) for x in xs for n in np.bitwise_count(w_signs ^ pack_signs(np.asarray(x, np.float32))).sum(-1)})
    assert counts[0] == 0 and counts[-1] == d                  # all-equal and all-opposite rows
    alphas = {max(1, 1000 * n // (d - n)) for n in counts if 0 < n < d and (n < 3 or n > d - 3)}
    alphas |= {1, 500, 970, 1000, 1030, 2000, 1000 * d}
    for alpha in sorted(alphas):
        session = _session(w, alpha, d)
        for x in xs:
            x = np.asarray(x, np.float32)
            want = reference_predict(w_signs, pack_signs(x), d, alpha / 1000)
            np.testing.assert_array_equal(session.run(None, {"x": x[None]})[0], want, err_msg=f"d={d} alpha={alpha}")


def test_cpu_predictor_rejects_too_large_hidden_size():
    with pytest.raises(SparseInferError, match="too large for the cpu predictor"):
        words_per_row64(D_MAX + 1)
