"""The command-line options that several commands share, each declared once.

An option that reads the same in every command is a decorator (``JSON``, ``HW``,
``PORTABLE``, …); one whose help reads differently per command (the α schedule of a run or
of an export, the --plot of each figure) is a function that takes that help and returns the
decorator. Groups of options that go together (``HW``: --hw and --hw-file; ``SAMPLING``;
``METHOD``; ``ORT``; ``tasks_group``) list their options in --help order. Defaults are the
packages' own constants.
"""
from __future__ import annotations

import click

from sparseinfer.evaluation.ort_runner import DEFAULT_EXPORT_DIR
from sparseinfer.methods.calibration import DEFAULT_CALIBRATION_PROMPTS
from sparseinfer.methods.model_runner import DEFAULT_DECODE_STEPS, DEFAULT_MAX_PROMPTS
from sparseinfer.methods.registry import DEFAULT_METHOD, DEFAULT_METHOD_SPARSITY
from sparseinfer.model_export.session import MLP_KERNELS, MLP_KERNELS_HELP, PROVIDERS
from sparseinfer.model_export.synthetic import DEFAULT_TARGET_SPARSITY, MAX_LAYERS, SYNTHETIC_SHAPES
from sparseinfer.reference.alpha import DEFAULT_ALPHA, MAX_ALPHA_MILLI
from sparseinfer.reference.block_quant import FORMATS as BLOCK_FORMATS
from sparseinfer.sim import latency as lat
from sparseinfer.sim import paper
from sparseinfer.sim.hardware import DEFAULT_HARDWARE
from sparseinfer.sim.ops import MAX_CONTEXT_TOKENS, MAX_RANK

from .output import FiniteFloat


def stack(*decorators):
    """One decorator applying ``decorators`` so that their options list in the given order."""
    def wrap(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f
    return wrap


# ---- output ---------------------------------------------------------------------------------

def json_flag(help: str = "Print machine-readable JSON."):
    return click.option("--json", "as_json", is_flag=True, help=help)


JSON = json_flag()


def plot(help: str):
    return click.option("--plot", "plot_file", type=click.Path(dir_okay=False), help=help)


# ---- model shapes and platforms (the simulators) ----------------------------------------------

MODEL_HELP = "Built-in model name (see `sparseinfer models`) or a Hugging Face config.json / checkpoint directory."
HW_HELP = "Platform: a built-in name (see `sparseinfer hardware`) or a TOML file of the same form."


def model(required: bool = False):
    """--model: a model shape; required, or the paper's 13B model by default."""
    if required:
        return click.option("--model", "model_name", required=True, help=MODEL_HELP)
    return click.option("--model", "model_name", default=paper.TABLE1_MODEL, show_default=True, help=MODEL_HELP)


def rank(detail: str = ""):
    return click.option("--rank", default=paper.TABLE1_POWERINFER_RANK, show_default=True,
                        type=click.IntRange(1, MAX_RANK),
                        help=f"Rank r of PowerInfer's DejaVu predictor{detail}, 1..{MAX_RANK}.")


def rows_skipped(note: str = ""):
    """--sparsity of the operation counts (table1, ops)."""
    return click.option("--sparsity", default=str(paper.TABLE1_SPARSITY), show_default=True,
                        help="Fraction of MLP rows skipped, in [0, 1)." + note)


HW = stack(click.option("--hw", default=DEFAULT_HARDWARE, show_default=True, help=HW_HELP),
           click.option("--hw-file", type=click.Path(dir_okay=False),
                        help="Add a platform from a small TOML file (overrides --hw)."))
CONTEXT = click.option("--context", "context_tokens", default=lat.DEFAULT_CONTEXT_TOKENS, show_default=True,
                       type=click.IntRange(0, MAX_CONTEXT_TOKENS),
                       help=f"KV-cache length (tokens) of the decode step, 0..{MAX_CONTEXT_TOKENS:,}.")


# ---- α schedules ------------------------------------------------------------------------------

ALPHA_SCHEDULE = "α schedule, e.g. 1.00 or '1.03@0-19,1.00'"
RUN_ALPHA_HELP = ALPHA_SCHEDULE + " (α > 1 is more conservative)."
EXPORT_ALPHA_HELP = (ALPHA_SCHEDULE + " (paper eq. 2; > 1 skips fewer rows); each α in "
                     f"0.001..{MAX_ALPHA_MILLI // 1000:,}, with at most 3 decimals.")
SPARSE_EXPORT_ALPHA_HELP = "The sparse export's " + EXPORT_ALPHA_HELP


def alpha(help: str = RUN_ALPHA_HELP):
    return click.option("--alpha", default=DEFAULT_ALPHA, show_default=True, help=help)


# ---- exports and onnxruntime ------------------------------------------------------------------

MAX_THREADS = 1024
TARGET_HELP = ("Predictor formulation. cpu: W_gate sign bits packed in uint64 words, XOR + arithmetic "
               "popcount (k*d/8 bytes per layer, d rounded up to a multiple of 1024; 1/32 of fp32 W_gate). cuda: ±1 int8 signs and "
               "MatMulInteger, since the CUDA EP has no bitwise ops (k*d bytes per layer, 8x the packed words).")
DTYPE_HELP = ("float32, or float16 (fused form only; half the bytes; the SparseMLP op widens its fp16 weights exactly "
              "and accumulates in float32; a weight beyond float16's range is an error; onnxruntime's CPU provider "
              "runs fp16 MatMuls slowly, fp16 is for GPUs).")
PORTABLE_HELP = ("Standard ONNX ops only (attention, rotary and RMSNorm composed, KV cache grown by Concat), for "
                 "runtimes without onnxruntime's com.microsoft contrib ops. Default: GroupQueryAttention and "
                 "(Skip)SimplifiedLayerNormalization with one in-place KV buffer (onnxruntime-genai's form).")

QUANTIZE_HELP = ("Every linear layer on GGUF blocks: q8_0, q4_0 or q4_1 (activations stay float32). A Hugging Face "
                 "checkpoint is quantized at export, one layer at a time; a GGUF keeps its Q8_0 / Q4_0 / Q4_1 blocks "
                 "byte for byte and converts other types (K-quants, floats) to this format, with a note, and its "
                 "ffn_down is re-blocked along d in q8_0. Attention and the LM head run as onnxruntime's "
                 "MatMulNBits where it holds the format and runs it fast (see --accuracy-level), else as the op "
                 "library's BlockMatMul; sparse MLPs as the op's SparseMLP on blocks; dense ones as MatMulNBits, "
                 "else as the op's dense SparseMLP. The op library's nodes have no function body: the fused "
                 "form, float32, the cpu target and native MLP kernels only; d a multiple of 32.")

TARGET = click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                      help=TARGET_HELP)
PORTABLE = click.option("--portable", is_flag=True, help=PORTABLE_HELP)


def quantize(help: str = QUANTIZE_HELP, required: bool = False):
    """--quantize: a block format (q8_0, q4_0, q4_1) of an export's linear layers."""
    return click.option("--quantize", type=click.Choice(list(BLOCK_FORMATS)), required=required, help=help)


QUANTIZE = quantize()
ACCURACY_LEVEL = click.option(
    "--accuracy-level", type=click.IntRange(0, 4), default=0, show_default=True,
    help="With --quantize: the accuracy level of onnxruntime's MatMulNBits nodes, 0..4. 0: float32 activations on "
         "the exact weights (the reference's arithmetic but for the order of sums); 4: activations quantized per "
         "block to int8 (llama.cpp's q8 dot products, onnxruntime-genai's int4 default): faster, not exact. q8_0 "
         "layers run as MatMulNBits only at 4 (onnxruntime's 8-bit kernel for float32 activations is about 40x "
         "slower), else in the op library's BlockMatMul; q4_1 layers always in BlockMatMul. At 4 the SparseMLP "
         "nodes' gate and up rows also take int8 activations (bit-exact with reference/q8_activation.py; CPU "
         "provider only).")


def dtype(help: str = "Weights and activations: " + DTYPE_HELP):
    """--dtype of an export (float32 or float16)."""
    return click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
                        help=help)


def provider(default: str | None = "cpu", help: str | None = None):
    return click.option("--provider", type=click.Choice(list(PROVIDERS)), default=default,
                        show_default=default is not None, help=help)


def threads(help: str = f"intra-op threads, 1..{MAX_THREADS} (default: onnxruntime's)."):
    return click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None, help=help)


def mlp_kernels(help: str = MLP_KERNELS_HELP):
    return click.option("--mlp-kernels", type=click.Choice(MLP_KERNELS), default="auto", show_default=True, help=help)


def work_dir(help: str, default: str | None = None):
    return click.option("--work-dir", type=click.Path(file_okay=False), default=default,
                        show_default=default is not None, help=help)


def seed(help: str):
    return click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help=help)


def max_new_tokens(default: int, help: str):
    return click.option("--max-new-tokens", default=default, show_default=True, type=click.IntRange(1), help=help)


PROMPT = click.option("--prompt", required=True, help="Prompt text.")
SAMPLING = stack(
    max_new_tokens(32, "Tokens to generate, >= 1 (the prompt and these must fit the model's context)."),
    click.option("--temperature", type=FiniteFloat(0), default=0.0, show_default=True,
                 help="Sampling temperature, a finite number >= 0; 0 = greedy."),
    click.option("--top-p", type=FiniteFloat(0, 1, min_open=True), default=1.0, show_default=True,
                 help="Nucleus sampling mass, in (0, 1]; 1 = the whole distribution."),
    seed("Sampling seed (any integer >= 0)."),
    provider(help="onnxruntime execution provider (cuda keeps the KV cache on the GPU with IOBinding)."),
    threads(),
    mlp_kernels())


# ---- synthetic checkpoints --------------------------------------------------------------------

def shape(default: str, help: str):
    return click.option("--shape", "shape_name", type=click.Choice(list(SYNTHETIC_SHAPES)), default=default,
                        show_default=True, help=help)


def layers(default: int | None = None, help: str | None = None):
    return click.option("--layers", type=click.IntRange(1, MAX_LAYERS), default=default,
                        show_default=default is not None, help=help)


def target_sparsity(help: str | None = None):
    return click.option("--target-sparsity", type=float, default=DEFAULT_TARGET_SPARSITY, show_default=True,
                        help=help)


# ---- prompts, methods and calibration (the design-space tools) ---------------------------------

PROMPTS_HELP = "Text file (one prompt per line) or JSONL with 'question'/'prompt'/'text' fields."


def prompts(help: str = PROMPTS_HELP):
    return click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), help=help)


MAX_PROMPTS = click.option("--max-prompts", default=DEFAULT_MAX_PROMPTS, show_default=True,
                           type=click.IntRange(1), help="Use at most this many prompts.")


def decode_steps(help: str):
    """--max-new-tokens of a traced run: decode steps per prompt."""
    return max_new_tokens(DEFAULT_DECODE_STEPS, help)


def approximate(help: str):
    return click.option("--approximate", is_flag=True, help=help)


def calibration(help: str):
    return click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False), help=help)


MAX_CALIBRATION_PROMPTS = click.option("--max-calibration-prompts", default=DEFAULT_CALIBRATION_PROMPTS,
                                       show_default=True, type=click.IntRange(1),
                                       help="Use at most this many calibration prompts.")


def param(help: str, metavar: str | None = None):
    return click.option("--param", "params", multiple=True, metavar=metavar, help=help)


METHOD = stack(
    click.option("--method", "method_name", default=DEFAULT_METHOD, show_default=True,
                 help="Sparsity method: sparseinfer (the sign predictor at --alpha), oracle, random, dejavu, "
                      "teal, cats, wisparse, cluster, cluster-oracle, dense."),
    click.option("--sparsity", default=None,
                 help=f"Target sparsity of --method (comma-separated for sweep; default {DEFAULT_METHOD_SPARSITY}); "
                      "with the default method it calibrates α per layer to it."),
    param("Method parameter METHOD.KEY=VALUE (repeatable), e.g. dejavu.rank=64."),
    approximate("Allow the sign predictor on a SiLU model (predicted-negative gates treated as zero)."),
    calibration("With --method: calibration prompts (text or JSONL), disjoint from --prompts; "
                "default: built-in ones."))

ORT = stack(
    provider(default=None, help="Decode onnxruntime exports with debug outputs (per-layer predicted/actual zero "
                                "masks) on this provider instead of the NumPy reference model; the sign predictor "
                                "(--alpha) only."),
    click.option("--export-dir", type=click.Path(file_okay=False), default=DEFAULT_EXPORT_DIR, show_default=True,
                 help="With --provider: where the debug exports (one per alpha schedule, and the dense one) "
                      "are made once and cached."),
    threads(f"With --provider: onnxruntime intra-op threads, 1..{MAX_THREADS}."),
    mlp_kernels("With --provider: " + MLP_KERNELS_HELP))


# ---- accuracy through lm-eval ----------------------------------------------------------------

DATA_DIR_HELP = "gsm8k/test.jsonl and bbh/bbh/<task>.json (default: $SPARSEINFER_DATA_DIR)."


def tasks(help: str, default: str | None = None):
    return click.option("--tasks", default=default, show_default=default is not None, help=help)


def limit(help: str):
    return click.option("--limit", type=click.IntRange(1), default=None, help=help)


def data_dir(help: str):
    return click.option("--data-dir", type=click.Path(), default=None, help=help)


def max_gen_toks(help: str):
    return click.option("--max-gen-toks", type=click.IntRange(1), default=None, help=help)


def tasks_group(default_out: str):
    """--tasks, --limit, --data-dir, --max-gen-toks, --eval-out: accuracy through ``sparseinfer eval``
    for a design-space tool's rows."""
    return stack(
        tasks("Also measure accuracy through `sparseinfer eval` (lm-eval on local data): gsm8k, bbh or "
              "bbh_<subtask>, comma-separated; each row gets its score per task and the difference to the dense "
              "row in points."),
        limit("With --tasks: samples per task, >= 1 (per BBH subtask)."),
        data_dir("With --tasks: holds " + DATA_DIR_HELP),
        max_gen_toks("With --tasks: cap every generation at N tokens (default: the tasks' own)."),
        click.option("--eval-out", type=click.Path(file_okay=False), default=default_out, show_default=True,
                     help="With --tasks: where the evaluation keeps its exports, lm-eval's cache (an interrupted "
                          "run resumes), per-sample JSONL and eval.json."))
