"""``sparseinfer eval``: dense, each α and the random control on the same samples, through
``lm_eval.simple_evaluate``, and a table shaped like the paper's Tables II/III.

Per row (``Row.slug``) under ``--out``: ``exports/<checkpoint>/<slug>/model.onnx`` (made once,
see ``exports``), ``<slug>/cache-<key>_rank0.db`` (lm-eval's request cache: an interrupted run
resumes from what it has; the key changes with the export), ``<slug>/results.json`` and
``<slug>/samples_<task>_<date>.jsonl`` (lm-eval's own sample logging: prompt, generation,
extracted answer, correct), and ``eval.json`` for the whole run.

``methods`` (``--method NAME --sparsity S``) add rows of any ``methods.registry`` method, which
decode on the NumPy reference model (``method_backend``; no export, prefill dense). Their
calibration prompts (built-in, or ``--calibration FILE``) are collected once for all of them
and must not overlap the documents of the evaluated tasks (all of them, not only the
``--limit`` first).

With ``ray`` (``--ray``), each export row's requests run on Ray workers (``ray_shards``).
lm-eval, its cache and its sample logging stay here, so the files are the same.

With ``quantize`` (``--quantize q8_0|q4_0|q4_1``) the export rows are exported block-quantized:
labels, folders and cache keys name the format (``exports.Row``), so they sit beside the
float32 rows, whose keys are unchanged.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from pathlib import Path

from sparseinfer.methods.calibration import DEFAULT_CALIBRATION_PROMPTS
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.files import make_folder, write_json

from .data import BBH_TASKS, check_data, task_documents
from .exports import (check_dtype_name, check_quantize_name, checkpoint_identity, ensure_export, export_key,
                      export_root, make_rows, parse_method_rows)
from .taskgen import BBH_GROUP, GSM8K_TASK, TASKS_DIR, bbh_task

GSM8K_METRIC = "exact_match,strict-match"          # the headline GSM8K score (lm-eval's first filter)
GSM8K_FLEXIBLE = "exact_match,flexible-extract"
BBH_METRIC = "exact_match,get-answer"
TASK_NAMES = ("gsm8k", "bbh") + tuple(f"bbh_{t}" for t in BBH_TASKS)


def parse_tasks(spec) -> list[str]:
    """'gsm8k,bbh' (or BBH subtasks 'bbh_navigate', ...) -> our names, in order, once each."""
    names = []
    for part in (spec if isinstance(spec, (list, tuple)) else str(spec).split(",")):
        part = part.strip().lower()
        if not part:
            continue
        if part not in TASK_NAMES:
            raise SparseInferError(f"unknown task {part!r}; expected gsm8k, bbh or bbh_<subtask> "
                                   f"({', '.join(BBH_TASKS[:3])}, ...)")
        if part not in names:
            names.append(part)
    if not names:
        raise SparseInferError("no tasks given; expected e.g. --tasks gsm8k,bbh")
    return names


def lm_eval_task(name: str) -> str:
    if name == "gsm8k":
        return GSM8K_TASK
    if name == "bbh":
        return BBH_GROUP
    return bbh_task(name.removeprefix("bbh_"))


def task_scores(name: str, results: dict) -> dict:
    """{'score': points, ...} of one of our tasks from lm-eval's ``results['results']``."""
    r = results["results"]
    if name == "gsm8k":
        g = r[GSM8K_TASK]
        return {"score": 100 * float(g[GSM8K_METRIC]), "flexible": 100 * float(g[GSM8K_FLEXIBLE]),
                "n": int(results["n-samples"][GSM8K_TASK]["effective"])}
    subs = BBH_TASKS if name == "bbh" else (name.removeprefix("bbh_"),)
    per = {s: 100 * float(r[bbh_task(s)][BBH_METRIC]) for s in subs}
    return {"score": sum(per.values()) / len(per),                       # macro average over subtasks
            "subtasks": per if name == "bbh" else None,
            "n": sum(int(results["n-samples"][bbh_task(s)]["effective"]) for s in subs)}


def quiet_lm_eval(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.ERROR
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def progress_bars(shown: bool):
    """Inside, every tqdm bar is off unless ``shown``: lm-eval's own bars pass their own
    ``disable=``, and tqdm reads TQDM_DISABLE only when it is first imported, so the switch
    goes to tqdm's constructor itself (and is put back on the way out)."""
    if shown:
        yield
        return
    from tqdm import std

    init = std.tqdm.__dict__["__init__"]

    def quiet(self, *args, **kwargs):
        init.__get__(self, type(self))(*args, **{**kwargs, "disable": True})
    std.tqdm.__init__ = quiet
    try:
        yield
    finally:
        std.tqdm.__init__ = init


def evaluate_row(lm, tasks: list[str], data_dir, out_dir: Path, cache_prefix: str, limit=None,
                 max_gen_toks=None, progress=True) -> dict:
    """One row through lm_eval.simple_evaluate (cache, sample logging); scores and lm.stats().
    ``progress``: lm-eval's progress bars, on or off."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(data_dir)})
    tracker = EvaluationTracker(output_path=str(out_dir / "results.json"))
    lm.reset_stats()
    t0 = time.perf_counter()
    with progress_bars(progress):
        res = lm_eval.simple_evaluate(model=lm, tasks=[lm_eval_task(t) for t in tasks], limit=limit,
                                      task_manager=tm, use_cache=cache_prefix, log_samples=True,
                                      evaluation_tracker=tracker,
                                      gen_kwargs={"max_gen_toks": int(max_gen_toks)} if max_gen_toks else None,
                                      bootstrap_iters=0, verbosity="ERROR")
    wall = time.perf_counter() - t0
    scores = {t: task_scores(t, res) for t in tasks}
    samples = res.pop("samples")
    tracker.save_results_aggregated(results=res, samples=samples)
    for task, rows in samples.items():
        tracker.save_results_samples(task_name=task, samples=rows)
    return {"scores": scores, "stats": lm.stats(), "wall_s": wall}


def method_sources_hash() -> str:
    """Hash of the methods', the reference model's and the method backend's sources (its requests'
    too, ``decoder_lm``): a method row run by other code does not resume from the old answers."""
    import sparseinfer.methods as methods
    import sparseinfer.reference.llama as llama

    h = hashlib.sha256()
    backend = [Path(__file__).with_name(name) for name in ("method_backend.py", "decoder_lm.py")]
    for path in sorted(Path(methods.__file__).parent.glob("*.py")) + [Path(llama.__file__), *backend]:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def row_cache_key(checkpoint, row, target: str, calibration=None, dtype: str = "float32") -> str:
    """The key of a row's lm-eval cache: its export's key, or for a method row the checkpoint,
    the row, the calibration prompts and the methods' sources."""
    if row.kind != "method":
        key = export_key(checkpoint, row, target, dtype)
    else:
        key = {"checkpoint": checkpoint_identity(checkpoint), "row": row.as_dict(), "engine": row.engine,
               "calibration": calibration, "sources": method_sources_hash()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def run_eval(checkpoint, tasks, alphas=(), random=None, limit=None, provider="cpu", data_dir=None, out="out/eval",
             max_gen_toks=None, threads=None, mlp_kernels="auto", target=None, seed=0, progress=True, verbose=False,
             log=print, ray=None, ray_workers=None, methods=(), sparsities=(), params=None, approximate=False,
             calibration_file=None, max_calibration_prompts=DEFAULT_CALIBRATION_PROMPTS, dtype="float32",
             quantize=None) -> dict:
    """Evaluate dense, each α, the random control and each method row (see the module's
    docstring). ``ray``: a Ray address ('auto', 'local', HOST:PORT) to run each export row's
    requests on Ray workers (``ray_shards``; ``ray_workers`` of them) instead of in this
    process. ``methods`` / ``sparsities`` / ``params`` / ``approximate``: the method rows
    (``exports.parse_method_rows``); ``calibration_file``: their calibration prompts; ``dtype``:
    the exports' float32, or float16 (weights and activations; the method rows stay float32);
    ``quantize``: the exports' block format (q8_0, q4_0, q4_1; the CPU provider, float32
    activations; the method rows stay float32)."""
    from sparseinfer.methods.calibration import calibration_prompts, check_disjoint
    from sparseinfer.model_export.loaders import load_checkpoint

    from .backend import SparseInferLM

    names = parse_tasks(tasks)
    dtype = check_dtype_name(dtype)
    quantize = check_quantize_name(quantize)
    if quantize:
        check_quantize_settings(quantize, provider, dtype, target)
    method_rows = parse_method_rows(methods, sparsities, params, approximate)
    prompts, source = calibration_prompts(calibration_file, max_calibration_prompts) if method_rows else ([], None)
    if method_rows and ray is not None:
        raise SparseInferError("--ray runs onnxruntime exports; --method rows decode on the NumPy reference model in "
                               "this process: run them without --ray")
    data_root = check_data(data_dir, names)
    if limit is not None and limit <= 0:
        raise SparseInferError(f"--limit {limit}: expected a positive number of samples per task")
    if not Path(checkpoint).exists():
        raise SparseInferError(f"no such checkpoint: {checkpoint}")
    if method_rows:
        check_disjoint(prompts, task_documents(data_root, names), f"{', '.join(names)} documents")
    if ray is not None:
        from .ray_shards import connect
        connect(ray)                                   # before any export: no Ray, no work
    loaded = {}

    def ck():
        if "ck" not in loaded:
            loaded["ck"] = load_checkpoint(checkpoint)
        return loaded["ck"]

    rows = make_rows(alphas, random, seed, ck().shape.num_layers, methods=method_rows, quantize=quantize)
    if quantize:                                       # whole blocks, before any export
        from sparseinfer.model_export.quant_weights import check_quantizable
        check_quantizable(ck().shape, ck().source)
    quiet_lm_eval(verbose)
    out = Path(out)
    exports = export_root(out / "exports", checkpoint)
    target = target or provider
    paths = {row: ensure_export(checkpoint, row, exports, target, loaded=ck, log=log, dtype=dtype,
                                note=lambda line: log(f"note: {line}"))
             for row in rows if row.kind != "method"}
    calibration = None
    if method_rows:
        from sparseinfer.methods.calibration import collect_calibration
        from sparseinfer.methods.model_runner import encode_prompts

        calibration = collect_calibration(ck().weights, encode_prompts(ck(), prompts, "calibration prompts"), source)
        log(f"calibration: {calibration.prompts} prompts, {calibration.tokens} tokens from {source}, none of them "
            f"in the {', '.join(names)} documents")
    else:
        loaded.clear()                                 # the weights are in the exports now
    calibration_key = None if calibration is None else {
        **calibration.describe(), "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}
    result = {"checkpoint": str(checkpoint), "tasks": names, "limit": limit, "provider": provider,
              "data_dir": str(data_root), "max_gen_toks": max_gen_toks, "ray": ray, "dtype": dtype,
              "quantize": quantize, "rows": []}
    if calibration is not None:
        result["calibration"] = calibration.describe()
    gen = {"max_gen_toks": max_gen_toks} if max_gen_toks else {}
    for row in rows:
        key = row_cache_key(checkpoint, row, target, calibration_key, dtype)
        row_dir = out / row.slug
        log(f"evaluating {row.label} ({paths.get(row, row.engine)}) on {', '.join(names)}"
            f"{f', {limit} samples per task' if limit else ''}")
        if row.kind == "method":
            from .method_backend import MethodLM
            lm = MethodLM(model=str(checkpoint), method=row, sparsity=row.sparsity, loaded=ck(),
                          calibrated=calibration, progress=progress, **gen)
        elif ray is not None:
            from .ray_shards import RayLM
            lm = RayLM(paths[row], row, provider=provider, threads=threads, mlp_kernels=mlp_kernels,
                       max_gen_toks=max_gen_toks, workers=ray_workers, progress=progress, address=ray)
        else:
            lm = SparseInferLM(model=str(checkpoint), alpha=row.alpha, random=row.random, seed=row.seed,
                               provider=provider, target=target, threads=threads, mlp_kernels=mlp_kernels,
                               cache_dir=str(out / "exports"), dtype=dtype, quantize=quantize, progress=progress,
                               **gen)
        if row.kind != "method" and lm.path != paths[row]:
            lm_path = lm.path
            raise SparseInferError(f"internal: export {lm_path} is not {paths[row]}")
        try:
            one = evaluate_row(lm, names, data_root, row_dir, str(row_dir / f"cache-{key}"), limit, max_gen_toks,
                               progress)
        finally:
            if ray is not None and row.kind != "method":
                lm.close()                             # the workers' sessions go before the next row's start
        result["rows"].append({**row.as_dict(), "engine": row.engine,
                               "export": str(paths[row]) if row in paths else None,
                               "mlp_kernels": one["stats"]["mlp_kernels"], **one})
        del lm
    finish(result)
    from sparseinfer.model_export.machine import machine_description
    result["machine"] = machine_description(provider)
    write_json(make_folder(out) / "eval.json", result)
    return result


def check_quantize_settings(quantize: str, provider: str, dtype: str, target: str | None) -> None:
    """A quantized evaluation's provider, dtype and target, or a one-line error saying why not."""
    from sparseinfer.model_export.export import quantize_conflicts

    if provider != "cpu":
        raise SparseInferError(f"--quantize {quantize} runs on the cpu provider: the op library's CUDA kernel takes "
                               f"no block formats yet (drop --provider {provider})")
    why = quantize_conflicts(quantize, dtype=dtype, target=target or provider)
    if why:
        raise SparseInferError(why)


def finish(result: dict) -> None:
    """Averages and differences to the dense row, in points."""
    dense = next((r for r in result["rows"] if r["kind"] == "dense"), None)
    for r in result["rows"]:
        scores = [r["scores"][t]["score"] for t in result["tasks"]]
        r["average"] = sum(scores) / len(scores)
        if dense is not None:
            r["delta"] = {t: r["scores"][t]["score"] - dense["scores"][t]["score"] for t in result["tasks"]}
            r["delta_average"] = r["average"] - dense["average"]


TASK_HEADERS = {"gsm8k": "GSM8K", "bbh": "BBH"}


def _fmt(v, spec=".2f", none="—") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Tables II/III's shape: a row per model, score per task, average, Δ vs dense (points),
    then the measured decode sparsity (rows not computed) and decode tokens/s."""
    tasks = result["tasks"]
    headers = ["row", *(TASK_HEADERS.get(t, t) for t in tasks), "average", "Δ vs dense",
               "decode sparsity", "decode tok/s"]
    rows = []
    for r in result["rows"]:
        st = r["stats"]
        delta = "—" if r["kind"] == "dense" else f"{r['delta_average']:+.2f}"
        rows.append([r["label"], *(_fmt(r["scores"][t]["score"]) for t in tasks), _fmt(r["average"]), delta,
                     _fmt(st.get("decode_sparsity"), ".3f"), _fmt(st.get("decode_tokens_per_s"), ".1f")])
    return headers, rows


def notes(result: dict) -> list[str]:
    n = {t: result["rows"][0]["scores"][t]["n"] for t in result["tasks"]}
    out = [f"samples: {', '.join(f'{TASK_HEADERS.get(t, t)} {v}' for t, v in n.items())}"
           f"{' (--limit ' + str(result['limit']) + ' per task)' if result['limit'] else ''}; "
           f"GSM8K: 8-shot CoT, strict match; BBH: 3-shot CoT, exact match, macro average over subtasks"]
    if result.get("max_gen_toks"):
        out.append(f"generations capped at {result['max_gen_toks']} tokens (the tasks' own: GSM8K 256, BBH 1024)")
    if result.get("dtype", "float32") != "float32":
        out.append(f"exports in {result['dtype']} (weights and activations; the SparseMLP op accumulates in float32)")
    if result.get("quantize"):
        out.append(f"exports block-quantized to {result['quantize']} (every linear layer; activations float32)"
                   + ("; the method@S rows stay float32" if any(r["kind"] == "method" for r in result["rows"])
                      else ""))
    out.append("decode sparsity: MLP rows not computed in decode steps, counted by the CPU kernel of the op library "
               "(— where it did not run: dense rows, function bodies, the CUDA kernel, or every answer from the "
               "cache); prefill is dense in every row")
    if any(r["kind"] == "random" for r in result["rows"]):
        out.append("random S fixed mask: the same random rows of each layer dropped at every position, prefill "
                   "too (a sparse export of zeroed weights)")
    if any(r["kind"] == "method" for r in result["rows"]):
        cal = result.get("calibration") or {}
        out.append(f"method@S rows: decoded on the NumPy reference model (float32, CPU; prefill dense, the method in "
                   f"decode steps), their tok/s is that model's, not comparable with the onnxruntime rows; decode "
                   f"sparsity there: down-projection inputs not computed; calibration {cal.get('prompts')} prompts "
                   f"from {cal.get('source')}, disjoint from the task documents")
    if any(r.get("method") == "random" for r in result["rows"]):
        out.append("random@S (per token): floor(S·k) rows drawn afresh for every token at every decode step, "
                   "seeded (the paper's control)")
    fresh = [r["stats"]["generations"] for r in result["rows"]]
    if any(f == 0 for f in fresh):
        out.append("rows whose answers all came from the cache have no speed or sparsity measured")
    return out


def accuracy_fields(eval_row: dict) -> dict:
    """The accuracy columns of one evaluated row, for the design-space tools' rows
    (``compare-methods --tasks``, ``sweep --tasks``): score per task, average and the
    differences to the dense row, in points."""
    return {"accuracy": {t: s["score"] for t, s in eval_row["scores"].items()},
            "accuracy_average": eval_row["average"], "accuracy_delta": eval_row.get("delta"),
            "accuracy_delta_average": eval_row.get("delta_average"), "accuracy_row": eval_row["label"]}


def accuracy_summary(result: dict, out) -> dict:
    """What the accuracy columns were measured on: tasks, samples, the dense row's scores and
    where the run's files are."""
    dense = result["rows"][0]
    return {"tasks": result["tasks"], "limit": result["limit"], "data_dir": result["data_dir"],
            "max_gen_toks": result["max_gen_toks"], "samples": {t: dense["scores"][t]["n"] for t in result["tasks"]},
            "dense": {"engine": dense["engine"], **accuracy_fields(dense)}, "calibration": result.get("calibration"),
            "eval_json": str(Path(out) / "eval.json")}


def merge_accuracy(result: dict, ev: dict, eval_key, row_key, out) -> None:
    """Each of a design-space tool's ``result['rows']`` gets the accuracy fields of the
    evaluated row with the same key (``eval_key(eval row) == row_key(row)``; ``eval_key`` gives
    None for rows not to match), and ``result['accuracy']`` the evaluation's summary."""
    by = {eval_key(r): r for r in ev["rows"]}
    for row in result["rows"]:
        row.update(accuracy_fields(by[row_key(row)]))
    result["accuracy"] = accuracy_summary(ev, out)


def check_task_arguments(tasks, data_dir, limit, calibration_file=None, max_calibration_prompts=None) -> list[str]:
    """``--tasks`` / ``--data-dir`` / ``--limit`` of a design-space tool, checked before its
    (slow) run, and with ``max_calibration_prompts`` its calibration prompts against the task
    documents: the task names."""
    from sparseinfer.methods.calibration import calibration_prompts, check_disjoint

    names = parse_tasks(tasks)
    root = check_data(data_dir, names)
    if limit is not None and limit <= 0:
        raise SparseInferError(f"--limit {limit}: expected a positive number of samples per task")
    if max_calibration_prompts is not None:
        prompts, _ = calibration_prompts(calibration_file, max_calibration_prompts)
        check_disjoint(prompts, task_documents(root, names), f"{', '.join(names)} documents")
    return names
