"""``sparseinfer eval``: accuracy at α through lm-eval (paper Tables II/III)."""
from __future__ import annotations

import click

from . import options
from .output import echo_err, echo_json, format_table


@click.command("eval", short_help="Accuracy dense and sparse through lm-eval.")
@click.argument("checkpoint", type=click.Path())
@options.tasks("Comma-separated: gsm8k (8-shot CoT, strict match), bbh (27 subtasks, 3-shot CoT, exact match, "
               "macro average) or one BBH subtask as bbh_<name>.", default="gsm8k,bbh")
@click.option("--alpha", "alphas", multiple=True,
              help="A sparse row at this " + options.ALPHA_SCHEDULE + "; repeat for more rows. "
                   "The dense row is always evaluated.")
@click.option("--random", "random_sparsity", type=float, default=None,
              help="Add a fixed-mask random row: a fraction S of each layer's MLP rows dropped at random, the same "
                   "rows at every position, prefill included (an export of zeroed weights), e.g. 0.9. The paper's "
                   "per-token control is --method random --sparsity S.")
@click.option("--method", "methods", multiple=True, metavar="NAME[@S]",
              help="Add a row of any sparsity method at target sparsity S (NAME@S, or --sparsity), decoded on the "
                   "NumPy reference model with the prompt's prefill dense: sparseinfer (α calibrated to S unless "
                   "--param sparseinfer.alpha=...), oracle, random (a fresh random row mask per token at each "
                   "decode step: the paper's control), dejavu, teal, cats, wisparse, cluster, cluster-oracle, "
                   "dense. Repeatable.")
@click.option("--sparsity", "sparsities", multiple=True, metavar="S[,S...]",
              help="Target sparsity in [0, 1) of each --method given without @S; a comma list makes a row per "
                   "value. Repeatable.")
@options.param("A --method's parameter, repeatable, e.g. dejavu.rank=64, random.seed=1, "
               "sparseinfer.alpha='1.03@0-19,1.00'.", metavar="METHOD.KEY=VALUE")
@options.approximate("Allow the sign predictor (--method sparseinfer, cluster) on a SiLU model, where a "
                     "predicted-negative gate is treated as zero: an approximation.")
@options.calibration("Calibration prompts of the --method rows (text, one per line, or JSONL; default: built-in). "
                     "Refused if one overlaps a document of the evaluated tasks.")
@options.MAX_CALIBRATION_PROMPTS
@options.limit("Samples per task, >= 1 (lm-eval --limit; per BBH subtask).")
@options.provider()
@options.dtype("The exports' weights and activations: " + options.DTYPE_HELP + " The --method rows stay float32 "
               "(NumPy reference).")
@options.quantize("Export rows with every linear layer on GGUF blocks: q8_0, q4_0 or q4_1, as `export --quantize` "
                  "(cpu provider, float32 activations). Their labels, export folders and cache keys name the format, "
                  "beside the float32 rows'. The --method rows stay float32 (NumPy reference).")
@options.threads()
@options.data_dir("Holds " + options.DATA_DIR_HELP)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="out/eval", show_default=True,
              help="Exports (cached), lm-eval's cache (resume), per-sample JSONL, results and eval.json.")
@options.max_gen_toks("Cap every generation at N >= 1 tokens (default: the tasks' own, GSM8K 256, BBH 1024).")
@click.option("--ray", "ray_address", metavar="ADDRESS|auto|local", default=None,
              help="Run each row's requests on Ray workers, one model session per worker (a GPU each with "
                   "--provider cuda): 'auto' joins the running cluster, 'local' starts one here, or HOST:PORT. "
                   "Same results as in-process. --out must be on a disk every node sees. "
                   "Needs the ray extra: pip install -e '.[ray]'.")
@click.option("--ray-workers", type=click.IntRange(1), default=None,
              help="Number of Ray workers (default: one per GPU with cuda, else one per --threads CPUs of the "
                   "cluster; --threads defaults to 1 under --ray).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@options.JSON
def eval_cmd(checkpoint, tasks, alphas, random_sparsity, methods, sparsities, params, approximate, calibration_file,
             max_calibration_prompts, limit, provider, dtype, quantize, threads, data_dir, out_dir, max_gen_toks,
             ray_address, ray_workers, quiet, as_json):
    """Accuracy of CHECKPOINT (HF directory or .gguf) dense and sparse, through lm-eval.

    Evaluates the dense export, one sparse export per --alpha, with --random a fixed-mask
    random row and one row per --method at each target sparsity (NumPy reference model) on
    the same samples (lm-eval's gsm8k_cot and bbh_cot_fewshot on local files), then prints a
    table shaped like the paper's Tables II/III: score per task, average, difference to
    dense in points, measured decode sparsity and decode tokens/s. Exports are made once
    and cached under --out; an interrupted run resumes from lm-eval's cache there. Needs
    the eval extra: pip install 'sparseinfer[eval]'. Example (the paper's rows and its
    per-token random control):

    \b
        sparseinfer eval ck/ --alpha 1.00 --alpha '1.03@0-19,1.00' --method random --sparsity 0.9
    """
    from sparseinfer.evaluation.traced_runs import lm_eval_runner
    from sparseinfer.methods.registry import parse_param_options

    runner = lm_eval_runner("sparseinfer eval")
    result = runner.run_eval(checkpoint, tasks, alphas=alphas, random=random_sparsity, limit=limit, provider=provider,
                             data_dir=data_dir, out=out_dir, max_gen_toks=max_gen_toks, threads=threads,
                             progress=not quiet and not as_json, log=echo_err, ray=ray_address,
                             ray_workers=ray_workers, methods=methods, sparsities=sparsities,
                             params=parse_param_options(params), approximate=approximate,
                             calibration_file=calibration_file, max_calibration_prompts=max_calibration_prompts,
                             dtype=dtype, quantize=quantize)
    if as_json:
        echo_json(result)
        return
    click.echo(format_table(*runner.table(result)))
    for line in runner.notes(result):
        click.echo(line)
    click.echo(f"results: {out_dir}/eval.json, per-sample JSONL under {out_dir}/<row>/")


COMMANDS = (eval_cmd,)

