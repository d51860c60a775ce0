"""Commands that write checkpoints, exports and the op library: make-checkpoint, export,
build-ops."""
from __future__ import annotations

import click

from sparseinfer.model_export.synthetic import MAX_LAYERS
from sparseinfer.reference.dtypes import WEIGHT_DTYPE_NAMES

from . import options
from .output import echo_json
from .progress import export_checkpoint


@click.command("make-checkpoint", short_help="Write a synthetic ProSparse-like checkpoint.")
@options.shape("tiny", "Layer shape: tiny (test shape) or the ProSparse-Llama2 7B / 13B layer shapes.")
@options.layers(help=f"Number of layers, 1..{MAX_LAYERS} (default: the shape's own).")
@options.target_sparsity("Fraction of MLP rows whose FATReLU output is zero at decode time.")
@click.option("--dtype", type=click.Choice(list(WEIGHT_DTYPE_NAMES)), default="fp32", show_default=True,
              help="Stored weight type.")
@click.option("--kv-heads", type=click.IntRange(1), default=None,
              help="Key/value heads (GQA), >= 1 and dividing the attention heads; default: the shape's own.")
@click.option("--hidden-act", default=None,
              help="relu, fatrelu:T, silu, gelu or gelu_tanh (default: the shape's FATReLU).")
@click.option("--tie-embeddings", is_flag=True, help="Share the embedding with the LM head.")
@options.seed("Random seed (any integer >= 0).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@options.JSON
def make_checkpoint_cmd(shape_name, layers, target_sparsity, dtype, kv_heads, hidden_act, tie_embeddings, seed,
                        out_dir, as_json):
    """Write a synthetic ProSparse-like checkpoint (Hugging Face format).

    config.json, model.safetensors and a byte-level tokenizer.json; random weights whose
    gate pre-activations are mostly negative, calibrated so that the decode-time MLP
    sparsity is --target-sparsity (see model_export/synthetic.py).
    """
    from sparseinfer.model_export.synthetic import make_checkpoint

    path = make_checkpoint(shape_name, out_dir, layers=layers, target_sparsity=target_sparsity, seed=seed,
                           dtype=dtype, kv_heads=kv_heads, hidden_act=hidden_act, tie_embeddings=tie_embeddings)
    info = {"path": str(path), "shape": shape_name, "layers": layers, "dtype": dtype,
            "target_sparsity": target_sparsity, "seed": seed}
    if as_json:
        echo_json(info)
    else:
        click.echo(f"wrote {path} ({shape_name}, {dtype}, target sparsity {target_sparsity})")


@click.command("export", short_help="Export a checkpoint to one ONNX model.")
@click.argument("checkpoint", type=click.Path(exists=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .onnx path.")
@options.alpha(options.EXPORT_ALPHA_HELP)
@click.option("--dense", is_flag=True, help="Dense baseline: no predictor, every MLP row computed.")
@options.TARGET
@click.option("--debug", is_flag=True, help="Add per-layer debug outputs (MLP input, predicted and actual "
                                           "zero masks, computed rows); costs one full gate product per layer.")
@options.PORTABLE
@options.dtype()
@options.approximate("Sparse export of a model without exact zeros (SiLU): the rows the sign predictor calls "
                     "negative are taken as zero, an approximation (measure its quality: compare-methods, eval).")
@options.QUANTIZE
@options.ACCURACY_LEVEL
@options.json_flag("Print the model's path and form as JSON on stdout instead of the line on stderr.")
def export_cmd(checkpoint, out, alpha, dense, target, debug, portable, dtype, approximate, quantize, accuracy_level,
               as_json):
    """Export CHECKPOINT (HF directory or .gguf) to one ONNX model for prefill + decode.

    Decode steps use the sparse MLP: one SparseMLP node per layer (domain ai.sparseinfer),
    run by the op library where a host registers it, else by its function body of standard
    ops; prefill stays dense. Beside the model: genai_config.json, the tokenizer files and,
    for sparse exports, the op library. The graph passes onnx.checker.check_model(full_check=True).

    --quantize q8_0|q4_0|q4_1 puts every linear layer on GGUF blocks (sparse or, with --dense,
    the quantized dense baseline); such exports run only with the op library.
    """
    path = export_checkpoint(checkpoint, out, sparse=not dense, alpha=alpha, target=target, debug=debug,
                             portable=portable, dtype=dtype, approximate=approximate, quiet=as_json, quantize=quantize,
                             accuracy_level=accuracy_level)
    if as_json:
        echo_json({"path": str(path), "checkpoint": str(checkpoint), "sparse": not dense,
                   "alpha": None if dense else alpha, "target": None if dense else target,
                   "approximate": approximate, "portable": portable, "debug": debug, "dtype": dtype,
                   "quantize": quantize, "accuracy_level": accuracy_level if quantize else None})


@click.command("build-ops", short_help="Build the native sparse-MLP op library.")
@click.option("--cuda/--no-cuda", default=None,
              help="Build the CUDA-provider library too (default: where nvcc and the CUDA runtime are found; "
                   "--cuda makes their absence an error).")
@options.json_flag("Print {cpu, cuda, onnxruntime_api, headers_api, reason}.")
def build_ops_cmd(cuda, as_json):
    """Build the native sparse-MLP op library for onnxruntime and print its path(s).

    One SparseMLP node per layer of a sparse export runs as one native kernel in any
    onnxruntime host that registers the library (SessionOptions.register_custom_ops_library):
    the C++ CPU kernel always, the CUDA kernels (kernels/cuda, on the CUDA provider's stream)
    where nvcc is found. Built once and cached under ~/.cache/sparseinfer/ops
    (SPARSEINFER_OPS_CACHE) by sources, flags and compiler versions; onnxruntime's C API
    headers come from ORT_INCLUDE_DIR, a system install, or Debian's libonnxruntime-dev
    (fetched once). generate, compare and bench-decode build it on first use.
    """
    from sparseinfer.model_export import op_library

    built = op_library.build(cuda)
    if as_json:
        echo_json(built.as_dict())
        return
    click.echo(f"cpu:  {built.cpu}")
    click.echo(f"cuda: {built.cuda or '-'}" + (f"  ({built.reason})" if built.reason else ""))
    click.echo(f"asks onnxruntime for C API {built.onnxruntime_api} (headers: API {built.headers_api})")


COMMANDS = (make_checkpoint_cmd, export_cmd, build_ops_cmd)
