"""The figures README.md quotes from a command's output are that output, and the commands and
options it names exist: Table I (`table1`), Fig. 4 (`fig4`) and the H200 paragraph
(`latency --hw h200 --calibrate benchmarks/results/h200.json`), each parsed from the README
and checked against the command's --json."""
import json
import math
import re
import statistics
from pathlib import Path

from click.testing import CliRunner

from sparseinfer.reference.shapes import BUILTIN_MODELS
from sparseinfer.tools.cli import cli

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def run_json(*args) -> dict:
    r = CliRunner().invoke(cli, [*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def section(title: str) -> str:
    """The README's text under ``## title``, up to the next heading of that level."""
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert found, f"README has no section {title!r}"
    return found[1]


def ops_text(value) -> str:
    """How table1 prints an op count: 16,986,931.2 or 2,211,840."""
    return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"


def test_table_i_as_quoted_is_what_table1_prints():
    text = section("Table I, reproduced")
    data = run_json("table1")
    model = BUILTIN_MODELS[data["model"]]
    head = re.search(r"\(ProSparse-Llama2-13B, d (\d+), k (\d+), sparsity ([\d.]+), rank (\d+)\)", text)
    assert head and (int(head[1]), int(head[2])) == (model.d, model.k)
    assert (float(head[3]), int(head[4])) == (data["sparsity"], data["rank"])
    rows = {r["method"]: r for r in data["rows"]}
    quoted = re.findall(r"^\| (llama\.cpp|PowerInfer|SparseInfer)\b[^|]*\| ([\d,.]+) \| ([\d,.]+)", text, re.M)
    assert [q[0] for q in quoted] == ["llama.cpp", "PowerInfer", "SparseInfer"]
    for method, prediction, mlp in quoted:
        row = rows[method]
        assert (prediction, mlp) == (ops_text(row["prediction_ops"]), ops_text(row["mlp_ops"])), method
    memory = re.search(r"Predictor memory: PowerInfer ([\d.]+) MiB, SparseInfer ([\d.]+) MiB \(([\d.]+)×", text)
    mib = data["predictor_memory_mib"]
    assert float(memory[1]) == round(mib["PowerInfer"], 1) and float(memory[2]) == round(mib["SparseInfer"], 1)
    assert memory[3] == f"{data['predictor_memory_ratio']:.2f}"          # as table1 prints it: 4.39, not the paper's


ALPHAS = {"1.00": "1.00", "1.02 first 20 layers": "1.02@0-19,1.00", "1.03 first 20 layers": "1.03@0-19,1.00"}


def test_fig4_as_quoted_is_what_fig4_prints():
    text = section("Latency model and design-space exploration (`sim/`, `methods/`)")
    rows = {(r["model"], r["alpha"], r["vs"]): r for r in run_json("fig4")}
    pair = r"([\d.]+) / ([\d.]+) \(([+-][\d.]+) %\)"
    quoted = re.findall(rf"^\| (13B|7B), ([^|]+?) \| {pair} \| {pair} \|", text, re.M)
    assert len(quoted) == 4
    for size, alpha, *cells in quoted:
        model = f"prosparse-llama2-{size.lower()}"
        for vs, (paper, simulated, error) in zip(("llama.cpp", "PowerInfer"), (cells[:3], cells[3:])):
            row = rows[(model, ALPHAS[alpha], vs)]
            assert (paper, simulated) == (f"{row['paper']:.2f}", f"{row['simulated']:.2f}"), (size, alpha, vs)
            assert abs(float(error) - 100 * (row["simulated"] / row["paper"] - 1)) <= 0.05 + 1e-9, (size, alpha, vs)


def test_h200_paragraph_is_what_latency_calibrate_prints():
    text = " ".join(section("Latency model and design-space exploration (`sim/`, `methods/`)").split())
    data = run_json("latency", "--hw", "h200", "--calibrate", str(ROOT / "benchmarks" / "results" / "h200.json"))
    quoted = re.search(r"dense ([\d.]+), sparse ([\d.]+), launch ([\d.]+) µs\. The fit is within (\d+) % on every "
                       r"cuBLAS row and (\d+) % on the gate\+up rows; the down rows run (\d+)–(\d+) % slower", text)
    assert quoted, "the H200 paragraph's wording changed: update this test with it"
    eff = data["calibration"]["efficiency"]
    assert quoted.groups()[:3] == (f"{eff['dense_bandwidth_fraction']:.2f}", f"{eff['sparse_bandwidth_fraction']:.2f}",
                                   f"{eff['kernel_launch_us']:.2f}")
    rows = data["calibration"]["rows"]
    dense = [abs(r["rel_error"]) * 100 for r in rows if r["class"] == "dense"]
    gate_up = [abs(r["rel_error"]) * 100 for r in rows if r["class"] == "sparse" and r["kernel"] == "gate_up"]
    down = [-r["rel_error"] * 100 for r in rows if r["class"] == "sparse" and r["kernel"] == "down"]
    assert dense and gate_up and min(down) > 0                          # "slower than it says"
    assert [int(g) for g in quoted.groups()[3:]] == [math.ceil(max(dense)), math.ceil(max(gate_up)),
                                                     math.ceil(min(down)), math.ceil(max(down))]
    token = re.search(r"modelled at ([\d.]+) ms for llama\.cpp and ([\d.]+) ms for SparseInfer\+KF\+AS \(([\d.]+)×\): "
                      r"attention, ([\d.]+) ms", text)
    by = {m["method"]: m for m in data["methods"]}
    best = by["SparseInfer+KF+AS"]
    assert token.groups() == (f"{by['llama.cpp']['ms_per_token']:.1f}", f"{best['ms_per_token']:.2f}",
                              f"{best['speedup_vs_llama.cpp']:.2f}", f"{best['stage_us']['attention'] / 1000:.1f}")


def readme_commands() -> list[list[str]]:
    """Every `sparseinfer ...` the README shows, in backticks or in its bash blocks, as words."""
    spans = re.findall(r"`(sparseinfer [^`]*)`", README)
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        spans += [line for line in block.replace("\\\n", " ").splitlines() if line.startswith("sparseinfer ")]
    return [s.split() for s in spans]


def test_the_commands_and_options_the_readme_names_exist():
    commands = readme_commands()
    assert len(commands) > 20
    for words in commands:
        if words[1].startswith("-"):
            continue                                                    # sparseinfer --help
        assert words[1] in cli.commands, " ".join(words)
        command = cli.commands[words[1]]
        options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        for word in words[2:]:
            for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", word):
                assert option in options, f"README: `{' '.join(words)}`: {words[1]} has no {option}"


def test_every_command_prints_json_as_the_readme_says():
    """README: each command prints its result as JSON with --json (bench --json FILE writes it)."""
    assert "prints its result as JSON on stdout with `--json` (`bench --json FILE` writes it to FILE)" in \
        " ".join(README.split())
    for name, command in cli.commands.items():
        option = next((p for p in command.params if "--json" in p.opts), None)
        assert option is not None, name
        assert option.is_flag == (name != "bench"), name


QUALITY_FILES = {"SmolLM2": "smollm2-135m", "synthetic ReLU": "prosparse-7b-1l"}


def test_quantization_quality_table_is_the_results_files():
    """The quant-quality table: each row's positions, top-1 agreement (4 decimals) and mean KL
    (2 significant digits) are those of its results file."""
    rows = re.findall(r"^\| (SmolLM2|synthetic ReLU)[^|]*\| (q\d_\d) \| (dense|sparse) [^|]*\| (\d+) \| ([\d.]+) \| "
                      r"([\d.e+-]+) \|$", README, re.M)
    assert len(rows) == 8
    for model, fmt, kind, positions, top1, kl in rows:
        path = ROOT / "benchmarks" / "results" / f"quant-quality-{QUALITY_FILES[model]}-{fmt}-2026-12-06-cpu2.json"
        data = json.loads(path.read_text())
        pair = data["pairs"]["dense_quantized_vs_fp32" if kind == "dense" else "sparse_quantized_vs_dense_quantized"]
        assert data["quantize"] == fmt and int(positions) == pair["positions"] == data["positions"], path
        assert top1 == f"{pair['top1_agreement']:.4f}", (path, kind)
        assert math.isclose(float(kl), pair["mean_kl"], rel_tol=0.02, abs_tol=0.0), (path, kind)


def test_amd_speed_table_is_the_results_files():
    """The AMD EPYC speed table: each row's tokens/s (2 decimals) and ratio (median of per-round
    ratios) are those of its bench-decode --json results file."""
    results = ROOT / "benchmarks" / "results"
    peer = json.loads((results / "cpu-quant-decode-7b-4l-2026-12-06-epyc2-q4_0-peer.json").read_text())
    q8 = json.loads((results / "cpu-quant-decode-7b-4l-2026-12-06-epyc2-q8_0.json").read_text())
    rows = dict(((m[0], m[1]), m[2:]) for m in re.findall(
        r"^\| (q\d_\d) sparse / (dense q\d_\d|builder int4) [^|]*\| ([\d.]+) \| ([\d.]+) \| \**([\d.]+)\** \|$",
        README, re.M))
    assert set(rows) == {("q4_0", "dense q4_0"), ("q4_0", "builder int4"), ("q8_0", "dense q8_0")}
    for (fmt, base), data in ((("q4_0", "dense q4_0"), peer), (("q8_0", "dense q8_0"), q8)):
        assert data["quantize"] == fmt and data["machine"]["cpu"] == "AMD EPYC"
        assert rows[fmt, base] == (f"{data['sparse']['tokens_per_s_median']:.2f}",
                                   f"{data['dense']['tokens_per_s_median']:.2f}", f"{data['speedup']:.2f}")
    p = peer["peer"]
    assert p["name"] == "genai-int4"
    assert rows["q4_0", "builder int4"] == (f"{p['ours_tokens_per_s_median']:.2f}", f"{p['tokens_per_s_median']:.2f}",
                                            f"{p['speedup_median_per_round']:.2f}")


# The EPYC VM's huge-page tables, in README order: per table, each setting's results-file tag and
# its number of runs per format.
HUGE_PAGE_TABLES = (
    {"default": ("final", {"q4_0": 6, "q8_0": 6}), "hugetlb": ("hugepages", {"q4_0": 6, "q8_0": 5})},
    {"default": ("fold-default", {"q4_0": 6, "q8_0": 6}), "hugetlb": ("fold-hugepages", {"q4_0": 6, "q8_0": 6})},
)


def test_huge_pages_tables_are_the_results_files():
    """The EPYC VM's huge-page tables: each run's median per-round ratio in run order, and the
    pooled median of every round's ratio and share of rounds at 2.0 or more, with the malloc
    tunable unset and set, are those of the bench-decode --json results files."""
    results = ROOT / "benchmarks" / "results"
    found = re.findall(r"^\| (q\d_\d) sparse / (dense q\d_\d|builder int4) \| ([\d., ]+) \| \*\*([\d.]+)\*\*; (\d+)% "
                       r"\| ([\d., ]+) \| \*\*([\d.]+)\*\*; (\d+)% \|$", README, re.M)
    rows = [("q4_0", "builder int4"), ("q4_0", "dense q4_0"), ("q8_0", "dense q8_0")]
    assert [(f, b) for f, b, *_ in found] == rows * len(HUGE_PAGE_TABLES)
    for i, (fmt, base, *columns) in enumerate(found):
        table = HUGE_PAGE_TABLES[i // len(rows)]
        for (runs_text, pooled, share), setting in zip((columns[:3], columns[3:]), ("default", "hugetlb")):
            tag, runs = table[setting]
            peer = "-peer" if fmt == "q4_0" else ""
            files = sorted(results.glob(f"cpu-quant-decode-7b-4l-2026-12-07-epyc2-{fmt}-{tag}{peer}-run*.json"))
            data = [json.loads(f.read_text()) for f in files]
            assert len(data) == runs[fmt], (fmt, tag)
            for d in data:
                assert d["quantize"] == fmt and d["machine"]["cpu"] == "AMD EPYC"
                assert d["machine"]["huge_pages"]["glibc.malloc.hugetlb"] == ("1" if setting == "hugetlb" else None)
            if base == "builder int4":
                per_run = [d["peer"]["speedup_median_per_round"] for d in data]
                rounds = [x for d in data for x in d["peer"]["speedup_per_round"]]
            else:
                per_run = [d["speedup"] for d in data]
                rounds = [x for d in data for x in d["speedup_per_round"]]
            assert runs_text == ", ".join(f"{x:.2f}" for x in per_run), (fmt, base, tag)
            assert pooled == f"{statistics.median(rounds):.2f}", (fmt, base, tag)
            assert share == f"{100 * sum(x >= 2.0 for x in rounds) / len(rounds):.0f}", (fmt, base, tag)


def test_second_huge_page_series_is_the_results_files():
    """The second q4_0 series on huge pages: per-run ratios, pooled medians, and both series'
    rounds pooled (with the share at 2.0 or more), as the results files give them."""
    results = ROOT / "benchmarks" / "results"
    prefix = "cpu-quant-decode-7b-4l-2026-12-07-epyc2-q4_0-fold-"

    def load(tag):
        data = [json.loads(f.read_text()) for f in sorted(results.glob(f"{prefix}{tag}-peer-run*.json"))]
        assert len(data) == 6 and all(d["machine"]["huge_pages"]["glibc.malloc.hugetlb"] == "1" for d in data), tag
        return data

    second, first = load("hugepages2"), load("hugepages")
    text = re.search(r"A second series of six q4_0 runs on huge pages, right after: over the builder's int4 ([\d., ]+?), "
                     r"pooled \*\*([\d.]+)\*\*; over our dense q4_0 ([\d., ]+?), pooled \*\*([\d.]+)\*\*; the two "
                     r"series' 120 rounds pooled: \*\*([\d.]+)\*\* and \*\*([\d.]+)\*\* \((\d+)% and (\d+)% of the rounds",
                     " ".join(README.split()))
    assert text, "the second series' sentence"
    peer_runs, peer_pooled, dense_runs, dense_pooled, both_peer, both_dense, share_peer, share_dense = text.groups()
    assert peer_runs == ", ".join(f"{d['peer']['speedup_median_per_round']:.2f}" for d in second)
    assert dense_runs == ", ".join(f"{d['speedup']:.2f}" for d in second)
    assert peer_pooled == f"{statistics.median([x for d in second for x in d['peer']['speedup_per_round']]):.2f}"
    assert dense_pooled == f"{statistics.median([x for d in second for x in d['speedup_per_round']]):.2f}"
    for got, share, rounds in ((both_peer, share_peer, [x for d in first + second for x in d["peer"]["speedup_per_round"]]),
                               (both_dense, share_dense, [x for d in first + second for x in d["speedup_per_round"]])):
        assert len(rounds) == 120 and got == f"{statistics.median(rounds):.2f}"
        assert share == f"{100 * sum(x >= 2.0 for x in rounds) / len(rounds):.0f}"
