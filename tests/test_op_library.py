"""The native op library (model_export/native, op_library.py): its CPU kernel against the
reference bit for bit, errors that come back as errors, and sparse exports in plain
onnxruntime sessions, with and without the library."""
from __future__ import annotations

import ctypes
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from sparseinfer.model_export import op_library
from sparseinfer.model_export.decode import OnnxDecoder
from sparseinfer.model_export.export import ExportOptions, export_onnx
from sparseinfer.model_export.generation import generate
from sparseinfer.model_export.mlp_functions import DEBUG_OUTPUTS, pack_sign_words64, sparse_mlp_function
from sparseinfer.model_export.onnx_builder import IR_VERSION, OPSET
from sparseinfer.model_export.op_library import DOMAIN, OP_TYPE
from sparseinfer.model_export.session import make_session, resolve_mlp_kernels
from sparseinfer.model_export.synthetic import make_weights, synthetic_shape
from sparseinfer.reference import mlp_dense, mlp_sparse
from sparseinfer.reference.activations import APPROXIMATE_KINDS, Activation
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.signs import words_per_row

from helpers import approximate_mlp_bound, computed_rows_agree

pytestmark = pytest.mark.native

PROMPT = [256, 84, 104, 101, 32, 113, 117, 105, 99, 107]
GAMMA_K = 552 * 2.0 ** -24          # the tiny shape's longest dot product (see test_export_onnx)


def _mlp_model(w_gate, w_up, w_down_t, signs, alpha_milli, act: Activation, outputs=1, function=False, **attrs):
    """One SparseMLP node over initializers; ``function``: carry the export's body too;
    ``attrs``: more node attributes (weight_format, down_format, dense)."""
    names = ["out", *DEBUG_OUTPUTS][:outputs]
    k, d = w_gate.shape
    node = helper.make_node(OP_TYPE, ["x", "w_gate", "w_up", "w_down_t", "w_signs"], names, domain=DOMAIN,
                            name="layer/SparseMLP", alpha_milli=alpha_milli, activation=act.kind,
                            threshold=float(act.threshold), **attrs)
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w_gate, "w_gate"), (w_up, "w_up"), (w_down_t, "w_down_t"), (signs, "w_signs"))]
    kinds = [TensorProto.FLOAT] + [TensorProto.BOOL] * 3
    graph = helper.make_graph([node], "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, kinds)], inits)
    functions = [sparse_mlp_function(d, k, act, "cpu", debug=outputs > 1)] if function else []
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
                              functions=functions)
    model.ir_version = IR_VERSION
    return model


def _session(model, library=True, threads=2):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if library:
        opts.register_custom_ops_library(str(op_library.cpu_library()))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def _layer(rng, d, k, zeros_in_x=0):
    w_gate, w_up = (rng.standard_normal((k, d), dtype=np.float32) for _ in range(2))
    w_down = rng.standard_normal((d, k), dtype=np.float32)
    x = rng.standard_normal(d).astype(np.float32)
    if zeros_in_x:                         # exact +0.0 and -0.0 entries: both pack as positive signs
        idx = rng.choice(d, size=min(zeros_in_x, d), replace=False)
        x[idx] = np.where(np.arange(idx.size) % 2, np.float32(-0.0), np.float32(0.0))
    return w_gate, w_up, w_down, x


def test_library_builds_and_reports_itself():
    built = op_library.build(cuda=False)
    assert built.cpu.is_file() and built.cuda is None and built.reason
    assert built.onnxruntime_api == 18 and built.headers_api >= 18
    lib = ctypes.CDLL(str(built.cpu))
    assert lib.sparseinfer_ops_has_cuda() == 0
    assert op_library.build(cuda=False).cpu == built.cpu          # cached: the same file


@settings(max_examples=25, deadline=None)
@given(d=st.one_of(st.integers(1, 300), st.sampled_from([128, 256, 384])),   # whole iterations: rows side by side
       k=st.integers(1, 1100), alpha_milli=st.integers(600, 1400),
       act=st.sampled_from(["relu", "fatrelu:0.05", "fatrelu:-0.5"]), zeros=st.integers(0, 5),
       padded=st.booleans(), dtype=st.sampled_from([np.float32, np.float16]), seed=st.integers(0, 2**31 - 1))
def test_cpu_op_equals_the_reference_bit_for_bit(d, k, alpha_milli, act, zeros, padded, dtype, seed):
    """fp32 and fp16 weights (widened exactly, float32 accumulation in the contract's order)."""
    rng = np.random.default_rng(seed)
    w_gate, w_up, w_down, x = _layer(rng, d, k, zeros)
    w_gate, w_up, w_down = (w.astype(dtype) for w in (w_gate, w_up, w_down))
    act = Activation.parse(act)
    if padded:                  # the exports' words: uint64, padded to whole groups
        signs = pack_sign_words64(w_gate)
    else:                       # just ceil(d / 64) words
        signs = pack_sign_words64(w_gate)[:, :-(-d // 64)].copy()
    session = _session(_mlp_model(w_gate, w_up, np.ascontiguousarray(w_down.T), signs, alpha_milli, act, outputs=4))
    out, predicted, computed, actual = session.run(None, {"x": x[None]})
    want, trace = mlp_sparse(x, w_gate, w_up, w_down, act, alpha=alpha_milli / 1000)
    assert out.shape == (1, d) and predicted.shape == (k,)
    assert np.array_equal(_bits(out[0]), _bits(want))
    assert np.array_equal(predicted, trace.predicted_zero)
    assert np.array_equal(computed, trace.computed_up)
    assert np.array_equal(actual, trace.actual_zero)


@settings(max_examples=10, deadline=None)
@given(d=st.one_of(st.integers(1, 200), st.sampled_from([128, 256])), k=st.integers(1, 700),
       tokens=st.one_of(st.integers(2, 4), st.integers(15, 35)),          # one group of tokens, or several
       act=st.sampled_from(["relu", "fatrelu:0.05"]), dtype=st.sampled_from([np.float32, np.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_several_tokens_run_the_dense_mlp_bit_for_bit(d, k, tokens, act, dtype, seed):
    rng = np.random.default_rng(seed)
    w_gate, w_up, w_down, _ = _layer(rng, d, k)
    w_gate, w_up, w_down = (w.astype(dtype) for w in (w_gate, w_up, w_down))
    xs = rng.standard_normal((1, tokens, d)).astype(np.float32)
    session = _session(_mlp_model(w_gate, w_up, np.ascontiguousarray(w_down.T), pack_sign_words64(w_gate), 1000,
                                  Activation.parse(act), outputs=2))
    out, predicted = session.run(None, {"x": xs})
    assert out.shape == xs.shape and predicted.shape == (0,)
    for t in range(tokens):
        assert np.array_equal(_bits(out[0, t]), _bits(mlp_dense(xs[0, t], w_gate, w_up, w_down, act)))


def test_prefill_tokens_whose_chunks_are_all_zero_skip_them_as_the_reference_does():
    """Rows 512-1023 of W_gate (the down projection's second chunk) are one vector v, so a token
    with v . x <= 0 has that whole chunk zero and one with v . x > 0 has it live; the down
    projection of tokens in groups must still add each token's chunks exactly as mlp_dense does."""
    rng = np.random.default_rng(5)
    d, k, tokens = 64, 1100, 21                    # three chunks; groups of 16 and 5 tokens
    w_gate, w_up, w_down, _ = _layer(rng, d, k)
    v = rng.standard_normal(d).astype(np.float32)
    w_gate[512:1024] = v
    xs = rng.standard_normal((1, tokens, d)).astype(np.float32)
    xs[0, ::2] *= np.sign(xs[0, ::2] @ v)[:, None]            # even tokens: v . x > 0, odd ones: random
    xs[0, 1::4] *= -np.sign(xs[0, 1::4] @ v)[:, None]         # and some with v . x < 0
    live = xs[0] @ v > 0
    assert live.any() and not live.all()
    session = _session(_mlp_model(w_gate, w_up, np.ascontiguousarray(w_down.T), pack_sign_words64(w_gate), 1000,
                                  Activation.parse("relu")))
    (out,) = session.run(None, {"x": xs})
    for t in range(tokens):
        assert np.array_equal(_bits(out[0, t]), _bits(mlp_dense(xs[0, t], w_gate, w_up, w_down, "relu"))), t


def test_edges_exactly_at_the_fatrelu_threshold_and_signed_zeros():
    """Gate products landing exactly on the threshold (kept: z >= T) and on +-0.0 (dropped)."""
    d, k = 64, 6
    x = np.zeros(d, np.float32)
    x[0], x[1] = 1.0, -0.0
    w_gate = np.zeros((k, d), np.float32)
    w_gate[:, 0] = [0.25, 0.25 - 2**-20, 0.0, -0.0, 1.0, -1.0]      # z = the first column exactly
    w_up = np.ones((k, d), np.float32)
    w_down = np.arange(1, d * k + 1, dtype=np.float32).reshape(d, k) / 7
    for act, kept in ((Activation.parse("fatrelu:0.25"), [0, 4]), (Activation.parse("relu"), [0, 1, 4])):
        session = _session(_mlp_model(w_gate, w_up, np.ascontiguousarray(w_down.T), pack_sign_words64(w_gate), 5000,
                                      act, outputs=4))
        out, predicted, computed, actual = session.run(None, {"x": x[None]})
        want, trace = mlp_sparse(x, w_gate, w_up, w_down, act, alpha=5.0)
        assert not predicted.any()                       # alpha 5: nothing is predicted zero here
        assert np.flatnonzero(computed).tolist() == kept
        assert np.array_equal(actual, trace.actual_zero) and np.array_equal(_bits(out[0]), _bits(want))


def test_results_do_not_depend_on_the_thread_count():
    rng = np.random.default_rng(3)
    w_gate, w_up, w_down, x = _layer(rng, 300, 2100)
    model = _mlp_model(w_gate, w_up, np.ascontiguousarray(w_down.T), pack_sign_words64(w_gate), 950,
                       Activation.parse("relu"))
    one, two = (_session(model, threads=t).run(None, {"x": x[None]})[0] for t in (1, 2))
    assert np.array_equal(_bits(one), _bits(two))
    assert 0 < np.count_nonzero(one)


def test_the_library_kernel_overrides_the_function_body_with_the_same_masks():
    rng = np.random.default_rng(11)
    w_gate, w_up, w_down, x = _layer(rng, 200, 900)
    model = _mlp_model(w_gate, w_up, np.ascontiguousarray(w_down.T), pack_sign_words64(w_gate), 980,
                       Activation.parse("relu"), outputs=4, function=True)
    native = _session(model).run(None, {"x": x[None]})
    body = _session(model, library=False).run(None, {"x": x[None]})
    _, trace = mlp_sparse(x, w_gate, w_up, w_down, "relu", alpha=0.98)
    for got in (native, body):
        assert np.array_equal(got[1], trace.predicted_zero) and np.array_equal(got[2], trace.computed_up)
    assert np.array_equal(_bits(native[0][0]), _bits(mlp_sparse(x, w_gate, w_up, w_down, "relu", alpha=0.98)[0]))
    # the body multiplies in MLAS's order, not the contract's: equal within a rounding bound
    np.testing.assert_allclose(body[0], native[0], rtol=0, atol=1e-4 * float(np.abs(native[0]).max()))


@pytest.mark.parametrize("case,feed,message", [
    ("nan", None, "x contains NaN at index 7"),
    ("shape", None, "x has shape [1, 99]; its last axis must be d = 100"),
])
def test_bad_inputs_come_back_as_errors_naming_the_node(case, feed, message):
    rng = np.random.default_rng(0)
    w_gate, w_up, w_down, x = _layer(rng, 100, 40)
    session = _session(_mlp_model(w_gate, w_up, np.ascontiguousarray(w_down.T), pack_sign_words64(w_gate), 1000,
                                  Activation.parse("relu")))
    if case == "nan":
        x[7] = np.nan
    else:
        x = x[:99]
    with pytest.raises(Exception, match="SparseMLP node 'layer/SparseMLP'") as e:
        session.run(None, {"x": x[None]})
    assert message in str(e.value)
    assert session.run(None, {"x": rng.standard_normal((1, 100)).astype(np.float32)})[0].shape == (1, 100)


def test_mismatched_weights_and_bad_attributes_are_refused():
    rng = np.random.default_rng(0)
    w_gate, w_up, w_down, x = _layer(rng, 100, 40)
    mixed = _mlp_model(w_gate, w_up.astype(np.float16), np.ascontiguousarray(w_down.T), pack_sign_words64(w_gate),
                       1000, Activation.parse("relu"))
    with pytest.raises(Exception, match="W_up has another element type than W_gate"):
        _session(mixed).run(None, {"x": x[None]})
    bad_up = _mlp_model(w_gate, w_up[:39], np.ascontiguousarray(w_down.T), pack_sign_words64(w_gate), 1000,
                        Activation.parse("relu"))
    with pytest.raises(Exception, match=r"W_up has shape \[39, 100\]; expected \[40, 100\]"):
        _session(bad_up).run(None, {"x": x[None]})
    swish = _mlp_model(w_gate, w_up, np.ascontiguousarray(w_down.T), pack_sign_words64(w_gate), 1000,
                       Activation.parse("relu"))
    next(a for a in swish.graph.node[0].attribute if a.name == "activation").s = b"swish"
    with pytest.raises(Exception, match="activation 'swish' is not supported; expected one of relu, fatrelu, silu, "
                                        "gelu, gelu_tanh"):
        _session(swish)


def test_an_error_in_the_op_does_not_abort_the_process(tmp_path):
    """A NaN reaching the op in a subprocess: a Python exception and exit 0, never an abort."""
    rng = np.random.default_rng(0)
    w_gate, w_up, w_down, _ = _layer(rng, 64, 32)
    path = tmp_path / "mlp.onnx"
    path.write_bytes(_mlp_model(w_gate, w_up, np.ascontiguousarray(w_down.T), pack_sign_words64(w_gate), 1000,
                                Activation.parse("relu")).SerializeToString())
    code = f"""
import numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.register_custom_ops_library({str(op_library.cpu_library())!r})
s = ort.InferenceSession({str(path)!r}, o, providers=["CPUExecutionProvider"])
try:
    s.run(None, {{"x": np.full((1, 64), np.nan, np.float32)}})
except Exception as e:
    print("raised:", "x contains NaN at index 0" in str(e))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "raised: True" in done.stdout, done.stderr[-500:]


# --- sparse exports ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sparse_export(tmp_path_factory):
    w = make_weights(synthetic_shape("tiny", layers=2), seed=7)
    path = export_onnx(w, tmp_path_factory.mktemp("native") / "m.onnx",
                       ExportOptions(sparse=True, alpha="1.01", debug=True))
    return w, path


def test_a_plain_session_with_only_the_library_runs_a_sparse_export(tmp_path):
    """No sparseinfer code at run time: register the library, session.run, prefill + one decode step
    (a --portable export: its KV cache grows by Concat, so plain session.run feeds it)."""
    w = make_weights(synthetic_shape("tiny", layers=2), seed=7)
    path = export_onnx(w, tmp_path / "m.onnx", ExportOptions(sparse=True, alpha="1.01", debug=True, portable=True))
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(op_library.cpu_library()))
    native = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])      # function bodies
    s = w.shape
    empty = np.zeros((1, s.num_kv_heads, 0, s.head_dim), np.float32)
    feeds = {"input_ids": np.array([PROMPT], np.int64), "attention_mask": np.ones((1, len(PROMPT)), np.int64),
             "position_ids": np.arange(len(PROMPT))[None]}
    feeds.update({f"past_key_values.{i}.{kv}": empty for i in range(s.num_layers) for kv in ("key", "value")})
    names = [o.name for o in native.get_outputs()]
    for step in range(2):
        a = dict(zip(names, native.run(None, feeds)))
        b = dict(zip(names, plain.run(None, feeds)))
        if step:                                               # a decode step: the same rows skipped
            for i in range(s.num_layers):
                for out in ("predicted_zero", "actual_zero", "rows"):
                    assert np.array_equal(a[f"debug.{i}.{out}"], b[f"debug.{i}.{out}"]), out
                assert 0 < a["debug.0.predicted_zero"].sum() < s.k
        np.testing.assert_allclose(a["logits"], b["logits"], rtol=0,
                                   atol=GAMMA_K * (1 + float(np.abs(b["logits"]).max())))
        n = feeds["attention_mask"].shape[1]
        feeds = {"input_ids": np.array([[int(np.argmax(a["logits"][0, -1]))]]),
                 "attention_mask": np.ones((1, n + 1), np.int64), "position_ids": np.array([[n]]),
                 **{f"past_key_values.{i}.{kv}": a[f"present.{i}.{kv}"] for i in range(s.num_layers)
                    for kv in ("key", "value")}}


def test_decoder_native_and_function_bodies_decode_the_same_tokens_and_count_rows(sparse_export):
    _, path = sparse_export
    native, function = OnnxDecoder(path, mlp_kernels="native"), OnnxDecoder(path, mlp_kernels="function")
    assert (native.mlp_kernels, function.mlp_kernels) == ("native", "function")
    a, b = generate(native, PROMPT, 8, keep_logits=True), generate(function, PROMPT, 8, keep_logits=True)
    assert a.tokens == b.tokens
    assert all(np.array_equal(x, y) for sa, sb in zip(a.predicted_zero, b.predicted_zero) for x, y in zip(sa, sb))
    counts = a.kernel_rows
    assert counts["decode_steps_counted"] == len(a.tokens) - 1
    assert counts["predicted_sparsity"] == pytest.approx(a.stats()["predicted_sparsity"])
    assert 0 < counts["rows_computed"] < 1 - counts["predicted_sparsity"]
    assert function.row_counts() is None


def test_resolve_mlp_kernels():
    assert resolve_mlp_kernels("auto", has_op=True, provider="cpu")[0] == "native"
    assert resolve_mlp_kernels("native", has_op=False, provider="cpu") == ("function", None)
    with pytest.raises(SparseInferError, match="unknown MLP kernels"):
        resolve_mlp_kernels("fast", has_op=True, provider="cpu")


def test_make_session_registers_the_library(sparse_export):
    _, path = sparse_export
    session = make_session(path, library=op_library.cpu_library())
    assert [o.name for o in session.get_outputs()][0] == "logits"


def test_sign_words_are_the_references_uint32_words_paired():
    w = np.random.default_rng(1).standard_normal((5, 130)).astype(np.float32)
    words = pack_sign_words64(w)
    from sparseinfer.reference.signs import pack_signs
    w32 = pack_signs(w)
    assert np.array_equal(words.view(np.uint32)[:, :words_per_row(130)], w32)


def test_the_cuda_library_builds_and_its_cpu_kernel_gives_the_same_bits():
    """Where nvcc is found the CUDA flavour links (static cudart); in a CPU-only host it
    registers both kernels and the CPU one runs, bit for bit as the CPU library's."""
    reason = op_library.cuda_unavailable_reason()
    if reason:
        pytest.skip(f"CUDA op library skipped: {reason}")
    built = op_library.build(cuda=True)
    assert built.cuda is not None and built.reason is None
    assert ctypes.CDLL(str(built.cuda)).sparseinfer_ops_has_cuda() == 1
    rng = np.random.default_rng(5)
    w_gate, w_up, w_down, x = _layer(rng, 130, 600)
    model = _mlp_model(w_gate, w_up, np.ascontiguousarray(w_down.T), pack_sign_words64(w_gate), 990,
                       Activation.parse("relu"), outputs=2)
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(built.cuda))
    got = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {"x": x[None]})
    want = _session(model).run(None, {"x": x[None]})
    assert np.array_equal(_bits(got[0]), _bits(want[0])) and np.array_equal(got[1], want[1])


def test_build_ops_command(tmp_path):
    from click.testing import CliRunner

    from sparseinfer.tools.cli import cli

    r = CliRunner().invoke(cli, ["build-ops", "--no-cuda", "--json"])
    assert r.exit_code == 0, r.output
    import json
    info = json.loads(r.output)
    assert info["cpu"] == str(op_library.cpu_library()) and info["cuda"] is None and info["onnxruntime_api"] == 18
    r = CliRunner().invoke(cli, ["build-ops", "--no-cuda"], env={"ORT_INCLUDE_DIR": str(tmp_path)})
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert f"ORT_INCLUDE_DIR={tmp_path}: no onnxruntime_c_api.h there" in r.output


@pytest.mark.ort_cuda
def test_the_cuda_kernel_on_the_cuda_provider_keeps_the_references_masks(sparse_export):
    """A sparse export on onnxruntime's CUDA provider with the library's CUDA kernel: on each
    decode step's own MLP input (debug outputs), the predicted, computed and actual rows equal
    the reference's, and the logits stay within the bound of the CPU run's."""
    w, path = sparse_export
    cuda = OnnxDecoder(path, "cuda", mlp_kernels="native")
    assert cuda.mlp_kernels == "native" and "CUDAExecutionProvider" in cuda.session.get_providers()
    cpu = OnnxDecoder(path, "cpu", mlp_kernels="native")
    for tok in (PROMPT, [101], [32], [113]):
        (a_logits, debug), (b_logits, _) = cuda.step(tok), cpu.step(tok)
        np.testing.assert_allclose(a_logits, b_logits, rtol=0, atol=GAMMA_K * (1 + float(np.abs(b_logits).max())))
        if len(tok) > 1:
            continue
        for i, lw in enumerate(w.layers):
            x = debug[f"debug.{i}.mlp_input"].reshape(-1)
            _, trace = mlp_sparse(x, lw.gate, lw.up, lw.down, w.activation, alpha=1.01)
            assert np.array_equal(debug[f"debug.{i}.predicted_zero"], trace.predicted_zero)
            assert np.array_equal(debug[f"debug.{i}.rows"], np.flatnonzero(trace.computed_up))
            assert np.array_equal(debug[f"debug.{i}.actual_zero"], trace.actual_zero)


@pytest.mark.parametrize("kind", APPROXIMATE_KINDS)
def test_silu_and_gelu_run_approximately_with_the_references_bits(kind):
    """No exact zeros: the rows the sign predictor skips are taken as zero. The native kernel
    computes the activation with reference/activations.py's float32 algorithm, so masks and
    output are the reference's bit for bit; the function body (onnxruntime's Sigmoid / Erf,
    MLAS's MatMul order) has the same predicted and actual masks, computed rows that differ
    only where h1 is within Activation.error_bound of zero, and an output within the bound
    derived from it (helpers.approximate_mlp_bound)."""
    rng = np.random.default_rng(9)
    w_gate, w_up, w_down, x = _layer(rng, 256, 1500)
    act = Activation.parse(kind)
    model = _mlp_model(w_gate, w_up, np.ascontiguousarray(w_down.T), pack_sign_words64(w_gate), 980, act,
                       outputs=4, function=True)
    native = _session(model).run(None, {"x": x[None]})
    body = _session(model, library=False).run(None, {"x": x[None]})
    want, trace = mlp_sparse(x, w_gate, w_up, w_down, act, alpha=0.98, approximate=True)
    z = w_gate.astype(np.float64) @ x
    assert 0.3 < trace.predicted_zero.mean() < 0.7 and (z < -15).any() and (z > 15).any()   # every branch
    for got in (native, body):
        assert np.array_equal(got[1], trace.predicted_zero) and np.array_equal(got[3], trace.actual_zero)
    assert np.array_equal(native[2], trace.computed_up) and computed_rows_agree(body[2], trace, x, w_gate, act)
    assert np.array_equal(_bits(native[0][0]), _bits(want)) and np.count_nonzero(want) == want.size
    bound = approximate_mlp_bound(x, w_gate, w_up, w_down, np.flatnonzero(trace.computed_up), act)
    excess = np.abs(body[0][0].astype(np.float64) - want) - bound
    assert (excess <= 0).all(), f"{int((excess > 0).sum())} columns past the bound, first {np.argmax(excess)}"


# Extensions, in __builtin_cpu_supports spelling, that few CPUs have: Knights Mill's AVX-512
# 4VNNIW/4FMAPS, Tiger Lake's and Zen 5's VP2INTERSECT, and AMD's FMA4/XOP/SSE4a, which Intel never
# made. Every x86-64 CPU lacks at least one of them; all are names g++ 10 and later know.
RARE_CPU_FEATURES = ("avx5124vnniw", "avx5124fmaps", "avx512vp2intersect", "fma4", "xop", "sse4a")


def absent_cpu_features(names, folder) -> list[str]:
    """Those of ``names`` that this CPU lacks by __builtin_cpu_supports, the check the op library
    itself makes (never /proc/cpuinfo, whose spellings differ: avx512_vnni against avx512vnni)."""
    probe = folder / "cpu_probe.cc"
    checks = "".join(f'    if (!__builtin_cpu_supports("{n}")) std::puts("{n}");\n' for n in names)
    probe.write_text(f"#include <cstdio>\nint main() {{\n    __builtin_cpu_init();\n{checks}    return 0;\n}}\n")
    subprocess.run(["g++", "-std=c++17", str(probe), "-o", str(folder / "cpu_probe")], check=True)
    return subprocess.run([str(folder / "cpu_probe")], check=True, capture_output=True, text=True).stdout.split()


def test_the_cpu_probe_reports_what_the_compiler_knows_this_cpu_has(tmp_path):
    """The probe that picks an absent extension answers per name: baseline x86-64's sse2 is on
    every x86-64 CPU, and an extension is never reported both present and absent."""
    absent = absent_cpu_features(("sse2", *RARE_CPU_FEATURES), tmp_path)
    assert "sse2" not in absent and set(absent) <= set(RARE_CPU_FEATURES)
    assert absent == [n for n in RARE_CPU_FEATURES if n in absent]     # one line per absent name, in order


def test_a_library_built_for_a_cpu_feature_this_cpu_lacks_refuses_to_register_instead_of_crashing(tmp_path):
    """A library built with -march=native and copied to an older CPU: registration fails with a
    message naming the missing extension, and the host process carries on. Simulated by building
    the same sources with one more required extension, one this CPU does not have."""
    absent = next(iter(absent_cpu_features(RARE_CPU_FEATURES, tmp_path)), None)
    if absent is None:
        pytest.skip(f"this CPU has every extension the test could require: {', '.join(RARE_CPU_FEATURES)}")
    include = op_library.ort_include_dir()
    out = tmp_path / "libsparseinfer_ops.so"
    subprocess.run([str(c) for c in op_library.cpu_compile_command(
        "g++", include, out, defines=(f'-DSPARSEINFER_REQUIRE_CPU_FEATURE="{absent}"',))], check=True)
    opts = ort.SessionOptions()
    with pytest.raises(Exception, match=f"built for a CPU with {absent}, which this CPU lacks; rebuild it"):
        opts.register_custom_ops_library(str(out))
    _session(_mlp_model(*_tiny_layer(), 1000, Activation.parse("relu")))      # the process and the real library go on


def _tiny_layer():
    w_gate, w_up, w_down, _ = _layer(np.random.default_rng(0), 64, 8)
    return w_gate, w_up, np.ascontiguousarray(w_down.T), pack_sign_words64(w_gate)


def test_the_build_compiles_the_bytes_its_cache_key_hashed(tmp_path, monkeypatch):
    """The library is compiled from a snapshot of the sources whose bytes make its cache key, not
    from the tree: a source that reads otherwise than the tree's (as one edited while a build
    runs) is what the compiler sees, and nothing is cached under the key."""
    monkeypatch.setenv(op_library.CACHE_ENV, str(tmp_path))
    tree = op_library._sources

    def edited(cuda):
        sources = dict(tree(cuda))
        header = ("native", "op_common.h")
        sources[header] = b'#error "compiled from the snapshot"\n' + sources[header]
        return sources

    monkeypatch.setattr(op_library, "_sources", edited)
    with pytest.raises(SparseInferError, match="compiled from the snapshot"):
        op_library._build_cpu(op_library.ort_include_dir())
    assert not list(tmp_path.rglob("*.so"))
