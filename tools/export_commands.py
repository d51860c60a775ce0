"""Commands over checkpoints and ONNX exports: make-checkpoint, export, generate, compare,
bench-decode."""
from __future__ import annotations

import click

from sparseinfer.model_export.synthetic import SYNTHETIC_SHAPES

from .output import echo_json


@click.command("make-checkpoint")
@click.option("--shape", "shape_name", type=click.Choice(list(SYNTHETIC_SHAPES)), default="tiny", show_default=True,
              help="Layer shape: tiny (test shape) or the ProSparse-Llama2 7B / 13B layer shapes.")
@click.option("--layers", type=int, default=None, help="Number of layers (default: the shape's own).")
@click.option("--target-sparsity", type=float, default=0.9, show_default=True,
              help="Fraction of MLP rows whose FATReLU output is zero at decode time.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Stored weight type.")
@click.option("--kv-heads", type=int, default=None, help="Key/value heads (GQA); default: the shape's own.")
@click.option("--hidden-act", default=None, help="relu, fatrelu:T or silu (default: the shape's FATReLU).")
@click.option("--tie-embeddings", is_flag=True, help="Share the embedding with the LM head.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
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


COMMANDS = (make_checkpoint_cmd,)
