"""The lm-eval model ``sparseinfer`` with ``method=NAME,sparsity=S``: any ``methods.registry``
method (dejavu, teal, cats, wisparse, cluster, oracle, random, sparseinfer with α auto, ...)
decoded on the NumPy reference model.

    python -m sparseinfer.evaluation --model sparseinfer \\
        --model_args model=CHECKPOINT,method=teal,sparsity=0.9[,params=KEY=VALUE;KEY=VALUE][,calibration=FILE] ...

The exports carry only the sign predictor, so these rows run ``methods.registry.MethodReference``
(``reference.llama.LlamaReference`` whose decode MLPs run the method's ``select`` and
``methods.base.run_mlp``) in float32 on the CPU. As in the paper and the export backend,
the prompt is one dense prefill and the method applies in decode steps only;
``loglikelihood`` requests are scored by the dense prefill. ``method=random`` is the
paper's control: ``floor(s·k)`` rows drawn afresh for every token at every decode step,
from a stream seeded per request by the row's seed (``random.seed``, default 0) and the
prompt (``request_seed``), so a request draws the same masks whichever requests ran
before it (a resumed run, another order).

Methods that calibrate (dejavu, teal, cats, wisparse, cluster; sparseinfer with
``alpha=auto``, the default here) are prepared once on calibration prompts: the built-in
ones (``methods.calibration.CALIBRATION_PROMPTS``) or ``calibration=FILE``. ``sparseinfer
eval`` checks them against the evaluated task documents first (``runner``); lm-eval's own
command line gives the model no task documents to check.

Generation, stop strings, scoring and statistics are ``decoder_lm.DecoderLM``'s; only the decoder
differs (``MethodDecoder``). Its decode sparsity is the fraction of down-projection inputs
(MLP rows, or the down channels of a channel method) not computed, as the native kernel
counts rows; ``predicted_sparsity`` is the method's own decision on its axis.
"""
from __future__ import annotations

import hashlib
import logging

import numpy as np

from sparseinfer.methods.calibration import DEFAULT_CALIBRATION_PROMPTS
from sparseinfer.methods.registry import make_method
from sparseinfer.reference.errors import SparseInferError

from .decoder_lm import DEFAULT_MAX_GEN_TOKS, DEFAULT_MAX_LENGTH, DecoderLM, as_bool
from .exports import Row, parse_method_rows

log = logging.getLogger("sparseinfer.evaluation")

ENGINE = "numpy reference"
PREFILL_NOTE = ("method rows decode on the NumPy reference model: the prompt is one dense prefill, the method "
                "applies in decode steps only")


def parse_params(text) -> dict:
    """``KEY=VALUE;KEY=VALUE`` (model_args form of a method's parameters) -> dict."""
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()}
    out = {}
    for piece in str(text or "").split(";"):
        if not piece.strip():
            continue
        key, eq, value = piece.partition("=")
        if not eq or not key.strip():
            raise SparseInferError(f"params {text!r}: {piece!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def request_seed(seed: int, context: str) -> int:
    """The random stream of one request: from the row's seed and the prompt."""
    return int(hashlib.sha256(f"{int(seed)}\0{context}".encode()).hexdigest()[:15], 16)


class MethodDecoder:
    """``OnnxDecoder``'s interface (``reset``, ``step``, ``row_counts``, ``max_positions``,
    ``mlp_kernels``, ``sparse``) over ``methods.registry.MethodReference``: the first ``step``
    after ``reset`` is the dense prefill, every later token a decode step with the method."""

    mlp_kernels = ENGINE
    sparse = True
    debug = False

    def __init__(self, weights, method, target: float, max_length: int):
        from sparseinfer.methods.registry import MethodReference

        self.model = MethodReference(weights, method, target)
        self.max_positions = min(int(max_length), int(weights.shape.max_position_embeddings))
        self.row_counts(reset=True)

    def reset(self) -> None:
        self.model.reset()

    def step(self, ids):
        ids = [int(t) for t in ids]
        if self.model.position == 0:
            return self.model.prefill(ids), {}
        logits = []
        for tok in ids:
            st = self.model.decode(tok, trace=True)
            self._steps += 1
            self._decided += float(np.mean([t.sparsity for t in st.traces]))
            self._computed += float(np.mean([t.computed_down.mean() for t in st.traces]))
            logits.append(st.logits)
        return np.stack(logits), {}

    def row_counts(self, reset: bool = False) -> dict | None:
        """Since the last reset: decode steps, the method's own sparsity and the fraction of
        down-projection inputs computed (means over layers and steps)."""
        out = None
        if getattr(self, "_steps", 0):
            out = {"decode_steps_counted": self._steps, "predicted_sparsity": self._decided / self._steps,
                   "rows_computed": self._computed / self._steps}
        if reset or out is None:
            self._steps, self._decided, self._computed = 0, 0.0, 0.0
        return out


class MethodLM(DecoderLM):
    """The model on the NumPy reference model: a ``DecoderLM`` whose decoder is ``MethodDecoder`` (see
    the module docstring).

    ``loaded``: the checkpoint already loaded (``model_export.loaders.load_checkpoint``);
    ``calibrated``: a ``methods.base.Calibration`` already collected (``sparseinfer eval``
    shares one between its rows)."""

    def __init__(self, model, method, sparsity=None, params=None, calibration=None,
                 max_calibration_prompts=DEFAULT_CALIBRATION_PROMPTS,
                 approximate=False, max_length=None, max_gen_toks=DEFAULT_MAX_GEN_TOKS, progress=True, loaded=None,
                 calibrated=None, batch_size=None, max_batch_size=None, device=None, **unknown):
        super().__init__()
        if unknown:
            raise SparseInferError(f"unknown model_args for sparseinfer with method=: {', '.join(sorted(unknown))}; "
                                   f"expected model, method, sparsity, params, calibration, max_calibration_prompts, "
                                   f"approximate, max_length, max_gen_toks, progress")
        from sparseinfer.model_export.loaders import load_checkpoint

        if isinstance(method, Row):
            self.row = method                          # from exports.parse_method_rows
        else:
            if sparsity in (None, ""):
                raise SparseInferError(f"method={method} needs sparsity=S (a target in [0, 1))")
            name = str(method).strip().lower()
            self.row, = parse_method_rows([f"{name}@{sparsity}"], params={name: parse_params(params)},
                                          approximate=as_bool(approximate))
        self.path = None
        self.provider = "cpu"
        self.progress = as_bool(progress)
        self.max_gen_toks = int(max_gen_toks)
        ck = loaded if loaded is not None else load_checkpoint(model)
        if ck.tokenizer is None:
            raise SparseInferError(f"{ck.source}: no tokenizer; cannot evaluate")
        self.checkpoint_source = str(model)
        self.tokenizer, self.bos, self.eos = ck.tokenizer, ck.bos_token_id, ck.eos_token_id
        self.weights = ck.weights
        self.method = make_method(self.row.method, dict(self.row.params))
        self.base_seed = self.method.params.get("seed")
        if calibrated is None:
            from sparseinfer.methods.calibration import load_calibration

            calibrated = load_calibration(ck, calibration, max_calibration_prompts, [], log.info)
        self.calibration = calibrated
        self.method.prepare(ck.weights, calibrated, self.row.sparsity)
        self.decoder = MethodDecoder(ck.weights, self.method, self.row.sparsity,
                                     int(max_length or DEFAULT_MAX_LENGTH))
        self.max_length = self.decoder.max_positions
        self._warned: set[str] = set()
        self._warn_once(PREFILL_NOTE)
        self.reset_stats()

    def greedy(self, context: str, until: list[str], max_gen: int) -> str:
        if self.row.method == "random":           # the only method that draws at decode time
            self.method = make_method("random", {**dict(self.row.params),
                                                 "seed": str(request_seed(self.base_seed, context))})
            self.method.prepare(self.weights, None, self.row.sparsity)
            self.decoder.model.method = self.method
        return super().greedy(context, until, max_gen)

    def get_model_info(self) -> dict:
        return {"sparseinfer_row": self.row.as_dict(), "sparseinfer_checkpoint": self.checkpoint_source,
                "engine": ENGINE, "method": self.method.describe(), "calibration": self.calibration.describe(),
                "max_length": self.max_length}

