"""What single commands print and accept: export's lines, generate's model and tokenizer,
compare's argument and token display, eval --quiet, compare-methods' figures, bench-decode's
dense row. On a tiny synthetic checkpoint."""
from __future__ import annotations

import json
import shutil
import unicodedata

import numpy as np
import pytest

from sparseinfer.model_export.generation import Generation
from sparseinfer.model_export.export_folder import export_checkpoint
from sparseinfer.model_export.synthetic import make_checkpoint
from sparseinfer.model_export.tokenizer import byte_level_tokenizer
from sparseinfer.tools.token_text import TextStream, display_text

from helpers import one_line_error, run_cli as run


VOCAB = 258                                   # the tiny checkpoint's: 256 bytes, <s>, </s>


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint("tiny", tmp_path_factory.mktemp("ck") / "tiny", layers=2)


@pytest.fixture(scope="module")
def sparse_export(tmp_path_factory, checkpoint):
    return export_checkpoint(checkpoint, tmp_path_factory.mktemp("export") / "sparse" / "model.onnx")


# --- export: one line on stderr, success or error -------------------------------------------

def test_export_prints_one_line_without_a_blank_one(tmp_path, checkpoint):
    r = run("export", checkpoint, "--dense", "--out", tmp_path / "d" / "model.onnx")
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and r.stderr.startswith("wrote ") and r.stderr.count("\n") == 1, repr(r.stderr)
    one_line_error(run("export", checkpoint, "--alpha", "0", "--out", tmp_path / "a" / "model.onnx"), "alpha")


# --- generate: the export folder or its .onnx; a tokenizer that fits the model --------------

def test_generate_takes_the_export_folder_as_well_as_its_model_file(tmp_path, sparse_export):
    args = ("--prompt", "The fox", "--max-new-tokens", "3", "--json")
    by_file, by_folder = run("generate", sparse_export, *args), run("generate", sparse_export.parent, *args)
    assert by_file.exit_code == 0 and by_folder.exit_code == 0, (by_file.output, by_folder.output)
    tokens = json.loads(by_file.stdout)["tokens"]
    assert len(tokens) == 3 and json.loads(by_folder.stdout)["tokens"] == tokens
    one_line_error(run("generate", tmp_path, *args), str(tmp_path / "model.onnx"))


def test_generate_refuses_a_tokenizer_too_small_for_the_model(tmp_path, sparse_export):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0}, unk_token="a")).save(str(tmp_path / "one.json"))
    r = run("generate", sparse_export, "--prompt", "a", "--tokenizer", tmp_path / "one.json", "--json")
    one_line_error(r, "one.json has 1 token,", f"the {VOCAB}-token model", "eos_token_id 257")
    big = byte_level_tokenizer()                      # the model's own size: accepted
    big.save(str(tmp_path / "bytes.json"))
    assert run("generate", sparse_export, "--prompt", "a", "--max-new-tokens", "2", "--tokenizer",
               tmp_path / "bytes.json", "--json").exit_code == 0
    # no BOS / EOS named: the tokenizer must then cover the whole vocabulary
    folder = tmp_path / "no-ids"
    shutil.copytree(sparse_export.parent, folder)
    (folder / "generation_config.json").write_text("{}")
    Tokenizer(models.WordLevel({chr(0x100 + i): i for i in range(200)}, unk_token="\u0100")).save(
        str(tmp_path / "200.json"))
    one_line_error(run("generate", folder, "--prompt", "a", "--tokenizer", tmp_path / "200.json"),
                   "200.json has 200 tokens", f"the {VOCAB}-token model")
    assert run("generate", folder, "--prompt", "a", "--max-new-tokens", "2", "--json").exit_code == 0


# --- compare: what it takes -----------------------------------------------------------------

def test_compare_names_its_argument_a_checkpoint_and_refuses_an_export(sparse_export):
    r = run("compare", "--help")
    assert r.exit_code == 0 and "CHECKPOINT" in r.stdout and "MODEL_DIR" not in r.stdout, r.stdout
    for export in (sparse_export, sparse_export.parent):
        one_line_error(run("compare", export, "--prompt", "hi"), str(export), "checkpoint", "generate")


# --- tokens as printed: control characters and U+FFFD escaped --------------------------------

def test_display_text_escapes_control_characters_and_replacement_characters():
    assert display_text("a\x1b[2Jb\x00\x7f\x85\ufffdc\u00e9") == "a\\x1b[2Jb\\x00\\x7f\\x85\\ufffdc\u00e9"
    assert display_text("x\ny\tz\r") == "x\\ny\\tz\\r"
    assert display_text("x\ny\tz\r", keep_lines=True) == "x\ny\tz\\r"


def test_a_stream_holds_a_partial_utf8_character_until_it_is_complete():
    tok = byte_level_tokenizer()
    prompt = tok.encode("Hi ", add_special_tokens=False).ids
    stream = TextStream(tok, prompt)
    pieces = [stream.push(b) for b in "é€".encode() + b"\xff!"] + [stream.end()]
    assert "".join(pieces) == "é€\ufffd!"
    assert pieces[:5] == ["", "é", "", "", "€"]           # never a U+FFFD for a character still to come


def _scripted(monkeypatch, runs):
    """``generation.generate`` replaced: the n-th call 'generates' ``runs[n]`` = (tokens, logits)."""
    from sparseinfer.model_export import generation

    calls = iter(runs)

    def fake(decoder, prompt_ids, max_new_tokens, *args, on_token=None, **kwargs):
        tokens, logits = next(calls)
        for t in tokens:
            if on_token:
                on_token(t)
        return Generation(list(prompt_ids), tokens=list(tokens), logits=list(logits), prefill_s=0.01,
                          decode_s=0.01)
    monkeypatch.setattr(generation, "generate", fake)


def _raw(text: str) -> list[str]:
    return [c for c in text if c == "\ufffd" or (c != "\n" and unicodedata.category(c) == "Cc")]


GARBAGE = [0x1B, 0x5B, 0x32, 0x4A, 0xC3, 0xA9, 0xFF, 0x0D, 0x41]     # ESC [2J, é, a lone 0xff, CR, A


def test_generate_prints_control_bytes_and_bad_utf8_escaped(monkeypatch, sparse_export):
    _scripted(monkeypatch, [(GARBAGE, [np.zeros(VOCAB, np.float32)] * len(GARBAGE))])
    r = run("generate", sparse_export, "--prompt", "P", "--max-new-tokens", str(len(GARBAGE)))
    assert r.exit_code == 0, r.output
    assert not _raw(r.stdout), repr(r.stdout)
    assert r.stdout == "P\\x1b[2J\u00e9\\ufffd\\rA\n", repr(r.stdout)


def test_compare_prints_tokens_escaped_and_says_what_its_agreement_compares(monkeypatch, checkpoint, tmp_path):
    dense, sparse = GARBAGE[:7], GARBAGE[:2] + [0x42] * 5       # part at token 2
    logits = [np.zeros(VOCAB, np.float32) for _ in dense]
    logits[2][dense[2]] = 0.25                                 # the dense run's margin there
    _scripted(monkeypatch, [(dense, logits), (sparse, [np.zeros(VOCAB, np.float32)] * len(sparse))])
    r = run("compare", checkpoint, "--prompt", "P", "--max-new-tokens", "7", "--work-dir", tmp_path)
    assert r.exit_code == 0, r.output
    assert not _raw(r.stdout), repr(r.stdout)
    assert "dense  '\\x1b[2J\u00e9\\ufffd'" in r.stdout, r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("token agreement"))
    assert line.startswith("token agreement 0.286: dense and sparse chose the same token at 2 of 7 positions")
    assert "at token 2" in line and "0.25 apart" in line and "only by chance" in line, line


# --- eval --quiet: no progress bar, lm-eval's included --------------------------------------

def test_eval_quiet_shows_no_progress_bar(tmp_path, checkpoint):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install -e '.[eval]')")
    from helpers import write_eval_data

    from sparseinfer.evaluation.data import BBH_TASKS

    data = write_eval_data(tmp_path / "data", [("Q?", "A\n#### 1")], dict.fromkeys(BBH_TASKS, 1))
    args = ["eval", checkpoint, "--tasks", "bbh_navigate", "--limit", "1", "--max-gen-toks", "2",
            "--data-dir", data, "--out", tmp_path / "out"]
    quiet = run(*args, "--quiet")
    assert quiet.exit_code == 0, quiet.output
    assert "it/s" not in quiet.stderr and "%|" not in quiet.stderr, quiet.stderr
    shown = run(*args)                                  # the same run with bars: they go to stderr
    assert shown.exit_code == 0 and "Checking cached requests" in shown.stderr, shown.stderr


# --- compare-methods: what its sparsity and bytes-skipped figures mean ----------------------

def test_compare_methods_breaks_down_and_explains_figures_above_the_target(checkpoint):
    args = ["compare-methods", checkpoint, "--methods", "teal,random,cats", "--sparsity", "0.5", "--max-prompts", "1",
            "--max-new-tokens", "2", "--max-calibration-prompts", "2"]
    r = run(*args, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    zeros = result["dense_zero_fraction"]                 # the FATReLU model's own exact zeros, ~0.9
    assert 0.7 < zeros < 1
    rows = {row["method"]: row for row in result["rows"]}
    teal = rows["teal"]["channels_dropped"]
    assert rows["teal"]["sparsity"] == pytest.approx((2 * teal["gate_up_inputs"] + teal["down_inputs"]) / 3)
    assert teal["gate_up_inputs"] == pytest.approx(0.5, abs=0.15) and teal["down_inputs"] >= zeros - 0.05
    assert rows["random"]["channels_dropped"] is None and rows["random"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    # +AS: the random rows' computed rows skip up and down where h1 is zero
    assert rows["random"]["bytes_skipped"] == pytest.approx((0.5 + 2 * (0.5 + 0.5 * zeros)) / 3, abs=0.05)
    text = run(*args)
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    sparsity_note = next(x for x in lines if x.startswith("sparsity: "))
    assert "(2 s_x + s_h) / 3" in sparsity_note
    bytes_note = next(x for x in lines if x.startswith("bytes skipped: "))
    assert "random at 0.5" in bytes_note and f"{rows['random']['bytes_skipped']:.3f}" in bytes_note
    above = next(x for x in lines if "exactly zero" in x and "threshold" in x)
    assert f"{zeros:.3f}" in above and "teal at 0.5" in above and "cats at 0.5" in above
    assert f"s_x {teal['gate_up_inputs']:.3f}, s_h {teal['down_inputs']:.3f}" in above


# --- bench-decode: the dense row is labelled dense -------------------------------------------

def test_bench_decode_labels_the_dense_row_dense(tmp_path):
    args = ["bench-decode", "--shape", "tiny", "--layers", "1", "--tokens", "2", "--repeats", "1",
            "--work-dir", tmp_path]
    r = run(*args, "--out", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["dense"]["mlp_kernels"] == "dense" and result["sparse"]["mlp_kernels"] in ("native", "function")
    row = next(x.split() for x in r.stdout.splitlines() if x.startswith("dense "))
    assert row[1] == "dense", r.stdout
