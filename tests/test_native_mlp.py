"""Native (registered) MLP kernels in onnxruntime sessions of sparse exports."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import pytest

from sparseinfer.model_export.decode import OnnxDecoder, generate, resolve_mlp_kernels
from sparseinfer.model_export.export import ExportOptions, export_onnx
from sparseinfer.model_export.native_mlp import native_session
from sparseinfer.model_export.synthetic import make_weights, synthetic_shape
from sparseinfer.reference.errors import SparseInferError

pytestmark = pytest.mark.native

PROMPT = [256, 84, 104, 101, 32, 113, 117, 105, 99, 107]
GAMMA_K = 552 * 2.0 ** -24          # the tiny shape's longest dot product (see test_export_onnx)


@pytest.fixture(scope="module")
def sparse_export(tmp_path_factory):
    w = make_weights(synthetic_shape("tiny", layers=2), seed=7)
    path = export_onnx(w, tmp_path_factory.mktemp("native") / "m.onnx",
                       ExportOptions(sparse=True, alpha="1.01", debug=True))
    return w, path


def _decode(decoder, steps=6):
    return generate(decoder, PROMPT, steps, keep_logits=True)


def test_native_kernels_skip_the_same_rows_as_the_function_bodies(sparse_export):
    _, path = sparse_export
    native, function = OnnxDecoder(path, mlp_kernels="native"), OnnxDecoder(path, mlp_kernels="function")
    assert (native.mlp_kernels, function.mlp_kernels) == ("native", "function")
    for tok in (PROMPT, [101], [32], [113]):
        a_logits, a_debug = native.step(tok)
        b_logits, b_debug = function.step(tok)
        if len(tok) == 1:                                   # decode steps: the custom ops ran
            for name in a_debug:
                if name.endswith(("predicted_zero", "rows")):
                    assert np.array_equal(a_debug[name], b_debug[name]), name
            zero = a_debug["debug.0.predicted_zero"]
            assert 0 < zero.sum() < zero.size
        np.testing.assert_allclose(a_logits, b_logits, rtol=0, atol=GAMMA_K * (1 + float(np.abs(b_logits).max())))


def test_external_data_is_memory_mapped_and_the_file_untouched(sparse_export, tmp_path):
    _, path = sparse_export
    model = onnx.load(str(path))
    ext = tmp_path / "ext.onnx"
    onnx.save_model(model, str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    digest = hashlib.sha256(ext.read_bytes()).hexdigest()
    internal = _decode(OnnxDecoder(path, mlp_kernels="native"))
    external = _decode(OnnxDecoder(ext, mlp_kernels="native"))
    assert internal.tokens == external.tokens
    for a, b in zip(internal.logits, external.logits):
        assert np.array_equal(a, b)            # the same weights, the same kernels: the same bits
    assert hashlib.sha256(ext.read_bytes()).hexdigest() == digest

    (tmp_path / "ext.onnx.data").rename(tmp_path / "moved.data")
    with pytest.raises(SparseInferError, match="external data file .*ext.onnx.data .* is missing"):
        native_session(ext)


def test_sessions_release_their_weight_stores(sparse_export):
    from sparseinfer.model_export import native_mlp

    _, path = sparse_export
    before = set(native_mlp._STORES)
    session = native_session(path)
    assert len(set(native_mlp._STORES) - before) == 1
    del session
    import gc
    gc.collect()
    assert set(native_mlp._STORES) == before


def test_kernel_choice_and_its_errors(tmp_path):
    assert resolve_mlp_kernels("auto", sparse=True, provider="cpu") == "native"
    assert resolve_mlp_kernels("auto", sparse=True, provider="cuda") == "function"
    assert resolve_mlp_kernels("native", sparse=False, provider="cpu") == "function"   # nothing to override
    with pytest.raises(SparseInferError, match="cpu provider only"):
        resolve_mlp_kernels("native", sparse=True, provider="cuda")
    with pytest.raises(SparseInferError, match="unknown MLP kernels 'fast'"):
        resolve_mlp_kernels("fast", sparse=True, provider="cpu")
    w = make_weights(synthetic_shape("tiny", layers=1), seed=1)
    dense = export_onnx(w, tmp_path / "dense.onnx", ExportOptions(sparse=False))
    with pytest.raises(SparseInferError, match="not a sparse export"):
        native_session(dense)


def test_exports_without_debug_outputs_decode_the_same_text(tmp_path):
    """No node reads the masks: the native op hands back empty ones, the output is unchanged."""
    w = make_weights(synthetic_shape("tiny", layers=2), seed=9)
    path = export_onnx(w, tmp_path / "m.onnx", ExportOptions(sparse=True, alpha="1.00"))
    native = _decode(OnnxDecoder(path, mlp_kernels="native"), steps=8)
    function = _decode(OnnxDecoder(path, mlp_kernels="function"), steps=8)
    assert native.tokens == function.tokens
    for a, b in zip(native.logits, function.logits):
        np.testing.assert_allclose(a, b, rtol=0, atol=GAMMA_K * (1 + float(np.abs(b).max())))
    # the kernels still count what they skipped: the same decision as a debug export's masks
    debug = export_onnx(w, tmp_path / "d.onnx", ExportOptions(sparse=True, alpha="1.00", debug=True))
    with_masks = _decode(OnnxDecoder(debug, mlp_kernels="function"), steps=8).stats()
    stats = native.stats()
    assert stats["predicted_sparsity"] == with_masks["predicted_sparsity"]
    assert 0 < stats["rows_computed"] <= 1 - stats["predicted_sparsity"] and "actual_sparsity" not in stats
    assert "predicted_sparsity" not in function.stats()


def test_native_kernels_count_the_rows_they_skip_and_compute(sparse_export):
    _, path = sparse_export
    decoder = OnnxDecoder(path, mlp_kernels="native")
    decoder.step(PROMPT)                                   # prefill: dense branch, nothing counted
    assert decoder.row_counts(reset=True)["decode_steps_counted"] == 0
    skipped = computed = rows = 0
    for tok in ([101], [32], [113]):
        _, debug = decoder.step([tok[0]])
        for i in range(decoder.num_layers):
            skipped += int(debug[f"debug.{i}.predicted_zero"].sum())
            computed += debug[f"debug.{i}.rows"].size
            rows += debug[f"debug.{i}.predicted_zero"].size
    counts = decoder.row_counts()
    assert counts == {"decode_steps_counted": 3, "predicted_sparsity": skipped / rows, "rows_computed": computed / rows}
    assert 0 < skipped < rows and 0 < computed
    assert OnnxDecoder(path, mlp_kernels="function").row_counts() is None


def test_missing_or_unreadable_models_are_one_line_errors(tmp_path):
    with pytest.raises(SparseInferError, match="no such model: .*absent.onnx"):
        OnnxDecoder(tmp_path / "absent.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff not a protobuf")
    with pytest.raises(SparseInferError, match="cannot read .*junk.onnx"):
        OnnxDecoder(junk)
    with pytest.raises(SparseInferError, match="no such model"):
        native_session(tmp_path / "absent.onnx")


def test_native_sessions_ask_for_passive_openmp_threads_unless_the_user_chose(sparse_export, monkeypatch):
    _, path = sparse_export
    monkeypatch.setenv("OMP_WAIT_POLICY", "")        # recorded, so the test leaves the variable as it found it
    monkeypatch.delenv("OMP_WAIT_POLICY")
    native_session(path)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    native_session(path)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
