"""Calibration data: the prompts a method calibrates on and each layer's MLP inputs on them.

The prompts are those of a ``--calibration`` file (text or JSONL) or the built-in
``CALIBRATION_PROMPTS``; they never overlap the evaluation prompts or task documents
(``check_disjoint``). ``collect_calibration`` runs their dense prefill and keeps each
layer's MLP inputs (``base.Calibration``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.llama import LlamaReference

from .base import Calibration
from .model_runner import encode_prompts, read_prompts

DEFAULT_CALIBRATION_PROMPTS = 64     # calibration prompts used at most, unless told

# Built-in calibration prompts: none of them is an evaluation prompt (model_runner.DEFAULT_PROMPTS).
CALIBRATION_PROMPTS = (
    "A train leaves the station at nine in the morning and travels at sixty miles per hour toward the coast.",
    "The mitochondria is the powerhouse of the cell, turning nutrients into usable chemical energy.",
    "import numpy as np\nx = np.arange(10)\nprint(x.sum(), x.mean())",
    "She opened the old wooden door and found a room full of maps, compasses and dusty letters.",
    "Question: If a shirt costs 20 dollars and is on sale for 25 percent off, what is the sale price?",
    "The committee will meet on Thursday to review the budget, the schedule and the hiring plan.",
    "Water boils at one hundred degrees Celsius at sea level, but at lower temperatures on mountains.",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; } return sum;",
)

MIN_CONTAINED_CHARS = 40     # a calibration prompt this long found inside an evaluation text is an overlap


def _normal(text: str) -> str:
    return " ".join(str(text).split())


def check_disjoint(calibration_prompts, evaluation_prompts, what: str = "evaluation prompts") -> None:
    """One-line error if a calibration prompt overlaps an evaluation text (``what`` names
    them): equal up to whitespace, an evaluation text inside a calibration prompt, or a
    calibration prompt of at least ``MIN_CONTAINED_CHARS`` characters inside an evaluation text."""
    cal = [c for c in (_normal(p) for p in calibration_prompts) if c]
    exact = set(cal)
    long_cal = [c for c in cal if len(c) >= MIN_CONTAINED_CHARS]
    shared = []
    for text in evaluation_prompts:
        e = _normal(text)
        if e and (e in exact or any(e in c for c in cal) or any(c in e for c in long_cal)):
            shared.append(e)
    if shared:
        raise SparseInferError(f"calibration and {what} overlap ({len(shared)} shared, e.g. "
                               f"{shared[0][:40]!r}); give a disjoint --calibration file")


def calibration_prompts(calibration_file=None, max_prompts: int = DEFAULT_CALIBRATION_PROMPTS) -> tuple[list[str], str]:
    """(prompts, source): those of ``calibration_file`` (text or JSONL) or the built-in ones."""
    if int(max_prompts) < 1:
        raise SparseInferError(f"--max-calibration-prompts must be >= 1, got {max_prompts}")
    if calibration_file:
        if not Path(calibration_file).is_file():
            raise SparseInferError(f"no such calibration file: {calibration_file}")
        return read_prompts(calibration_file, max_prompts), str(calibration_file)
    return list(CALIBRATION_PROMPTS[:max_prompts]), "built-in (methods/calibration.CALIBRATION_PROMPTS)"


def load_calibration(checkpoint, calibration_file, max_calibration_prompts, evaluation_prompts, progress=None,
                     what: str = "evaluation prompts"):
    """Calibration prompts (file or built-in), checked disjoint from ``evaluation_prompts``,
    and each layer's MLP inputs on them (``collect_calibration``)."""
    prompts, source = calibration_prompts(calibration_file, max_calibration_prompts)
    check_disjoint(prompts, evaluation_prompts, what)
    return collect_calibration(checkpoint.weights, encode_prompts(checkpoint, prompts, "calibration prompts"), source,
                               progress=progress)


def collect_calibration(weights, prompt_ids: list[np.ndarray], source: str = "", max_tokens: int = 4096,
                        progress=None) -> Calibration:
    """Each layer's MLP inputs over the calibration prompts' dense prefill (at most
    ``max_tokens`` tokens, taken evenly)."""
    model = LlamaReference(weights)
    per_layer: list[list[np.ndarray]] = [[] for _ in range(weights.shape.num_layers)]
    for n, ids in enumerate(prompt_ids, 1):
        if progress:
            progress(f"calibration prefill {n}/{len(prompt_ids)} ({len(ids)} tokens)")
        model.prefill(ids, mlp_hook=lambda i, x: per_layer[i].append(np.array(x, dtype=np.float32)))
    xs = [np.concatenate(p, axis=0) for p in per_layer]
    if xs[0].shape[0] > max_tokens:
        keep = np.linspace(0, xs[0].shape[0] - 1, max_tokens).round().astype(int)
        xs = [x[keep] for x in xs]
    return Calibration(weights, xs, source, len(prompt_ids))
