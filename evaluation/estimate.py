"""How long a full Table II/III run takes on one GPU: an estimate from the latency model
(``sim.latency``), not a measurement.

    python -m sparseinfer.evaluation.estimate --model prosparse-llama2-7b --hw h200 [--tokens 128] [--json]

Per task and row, ``samples × (generated tokens × decode ms/token + prefill)``:

* samples: GSM8K's test file (1,319 problems) and BBH's 27 task files (6,511 examples);
* generated tokens per sample: an assumed mean (``--tokens``), never above the task's cap
  (GSM8K 256, the backend's default; BBH 1024, lm-eval's ``cot_fewshot`` template). The
  random control's text never reaches a stop string, so its rows generate the whole cap;
* decode ms/token: ``sim.latency.decode_latency`` on the model's shape at the context of
  the prompt plus half the answer: its ``llama.cpp`` row (dense GEMVs) for the dense row,
  ``SparseInfer+KF+AS`` at the row's α for the sparse rows. The model reads fp16 weights;
  ``sparseinfer eval`` exports fp32, which reads twice the weight bytes, so the fp32
  column doubles the decode time (memory-bound);
* prefill: ``2 × parameters × prompt tokens`` at the platform's fp16 (fp32) compute peak
  times its compute fraction, with an assumed prompt length (``--prompt-tokens``);
* the per-token random control of ``--method random`` decodes on the NumPy reference
  model: every step reads all fp32 weights (the reference computes the full products and
  masks them), at an assumed CPU bandwidth (``--cpu-gb-per-s``).
"""
from __future__ import annotations

import argparse
import json

from sparseinfer.reference.shapes import load_model

from .decoder_lm import DEFAULT_MAX_GEN_TOKS

SAMPLES = {"gsm8k": 1319, "bbh": 6511}           # GSM8K test.jsonl; the 27 BBH files of lm-eval's bbh_cot_fewshot
SUBTASKS = {"gsm8k": 1, "bbh": 27}               # --limit counts per subtask
GEN_CAP = {"gsm8k": DEFAULT_MAX_GEN_TOKS,        # gsm8k-cot sets no max_gen_toks: lm-eval's default
           "bbh": 1024}                          # tasks/bbh/_cot_fewshot_template_yaml: max_gen_toks 1024
DEFAULT_GEN_TOKENS = 128                         # assumed mean chain-of-thought answer (not measured on ProSparse)
DEFAULT_PROMPT_TOKENS = {"gsm8k": 900, "bbh": 1000}   # assumed few-shot prompt length in Llama-2 tokens
DEFAULT_CPU_GB_PER_S = 20.0                      # assumed NumPy GEMV bandwidth of the host (a 2-core VM read 16-20)
PAPER_ROWS = (("dense", None), ("α 1.00", "1.00"), ("α 1.03@0-19,1.00", "1.03@0-19,1.00"))
SPARSE_METHOD = "SparseInfer+KF+AS"
DENSE_METHOD = "llama.cpp"
FP32_OVER_FP16 = 2.0


def parameters(m) -> int:
    from sparseinfer.sim.latency import FP16, weight_bytes

    return weight_bytes(m) // FP16


def estimate(model: str, hw: str, tokens: int = DEFAULT_GEN_TOKENS, prompt_tokens: dict | None = None,
             cpu_gb_per_s: float = DEFAULT_CPU_GB_PER_S, limit: int | None = None,
             max_gen_toks: int | None = None) -> dict:
    """The estimate as data: per row and task, seconds in fp16 and fp32 (see the module docstring).
    ``limit`` / ``max_gen_toks``: as ``sparseinfer eval``'s (samples per (sub)task, a cap on
    every generation)."""
    from sparseinfer.sim import latency as lat
    from sparseinfer.sim.hardware import load_hardware

    m, spec = load_model(model), load_hardware(hw)
    prompt_tokens = {**DEFAULT_PROMPT_TOKENS, **(prompt_tokens or {})}
    n_params = parameters(m)
    eff = spec.efficiency.compute_fraction
    samples = {t: n if limit is None else min(n, int(limit) * SUBTASKS[t]) for t, n in SAMPLES.items()}
    cap = {t: c if max_gen_toks is None else min(c, int(max_gen_toks)) for t, c in GEN_CAP.items()}
    rows = []
    for label, alpha in PAPER_ROWS:
        tasks = {}
        for task, n in samples.items():
            gen = min(int(tokens), cap[task])
            context = prompt_tokens[task] + gen // 2
            method = DENSE_METHOD if alpha is None else SPARSE_METHOD
            data = lat.decode_latency(m, spec, alpha or "1.00", None, (method,), context)
            ms = data["methods"][0]["ms_per_token"]
            flops = 2.0 * n_params * prompt_tokens[task]
            prefill16 = flops / (spec.fp16_tensor_tflops * 1e12 * eff)
            prefill32 = flops / (spec.fp32_cuda_tflops * 1e12 * eff)
            tasks[task] = {"samples": n, "generated_tokens": gen, "context_tokens": context,
                           "decode_ms_per_token_fp16": ms,
                           "seconds_fp16": n * (gen * ms / 1000 + prefill16),
                           "seconds_fp32": n * (gen * ms * FP32_OVER_FP16 / 1000 + prefill32)}
        rows.append({"row": label, "engine": f"onnxruntime cuda ({method} of the latency model)", "tasks": tasks})
    fp32_bytes = n_params * 4
    random = {}
    for task, n in samples.items():
        s_per_token = fp32_bytes / (cpu_gb_per_s * 1e9)
        random[task] = {"samples": n, "generated_tokens": cap[task], "seconds_per_token": s_per_token,
                        "seconds_fp32": n * cap[task] * s_per_token}
    rows.append({"row": "random@0.9 (per token)", "engine": f"numpy reference, fp32, {cpu_gb_per_s:g} GB/s CPU",
                 "tasks": random})
    return {"model": m.name, "hardware": spec.name, "parameters": n_params, "limit": limit,
            "max_gen_toks": max_gen_toks, "samples": samples, "assumed_generated_tokens": int(tokens),
            "assumed_prompt_tokens": prompt_tokens, "cpu_gb_per_s": cpu_gb_per_s, "kind": "estimate from the latency "
            "model (sim/latency.py), not a measurement", "rows": rows}


def hours(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 600 else f"{seconds / 60:.1f} min"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Estimated time of a Table II/III run on one GPU (latency model).")
    p.add_argument("--model", default="prosparse-llama2-7b", help="prosparse-llama2-7b or prosparse-llama2-13b")
    p.add_argument("--hw", default="h200", help="a platform of `sparseinfer hardware`")
    p.add_argument("--tokens", type=int, default=DEFAULT_GEN_TOKENS, help="assumed mean generated tokens per sample")
    p.add_argument("--limit", type=int, default=None, help="samples per task (per BBH subtask), as eval's --limit")
    p.add_argument("--max-gen-toks", type=int, default=None, help="cap on every generation, as eval's")
    p.add_argument("--cpu-gb-per-s", type=float, default=DEFAULT_CPU_GB_PER_S,
                   help="assumed NumPy bandwidth for the per-token random control")
    p.add_argument("--json", action="store_true", help="print JSON")
    a = p.parse_args(argv)
    data = estimate(a.model, a.hw, a.tokens, cpu_gb_per_s=a.cpu_gb_per_s, limit=a.limit, max_gen_toks=a.max_gen_toks)
    if a.json:
        print(json.dumps(data, indent=1))
        return
    print(f"{data['model']} on {data['hardware']}: {data['kind']}; GSM8K {data['samples']['gsm8k']} + BBH "
          f"{data['samples']['bbh']} samples, {a.tokens} generated tokens per sample assumed")
    for r in data["rows"]:
        t = r["tasks"]
        fp16 = " + ".join(hours(t[k]["seconds_fp16"]) for k in t) if "seconds_fp16" in t["gsm8k"] else "-"
        print(f"{r['row']:<26} GSM8K + BBH fp16 {fp16:<18} fp32 "
              + " + ".join(hours(t[k]["seconds_fp32"]) for k in t) + f"   ({r['engine']})")


if __name__ == "__main__":
    main()
