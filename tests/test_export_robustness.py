"""Exports and checkpoints written whole or not at all, whatever happens: a destination that
is not a regular file, a full disk, SIGTERM, a checkpoint whose config leaves weights out; and
the export cache's key, derived from every source an export depends on."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import stat
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_bad_input_files import _signal_a_slow_export, digest, no_partial_files, one_line_error, run

from sparseinfer.evaluation import export_sources, exports
from sparseinfer.model_export import export as export_module
from sparseinfer.model_export import export_folder, genai_config, synthetic
from sparseinfer.model_export.decode import OnnxDecoder
from sparseinfer.model_export.export import ExportOptions, export_onnx
from sparseinfer.model_export.loaders import load_checkpoint
from sparseinfer.model_export.synthetic import make_checkpoint, make_weights, synthetic_shape
from sparseinfer.reference import files
from sparseinfer.reference.errors import SparseInferError

ENOSPC_TEXT = "No space left on device (ENOSPC)"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint("tiny", tmp_path_factory.mktemp("ck") / "tiny", layers=2)


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def entries(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones included) and its kind, links not followed."""
    kinds = ((stat.S_ISLNK, "link"), (stat.S_ISFIFO, "fifo"), (stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"))
    return {str(p.relative_to(folder)): next(k for test, k in kinds if test(os.lstat(p).st_mode))
            for p in sorted(folder.rglob("*"))}


# --- the export cache's key: every source an export depends on -------------------------------

def _copied_package(tmp_path) -> Callable[[str], Path | None]:
    """The subpackages holding exporter sources, copied under ``tmp_path``; their folder lookup."""
    for sub in {name.split("/")[0] for name in export_sources.exporter_files()}:
        shutil.copytree(export_sources.installed_folder(sub), tmp_path / sub,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return lambda sub: tmp_path / sub if (tmp_path / sub).is_dir() else None


def test_the_exporter_sources_are_found_from_the_imports():
    found = export_sources.exporter_files()
    for name in ("model_export/export.py", "model_export/export_folder.py", "model_export/onnx_builder.py",
                 "model_export/loaders/hf_folder.py", "model_export/loaders/gguf_file.py", "reference/activations.py",
                 "reference/alpha.py", "reference/llama.py", "reference/files.py", "evaluation/exports.py",
                 "model_export/native/sparse_mlp_op.cc"):
        assert name in found, name
    assert "tools/cli.py" not in found and "evaluation/runner.py" not in found      # not the whole package
    assert all(path.is_file() for path in found.values())
    assert exports.export_key(Path(__file__), exports.Row("dense"), "cpu")["exporter"] == export_sources.source_hash()


@pytest.mark.parametrize("changed", ["reference/activations.py", "reference/alpha.py", "reference/llama.py",
                                     "model_export/onnx_builder.py", "model_export/native/sparse_mlp_op.cc"])
def test_changing_any_source_the_exporter_depends_on_changes_the_key(tmp_path, changed):
    folder_of = _copied_package(tmp_path)
    before = export_sources.source_hash(folder_of)
    assert before == export_sources.source_hash()                   # the copy hashes as the installed package
    path = tmp_path / changed
    path.write_bytes(path.read_bytes() + b"\n")
    assert export_sources.source_hash(folder_of) != before


def test_a_module_imported_inside_a_function_joins_the_key(tmp_path):
    folder_of = _copied_package(tmp_path)
    (tmp_path / "reference" / "new_rule.py").write_text("RULE = 1\n")
    before = export_sources.source_hash(folder_of)
    assert "reference/new_rule.py" not in export_sources.exporter_files(folder_of)
    export_py = tmp_path / "model_export" / "export.py"
    export_py.write_text(export_py.read_text() + "\n\ndef _rule():\n    from ..reference import new_rule\n"
                         "    return new_rule.RULE\n")
    assert "reference/new_rule.py" in export_sources.exporter_files(folder_of)
    after = export_sources.source_hash(folder_of)
    assert after != before
    (tmp_path / "reference" / "new_rule.py").write_text("RULE = 2\n")
    assert export_sources.source_hash(folder_of) != after


# --- a failed export leaves nothing, not even the folder it made -------------------------------

def test_a_failed_export_removes_the_folders_it_made(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setattr(export_module.onnx, "save_model", enospc)
    one_line_error(run("export", checkpoint, "--out", tmp_path / "a" / "b" / "model.onnx", "--dense"), ENOSPC_TEXT)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()                                     # a folder that was there stays
    one_line_error(run("export", checkpoint, "--out", tmp_path / "mine" / "model.onnx", "--dense"), ENOSPC_TEXT)
    assert entries(tmp_path) == {"mine": "dir"}


def test_an_interrupted_export_removes_the_folders_it_made(tmp_path):
    weights = make_weights(synthetic_shape("tiny", layers=2), seed=1)

    def interrupt():
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        export_onnx(weights, tmp_path / "x" / "y" / "m.onnx", ExportOptions(sparse=False), progress=interrupt)
    assert list(tmp_path.iterdir()) == []


# --- a destination that is not a regular file is never replaced ---------------------------------

def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _link_to_fifo(path: Path) -> Path:
    os.symlink(_fifo(path.with_name("fifo")), path)
    return path


@pytest.mark.parametrize("make, kind", [(_fifo, "FIFO"), (_link_to_fifo, "FIFO (through a symbolic link)")])
def test_an_export_onto_something_not_a_regular_file_is_refused(tmp_path, checkpoint, make, kind):
    out = make(tmp_path / "model.onnx")
    before = entries(tmp_path)
    line = one_line_error(run("export", checkpoint, "--out", out, "--dense"), str(out),
                          f"it is a {kind}, not a regular file")
    assert "error: cannot write" in line
    assert entries(tmp_path) == before                              # untouched, and nothing written beside it
    one_line_error(run("export", tmp_path / "no-such-checkpoint", "--out", out), kind)   # refused before loading


@pytest.mark.parametrize("companion", ["genai_config.json", "tokenizer.json", "tokenizer_config.json",
                                       "model.onnx.data"])
def test_an_export_whose_companion_file_is_not_a_regular_file_writes_nothing(tmp_path, checkpoint, companion):
    _fifo(tmp_path / companion)
    before = entries(tmp_path)
    one_line_error(run("export", checkpoint, "--out", tmp_path / "model.onnx", "--dense"),
                   str(tmp_path / companion), "FIFO")
    assert entries(tmp_path) == before


def test_a_companion_turned_into_a_fifo_during_the_export_moves_nothing(tmp_path, checkpoint, monkeypatch):
    """The check before the work, and again in the commit, where the files are moved in."""
    out = tmp_path / "model.onnx"
    assert run("export", checkpoint, "--out", out, "--dense").exit_code == 0
    good = digest(tmp_path)
    real = genai_config.write_genai_config                             # export_onnx imports it when it runs

    def and_a_fifo(*args, **kwargs):
        (tmp_path / "tokenizer.json").unlink()
        _fifo(tmp_path / "tokenizer.json")
        return real(*args, **kwargs)
    monkeypatch.setattr(genai_config, "write_genai_config", and_a_fifo)
    one_line_error(run("export", checkpoint, "--out", out, "--dense", "--portable"), "tokenizer.json", "FIFO")
    assert digest(tmp_path) == {k: v for k, v in good.items() if k != "tokenizer.json"}
    assert entries(tmp_path)["tokenizer.json"] == "fifo"
    no_partial_files(tmp_path)


def test_make_checkpoint_onto_a_fifo_config_writes_nothing(tmp_path):
    _fifo(tmp_path / "config.json")
    one_line_error(run("make-checkpoint", "--out", tmp_path, "--layers", "1"), "config.json", "FIFO")
    assert entries(tmp_path) == {"config.json": "fifo"}


def test_a_single_file_write_onto_a_fifo_is_refused(tmp_path):
    target = _fifo(tmp_path / "r.json")
    with pytest.raises(SparseInferError, match=r"r\.json: it is a FIFO, not a regular file$"):
        files.write_json(target, {"a": 1})
    assert entries(tmp_path) == {"r.json": "fifo"}


# --- a full disk: one line, nothing left ---------------------------------------------------------

def test_disk_full_writing_a_companion_file_leaves_nothing(tmp_path, checkpoint, monkeypatch):
    out = tmp_path / "ex" / "model.onnx"
    monkeypatch.setattr(export_folder, "write_json", enospc)           # generation_config.json, tokenizer_config.json
    one_line_error(run("export", checkpoint, "--out", out, "--dense"), ENOSPC_TEXT)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert run("export", checkpoint, "--out", out, "--dense").exit_code == 0
    good = digest(out.parent)
    monkeypatch.setattr(export_folder, "write_json", enospc)
    one_line_error(run("export", checkpoint, "--out", out, "--dense", "--portable"), ENOSPC_TEXT)   # another one
    assert digest(out.parent) == good
    assert np.isfinite(OnnxDecoder(out, "cpu").step([256, 84])[0]).all()


class FullTokenizer:
    """A tokenizer whose save fails as the tokenizers library's does on a full disk."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def save(self, path, *args):
        Path(path).write_text('{"version"')
        raise Exception("No space left on device (os error 28)")


def test_disk_full_as_the_tokenizers_library_reports_it_is_one_line(tmp_path, checkpoint):
    ck = load_checkpoint(checkpoint)
    ck = dataclasses.replace(ck, tokenizer=FullTokenizer(ck.tokenizer))
    out = tmp_path / "ex" / "model.onnx"
    with pytest.raises(SparseInferError, match=f"^cannot write {out}: No space left on device \\(ENOSPC\\)$"):
        export_folder.export_checkpoint(ck, out, sparse=False)
    assert list(tmp_path.iterdir()) == []


def test_make_checkpoint_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def save_file_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    out = tmp_path / "new" / "ck"
    monkeypatch.setattr("safetensors.numpy.save_file", save_file_full)
    one_line_error(run("make-checkpoint", "--out", out, "--layers", "1"), str(out), ENOSPC_TEXT)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    real = synthetic.byte_level_tokenizer
    monkeypatch.setattr(synthetic, "byte_level_tokenizer", lambda: FullTokenizer(real()))
    one_line_error(run("make-checkpoint", "--out", out, "--layers", "1"), str(out), ENOSPC_TEXT)
    assert list(tmp_path.iterdir()) == []


# --- tensors the config does not account for ------------------------------------------------------

def _one_layer_config(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_weights_of_layers_the_config_leaves_out_are_an_error_naming_them(tmp_path, checkpoint):
    ck = _one_layer_config(checkpoint, tmp_path / "ck")
    out = tmp_path / "ex" / "model.onnx"
    line = one_line_error(run("export", ck, "--out", out, "--dense"), str(ck),
                          "tensor model.layers.1.", "not accounted for by the config", "and 8 more",
                          "the weights hold layer 1, but the config has 1 layer")
    assert "model.layers.0." not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    with pytest.raises(SparseInferError, match="not accounted for"):
        load_checkpoint(ck)


def test_a_stray_tensor_is_named_and_a_derived_rotary_buffer_is_not(tmp_path, checkpoint):
    ck = shutil.copytree(checkpoint, tmp_path / "ck")
    tensors = load_file(ck / "model.safetensors")
    inv_freq = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}
    save_file({**tensors, **inv_freq}, ck / "model.safetensors")
    assert load_checkpoint(ck).shape.num_layers == 2                 # recomputed from rope_theta: allowed
    save_file({**tensors, "model.extra_proj.weight": np.ones((2, 2), np.float32)}, ck / "model.safetensors")
    with pytest.raises(SparseInferError, match=r"tensor model\.extra_proj\.weight is not accounted for by the "
                                               r"config$"):
        load_checkpoint(ck)


def test_an_lm_head_beside_tied_embeddings_is_passed_over_and_an_untied_extra_head_is_not(tmp_path, checkpoint):
    ck = shutil.copytree(checkpoint, tmp_path / "ck")
    config = json.loads((ck / "config.json").read_text())
    tensors = load_file(ck / "model.safetensors")
    head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    tensors.pop("lm_head.weight", None)
    config["tie_word_embeddings"] = True
    (ck / "config.json").write_text(json.dumps(config))
    save_file({**tensors, "lm_head.weight": head, "rope_freqs.weight": np.ones(4, np.float32)},
              ck / "model.safetensors")
    loaded = load_checkpoint(ck)                                     # Hugging Face ties them: never read
    assert loaded.shape.tie_word_embeddings and loaded.shape.num_layers == 2
    save_file({**tensors, "lm_head.bias": np.ones(head.shape[0], np.float32)}, ck / "model.safetensors")
    with pytest.raises(SparseInferError, match=r"tensor lm_head\.bias is not accounted for"):
        load_checkpoint(ck)


def test_a_gguf_holding_more_blocks_than_its_block_count_is_an_error(tmp_path):
    pytest.importorskip("gguf")
    from test_checkpoint_gguf import _write

    weights = make_weights(synthetic_shape("tiny", layers=2), seed=4)
    says_one = dataclasses.replace(weights, shape=dataclasses.replace(weights.shape, num_layers=1))
    _write(tmp_path / "m.gguf", says_one)                            # block_count 1, blk.0.* and blk.1.*
    with pytest.raises(SparseInferError, match=r"m\.gguf: tensor blk\.1\.\S+ is not accounted for by the config, "
                                               r"and 8 more: .*the weights hold layer 1, but the config has 1 layer$"):
        load_checkpoint(tmp_path / "m.gguf")


# --- SIGTERM cleans up as Ctrl-C does -----------------------------------------------------------

def test_sigterm_during_a_fresh_export_leaves_nothing(tmp_path, checkpoint):
    code, err = _signal_a_slow_export(checkpoint, tmp_path / "sub" / "model.onnx", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "error: terminated" and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []                            # no staging folder, no partial .data, no sub/


def test_sigterm_during_a_re_export_keeps_the_good_one(tmp_path, checkpoint):
    out = tmp_path / "model.onnx"
    assert run("export", checkpoint, "--out", out, "--dense").exit_code == 0
    good = digest(tmp_path)

    def staged():
        left = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
        assert left and (left[0] / "model.onnx.data").stat().st_size > 0
    code, err = _signal_a_slow_export(checkpoint, out, signal.SIGTERM, "--portable", after_a_layer=staged)
    assert code == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert digest(tmp_path) == good
    no_partial_files(tmp_path)


def test_sigterm_is_held_back_while_files_are_moved_into_place(tmp_path):
    stage = tmp_path / "stage"
    stage.mkdir()
    for name in ("a", "b"):
        (stage / name).write_text(name)
    caught = []

    def replace(src, dst, real=os.replace):
        real(src, dst)
        if not caught:
            caught.append("sent")
            os.kill(os.getpid(), signal.SIGTERM)                     # between the two renames

    # SIGTERM's default action, as in a fresh `sparseinfer` process (a library loaded by an
    # earlier test in this process, Ray for one, may have installed its own handler).
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with files.terminate_as_interrupt():
            try:
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(files.os, "replace", replace)
                    files.commit(stage, tmp_path, ["a", "b"])
            except files.Terminated:
                caught.append("raised after the commit")
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert caught == ["sent", "raised after the commit"]
    assert (tmp_path / "a").read_text() == "a" and (tmp_path / "b").read_text() == "b"
