"""``sparseinfer quant-quality`` (``evaluation/quant_quality.py``) and ``compare --quantize``: the
figures of each pair checked against their definition on a model built so that they are known,
a model against itself, the teacher-forced positions, and the refusals.

The model of the known figures: the tiny shape at d 256 (whole blocks), every layer's o_proj
and down projection zero (the residual stream stays each token's embedding), the final norm's
weight one at column 0 and zero elsewhere, and embedding column 0 one. So at every position the
logits are ``h * W_lm[:, 0]`` with h = 1 / rms(embedding) > 0, exactly, in every export. Every LM
head row has W[·, 1] = -8, so its first Q4_0 block has scale 1 and column 0 (uniform in (-1, 1))
rounds to -1, 0 or 1; rows A < B are W[A, 0] = 7, W[B, 0] = 7.01, zero after column 1: Q4_0
stores 7 for both, so the quantized logits of A and B tie (argmax A) where float32 ranks B
first at every position: top-1 agreement must be 0 and KL > 0 (and, from its definition,
large enough that KL(q || p) is not within the tolerance of KL(p || q)), and the sparse and
dense Q4_0 exports must agree exactly (their MLPs add exact zeros).
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from sparseinfer.evaluation import quant_quality as qq
from sparseinfer.model_export.decode import OnnxDecoder
from sparseinfer.model_export.loaders import open_checkpoint
from sparseinfer.model_export.synthetic import make_checkpoint, make_weights, synthetic_shape, write_checkpoint
from sparseinfer.reference import block_quant as bq
from sparseinfer.reference.errors import SparseInferError

from helpers import one_line_error, run_cli as run

# d 256 (whole blocks of 32), k 576
QSHAPE = replace(synthetic_shape("tiny", layers=2), hidden_size=256, intermediate_size=576)
TIE_A, TIE_B = 10, 11
TEXT = "The keeper lit the lamp before the sun went down."


def known_weights():
    w = make_weights(QSHAPE, 0.9, seed=3)
    layers = [replace(lw, o=np.zeros_like(lw.o), down=np.zeros_like(lw.down)) for lw in w.layers]
    embed = np.array(w.embed, copy=True)
    embed[:, 0] = 1.0
    final_norm = np.zeros_like(w.final_norm)
    final_norm[0] = 1.0
    lm = np.array(w.lm_head, copy=True)
    lm[:, 0] = np.random.default_rng(0).uniform(-1, 1, lm.shape[0]).astype(np.float32)
    lm[:, 1] = -8.0                        # every row's first block at scale 1: column 0 rounds to -1, 0 or 1
    for row, top in ((TIE_A, 7.0), (TIE_B, 7.01)):
        lm[row, 2:] = 0.0
        lm[row, 0] = top
    return replace(w, layers=layers, embed=embed, final_norm=final_norm, lm_head=lm)


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    root = tmp_path_factory.mktemp("qq")
    weights = known_weights()
    ck = write_checkpoint(weights, root / "ck")
    result = qq.quantization_quality(ck, "q4_0", TEXT, work_dir=root / "work")
    return {"ck": ck, "weights": weights, "result": result, "root": root}


def expected_kl(weights, ids) -> float:
    """KL(float32 || Q4_0) of the known model's logits h * W_lm[:, 0], from its definition, in float64."""
    x = weights.embed[ids[:-1]].astype(np.float64)
    h = x[:, 0] / np.sqrt(np.mean(x * x, axis=1) + QSHAPE.rms_norm_eps)
    lm = weights.lm_head
    column = lm[:, 0].astype(np.float64)
    quantized = bq.dequantize(bq.quantize(lm, bq.Q4_0), bq.Q4_0, lm.shape[1])[:, 0].astype(np.float64)
    out = []
    for hi in h:
        p, q = hi * column, hi * quantized
        lp, lq = p - np.logaddexp.reduce(p), q - np.logaddexp.reduce(q)
        out.append(np.sum(np.exp(lp) * (lp - lq)))
    return float(np.mean(out))


def test_quantized_ties_make_agreement_zero_and_kl_match_its_definition(known):
    r = known["result"]
    with open_checkpoint(known["ck"]) as ck:
        ids = qq.text_ids(ck.tokenizer, ck.bos_token_id, TEXT)
    assert r["positions"] == len(ids) - 1 == r["text"]["tokens"] - 1 > 10
    pair = r["pairs"]["dense_quantized_vs_fp32"]
    assert (pair["reference"], pair["test"]) == ("dense fp32", "dense q4_0")
    assert pair["positions"] == r["positions"]
    assert pair["top1_agreement"] == 0.0                     # float32 picks B, Q4_0 ties A and B: argmax A
    assert pair["mean_kl"] > 0
    assert pair["mean_kl"] == pytest.approx(expected_kl(known["weights"], ids), rel=1e-3)
    assert r["pairs"]["sparse_quantized_vs_fp32"]["top1_agreement"] == 0.0


def test_sparse_and_dense_q4_0_agree_exactly_where_the_mlps_add_zeros(known):
    pair = known["result"]["pairs"]["sparse_quantized_vs_dense_quantized"]
    assert (pair["reference"], pair["test"]) == ("dense q4_0", "sparse q4_0 (α 1.00)")
    assert (pair["top1_agreement"], pair["mean_kl"], pair["max_abs_logit_delta"]) == (1.0, 0.0, 0.0)
    assert known["result"]["approximate"] is False             # FATReLU: exact zeros
    rows = known["result"]["sparse_rows"]
    assert rows["decode_steps_counted"] == known["result"]["positions"] - 1 and 0 < rows["predicted_sparsity"] < 1


def test_a_model_against_itself_agrees_at_every_position_with_zero_kl(known):
    decoder = OnnxDecoder(known["result"]["exports"]["dense"]["export"], "cpu")
    ids = list(range(60, 100))
    first, second = qq.teacher_forced_logits(decoder, ids), qq.teacher_forced_logits(decoder, ids)
    assert first.shape == (len(ids) - 1, QSHAPE.vocab_size) and np.ptp(first) > 0
    assert qq.pair_quality(first, second) == {"positions": len(ids) - 1, "top1_agreement": 1.0, "mean_kl": 0.0,
                                              "max_abs_logit_delta": 0.0}


def test_each_position_is_one_decode_step_after_a_one_token_prefill(known):
    """Teacher forcing through decode steps gives the logits of one prefill of the whole text."""
    decoder = OnnxDecoder(known["result"]["exports"]["fp32"]["export"], "cpu")
    ids = [1, 84, 104, 101, 32, 107, 101, 101, 112]
    stepped = qq.teacher_forced_logits(decoder, ids)
    decoder.reset()
    whole, _ = decoder.step(ids[:-1])
    np.testing.assert_allclose(stepped, whole, rtol=1e-5, atol=1e-5)


def test_cached_exports_are_reused_and_their_notes_told_again(known):
    told = []
    again = qq.quantization_quality(known["ck"], "q4_0", TEXT, work_dir=known["root"] / "work", note=told.append)
    assert again["exports"] == known["result"]["exports"] and again["pairs"] == known["result"]["pairs"]
    assert told == known["result"]["notes"] and any("quantized to q4_0" in line for line in told)


def test_quant_quality_command_json_and_table(known):
    (known["root"] / "text.txt").write_text(TEXT)
    args = ["quant-quality", known["ck"], "--quantize", "q4_0", "--text", known["root"] / "text.txt",
            "--work-dir", known["root"] / "work", "--max-tokens", "12"]
    r = run(*args, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["positions"] == 11 and result["text"]["source"] == str(known["root"] / "text.txt")
    assert set(result["pairs"]) == {name for name, _, _ in qq.PAIRS}
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert "dense q4_0 vs dense fp32" in r.stdout and "sparse q4_0 (α 1.00) vs dense q4_0" in r.stdout
    assert "11 positions scored" in r.stdout


def test_a_silu_model_is_exported_approximate_and_says_so(tmp_path):
    ck = write_checkpoint(make_weights(replace(QSHAPE, hidden_act="silu", num_layers=1), 0.9, seed=1), tmp_path / "ck")
    r = run("quant-quality", ck, "--quantize", "q8_0", "--work-dir", tmp_path / "w", "--max-tokens", "8")
    assert r.exit_code == 0, r.output
    assert "sparse q8_0 export approximate: silu has no exact zeros" in r.stdout


@pytest.mark.parametrize("extra, needle", [
    ([], "Missing option '--quantize'"),
    (["--quantize", "q5_0"], "Invalid value for '--quantize'"),
    (["--quantize", "q4_0", "--max-tokens", "1"], "Invalid value for '--max-tokens'"),
])
def test_quant_quality_options_are_checked_by_click(extra, needle, tmp_path):
    one_line_error(run("quant-quality", tmp_path, *extra), needle)


def test_quant_quality_refusals_name_what_is_wrong(known, tmp_path):
    one_line_error(run("quant-quality", tmp_path / "none", "--quantize", "q4_0"), "no such checkpoint")
    tiny = make_checkpoint("tiny", tmp_path / "tiny", layers=1)              # d 200: not whole blocks
    r = run("quant-quality", tiny, "--quantize", "q4_0", "--work-dir", tmp_path / "w")
    one_line_error(r, "hidden size d = 200 is not a multiple of 32")
    assert not (tmp_path / "w").exists()                                   # refused before any export
    (tmp_path / "empty.txt").write_text(" \n")
    r = run("quant-quality", known["ck"], "--quantize", "q4_0", "--text", tmp_path / "empty.txt")
    one_line_error(r, f"{tmp_path / 'empty.txt'}: no text in it")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    r = run("quant-quality", known["ck"], "--quantize", "q4_0", "--text", tmp_path / "latin1.txt")
    one_line_error(r, "latin1.txt: not UTF-8 text")
    (tmp_path / "long.txt").write_text("a" * 600)                          # 601 tokens, context 512
    r = run("quant-quality", known["ck"], "--quantize", "q4_0", "--text", tmp_path / "long.txt",
            "--work-dir", tmp_path / "w2")
    one_line_error(r, "more than the model's context of 512")
    with pytest.raises(SparseInferError, match="a block format is needed"):
        qq.quantization_quality(known["ck"], None)


def test_compare_quantized_decodes_both_exports_in_the_format(known, tmp_path):
    args = ["compare", known["ck"], "--prompt", "The keeper", "--quantize", "q4_0", "--max-new-tokens", "6",
            "--work-dir", tmp_path]
    r = run(*args, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["quantize"] == "q4_0" and result["tokens_compared"] == 6
    assert result["sparse_stats"]["mlp_kernels"] == "native" and "actual_sparsity" in result["sparse_stats"]
    for kind in ("dense", "sparse"):
        assert OnnxDecoder(tmp_path / kind / "model.onnx", "cpu").quantize == "q4_0"
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("dense q4_0  '") and "\nsparse q4_0 '" in r.stdout


def test_compare_refuses_quantize_with_portable_before_reading_the_checkpoint(tmp_path):
    one_line_error(run("compare", tmp_path / "none", "--prompt", "x", "--quantize", "q4_0", "--portable"),
                   "--quantize needs the fused form")
