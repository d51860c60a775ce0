"""genai_config.json and tokenizer files beside every export: onnxruntime-genai's Model and
Generator decode the export with no hand edits, the same greedy tokens as our decoder."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sparseinfer.model_export.decode import OnnxDecoder
from sparseinfer.model_export.export import ExportOptions, export_onnx
from sparseinfer.model_export.generation import generate
from sparseinfer.model_export.synthetic import make_checkpoint, make_weights, synthetic_shape
from sparseinfer.tools.cli import cli

from helpers import genai_greedy

PROMPT = [256, 84, 104, 101, 32, 113, 117, 105, 99, 107]
NEW_TOKENS = 12


@pytest.mark.parametrize("portable,shared,head_size", [(False, True, 64), (True, False, 50)])
def test_genai_config_describes_the_export(tmp_path, portable, shared, head_size):
    w = make_weights(synthetic_shape("tiny", layers=2), seed=3)
    path = export_onnx(w, tmp_path / "m.onnx", ExportOptions(sparse=False, portable=portable, max_length=128),
                       token_ids={"bos_token_id": 256, "eos_token_id": 257})
    cfg = json.loads((tmp_path / "genai_config.json").read_text())
    model, dec = cfg["model"], cfg["model"]["decoder"]
    assert (model["type"], model["context_length"], model["bos_token_id"], model["eos_token_id"]) == \
        ("llama", 128, 256, 257)
    assert (dec["filename"], dec["head_size"], dec["num_key_value_heads"], dec["num_hidden_layers"]) == \
        (path.name, head_size, 2, 2)
    assert cfg["search"]["past_present_share_buffer"] is shared and cfg["search"]["max_length"] == 128
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"


def _genai_greedy(og, model) -> list[int]:
    """onnxruntime-genai's Generator: greedy tokens after PROMPT, up to NEW_TOKENS."""
    return genai_greedy(og, model, PROMPT, NEW_TOKENS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint("tiny", tmp_path_factory.mktemp("genai") / "ck", layers=2)


@pytest.mark.parametrize("flags", [["--dense"], ["--dense", "--portable"], []], ids=["fused", "portable", "sparse"])
def test_genai_generator_decodes_the_export_like_our_decoder(tmp_path, checkpoint, flags):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    out = tmp_path / "m" / "model.onnx"
    r = CliRunner().invoke(cli, ["export", str(checkpoint), "--out", str(out), *flags])
    assert r.exit_code == 0, r.output
    model = og.Model(str(out.parent))
    theirs = _genai_greedy(og, model)
    ours = generate(OnnxDecoder(out, mlp_kernels="function"), PROMPT, len(theirs)).tokens
    assert len(theirs) == NEW_TOKENS and len(set(theirs)) > 2             # a real continuation, not one token
    assert theirs == ours
    tokenizer = og.Tokenizer(model)                                        # genai reads the tokenizer files too
    assert [int(t) for t in tokenizer.encode("Hello world")] == list(b"Hello world")
    assert tokenizer.decode(list(b"Hello")) == "Hello"


def test_genai_runs_a_sparse_export_on_the_op_library_it_names(tmp_path, checkpoint):
    """The sparse export's genai_config names the op library; genai's Generator then runs the
    native SparseMLP kernel (its process-wide counters move) and decodes our decoder's tokens."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    from sparseinfer.model_export import op_library

    if op_library.unavailable_reason():
        pytest.skip(f"op library unavailable: {op_library.unavailable_reason()}")
    out = tmp_path / "m" / "model.onnx"
    r = CliRunner().invoke(cli, ["export", str(checkpoint), "--out", str(out)])
    assert r.exit_code == 0, r.output
    library = out.parent / json.loads((out.parent / "genai_config.json").read_text())["model"]["decoder"][
        "session_options"]["custom_ops_library"]
    assert library.is_file()
    op_library.counters(library, reset=True)
    theirs = _genai_greedy(og, og.Model(str(out.parent)))
    steps = op_library.counters(library)["decode_steps"]
    assert steps >= 2 * (NEW_TOKENS - 1)                     # every layer of every decode step ran natively
    ours = generate(OnnxDecoder(out, mlp_kernels="native"), PROMPT, len(theirs)).tokens
    assert theirs == ours


def test_several_end_tokens_each_end_a_generation_here_and_in_genai(tmp_path, checkpoint):
    """A config with eos_token_id [a, b] (as Llama 3's): the checkpoint keeps both, the export's
    generation_config.json and genai_config.json list both, and a greedy run stops at the first
    of either, in our decoder, through `generate` and under genai's Generator."""
    import shutil

    from sparseinfer.model_export.loaders import load_checkpoint

    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    out = tmp_path / "free" / "model.onnx"
    assert CliRunner().invoke(cli, ["export", str(ck), "--out", str(out), "--dense"]).exit_code == 0
    free = generate(OnnxDecoder(out, mlp_kernels="function"), PROMPT, NEW_TOKENS).tokens
    first = free.index(free[4])                       # where the 5th token first appears: the run must stop there
    never = next(t for t in range(258) if t not in free)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "eos_token_id": [never, free[4]]}))
    assert load_checkpoint(ck).eos_token_id == (never, free[4])
    out = tmp_path / "two" / "model.onnx"
    assert CliRunner().invoke(cli, ["export", str(ck), "--out", str(out), "--dense"]).exit_code == 0
    assert json.loads(out.with_name("generation_config.json").read_text())["eos_token_id"] == [never, free[4]]
    assert json.loads(out.with_name("genai_config.json").read_text())["model"]["eos_token_id"] == [never, free[4]]
    ours = generate(OnnxDecoder(out, mlp_kernels="function"), PROMPT, NEW_TOKENS, stop_id=(never, free[4])).tokens
    assert ours == free[:first + 1] and len(ours) < NEW_TOKENS
    r = CliRunner().invoke(cli, ["generate", str(out), "--prompt", "The quick", "--max-new-tokens", "30", "--json"])
    assert r.exit_code == 0, r.output
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    assert _genai_greedy(og, og.Model(str(out.parent))) == ours
