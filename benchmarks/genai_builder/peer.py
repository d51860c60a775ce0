"""A peer model timed beside ours: onnxruntime-genai's builder int4 model of the same shape
(``build --precision int4``, from the checkpoint's SiLU twin where the builder lacks its
activation: ``convert --as-silu``; ``build_int4_peer`` does both), for ``bench-decode --peer
genai-int4``.

Both folders decode under onnxruntime-genai's Generator (``runners.GenaiRunner``, the same
runner for both) in one process, greedy, the same prompt ids, new tokens and intra-op threads,
in the benchmark's alternating rounds (``rounds.run_rounds_recreated``: warm-up rounds, then
timed ones whose order alternates, in two blocks with the models created in opposite orders).
Tokens/s is ``Run.decode_tokens_per_s``. The two models need not choose the same tokens (a
SiLU twin does not): only their speed is compared, so their shapes must agree
(``facts.decoder_shape``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from sparseinfer.reference.errors import SparseInferError

from .build import run_builder
from .convert import BUILDER_ACTIVATIONS, write_hf_folder
from .facts import GENAI_CONFIG, decoder_shape, model_facts
from .rounds import quiet_summary, run_rounds_recreated, summarize_rounds
from .runners import OURS_GENAI, GenaiRunner, Run

PEER_NAME = "genai-int4"
PEER_GENAI = "peer_genai"            # the peer's row in the rounds


def build_int4_peer(checkpoint, out, python, log=print) -> Path:
    """The builder's int4 model of ``checkpoint`` (a path or a loaded ``Checkpoint``) in the
    folder ``out``, built with the interpreter ``python`` (the side environment), unless ``out``
    already holds one. The float32 Hugging Face folder it is built from is written beside it
    (``out`` + ``-hf``): the checkpoint's SiLU twin where the builder lacks its activation,
    which ``log`` is told."""
    out = Path(out)
    if (out / GENAI_CONFIG).is_file():              # the builder writes it last
        log(f"{out}: the builder's int4 model, built before")
        return out
    if not hasattr(checkpoint, "weights"):
        from sparseinfer.model_export.loaders import load_checkpoint

        checkpoint = load_checkpoint(checkpoint)
    act = checkpoint.shape.hidden_act
    twin = act not in BUILDER_ACTIVATIONS
    if twin:
        log(f"the builder has no {act}: its int4 model is built from the checkpoint's SiLU twin (the same "
            f"weights; a dense model's speed does not depend on its activation)")
    hf = write_hf_folder(checkpoint, out.with_name(out.name + "-hf"), as_silu=twin)
    return run_builder(python, hf, out, cache_dir=out.with_name(out.name + "-cache"), log=log, precision="int4")


def check_same_shape(ours, peer) -> dict:
    """The shape both folders' genai configs give; a difference is an error naming the field."""
    a, b = decoder_shape(ours), decoder_shape(peer)
    for key in a:
        if a[key] != b[key]:
            raise SparseInferError(f"{peer}: {key} {b[key]} in its genai_config.json, {a[key]} in {ours}'s: "
                                   f"the peer must have our model's shape")
    return a


def peer_rounds(ours, peer, prompt_ids: list[int], *, new_tokens: int = 64, rounds: int = 9, warmup: int = 1,
                threads: int = 2, name: str = PEER_NAME, log=lambda s: None, quiet_wait_s: float = 0.0,
                runner: Callable[[Path, int], Callable[[list[int], int], Run]] = GenaiRunner) -> dict:
    """Our export folder ``ours`` and the peer's folder ``peer`` timed in alternating rounds.

    ``runner(folder, threads)`` makes each model's runner (genai's Generator unless told).
    Returns the peer's entry: ``name``, ``tokens_per_s_median``, our ``ours_tokens_per_s_median``
    under the same runner, ``speedup`` (ours / peer, of the medians) and per round, the quiet
    rounds' summary, the models' sizes, the settings and the rounds themselves."""
    ours, peer = Path(ours), Path(peer)
    shape = check_same_shape(ours, peer)
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise SparseInferError("the prompt is empty")
    makers = {OURS_GENAI: lambda: runner(ours, threads), PEER_GENAI: lambda: runner(peer, threads)}
    measured = run_rounds_recreated(makers, prompt_ids, new_tokens, rounds, warmup, log, quiet_wait_s)
    names = list(makers)
    summary = summarize_rounds(measured["rounds"], names, reference=PEER_GENAI)
    ratio = summary["ratio_to_" + PEER_GENAI][OURS_GENAI]
    return {
        "name": name,
        "folder": str(peer),
        "runner": "onnxruntime-genai Generator, greedy, both models in one process, rounds in alternating order, "
                  "half of them with the models created in the reverse order",
        "tokens_per_s_median": summary["tokens_per_s"][PEER_GENAI]["median"],
        "ours_tokens_per_s_median": summary["tokens_per_s"][OURS_GENAI]["median"],
        "speedup": ratio["of_medians"],
        "speedup_per_round": ratio["per_round"],
        "speedup_median_per_round": ratio["median_per_round"],
        "speedup_median_per_round_interval": ratio["median_per_round_interval"],
        "tokens_per_s": summary["tokens_per_s"],
        "quiet_rounds": quiet_summary(measured["rounds"], names),
        "model_bytes": {OURS_GENAI: model_facts(ours)["model_bytes"], PEER_GENAI: model_facts(peer)["model_bytes"]},
        "shape": shape,
        "settings": {"prompt_tokens": len(prompt_ids), "new_tokens": new_tokens, "decode_steps_timed": new_tokens - 1,
                     "threads": threads, "rounds": rounds, "warmup_rounds": warmup, "quiet_wait_s": quiet_wait_s},
        "rounds": measured["rounds"],
    }
