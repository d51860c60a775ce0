"""benchmarks/genai_builder/ without its side environment: the HF folder it writes for the
builder (and a ReLU-family checkpoint's SiLU twin), the builder's command lines, the rounds,
the result's schema and the peer's entry on stub runners, argument errors, and a real
(tiny, synthetic) run of both genai and OnnxDecoder runners on our own export. Building
with onnxruntime-genai's model builder needs torch and transformers, which this project
does not install: that test runs only where GENAI_BUILDER_PYTHON names an interpreter that
has them, and says so when skipped."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from click.testing import CliRunner

from helpers import digest, run_cli

from sparseinfer.benchmarks.genai_builder import build as gb_build
from sparseinfer.benchmarks.genai_builder import convert as gb_convert
from sparseinfer.benchmarks.genai_builder import facts as gb_facts
from sparseinfer.benchmarks.genai_builder import peer as gb_peer
from sparseinfer.benchmarks.genai_builder import report as gb_report
from sparseinfer.benchmarks.genai_builder import rounds as gb_rounds
from sparseinfer.benchmarks.genai_builder import runners as gb_runners
from sparseinfer.benchmarks.genai_builder.cli import cli as gb_cli
from sparseinfer.model_export.loaders import load_checkpoint
from sparseinfer.model_export.synthetic import make_checkpoint
from sparseinfer.reference.errors import SparseInferError

PROMPT = [256, 84, 104, 101, 32, 113, 117, 105, 99, 107]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint("tiny", tmp_path_factory.mktemp("gb") / "ck", layers=2, tie_embeddings=True,
                           hidden_act="silu")


@pytest.fixture(scope="module")
def export_dir(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("gb") / "ours" / "model.onnx"
    r = run_cli("export", checkpoint, "--out", out, "--dense")
    assert r.exit_code == 0, r.output
    return out.parent


def test_hf_folder_round_trips_the_weights(checkpoint, tmp_path):
    r = CliRunner().invoke(gb_cli, ["convert", str(checkpoint), "--out", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["architectures"], cfg["torch_dtype"], cfg["tie_word_embeddings"]) == (["LlamaForCausalLM"], "float32", True)
    a, b = load_checkpoint(checkpoint), load_checkpoint(tmp_path / "hf")
    assert a.shape.d == b.shape.d and a.shape.num_kv_heads == b.shape.num_kv_heads
    np.testing.assert_array_equal(a.weights.embed, b.weights.embed)
    for la, lb in zip(a.weights.layers, b.weights.layers):
        for f in ("q", "k", "v", "o", "gate", "up", "down", "input_norm", "post_norm"):
            np.testing.assert_array_equal(getattr(la, f).astype(np.float32), getattr(lb, f))


def test_several_eos_ids_are_written_with_the_first_ones_name(checkpoint, tmp_path):
    """A checkpoint with several EOS ids (as Llama 3's): generation_config keeps them all and
    tokenizer_config names the first."""
    ck = dataclasses.replace(load_checkpoint(checkpoint), eos_token_id=(257, 258))
    out = gb_convert.write_hf_folder(ck, tmp_path / "hf")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [257, 258]
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == ck.tokenizer.id_to_token(257)


def test_the_builder_command_is_fp32_on_the_cpu(tmp_path):
    cmd = gb_build.builder_command("/py", tmp_path / "hf", tmp_path / "out")
    assert cmd[:3] == ["/py", "-m", "onnxruntime_genai.models.builder"]
    assert cmd[cmd.index("-p") + 1] == "fp32" and cmd[cmd.index("-e") + 1] == "cpu"


def test_the_silu_twin_has_the_same_weights_and_hidden_act_silu(tmp_path):
    """convert --as-silu on a FATReLU checkpoint (which the builder cannot take as it is)."""
    relu = make_checkpoint("tiny", tmp_path / "relu", layers=2)
    r = CliRunner().invoke(gb_cli, ["convert", str(relu), "--out", str(tmp_path / "plain")])
    assert r.exit_code == 2 and "fatrelu" in r.output and "silu and relu only" in r.output and "--as-silu" in r.output
    r = CliRunner().invoke(gb_cli, ["convert", str(relu), "--out", str(tmp_path / "hf"), "--as-silu"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["hidden_act"], cfg["architectures"], cfg["model_type"]) == ("silu", ["LlamaForCausalLM"], "llama")
    assert "hidden_act_param" not in cfg
    a, b = load_checkpoint(relu), load_checkpoint(tmp_path / "hf")
    assert a.shape.hidden_act.startswith("fatrelu") and b.shape.hidden_act == "silu"
    assert dataclasses.replace(a.shape, hidden_act="silu", name="", source="") == \
        dataclasses.replace(b.shape, name="", source="")
    np.testing.assert_array_equal(a.weights.embed, b.weights.embed)
    np.testing.assert_array_equal(a.weights.lm_head, b.weights.lm_head)
    for la, lb in zip(a.weights.layers, b.weights.layers, strict=True):
        for f in ("q", "k", "v", "o", "gate", "up", "down", "input_norm", "post_norm"):
            np.testing.assert_array_equal(getattr(la, f).astype(np.float32), getattr(lb, f))
    assert (a.bos_token_id, a.eos_token_id) == (b.bos_token_id, b.eos_token_id)


def test_a_relu_checkpoint_needs_no_twin(tmp_path):
    """The builder's Llama has ReLU: a ReLU checkpoint is written as it is."""
    relu = make_checkpoint("tiny", tmp_path / "relu", layers=1, hidden_act="relu")
    r = CliRunner().invoke(gb_cli, ["convert", str(relu), "--out", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_act"] == "relu"


def test_a_convert_that_fails_half_way_leaves_no_folder_and_the_previous_one_as_it_was(checkpoint, tmp_path,
                                                                                         monkeypatch):
    """The disk fills while the weights are saved (half a file written): a new folder is not
    left behind (nor the parent made for it), and a folder converted before keeps its files,
    byte for byte, with nothing added. The error is one line naming the folder."""
    previous = gb_convert.write_hf_folder(checkpoint, tmp_path / "previous")
    before = digest(previous)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(before)
    other = make_checkpoint("tiny", tmp_path / "other", layers=1, seed=1)      # other weights, other config

    def disk_full(tensors, filename, metadata=None):                         # as safetensors reports it
        Path(filename).write_bytes(b"\0" * 4096)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    for out in (previous, tmp_path / "new" / "hf"):
        one_line = f"^cannot write {re.escape(str(out))}: No space left on device \\(ENOSPC\\)$"
        with pytest.raises(SparseInferError, match=one_line):
            gb_convert.write_hf_folder(other, out, as_silu=True)
    assert digest(previous) == before and sorted(p.name for p in previous.iterdir()) == sorted(before)
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()                               # the same write, on a disk with room, replaces it whole
    gb_convert.write_hf_folder(other, previous, as_silu=True)
    after = digest(previous)
    assert set(after) == set(before)
    assert after["config.json"] != before["config.json"] and after["model.safetensors"] != before["model.safetensors"]


def test_the_int4_builder_command_names_its_quantization(tmp_path):
    cmd = gb_build.builder_command("/py", tmp_path / "hf", tmp_path / "out", tmp_path / "c", precision="int4")
    assert cmd[cmd.index("-p") + 1] == "int4" and cmd[cmd.index("-e") + 1] == "cpu"
    assert cmd[cmd.index("-c") + 1] == str(tmp_path / "c")
    assert cmd[cmd.index("--extra_options") + 1:] == ["accuracy_level=4", "block_size=32"]
    assert "--extra_options" not in gb_build.builder_command("/py", "hf", "out")
    with pytest.raises(SparseInferError, match="precision 'int8'"):
        gb_build.builder_command("/py", "hf", "out", precision="int8")


def _stub(rate: float, tokens=(5, 6, 7, 8)):
    """A runner whose decode takes (n - 1) / rate seconds."""
    def run(prompt, n):
        return gb_runners.Run(list(tokens[:n]), 0.01, (n - 1) / rate)
    return run


def test_rounds_alternate_and_the_summary_has_medians_and_ratios():
    calls = []

    def tracking(name, rate):
        inner = _stub(rate)

        def run(prompt, n):
            calls.append(name)
            return inner(prompt, n)
        return run

    runners = {gb_runners.OURS_GENAI: tracking("a", 30.0), gb_runners.BUILDER_GENAI: tracking("b", 20.0)}
    measured = gb_rounds.run_rounds(runners, PROMPT, 4, rounds=3, warmup=1)
    assert calls == ["b", "a", "a", "b", "b", "a", "a", "b"]        # warm-up (-1: reversed), then 0, 1, 2
    assert [r["round"] for r in measured["rounds"]] == ["warmup0", 0, 1, 2]
    s = gb_rounds.summarize_rounds(measured["rounds"], list(runners))
    assert s["tokens_per_s"][gb_runners.OURS_GENAI]["median"] == pytest.approx(30.0)
    assert s["tokens_per_s"][gb_runners.BUILDER_GENAI]["per_round"] == pytest.approx([20.0] * 3)
    ratio = s["ratio_to_" + gb_runners.BUILDER_GENAI][gb_runners.OURS_GENAI]
    assert ratio["of_medians"] == pytest.approx(1.5) and ratio["per_round"] == pytest.approx([1.5] * 3)
    assert ratio["median_per_round_interval"] == pytest.approx([1.5, 1.5])


def test_median_interval_resamples_within_each_stratum():
    # two strata a run apart: resampled freely, a resample may hold 6 of one and 4 of the other
    # and its median jumps to 1 or 3; kept 5 and 5, every resample's median is 2
    values, strata = [1.0] * 5 + [3.0] * 5, ["dense first"] * 5 + ["sparse first"] * 5
    assert gb_rounds.median_interval(values, strata) == [2.0, 2.0]
    assert gb_rounds.median_interval(values) == [1.0, 3.0]
    # one stratum of [1, 2, 10]: a resample's median is 1 or 10 with probability 7/27 each, more
    # than the 5% each tail leaves, so the 90% interval spans them
    assert gb_rounds.median_interval([1.0, 2.0, 10.0]) == [1.0, 10.0]
    assert gb_rounds.median_interval([1.0, 2.0, 10.0], level=0.2) == [2.0, 2.0]
    assert gb_rounds.median_interval([4.0]) == [4.0, 4.0]


def test_median_interval_holds_the_median_and_is_repeatable():
    rng = np.random.default_rng(7)
    values = list(rng.lognormal(0.7, 0.08, size=30))
    strata = [i // 15 for i in range(30)]
    low, high = gb_rounds.median_interval(values, strata)
    assert low < float(np.median(values)) < high and high - low < 0.5
    assert gb_rounds.median_interval(values, strata) == [low, high]
    narrower = gb_rounds.median_interval(values, strata, level=0.5)
    assert low <= narrower[0] <= narrower[1] <= high


def test_median_interval_of_a_failed_timing_is_undefined():
    for bad in (float("nan"), float("inf")):
        assert np.isnan(gb_rounds.median_interval([1.0, bad, 2.0], ["a", "a", "b"])).all()


@pytest.mark.parametrize("values, strata, kwargs, match", [
    ([], None, {}, "one or more values"),
    ([[1.0, 2.0]], None, {}, "one or more values"),
    ([1.0, 2.0], ["a"], {}, "1 strata labels for 2 values"),
    ([1.0, 2.0], None, {"level": 1.0}, "level"),
    ([1.0, 2.0], None, {"resamples": 0}, "resamples"),
])
def test_median_interval_refuses_what_it_cannot_resample(values, strata, kwargs, match):
    with pytest.raises(SparseInferError, match=match):
        gb_rounds.median_interval(values, strata, **kwargs)


def test_a_runner_that_stops_early_is_an_error():
    runners = {gb_runners.OURS_GENAI: _stub(30.0, tokens=(1, 2)), gb_runners.BUILDER_GENAI: _stub(20.0)}
    with pytest.raises(SparseInferError, match="stopped after 2 of 4 new tokens"):
        gb_rounds.run_rounds(runners, PROMPT, 4, rounds=1)
    with pytest.raises(SparseInferError, match="new tokens"):
        gb_rounds.run_rounds(runners, PROMPT, 1, rounds=1)


def test_the_result_schema_on_stub_runners(export_dir, tmp_path, monkeypatch):
    """benchmark() end to end with stub runners: what the results file holds."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    monkeypatch.setattr(gb_report, "GenaiRunner", lambda folder, threads, profile=None:
                        _stub(25.0 if str(folder) == str(export_dir) else 20.0, tokens=tuple(range(8))))
    monkeypatch.setattr(gb_report, "DecoderRunner", lambda path, threads, max_length: _stub(26.0, tokens=tuple(range(8))))
    builder = tmp_path / "builder"                            # any genai folder: a copy of ours
    shutil.copytree(export_dir, builder)
    result = gb_report.benchmark(export_dir, builder, prompt_ids=PROMPT, new_tokens=8, rounds=5,
                          commands=["setup"], notes=["a note"])
    assert {"benchmark", "machine", "settings", "models", "tokens_per_s", "ratio_to_builder_genai", "target",
            "same_tokens", "rounds", "commands", "notes"} <= set(result)
    assert {"date", "cpu", "onnxruntime", "onnxruntime_genai"} <= set(result["machine"])
    assert result["settings"]["prompt_tokens"] == len(PROMPT) and result["settings"]["decode_steps_timed"] == 7
    assert len([r for r in result["rounds"] if isinstance(r["round"], int)]) == 5
    assert result["tokens_per_s"][gb_runners.OURS_GENAI]["median"] == pytest.approx(25.0)
    assert result["tokens_per_s"][gb_runners.OURS_DECODER]["median"] == pytest.approx(26.0)
    assert result["target"] == {"ours_over_builder_at_least": 1.0, "ratio": pytest.approx(1.25), "met": True}
    assert all(result["same_tokens"].values())
    ours = result["models"]["ours"]
    assert ours["nodes"] > 0 and ours["layers"] == 2 and ours["model_bytes"] > 0 and ours["kv_cache_shared"]
    assert "com.microsoft.GroupQueryAttention" in ours["op_counts"]
    assert result["commands"] == ["setup"] and result["notes"] == ["a note"]
    json.dumps(result)                                        # writable as it is


def test_a_real_run_on_our_export_twice(export_dir, tmp_path):
    """The command line on real runners (genai's Generator and OnnxDecoder), our tiny export
    standing in for the builder's model: same tokens, a results file, the command recorded."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    setup = tmp_path / "setup.sh"
    setup.write_text("# comment\n\nsparseinfer export X --out Y --dense\n")
    out = tmp_path / "r.json"
    r = CliRunner().invoke(gb_cli, ["run", "--ours", str(export_dir), "--builder", str(export_dir), "--out", str(out),
                                    "--prompt", "The quick", "--new-tokens", "6", "--rounds", "1", "--threads", "1",
                                    "--commands-file", str(setup), "--profile-dir", str(tmp_path / "prof")])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert all(result["same_tokens"].values())
    assert result["commands"][0] == "sparseinfer export X --out Y --dense"
    assert "genai_builder run --ours" in result["commands"][1] and "--new-tokens 6" in result["commands"][1]
    assert result["profile"]["ours"]["runs"] >= 1 and result["profile"]["ours"]["top_nodes"]


def test_the_peer_is_timed_in_alternating_rounds_beside_ours(export_dir, tmp_path):
    """peer_rounds on stub runners: our folder and the peer's, alternating, the peer's entry."""
    peer = tmp_path / "peer"                                  # any genai folder of the same shape
    shutil.copytree(export_dir, peer)
    calls, made = [], []

    def runner(folder, threads):
        made.append(folder.name)
        rate = 25.0 if folder == export_dir else 20.0
        inner = _stub(rate, tokens=tuple(range(8)) if folder == export_dir else tuple(range(8, 16)))

        def run(prompt, n):
            calls.append((folder.name, threads, list(prompt), n))
            return inner(prompt, n)
        return run

    result = gb_peer.peer_rounds(export_dir, peer, PROMPT, new_tokens=8, rounds=4, warmup=1, threads=3, runner=runner)
    # two blocks of 2 rounds, each with its warm-up: the runners made in one order, then anew in
    # the other; the run order alternating across the blocks
    assert made == ["ours", "peer", "peer", "ours"]
    assert [c[0] for c in calls] == ["peer", "ours", "ours", "peer", "peer", "ours",
                                     "peer", "ours", "ours", "peer", "peer", "ours"]
    assert all(c[1:] == (3, PROMPT, 8) for c in calls)
    assert result["name"] == "genai-int4" and result["folder"] == str(peer)
    assert result["tokens_per_s_median"] == pytest.approx(20.0)
    assert result["ours_tokens_per_s_median"] == pytest.approx(25.0)
    assert result["speedup"] == pytest.approx(1.25) and result["speedup_per_round"] == pytest.approx([1.25] * 4)
    assert [r["round"] for r in result["rounds"]] == ["warmup0", 0, 1, "warmup0", 2, 3]
    assert [r["created"] for r in result["rounds"]] == [["ours_genai", "peer_genai"]] * 3 + [["peer_genai", "ours_genai"]] * 3
    assert result["settings"]["decode_steps_timed"] == 7 and result["shape"]["num_hidden_layers"] == 2
    assert all(v > 0 for v in result["model_bytes"].values())
    json.dumps(result)


def test_the_int4_peer_of_a_fatrelu_checkpoint_is_built_from_its_silu_twin_once(tmp_path, monkeypatch):
    """build_int4_peer with the builder stubbed: the twin's folder, the int4 command, then no rebuild."""
    built = []

    def fake_builder(python, hf_dir, out, cache_dir=None, log=print, precision="fp32"):
        built.append((python, json.loads((Path(hf_dir) / "config.json").read_text())["hidden_act"], precision))
        Path(out).mkdir(parents=True)
        (Path(out) / "genai_config.json").write_text("{}")
        return Path(out)

    monkeypatch.setattr(gb_peer, "run_builder", fake_builder)
    relu = make_checkpoint("tiny", tmp_path / "relu", layers=1)
    said = []
    out = gb_peer.build_int4_peer(relu, tmp_path / "peer", "/py", log=said.append)
    assert out == tmp_path / "peer" and built == [("/py", "silu", "int4")]
    assert (tmp_path / "peer-hf" / "model.safetensors").is_file()
    assert len(said) == 1 and "SiLU twin" in said[0] and "fatrelu" in said[0]
    assert gb_peer.build_int4_peer(relu, tmp_path / "peer", "/py", log=said.append) == out and len(built) == 1


def test_a_peer_of_another_shape_is_refused(export_dir, tmp_path):
    peer = tmp_path / "peer"
    shutil.copytree(export_dir, peer)
    cfg = json.loads((peer / "genai_config.json").read_text())
    cfg["model"]["decoder"]["hidden_size"] += 32
    (peer / "genai_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SparseInferError, match=r"hidden_size 232 in its genai_config.json, 200 in .*our model's shape"):
        gb_peer.peer_rounds(export_dir, peer, PROMPT, new_tokens=4, rounds=1,
                            runner=lambda folder, threads: pytest.fail("no runner before the shapes agree"))


@pytest.mark.parametrize("args,message", [
    (["run", "--ours", "/nonexistent", "--builder", ".", "--out", "x.json"], "does not exist"),
    (["run", "--ours", ".", "--builder", ".", "--out", "x.json", "--new-tokens", "1"], "x>=2"),
    (["run", "--ours", ".", "--builder", ".", "--out", "x.json", "--threads", "0"], "x>=1"),
    (["run", "--ours", ".", "--builder", ".", "--out", "x.json", "--rounds", "0"], "x>=1"),
    (["build", ".", "--out", "o"], "Missing option '--python'"),
    (["build", ".", "--out", "o", "--python", sys.executable, "--precision", "int3"], "'int3' is not one of"),
])
def test_argument_errors_exit_2(args, message):
    r = CliRunner().invoke(gb_cli, args)
    assert r.exit_code == 2 and message in r.output


def test_a_folder_without_genai_config_is_a_one_line_error(tmp_path):
    (tmp_path / "a").mkdir()
    r = CliRunner().invoke(gb_cli, ["run", "--ours", str(tmp_path / "a"), "--builder", str(tmp_path / "a"),
                                    "--out", str(tmp_path / "r.json")])
    assert r.exit_code == 2 and "no genai_config.json" in r.output and "Traceback" not in r.output


def test_the_module_runs_as_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "sparseinfer.benchmarks.genai_builder", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "convert" in proc.stdout and "build" in proc.stdout and "run" in proc.stdout


needs_side_env = pytest.mark.skipif(
    not os.environ.get("GENAI_BUILDER_PYTHON"),
    reason="needs the side environment: GENAI_BUILDER_PYTHON=an interpreter with onnxruntime-genai, onnx_ir, "
           "torch and transformers (benchmarks/genai_builder/)")


def _builder_sized_checkpoint(hidden_act: str):
    """A tiny synthetic checkpoint with head size 64 (see below), loaded."""
    from sparseinfer.model_export.loaders import Checkpoint
    from sparseinfer.model_export.synthetic import make_weights, synthetic_shape
    from sparseinfer.model_export.tokenizer import byte_level_tokenizer

    shape = dataclasses.replace(synthetic_shape("tiny", layers=2, hidden_act=hidden_act, tie_embeddings=True),
                                hidden_size=256, num_heads=4, num_kv_heads=2)
    return Checkpoint(weights=make_weights(shape, seed=1), tokenizer=byte_level_tokenizer(), source="synthetic",
                      stored_dtype="fp32", bos_token_id=256, eos_token_id=257)


@needs_side_env
def test_the_builder_builds_a_folder_genai_decodes_like_ours(tmp_path):
    """convert, build, and both models' greedy tokens under genai's Generator. Head size 64: the
    builder's GroupQueryAttention on the CPU needs a multiple of 16 (the tiny shape's 50 fails
    at run time; our export pads it to 64)."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    from sparseinfer.model_export.export_folder import export_checkpoint

    ck = _builder_sized_checkpoint("silu")
    hf, built = gb_convert.write_hf_folder(ck, tmp_path / "hf"), tmp_path / "builder"
    ours = export_checkpoint(ck, tmp_path / "ours" / "model.onnx", sparse=False).parent
    r = CliRunner().invoke(gb_cli, ["build", str(hf), "--out", str(built), "--python",
                                    os.environ["GENAI_BUILDER_PYTHON"], "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    assert gb_facts.model_facts(built)["nodes"] > 0
    assert gb_runners.GenaiRunner(built, 1)(PROMPT, 8).tokens == gb_runners.GenaiRunner(ours, 1)(PROMPT, 8).tokens


@needs_side_env
def test_the_builders_int4_model_of_a_silu_twin_runs_as_our_peer(tmp_path):
    """A FATReLU checkpoint: its SiLU twin built in int4 (MatMulNBits, 4 bits, blocks of 32,
    accuracy level 4) and timed beside our sparse export on genai's Generator."""
    import onnx

    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    from sparseinfer.model_export.export_folder import export_checkpoint

    ck = _builder_sized_checkpoint("fatrelu:0.01")
    hf, built = gb_convert.write_hf_folder(ck, tmp_path / "hf", as_silu=True), tmp_path / "builder"
    ours = export_checkpoint(ck, tmp_path / "ours" / "model.onnx", sparse=True).parent
    r = CliRunner().invoke(gb_cli, ["build", str(hf), "--out", str(built), "--python",
                                    os.environ["GENAI_BUILDER_PYTHON"], "--cache-dir", str(tmp_path / "cache"),
                                    "--precision", "int4"])
    assert r.exit_code == 0, r.output
    proto = onnx.load(str(gb_facts.model_file(built)), load_external_data=False)
    nbits = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) >= 2 * 5                                  # q, k, v (fused or not), o, gate, up, down a layer
    assert all((a["bits"], a["block_size"], a["accuracy_level"]) == (4, 32, 4) for a in nbits)
    result = gb_peer.peer_rounds(ours, built, PROMPT, new_tokens=6, rounds=1, warmup=0, threads=1)
    assert result["tokens_per_s_median"] > 0 and result["ours_tokens_per_s_median"] > 0
    assert result["model_bytes"][gb_peer.PEER_GENAI] < result["model_bytes"][gb_runners.OURS_GENAI]
