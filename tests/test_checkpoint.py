"""Checkpoint loading and the synthetic maker: round trip, sparsity, one-line errors."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import load_error_in_capped_child
from sparseinfer.model_export.loaders import load_checkpoint
from sparseinfer.model_export.loaders.names import hf_tensors
from sparseinfer.model_export.synthetic import (MAX_LAYERS, N_FEATURES, SYNTHETIC_SHAPES, common_direction,
                                                features_per_token, make_checkpoint, make_weights, synthetic_shape)
from sparseinfer.model_export.tokenizer import byte_level_tokenizer
from sparseinfer.reference.dtypes import BFLOAT16
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.llama import LlamaReference
from sparseinfer.tools.cli import cli

HELD_OUT_TEXT = ("Alice was beginning to get very tired of sitting by her sister on the bank, "
                 "and of having nothing to do: once or twice she had peeped into the book.")


@pytest.mark.parametrize("dtype,np_dtype", [("fp32", np.float32), ("fp16", np.float16), ("bf16", BFLOAT16)])
def test_round_trip_keeps_every_tensor(tmp_path, dtype, np_dtype):
    path = make_checkpoint("tiny", tmp_path / dtype, layers=2, dtype=dtype, seed=3)
    ck = load_checkpoint(path)
    expected = make_weights(synthetic_shape("tiny", layers=2), seed=3)
    assert ck.shape.num_layers == 2 and ck.shape.num_kv_heads == 2 and ck.shape.hidden_act.startswith("fatrelu")
    assert ck.stored_dtype == dtype
    assert ck.weights.layers[1].gate.dtype == np_dtype          # MLP weights keep the stored type
    assert ck.weights.layers[1].q.dtype == np.float32
    want = hf_tensors(expected, dtype)
    got = hf_tensors(ck.weights, dtype)
    assert want.keys() == got.keys() and len(want) == 2 + 1 + 9 * 2
    for name in want:
        assert np.array_equal(want[name].view(np.uint8), got[name].view(np.uint8)), name
    assert ck.tokenizer.decode(ck.tokenizer.encode("héllo, wörld").ids) == "héllo, wörld"
    assert ck.bos_token_id == 256 and ck.eos_token_id == 257


def test_tied_embeddings_share_the_head(tmp_path):
    ck = load_checkpoint(make_checkpoint("tiny", tmp_path, layers=1, tie_embeddings=True, kv_heads=4))
    assert ck.shape.tie_word_embeddings and ck.shape.num_kv_heads == ck.shape.num_heads
    assert ck.weights.lm_head is ck.weights.embed


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path):
    from safetensors.numpy import load_file, save_file

    single = make_checkpoint("tiny", tmp_path / "single", layers=2)
    tensors = load_file(str(single / "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((single / "config.json").read_text())
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(sharded / fname))
        weight_map.update({n: fname for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, b = load_checkpoint(single), load_checkpoint(sharded)
    assert np.array_equal(a.weights.layers[1].down, b.weights.layers[1].down)
    assert np.array_equal(a.weights.lm_head, b.weights.lm_head)


def test_decode_sparsity_lands_within_two_points_of_the_target():
    """Teacher-forced decode of a held-out text (not the calibration text)."""
    target = 0.9
    weights = make_weights(SYNTHETIC_SHAPES["tiny"], target_sparsity=target, seed=0)
    model = LlamaReference(weights)
    ids = byte_level_tokenizer().encode(HELD_OUT_TEXT).ids
    model.prefill(ids[:4])
    per_step = []
    for tok in ids[4:]:
        step = model.decode(tok, trace=True)
        per_step.append([tr.actual_sparsity for tr in step.traces])
    per_step = np.array(per_step)
    assert per_step.shape == (len(ids) - 4, 2)
    assert 0.5 < per_step.min() and per_step.max() < 1.0       # some rows skipped, some kept, every step
    assert abs(per_step.mean() - target) <= 0.02, per_step.mean(axis=0)


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_other_targets(target):
    weights = make_weights(SYNTHETIC_SHAPES["tiny"], target_sparsity=target, seed=1)
    model = LlamaReference(weights)
    ids = byte_level_tokenizer().encode(HELD_OUT_TEXT).ids
    model.prefill(ids[:4])
    sparsity = np.mean([[tr.actual_sparsity for tr in model.decode(t, trace=True).traces] for t in ids[4:]])
    assert abs(sparsity - target) <= 0.02


# The (layers, seed) pairs that failed with "calibration inputs lack a common direction"
# before the calibration used the max-min direction: 4..8 layers with seed 0, 7..8 with 2 and 4.
SWEEP_SEEDS = (0, 1, 2, 4)


def _ideal_sparsity_bound(k: int, target: float) -> float:
    """The largest |ideal - target| the construction allows, ideal = 1 - (rows of a token's features) / k.

    A token carries n = round((1 - target) N) of the N features and row i detects feature
    i mod N, so a feature owns floor(k/N) or ceil(k/N) rows: the ideal per-token sparsity
    lies between 1 - n ceil(k/N) / k and 1 - n floor(k/N) / k.
    """
    n = features_per_token(target)
    return max(abs(1 - n * math.ceil(k / N_FEATURES) / k - target), abs(1 - n * (k // N_FEATURES) / k - target))


@pytest.mark.slow
@pytest.mark.parametrize("layers", range(1, 9))
def test_every_layer_count_and_seed_makes_a_checkpoint_with_the_target_sparsity(tmp_path, layers):
    """Written, loads, and each layer's MLP sparsity on held-out text is the target.

    Tolerance: the construction's own offset (``_ideal_sparsity_bound``, exact) plus the
    two points of misclassified rows that synthetic.py documents and the decode test above
    holds it to. The held-out text goes through one prefill, whose MLP inputs are those of
    a teacher-forced decode.
    """
    target = 0.9
    ids = byte_level_tokenizer().encode(HELD_OUT_TEXT).ids
    for seed in SWEEP_SEEDS:
        path = make_checkpoint("tiny", tmp_path / f"s{seed}", layers=layers, target_sparsity=target, seed=seed)
        ck = load_checkpoint(path)
        assert ck.shape.num_layers == layers
        act = ck.weights.activation
        sparsity = np.zeros((layers, len(ids)))

        def record(i, x, weights=ck.weights, out=sparsity):
            out[i] = (act(x @ weights.layers[i].gate.T) == 0).mean(axis=1)

        LlamaReference(ck.weights).prefill(ids, mlp_hook=record)
        tolerance = _ideal_sparsity_bound(ck.shape.k, target) + 0.02
        where = f"{layers} layers, seed {seed}"
        assert 0.5 < sparsity.min() and sparsity.max() < 1.0, where      # rows skipped and rows kept on every token
        worst = np.abs(sparsity.mean(axis=1) - target)
        assert worst.max() <= tolerance, f"{where}: per-layer sparsity {np.round(sparsity.mean(axis=1), 4)}, " \
                                         f"allowed {target} ± {tolerance:.4f}"


def test_make_checkpoint_layers_and_seed_range(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(cli, ["make-checkpoint", "--shape", "tiny", "--layers", "4", "--out", str(tmp_path / "four")])
    assert ok.exit_code == 0, ok.output                                 # a layer count once refused
    assert load_checkpoint(tmp_path / "four").shape.num_layers == 4
    for args, message in ((["--layers", "0"], f"'--layers': 0 is not in the range 1<=x<={MAX_LAYERS}"),
                          (["--layers", str(MAX_LAYERS + 1)], f"'--layers': {MAX_LAYERS + 1} is not in the range"),
                          (["--seed", "-1"], "'--seed': -1 is not in the range x>=0")):
        bad = runner.invoke(cli, ["make-checkpoint", *args, "--out", str(tmp_path / "bad")])
        assert bad.exit_code == 2 and message in bad.output and len(bad.output.strip().splitlines()) == 1, bad.output


def test_common_direction_keeps_every_input_on_its_positive_side():
    """A set whose mean leaves one row on its far side, which the max-min direction does not."""
    x = np.array([[1.0, 0.0]] * 9 + [[-0.5, 1.0]], dtype=np.float32)
    mean = x.mean(axis=0) / np.linalg.norm(x.mean(axis=0))
    assert (x @ mean).min() < 0                                         # the data is not trivial for the mean
    u = common_direction(x)
    cos = (x @ u) / np.linalg.norm(x, axis=1)
    assert cos.min() > 0 and abs(np.linalg.norm(u) - 1) < 1e-6
    # the optimum for two directions is their bisector: both cosines equal
    assert abs(cos[0] - cos[-1]) < 1e-3, cos


def _write_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_errors_are_one_line(tmp_path):
    with pytest.raises(SparseInferError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nowhere")
    path = make_checkpoint("tiny", tmp_path / "ck", layers=1)
    _write_config(path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(SparseInferError, match="unsupported architecture GPT2LMHeadModel"):
        load_checkpoint(path)
    _write_config(path, architectures=["LlamaForCausalLM"], model_type="llama", intermediate_size=100)
    with pytest.raises(SparseInferError, match=r"mlp.gate_proj.weight has shape \(552, 200\), but the config implies \(100, 200\)"):
        load_checkpoint(path)
    _write_config(path, intermediate_size=552, num_hidden_layers=2)
    with pytest.raises(SparseInferError, match="model.layers.1.input_layernorm.weight is missing"):
        load_checkpoint(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(SparseInferError, match="no model.safetensors"):
        load_checkpoint(path)


def _edit_header(path, edit):
    """Rewrite model.safetensors with ``edit(header)`` applied to its JSON header, the data as it was."""
    f = path / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    f.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])


def test_a_header_entry_removed_is_named_missing_not_blamed_on_the_next_tensor(tmp_path):
    """Without its entry, down_proj's bytes are a gap before gate_proj's (the header lists
    tensors by name), which the safetensors library reports as gate_proj's invalid offset."""
    path = make_checkpoint("tiny", tmp_path / "ck", layers=1)
    down, gate = "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.gate_proj.weight"
    _edit_header(path, lambda h: h.pop(down))
    with pytest.raises(SparseInferError, match=rf"ck: tensor {down} is missing$") as e:
        load_checkpoint(path)
    assert gate not in str(e.value)


def test_every_missing_tensor_is_counted_and_the_first_few_named(tmp_path):
    path = make_checkpoint("tiny", tmp_path / "ck", layers=1)
    _write_config(path, num_hidden_layers=2)
    with pytest.raises(SparseInferError, match=r"tensor model.layers.1.input_layernorm.weight is missing, and 8 more: "
                                               r"model.layers.1.self_attn.q_proj.weight, .*, \.\.\.$"):
        load_checkpoint(path)


def test_a_layer_count_far_past_the_weights_is_counted_not_listed(tmp_path):
    """num_hidden_layers 2**40 over a 1-layer checkpoint: the names of the layers past the stored
    ones are counted, not built (that list would take terabytes); the same line as for a few."""
    path = make_checkpoint("tiny", tmp_path / "ck", layers=1)
    _write_config(path, num_hidden_layers=2**40)
    missing = 9 * (2**40 - 1)                # every tensor of layers 1 .. 2**40 - 1
    assert load_error_in_capped_child(path) == (
        f"{path}: tensor model.layers.1.input_layernorm.weight is missing, and {missing - 1} more: "
        "model.layers.1.self_attn.q_proj.weight, model.layers.1.self_attn.k_proj.weight, "
        "model.layers.1.self_attn.v_proj.weight, model.layers.1.self_attn.o_proj.weight, "
        "model.layers.1.post_attention_layernorm.weight, ...")


NORM, DOWN = "model.layers.0.input_layernorm.weight", "model.layers.0.mlp.down_proj.weight"   # adjacent


def _shrink_norm(header):
    """The layer norm one float shorter: 4 bytes before down_proj's data that no entry lists."""
    header[NORM]["shape"][0] -= 1
    header[NORM]["data_offsets"][1] -= 4


def _move_down_back(header):
    """down_proj's span 4 bytes earlier: its first 4 bytes are also the layer norm's last."""
    header[DOWN]["data_offsets"] = [o - 4 for o in header[DOWN]["data_offsets"]]


@pytest.mark.parametrize("edit,message", [
    (_shrink_norm, rf"data bytes \d+-\d+ belong to no tensor in the header \(they lie between {NORM} and {DOWN}\)$"),
    (_move_down_back, rf"tensors {NORM} and {DOWN} overlap in the data \(bytes \d+-\d+\)$"),
])
def test_data_that_no_entry_or_two_entries_list_is_named_by_its_bytes(tmp_path, edit, message):
    path = make_checkpoint("tiny", tmp_path / "ck", layers=1)
    _edit_header(path, edit)
    with pytest.raises(SparseInferError, match=message):
        load_checkpoint(path)


def test_bytes_after_the_last_tensor_are_named(tmp_path):
    path = make_checkpoint("tiny", tmp_path / "ck", layers=1)
    with open(path / "model.safetensors", "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(SparseInferError, match=r"data bytes \d+-\d+ belong to no tensor in the header "
                                               r"\(they follow model.norm.weight\)$") as e:
        load_checkpoint(path)
    first, last = map(int, re.search(r"data bytes (\d+)-(\d+)", str(e.value)).groups())
    assert last - first == 16


def test_a_vocab_size_too_small_is_named_not_the_token_ids_beyond_it(tmp_path):
    """The config's bos_token_id (256) is right; vocab_size 100 is wrong: the embedding holds 258 rows."""
    path = make_checkpoint("tiny", tmp_path / "ck", layers=1)
    _write_config(path, vocab_size=100)
    with pytest.raises(SparseInferError, match="config.json: field vocab_size is 100, but tensor "
                                               "model.embed_tokens.weight holds 258 rows, one per token$"):
        load_checkpoint(path)
    _write_config(path, vocab_size=258, bos_token_id=300)          # with the right vocabulary, the id is named
    with pytest.raises(SparseInferError, match=r"field bos_token_id must be a token id in 0-257 .* got 300$"):
        load_checkpoint(path)


@pytest.mark.parametrize("name,message", [
    ("model.safetensors", "model.safetensors: a directory, not a safetensors file"),
    ("model.safetensors.index.json", "model.safetensors.index.json: a directory, not a shard index"),
    ("config.json", "config.json: a directory, not a config file"),
])
def test_a_folder_in_place_of_a_checkpoint_file_is_named_a_folder(tmp_path, name, message):
    path = make_checkpoint("tiny", tmp_path / "ck", layers=1)
    if (path / name).exists():
        (path / name).unlink()
    (path / name).mkdir()
    with pytest.raises(SparseInferError, match=message) as e:
        load_checkpoint(path)
    assert "missing" not in str(e.value) and "no such" not in str(e.value)


def test_make_checkpoint_command(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["make-checkpoint", "--shape", "tiny", "--layers", "1", "--out", str(tmp_path / "c"),
                                 "--dtype", "bf16", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["dtype"] == "bf16"
    assert load_checkpoint(tmp_path / "c").shape.num_layers == 1
    bad = runner.invoke(cli, ["make-checkpoint", "--target-sparsity", "1.5", "--out", str(tmp_path / "d")])
    assert bad.exit_code == 2 and "target-sparsity must be in [0, 1)" in bad.output


# Paper Fig. 3: the sign predictor's precision is over 99 % in most ProSparse layers (lower
# in early ones). Thresholds for the 2-layer tiny shape (d = 200, where 1/sqrt(d) noise is
# large): precision >= 0.97 and recall >= 0.90 at α = 1.00; measured 0.995 / 0.957.
MIN_PRECISION, MIN_RECALL = 0.97, 0.90


def test_sign_predictor_is_prosparse_like_on_held_out_text():
    weights = make_weights(SYNTHETIC_SHAPES["tiny"], target_sparsity=0.9, seed=0)
    model = LlamaReference(weights)
    ids = byte_level_tokenizer().encode(HELD_OUT_TEXT).ids
    model.prefill(ids[:4])
    steps = [model.decode(t, trace=True).traces for t in ids[4:]]
    predicted = np.array([[tr.predicted_zero for tr in s] for s in steps])
    actual = np.array([[tr.actual_zero for tr in s] for s in steps])
    assert 0 < predicted.sum() < predicted.size and 0 < actual.sum() < actual.size
    both = int((predicted & actual).sum())
    precision, recall = both / predicted.sum(), both / actual.sum()
    assert precision >= MIN_PRECISION and recall >= MIN_RECALL, (precision, recall)
