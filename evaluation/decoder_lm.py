"""lm-eval's requests answered on a decoder, whichever decodes: the base of the lm-eval model
``sparseinfer`` (``backend.SparseInferLM``, onnxruntime exports, and ``method_backend.MethodLM``,
the NumPy reference model with a sparsity method).

A subclass sets, in its ``__init__``, ``tokenizer`` (a ``tokenizers.Tokenizer``), ``bos`` and
``eos`` (ids; several end tokens as a tuple), ``decoder`` (``OnnxDecoder``'s interface:
``reset``, ``step``, ``row_counts``, ``mlp_kernels``), ``max_length``, ``max_gen_toks``,
``progress``, ``row`` (``exports.Row``) and ``_warned``, then calls ``reset_stats()``.

* ``generate_until``: greedy; stops at EOS, at the first of the request's ``until``
  strings (cut from the text, as lm-eval's other backends do) or after ``max_gen_toks``
  tokens. The prompt is one dense prefill, then one decode step per token.
* ``loglikelihood`` / ``loglikelihood_rolling``: one prefill pass over context and
  continuation, which is dense (as in the paper); the model logs so once per run.

Each answer is handed to lm-eval's cache hook as it is made, so a run with ``use_cache``
resumes where it was interrupted. ``stats()`` gives what was measured.
"""
from __future__ import annotations

import logging
import time

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from sparseinfer.model_export.loaders.config import first_id, stop_ids
from sparseinfer.reference.errors import SparseInferError

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
    """``stats()`` from the raw counters (``DecoderLM._stats``, or their sum over Ray workers)."""
    s = dict(raw)
    s["decode_tokens_per_s"] = s["decode_tokens"] / s["decode_s"] if s["decode_s"] > 0 else None
    steps = s.pop("rows_steps")
    pz, rc = s.pop("rows_predicted_zero"), s.pop("rows_computed")
    s["decode_steps_counted"] = steps
    s["predicted_sparsity"] = pz / steps if steps else None
    s["decode_sparsity"] = 1.0 - rc / steps if steps else None       # rows not computed (+AS)
    s["mlp_kernels"] = mlp_kernels
    return s


def as_bool(v) -> bool:
    """A model_args flag: a bool, or 1 / true / yes / on (any case)."""
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "on")


class DecoderLM(TemplateLM):
    """lm-eval's ``TemplateLM`` answered greedily on ``self.decoder`` (see the module docstring)."""

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(parse_model_args(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
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
