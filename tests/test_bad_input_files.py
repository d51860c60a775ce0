"""Files are written whole, OS errors are one line, Ctrl-C exits 130, JSON has no NaN.

Every file the product writes goes to a temporary name (or a staging folder) in its own
folder and is renamed into place only when complete (reference/files.py). These tests
interrupt or fail writers midway (an exception from the export's progress callback, a
write that fills the disk, a real SIGINT to a real process) and check that the previous
files are byte for byte intact and still decode, and that nothing partial is left.
"""
from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import digest, one_line_error, run_cli as run
from sparseinfer.model_export import export as export_module
from sparseinfer.model_export.decode import OnnxDecoder
from sparseinfer.model_export.export import ExportOptions, export_onnx
from sparseinfer.model_export.synthetic import make_checkpoint, make_weights, synthetic_shape
from sparseinfer.reference import files
from sparseinfer.reference.errors import SparseInferError

PROMPT = [256, 84, 104, 101, 32]


def no_partial_files(folder: Path) -> None:
    left = [p.name for p in folder.rglob("*") if p.name.startswith(".") or p.suffix in (".tmp", ".partial")]
    assert not left, f"partial files left in {folder}: {left}"


def strict_json(text: str):
    """json.loads that refuses NaN and ±Infinity, which Python's json accepts by default."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def weights():
    return make_weights(synthetic_shape("tiny", layers=3, kv_heads=2), seed=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint("tiny", tmp_path_factory.mktemp("ck") / "tiny", layers=2)


@pytest.fixture
def streamed(monkeypatch):
    """Every export streams its weights into model.onnx.data, as those above 1 GiB do."""
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_BYTES", 0)


class Interrupt(KeyboardInterrupt):
    pass


def _interrupt_after(n_layers: int):
    count = [0]

    def progress():
        count[0] += 1
        if count[0] == n_layers:
            raise Interrupt()
    return progress


def _first_logits(path):
    return OnnxDecoder(path, "cpu").step(PROMPT)[0]


# --- exports: the model and its .data, written whole and moved in together -------------------

def test_an_interrupted_export_leaves_no_partial_file(tmp_path, weights, streamed):
    with pytest.raises(Interrupt):
        export_onnx(weights, tmp_path / "m.onnx", ExportOptions(sparse=False), progress=_interrupt_after(2))
    assert list(tmp_path.iterdir()) == []                   # no .onnx, no .onnx.data, no staging folder


def test_an_interrupted_re_export_keeps_the_good_one(tmp_path, weights, streamed):
    good = export_onnx(weights, tmp_path / "m.onnx", ExportOptions(sparse=False))
    assert (tmp_path / "m.onnx.data").stat().st_size > 4 * weights.layers[0].gate.size   # the weights are there
    before, logits = digest(tmp_path), _first_logits(good)
    with pytest.raises(Interrupt):              # a different export (sparse), cut short midway
        export_onnx(weights, good, ExportOptions(sparse=True, alpha="1.05"), progress=_interrupt_after(2))
    assert digest(tmp_path) == before
    assert np.array_equal(_first_logits(good), logits) and np.abs(logits).max() > 0


def test_a_re_export_that_fails_at_the_check_keeps_the_good_one(tmp_path, weights, streamed, monkeypatch):
    good = export_onnx(weights, tmp_path / "m.onnx", ExportOptions(sparse=False))
    before = digest(tmp_path)

    def bad_check(path, **kw):
        assert Path(path).stat().st_size > 0 and Path(path).parent != tmp_path    # checked where it was staged
        raise SparseInferError("planted checker failure")
    monkeypatch.setattr(export_module.onnx.checker, "check_model", bad_check)
    with pytest.raises(SparseInferError, match="planted"):
        export_onnx(weights, good, ExportOptions(sparse=False, max_length=64))
    assert digest(tmp_path) == before
    OnnxDecoder(good, "cpu").step(PROMPT)


def test_a_re_export_without_data_removes_the_stale_data(tmp_path, weights, monkeypatch):
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_BYTES", 0)
    path = export_onnx(weights, tmp_path / "m.onnx", ExportOptions(sparse=False))
    assert (tmp_path / "m.onnx.data").is_file()
    monkeypatch.undo()
    export_onnx(weights, path, ExportOptions(sparse=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genai_config.json", "m.onnx"]
    OnnxDecoder(path, "cpu").step(PROMPT)


def test_commit_puts_the_previous_pair_back_when_a_rename_fails(tmp_path, monkeypatch):
    (tmp_path / "m.onnx").write_bytes(b"old model")
    (tmp_path / "m.onnx.data").write_bytes(b"old data")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if Path(dst).name == "m.onnx" and Path(src).parent.name.endswith(".partial"):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)
    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(SparseInferError, match=r"cannot write .*m\.onnx: Input/output error \(EIO\)"):
        with files.staging_folder(tmp_path, "m.onnx") as stage:
            (stage / "m.onnx.data").write_bytes(b"new data")
            (stage / "m.onnx").write_bytes(b"new model")
            files.commit(stage, tmp_path, ["m.onnx.data", "m.onnx"])
    assert calls[:2] == ["m.onnx.data", "m.onnx"]            # the data was moved in, then put back
    assert (tmp_path / "m.onnx").read_bytes() == b"old model"
    assert (tmp_path / "m.onnx.data").read_bytes() == b"old data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


# --- a full disk, a path under a regular file: one line, exit 2, no partial file ----------------

class FullDisk:
    """``open`` whose files take ``room`` bytes, then fail with ENOSPC (what a full disk does)."""

    def __init__(self, room: int = 100):
        self.room = room

    def __call__(self, file, mode="r", *args, **kw):
        f = open(file, mode, *args, **kw)
        if "w" not in mode and "a" not in mode:
            return f
        real_write, room = f.write, [self.room]

        def write(data):
            data = memoryview(data).cast("B") if not isinstance(data, str) else data
            if len(data) > room[0]:
                real_write(data[:room[0]])
                room[0] = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            room[0] -= len(data)
            return real_write(data)
        f.write = write
        return f


def test_disk_full_during_an_export_is_one_line_and_keeps_the_good_one(tmp_path, checkpoint, monkeypatch):
    from sparseinfer.model_export import onnx_builder

    out = tmp_path / "ex" / "model.onnx"
    assert run("export", checkpoint, "--out", out, "--dense").exit_code == 0
    before = digest(out.parent)
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_BYTES", 0)
    monkeypatch.setattr(onnx_builder, "open", FullDisk(room=1 << 16), raising=False)
    one_line_error(run("export", checkpoint, "--out", out, "--dense"), "model.onnx", "No space left on device (ENOSPC)")
    assert digest(out.parent) == before
    OnnxDecoder(out, "cpu").step(PROMPT)


def test_disk_full_while_saving_the_model_is_one_line(tmp_path, checkpoint, monkeypatch):
    def save_model(model, path, *a, **kw):
        Path(path).write_bytes(b"\x08\x0a" * 50)            # a truncated protobuf
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(export_module.onnx, "save_model", save_model)
    one_line_error(run("export", checkpoint, "--out", tmp_path / "model.onnx", "--dense"), "ENOSPC")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import safetensors.numpy

    out = tmp_path / "ck"
    assert run("make-checkpoint", "--out", out, "--layers", "1").exit_code == 0
    before = digest(out)
    real_save = safetensors.numpy.save_file

    def save_file(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:                        # the last bytes never made it
            f.truncate(os.path.getsize(path) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(safetensors.numpy, "save_file", save_file)
    one_line_error(run("make-checkpoint", "--out", out, "--layers", "2", "--seed", "1"), "ENOSPC")
    assert digest(out) == before
    one_line_error(run("make-checkpoint", "--out", tmp_path / "fresh"), "ENOSPC")
    assert not (tmp_path / "fresh").exists()                 # no config.json without weights, no empty folder


def test_disk_full_while_writing_a_plot_keeps_the_previous_one(tmp_path, monkeypatch):
    args = ["fig4", "--json", "--plot", tmp_path / "fig4.png"]
    assert run(*args).exit_code == 0
    before = digest(tmp_path)
    assert (tmp_path / "fig4.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setattr(files, "open", FullDisk(room=500), raising=False)
    one_line_error(run(*args), "fig4.png", "No space left on device (ENOSPC)")
    assert digest(tmp_path) == before


def test_disk_full_while_writing_json_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    files.write_json(path, {"old": 1})
    monkeypatch.setattr(files, "open", FullDisk(room=10), raising=False)
    with pytest.raises(SparseInferError, match=r"r\.json: No space left on device \(ENOSPC\)$"):
        files.write_json(path, {"rows": list(range(100))})
    assert strict_json(path.read_text()) == {"old": 1}
    no_partial_files(tmp_path)


@pytest.mark.parametrize("command", [
    ["export", "{ck}", "--dense", "--out", "{file}/m.onnx"],
    ["export", "{ck}", "--dense", "--out", "{file}/sub/m.onnx"],
    ["make-checkpoint", "--out", "{file}/ck"],
    ["fig4", "--plot", "{file}/fig4.png"],
    ["bench-decode", "--checkpoint", "{ck}", "--work-dir", "{file}/work", "--tokens", "2", "--repeats", "1"],
])
def test_an_output_path_under_a_regular_file_is_one_line(tmp_path, checkpoint, command):
    regular = tmp_path / "regular"
    regular.write_text("not a folder\n")
    line = one_line_error(run(*[c.format(ck=checkpoint, file=regular) for c in command]), str(regular))
    assert "not a directory" in line.lower() or "is a file" in line.lower(), line
    assert regular.read_text() == "not a folder\n" and sorted(tmp_path.iterdir()) == [regular]


def test_os_errors_from_anywhere_are_one_line(tmp_path, monkeypatch, checkpoint):
    from sparseinfer.model_export import export_folder

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "x"))
    monkeypatch.setattr(export_folder, "export_checkpoint", denied)
    one_line_error(run("export", checkpoint, "--dense", "--out", tmp_path / "m.onnx"),
                   str(tmp_path / "x"), "Permission denied (EACCES)")


# --- Ctrl-C ----------------------------------------------------------------------------------

SLOW_EXPORT = """
import sys, time
import sparseinfer.model_export.export as e
e.EXTERNAL_DATA_BYTES = 0                        # stream the weights into model.onnx.data, as big exports do
init = e.LlamaExporter.__init__
def slow_init(self, *a, **k):                    # a few seconds per layer: a big checkpoint's pace
    init(self, *a, **k)
    step = self.progress
    self.progress = lambda: (step(), print("layer", flush=True, file=sys.stderr), time.sleep(3))
e.LlamaExporter.__init__ = slow_init
from sparseinfer.tools.cli import cli
sys.argv[0] = "sparseinfer"
cli()
"""


def _signal_a_slow_export(checkpoint, out, sig, *extra, env=None, after_a_layer=lambda: None):
    """A real ``sparseinfer export --dense`` at a big checkpoint's pace, sent ``sig`` once it has
    written a layer (and ``after_a_layer`` has looked at its files); its exit code and stderr."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, "export", str(checkpoint), "--out", str(out),
                             "--dense", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline().strip() == "layer"
        after_a_layer()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


def test_ctrl_c_during_a_re_export_exits_130_and_keeps_the_good_one(tmp_path, checkpoint):
    out = tmp_path / "ex" / "model.onnx"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-c", SLOW_EXPORT.replace("time.sleep(3)", "None"), "export",
                           str(checkpoint), "--out", str(out), "--dense"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out.parent / "model.onnx.data").stat().st_size > 1 << 20
    before, logits = digest(out.parent), _first_logits(out)

    def staged():                                             # one layer's weights are in the staged .data
        left = [p for p in out.parent.iterdir() if p.name.endswith(".partial")]
        assert left and (left[0] / "model.onnx.data").stat().st_size > 0
    code, err = _signal_a_slow_export(checkpoint, out, signal.SIGINT, "--portable", env=env,   # another export
                                      after_a_layer=staged)                                      # over the good one
    assert code == 130, err
    assert err.strip().splitlines()[-1] == "error: interrupted", err
    assert "Traceback" not in err
    assert digest(out.parent) == before                       # the good pair, untouched; nothing staged left
    assert np.array_equal(_first_logits(out), logits)


def test_ctrl_c_during_a_fresh_export_leaves_nothing(tmp_path, checkpoint):
    code, err = _signal_a_slow_export(checkpoint, tmp_path / "model.onnx", signal.SIGINT)
    assert code == 130 and err.strip().splitlines()[-1] == "error: interrupted", err
    assert list(tmp_path.iterdir()) == []


# --- SIGKILL: no cleanup is possible, so the next write removes what a dead writer left ------

HOLD = """
import sys, time
from sparseinfer.reference import files
if sys.argv[2] == "stage":
    with files.staging_folder(sys.argv[1], "model.onnx") as stage:
        (stage / "model.onnx.data").write_bytes(b"x" * 4096)
        print(stage.name, flush=True)
        time.sleep(600)
else:
    with files.replacing(sys.argv[1] + "/result.json") as tmp:
        tmp.write_text("{")
        print(tmp.name, flush=True)
        time.sleep(600)
"""


def _holding(folder, kind):
    """A real process that holds a staging folder (or a temporary file) in ``folder``, and its name."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), kind], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


@pytest.mark.parametrize("kind", ["stage", "file"])
def test_what_a_sigkilled_writer_left_is_removed_by_the_next_write_and_a_live_ones_kept(tmp_path, kind):
    dead, dead_name = _holding(tmp_path, kind)
    live, live_name = _holding(tmp_path, kind)
    try:
        assert dead_name and live_name and dead_name != live_name
        dead.send_signal(signal.SIGKILL)
        dead.wait(timeout=30)
        assert (tmp_path / dead_name).exists()                     # a SIGKILL leaves it behind
        files.write_json(tmp_path / "other.json", {"a": 1})        # any write into the folder
        assert not (tmp_path / dead_name).exists()
        assert (tmp_path / live_name).exists()                     # its writer still runs
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["other.json", live_name])
    finally:
        live.kill()
        live.wait(timeout=30)
    files.write_json(tmp_path / "other.json", {"a": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["other.json"]


def test_remove_stale_leaves_other_files_alone(tmp_path):
    host, gone = files._HOST, 2**22 + 12345                       # above pid_max's default: no such process
    keep = [f".model.onnx.other-host-{gone}.abcdefgh.partial", f".x.{host}-{os.getpid()}.abcdefgh.tmp",
            f".x.{host}-{gone}.ABCDEFGH.tmp", "model.onnx", f"x.{host}-{gone}.abcdefgh.tmp", ".hidden"]
    for name in keep:
        (tmp_path / name).mkdir() if name.endswith(".partial") else (tmp_path / name).write_text("x")
    stale = tmp_path / f".model.onnx.{host}-{gone}.abcd_123.partial"
    (stale / ".previous").mkdir(parents=True)
    (stale / "model.onnx.data").write_text("x")
    assert files.remove_stale(tmp_path) == [stale.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_an_export_killed_with_sigkill_leaves_nothing_after_the_next_export(tmp_path, checkpoint):
    out = tmp_path / "model.onnx"
    _signal_a_slow_export(checkpoint, out, signal.SIGKILL)
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert left and (left[0] / "model.onnx.data").stat().st_size > 0 and not out.exists()
    r = run("export", checkpoint, "--out", out, "--dense")
    assert r.exit_code == 0, r.output
    no_partial_files(tmp_path)
    assert np.isfinite(_first_logits(out)).all()


# --- JSON never holds NaN or Infinity ----------------------------------------------------------

finite_or_not = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=10)


@given(finite_or_not)
def test_json_text_maps_every_non_finite_float_to_null_and_says_where(data):
    text = files.json_text(data)
    got = strict_json(text)

    def count(v):
        if isinstance(v, dict):
            return sum(count(x) for x in v.values())
        if isinstance(v, list):
            return sum(count(x) for x in v)
        return int(isinstance(v, float) and not math.isfinite(v))
    n = count(data)
    if n and isinstance(data, dict):
        assert len(got.pop(files.NON_FINITE_KEY)) == n
    assert count(got) == 0
    assert files.json_text(got) == json.dumps(got, indent=2)         # finite data: plain json.dumps


def test_json_text_takes_numpy_values():
    got = strict_json(files.json_text({"a": np.float32("nan"), "b": np.float64(1.5), "c": np.array([1.0, np.inf]),
                                       "d": np.int64(3)}))
    assert got == {"a": None, "b": 1.5, "c": [1.0, None], "d": 3, files.NON_FINITE_KEY: ["$.a"]}


def test_bench_decode_repeats_0_and_tokens_1_are_refused():
    one_line_error(run("bench-decode", "--repeats", "0"), "--repeats")
    one_line_error(run("bench-decode", "--tokens", "1"), "--tokens")


def test_bench_decode_json_has_no_nan(tmp_path, checkpoint, monkeypatch):
    """A run whose timings are not finite (here: planted) still prints and writes valid JSON."""
    from sparseinfer.model_export.generation import Generation

    monkeypatch.setattr(Generation, "decode_tokens_per_s", property(lambda self: float("nan")))
    monkeypatch.setattr(os, "sync", lambda: None)            # the machine's other writes are not this test's
    out = tmp_path / "results" / "bench.json"
    r = run("bench-decode", "--checkpoint", checkpoint, "--tokens", "2", "--repeats", "1", "--mlp-kernels",
            "function", "--work-dir", tmp_path / "work", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    for text in (r.stdout, out.read_text()):
        got = strict_json(text)
        assert got["dense"]["tokens_per_s_median"] is None and got["speedup"] is None
        assert "$.dense.tokens_per_s_median" in got[files.NON_FINITE_KEY]
    no_partial_files(tmp_path / "results")


def test_written_files_keep_the_usual_permissions(tmp_path):
    files.write_whole(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask


# --- a corrupted config.json or tensor: exit 0 with a model, or exit 2 with one line --------------

CONFIG_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps",
                 "hidden_act", "tie_word_embeddings", "hidden_act_param", "bos_token_id", "eos_token_id"]
odd_values = (st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from([1 << 40, 2.5, 1e308, -0.0, "x", "8",
                                                                               [], {}])
              | st.floats(allow_nan=True, allow_infinity=True))


@given(field=st.sampled_from(CONFIG_FIELDS), value=odd_values)
def test_a_corrupted_config_field_exports_or_is_one_line(tmp_path_factory, checkpoint, field, value):
    import shutil

    ck = tmp_path_factory.mktemp("bad") / "ck"
    shutil.copytree(checkpoint, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg[field] = value
    (ck / "config.json").write_text(json.dumps(cfg))
    out = ck.parent / "m.onnx"
    r = run("export", ck, "--dense", "--out", out)
    if r.exit_code == 0:
        OnnxDecoder(out, "cpu").step(PROMPT[:1])            # a valid model (its context may be 1)
    else:
        one_line_error(r)
        assert not out.exists()
    if field in CONFIG_FIELDS[:7] and (isinstance(value, bool) or not isinstance(value, int) or value < 1) \
            and not (field == "num_key_value_heads" and value is None):
        one_line_error(r, field)                     # a size that is not a positive integer is named
    if field == "hidden_act_param" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                        or not abs(value) <= float(np.finfo(np.float32).max)):
        one_line_error(r, field)                     # the FATReLU threshold
    ids = value if field == "eos_token_id" and isinstance(value, list) else [value]     # (several end tokens)
    if field in ("bos_token_id", "eos_token_id") and value is not None \
            and not all(type(v) is int and 0 <= v < 258 for v in ids):
        one_line_error(r, field)                     # a token id outside the vocabulary (or no id at all)
    if field == "vocab_size" and type(value) is int and value not in (0, 258):
        one_line_error(r, field)                     # not the embedding's rows, whatever the token ids


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_a_non_finite_weight_is_refused_naming_the_tensor(tmp_path, bad, dtype):
    from safetensors.numpy import load_file, save_file

    ck = make_checkpoint("tiny", tmp_path / "ck", layers=1, dtype=dtype)
    tensors = load_file(str(ck / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    t = tensors[name].copy()
    if t.dtype == np.uint16 or str(t.dtype) == "bfloat16":
        t.view(np.uint16)[3, 5] = 0x7FC0 if bad != bad else 0x7F80
    else:
        t[3, 5] = bad
    tensors[name] = t
    save_file(tensors, str(ck / "model.safetensors"))
    one_line_error(run("export", ck, "--dense", "--out", tmp_path / "m.onnx"), name, "non-finite", "(3, 5)")
    assert not (tmp_path / "m.onnx").exists()


# --- errors that name the thing at fault ---------------------------------------------------------

@pytest.fixture(scope="module")
def silu_checkpoint(tmp_path_factory):
    return make_checkpoint("tiny", tmp_path_factory.mktemp("silu") / "silu", layers=1, hidden_act="silu")


@pytest.mark.parametrize("command", ["predictor-stats", "sweep"])
def test_the_sign_predictor_at_alpha_on_silu_points_to_approximate(silu_checkpoint, command):
    """Refused before the dense decodes (the error is the only line on stderr), naming the
    activation and the option that runs it."""
    one_line_error(run(command, silu_checkpoint, "--max-prompts", 1, "--max-new-tokens", 1),
                   "silu: activation silu has no exact zeros", "pass --approximate")
    r = run("predictor-stats", silu_checkpoint, "--max-prompts", 1, "--max-new-tokens", 1, "--approximate", "--json")
    assert r.exit_code == 0, r.output
    assert 0 < json.loads(r.stdout)["mean"]["predicted_sparsity"] < 1          # what --approximate runs


def test_a_config_path_that_is_a_folder_is_named_a_folder(tmp_path):
    (tmp_path / "config.json").mkdir()
    line = one_line_error(run("memory", "--model", tmp_path / "config.json"), "config.json: a directory, not a config file")
    assert "no such" not in line and "config.json/config.json" not in line
