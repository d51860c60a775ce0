"""Our dense export against onnxruntime-genai's model builder, same checkpoint, same runner:
``python -m sparseinfer.benchmarks.genai_builder``.

Three steps, each a subcommand, each printing what it did:

* ``convert CHECKPOINT --out HF_DIR``: any checkpoint ``load_checkpoint`` reads (a GGUF file
  too, quantized ones dequantized to float32) written as the Hugging Face Llama folder the
  builder reads: ``config.json``, ``model.safetensors`` (float32, tied embeddings once), and
  the tokenizer's files. Both models are then built from the same float32 weights.
* ``build HF_DIR --out DIR --python PY``: runs the builder (``PY -m
  onnxruntime_genai.models.builder -i HF_DIR -o DIR -p fp32 -e cpu``) with an interpreter that
  has torch and transformers (a side virtual environment: they are no dependency of this
  project).
* ``run --ours DIR --builder DIR --out RESULT.json``: decodes both folders with
  onnxruntime-genai's Generator (the same runner for both) and ours also with
  :class:`~sparseinfer.model_export.decode.OnnxDecoder`, greedy, same prompt, same number of
  new tokens, same intra-op threads, in rounds: one warm-up round, then ``--rounds`` rounds
  whose order alternates (forward, then reversed), so that a slow spell of the machine
  falls on every runner alike. Decode tokens/s = (new tokens - 1) / the time from the first
  sampled token to the last (the first comes from the prefill's logits), the definition of
  ``Generation.decode_tokens_per_s``. The result holds the medians, the ratio ours /
  builder per round and of the medians, the models' node counts and file sizes, the
  machine, whether the runners chose the same tokens, the commands (``--commands-file``:
  the setup commands, one per line, ``#`` comments skipped; this run's own command line is
  appended) and, with ``--profile-dir``, onnxruntime's profile of each model's decode under
  genai (``model_export.ort_profile``: time per token, top ops and top nodes).

Other processes on the machine disturb the numbers. Nothing here pauses them; each run
records ``other_cores``, the cores they kept busy meanwhile (/proc/stat less this
process's own CPU time), the result also summarises the quiet rounds alone (every run
under ``QUIET_CORES``), and ``--quiet-wait-s`` has each round first wait for a quiet
second.

Exit code 0 on success, 1 when a step fails (a message, no traceback), 2 for bad arguments.
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click

from sparseinfer.reference.errors import SparseInferError

GENAI_CONFIG = "genai_config.json"
DEFAULT_PROMPT = ("The history of the Roman Empire begins with the founding of the city of Rome. Over the "
                  "following centuries")
OURS_GENAI, BUILDER_GENAI, OURS_DECODER = "ours_genai", "builder_genai", "ours_onnx_decoder"
QUIET_CORES = 0.25           # a round is "quiet" when other processes used less than this many cores in every run
TARGET_RATIO = 1.0           # our dense export >= 1.0x the builder's fp32 model


# ---------------------------------------------------------------- checkpoint -> HF folder
def hf_llama_config(ck) -> dict:
    """The Hugging Face ``config.json`` of a loaded checkpoint (LlamaForCausalLM, float32)."""
    s = ck.shape
    if s.hidden_act != "silu":
        raise SparseInferError(f"{ck.source}: activation {s.hidden_act}; the builder's Llama is SiLU only")
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s.d,
           "intermediate_size": s.k, "num_hidden_layers": s.num_layers, "num_attention_heads": s.num_heads,
           "num_key_value_heads": s.num_kv_heads, "head_dim": s.head_dim, "hidden_act": "silu",
           "max_position_embeddings": s.max_position_embeddings, "rms_norm_eps": float(f"{s.rms_norm_eps:.7g}"),
           "rope_theta": float(s.rope_theta), "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
           "tie_word_embeddings": bool(s.tie_word_embeddings), "vocab_size": s.vocab_size, "torch_dtype": "float32"}
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(ck, key) is not None:
            cfg[key] = int(getattr(ck, key))
    return cfg


def write_hf_folder(checkpoint, out) -> Path:
    """``checkpoint`` (a path, or a loaded ``Checkpoint``) as a Hugging Face Llama folder."""
    from safetensors.numpy import save_file

    import numpy as np

    from sparseinfer.model_export.checkpoint import load_checkpoint
    from sparseinfer.model_export.synthetic import hf_tensors

    ck = load_checkpoint(checkpoint) if not hasattr(checkpoint, "weights") else checkpoint
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_llama_config(ck), indent=2) + "\n")
    save_file(hf_tensors(ck.weights, np.float32), str(out / "model.safetensors"), metadata={"format": "pt"})
    ids = {k: getattr(ck, k) for k in ("bos_token_id", "eos_token_id") if getattr(ck, k) is not None}
    (out / "generation_config.json").write_text(json.dumps(ids) + "\n")
    if ck.tokenizer is not None:
        ck.tokenizer.save(str(out / "tokenizer.json"))
        names = {f"{k[:3]}_token": ck.tokenizer.id_to_token(v) for k, v in ids.items()}
        template = getattr(ck.tokenizer, "chat_template", None)
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
             "model_max_length": ck.shape.max_position_embeddings, **names,
             **({"chat_template": template} if template else {})}, indent=2) + "\n")
    return out


def builder_command(python: str, hf_dir, out, cache_dir=None) -> list[str]:
    """The builder's command line: float32 weights for the CPU provider."""
    cmd = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", "fp32", "-e", "cpu"]
    return cmd + (["-c", str(cache_dir)] if cache_dir else [])


# ---------------------------------------------------------------- model facts
def model_file(folder) -> Path:
    """The decoder model a genai folder names (``genai_config.json``'s decoder filename)."""
    folder = Path(folder)
    cfg_path = folder / GENAI_CONFIG
    if not cfg_path.is_file():
        raise SparseInferError(f"{folder}: no {GENAI_CONFIG} (not an onnxruntime-genai model folder)")
    try:
        name = json.loads(cfg_path.read_text())["model"]["decoder"]["filename"]
    except (ValueError, KeyError, TypeError):
        raise SparseInferError(f"{cfg_path}: no model.decoder.filename") from None
    path = folder / name
    if not path.is_file():
        raise SparseInferError(f"{cfg_path} names {name}, which is not in {folder}")
    return path


def model_facts(folder) -> dict:
    """Node count (per layer too), op counts, initializer bytes and file sizes of a genai folder's model."""
    import onnx

    path = model_file(folder)
    proto = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        key = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        ops[key] = ops.get(key, 0) + 1
    cfg = json.loads((Path(folder) / GENAI_CONFIG).read_text())
    layers = int(cfg["model"]["decoder"]["num_hidden_layers"])
    files = {p.name: p.stat().st_size for p in sorted(Path(folder).iterdir())
             if p.is_file() and (p == path or p.name.startswith(path.name + ".") or p.name.startswith(path.stem + ".onnx"))}
    external = {init.name for init in proto.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL}
    return {"folder": str(folder), "model": path.name, "nodes": len(proto.graph.node), "layers": layers,
            "nodes_per_layer": round(len(proto.graph.node) / layers, 2) if layers else None,
            "initializers": len(proto.graph.initializer), "initializers_external": len(external),
            "op_counts": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
            "files_bytes": files, "model_bytes": sum(files.values()),
            "kv_cache_shared": bool(json.loads((Path(folder) / GENAI_CONFIG).read_text())["search"].get(
                "past_present_share_buffer", False)),
            "context_length": int(cfg["model"].get("context_length", 0))}


# ---------------------------------------------------------------- runners
@dataclass
class Run:
    """One greedy generation: the tokens, the prefill time and the decode time."""

    tokens: list[int]
    prefill_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else float("nan")


def genai_overlay(threads: int, profile: str | None = None) -> dict:
    """genai_config overlay: intra-op threads (1 inter-op) and, with ``profile``, onnxruntime's profiler."""
    opts = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
    if profile:
        opts["enable_profiling"] = str(profile)
    return {"model": {"decoder": {"session_options": opts}}}


class GenaiRunner:
    """onnxruntime-genai's Model and Generator on a folder; greedy; exactly ``new_tokens`` or an error."""

    def __init__(self, folder, threads: int, profile: str | None = None):
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise SparseInferError("onnxruntime-genai is not installed (pip install onnxruntime-genai)") from None
        self.og = og
        model_file(folder)
        config = og.Config(str(folder))
        config.overlay(json.dumps(genai_overlay(threads, profile)))
        self.model = og.Model(config)

    def __call__(self, prompt_ids: list[int], new_tokens: int) -> Run:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt_ids) + new_tokens, do_sample=False)
        generator = og.Generator(self.model, params)
        t0 = time.perf_counter()
        generator.append_tokens(prompt_ids)            # the prefill: the prompt's logits
        prefill_s = time.perf_counter() - t0
        tokens = []
        t0 = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()            # samples; from the 2nd call on, one decode step first
            tokens.append(int(generator.get_next_tokens()[0]))
        decode_s = time.perf_counter() - t0
        del generator
        return Run(tokens, prefill_s, decode_s)


class DecoderRunner:
    """Our ``OnnxDecoder`` and ``generate`` on an export, greedy, no stop token."""

    def __init__(self, model_path, threads: int, max_length: int):
        from sparseinfer.model_export.decode import OnnxDecoder

        self.decoder = OnnxDecoder(model_path, threads=threads, max_length=max_length)

    def __call__(self, prompt_ids: list[int], new_tokens: int) -> Run:
        from sparseinfer.model_export.decode import generate

        g = generate(self.decoder, prompt_ids, new_tokens)
        return Run(g.tokens, g.prefill_s, g.decode_s)


# ---------------------------------------------------------------- rounds and the result
def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _machine_busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy (all cores; /proc/stat), None off Linux."""
    try:
        fields = open("/proc/stat").readline().split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)          # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class OtherLoad:
    """CPU cores' worth of work done by other processes over an interval: the machine's busy
    time less this process's own, divided by the wall time (0: nothing else ran)."""

    def __enter__(self):
        self.busy, self.own, self.t0 = _machine_busy_s(), _own_cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        busy = _machine_busy_s()
        self.cores = (None if busy is None or self.busy is None or wall <= 0 else
                      round(max(busy - self.busy - (_own_cpu_s() - self.own), 0.0) / wall, 2))
        return False


def wait_quiet(max_wait_s: float, below_cores: float = 0.3, window_s: float = 1.0) -> dict:
    """Wait up to ``max_wait_s`` for a ``window_s`` in which other processes use less than
    ``below_cores`` cores; nothing is paused or signalled. Returns what was seen."""
    t0 = time.perf_counter()
    seen = None
    while True:
        with OtherLoad() as load:
            time.sleep(window_s)
        seen = load.cores
        if seen is None or seen < below_cores or time.perf_counter() - t0 >= max_wait_s:
            return {"waited_s": round(time.perf_counter() - t0, 1), "other_cores_before": seen}


def run_rounds(runners: dict[str, Callable[[list[int], int], Run]], prompt_ids: list[int], new_tokens: int,
               rounds: int, warmup: int = 1, log=lambda s: None, quiet_wait_s: float = 0.0) -> dict:
    """Warm-up rounds, then ``rounds`` rounds in alternating order (forward, reversed, ...).

    Every run must produce exactly ``new_tokens`` tokens (a stop token earlier is an error:
    the runners would not be timed on the same work). Each run records ``other_cores``, the
    cores other processes kept busy meanwhile; with ``quiet_wait_s`` each round first waits
    up to that long for the machine to be quiet (``wait_quiet``)."""
    if rounds < 1 or new_tokens < 2:
        raise SparseInferError(f"rounds ({rounds}) must be >= 1 and new tokens ({new_tokens}) >= 2")
    names = list(runners)
    first_tokens: dict[str, list[int]] = {}
    rows = []
    for r in range(-warmup, rounds):
        order = names if r % 2 == 0 else names[::-1]
        row = {"round": r if r >= 0 else f"warmup{r + warmup}", "order": order}
        if quiet_wait_s > 0:
            row.update(wait_quiet(quiet_wait_s))
        row["load1_before"] = _load1()
        for name in order:
            with OtherLoad() as load:
                got = runners[name](prompt_ids, new_tokens)
            if len(got.tokens) != new_tokens:
                raise SparseInferError(f"{name} stopped after {len(got.tokens)} of {new_tokens} new tokens "
                                       f"(a stop token): pick another prompt or fewer new tokens")
            first_tokens.setdefault(name, got.tokens)
            row[name] = {"decode_tokens_per_s": round(got.decode_tokens_per_s, 3),
                         "decode_s": round(got.decode_s, 4), "prefill_s": round(got.prefill_s, 4),
                         "other_cores": load.cores}
        row["load1_after"] = _load1()
        log(f"round {row['round']}: " + ", ".join(f"{n} {row[n]['decode_tokens_per_s']:.2f} tok/s "
                                                  f"(others {row[n]['other_cores']} cores)" for n in names)
            + f"; load {row['load1_before']} -> {row['load1_after']}")
        rows.append(row)
    return {"rounds": rows, "tokens": first_tokens}


def _divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def summarize_rounds(rounds: list[dict], names: list[str], reference: str = BUILDER_GENAI) -> dict:
    """Medians (and min / max) per runner over the timed rounds; each runner's ratio to ``reference``
    as the ratio of the medians and per round."""
    timed = [r for r in rounds if isinstance(r["round"], int)]
    if not timed:
        raise SparseInferError("no timed rounds")
    out = {"tokens_per_s": {}, "ratio_to_" + reference: {}}
    for name in names:
        per = [r[name]["decode_tokens_per_s"] for r in timed]
        out["tokens_per_s"][name] = {"median": round(statistics.median(per), 3), "min": min(per), "max": max(per),
                                     "per_round": per}
    if reference in names:
        ref = out["tokens_per_s"][reference]["median"]
        for name in names:
            if name == reference:
                continue
            per = [round(r[name]["decode_tokens_per_s"] / r[reference]["decode_tokens_per_s"], 4) for r in timed]
            out["ratio_to_" + reference][name] = {"of_medians": round(out["tokens_per_s"][name]["median"] / ref, 4),
                                                  "per_round": per, "median_per_round": round(statistics.median(per), 4)}
    return out


def read_commands(path) -> list[str]:
    """Setup commands from a file: one per line; blank lines and ``#`` comments skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise SparseInferError(f"cannot read commands file {path}: {e.strerror}") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def profile_genai(folder, threads: int, prompt_ids: list[int], new_tokens: int, prefix) -> dict:
    """onnxruntime's profile of one genai generation on ``folder``: per decode token, by op."""
    from sparseinfer.model_export.ort_profile import summarize

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    before = set(prefix.parent.glob(prefix.name + "*.json"))
    runner = GenaiRunner(folder, threads, profile=str(prefix))
    runner(prompt_ids, new_tokens)
    del runner                              # the session writes its trace when it is destroyed
    import gc

    gc.collect()
    written = sorted(set(prefix.parent.glob(prefix.name + "*.json")) - before)
    if not written:
        raise SparseInferError(f"onnxruntime-genai wrote no profile under {prefix}*")
    out = summarize(written[-1], skip_runs=1, top=10)
    out["top_nodes"] = top_nodes(written[-1], skip_runs=1, top=8)
    return out


def top_nodes(path, skip_runs: int = 1, top: int = 8) -> list[dict]:
    """The nodes (by name) that take the most time per run after ``skip_runs`` runs: which
    MatMul is the LM head, say, where ``summarize`` groups by op."""
    from collections import defaultdict

    from sparseinfer.model_export.ort_profile import CONTAINERS, KERNEL_SUFFIX, read_events

    events = read_events(path)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")[skip_runs:]
    if not runs:
        return []
    lo, n = runs[0][0], len(runs)
    nodes = defaultdict(lambda: [0.0, ""])
    for e in events:
        args = e.get("args", {})
        if (e.get("cat") == "Node" and e.get("name", "").endswith(KERNEL_SUFFIX) and e["ts"] >= lo
                and args.get("op_name") not in CONTAINERS):
            entry = nodes[e["name"][:-len(KERNEL_SUFFIX)]]
            entry[0] += e["dur"]
            entry[1] = args.get("op_name", "?")
    ranked = sorted(nodes.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"node": name, "op": op, "us_per_run": round(us / n, 1)} for name, (us, op) in ranked]


def benchmark(ours, builder, prompt: str | None = None, prompt_ids: list[int] | None = None, new_tokens: int = 64,
              rounds: int = 7, warmup: int = 1, threads: int = 2, onnx_decoder: bool = True,
              profile_dir=None, commands: list[str] | None = None, notes: list[str] | None = None,
              log=lambda s: None, quiet_wait_s: float = 0.0) -> dict:
    """The whole comparison (see the module docstring); returns the result dict."""
    from sparseinfer.benchmarks.machine import machine_description

    ours, builder = Path(ours), Path(builder)
    facts = {"ours": model_facts(ours), "builder": model_facts(builder)}
    if prompt_ids is None:
        from sparseinfer.model_export.export_folder import prompt_ids as encode, tokenizer_for

        prompt = prompt or DEFAULT_PROMPT
        tok, bos, _ = tokenizer_for(model_file(ours))
        prompt_ids = encode(tok, bos, prompt)
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise SparseInferError("the prompt is empty")
    runners: dict[str, Callable] = {OURS_GENAI: GenaiRunner(ours, threads), BUILDER_GENAI: GenaiRunner(builder, threads)}
    if onnx_decoder:
        runners[OURS_DECODER] = DecoderRunner(model_file(ours), threads, len(prompt_ids) + new_tokens)
    measured = run_rounds(runners, prompt_ids, new_tokens, rounds, warmup, log, quiet_wait_s)
    names = list(runners)
    summary = summarize_rounds(measured["rounds"], names)
    quiet = [r for r in measured["rounds"] if isinstance(r["round"], int) and
             all(r[n]["other_cores"] is not None and r[n]["other_cores"] < QUIET_CORES for n in names)]
    summary["quiet_rounds"] = {"other_cores_below": QUIET_CORES, "count": len(quiet),
                               **(summarize_rounds(quiet, names) if quiet else {})}
    toks = measured["tokens"]
    ratio = summary["ratio_to_" + BUILDER_GENAI][OURS_GENAI]["of_medians"]
    import onnxruntime_genai as og

    result = {
        "benchmark": "genai-builder",
        "what": "decode tokens/s of our dense export against onnxruntime-genai's model builder's fp32 model of "
                "the same checkpoint, CPU provider, greedy, rounds in alternating order",
        "machine": {**machine_description("cpu"), "onnxruntime_genai": og.__version__},
        "settings": {"prompt": prompt, "prompt_ids": prompt_ids, "prompt_tokens": len(prompt_ids),
                     "new_tokens": new_tokens, "decode_steps_timed": new_tokens - 1, "threads": threads,
                     "rounds": rounds, "warmup_rounds": warmup, "greedy": True,
                     "kv_buffer_length": len(prompt_ids) + new_tokens, "quiet_wait_s": quiet_wait_s,
                     "tokens_per_s": "(new tokens - 1) / time from the first sampled token to the last"},
        "models": facts,
        **summary,
        "target": {"ours_over_builder_at_least": TARGET_RATIO, "ratio": ratio, "met": ratio >= TARGET_RATIO},
        "same_tokens": {name: _divergence(toks[name], toks[BUILDER_GENAI]) is None for name in names},
        "first_divergence_from_builder": {name: _divergence(toks[name], toks[BUILDER_GENAI]) for name in names},
        "rounds": measured["rounds"],
        "commands": list(commands or []),
        "notes": list(notes or []),
    }
    if profile_dir:
        result["profile"] = {
            name: profile_genai(folder, threads, prompt_ids, new_tokens, Path(profile_dir) / name)
            for name, folder in (("ours", ours), ("builder", builder))}
    return result


# ---------------------------------------------------------------- command line
def own_command_line(ctx: click.Context) -> str:
    """This subcommand's command line, rebuilt from its parsed parameters (the same whether it
    came from a shell or from a test)."""
    words = [Path(sys.executable).as_posix(), "-m", "sparseinfer.benchmarks.genai_builder", ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or not isinstance(param, click.Option):
            continue
        flag = param.opts[0]
        if param.is_flag:
            if param.secondary_opts:
                words.append(flag if value else param.secondary_opts[0])
            elif value:
                words.append(flag)
        elif param.multiple:
            for v in value:
                words += [flag, str(v)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def _fail(e: Exception):
    click.echo(f"error: {e}", err=True)
    sys.exit(1)


@click.group()
def cli():
    """Our dense export against onnxruntime-genai's model builder (see the module's docstring)."""


@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The Hugging Face folder to write.")
def convert(checkpoint, out):
    """Write CHECKPOINT (HF folder or GGUF file) as a float32 Hugging Face Llama folder."""
    try:
        path = write_hf_folder(checkpoint, out)
    except SparseInferError as e:
        _fail(e)
    click.echo(f"wrote {path}: " + ", ".join(sorted(p.name for p in path.iterdir())))


@cli.command()
@click.argument("hf_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The builder's output folder.")
@click.option("--python", "python", required=True, type=click.Path(exists=True, dir_okay=False),
              help="An interpreter with onnxruntime-genai, torch and transformers (a side environment).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="The builder's -c cache folder.")
def build(hf_dir, out, python, cache_dir):
    """Run onnxruntime-genai's model builder on HF_DIR: fp32, CPU provider."""
    # absolute paths, run from the output's parent: with a checkout of this project as the
    # working directory, ``python -m`` puts its folders (``kernels``, ``tools``) first on
    # sys.path, where transformers' optional imports find them instead of the packages
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = builder_command(python, Path(hf_dir).resolve(), out, Path(cache_dir).resolve() if cache_dir else None)
    click.echo(f"$ cd {shlex.quote(str(out.parent))} && " + shlex.join(cmd))
    proc = subprocess.run(cmd, cwd=out.parent)
    if proc.returncode:
        _fail(SparseInferError(f"the builder exited with {proc.returncode}"))


@cli.command()
@click.option("--ours", required=True, type=click.Path(exists=True, file_okay=False), help="Our export's folder.")
@click.option("--builder", required=True, type=click.Path(exists=True, file_okay=False), help="The builder's folder.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The result JSON.")
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True, help="Encoded with our export's tokenizer.")
@click.option("--new-tokens", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=7, show_default=True, help="Timed rounds.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed rounds first.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="Intra-op threads.")
@click.option("--onnx-decoder/--no-onnx-decoder", default=True, show_default=True,
              help="Also time our export on OnnxDecoder.")
@click.option("--profile-dir", type=click.Path(file_okay=False), default=None,
              help="Also profile one genai generation of each model (onnxruntime's profiler) into this folder.")
@click.option("--commands-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Setup commands to record, one per line.")
@click.option("--quiet-wait-s", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Before each round wait up to this long for other processes to use < 0.3 cores (none is paused).")
@click.option("--note", "notes", multiple=True, help="A note for the result (repeatable).")
def run(ours, builder, out, prompt, new_tokens, rounds, warmup, threads, onnx_decoder, profile_dir, commands_file,
        quiet_wait_s, notes):
    """Time decode tokens/s of OURS and BUILDER in alternating rounds; write --out."""
    try:
        commands = read_commands(commands_file) if commands_file else []
        commands.append(own_command_line(click.get_current_context()))
        result = benchmark(ours, builder, prompt=prompt, new_tokens=new_tokens, rounds=rounds, warmup=warmup,
                           threads=threads, onnx_decoder=onnx_decoder, profile_dir=profile_dir, commands=commands,
                           notes=list(notes), log=lambda s: click.echo(s, err=True), quiet_wait_s=quiet_wait_s)
    except SparseInferError as e:
        _fail(e)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    t = result["tokens_per_s"]
    click.echo(", ".join(f"{n} {v['median']:.2f} tok/s" for n, v in t.items())
               + f"; ours / builder {result['target']['ratio']:.3f} (target >= {TARGET_RATIO}: "
               + ("met" if result["target"]["met"] else "not met") + f"); wrote {out}")


if __name__ == "__main__":
    cli()
