"""``sparseinfer eval``: accuracy at α through lm-eval (paper Tables II/III)."""
from __future__ import annotations

import click

from .output import echo_err, echo_json, format_table


@click.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--tasks", default="gsm8k,bbh", show_default=True,
              help="Comma-separated: gsm8k (8-shot CoT, strict match), bbh (27 subtasks, 3-shot CoT, exact match, "
                   "macro average) or one BBH subtask as bbh_<name>.")
@click.option("--alpha", "alphas", multiple=True,
              help="A sparse row at this α schedule, e.g. 1.00 or '1.03@0-19,1.00'; repeat for more rows. "
                   "The dense row is always evaluated.")
@click.option("--random", "random_sparsity", type=float, default=None,
              help="Add the paper's control: a fraction S of each layer's MLP rows dropped at random "
                   "(a fixed mask per layer, prefill included), e.g. 0.9.")
@click.option("--limit", type=int, default=None, help="Samples per task (lm-eval --limit; per BBH subtask).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's).")
@click.option("--data-dir", type=click.Path(), default=None,
              help="Holds gsm8k/test.jsonl and bbh/bbh/<task>.json (default: $SPARSEINFER_DATA_DIR).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="out/eval", show_default=True,
              help="Exports (cached), lm-eval's cache (resume), per-sample JSONL, results and eval.json.")
@click.option("--max-gen-toks", type=int, default=None,
              help="Cap every generation at N tokens (default: the tasks' own, GSM8K 256, BBH 1024).")
@click.option("--ray", "ray_address", metavar="ADDRESS|auto|local", default=None,
              help="Run each row's requests on Ray workers, one model session per worker (a GPU each with "
                   "--provider cuda): 'auto' joins the running cluster, 'local' starts one here, or HOST:PORT. "
                   "Same results as in-process. --out must be on a disk every node sees. "
                   "Needs the ray extra: pip install -e '.[ray]'.")
@click.option("--ray-workers", type=int, default=None,
              help="Number of Ray workers (default: one per GPU with cuda, else one per --threads CPUs of the "
                   "cluster; --threads defaults to 1 under --ray).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def eval_cmd(checkpoint, tasks, alphas, random_sparsity, limit, provider, threads, data_dir, out_dir, max_gen_toks,
             ray_address, ray_workers, quiet, as_json):
    """Accuracy of CHECKPOINT (HF directory or .gguf) dense and sparse, through lm-eval.

    Evaluates the dense export, one sparse export per --alpha and, with --random, the
    random-dropping control on the same samples (lm-eval's gsm8k_cot and bbh_cot_fewshot
    on local files), then prints a table shaped like the paper's Tables II/III: score per
    task, average, difference to dense in points, measured decode sparsity and decode
    tokens/s. Exports are made once and cached under --out; an interrupted run resumes
    from lm-eval's cache there. Needs the eval extra: pip install 'sparseinfer[eval]'.
    """
    try:
        from sparseinfer.evaluation.runner import notes, run_eval, table
    except ImportError as e:
        raise click.ClickException(f"sparseinfer eval needs lm-eval ({e.name} missing): "
                                   f"pip install 'sparseinfer[eval]'") from None

    result = run_eval(checkpoint, tasks, alphas=alphas, random=random_sparsity, limit=limit, provider=provider,
                      data_dir=data_dir, out=out_dir, max_gen_toks=max_gen_toks, threads=threads,
                      progress=not quiet and not as_json, log=echo_err, ray=ray_address, ray_workers=ray_workers)
    if as_json:
        echo_json(result)
        return
    click.echo(format_table(*table(result)))
    for line in notes(result):
        click.echo(line)
    click.echo(f"results: {out_dir}/eval.json, per-sample JSONL under {out_dir}/<row>/")


COMMANDS = (eval_cmd,)
