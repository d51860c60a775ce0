"""The command line's surface: counts are click ranges, `--help` summaries read whole and its
examples can be pasted, tour / export / bench-plot print JSON, an empty layer selection is
refused, and stdout behaves as a Unix tool's (closed, full, a pipe closed early), the last
through real processes."""
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from sparseinfer.tools.cli import cli

from helpers import one_line_error, run_cli as run

ROOT = Path(__file__).parents[1]
H200_RESULTS = ROOT / "benchmarks" / "results" / "h200.json"       # a `bench` results file
CLI = [sys.executable, "-m", "sparseinfer.tools.cli"]


# --- counts -----------------------------------------------------------------------------------

def test_every_integer_option_is_a_click_range():
    plain = [f"{name} {p.opts[0]}" for name, command in cli.commands.items() for p in command.params
             if isinstance(p.type, click.types.IntParamType) and not isinstance(p.type, click.IntRange)]
    assert plain == []


@pytest.mark.parametrize("args", [
    ["eval", "/nonexistent", "--limit", "-1"],
    ["sweep", "/nonexistent", "--tasks", "gsm8k", "--limit", "0"],
    ["compare-methods", "/nonexistent", "--limit", "-1"],
    ["compare-methods", "/nonexistent", "--max-calibration-prompts", "0"],
    ["compare-methods", "/nonexistent", "--max-new-tokens", "-1"],
    ["predictor-stats", "/nonexistent", "--max-prompts", "-1"],
    ["predictor-stats", "/nonexistent", "--provider", "cpu", "--threads", "0"],
    ["sweep", "/nonexistent", "--max-new-tokens", "0"],
    ["latency", "--rank", "0"],
    ["fig4", "--context", "-1"],
    ["make-checkpoint", "--out", "/nonexistent/c", "--kv-heads", "0"],
])
def test_a_count_out_of_range_is_refused_by_click_naming_the_option(args):
    option = next(a for a in reversed(args) if a.startswith("--"))
    one_line_error(run(*args), f"Invalid value for '{option}'")


# --- --help -----------------------------------------------------------------------------------

def test_sparseinfer_help_lists_each_command_with_its_whole_summary():
    out = subprocess.run([*CLI, "--help"], capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "80"}).stdout
    listed = out.split("Commands:\n", 1)[1].splitlines()
    summaries = dict(line.strip().split(None, 1) for line in listed if line.strip())
    assert set(summaries) == set(cli.commands)
    for name, summary in summaries.items():
        assert not summary.endswith("..."), (name, summary)
        assert summary == cli.commands[name].short_help, name       # on one line, as written
        assert summary.endswith((".", ")")), (name, summary)


def help_examples() -> list[tuple[str, str]]:
    return [(name, line.strip()) for name, command in cli.commands.items()
            for line in inspect.cleandoc(command.help or "").splitlines() if line.strip().startswith("sparseinfer ")]


def test_help_examples_are_printed_verbatim():
    examples = help_examples()
    assert {name for name, _ in examples} >= {"eval", "compare-methods", "latency"}
    for name, example in examples:
        r = run(name, "--help")
        assert example in [line.strip() for line in r.stdout.splitlines()], (name, example)


# --- --json of tour, export, bench-plot ------------------------------------------------------

def test_bench_plot_json_names_the_png_and_what_it_draws(tmp_path):
    r = run("bench-plot", H200_RESULTS, "--out", tmp_path / "p.png", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"path": str(tmp_path / "p.png"), "results": str(H200_RESULTS), "plot": "bench",
                                    "model": "prosparse-llama2-13b", "sparsity": 0.92}
    assert (tmp_path / "p.png").stat().st_size > 0
    r = run("bench-plot", H200_RESULTS, "--out", tmp_path / "q.png", "--model", "prosparse-llama2-7b", "--json")
    assert json.loads(r.stdout)["model"] == "prosparse-llama2-7b"


def test_export_json_names_the_model_and_its_form(tmp_path):
    assert run("make-checkpoint", "--out", tmp_path / "ck", "--layers", "1").exit_code == 0
    r = run("export", tmp_path / "ck", "--out", tmp_path / "x" / "model.onnx", "--alpha", "1.02", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["path"] == str(tmp_path / "x" / "model.onnx") and Path(info["path"]).is_file()
    assert (info["sparse"], info["alpha"], info["target"], info["dtype"]) == (True, "1.02", "cpu", "float32")
    assert "wrote" not in r.stderr                                   # the JSON replaces the line on stderr
    r = run("export", tmp_path / "ck", "--out", tmp_path / "d" / "model.onnx", "--dense", "--json")
    assert (json.loads(r.stdout)["sparse"], json.loads(r.stdout)["alpha"]) == (False, None)


def test_tour_json_is_one_document_of_every_step(tmp_path):
    r = run("tour", "--out", tmp_path, "--max-new-tokens", "3", "--json")
    assert r.exit_code == 0, r.output
    tour = json.loads(r.stdout)                                      # stdout holds the document only
    assert list(tour) == ["table1", "fig4", "kernels", "checkpoint", "compare", "predictor_stats", "files"]
    assert tour["table1"] == json.loads(run("table1", "--json").stdout)
    assert tour["fig4"] == json.loads(run("fig4", "--json").stdout)
    assert tour["kernels"].get("skipped") or all(row["verified"] for row in tour["kernels"]["rows"])
    assert tour["compare"]["tokens_compared"] > 0 and 0 <= tour["compare"]["token_agreement"] <= 1
    assert len(tour["predictor_stats"]["layers"]) == 2                  # the tiny shape's layers
    for path in tour["files"].values():
        assert Path(path).exists(), path


# --- sweep --layers ----------------------------------------------------------------------------

@pytest.mark.parametrize("layers", ["", " "])
def test_sweep_refuses_an_empty_layer_selection(layers):
    one_line_error(run("sweep", "/nonexistent", "--layers", layers), "an empty selection")


# --- stdout, through real processes -----------------------------------------------------------

def sh(command: str, **kw) -> subprocess.CompletedProcess:
    """``command`` in sh, with $CLI the command line of sparseinfer."""
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                          env={**os.environ, "CLI": " ".join(CLI)}, **kw)


def test_a_closed_stdout_is_an_error_naming_it():
    p = sh("$CLI table1 --json >&-")
    assert p.returncode == 2
    assert p.stderr == "error: cannot write stdout: it is closed\n"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_a_full_device_on_stdout_is_one_line_naming_stdout():
    p = sh("$CLI table1 > /dev/full")
    assert p.returncode == 2
    assert p.stderr == "error: cannot write stdout: No space left on device (ENOSPC)\n"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_a_stderr_that_cannot_be_written_does_not_fail_a_result():
    p = sh("$CLI table1 --json 2> /dev/full")
    assert p.returncode == 0 and json.loads(p.stdout)["rank"] == 1024


@pytest.mark.parametrize("args", [["table1"], ["--help"], ["models", "--json"]])
def test_a_pipe_whose_reader_has_gone_ends_quietly_with_141(args):
    read, write = os.pipe()
    os.close(read)                                                   # every write meets EPIPE
    try:
        p = subprocess.run([*CLI, *args], stdout=write, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert (p.returncode, p.stderr) == (141, "")


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_head_closing_the_pipe_early_ends_quietly(tmp_path):
    full = subprocess.run([*CLI, "table1"], capture_output=True, text=True, check=True).stdout
    p = subprocess.run(["bash", "-c", '$CLI table1 2>"$1" | head -c 10; echo " ${PIPESTATUS[0]}"', "bash",
                        str(tmp_path / "stderr")], capture_output=True, text=True, check=True,
                       env={**os.environ, "CLI": " ".join(CLI)})
    head, status = p.stdout.rsplit(" ", 1)
    assert head == full[:10]
    assert int(status) in (0, 141)              # 0 when it wrote everything before head left
    assert (tmp_path / "stderr").read_text() == ""
