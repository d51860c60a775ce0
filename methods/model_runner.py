"""Run a loaded checkpoint on prompts with the NumPy reference Llama.

The caller loads the checkpoint (``evaluation/traced_runs.py`` with
``model_export.loaders.load_checkpoint``) and passes it in, so that ``methods/`` stays
below ``model_export/``.

The dense model first decodes a greedy continuation of every prompt; every sparse run is
then teacher-forced on the same tokens, so that the dense and sparse logits of each
decode step are compared position by position. Prefill stays dense (the paper uses
sparsity in decoding only); only decode steps are traced and scored.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sparseinfer.reference.errors import SparseInferError

DEFAULT_PROMPTS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
)
PROMPT_FIELDS = ("question", "prompt", "text")
DEFAULT_MAX_PROMPTS = len(DEFAULT_PROMPTS)     # prompts read at most, unless told
DEFAULT_DECODE_STEPS = 8                       # decode steps traced per prompt, unless told


def read_prompts(path=None, max_prompts: int = DEFAULT_MAX_PROMPTS) -> list[str]:
    """Prompts from a text file (one per line) or JSONL ('question'/'prompt'/'text')."""
    if int(max_prompts) < 1:
        raise SparseInferError(f"--max-prompts must be >= 1, got {max_prompts}")
    if path is None:
        return list(DEFAULT_PROMPTS[:max_prompts])
    p = Path(path)
    if not p.is_file():
        raise SparseInferError(f"no such prompts file: {p}")
    prompts = []
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SparseInferError(f"cannot read prompts file {p}: {e}") from None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if p.suffix.lower() in (".jsonl", ".json") or line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise SparseInferError(f"{p}:{n}: not a JSON object") from None
            text = next((obj[f] for f in PROMPT_FIELDS if isinstance(obj, dict) and isinstance(obj.get(f), str)), None)
            if text is None:
                raise SparseInferError(f"{p}:{n}: no {'/'.join(PROMPT_FIELDS)} field")
            prompts.append(text)
        else:
            prompts.append(line)
        if len(prompts) >= max_prompts:
            break
    if not prompts:
        raise SparseInferError(f"{p}: no prompts found")
    return prompts


def encode_prompts(checkpoint, prompts, what: str = "prompts") -> list[np.ndarray]:
    """Token ids of ``prompts`` with the checkpoint's tokenizer, BOS (if any) first."""
    if checkpoint.tokenizer is None:
        raise SparseInferError(f"{checkpoint.source}: no tokenizer.json; cannot encode {what}")
    bos = [] if checkpoint.bos_token_id is None else [checkpoint.bos_token_id]
    return [np.array(bos + checkpoint.tokenizer.encode(p).ids, dtype=np.int64) for p in prompts]


class ReferenceRunner:
    """The sweep's runner interface over a loaded checkpoint (see ``alpha_sweep``).

    ``checkpoint``: anything with ``weights`` (``reference.llama.LlamaWeights``), ``shape``,
    ``tokenizer`` (``encode(text).ids``, or None), ``bos_token_id`` and ``source``, such as
    ``model_export.loaders.load_checkpoint``'s result.
    """

    def __init__(self, checkpoint, prompts: list[str], max_new_tokens: int = DEFAULT_DECODE_STEPS, progress=None):
        from sparseinfer.reference.llama import LlamaReference

        if int(max_new_tokens) < 1:
            raise SparseInferError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        self._model_class = LlamaReference
        self.checkpoint = checkpoint      # its tokenizer encodes calibration prompts too (calibration.py)
        self.weights = checkpoint.weights
        self.shape = checkpoint.shape
        self.prompt_ids = encode_prompts(checkpoint, prompts)
        self.max_new_tokens = int(max_new_tokens)
        self.progress = progress      # progress(message) for long runs, e.g. echo to stderr
        self.continuations = []
        for n, ids in enumerate(self.prompt_ids, 1):
            self._say(f"dense greedy decode of prompt {n}/{len(self.prompt_ids)} ({ids.size} tokens)")
            self.continuations.append(self._model_class(self.weights).greedy(ids, self.max_new_tokens))
        self._dense = None

    def _say(self, message: str) -> None:
        if self.progress:
            self.progress(message)

    def _run(self, sparse: bool, alpha="1.00", model=None, label=None):
        model = model or self._model_class(self.weights, sparse=sparse, alpha=alpha)
        label = label or ("sparse, alpha " + str(alpha) if sparse else "dense")
        logits, traces = [], []
        for n, (ids, cont) in enumerate(zip(self.prompt_ids, self.continuations), 1):
            self._say(f"{label}: prompt {n}/{len(self.prompt_ids)}")
            model.prefill(ids)
            for tok in cont:
                step = model.decode(tok, trace=sparse)
                logits.append(step.logits)
                if sparse:
                    traces.append(step.traces)
        return np.stack(logits), traces

    def dense_logits(self) -> np.ndarray:
        if self._dense is None:
            self._dense = self._run(False)[0]
        return self._dense

    def sparse(self, schedule):
        return self._run(True, str(schedule))

    def run_method(self, method, target: float = 0.0):
        """Teacher-forced decode with a prepared ``registry`` method (``Method.prepare``
        done): (logits [tokens, vocab], traces_by_token [tokens][layers] of MethodTrace)."""
        from .registry import MethodReference

        return self._run(True, model=MethodReference(self.weights, method, target),
                         label=f"{method.name}, sparsity {target:g}")
