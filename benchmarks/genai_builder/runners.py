"""The runners the benchmark times: onnxruntime-genai's Generator on a genai folder and our
``OnnxDecoder``, each a call ``(prompt_ids, new_tokens) -> Run``, greedy."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from sparseinfer.reference.errors import SparseInferError

from .facts import model_file

OURS_GENAI, BUILDER_GENAI, OURS_DECODER = "ours_genai", "builder_genai", "ours_onnx_decoder"


@dataclass
class Run:
    """One greedy generation: the tokens, the prefill time and the decode time."""

    tokens: list[int]
    prefill_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else float("nan")


def genai_overlay(threads: int, profile: str | None = None) -> dict:
    """genai_config overlay: intra-op threads (1 inter-op) and, with ``profile``, onnxruntime's profiler."""
    opts = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
    if profile:
        opts["enable_profiling"] = str(profile)
    return {"model": {"decoder": {"session_options": opts}}}


class GenaiRunner:
    """onnxruntime-genai's Model and Generator on a folder; greedy; exactly ``new_tokens`` or an error."""

    def __init__(self, folder, threads: int, profile: str | None = None):
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise SparseInferError("onnxruntime-genai is not installed (pip install onnxruntime-genai)") from None
        self.og = og
        model_file(folder)
        config = og.Config(str(folder))
        config.overlay(json.dumps(genai_overlay(threads, profile)))
        self.model = og.Model(config)

    def __call__(self, prompt_ids: list[int], new_tokens: int) -> Run:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt_ids) + new_tokens, do_sample=False)
        generator = og.Generator(self.model, params)
        t0 = time.perf_counter()
        generator.append_tokens(prompt_ids)            # the prefill: the prompt's logits
        prefill_s = time.perf_counter() - t0
        tokens = []
        t0 = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()            # samples; from the 2nd call on, one decode step first
            tokens.append(int(generator.get_next_tokens()[0]))
        decode_s = time.perf_counter() - t0
        del generator
        return Run(tokens, prefill_s, decode_s)


class DecoderRunner:
    """Our ``OnnxDecoder`` and ``generate`` on an export, greedy, no stop token."""

    def __init__(self, model_path, threads: int, max_length: int):
        from sparseinfer.model_export.decode import OnnxDecoder

        self.decoder = OnnxDecoder(model_path, threads=threads, max_length=max_length)

    def __call__(self, prompt_ids: list[int], new_tokens: int) -> Run:
        from sparseinfer.model_export.generation import generate

        g = generate(self.decoder, prompt_ids, new_tokens)
        return Run(g.tokens, g.prefill_s, g.decode_s)
