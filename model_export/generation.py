"""Generation on an ``OnnxDecoder``: greedy or top-p sampling, the prefill time, decode
tokens/s and, when the model has debug outputs, the decode sparsity and the predictor's
precision / recall; and the comparison of a dense and a sparse generation."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from sparseinfer.reference.errors import SparseInferError

from .decode import OnnxDecoder
from .loaders.config import stop_ids

def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when temperature is 0; else temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):              # shifted first: a tiny temperature gives -inf, exp 0, never NaN
        p = np.exp((z - z.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.cumsum(p[order]) - p[order] < top_p          # smallest prefix with mass >= top_p
    kept = order[keep]
    q = p[kept] / p[kept].sum()
    return int(kept[rng.choice(len(kept), p=q)])


@dataclass
class Generation:
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)   # logits that chose each token
    prefill_s: float = 0.0
    decode_s: float = 0.0
    predicted_zero: list[list[np.ndarray]] = field(default_factory=list)   # [step][layer]
    actual_zero: list[list[np.ndarray]] = field(default_factory=list)
    kernel_rows: dict | None = None          # native kernels' own counts (no debug outputs needed)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else float("nan")

    def stats(self) -> dict:
        out = {"prompt_tokens": len(self.prompt_ids), "new_tokens": len(self.tokens),
               "prefill_s": self.prefill_s, "decode_s": self.decode_s,
               "decode_tokens_per_s": self.decode_tokens_per_s}
        if self.kernel_rows and self.kernel_rows["decode_steps_counted"]:
            out.update({"predicted_sparsity": self.kernel_rows["predicted_sparsity"],
                        "rows_computed": self.kernel_rows["rows_computed"]})
        if self.predicted_zero:
            pred = np.concatenate([np.concatenate(s) for s in self.predicted_zero])
            act = np.concatenate([np.concatenate(s) for s in self.actual_zero])
            both = int((pred & act).sum())
            out.update({"decode_steps_measured": len(self.predicted_zero),
                        "predicted_sparsity": float(pred.mean()), "actual_sparsity": float(act.mean()),
                        "precision": both / max(int(pred.sum()), 1), "recall": both / max(int(act.sum()), 1)})
        return out


def generate(decoder: OnnxDecoder, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, on_token=None, stop_id=None, keep_logits: bool = False) -> Generation:
    """Prefill, then decode up to ``max_new_tokens`` tokens (the first comes from prefill);
    ``stop_id``: an id, or several, any of which ends the generation."""
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise SparseInferError("the prompt is empty")
    stops = stop_ids(stop_id)
    outside = next((t for t in [*prompt_ids, *sorted(stops)] if not 0 <= t < decoder.vocab_size), None)
    if outside is not None:
        raise SparseInferError(f"token id {outside} is outside the model's vocabulary (0-{decoder.vocab_size - 1}); "
                               f"is the tokenizer the model's own?")
    if len(prompt_ids) + max_new_tokens > decoder.max_positions:
        raise SparseInferError(f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new tokens exceeds "
                               f"the context of {decoder.max_positions}")
    rng = np.random.default_rng(seed)
    gen = Generation(prompt_ids)
    decoder.reset()
    t0 = time.perf_counter()
    logits, _ = decoder.step(prompt_ids)
    logits = logits[-1]
    gen.prefill_s = time.perf_counter() - t0
    decoder.row_counts(reset=True)
    t0 = time.perf_counter()
    for n in range(max_new_tokens):
        tok = sample(logits, temperature, top_p, rng)
        gen.tokens.append(tok)
        if keep_logits:
            gen.logits.append(logits)
        if on_token:
            on_token(tok)
        if n + 1 == max_new_tokens or tok in stops:
            break
        logits, debug = decoder.step([tok])
        logits = logits[-1]
        if debug and decoder.sparse:
            layers = range(decoder.num_layers)
            gen.predicted_zero.append([debug[f"debug.{i}.predicted_zero"] for i in layers])
            gen.actual_zero.append([debug[f"debug.{i}.actual_zero"] for i in layers])
    gen.decode_s = time.perf_counter() - t0
    gen.kernel_rows = decoder.row_counts()
    return gen


def compare_generations(dense: Generation, sparse: Generation) -> dict:
    """First divergence, agreement (positions with the same token) and max |Δlogit| while the
    two saw the same tokens; at the divergence, how far apart the dense logits of the two
    chosen tokens were (a near tie is flipped by a small |Δlogit|)."""
    n = min(len(dense.tokens), len(sparse.tokens))
    same = [a == b for a, b in zip(dense.tokens[:n], sparse.tokens[:n])]
    first = next((j for j, s in enumerate(same) if not s), None)
    upto = n if first is None else first + 1          # logits at the divergence still share inputs
    dl = [float(np.abs(a - b).max()) for a, b in zip(dense.logits[:upto], sparse.logits[:upto])]
    gap = None
    if first is not None and first < len(dense.logits):
        at = dense.logits[first]
        gap = float(at[dense.tokens[first]] - at[sparse.tokens[first]])
    return {"tokens_compared": n, "first_divergence": first, "token_agreement": float(np.mean(same)) if n else 1.0,
            "tokens_agreeing": int(sum(same)), "dense_logit_gap_at_divergence": gap,
            "max_abs_logit_diff": max(dl) if dl else 0.0,
            "dense_tokens_per_s": dense.decode_tokens_per_s, "sparse_tokens_per_s": sparse.decode_tokens_per_s}
