"""What the design-space tools (``predictor-stats``, ``sweep``, ``compare-methods``) set up
before they run: the checkpoint decoded on prompts, the sparsity method their options name,
its calibration, and the lm-eval runner for their accuracy columns.

Every argument is checked before the slow checkpoint load. The runner decodes the prompts
densely on the NumPy reference model (``methods.model_runner.ReferenceRunner``) or, with a
provider, on onnxruntime exports with debug outputs (``ort_runner.OrtRunner``).
"""
from __future__ import annotations

from pathlib import Path

from sparseinfer.methods.model_runner import DEFAULT_DECODE_STEPS, DEFAULT_MAX_PROMPTS
from sparseinfer.methods.registry import DEFAULT_METHOD, DEFAULT_METHOD_SPARSITY
from sparseinfer.reference.errors import SparseInferError


def lm_eval_runner(what: str = "--tasks"):
    """``evaluation.runner``, or a one-line error naming the missing extra that ``what`` needs."""
    try:
        from . import runner
    except ImportError as e:
        raise SparseInferError(f"{what} needs lm-eval ({e.name} missing): pip install 'sparseinfer[eval]'") from None
    return runner


def open_runner(checkpoint_path, prompts_file=None, max_prompts: int = DEFAULT_MAX_PROMPTS,
                max_new_tokens: int = DEFAULT_DECODE_STEPS, progress=None, ort=None, needs_exact_zeros: bool = False):
    """Load the checkpoint and read the prompts first, then run the dense greedy decodes
    (``methods.model_runner.ReferenceRunner``). ``ort``: {provider, export_dir, threads,
    mlp_kernels} (``ort_settings``) to run onnxruntime debug exports instead
    (``ort_runner.OrtRunner``). ``needs_exact_zeros``: the run uses the sign predictor at
    --alpha (``require_exact_zeros``)."""
    from sparseinfer.methods.model_runner import ReferenceRunner, read_prompts

    prompts = read_prompts(prompts_file, max_prompts)
    if ort and ort.get("provider"):
        from .ort_runner import OrtRunner

        runner = OrtRunner(checkpoint_path, prompts, max_new_tokens, progress=progress, **ort)
        if needs_exact_zeros:
            require_exact_zeros(runner.checkpoint, "drop --provider and pass --approximate")
        return runner
    from sparseinfer.model_export.loaders import load_checkpoint

    checkpoint = load_checkpoint(checkpoint_path)
    if needs_exact_zeros:                                 # before the dense decodes
        require_exact_zeros(checkpoint, "pass --approximate")
    return ReferenceRunner(checkpoint, prompts, max_new_tokens, progress)


def require_exact_zeros(checkpoint, remedy: str) -> None:
    """The sign predictor at --alpha skips the rows whose activation is exactly zero; on an
    activation without exact zeros (SiLU, GELU) it runs only as an approximation, which
    --approximate asks for: one line naming the activation and the option."""
    act = checkpoint.weights.activation
    if not act.sparse_capable:
        raise SparseInferError(f"{checkpoint.source}: activation {act} has no exact zeros, so the sign predictor "
                               f"at --alpha cannot skip rows exactly; {remedy} (rows predicted negative taken as "
                               f"zero)")


def ort_settings(provider, export_dir, threads, mlp_kernels, method) -> dict | None:
    """``open_runner``'s ``ort``: None without a provider; the sign predictor only."""
    if provider is None:
        return None
    if method is not None:
        raise SparseInferError(f"--provider runs the sign predictor (--alpha) only; --method {method.name} "
                               "needs the NumPy reference model (drop --provider)")
    return {"provider": provider, "export_dir": export_dir, "threads": threads, "mlp_kernels": mlp_kernels}


def method_from_options(method_name, sparsity, params, approximate, calibration_file, single: bool):
    """The --method's instance, or None for the default: the sign predictor run by --alpha
    (the default method with no --param, --approximate or --sparsity). With --sparsity the
    sign predictor calibrates α to it (alpha=auto). ``single``: one target sparsity only."""
    from sparseinfer.methods.base import parse_sparsities
    from sparseinfer.methods.registry import check_method_name, make_method, parse_param_options

    name = check_method_name(method_name)
    by_method = parse_param_options(params)
    if sparsity is not None:
        targets = parse_sparsities(sparsity)
        if single and len(targets) != 1:
            raise SparseInferError(f"Invalid value for --sparsity: one target sparsity, got {sparsity}")
    if calibration_file and not Path(calibration_file).is_file():
        raise SparseInferError(f"no such calibration file: {calibration_file}")
    if name == DEFAULT_METHOD and not by_method and not approximate and sparsity is None:
        return None
    if name == DEFAULT_METHOD and sparsity is not None and "alpha" not in by_method.get(name, {}):
        by_method.setdefault(name, {})["alpha"] = "auto"
    unused = sorted(set(by_method) - {name})
    if unused:
        raise SparseInferError(f"Invalid value for --param: --param names {unused[0]}, but --method is {name}")
    return make_method(name, by_method.get(name), approximate)


def method_calibration(runner, sparsity, calibration_file, prompts_file, max_prompts, log=None):
    """(targets, calibration): the --sparsity targets (default ``DEFAULT_METHOD_SPARSITY``) and
    the calibration over the calibration prompts, disjoint from the evaluation ones."""
    from sparseinfer.methods.base import parse_sparsities
    from sparseinfer.methods.calibration import DEFAULT_CALIBRATION_PROMPTS, load_calibration
    from sparseinfer.methods.model_runner import read_prompts

    targets = parse_sparsities(sparsity if sparsity is not None else DEFAULT_METHOD_SPARSITY)
    calibration = load_calibration(runner.checkpoint, calibration_file, DEFAULT_CALIBRATION_PROMPTS,
                                   read_prompts(prompts_file, max_prompts), log)
    return targets, calibration


def add_accuracy(result: dict, ev: dict, eval_key, row_key, eval_out) -> None:
    """Each sweep row's accuracy columns (``runner.merge_accuracy``); ``pareto_accuracy`` marks
    the front of (latency, accuracy)."""
    from sparseinfer.methods.pareto import pareto_front

    lm_eval_runner().merge_accuracy(result, ev, eval_key, row_key, eval_out)
    front = pareto_front([{"latency_ms": r["latency_ms"], "loss": -r["accuracy_average"]} for r in result["rows"]],
                         "latency_ms", "loss")
    for i, row in enumerate(result["rows"]):
        row["pareto_accuracy"] = i in front
