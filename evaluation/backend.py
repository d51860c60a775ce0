"""The lm-eval model ``sparseinfer``: this project's ONNX exports decoded on onnxruntime.

    python -m sparseinfer.evaluation --model sparseinfer \
        --model_args model=EXPORT_DIR|CHECKPOINT,alpha=1.03@0-19;1.00,provider=cpu --tasks ...

(through ``python -m sparseinfer.evaluation``, which registers the model and the shipped
task folder first; lm-eval has no plugin discovery). ``model`` is an export (a folder
holding ``model.onnx`` and its ``tokenizer.json``, or the ``.onnx`` itself) or a checkpoint
(Hugging Face folder or ``.gguf``), which is exported once for the row that ``alpha`` /
``random`` name (dense without either) and cached under ``cache_dir``.

* ``generate_until``: greedy; stops at EOS, at the first of the request's ``until``
  strings (cut from the text, as lm-eval's other backends do) or after ``max_gen_toks``
  tokens. The prompt is one dense prefill, then one decode step per token: sparse exports
  skip rows in those steps only.
* ``loglikelihood`` / ``loglikelihood_rolling``: one prefill pass over context and
  continuation. Prefill is dense in every export (as in the paper), so these scores are
  the dense model's whatever α is; the backend logs so once per run.

With ``method=NAME,sparsity=S`` (any ``sim.methods`` method) the model decodes on the NumPy
reference model instead (``method_backend.MethodLM``).

Each answer is handed to lm-eval's cache hook as it is made, so a run with
``use_cache`` (``sparseinfer eval`` always sets one) resumes where it was interrupted.
``stats()`` gives what was measured: decode tokens/s, and with the native CPU kernels the
fraction of MLP rows predicted zero and computed during decode.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from sparseinfer.model_export.checkpoint import first_id, stop_ids
from sparseinfer.reference.alpha import AlphaSchedule
from sparseinfer.reference.errors import SparseInferError

from .exports import Row, check_dtype_name, ensure_export, export_root, is_checkpoint, make_rows

log = logging.getLogger("sparseinfer.evaluation")

DEFAULT_MAX_GEN_TOKS = 256        # lm-eval's default when a task gives none
DEFAULT_MAX_LENGTH = 4096         # context kept by the decoder (the export's, if smaller)
DENSE_SCORING_NOTE = ("loglikelihood requests are scored by one prefill pass, which is dense in every "
                      "export: the α schedule does not change these scores")


def parse_model_args(arg_string: str) -> dict:
    """lm-eval's ``k=v,k=v`` with commas allowed inside a value: a piece without '=' belongs
    to the previous value (so ``alpha=1.03@0-19,1.00`` is one argument)."""
    args: dict[str, str] = {}
    last = None
    for piece in (arg_string or "").split(","):
        if not piece.strip():
            continue
        key, eq, value = piece.partition("=")
        if eq:
            last = key.strip()
            args[last] = value.strip()
        elif last is None:
            raise SparseInferError(f"model_args {arg_string!r}: {piece!r} is not key=value")
        else:
            args[last] += "," + piece.strip()
    return args


def stop_cut(text: str, until) -> tuple[str, bool]:
    """``text`` cut at the earliest of the stop strings; whether one was found."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def summarize_stats(raw: dict, mlp_kernels: str) -> dict:
    """``stats()`` from the raw counters (``SparseInferLM._stats``, or their sum over Ray workers)."""
    s = dict(raw)
    s["decode_tokens_per_s"] = s["decode_tokens"] / s["decode_s"] if s["decode_s"] > 0 else None
    steps = s.pop("rows_steps")
    pz, rc = s.pop("rows_predicted_zero"), s.pop("rows_computed")
    s["decode_steps_counted"] = steps
    s["predicted_sparsity"] = pz / steps if steps else None
    s["decode_sparsity"] = 1.0 - rc / steps if steps else None       # rows not computed (+AS)
    s["mlp_kernels"] = mlp_kernels
    return s


def _as_bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "on")


@register_model("sparseinfer")
class SparseInferLM(TemplateLM):
    def __init__(self, model, alpha=None, random=None, seed=0, provider="cpu", target=None, threads=None,
                 mlp_kernels="auto", max_length=None, max_gen_toks=DEFAULT_MAX_GEN_TOKS, cache_dir=None,
                 dtype="float32", progress=True, batch_size=None, max_batch_size=None, device=None, **unknown):
        super().__init__()
        if unknown:
            raise SparseInferError(f"unknown model_args for sparseinfer: {', '.join(sorted(unknown))}; expected "
                                   f"model, alpha, random, seed, provider, target, threads, mlp_kernels, "
                                   f"max_length, max_gen_toks, cache_dir, dtype, progress (or method=NAME,sparsity=S: any "
                                   f"sim.methods method on the NumPy reference model)")
        from sparseinfer.model_export.decode import OnnxDecoder, export_info
        from sparseinfer.model_export.export_folder import export_model, tokenizer_for

        self.provider = str(provider)
        self.progress = _as_bool(progress)
        self.max_gen_toks = int(max_gen_toks)
        # lm-eval's own command line splits model_args at every comma: there, write alpha=1.03@0-19;1.00
        alpha = None if alpha in (None, "", "dense") else str(alpha).replace(";", ",")
        random = None if random in (None, "") else float(random)
        source = Path(model)
        if is_checkpoint(source):
            alphas = [alpha] if alpha else []
            row = make_rows(alphas, random, int(seed))[-1]
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
            baked = list(info.alpha_milli) if info.sparse else None
            if alpha is not None:
                want = AlphaSchedule.parse(alpha).per_layer_milli(len(baked) if baked else 1)
                if baked is None or want != baked:
                    raise SparseInferError(f"{path} was exported {'dense' if baked is None else 'with alpha ' + str(baked)}"
                                           f", not alpha {alpha}; pass the checkpoint to re-export")
            row = Row("dense") if baked is None else Row("sparse", alpha=alpha or ",".join(map(str, baked)))
        self.row, self.path = row, path
        self.tokenizer, self.bos, self.eos = tokenizer_for(path)
        self.max_length = min(int(max_length or DEFAULT_MAX_LENGTH), info.max_length)
        self.decoder = OnnxDecoder(path, self.provider, int(threads) if threads not in (None, "") else None, mlp_kernels,
                                   max_length=self.max_length)
        self.max_length = self.decoder.max_positions
        self._warned: set[str] = set()
        self.reset_stats()

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(parse_model_args(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """``method=NAME`` among the arguments: the NumPy reference backend (``method_backend``)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if arg_dict.get("method") and cls is SparseInferLM:
            from .method_backend import MethodLM

            return MethodLM(**arg_dict, **extra)
        return cls(**arg_dict, **extra)

    # -- tokens ---------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = first_id(self.eos)
        return eos if eos is not None else 0

    @property
    def prefix_token_id(self) -> int:
        return self.bos if self.bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is False:
            return self.tokenizer.encode(string, add_special_tokens=False).ids
        from sparseinfer.model_export.export_folder import prompt_ids

        return prompt_ids(self.tokenizer, self.bos, string)

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def get_model_info(self) -> dict:
        return {"sparseinfer_row": self.row.as_dict(), "sparseinfer_export": str(self.path),
                "provider": self.provider, "mlp_kernels": self.decoder.mlp_kernels,
                "sparse_export": self.decoder.sparse, "max_length": self.max_length}

    # -- statistics -----------------------------------------------------------------------
    def reset_stats(self) -> None:
        self._stats = {"generations": 0, "prompts_truncated": 0, "prefill_tokens": 0, "prefill_s": 0.0,
                       "decode_tokens": 0, "decode_s": 0.0, "scored_requests": 0, "scored_tokens": 0,
                       "rows_steps": 0, "rows_predicted_zero": 0.0, "rows_computed": 0.0}

    def stats(self) -> dict:
        return summarize_stats(self._stats, self.decoder.mlp_kernels)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning(message)

    # -- requests -------------------------------------------------------------------------
    def _bar(self, items, desc):
        from tqdm import tqdm

        return tqdm(items, desc=f"{desc} ({self.row.label})", disable=not self.progress, leave=False)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in self._bar(requests, "generate_until"):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0) or 0) > 0:
                self._warn_once("sampling requested; the sparseinfer backend decodes greedily")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            text = self.greedy(context, until, max_gen)
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def greedy(self, context: str, until: list[str], max_gen: int) -> str:
        """Greedy continuation of ``context``, cut at the first stop string."""
        ids = self.tok_encode(context)
        room = self.max_length - max_gen
        if room < 1:
            raise SparseInferError(f"max_gen_toks {max_gen} leaves no room for a prompt in the context of "
                                   f"{self.max_length} tokens")
        if len(ids) > room:
            ids = ids[-room:]                    # keep the end of the prompt, as lm-eval's HF backend does
            self._stats["prompts_truncated"] += 1
            self._warn_once(f"prompts longer than {room} tokens are cut on the left (context {self.max_length}, "
                            f"max_gen_toks {max_gen})")
        dec = self.decoder
        dec.reset()
        t0 = time.perf_counter()
        logits = dec.step(ids)[0][-1]
        self._stats["prefill_s"] += time.perf_counter() - t0
        self._stats["prefill_tokens"] += len(ids)
        dec.row_counts(reset=True)
        tokens: list[int] = []
        text = ""
        t0 = time.perf_counter()
        steps = 0
        while True:
            tok = int(np.argmax(logits))
            if tok in stop_ids(self.eos):
                break
            tokens.append(tok)
            text, stopped = stop_cut(self.tok_decode(tokens), until)
            if stopped or len(tokens) >= max_gen:
                break
            logits = dec.step([tok])[0][-1]
            steps += 1
        self._stats["decode_s"] += time.perf_counter() - t0 if steps else 0.0
        self._stats["decode_tokens"] += steps
        self._stats["generations"] += 1
        self.last_tokens = tokens
        rows = dec.row_counts()
        if rows and rows["decode_steps_counted"]:
            n = rows["decode_steps_counted"]
            self._stats["rows_steps"] += n
            self._stats["rows_predicted_zero"] += rows["predicted_sparsity"] * n
            self._stats["rows_computed"] += rows["rows_computed"] * n
        return text

    def _score(self, context_enc: list[int], continuation_enc: list[int]) -> tuple[float, bool]:
        """Sum of log p(continuation | context) and whether it is the greedy continuation."""
        self._warn_once(DENSE_SCORING_NOTE)
        ids = (context_enc + continuation_enc)[-(self.max_length + 1):]
        n = len(continuation_enc)
        if n == 0:
            return 0.0, True
        self.decoder.reset()
        logits = self.decoder.step(ids[:-1])[0][-n:].astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        target = np.asarray(continuation_enc[-n:])
        self._stats["scored_requests"] += 1
        self._stats["scored_tokens"] += len(ids) - 1
        return float(logp[np.arange(n), target].sum()), bool((logp.argmax(axis=1) == target).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        out = []
        for (context, continuation), context_enc, continuation_enc in self._bar(requests, "loglikelihood"):
            result = self._score(context_enc, continuation_enc)
            out.append(result)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in self._bar(requests, "loglikelihood_rolling"):
            (string,) = req.args
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            total = sum(self._score(ctx, cont)[0] for ctx, cont in windows)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

