"""The lm-eval model ``sparseinfer``: this project's ONNX exports decoded on onnxruntime.

    python -m sparseinfer.evaluation --model sparseinfer \
        --model_args model=EXPORT_DIR|CHECKPOINT,alpha=1.03@0-19;1.00,provider=cpu --tasks ...

(through ``python -m sparseinfer.evaluation``, which registers the model and the shipped
task folder first; lm-eval has no plugin discovery). ``model`` is an export (a folder
holding ``model.onnx`` and its ``tokenizer.json``, or the ``.onnx`` itself) or a checkpoint
(Hugging Face folder or ``.gguf``), which is exported once for the row that ``alpha`` /
``random`` name (dense without either), block-quantized with ``quantize=q8_0|q4_0|q4_1``, and
cached under ``cache_dir``.

* ``generate_until``: greedy; stops at EOS, at the first of the request's ``until``
  strings (cut from the text, as lm-eval's other backends do) or after ``max_gen_toks``
  tokens. The prompt is one dense prefill, then one decode step per token: sparse exports
  skip rows in those steps only.
* ``loglikelihood`` / ``loglikelihood_rolling``: one prefill pass over context and
  continuation. Prefill is dense in every export (as in the paper), so these scores are
  the dense model's whatever α is; the backend logs so once per run.

With ``method=NAME,sparsity=S`` (any ``methods.registry`` method) the model decodes on the NumPy
reference model instead (``method_backend.MethodLM``).

Each answer is handed to lm-eval's cache hook as it is made, so a run with
``use_cache`` (``sparseinfer eval`` always sets one) resumes where it was interrupted.
``stats()`` gives what was measured: decode tokens/s, and with the native CPU kernels the
fraction of MLP rows predicted zero and computed during decode.
"""
from __future__ import annotations

import logging
from pathlib import Path

from lm_eval.api.registry import register_model

from sparseinfer.reference.alpha import AlphaSchedule
from sparseinfer.reference.errors import SparseInferError

from .decoder_lm import DEFAULT_MAX_GEN_TOKS, DEFAULT_MAX_LENGTH, DecoderLM, as_bool
from .exports import (Row, check_dtype_name, check_quantize_name, ensure_export, export_root, is_checkpoint,
                      make_rows)

log = logging.getLogger("sparseinfer.evaluation")


@register_model("sparseinfer")
class SparseInferLM(DecoderLM):
    """The model on an onnxruntime export (see the module docstring); the requests are ``DecoderLM``'s."""

    def __init__(self, model, alpha=None, random=None, seed=0, provider="cpu", target=None, threads=None,
                 mlp_kernels="auto", max_length=None, max_gen_toks=DEFAULT_MAX_GEN_TOKS, cache_dir=None,
                 dtype="float32", quantize=None, progress=True, batch_size=None, max_batch_size=None, device=None,
                 **unknown):
        super().__init__()
        if unknown:
            raise SparseInferError(f"unknown model_args for sparseinfer: {', '.join(sorted(unknown))}; expected "
                                   f"model, alpha, random, seed, provider, target, threads, mlp_kernels, "
                                   f"max_length, max_gen_toks, cache_dir, dtype, quantize, progress (or "
                                   f"method=NAME,sparsity=S: any methods.registry method on the NumPy reference "
                                   f"model)")
        from sparseinfer.model_export.decode import OnnxDecoder
        from sparseinfer.model_export.export_check import export_info
        from sparseinfer.model_export.export_folder import export_model, tokenizer_for

        self.provider = str(provider)
        self.progress = as_bool(progress)
        self.max_gen_toks = int(max_gen_toks)
        # lm-eval's own command line splits model_args at every comma: there, write alpha=1.03@0-19;1.00
        alpha = None if alpha in (None, "", "dense") else str(alpha).replace(";", ",")
        random = None if random in (None, "") else float(random)
        source = Path(model)
        if is_checkpoint(source):
            alphas = [alpha] if alpha else []
            row = make_rows(alphas, random, int(seed), quantize=quantize)[-1]
            root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "sparseinfer" / "eval-exports"
            path = ensure_export(source, row, export_root(root, source), target or self.provider,
                                 log=log.info, dtype=check_dtype_name(dtype))
            info = export_info(path)
        else:
            path = export_model(source)
            if not path.is_file():
                raise SparseInferError(f"{model}: neither an export (model.onnx) nor a checkpoint "
                                       f"(config.json + safetensors, or .gguf)")
            if random is not None:
                raise SparseInferError("random=S needs a checkpoint (model=CHECKPOINT), not an export")
            info = export_info(path)
            if quantize not in (None, "") and check_quantize_name(quantize) != info.quantize:
                made = f"in {info.quantize}" if info.quantize else "unquantized"
                raise SparseInferError(f"{path} was exported {made}, not quantize={quantize}; pass the checkpoint "
                                       f"to re-export")
            baked = list(info.alpha_milli) if info.sparse else None
            if alpha is not None:
                want = AlphaSchedule.parse(alpha).per_layer_milli(len(baked) if baked else 1)
                if baked is None or want != baked:
                    raise SparseInferError(f"{path} was exported {'dense' if baked is None else 'with alpha ' + str(baked)}"
                                           f", not alpha {alpha}; pass the checkpoint to re-export")
            row = (Row("dense", quantize=info.quantize) if baked is None
                   else Row("sparse", alpha=alpha or ",".join(map(str, baked)), quantize=info.quantize))
        self.row, self.path = row, path
        self.tokenizer, self.bos, self.eos = tokenizer_for(path)
        self.max_length = min(int(max_length or DEFAULT_MAX_LENGTH), info.max_length)
        self.decoder = OnnxDecoder(path, self.provider, int(threads) if threads not in (None, "") else None, mlp_kernels,
                                   max_length=self.max_length)
        self.max_length = self.decoder.max_positions
        self._warned: set[str] = set()
        self.reset_stats()

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """``method=NAME`` among the arguments: the NumPy reference backend (``method_backend``)."""
        if arg_dict.get("method") and cls is SparseInferLM:
            from .method_backend import MethodLM

            return MethodLM.create_from_arg_obj(arg_dict, additional_config)
        return super().create_from_arg_obj(arg_dict, additional_config)

    def get_model_info(self) -> dict:
        return {"sparseinfer_row": self.row.as_dict(), "sparseinfer_export": str(self.path),
                "provider": self.provider, "mlp_kernels": self.decoder.mlp_kernels,
                "sparse_export": self.decoder.sparse, "max_length": self.max_length}
