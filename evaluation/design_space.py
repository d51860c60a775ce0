"""The runs behind the design-space commands: ``predictor-stats`` (per-layer precision /
recall, paper Fig. 3), ``sweep`` (latency against sparsity and quality, per α or per target
sparsity of a method) and ``compare-methods`` (every method side by side). Each returns the
command's JSON result; the setup they share is ``traced_runs``.
"""
from __future__ import annotations

import sys
from pathlib import Path

from sparseinfer.reference.alpha import DEFAULT_ALPHA
from sparseinfer.reference.errors import SparseInferError

from .traced_runs import (add_accuracy, lm_eval_runner, method_calibration, method_from_options, open_runner,
                          ort_settings)


def alpha_label(data: dict) -> str:
    """A predictor-stats result's α, or what ran instead of the sign predictor at α."""
    if "method" in data:
        return f"n/a ({data['method']}, target sparsity {data['sparsity']:g})"
    return data["alpha"]


def predictor_stats_run(checkpoint, *, prompts_file, alpha, max_prompts, max_new_tokens, method_name, sparsity,
                        params, approximate, calibration_file, provider, export_dir, threads, mlp_kernels,
                        plot_file=None, log=None) -> dict:
    """Per-layer precision / recall of the predicted zero rows on real prompts: the sign
    predictor at ``alpha``, or the method the options name (``traced_runs.method_from_options``),
    with a Fig. 3-style PNG at ``plot_file``."""
    from sparseinfer.methods.predictor_stats import per_layer_stats, summary

    method = method_from_options(method_name, sparsity, params, approximate, calibration_file, single=True)
    ort = ort_settings(provider, export_dir, threads, mlp_kernels, method)
    runner = open_runner(checkpoint, prompts_file, max_prompts, max_new_tokens, log, ort,
                         needs_exact_zeros=method is None)
    if method is None:
        _, traces = runner.sparse(alpha)
    else:
        targets, calibration = method_calibration(runner, sparsity, calibration_file, prompts_file, max_prompts, log)
        method.prepare(runner.weights, calibration, targets[0])
        _, traces = runner.run_method(method, targets[0])
    stats = per_layer_stats(traces)
    data = {"checkpoint": str(checkpoint), "model": runner.shape.name, "alpha": str(alpha),
            "tokens": len(traces), "layers": [s.to_dict() for s in stats], "mean": summary(stats),
            "engine": f"onnxruntime {provider}" if ort else "numpy reference"}
    if method is not None:
        data.update({"method": method.name, "sparsity": targets[0], "params": method.describe()["params"]})
        del data["alpha"]
    if plot_file:
        from sparseinfer.sim.plots import plot_precision_recall

        plot_precision_recall(data["layers"], plot_file, f"{runner.shape.name}, alpha {alpha_label(data)}")
    return data


def is_method_sweep(result: dict) -> bool:
    """A sweep over a method's target sparsities (an α sweep names its swept layers)."""
    return "layers" not in result


def sweep_run(checkpoint, *, alpha_range, layers, hw, hw_file, prompts_file, max_prompts, max_new_tokens, method_name,
              sparsity, params, approximate, calibration_file, provider, export_dir, threads, mlp_kernels, tasks,
              limit, data_dir, max_gen_toks, eval_out, plot_file=None, log=None, progress=None) -> dict:
    """The α sweep (α over ``alpha_range`` on ``layers``), or with a --method its sweep over
    the target sparsities; ``hw``: the platform's name or TOML file; with ``tasks``, each row's
    accuracy through ``sparseinfer eval``. ``progress(done, total, row)`` after each row."""
    from sparseinfer.methods import alpha_sweep
    from sparseinfer.methods.calibration import DEFAULT_CALIBRATION_PROMPTS
    from sparseinfer.sim.hardware import load_hardware

    method = method_from_options(method_name, sparsity, params, approximate, calibration_file, single=False)
    ort = ort_settings(provider, export_dir, threads, mlp_kernels, method)
    if tasks:
        lm_eval_runner().check_task_arguments(tasks, data_dir, limit, calibration_file,
                                              DEFAULT_CALIBRATION_PROMPTS if method is not None else None)
    evaluation = {"tasks": tasks, "limit": limit, "data_dir": data_dir, "max_gen_toks": max_gen_toks,
                  "out": eval_out, "log": log, "progress": False}
    if method is not None:
        spec = load_hardware(hw_file or hw)
        runner = open_runner(checkpoint, prompts_file, max_prompts, max_new_tokens, log)
        targets, calibration = method_calibration(runner, sparsity, calibration_file, prompts_file, max_prompts, log)
        result = alpha_sweep.run_method_sweep(runner, method, calibration, targets, spec, progress=progress)
        if tasks:
            from sparseinfer.methods.registry import DEFAULT_METHOD, parse_param_options

            given = parse_param_options(params).get(method.name, {})
            if method.name == DEFAULT_METHOD:          # as traced_runs.method_from_options
                given.setdefault("alpha", "auto" if sparsity is not None else DEFAULT_ALPHA)
            ev = lm_eval_runner().run_eval(checkpoint, methods=[f"{method.name}@{s:g}" for s in targets],
                                           params={method.name: given}, approximate=approximate,
                                           calibration_file=calibration_file, **evaluation)
            add_accuracy(result, ev, lambda r: r["sparsity"] if r["kind"] == "method" else None,
                         lambda r: r["sparsity"], eval_out)
        return result
    alphas = alpha_sweep.parse_alpha_range(alpha_range)
    # --layers syntax is checked before the (slow) checkpoint load: no layer bound yet, so
    # only a malformed range fails here; the bound is checked once the layer count is known
    alpha_sweep.parse_layers(layers, sys.maxsize)
    spec = load_hardware(hw_file or hw)
    runner = open_runner(checkpoint, prompts_file, max_prompts, max_new_tokens, log, ort, needs_exact_zeros=True)
    span = alpha_sweep.parse_layers(layers, runner.shape.num_layers)
    result = alpha_sweep.run_sweep(runner, alphas, span, spec, progress=progress)
    result["engine"] = f"onnxruntime {provider}" if ort else "numpy reference"
    if tasks:
        ev = lm_eval_runner().run_eval(checkpoint, alphas=[r["schedule"] for r in result["rows"]],
                                       provider=provider or "cpu", threads=threads, mlp_kernels=mlp_kernels,
                                       **evaluation)
        add_accuracy(result, ev, lambda r: r["alpha"] if r["kind"] == "sparse" else None,
                     lambda r: r["schedule"], eval_out)
    if plot_file:
        from sparseinfer.sim.plots import plot_sweep

        if tasks:            # accuracy against latency, the front on (latency, accuracy)
            plot_sweep({**result, "rows": [{**r, "pareto": r["pareto_accuracy"]} for r in result["rows"]]},
                       plot_file, quality_key="accuracy_average")
        else:
            plot_sweep(result, plot_file)
    return result


def compare_methods_run(checkpoint, *, methods_text, sparsity_text, params, approximate, calibration_file,
                        max_calibration_prompts, prompts_file, max_prompts, max_new_tokens, hw, hw_file, sim_model,
                        tasks, limit, data_dir, max_gen_toks, eval_out, plot_file=None, out_file=None, log=None,
                        progress=None) -> dict:
    """Every method of ``methods_text`` (default: ``registry.COMPARE_DEFAULT``) at each target
    of ``sparsity_text`` on the checkpoint (``methods.compare.compare_methods``), latency on
    the platform ``hw`` (``hw_file`` first) at the shape ``sim_model``; with ``tasks``, the
    accuracy columns through ``sparseinfer eval``. Written to ``out_file`` and drawn at
    ``plot_file``. Every argument is checked before the (slow) checkpoint load."""
    from sparseinfer.methods.base import parse_sparsities
    from sparseinfer.methods.calibration import load_calibration
    from sparseinfer.methods.compare import compare_methods, plot_pareto
    from sparseinfer.methods.model_runner import read_prompts
    from sparseinfer.methods.registry import COMPARE_DEFAULT, make_method, parse_method_list, parse_param_options
    from sparseinfer.reference.files import write_json
    from sparseinfer.reference.shapes import load_model
    from sparseinfer.sim.hardware import load_hardware

    names = parse_method_list(methods_text) if methods_text else list(COMPARE_DEFAULT)
    targets = parse_sparsities(sparsity_text)
    by_method = parse_param_options(params)
    for name in by_method:
        if name not in names:
            raise SparseInferError(f"--param names {name}, which is not in --methods")
    for name in names:                       # parameter names and values, checked before the load
        make_method(name, by_method.get(name), approximate)
    if calibration_file and not Path(calibration_file).is_file():
        raise SparseInferError(f"no such calibration file: {calibration_file}")
    for path, what in ((plot_file, "plot"), (out_file, "output")):
        if path and not Path(path).parent.is_dir():
            raise SparseInferError(f"no such directory for the {what}: {Path(path).parent}")
    if plot_file and Path(plot_file).suffix.lower() != ".png":
        raise SparseInferError(f"plot file must end in .png, got {Path(plot_file).name}")
    spec = load_hardware(hw_file or hw)
    sim_shape = load_model(sim_model) if sim_model else None
    evaluation_prompts = read_prompts(prompts_file, max_prompts)
    if tasks:
        lm_eval_runner().check_task_arguments(tasks, data_dir, limit, calibration_file, max_calibration_prompts)

    from sparseinfer.methods.model_runner import ReferenceRunner
    from sparseinfer.model_export.loaders import load_checkpoint

    ck = load_checkpoint(checkpoint)
    calibration = load_calibration(ck, calibration_file, max_calibration_prompts, evaluation_prompts, log)
    runner = ReferenceRunner(ck, evaluation_prompts, max_new_tokens, log)
    result = compare_methods(runner, calibration, names, targets, spec, by_method, approximate,
                             sim_model=sim_shape, progress=progress)
    result["checkpoint"] = str(checkpoint)
    if tasks:
        lm_eval = lm_eval_runner()
        ev = lm_eval.run_eval(checkpoint, tasks, methods=[f"{n}@{s:g}" for s in targets for n in names],
                              params=by_method, approximate=approximate, calibration_file=calibration_file,
                              max_calibration_prompts=max_calibration_prompts, limit=limit, data_dir=data_dir,
                              out=eval_out, max_gen_toks=max_gen_toks, progress=False, log=log)
        lm_eval.merge_accuracy(result, ev, lambda r: (r["method"], r["sparsity"]) if r["kind"] == "method" else None,
                               lambda r: (r["method"], r["target_sparsity"]), eval_out)
    if out_file:
        write_json(out_file, result)
    if plot_file:
        plot_pareto(result, plot_file)
    return result
