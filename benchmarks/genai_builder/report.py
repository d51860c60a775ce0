"""``run``: the whole comparison (see the package's docstring) as one result dict: the
settings, the models' facts, the rounds and their summary, the target, whether the runners
chose the same tokens, the commands and notes, and optionally onnxruntime's profiles."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from sparseinfer.reference.errors import SparseInferError

from .facts import model_facts, model_file
from .rounds import quiet_summary, run_rounds_recreated, summarize_rounds
from .runners import BUILDER_GENAI, OURS_DECODER, OURS_GENAI, DecoderRunner, GenaiRunner

DEFAULT_PROMPT = ("The history of the Roman Empire begins with the founding of the city of Rome. Over the "
                  "following centuries")
TARGET_RATIO = 1.0           # our dense export >= 1.0x the builder's fp32 model


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


def _divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def benchmark(ours, builder, prompt: str | None = None, prompt_ids: list[int] | None = None, new_tokens: int = 64,
              rounds: int = 7, warmup: int = 1, threads: int = 2, onnx_decoder: bool = True,
              profile_dir=None, commands: list[str] | None = None, notes: list[str] | None = None,
              log=lambda s: None, quiet_wait_s: float = 0.0) -> dict:
    """The whole comparison (see the package's docstring); returns the result dict."""
    from sparseinfer.model_export.machine import machine_description

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
    makers: dict[str, Callable] = {OURS_GENAI: lambda: GenaiRunner(ours, threads),
                                   BUILDER_GENAI: lambda: GenaiRunner(builder, threads)}
    if onnx_decoder:
        makers[OURS_DECODER] = lambda: DecoderRunner(model_file(ours), threads, len(prompt_ids) + new_tokens)
    measured = run_rounds_recreated(makers, prompt_ids, new_tokens, rounds, warmup, log, quiet_wait_s)
    names = list(makers)
    summary = summarize_rounds(measured["rounds"], names)
    summary["quiet_rounds"] = quiet_summary(measured["rounds"], names)
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
