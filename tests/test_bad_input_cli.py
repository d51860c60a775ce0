"""Bad input through the command line, command by command.

Every command that takes files or numbers is fed corrupted configs, weights, safetensors
headers, parameters, hardware files, ONNX metadata and generation configs. The rule checked
everywhere (``clean``): exit 0 with a correct result, or exit 2 with exactly one line
``error: ...`` that names the problem; never a traceback, never a partial file, never NaN or
Infinity in JSON. Written files and interrupts are in test_bad_input_files.py; the helpers
are shared with it.
"""
from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_input_files import CONFIG_FIELDS, no_partial_files, odd_values, one_line_error, run, strict_json

from sparseinfer.model_export.export_folder import export_checkpoint
from sparseinfer.model_export.loaders.safetensors_header import SAFETENSORS_ITEMSIZE
from sparseinfer.model_export.synthetic import make_checkpoint
from sparseinfer.sim.hardware import builtin_hardware, tomllib

# the fixtures are module-scoped folders that each example copies before corrupting
FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SLOW = settings(FIXTURE_OK, max_examples=15)      # examples that export or decode a model


def error_last(r, *needles) -> str:
    """Exit 2, nothing on stdout, and on stderr, after any progress lines, one line 'error: ...'
    holding every needle (and no traceback)."""
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert r.stdout == "" and "Traceback" not in r.stderr, r.output
    lines = r.stderr.strip().splitlines()
    assert lines and [x for x in lines if x.startswith("error:")] == lines[-1:], r.stderr
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def clean(r, *needles) -> bool:
    """Exit 0 (True; JSON on stdout, if any, holds no NaN) or exit 2 with one line holding every
    needle (False); anything else, a traceback above all, fails."""
    assert r.exit_code in (0, 2), (r.exit_code, r.output, r.exception)
    if r.exit_code == 2:
        one_line_error(r, *needles)
        return False
    assert r.exception is None and "Traceback" not in r.output
    if r.stdout.lstrip().startswith(("{", "[")):
        strict_json(r.stdout)
    return True


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint("tiny", tmp_path_factory.mktemp("ck") / "tiny", layers=2)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, checkpoint):
    """The checkpoint's dense (portable) and sparse (fused) exports, with their side files."""
    root = tmp_path_factory.mktemp("exports")
    return {kind: export_checkpoint(checkpoint, root / kind / "model.onnx", sparse=kind == "sparse",
                                    portable=kind == "dense") for kind in ("dense", "sparse")}


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def generate(model, *extra):
    return run("generate", model, "--prompt", "The fox", "--max-new-tokens", "3", "--json", *extra)


@pytest.fixture(scope="module")
def reference_tokens(exports):
    """What each export generates with the default options (greedy)."""
    out = {}
    for kind, path in exports.items():
        r = generate(path)
        assert r.exit_code == 0, r.output
        out[kind] = json.loads(r.stdout)["tokens"]
        assert len(out[kind]) == 3
    return out


# --- numbers on the command line -------------------------------------------------------------

EDGE_NUMBERS = ["-1", "0", "-0", "1", "2", "0.5", "1.5", "1e16", "9223372036854775.807", "9223372036854775808",
                "99999999999999999999", "1" + "0" * 40, "nan", "NaN", "inf", "-inf", "1e-300", "5e-324", "", "x", "1,2",
                "0x10"]
numbers = st.sampled_from(EDGE_NUMBERS) | st.integers(-2, 10**20).map(str) \
    | st.floats(allow_nan=True, allow_infinity=True).map(repr)

# (command and its other arguments, option): commands that answer in well under a second
CHEAP = [
    (["table1", "--json"], "--sparsity"), (["table1", "--json"], "--rank"),
    (["ops", "--model", "prosparse-llama2-7b", "--json"], "--sparsity"),
    (["ops", "--model", "prosparse-llama2-7b", "--json"], "--rank"),
    (["memory", "--model", "prosparse-llama2-13b", "--json"], "--rank"),
    (["latency", "--model", "prosparse-llama2-7b", "--json"], "--context"),
    (["latency", "--model", "prosparse-llama2-7b", "--json"], "--rank"),
    (["latency", "--model", "prosparse-llama2-7b", "--json"], "--sparsity"),
    (["latency", "--model", "prosparse-llama2-7b", "--json"], "--alpha"),
    (["fig4", "--json"], "--context"),
]


COUNT_KEY = re.compile(r"(ops|_us|bytes|_mib|_gib|latency|tokens)$")


def counts_are_not_negative(data, where="$") -> None:
    """Every op count, byte count, time and size in a command's JSON is >= 0."""
    if isinstance(data, dict):
        for key, v in data.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and COUNT_KEY.search(key):
                assert v >= 0, f"{where}.{key} = {v}"
            counts_are_not_negative(v, f"{where}.{key}")
    elif isinstance(data, list):
        for i, v in enumerate(data):
            counts_are_not_negative(v, f"{where}[{i}]")


@given(case=st.sampled_from(CHEAP), value=numbers)
def test_any_number_to_a_counting_command_ends_cleanly(case, value):
    args, option = case
    r = run(*args, option, value)
    if clean(r):
        data = json.loads(r.stdout)
        assert "non_finite_as_null" not in json.dumps(data)
        counts_are_not_negative(data)


GENERATE_OPTIONS = ["--max-new-tokens", "--temperature", "--top-p", "--seed", "--threads"]


@SLOW
@given(option=st.sampled_from(GENERATE_OPTIONS), value=numbers)
def test_any_number_to_generate_ends_cleanly(exports, option, value):
    r = run("generate", exports["sparse"], "--prompt", "The fox", "--json",
            *(["--max-new-tokens", "3"] if option != "--max-new-tokens" else []), option, value)
    if clean(r):
        out = json.loads(r.stdout)
        limit = int(value) if option == "--max-new-tokens" else 3
        assert 1 <= len(out["tokens"]) <= limit and all(0 <= t < 258 for t in out["tokens"])
    elif option in ("--temperature", "--top-p", "--seed", "--threads"):
        one_line_error(r, option)


HUGE = "1" + "0" * 400                 # past float64's range: a count computed from it cannot be a float
EVAL = "eval {ck} --tasks gsm8k --data-dir {data} --out {tmp}/e --limit 1 --quiet"
EVAL_4 = EVAL + " --max-gen-toks 4"


# (arguments, option, value, what the one line must hold); the commands are given real inputs,
# so that a value let through runs and shows up as a wrong exit
REFUSED = [
    ("generate {sparse} --prompt hi", "--max-new-tokens", "0", "--max-new-tokens"),
    ("generate {sparse} --prompt hi", "--max-new-tokens", "-1", "--max-new-tokens"),
    ("generate {sparse} --prompt hi", "--max-new-tokens", "100000", "exceeds the context"),
    ("generate {sparse} --prompt hi", "--temperature", "-1", "--temperature"),
    ("generate {sparse} --prompt hi", "--temperature", "nan", "--temperature"),
    ("generate {sparse} --prompt hi", "--temperature", "inf", "--temperature"),
    ("generate {sparse} --prompt hi", "--top-p", "0", "--top-p"),
    ("generate {sparse} --prompt hi", "--top-p", "2", "--top-p"),
    ("generate {sparse} --prompt hi", "--top-p", "nan", "--top-p"),
    ("generate {sparse} --prompt hi", "--seed", "-1", "--seed"),
    ("generate {sparse} --prompt hi", "--threads", "0", "--threads"),
    ("generate {sparse} --prompt hi", "--threads", "-1", "--threads"),
    ("generate {sparse} --prompt hi", "--threads", "100000", "--threads"),
    ("compare {ck} --prompt hi --work-dir {tmp}", "--max-new-tokens", "0", "--max-new-tokens"),
    ("compare {ck} --prompt hi --work-dir {tmp}", "--top-p", "0", "--top-p"),
    ("compare {ck} --prompt hi --work-dir {tmp}", "--alpha", "1e16", "outside the supported range of alpha"),
    ("compare {ck} --prompt hi --work-dir {tmp}", "--alpha", "9223372036854775.807", "outside the supported range"),
    ("export {ck} --out {tmp}/m.onnx", "--alpha", "1e16", "outside the supported range of alpha"),
    ("export {ck} --out {tmp}/m.onnx", "--alpha", "nan", "not a finite number"),
    ("export {ck} --out {tmp}/m.onnx", "--alpha", "1.0001", "more than 3 decimals"),
    ("export {ck} --out {tmp}/m.onnx", "--alpha", "0", "alpha must be > 0"),
    ("bench-decode --checkpoint {ck} --work-dir {tmp}", "--repeats", "0", "--repeats"),
    ("bench-decode --checkpoint {ck} --work-dir {tmp}", "--tokens", "1", "--tokens"),
    ("bench-decode --checkpoint {ck} --work-dir {tmp}", "--layers", "0", "--layers"),
    ("bench-decode --checkpoint {ck} --work-dir {tmp}", "--profile-tokens", "-1", "--profile-tokens"),
    ("bench-decode --checkpoint {ck} --work-dir {tmp}", "--threads", "0", "--threads"),
    ("bench-decode --checkpoint {ck} --work-dir {tmp}", "--alpha", "1e16", "outside the supported range"),
    ("make-checkpoint --out {tmp}/c", "--layers", "0", "--layers"),
    ("make-checkpoint --out {tmp}/c", "--seed", "-1", "--seed"),
    ("make-checkpoint --out {tmp}/c", "--target-sparsity", "1", "--target-sparsity"),
    ("make-checkpoint --out {tmp}/c", "--target-sparsity", "nan", "--target-sparsity"),
    ("make-checkpoint --out {tmp}/c", "--kv-heads", "3", "--kv-heads"),
    ("table1", "--rank", "0", "--rank"),
    ("table1", "--rank", HUGE, "--rank"),
    ("memory --model prosparse-llama2-7b", "--rank", HUGE, "--rank"),
    ("latency --model prosparse-llama2-7b", "--rank", HUGE, "--rank"),
    ("latency --model prosparse-llama2-7b", "--context", HUGE, "'--context'"),
    ("fig4", "--context", HUGE, "'--context'"),
    ("table1", "--sparsity", "1", "sparsity"),
    ("ops --model prosparse-llama2-7b", "--sparsity", "nan", "sparsity"),
    ("memory --model prosparse-llama2-7b", "--rank", "-1", "--rank"),
    ("latency --model prosparse-llama2-7b", "--context", "-1", "context"),
    ("latency --model prosparse-llama2-7b", "--alpha", "1e16", "outside the supported range"),
    ("fig4", "--context", "-1", "context"),
    ("predictor-stats {ck}", "--max-prompts", "0", "--max-prompts"),
    ("predictor-stats {ck}", "--max-new-tokens", "0", "--max-new-tokens"),
    ("predictor-stats {ck}", "--alpha", "9223372036854775.807", "outside the supported range"),
    ("sweep {ck}", "--alpha", "1e16:1e17:1", "outside the supported range"),
    ("sweep {ck}", "--max-prompts", "0", "--max-prompts"),
    ("compare-methods {ck} --methods oracle", "--sparsity", "nan", "sparsity"),
    ("compare-methods {ck} --methods oracle --sparsity 0.5", "--max-prompts", "0", "--max-prompts"),
    ("bench", "--sparsity", "nan", "sparsities"),
    ("bench", "--repeats", "2", "--repeats"),
    ("bench", "--loop-layers", "-1", "--loop-layers"),
    ("bench-plot {results} --out {tmp}/p.png", "--sparsity", "nan", "sparsity nan"),
    ("verify-kernels --backend emulated --d 64 --k 64", "--d", "0", "--d"),
    ("verify-kernels --backend emulated --d 64 --k 64", "--sparsity", "1", "--sparsity"),
    ("verify-kernels --backend emulated --d 64 --k 64", "--seed", "-1", "--seed"),
    ("tour --out {tmp}/tour", "--max-new-tokens", "-1", "--max-new-tokens"),
    (EVAL_4, "--limit", "0", "--limit"),
    (EVAL_4, "--random", "nan", "--random"),
    (EVAL_4, "--threads", "-1", "threads"),
    (EVAL_4, "--alpha", "1e16", "outside the supported range"),
    (EVAL, "--max-gen-toks", "-1", "--max-gen-toks"),
    (EVAL, "--max-gen-toks", "0", "--max-gen-toks"),
    (EVAL_4, "--ray-workers", "-1", "--ray-workers"),
    (EVAL_4, "--max-calibration-prompts", "-1", "--max-calibration-prompts"),
]


RESULTS = Path(__file__).parents[1] / "benchmarks" / "results" / "h200.json"      # a `bench` results file


@pytest.mark.parametrize("args,option,value,needle", REFUSED)
def test_a_number_out_of_range_is_one_line_naming_it(tmp_path, checkpoint, exports, eval_data, args, option, value,
                                                     needle):
    filled = args.format(ck=checkpoint, sparse=exports["sparse"], tmp=tmp_path, data=eval_data, results=RESULTS)
    error_last(run(*filled.split(), option, value), needle)       # (eval and the DSE tools print progress)
    no_partial_files(tmp_path)


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    from helpers import write_eval_data

    return write_eval_data(tmp_path_factory.mktemp("data"), [("What is 1 + 1?", "2 #### 2")], {"navigate": 2})


# --- config.json: ops and memory --------------------------------------------------------------

SIZE_FIELDS = CONFIG_FIELDS[:7]


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@given(field=st.sampled_from(CONFIG_FIELDS), value=odd_values, command=st.sampled_from(["ops", "memory"]))
def test_a_corrupted_config_gives_counts_or_one_line(tmp_path_factory, field, value, command):
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 176,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300}
    cfg[field] = value
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(cfg))
    r = run(command, "--model", path, "--json")
    if clean(r):
        data = json.loads(r.stdout)
        assert data["num_layers"] >= 1
        for row in data.get("per_layer", []):
            assert row["mlp_ops"] > 0 and row["prediction_ops"] >= 0
        assert all(v > 0 for v in data.get("predictor_memory_mib", {}).values())
    if field in SIZE_FIELDS and not _positive_int(value) and not (field == "num_key_value_heads" and value is None):
        one_line_error(r, str(path), field)


def test_latency_refuses_a_bad_config(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 176,
           "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": -5}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    one_line_error(run("latency", "--model", tmp_path / "config.json", "--json"), "vocab_size")


# --- weights and safetensors headers ------------------------------------------------------------

def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


header_edits = st.one_of(
    st.tuples(st.just("dtype"), st.sampled_from(["I32", "U32", "F32"]) | st.sampled_from([*SAFETENSORS_ITEMSIZE, "X", 7,
                                                                                             None])),
    st.tuples(st.just("shape"), st.lists(st.integers(-2, 600), max_size=3) | st.just("x")),
    st.tuples(st.just("data_offsets"), st.lists(st.integers(-10, 5_000_000), min_size=0, max_size=3)),
    st.tuples(st.just("truncate"), st.integers(1, 5000)),
)


@SLOW
@given(tensor=st.integers(0, 30), edit=header_edits)
def test_a_corrupted_safetensors_header_exports_the_same_model_or_is_one_line(tmp_path_factory, checkpoint,
                                                                             exports, reference_tokens, tensor,
                                                                             edit):
    ck = copy_folder(checkpoint, tmp_path_factory.mktemp("hdr") / "ck")
    header, data = _header(ck / "model.safetensors")
    names = sorted(k for k in header if k != "__metadata__")
    name = names[tensor % len(names)]
    key, value = edit
    if key == "truncate":
        data = data[:-value]
    else:
        header[name][key] = value
    _write_header(ck / "model.safetensors", header, data)
    out = ck.parent / "dense" / "model.onnx"
    r = run("export", ck, "--dense", "--portable", "--out", out)
    if clean(r):                     # only a header that still describes the data: the same model
        g = generate(out)
        assert g.exit_code == 0 and json.loads(g.stdout)["tokens"] == reference_tokens["dense"], g.output
    else:
        assert "model.safetensors" in r.stderr or str(ck) in r.stderr
        assert not out.exists()
    no_partial_files(ck.parent)


def test_a_header_calling_f32_data_i32_is_refused(tmp_path, checkpoint):
    ck = copy_folder(checkpoint, tmp_path / "ck")
    header, data = _header(ck / "model.safetensors")
    header["model.layers.1.mlp.down_proj.weight"]["dtype"] = "I32"
    _write_header(ck / "model.safetensors", header, data)
    one_line_error(run("export", ck, "--dense", "--out", tmp_path / "m.onnx"), "model.layers.1.mlp.down_proj.weight",
                   "int32", "float32, float16 or bfloat16")
    header["model.layers.1.mlp.down_proj.weight"]["dtype"] = "F16"           # half the bytes the data spans
    _write_header(ck / "model.safetensors", header, data)
    one_line_error(run("export", ck, "--dense", "--out", tmp_path / "m.onnx"), "model.safetensors",
                   "model.layers.1.mlp.down_proj.weight", "F16")
    assert not (tmp_path / "m.onnx").exists()


@given(tensor=st.integers(0, 30), index=st.integers(0, 10**6), bad=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_a_non_finite_weight_anywhere_is_one_line_naming_it(tmp_path_factory, checkpoint, tensor, index, bad):
    from safetensors.numpy import load_file, save_file

    ck = copy_folder(checkpoint, tmp_path_factory.mktemp("nan") / "ck")
    tensors = load_file(str(ck / "model.safetensors"))
    name = sorted(tensors)[tensor % len(tensors)]
    t = tensors[name].copy()
    t.reshape(-1)[index % t.size] = bad
    tensors[name] = t
    save_file(tensors, str(ck / "model.safetensors"))
    for command in (["export", ck, "--dense", "--out", ck.parent / "m.onnx"],
                    ["predictor-stats", ck, "--max-prompts", "1", "--max-new-tokens", "1", "--json"]):
        one_line_error(run(*command), name, "non-finite")
    assert not (ck.parent / "m.onnx").exists()


# --- generation_config.json and the BOS / EOS ids --------------------------------------------------

token_ids = st.none() | st.booleans() | st.integers(-3, 300) | st.sampled_from(["1", 2.0, [], [1, 2], [1, 999], {}])


@SLOW
@given(text=st.one_of(st.fixed_dictionaries({}, optional={"bos_token_id": token_ids, "eos_token_id": token_ids})
                      .map(json.dumps),
                      st.sampled_from(["", "garbage", "[1, 2]", "null", '{"bos_token_id": ', "\udcff"])))
def test_a_corrupted_generation_config_generates_or_is_one_line(tmp_path_factory, exports, text):
    folder = copy_folder(exports["sparse"].parent, tmp_path_factory.mktemp("gen") / "m")
    (folder / "generation_config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    r = generate(folder / "model.onnx")
    if clean(r):
        cfg = json.loads(text)
        for key in ("bos_token_id", "eos_token_id"):
            ids = cfg.get(key) if isinstance(cfg.get(key), list) else [cfg.get(key)]
            assert all(v is None or (type(v) is int and 0 <= v < 258) for v in ids), (key, cfg)
    else:
        assert "generation_config.json" in r.stderr


def test_a_bos_id_outside_the_vocabulary_is_one_line(tmp_path, exports, checkpoint):
    folder = copy_folder(exports["sparse"].parent, tmp_path / "m")
    (folder / "generation_config.json").write_text('{"bos_token_id": 258, "eos_token_id": 257}')
    one_line_error(generate(folder / "model.onnx"), "generation_config.json", "bos_token_id", "0-257")
    cfg = json.loads((checkpoint / "config.json").read_text())
    ck = copy_folder(checkpoint, tmp_path / "ck")
    (ck / "config.json").write_text(json.dumps({**cfg, "eos_token_id": "x"}))
    one_line_error(run("export", ck, "--out", tmp_path / "e.onnx"), "config.json", "eos_token_id")


def test_a_tokenizer_larger_than_the_model_is_one_line(tmp_path, exports):
    """A prompt token the model has no embedding for is refused before the model runs."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(exports["sparse"].with_name("tokenizer.json")))
    tok.add_tokens(["zebra"])                                # id 258: one past the model's vocabulary
    tok.save(str(tmp_path / "big.json"))
    r = run("generate", exports["sparse"], "--prompt", "a zebra", "--tokenizer", tmp_path / "big.json", "--json")
    one_line_error(r, "token id 258 is outside the model's vocabulary (0-257)")


# --- ONNX files: this project's metadata, another graph --------------------------------------------

META_VALUES = st.sampled_from([None, "", "0", "-1", "1", "2", "3", "4", "64", "258", "259", "512", "100000",
                               "99999999999", "x", "True", "False", "shared", "concat", "1000", "1000,1000", "nan"])


def _model_with(path: Path, out: Path, edit) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    edit(model, meta)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {k: v for k, v in meta.items() if v is not None})
    onnx.save(model, str(out))


@SLOW
@given(kind=st.sampled_from(["dense", "sparse"]), key=st.integers(0, 20), value=META_VALUES)
def test_corrupted_onnx_metadata_decodes_the_same_or_is_one_line(tmp_path_factory, exports, reference_tokens, kind,
                                                                 key, value):
    import onnx

    src = exports[kind]
    keys = sorted(p.key for p in onnx.load(str(src), load_external_data=False).metadata_props)
    name = keys[key % len(keys)]
    folder = copy_folder(src.parent, tmp_path_factory.mktemp("meta") / kind)
    _model_with(src, folder / "model.onnx", lambda model, meta: meta.__setitem__(name, value))
    r = generate(folder / "model.onnx")
    if clean(r):                                  # a harmless change: the same tokens
        assert json.loads(r.stdout)["tokens"] == reference_tokens[kind], (name, value)
    else:                                         # what is wrong with the file, or a context now too short
        assert str(folder / "model.onnx") in r.stderr or "exceeds the context" in r.stderr, r.stderr


def test_another_graph_under_this_projects_metadata_is_one_line(tmp_path, exports):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "other",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])])
    other = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder = copy_folder(exports["sparse"].parent, tmp_path / "m")

    def swap(model, meta):
        model.graph.CopyFrom(other.graph)
    _model_with(exports["sparse"], folder / "model.onnx", swap)
    one_line_error(generate(folder / "model.onnx"), "model.onnx", "inputs, but a 2-layer decoder")
    onnx.save(other, str(folder / "model.onnx"))
    one_line_error(generate(folder / "model.onnx"), "model.onnx", "not a sparseinfer export")
    (folder / "model.onnx").write_text("not a model")
    one_line_error(generate(folder / "model.onnx"), "model.onnx")


def test_graph_and_metadata_that_disagree_are_named(tmp_path, exports):
    folder = copy_folder(exports["sparse"].parent, tmp_path / "m")
    model = folder / "model.onnx"
    for key, value, needle in [("sparseinfer.num_layers", "3", "3-layer decoder"),
                               ("sparseinfer.num_kv_heads", "4", "4 key/value heads"),
                               ("sparseinfer.vocab_size", "300", "sparseinfer.vocab_size is 300"),
                               ("sparseinfer.sparse", "False", "calls it dense"),
                               ("sparseinfer.alpha_milli", "1000,1030", "alpha_milli 1000, but the metadata records "
                                                                        "1030"),
                               ("sparseinfer.kv_cache", "concat", "kv_cache is concat"),
                               ("sparseinfer.max_position_embeddings", "99999999", "exceeds 1048576"),
                               ("sparseinfer.head_dim", None, "sparseinfer.head_dim is missing")]:
        _model_with(exports["sparse"], model, lambda m, meta: meta.__setitem__(key, value))
        one_line_error(generate(model), str(model), needle)


@pytest.mark.native
def test_an_error_inside_the_op_is_one_line_in_a_real_process(tmp_path, exports):
    """NaN reaching the native op at run time (planted in the exported embedding): the op's status
    comes back as one line with exit 2, never an abort or a traceback."""
    import onnx
    from onnx import numpy_helper

    folder = copy_folder(exports["sparse"].parent, tmp_path / "m")
    model = onnx.load(str(folder / "model.onnx"))
    init = next(i for i in model.graph.initializer if "embed" in i.name)
    init.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(init), np.nan), init.name))
    onnx.save(model, str(folder / "model.onnx"))
    proc = subprocess.run([sys.executable, "-m", "sparseinfer.tools.cli", "generate", str(folder / "model.onnx"),
                           "--prompt", "hi", "--mlp-kernels", "native", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "model.onnx" in lines[0] and "contains NaN" in lines[0] and proc.stdout == ""


# --- hardware files ------------------------------------------------------------------------------

HW_KEYS = ["memory_bandwidth_gb_per_s", "memory_gib", "l2_cache_mib", "sm_count", "gpu_clock_ghz",
           "fp16_tensor_tflops", "fp32_cuda_tflops", "popc_tera_per_s", "dense_bandwidth_fraction",
           "sparse_bandwidth_fraction", "kernel_launch_us", "compute_fraction"]
TOML_VALUES = st.sampled_from(["inf", "-inf", "nan", "+inf", "0", "-1", "0.0", "1e400", "1e-400", '"x"', "true",
                               "[]", "1", "0.5", "1.5", "2", "1e300", "16.5"])


def set_toml(text: str, key: str, value: str) -> str:
    """``text`` with ``key`` (a top-level figure or an [efficiency] constant) set to ``value``."""
    out, section = [], ""
    for line in text.splitlines():
        if line.strip().startswith("["):
            section = line.strip()
        if line.split("=")[0].strip() == key and section in ("", "[efficiency]"):
            line = f"{key} = {value}"
        out.append(line)
    return "\n".join(out) + "\n"


@given(key=st.sampled_from(HW_KEYS), value=TOML_VALUES)
def test_a_corrupted_hardware_file_gives_finite_latencies_or_one_line(tmp_path_factory, key, value):
    path = tmp_path_factory.mktemp("hw") / "mine.toml"
    path.write_text(set_toml(Path(builtin_hardware()["jetson-orin-agx"].path).read_text(), key, value))
    r = run("latency", "--model", "prosparse-llama2-7b", "--hw-file", path, "--json")
    if clean(r):
        data = json.loads(r.stdout)
        assert "non_finite_as_null" not in json.dumps(data)
        counts_are_not_negative(data)
        parsed = tomllib.loads(path.read_text())
        v = parsed[key] if key in parsed else parsed["efficiency"][key]
        assert isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    else:
        one_line_error(r, str(path), key)


# --- files given where a file is expected ----------------------------------------------------------

@pytest.mark.parametrize("make,args,needle", [
    (lambda d: d, ["generate", "{x}", "--prompt", "hi"], "{x}"),
    (lambda d: d / "missing.onnx", ["generate", "{x}", "--prompt", "hi"], "no such model"),
    (lambda d: (d / "t.onnx").write_bytes(b"\x00garbage") and d / "t.onnx", ["generate", "{x}", "--prompt", "hi"],
     "cannot read"),
    (lambda d: (d / "tok.json").write_text("{") and d / "tok.json",
     ["generate", "{sparse}", "--prompt", "hi", "--tokenizer", "{x}"], "tok.json"),
    (lambda d: (d / "f").write_text("x") and d / "f", ["export", "{x}", "--out", "{tmp}/m.onnx"], "{x}"),
    (lambda d: (d / "f").write_text("x") and d / "f", ["ops", "--model", "{x}"], "unknown model"),
    (lambda d: (d / "c.json").write_text("[1]") and d / "c.json", ["memory", "--model", "{x}"], "JSON object"),
    (lambda d: (d / "c.json").write_bytes(b"\xff\xfe") and d / "c.json", ["ops", "--model", "{x}"], "cannot read"),
    (lambda d: (d / "h.toml").write_text("[[[") and d / "h.toml", ["latency", "--hw-file", "{x}"],
     "cannot read hardware file"),
    (lambda d: (d / "r.json").write_text("{") and d / "r.json", ["bench-plot", "{x}", "--out", "{tmp}/p.png"],
     "r.json"),
    (lambda d: (d / "p.txt").write_bytes(b"\xff\x00\xfe") and d / "p.txt",
     ["predictor-stats", "{ck}", "--prompts", "{x}"], "p.txt"),
    (lambda d: (d / "r.json").write_text("[]") and d / "r.json", ["latency", "--calibrate", "{x}"], "r.json"),
    (lambda d: (d / "p.txt").write_bytes(b"\xff\x00\xfe") and d / "p.txt",
     ["compare-methods", "{ck}", "--methods", "oracle", "--sparsity", "0.5", "--prompts", "{x}"], "p.txt"),
    (lambda d: (d / "c.txt").write_bytes(b"\xff\x00\xfe") and d / "c.txt",
     ["compare-methods", "{ck}", "--methods", "dejavu", "--sparsity", "0.5", "--calibration", "{x}"], "c.txt"),
    (lambda d: d / "nowhere", ["eval", "{ck}", "--tasks", "gsm8k", "--data-dir", "{x}", "--out", "{tmp}/e"],
     "nowhere"),
    (lambda d: d / "missing.gguf", ["export", "{x}", "--out", "{tmp}/m.onnx"], "no such checkpoint"),
    (lambda d: (d / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00") and d / "m.gguf",
     ["export", "{x}", "--out", "{tmp}/m.onnx"], "truncated GGUF file"),
])
def test_a_wrong_file_is_one_line(tmp_path, checkpoint, exports, make, args, needle):
    x = make(tmp_path)
    fill = {"x": x, "sparse": exports["sparse"], "ck": checkpoint, "tmp": tmp_path}
    one_line_error(run(*[a.format(**fill) for a in args]), needle.format(**fill))
    no_partial_files(tmp_path)
