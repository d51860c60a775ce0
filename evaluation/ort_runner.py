"""The design-space runner (``methods.alpha_sweep``'s interface) on onnxruntime exports.

``predictor-stats`` and ``sweep`` take their masks from the NumPy reference model
(``methods.model_runner.ReferenceRunner``) by default. With ``--provider cpu|cuda`` they take
them from ``OrtRunner`` instead: the checkpoint is exported once per α schedule with the
debug outputs (``debug.{i}.predicted_zero``, ``actual_zero`` and ``rows`` per layer; cached
like ``sparseinfer eval``'s exports) and decoded on onnxruntime. The dense export makes the
greedy continuations and the dense logits. Each decode step's debug outputs become one
``reference.mlp.MLPTrace`` per layer, the same record the reference makes. ``methods`` then
computes the statistics, latency and quality from them unchanged, so the same masks give
the same statistics. The reference stays the definition, and tests/test_eval_ort_dse.py
checks this path against it.

Only the sign predictor (``--alpha``) runs here. The other ``--method``s are NumPy models
and need the reference path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sparseinfer.reference.alpha import AlphaSchedule
from sparseinfer.reference.dtypes import dtype_name
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.mlp import MLPTrace

from .exports import Row, ensure_export, export_root

DEFAULT_EXPORT_DIR = "out/dse-exports"


class OrtRunner:
    """``shape``, ``dense_logits()`` and ``sparse(schedule)`` over fixed prompts, like
    ``ReferenceRunner``, on onnxruntime (``provider`` cpu or cuda)."""

    def __init__(self, checkpoint_path, prompts: list[str], max_new_tokens: int = 8, provider: str = "cpu",
                 export_dir=DEFAULT_EXPORT_DIR, threads: int | None = None, mlp_kernels: str = "auto", progress=None):
        from sparseinfer.model_export.loaders import load_checkpoint

        if int(max_new_tokens) < 1:
            raise SparseInferError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        if provider not in ("cpu", "cuda"):
            raise SparseInferError(f"unknown provider {provider!r}; expected cpu or cuda")
        self.source = Path(checkpoint_path)
        self.checkpoint = load_checkpoint(checkpoint_path)
        self.weights, self.shape = self.checkpoint.weights, self.checkpoint.shape
        tok = self.checkpoint.tokenizer
        if tok is None:
            raise SparseInferError(f"{self.checkpoint.source}: no tokenizer.json; cannot encode prompts")
        bos = [] if self.checkpoint.bos_token_id is None else [self.checkpoint.bos_token_id]
        self.prompt_ids = [bos + tok.encode(p).ids for p in prompts]      # as ReferenceRunner encodes them
        self.max_new_tokens = int(max_new_tokens)
        self.provider, self.threads, self.mlp_kernels = provider, threads, mlp_kernels
        self.root = export_root(export_dir, checkpoint_path)
        self.progress = progress
        dense = self._decoder(Row("dense"), debug=False)
        self.continuations = []
        for n, ids in enumerate(self.prompt_ids, 1):
            self._say(f"dense greedy decode of prompt {n}/{len(self.prompt_ids)} ({len(ids)} tokens, "
                      f"onnxruntime {provider})")
            self.continuations.append(self._greedy(dense, ids))
        self._dense = self._run(dense, "dense")[0]

    def _say(self, message: str) -> None:
        if self.progress:
            self.progress(message)

    def _decoder(self, row: Row, debug: bool):
        from sparseinfer.model_export.decode import OnnxDecoder

        path = ensure_export(self.source, row, self.root, self.provider, loaded=lambda: self.checkpoint,
                             log=self._say, debug=debug)
        return OnnxDecoder(path, self.provider, self.threads, self.mlp_kernels)

    def _greedy(self, dec, ids) -> list[int]:
        """ReferenceRunner's continuation: max_new_tokens greedy tokens, no stop at EOS."""
        dec.reset()
        logits = dec.step(list(ids))[0][-1]
        out = []
        for n in range(self.max_new_tokens):
            out.append(int(np.argmax(logits)))
            if n + 1 < self.max_new_tokens:
                logits = dec.step([out[-1]])[0][-1]
        return out

    def _run(self, dec, label: str, alpha_milli=None):
        """Teacher-forced decode of the continuations: logits [tokens, vocab] and, with
        ``alpha_milli`` (a sparse debug export), traces [tokens][layers] from its masks."""
        logits, traces = [], []
        for n, (ids, cont) in enumerate(zip(self.prompt_ids, self.continuations), 1):
            self._say(f"{label}: prompt {n}/{len(self.prompt_ids)}")
            dec.reset()
            dec.step(list(ids))
            for tok in cont:
                out, debug = dec.step([tok])
                logits.append(out[-1])
                if alpha_milli is not None:
                    traces.append([self._trace(i, debug, alpha_milli[i]) for i in range(self.shape.num_layers)])
        return np.stack(logits), traces

    def _trace(self, i: int, debug: dict, alpha_milli: int) -> MLPTrace:
        lw = self.weights.layers[i]
        k, d = lw.gate.shape
        predicted = np.asarray(debug[f"debug.{i}.predicted_zero"], dtype=bool).reshape(-1)
        actual = np.asarray(debug[f"debug.{i}.actual_zero"], dtype=bool).reshape(-1)
        if predicted.shape != (k,) or actual.shape != (k,):
            raise SparseInferError(f"layer {i}: debug masks of {predicted.size} / {actual.size} rows, expected {k}")
        computed = np.zeros(k, dtype=bool)
        computed[np.asarray(debug[f"debug.{i}.rows"], dtype=np.int64).reshape(-1)] = True
        return MLPTrace(mode="predicted+actual", d=d, k=k, weight_dtype=dtype_name(lw.gate.dtype),
                        alpha_milli=int(alpha_milli), predicted_zero=predicted, actual_zero=actual,
                        computed_gate=~predicted, computed_up=computed, computed_down=computed.copy())

    def dense_logits(self) -> np.ndarray:
        return self._dense

    def sparse(self, schedule):
        spec = str(schedule)
        milli = AlphaSchedule.parse(spec).per_layer_milli(self.shape.num_layers)
        dec = self._decoder(Row("sparse", alpha=spec), debug=True)
        if not dec.debug or not dec.sparse:
            raise SparseInferError(f"internal: the export for alpha {spec} has no debug masks")
        return self._run(dec, f"sparse, alpha {spec}", milli)

    def run_method(self, method, target: float = 0.0):
        raise SparseInferError(f"--method {method.name} runs on the NumPy reference model only; drop --provider")
