"""Registry of activation-sparsity methods and the reference model that runs any of them.

Methods (``METHODS``; each class names its paper in its docstring and ``paper``; one module
of this package per method):

====================  ========  ==================================================================
name                  axis      source
====================  ========  ==================================================================
``dense``             rows      nothing skipped (the quality reference)
``sparseinfer``       rows      SparseInfer sign predictor, α schedule or ``alpha=auto``
``oracle``            rows      true zeros (ReLU) / smallest |h1| (SiLU): upper bound
``random``            rows      the SparseInfer paper's random control
``dejavu``            rows      DejaVu / PowerInfer trained d→r→k predictor
``teal``              channels  TEAL magnitude thresholds on projection inputs
``cats``              rows      CATS threshold on |act(gate)|, gate dense
``wisparse``          channels  WiSparse (seed 004) weight-aware scores, searched budgets
``cluster``           rows      activation-pattern clustering (seed 003), sign-predicted centroid
``cluster-oracle``    rows      the same with the oracle centroid (upper bound)
====================  ========  ==================================================================

Parameters: ``make_method(name, {"key": "value"})``; on the command line
``--param NAME.KEY=VALUE`` (``parse_param_options``).

``MethodReference`` is ``reference.llama.LlamaReference`` whose decode MLPs run a method
(``base.run_mlp``); prefill stays dense, as in the paper.
"""
from __future__ import annotations

import numpy as np

from sparseinfer.reference.dtypes import dtype_name
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.llama import LlamaReference

from .base import LayerInput, Method, run_mlp
from .baselines import Dense, Oracle
from .cats import Cats
from .cluster import Cluster, ClusterOracle
from .dejavu import DejaVu
from .random_rows import RandomRows
from .sign_predictor import SparseInfer
from .teal import Teal
from .wisparse import WiSparse

METHODS = {cls.name: cls for cls in (Dense, SparseInfer, Oracle, RandomRows, DejaVu, Teal, Cats, WiSparse, Cluster,
                                     ClusterOracle)}
DEFAULT_METHOD = "sparseinfer"       # the sign predictor: what runs unless --method names another
DEFAULT_METHOD_SPARSITY = "0.9"      # a method's target sparsity unless told
COMPARE_DEFAULT = ("sparseinfer", "oracle", "random", "dejavu", "teal", "cats", "wisparse", "cluster",
                   "cluster-oracle")
# compare-methods aims every method at each target: the sign predictor's α is calibrated per
# layer to it unless --param sparseinfer.alpha=SCHEDULE says otherwise
COMPARE_DEFAULT_PARAMS = {"sparseinfer": {"alpha": "auto"}}
APPROXIMATE_METHODS = ("sparseinfer", "cluster")   # methods that take approximate=true on SiLU


def method_names() -> list[str]:
    return list(METHODS)


def check_method_name(name: str) -> str:
    n = str(name).strip().lower()
    if n not in METHODS:
        raise SparseInferError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return n


def parse_method_list(text) -> list[str]:
    names = [check_method_name(p) for p in str(text).split(",") if p.strip()]
    if not names:
        raise SparseInferError("--methods is empty; give e.g. sparseinfer,teal,cats")
    if len(set(names)) != len(names):
        raise SparseInferError(f"--methods names a method twice: {text}")
    return names


def parse_param_options(options) -> dict[str, dict[str, str]]:
    """``("dejavu.rank=64", "sparseinfer.alpha=1.03@0-19,1.00")`` -> {method: {key: value}}."""
    out: dict[str, dict[str, str]] = {}
    for opt in options or ():
        head, eq, value = str(opt).partition("=")
        method, dot, key = head.strip().partition(".")
        if not (eq and dot and key.strip()):
            raise SparseInferError(f"--param {opt!r}: use METHOD.KEY=VALUE, e.g. dejavu.rank=64")
        method = check_method_name(method)
        out.setdefault(method, {})[key.strip()] = value.strip()
    return out


def make_method(name: str, params: dict | None = None, approximate: bool = False) -> Method:
    """A method instance; ``approximate`` sets approximate=true where the method takes it."""
    cls = METHODS[check_method_name(name)]
    params = dict(params or {})
    if approximate and "approximate" in cls.PARAMS:
        params.setdefault("approximate", "true")
    return cls(**params)


class MethodReference(LlamaReference):
    """The NumPy reference Llama whose decode MLPs run ``method`` (already prepared)."""

    def __init__(self, weights, method: Method, target: float = 0.0):
        super().__init__(weights, sparse=False)
        self.method = method
        self.target = float(target)
        self.cost = method.cost(weights.shape)
        self.weight_dtype = dtype_name(weights.layers[0].gate.dtype)
        self._w32 = [None] * self.shape.num_layers

    def _weights32(self, i: int):
        if self._w32[i] is None:
            lw = self.w.layers[i]
            self._w32[i] = tuple(np.ascontiguousarray(getattr(lw, n), dtype=np.float32) for n in ("gate", "up", "down"))
        return self._w32[i]

    def _mlp_token(self, i: int, x: np.ndarray, want_trace: bool):
        gate, up, down = self._weights32(i)
        inp = LayerInput(i, np.asarray(x, dtype=np.float32), gate, up, down, self.act)
        plan = self.method.select(inp)
        return run_mlp(plan, inp, self.target, self.method.name, self.method.axis, self.cost, self.weight_dtype,
                       want_trace)
