"""Activation-sparsity methods: which rows or channels of the gated MLP each decode step skips.

One module per method behind one interface (``base``: ``Method.prepare`` on calibration
data, ``select`` of a ``Plan`` per layer and token, ``cost``): the SparseInfer sign
predictor with α (``sign_predictor``), ``dense`` and the ``oracle`` (``baselines``), the
random control (``random_rows``), DejaVu (``dejavu``), TEAL (``teal``), CATS (``cats``),
activation-pattern clustering (``cluster``) and WiSparse (``wisparse``); ``registry`` names
them and runs any of them in the NumPy reference model (``MethodReference``).

Running methods on a checkpoint: ``model_runner`` (teacher-forced decodes on prompts),
``calibration`` (calibration prompts and each layer's MLP inputs on them),
``predictor_stats`` and ``quality`` (skip-set precision / recall, quality against dense),
``compare`` (every method side by side, latency simulated with ``sim``), ``alpha_sweep``
(α or target-sparsity sweeps) and ``pareto`` (the latency-quality front).
"""
from .base import Calibration, LayerInput, Method, MethodCost, Plan, run_mlp
from .calibration import collect_calibration
from .registry import (APPROXIMATE_METHODS, COMPARE_DEFAULT, COMPARE_DEFAULT_PARAMS, METHODS, MethodReference,
                       check_method_name, make_method, method_names, parse_method_list, parse_param_options)

__all__ = ["APPROXIMATE_METHODS", "COMPARE_DEFAULT", "COMPARE_DEFAULT_PARAMS", "METHODS", "Calibration", "LayerInput",
           "Method", "MethodCost", "MethodReference", "Plan", "check_method_name", "collect_calibration",
           "make_method", "method_names", "parse_method_list", "parse_param_options", "run_mlp"]
