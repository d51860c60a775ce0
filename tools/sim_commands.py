"""Commands over the simulators: table1, ops, memory, models."""
from __future__ import annotations

import click

from sparseinfer.reference.shapes import BUILTIN_MODELS, load_model
from sparseinfer.sim import ops as op_counts
from sparseinfer.sim import paper

from .output import echo_json, format_table, rel_diff, sci

MODEL_HELP = "Built-in model name (see `sparseinfer models`) or a Hugging Face config.json / checkpoint directory."


@click.command(short_help="Reproduce the paper's Table I (ProSparse-Llama2-13B).")
@click.option("--sparsity", default=str(paper.TABLE1_SPARSITY), show_default=True,
              help="Fraction of MLP rows skipped, in [0, 1). Table I implies 0.92.")
@click.option("--rank", default=paper.TABLE1_POWERINFER_RANK, show_default=True, type=click.IntRange(1, op_counts.MAX_RANK),
              help=f"Rank r of PowerInfer's DejaVu predictor (d->r->k), 1..{op_counts.MAX_RANK}.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
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
@click.option("--model", "model_name", required=True, help=MODEL_HELP)
@click.option("--sparsity", default=str(paper.TABLE1_SPARSITY), show_default=True,
              help="Fraction of MLP rows skipped, in [0, 1).")
@click.option("--rank", default=paper.TABLE1_POWERINFER_RANK, show_default=True, type=click.IntRange(1, op_counts.MAX_RANK),
              help=f"Rank r of PowerInfer's DejaVu predictor, 1..{op_counts.MAX_RANK}.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def ops(model_name, sparsity, rank, as_json):
    """Operation counts of one MLP block and of a whole token (all layers), per method."""
    model = load_model(model_name)
    per_layer = op_counts.ops_per_layer(model, sparsity, rank)
    per_token = op_counts.ops_per_token(model, sparsity, rank)
    data = {"model": model.name, "d": model.d, "k": model.k, "num_layers": model.num_layers,
            "sparsity": float(op_counts.as_fraction(sparsity)), "rank": rank,
            "per_layer": [{k: op_counts.number(v) for k, v in r.items()} for r in per_layer],
            "per_token": [{k: op_counts.number(v) for k, v in r.items()} for r in per_token]}
    if as_json:
        echo_json(data)
        return
    click.echo(f"{model.name}: d={model.d}, k={model.k}, {model.num_layers} layers, sparsity {data['sparsity']}, rank {rank}")
    click.echo(format_table(
        ["method", "prediction ops/layer", "MLP ops/layer", "total ops/token"],
        [[a["method"], sci(a["prediction_ops"]), sci(a["mlp_ops"]), sci(b["prediction_ops"] + b["mlp_ops"])]
         for a, b in zip(data["per_layer"], data["per_token"])]))


@click.command(short_help="Predictor memory of a whole model, per method.")
@click.option("--model", "model_name", required=True, help=MODEL_HELP)
@click.option("--rank", default=paper.TABLE1_POWERINFER_RANK, show_default=True, type=click.IntRange(1, op_counts.MAX_RANK),
              help=f"Rank r of PowerInfer's DejaVu predictor, 1..{op_counts.MAX_RANK}.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def memory(model_name, rank, as_json):
    """Predictor memory of a whole model: PowerInfer's FP16 DejaVu weights vs packed sign words."""
    model = load_model(model_name)
    mem = op_counts.predictor_memory_mib(model, rank)
    data = {"model": model.name, "num_layers": model.num_layers, "rank": rank, "predictor_memory_mib": mem,
            "ratio": mem["PowerInfer"] / mem["SparseInfer"]}
    if as_json:
        echo_json(data)
        return
    click.echo(f"{model.name}: {model.num_layers} layers, PowerInfer rank {rank}")
    click.echo(format_table(["predictor", "MiB"], [[m, f"{v:.1f}"] for m, v in mem.items()]
                            + [["ratio", f"{data['ratio']:.2f}x"]]))


@click.command(short_help="List the built-in model shapes.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
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
