"""Test helpers: weight construction and self-explaining comparisons (gpu-mode style)."""
from __future__ import annotations

from statistics import NormalDist

import numpy as np

from sparseinfer.reference.dtypes import WEIGHT_DTYPES  # noqa: F401  (the weight types the tests cover: the product's)


def assert_bits_equal(actual, expected, what: str = "", context: str = "") -> None:
    """Bit-for-bit float32 equality; on failure report count and the first mismatches."""
    a = np.asarray(actual, dtype=np.float32)
    e = np.asarray(expected, dtype=np.float32)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape} {context}"
    bad = np.flatnonzero(a.view(np.uint32).ravel() != e.view(np.uint32).ravel())
    if bad.size:
        first = ", ".join(f"[{i}] {a.ravel()[i]!r} vs {e.ravel()[i]!r}" for i in bad[:5])
        raise AssertionError(f"{what}: {bad.size} of {a.size} values differ in bits; first: {first} {context}")


def mlp_weights(rng, d: int, k: int, dtype=np.float32, sparsity: float = 0.5):
    """Random HF-layout weights and x whose gate pre-activations are negative with about
    probability ``sparsity``: each W_gate row gets a shift along sign(x) that moves z by
    ``-Phi^-1(sparsity)`` standard deviations (ProSparse-like when sparsity ~ 0.9)."""
    x = rng.standard_normal(d).astype(np.float32)
    w_gate = rng.standard_normal((k, d)) / np.sqrt(d)
    z_std = np.linalg.norm(x) / np.sqrt(d)
    shift = -NormalDist().inv_cdf(sparsity) * z_std
    w_gate += shift * np.sign(x) / np.abs(x).sum()
    w_up = rng.standard_normal((k, d)) / np.sqrt(d)
    w_down = rng.standard_normal((d, k)) / np.sqrt(k)
    return x, w_gate.astype(dtype), w_up.astype(dtype), w_down.astype(dtype)


def write_gguf_shape(writer, s) -> None:
    """The model-shape keys of a Llama GGUF (layers, widths, heads, context) for shape ``s``."""
    writer.add_block_count(s.num_layers)
    writer.add_embedding_length(s.d)
    writer.add_feed_forward_length(s.k)
    writer.add_head_count(s.num_heads)
    writer.add_head_count_kv(s.num_kv_heads)
    writer.add_context_length(s.max_position_embeddings)


def write_gguf_llama_vocab(writer, vocab) -> None:
    """A llama (SentencePiece) tokenizer of ``vocab`` in a GGUF: scores falling with the id,
    <s> = 1 and </s> = 2."""
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab)
    writer.add_token_scores([-float(i) for i in range(len(vocab))])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def finish_gguf(writer) -> None:
    """Write a GGUF writer's header, keys and tensors to its file and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_tensors(weights):
    """(GGUF tensor name, array) of a synthetic model's fp32 weights, Q and K rope-permuted as
    llama.cpp stores them: what the GGUF test files write."""
    from sparseinfer.model_export.loaders.gguf_file import GGUF_GLOBAL_NAMES, GGUF_LAYER_NAMES, rope_permute
    from sparseinfer.model_export.loaders.names import hf_tensors

    s = weights.shape
    for hf, arr in hf_tensors(weights, "fp32").items():
        name = GGUF_GLOBAL_NAMES.get(hf)
        if name is None:
            i, rest = hf[len("model.layers."):].split(".", 1)
            name = f"blk.{i}.{GGUF_LAYER_NAMES[rest]}"
        if hf.endswith("q_proj.weight"):
            arr = rope_permute(arr, s.num_heads)
        elif hf.endswith("k_proj.weight"):
            arr = rope_permute(arr, s.num_kv_heads)
        yield hf, name, arr


def write_eval_data(root, gsm8k, bbh_sizes: dict, question: str = "{task} question {i}?"):
    """A tiny local data folder in the layout ``sparseinfer eval --data-dir`` reads:
    gsm8k/test.jsonl from (question, answer) pairs, and bbh/bbh/<task>.json with
    ``bbh_sizes[task]`` examples each (inputs from ``question``, targets alternating No/Yes)."""
    import json

    (root / "gsm8k").mkdir(parents=True)
    (root / "gsm8k" / "test.jsonl").write_text(
        "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in gsm8k))
    (root / "bbh" / "bbh").mkdir(parents=True)
    for task, n in bbh_sizes.items():
        examples = [{"input": question.format(task=task, i=i), "target": "Yes" if i % 2 else "No"} for i in range(n)]
        (root / "bbh" / "bbh" / f"{task}.json").write_text(json.dumps({"canary": "x", "examples": examples}))
    return root


# The largest slope of silu (1.0998), gelu and gelu_tanh (1.1289): tests/test_activations_gelu.py.
ACTIVATION_MAX_SLOPE = 1.13


def approximate_mlp_bound(x, w_gate, w_up, w_down, rows, act) -> np.ndarray:
    """Per output column, a bound on |out - reference| for a sparse MLP over ``rows`` computed
    in any float32 summation order with a library activation (an ONNX body: MatMul, Sigmoid,
    Erf), the reference being mlp_sparse on the same rows. Each dot product of both is within
    rigorous_error_bound of exact, so z and h2 differ by at most twice that (dz, dh2); h1 by
    ACTIVATION_MAX_SLOPE dz plus act.error_bound at |z| + dz; h3 = h1 h2 by the propagated
    difference plus one rounding on each side; the down projections by the h3 differences
    times |W_down| plus each side's own summation bound."""
    from sparseinfer.reference.order_contract import UNIT_ROUNDOFF_FP32, rigorous_error_bound, warp_dot_rows

    x64, d = np.asarray(x, np.float64), np.shape(x)[-1]
    g, u = np.asarray(w_gate, np.float64)[rows], np.asarray(w_up, np.float64)[rows]
    z = warp_dot_rows(np.asarray(w_gate)[rows], x).astype(np.float64)
    dz = 2 * rigorous_error_bound(np.abs(g) @ np.abs(x64), d)
    h1 = act(z.astype(np.float32)).astype(np.float64)
    h2 = warp_dot_rows(np.asarray(w_up)[rows], x).astype(np.float64)
    dh2 = 2 * rigorous_error_bound(np.abs(u) @ np.abs(x64), d)
    dh1 = ACTIVATION_MAX_SLOPE * dz + act.error_bound(np.abs(z) + dz)
    big1, big2 = np.abs(h1) + dh1, np.abs(h2) + dh2
    dh3 = dh1 * big2 + np.abs(h1) * dh2 + 2 * UNIT_ROUNDOFF_FP32 * big1 * big2
    wd = np.abs(np.asarray(w_down, np.float64)[:, rows])                    # [d, rows]
    return wd @ dh3 + 2 * rigorous_error_bound(wd @ (np.abs(h1 * h2) + dh3), max(len(rows), 1))


def computed_rows_agree(got, trace, x, w_gate, act) -> bool:
    """A library activation's +AS mask (an ONNX body: up computed where h1 != 0) against the
    reference's: the same rows, except where the reference's h1 is within act.error_bound of
    zero (onnxruntime's Sigmoid is 0 below about -17, 1 + Erf below about -5.5)."""
    diff = np.flatnonzero(np.asarray(got, bool) != trace.computed_up)
    from sparseinfer.reference.order_contract import warp_dot_rows
    z = warp_dot_rows(np.asarray(w_gate)[diff], x)
    return bool((trace.computed_gate[diff] & (np.abs(act(z)) <= act.error_bound(z))).all())


def eval_fixtures(root, gsm8k, bbh_sizes: dict, question: str = "{task} question {i}?") -> dict:
    """The evaluation tests' inputs under ``root``: a tiny 2-layer checkpoint at 0.9 sparsity
    and the task files (``write_eval_data``)."""
    from sparseinfer.model_export.synthetic import make_checkpoint

    ck = make_checkpoint("tiny", root / "ck", layers=2, target_sparsity=0.9)
    return {"ck": ck, "data": write_eval_data(root / "data", gsm8k, bbh_sizes, question), "root": root}


def greedy_steps(decoder, reference, prompt, decode_steps: int):
    """Prefill ``prompt`` then ``decode_steps`` greedy steps (the reference's choice) in an
    ONNX decoder and the reference: [(got, want, debug outputs, reference step or None)]."""
    got, _ = decoder.step(prompt)
    want = reference.prefill(prompt)
    steps = [(got, want, {}, None)]
    tok = int(np.argmax(want[-1]))
    for _ in range(decode_steps):
        got, debug = decoder.step([tok])
        r = reference.decode(tok, trace=True)
        steps.append((got, r.logits[None], debug, r))
        tok = int(np.argmax(r.logits))
    return steps


def run_cli(*args):
    """``sparseinfer ARGS...`` in process (click's runner); each argument as a string."""
    from click.testing import CliRunner

    from sparseinfer.tools.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(r, *needles: str, code: int = 2) -> str:
    """The house rule for bad input: exit ``code`` (2), nothing on stdout and one ``error: ...``
    line on stderr holding every needle; returns that line."""
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert r.stdout == "", r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def raises_one_line(fn, *needles: str, error: type = Exception) -> str:
    """``fn()`` raises ``error`` whose message is one line holding every needle; returns it."""
    import pytest

    with pytest.raises(error) as e:
        fn()
    msg = str(e.value).strip()
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


def digest(folder) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) and the SHA-256 of its bytes."""
    import hashlib
    from pathlib import Path

    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def genai_greedy(og, model, prompt, new_tokens: int) -> list[int]:
    """onnxruntime-genai's (module ``og``) Generator on ``model``: greedy tokens after
    ``prompt``, up to ``new_tokens`` of them."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def tiny_sparse_checkpoint(tmp_path_factory) -> str:
    """A 2-layer tiny synthetic checkpoint whose MLPs are about 85% sparse (for a module fixture)."""
    from sparseinfer.model_export.synthetic import make_checkpoint

    return str(make_checkpoint("tiny", tmp_path_factory.mktemp("ck"), layers=2, target_sparsity=0.85, seed=3))


def load_error_in_capped_child(path, gib: int = 4) -> str:
    """The one-line SparseInferError of ``load_checkpoint(path)``, run in a child process whose
    address space is capped at ``gib`` GiB: a loader that tried to build something huge fails
    there (MemoryError) instead of exhausting the machine that runs the tests."""
    import resource
    import subprocess
    import sys

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (gib << 30, gib << 30))

    code = ("import sys\nfrom sparseinfer.model_export.loaders import load_checkpoint\n"
            "from sparseinfer.reference.errors import SparseInferError\n"
            "try:\n    load_checkpoint(sys.argv[1])\nexcept SparseInferError as e:\n    print(e)\n"
            "else:\n    sys.exit('loaded')\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], preexec_fn=cap, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()
