"""Commands over the simulators: table1, ops, memory, models."""
from __future__ import annotations

import click

from sparseinfer.reference.shapes import BUILTIN_MODELS, load_model
from sparseinfer.sim import ops as op_counts
from sparseinfer.sim import paper

from . import options
from .output import echo_json, format_table, rel_diff, sci


@click.command(short_help="Reproduce the paper's Table I (ProSparse-Llama2-13B).")
@options.rows_skipped(" Table I implies 0.92.")
@options.rank(" (d->r->k)")
@options.JSON
def table1(sparsity, rank, as_json):
    """Reproduce the paper's Table I for ProSparse-Llama2-13B.

    Prediction and MLP-block operations per token for one MLP block (llama.cpp dense,
    PowerInfer's rank-r DejaVu predictor, SparseInfer's k*d/32 XOR words), and the
    predictor memory of the whole model, beside the published figures.
    """
    model = BUILTIN_MODELS[paper.TABLE1_MODEL]
    data = op_counts.table1(model, sparsity, rank)
    if as_json:
        echo_json(data)
        return
    rows = []
    for row in data["rows"]:
        pub_pred, pub_mlp = paper.TABLE1[row["method"]]
        rows.append([row["method"], f"{row['prediction_ops']:,}", sci(pub_pred), rel_diff(row["prediction_ops"], pub_pred),
                     f"{row['mlp_ops']:,.1f}" if isinstance(row["mlp_ops"], float) else f"{row['mlp_ops']:,}",
                     sci(pub_mlp), rel_diff(row["mlp_ops"], pub_mlp)])
    click.echo(f"Table I: {model.name} (d={model.d}, k={model.k}), one MLP block per token, "
               f"sparsity {data['sparsity']}, PowerInfer rank {rank}")
    click.echo(format_table(["method", "prediction ops", "paper", "diff", "MLP block ops", "paper", "diff"], rows))
    mem = data["predictor_memory_mib"]
    click.echo("")
    click.echo(format_table(
        ["predictor memory", "MiB", "paper MiB", "diff"],
        [[m, f"{mem[m]:.1f}", f"{paper.PREDICTOR_MEMORY_MIB[m]:.1f}", rel_diff(mem[m], paper.PREDICTOR_MEMORY_MIB[m])]
         for m in ("PowerInfer", "SparseInfer")]
        + [["ratio", f"{data['predictor_memory_ratio']:.2f}x", f"{paper.PREDICTOR_MEMORY_RATIO:.2f}x",
            rel_diff(round(data["predictor_memory_ratio"], 2), paper.PREDICTOR_MEMORY_RATIO)]]))


@click.command(short_help="Operation counts of one MLP block and of a token.")
@options.model(required=True)
@options.rows_skipped()
@options.rank()
@options.JSON
def ops(model_name, sparsity, rank, as_json):
    """Operation counts of one MLP block and of a whole token (all layers), per method."""
    model = load_model(model_name)
    data = op_counts.op_counts(model, sparsity, rank)
    if as_json:
        echo_json(data)
        return
    click.echo(f"{model.name}: d={model.d}, k={model.k}, {model.num_layers} layers, sparsity {data['sparsity']}, rank {rank}")
    click.echo(format_table(
        ["method", "prediction ops/layer", "MLP ops/layer", "total ops/token"],
        [[a["method"], sci(a["prediction_ops"]), sci(a["mlp_ops"]), sci(b["prediction_ops"] + b["mlp_ops"])]
         for a, b in zip(data["per_layer"], data["per_token"])]))


@click.command(short_help="Predictor memory of a whole model, per method.")
@options.model(required=True)
@options.rank()
@options.JSON
def memory(model_name, rank, as_json):
    """Predictor memory of a whole model: PowerInfer's FP16 DejaVu weights vs packed sign words."""
    model = load_model(model_name)
    data = op_counts.predictor_memory(model, rank)
    if as_json:
        echo_json(data)
        return
    click.echo(f"{model.name}: {model.num_layers} layers, PowerInfer rank {rank}")
    mem = data["predictor_memory_mib"]
    click.echo(format_table(["predictor", "MiB"], [[m, f"{v:.1f}"] for m, v in mem.items()]
                            + [["ratio", f"{data['ratio']:.2f}x"]]))


@click.command(short_help="List the built-in model shapes.")
@options.JSON
def models(as_json):
    """List the built-in model shapes."""
    if as_json:
        echo_json([m.to_dict() for m in BUILTIN_MODELS.values()])
        return
    click.echo(format_table(
        ["model", "d", "k", "layers", "heads", "kv heads", "vocab", "activation"],
        [[m.name, m.d, m.k, m.num_layers, m.num_heads, m.num_kv_heads, m.vocab_size, m.hidden_act]
         for m in BUILTIN_MODELS.values()]))


COMMANDS = (table1, ops, memory, models)
