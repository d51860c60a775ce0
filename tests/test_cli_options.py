"""The command line's shared options (tools/options.py): an option that several commands take
reads the same in each, its default is the package's own constant, and the work behind the
commands is callable without them (the bodies only parse, call and print)."""
import inspect

import pytest

from sparseinfer.benchmarks import decode_bench
from sparseinfer.evaluation.traced_runs import method_from_options
from sparseinfer.methods.calibration import DEFAULT_CALIBRATION_PROMPTS, calibration_prompts
from sparseinfer.methods.model_runner import DEFAULT_DECODE_STEPS, DEFAULT_MAX_PROMPTS, ReferenceRunner, read_prompts
from sparseinfer.model_export.session import PROVIDERS
from sparseinfer.model_export.synthetic import DEFAULT_TARGET_SPARSITY, make_checkpoint
from sparseinfer.reference.alpha import DEFAULT_ALPHA, DEFAULT_ALPHA_MILLI, AlphaSchedule
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.sim.hardware import DEFAULT_HARDWARE, builtin_hardware
from sparseinfer.tools.cli import cli


def _option(command: str, flag: str):
    found = [p for p in cli.commands[command].params if flag in p.opts]
    assert len(found) == 1, (command, flag)
    return found[0]


def _spec(p) -> tuple:
    t = p.type
    return (p.name, tuple(p.opts), repr(p.default), p.help, p.show_default, p.is_flag, p.multiple, type(t).__name__,
            tuple(getattr(t, "choices", ()) or ()), getattr(t, "min", None), getattr(t, "max", None))


SAME_IN = {      # flag: the commands where it is one option, declared once
    "--hw": ("latency", "fig4", "sweep", "compare-methods"),
    "--hw-file": ("latency", "fig4", "sweep", "compare-methods"),
    "--context": ("latency", "fig4"),
    "--max-prompts": ("predictor-stats", "sweep", "compare-methods"),
    "--max-calibration-prompts": ("eval", "compare-methods"),
    "--portable": ("export", "compare", "bench-decode"),
    "--target": ("export", "compare", "bench-decode"),
    "--prompt": ("generate", "compare"),
    "--temperature": ("generate", "compare"),
    "--top-p": ("generate", "compare"),
    "--threads": ("generate", "compare", "bench-decode", "eval"),
    "--method": ("predictor-stats", "sweep"),
    "--export-dir": ("predictor-stats", "sweep"),
    "--tasks": ("sweep", "compare-methods"),
    "--limit": ("sweep", "compare-methods"),
    "--data-dir": ("sweep", "compare-methods"),
    "--max-gen-toks": ("sweep", "compare-methods"),
    "--rank": ("ops", "memory", "latency"),
    "--dtype": ("export", "bench-decode"),
    "--quantize": ("export", "bench-decode"),
    "--accuracy-level": ("export", "bench-decode"),
}


@pytest.mark.parametrize("flag", sorted(SAME_IN))
def test_a_shared_option_reads_the_same_in_every_command(flag):
    specs = {command: _spec(_option(command, flag)) for command in SAME_IN[flag]}
    assert len(set(specs.values())) == 1, specs


def test_shared_defaults_are_the_packages_constants():
    assert DEFAULT_ALPHA == "1.00" and AlphaSchedule.parse(DEFAULT_ALPHA).default_milli == DEFAULT_ALPHA_MILLI
    for command in ("latency", "predictor-stats", "export", "compare", "bench-decode"):
        assert _option(command, "--alpha").default == DEFAULT_ALPHA, command
    for command in ("eval", "compare-methods"):
        assert _option(command, "--max-calibration-prompts").default == DEFAULT_CALIBRATION_PROMPTS == 64
    assert inspect.signature(calibration_prompts).parameters["max_prompts"].default == DEFAULT_CALIBRATION_PROMPTS
    for command in ("predictor-stats", "sweep", "compare-methods"):
        assert _option(command, "--max-prompts").default == DEFAULT_MAX_PROMPTS
        assert _option(command, "--max-new-tokens").default == DEFAULT_DECODE_STEPS
    assert inspect.signature(read_prompts).parameters["max_prompts"].default == DEFAULT_MAX_PROMPTS
    assert inspect.signature(ReferenceRunner).parameters["max_new_tokens"].default == DEFAULT_DECODE_STEPS
    assert DEFAULT_HARDWARE in builtin_hardware() and _option("latency", "--hw").default == DEFAULT_HARDWARE
    for command in ("make-checkpoint", "bench-decode"):
        assert _option(command, "--target-sparsity").default == DEFAULT_TARGET_SPARSITY
    assert inspect.signature(make_checkpoint).parameters["target_sparsity"].default == DEFAULT_TARGET_SPARSITY
    for command in ("generate", "bench-decode", "eval", "predictor-stats"):
        assert list(_option(command, "--provider").type.choices) == list(PROVIDERS), command


def test_the_lm_eval_defaults_are_the_same_constant():
    pytest.importorskip("lm_eval")
    from sparseinfer.evaluation.method_backend import MethodLM
    from sparseinfer.evaluation.runner import run_eval

    for f in (run_eval, MethodLM):
        assert inspect.signature(f).parameters["max_calibration_prompts"].default == DEFAULT_CALIBRATION_PROMPTS


def test_the_method_options_name_the_sign_predictor_at_alpha_or_a_method():
    assert method_from_options("sparseinfer", None, (), False, None, single=True) is None
    calibrated = method_from_options("sparseinfer", "0.8", (), False, None, single=True)
    assert calibrated.name == "sparseinfer" and calibrated.params["alpha"] == "auto"
    assert method_from_options("teal", "0.5,0.7", (), False, None, single=False).name == "teal"
    with pytest.raises(SparseInferError, match="^Invalid value for --sparsity: one target sparsity, got 0.5,0.7$"):
        method_from_options("teal", "0.5,0.7", (), False, None, single=True)
    with pytest.raises(SparseInferError, match="--param names dejavu, but --method is teal"):
        method_from_options("teal", None, ("dejavu.rank=4",), False, None, single=True)


def test_bench_decode_runs_without_the_command(tmp_path):
    """benchmarks.decode_bench is the whole benchmark: no progress bar, the plain export."""
    out = tmp_path / "bench.json"
    result = decode_bench.bench_decode(None, **_settings(tmp_path), out_json=out)
    rows = decode_bench.timed_rows(result)
    assert list(rows) == ["dense", "sparse"] and rows["sparse"]["mlp_kernels"] == "function"
    assert rows["dense"]["mlp_kernels"] == "dense" and all(len(r["tokens_per_s_runs"]) == 1 for r in rows.values())
    assert result["complete"] is True and result["shape"]["num_layers"] == 1 and out.is_file()
    with pytest.raises(SparseInferError, match="--cuda-graph needs --provider cuda"):
        decode_bench.bench_decode(None, **{**_settings(tmp_path), "cuda_graph": True})


def _settings(tmp_path) -> dict:
    return dict(shape_name="tiny", layers=1, target_sparsity=DEFAULT_TARGET_SPARSITY, alpha=DEFAULT_ALPHA,
                target="cpu", provider="cpu", threads=1, mlp_kernels="function", tokens=3, repeats=1,
                prompt_tokens=None, profile_tokens=0, portable=False, dtype="float32", with_portable=False,
                cuda_graph=False, work_dir=tmp_path)
