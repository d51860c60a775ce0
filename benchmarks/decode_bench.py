"""Dense vs sparse decode tokens/s of the same checkpoint on onnxruntime, measured in the
same run (``sparseinfer bench-decode``).

Both exports are written first and flushed to disk, then both are loaded and decode the
same greedy continuation length after the same prompt: one warm-up each, then ``repeats``
rounds that alternate dense and sparse, so that a drift of the machine's state hits all
alike, in an order reversed every other round (``round_order``); for the second half of the
rounds the models are loaded anew in the reverse order, with a warm-up again
(``creation_blocks``: a session created second decoded faster by itself). Reported: the
median tokens/s of each and the median of the per-round sparse/dense ratios (the speed-up).
Optionally each model is then decoded once more with onnxruntime's profiler on
(``profile_decodes``).
"""
from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path

import numpy as np

from sparseinfer.model_export.machine import machine_description
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.files import make_folder, write_json

SHORT_PROMPT = "The quick brown fox"


def kernels_label(decoder) -> str:
    """What ran the MLPs: 'dense' for a dense export (no SparseMLP node), else the sparse
    export's native kernels or function bodies."""
    return decoder.mlp_kernels if decoder.sparse else "dense"


@contextlib.contextmanager
def _no_bar(description: str, total: int):
    yield lambda: None


def timed_rows(result: dict) -> dict:
    """A result's row per timed model (dense, sparse, …), in the order they ran."""
    return {kind: row for kind, row in result.items()
            if kind != "peer" and isinstance(row, dict) and "tokens_per_s_median" in row}


def profile_decodes(paths, kernels_of, provider, threads, prompt, tokens, work) -> dict:
    """Each model decoded once more, ``tokens`` tokens, in a session with onnxruntime's profiler
    on; the decode steps' profile summarised (ort_profile), the prefill left out."""
    import gc

    from sparseinfer.model_export.decode import OnnxDecoder
    from sparseinfer.model_export.generation import generate
    from sparseinfer.model_export.ort_profile import summarize

    out = {"decode_tokens": tokens}
    for kind, path in paths.items():
        decoder = OnnxDecoder(path, provider, mlp_kernels=kernels_of[kind], threads=threads,
                              profile=str(work / "profiles" / kind))
        generate(decoder, prompt, tokens)
        out[kind] = summarize(decoder.end_profiling(), skip_runs=1)
        del decoder
        gc.collect()
    return out


def synthetic_checkpoint(work: Path, shape_name: str, layers: int, target_sparsity: float) -> Path:
    """The synthetic checkpoint of these settings under ``work``, made once."""
    from sparseinfer.model_export.synthetic import make_checkpoint

    checkpoint = work / f"synthetic-{shape_name}-{layers}l-s{target_sparsity}"
    if not (checkpoint / "config.json").is_file():
        make_checkpoint(shape_name, checkpoint, layers=layers, target_sparsity=target_sparsity)
    return checkpoint


def quantized_bench_conflicts(quantize, portable, dtype, target, provider, mlp_kernels, with_portable,
                              accuracy_level=0) -> str | None:
    """Why a bench of ``quantize`` exports cannot run with these settings (None if it can)."""
    from sparseinfer.model_export.export import quantize_conflicts

    if not quantize:
        return quantize_conflicts(quantize, accuracy_level=accuracy_level)
    if mlp_kernels == "function":
        return "--quantize needs the op library's kernels: its block-quantized nodes carry no function body"
    if provider != "cpu":
        return "--quantize runs on the cpu provider: the op library's CUDA kernel takes no block formats yet"
    if with_portable:
        return "--with-portable times a portable float32 export, which --quantize cannot be (drop one)"
    return quantize_conflicts(quantize, portable, dtype, target, accuracy_level)


def peer_conflicts(peer, peer_model, builder_python, provider) -> str | None:
    """Why ``--peer`` cannot run with these settings (None if it can)."""
    from .genai_builder.facts import GENAI_CONFIG
    from .genai_builder.peer import PEER_NAME

    if not peer:
        return "--peer-model and --builder-python belong to --peer" if peer_model or builder_python else None
    if peer != PEER_NAME:
        return f"--peer {peer}: unknown peer; the one known is {PEER_NAME}"
    if provider != "cpu":
        return f"--peer {peer} runs onnxruntime-genai on the CPU: drop --provider {provider}"
    if peer_model:
        if not (Path(peer_model) / GENAI_CONFIG).is_file():
            return f"--peer-model {peer_model}: no {GENAI_CONFIG} there (the builder's int4 folder)"
    elif not builder_python:
        return (f"--peer {peer} needs the builder's int4 model: --peer-model DIR (built before), or --builder-python "
                f"PY (an interpreter with torch, transformers and onnxruntime-genai) to build it")
    return None


def build_peer(checkpoint, work: Path, python) -> Path:
    """The builder's int4 model of ``checkpoint`` under ``work`` (built once)."""
    from .genai_builder.peer import build_int4_peer

    return build_int4_peer(checkpoint, work / "genai-int4", python, log=lambda line: None)


def peer_result(ours, peer_folder, prompt, tokens, repeats, threads, runner=None) -> dict:
    """Our sparse export and the peer under onnxruntime-genai's Generator in alternating rounds:
    ``name``, ``tokens_per_s_median``, ``speedup`` (our sparse / the peer, of the medians), ours
    under the same runner, the per-round ratios and the rounds. ``threads`` None: one per core
    (genai's Generator takes a number)."""
    from .genai_builder import runners
    from .genai_builder.peer import peer_rounds

    got = peer_rounds(ours, peer_folder, prompt, new_tokens=tokens, rounds=repeats,
                      threads=threads or os.cpu_count() or 1, runner=runner or runners.GenaiRunner)
    keep = ("name", "folder", "runner", "tokens_per_s_median", "ours_tokens_per_s_median", "speedup",
            "speedup_per_round", "speedup_median_per_round", "speedup_median_per_round_interval", "quiet_rounds",
            "model_bytes", "settings")
    return {key: got[key] for key in keep}


def bench_decode(checkpoint, *, shape_name, layers, target_sparsity, alpha, target, provider, threads, mlp_kernels,
                 tokens, repeats, prompt_tokens, profile_tokens, portable, dtype, with_portable, cuda_graph, work_dir,
                 out_json=None, export=None, bar=_no_bar, quantize=None, accuracy_level=0, peer=None,
                 peer_model=None, builder_python=None, peer_runner=None) -> dict:
    """The benchmark's result (also written to ``out_json``, first after the timed rounds,
    again with the profiles). ``checkpoint`` None: a synthetic one (``shape_name``, ``layers``,
    ``target_sparsity``) under ``work_dir``. ``export``: ``model_export.export_folder.export_checkpoint``
    or a function that takes the same arguments (one that shows progress); ``bar(description,
    total)``: a context manager giving the function to call after each decode. ``quantize``: a
    block format, both exports in it (the dense one the honest quantized baseline), each read
    from the checkpoint one layer at a time, ``accuracy_level`` their MatMulNBits nodes'."""
    from sparseinfer.model_export.decode import OnnxDecoder
    from sparseinfer.model_export.export_folder import export_checkpoint, prompt_ids
    from sparseinfer.model_export.generation import generate
    from sparseinfer.model_export.loaders import load_checkpoint, open_checkpoint

    from .genai_builder.rounds import creation_blocks, median_interval, round_order

    export = export or export_checkpoint
    if cuda_graph and (provider != "cuda" or portable):
        raise SparseInferError("--cuda-graph needs --provider cuda and the fused export form (not --portable)")
    why = quantized_bench_conflicts(quantize, portable, dtype, target, provider, mlp_kernels, with_portable,
                                    accuracy_level) or peer_conflicts(peer, peer_model, builder_python, provider)
    if why:
        raise SparseInferError(why)
    work = Path(work_dir)
    if checkpoint is None:
        checkpoint = synthetic_checkpoint(work, shape_name, layers, target_sparsity)
    if quantize:        # each export reads it one layer at a time; here only its tokenizer, tokens and shape
        with open_checkpoint(checkpoint) as ck:
            source = checkpoint
    else:
        ck = source = load_checkpoint(checkpoint)
    prompt = prompt_ids(ck.tokenizer, ck.bos_token_id, SHORT_PROMPT) if ck.tokenizer else [0, 1, 2, 3]
    if prompt_tokens:
        if prompt_tokens + tokens > ck.shape.max_position_embeddings:
            raise SparseInferError(f"Invalid value for --prompt-tokens: {prompt_tokens} prompt tokens and {tokens} "
                                   f"generated exceed the model's context of {ck.shape.max_position_embeddings}")
        prompt = [prompt[i % len(prompt)] for i in range(prompt_tokens)]
    kinds = ("dense", "sparse")
    form = "-portable" if portable else ""
    form += "" if dtype == "float32" else f"-{dtype}"
    form += f"-{quantize}" if quantize else ""
    form += f"-level{accuracy_level}" if accuracy_level else ""
    paths = {kind: export(source, work / f"{kind}-{target}{form}" / "model.onnx", sparse=kind == "sparse",
                          alpha=alpha, target=target, portable=portable, dtype=dtype,
                          **({"quantize": quantize, "accuracy_level": accuracy_level} if quantize else {}))
             for kind in kinds}
    if with_portable and not portable:
        paths["dense-portable"] = export(source, work / f"dense-{target}-portable" / "model.onnx", sparse=False,
                                         target=target, portable=True)
    os.sync()  # no write-back of the fresh exports competes with the timed decodes
    specs = {kind: (paths[kind], mlp_kernels, False) for kind in paths}     # kind: (model, MLP kernels, graphs)

    def make(kind):
        path, kernels, graph = specs[kind]
        return OnnxDecoder(path, provider, threads, kernels, **({"cuda_graph": True} if graph else {}))

    decoders = {kind: make(kind) for kind in specs}
    if decoders["sparse"].mlp_kernels == "native" and not quantize:     # a quantized export has no bodies
        paths["sparse-function"] = paths["sparse"]
        specs["sparse-function"] = (paths["sparse"], "function", False)
        decoders["sparse-function"] = make("sparse-function")
    if cuda_graph:                       # the same exports, decode steps replayed as CUDA graphs
        for kind in kinds:
            paths[f"{kind}-graph"] = paths[kind]
            specs[f"{kind}-graph"] = (paths[kind], mlp_kernels, True)
            decoders[f"{kind}-graph"] = make(f"{kind}-graph")
    names = list(decoders)
    labels = {kind: kernels_label(decoder) for kind, decoder in decoders.items()}
    kernels_of = {kind: decoder.mlp_kernels for kind, decoder in decoders.items()}
    blocks = creation_blocks(names, repeats)
    runs, prefills, last = {kind: [] for kind in names}, {kind: [] for kind in names}, {}
    orders, created_orders, done = [], [], 0
    with bar(f"decode {'/'.join(names)} alternately", len(names) * (repeats + len(blocks))) as advance:
        for b, (created, n) in enumerate(blocks):
            if b:                              # the same models made anew, in the reverse order
                decoders.clear()
                gc.collect()
                decoders = {kind: make(kind) for kind in created}
            for r in range(n + 1):             # r == 0: the block's warm-up; then forward, reversed, ...
                order = round_order(names, done + r - 1) if r else names
                if r:
                    orders.append(order)
                    created_orders.append(created)
                for kind in order:
                    last[kind] = generate(decoders[kind], prompt, tokens)
                    if r:
                        runs[kind].append(last[kind].decode_tokens_per_s)
                        prefills[kind].append(last[kind].prefill_s * 1e3)
                    advance()
            done += n
    decoders.clear()                       # free the timed sessions before the profiled ones
    rows = {kind: {"tokens_per_s_median": float(np.median(runs[kind])), "tokens_per_s_runs": runs[kind],
                   "prefill_ms_median": float(np.median(prefills[kind])),
                   "mlp_kernels": labels[kind],
                   "model_bytes": sum(f.stat().st_size for f in paths[kind].parent.glob("model.onnx*")),
                   **({"rows_of_last_run": last[kind].kernel_rows} if last[kind].kernel_rows else {})}
            for kind in names}
    ratios = {kind: [s / d for s, d in zip(runs[kind], runs["dense"])] for kind in names if kind != "dense"}
    result = {"benchmark": "decode", "checkpoint": str(checkpoint), "shape": ck.shape.to_dict(), "alpha": alpha,
              "target": target, "dtype": dtype, "quantize": quantize,
              "accuracy_level": accuracy_level if quantize else None, "provider": provider, "threads": threads,
              "decode_tokens": tokens, "prompt_tokens": len(prompt),
              "repeats": repeats, "portable": portable, **rows,
              "speedup": float(np.median(ratios["sparse"])), "speedup_per_round": ratios["sparse"],
              "speedup_interval": median_interval(ratios["sparse"], created_orders),
              "order_per_round": orders, "created_per_round": created_orders,
              **({"speedup_function_bodies": float(np.median(ratios["sparse-function"]))}
                 if "sparse-function" in ratios else {}),
              **({"speedup_dense_over_dense_portable": float(np.median([1 / r for r in ratios["dense-portable"]]))}
                 if "dense-portable" in ratios else {}),
              "machine": machine_description(provider), "complete": not profile_tokens}

    def save():
        if out_json:
            make_folder(Path(out_json).parent)
            write_json(out_json, result)

    if peer:
        result["peer"] = peer_result(paths["sparse"].parent, peer_model or build_peer(source, work, builder_python),
                                     prompt, tokens, repeats, threads, peer_runner)
    save()                                 # the timed rounds are kept even if the profiles are cut short
    profiles = profile_decodes({k: v for k, v in paths.items() if not k.endswith("-graph")}, kernels_of,
                               provider, threads, prompt, profile_tokens, work) \
        if profile_tokens else None
    if profiles:
        result.update(profile=profiles, complete=True)
        save()
    return result
