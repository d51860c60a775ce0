"""The activation-sparsity method interface: what every method sees, returns and costs.

A *method* (``Method``) decides, for one decode token and one layer, which parts of the
gated MLP ``(act(x W_gate^T) * (x W_up^T)) W_down^T`` to compute. It sees a
``LayerInput`` (the layer index, the MLP input x [d], the layer's weights, the activation
and, lazily, the full gate pre-activation z for methods that compute the gate densely or
that are upper bounds) and returns a ``Plan``:

* ``skip_rows`` bool [k]: neurons not computed (rows of W_gate, W_up and W_down^T), the
  *row* axis (SparseInfer, DejaVu, random, oracle, clustering);
* ``x_keep`` bool [d]: input channels kept for gate and up (columns of W_gate / W_up), and
  ``h_threshold`` / ``h_scale``: down-input channels kept where ``|h3| * h_scale >
  h_threshold``, the *channel* axis (TEAL, WiSparse);
* ``gate_dense`` with ``h1_threshold``: the gate computed for every row, then rows with
  ``|h1| <= h1_threshold`` skipped in up and down (CATS).

``run_mlp`` executes a plan. It computes the full products and masks them, so its output
equals the sparse computation (skipped rows contribute exact zeros) and, with nothing
skipped, the dense one bit for bit (the oracle on a ReLU model reproduces dense logits
exactly). On a model with exact zeros (relu / fatrelu), every method also gets *actual
sparsity* (the paper's +AS): a computed gate row whose h1 is zero skips up and down.

Each method also states its axis, whether it is exact for ReLU models (skips only true
zeros), whether it is an unrealisable upper bound, and its cost per layer and token
(``MethodCost``: operations with their unit, bytes read and its own memory), which the
latency simulator turns into time.

``Calibration`` holds each layer's MLP inputs on calibration prompts (dense prefill) and
the reference sets the statistics use: the true zeros of a ReLU model, or for a SiLU model
the ``floor(s * k)`` rows of smallest ``|h1|`` at target sparsity s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sparseinfer.reference.activations import Activation
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.mlp import MLPTrace

_F32 = np.float32
AXES = ("rows", "channels")


def check_sparsity(value, what: str = "sparsity") -> float:
    """A target sparsity in [0, 1), or a one-line error."""
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise SparseInferError(f"{what} {value!r} is not a number") from None
    if not (math.isfinite(s) and 0.0 <= s < 1.0):
        raise SparseInferError(f"{what} must be in [0, 1), got {value}")
    return s


def parse_sparsities(text) -> list[float]:
    """``0.5,0.7,0.9`` -> [0.5, 0.7, 0.9], each checked in [0, 1)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise SparseInferError("--sparsity is empty; give e.g. 0.5,0.7,0.9")
    return [check_sparsity(p) for p in parts]


def smallest_rows(values: np.ndarray, sparsity: float) -> np.ndarray:
    """Bool mask of the ``floor(sparsity * n)`` smallest entries of each row of ``values``
    (last axis), ties broken by index."""
    v = np.asarray(values)
    n = v.shape[-1]
    m = int(math.floor(sparsity * n + 1e-9))
    out = np.zeros(v.shape, dtype=bool)
    if m == 0:
        return out
    order = np.argsort(v, axis=-1, kind="stable")[..., :m]
    np.put_along_axis(out, order, True, axis=-1)
    return out


def magnitude_threshold(values: np.ndarray, sparsity: float) -> float:
    """t such that a fraction ``sparsity`` of |values| is <= t (the calibration quantile)."""
    if sparsity <= 0:
        return -1.0                    # keep everything, zeros included
    return float(np.quantile(np.abs(np.asarray(values, dtype=np.float64)).ravel(), sparsity))


def reference_zero(act: Activation, z: np.ndarray, sparsity: float) -> np.ndarray:
    """The set a skip decision is scored against: true zeros of act(z) for relu / fatrelu,
    the ``floor(sparsity * k)`` rows of smallest |act(z)| per token for SiLU."""
    h1 = act(z)
    if act.sparse_capable:
        return h1 == 0
    return smallest_rows(np.abs(h1), sparsity)


@dataclass
class MethodCost:
    """Per layer and token: predictor operations (in ``unit``: fp32_cuda / fp16_tensor /
    popc), bytes it reads, kernels it launches, and its resident memory in bytes."""

    ops: float = 0.0
    unit: str = "fp32_cuda"
    bytes_read: float = 0.0
    memory_bytes: float = 0.0
    launches: int = 0
    kind: str = "generic"        # sign | dejavu | generic: which latency ops describe it
    rank: int = 0                # DejaVu's r (kind dejavu)
    extra_popc_words: float = 0.0  # clustering: centroid comparisons after the sign predictor

    def to_dict(self) -> dict:
        return {"ops": self.ops, "unit": self.unit, "bytes_read": self.bytes_read,
                "memory_bytes": self.memory_bytes, "launches": self.launches}


@dataclass
class Plan:
    """What to compute in one MLP call (see the module docstring)."""

    skip_rows: np.ndarray | None = None
    x_keep: np.ndarray | None = None
    gate_dense: bool = False
    h1_threshold: float | None = None
    h_threshold: float | None = None
    h_scale: np.ndarray | None = None


class LayerInput:
    """One layer's view for a method: index, x [d] float32, weights (float32), activation;
    ``z`` (x W_gate^T, every row) is computed on first use."""

    def __init__(self, layer: int, x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
                 act: Activation, z: np.ndarray | None = None):
        self.layer, self.x, self.gate, self.up, self.down, self.act = layer, x, gate, up, down, act
        self._z = z

    @property
    def z(self) -> np.ndarray:
        if self._z is None:
            self._z = (self.x @ self.gate.T).astype(_F32)
        return self._z


@dataclass
class MethodTrace(MLPTrace):
    """An ``MLPTrace`` of one method call. ``predicted_zero`` is the method's skip set on the
    k axis (rows skipped, or for channel methods the down-input channels dropped);
    ``actual_zero`` is the reference set (true zeros, or smallest |h1| on SiLU). Bytes
    follow the axis: gate and up read ``x_kept`` columns of each computed row."""

    method: str = ""
    axis: str = "rows"
    x_kept: int = -1                 # input channels read by gate / up (d when dense)
    sparsity: float = 0.0            # the method's own decision on its axis
    predictor_ops: float = 0.0
    predictor_bytes: float = 0.0

    @property
    def predictor_xor_words(self) -> int:
        return 0

    @property
    def macs(self) -> dict:
        r = self.rows
        m = {"gate": r["gate"] * self.x_kept, "up": r["up"] * self.x_kept, "down": r["down"] * self.d}
        m["total"] = sum(m.values())
        return m

    @property
    def weight_bytes_read(self) -> dict:
        from sparseinfer.reference.dtypes import itemsize

        size = itemsize(self.weight_dtype)
        b = {step: n * size for step, n in self.macs.items() if step != "total"}
        b["predictor"] = self.predictor_bytes
        b["total"] = sum(b.values())
        return b


def run_mlp(plan: Plan, inp: LayerInput, target: float = 0.0, method: str = "", axis: str = "rows",
            cost: MethodCost | None = None, weight_dtype: str = "fp32", want_trace: bool = True):
    """Execute ``plan`` on one token: (out [d] float32, MethodTrace or None)."""
    act, x = inp.act, inp.x
    d, k = x.shape[0], inp.gate.shape[0]
    z_full = inp.z
    if plan.x_keep is None:
        xk, z, x_kept = x, z_full, d
    else:
        xk = np.where(plan.x_keep, x, _F32(0))
        z, x_kept = (xk @ inp.gate.T).astype(_F32), int(plan.x_keep.sum())
    h1 = act(z)
    everything = np.ones(k, dtype=bool)
    if plan.gate_dense:
        computed_gate = everything
        keep = everything if plan.h1_threshold is None else np.abs(h1) > plan.h1_threshold
        skip = ~keep
    else:
        skip = np.zeros(k, dtype=bool) if plan.skip_rows is None else np.asarray(plan.skip_rows, dtype=bool)
        keep = ~skip
        computed_gate = keep.copy()
    h1 = np.where(keep, h1, _F32(0))
    computed_up = keep & (h1 != 0) if act.sparse_capable else keep.copy()
    h3 = np.where(computed_up, h1 * (xk @ inp.up.T).astype(_F32), _F32(0))
    computed_down = computed_up
    dropped_h = None
    if plan.h_threshold is not None:
        score = np.abs(h3) if plan.h_scale is None else np.abs(h3) * plan.h_scale
        h_keep = score > plan.h_threshold
        dropped_h = ~h_keep
        h3 = np.where(h_keep, h3, _F32(0))
        computed_down = computed_up & h_keep
    out = (inp.down @ h3).astype(_F32)
    if not want_trace:
        return out, None
    if axis == "channels":
        s_x = 1.0 - x_kept / d
        s_h = float(dropped_h.mean()) if dropped_h is not None else 0.0
        sparsity = (2 * s_x + s_h) / 3
        predicted = dropped_h if dropped_h is not None else np.zeros(k, dtype=bool)
    else:
        sparsity = float(skip.mean())
        predicted = skip
    cost = cost or MethodCost()
    trace = MethodTrace(mode=method or "method", d=d, k=k, weight_dtype=weight_dtype, alpha_milli=0,
                        predicted_zero=predicted, actual_zero=reference_zero(act, z_full, target),
                        computed_gate=computed_gate, computed_up=computed_up, computed_down=computed_down.copy(),
                        method=method, axis=axis, x_kept=x_kept, sparsity=sparsity,
                        predictor_ops=cost.ops, predictor_bytes=cost.bytes_read)
    return out, trace


def _parse_bool(text) -> bool:
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


def parse_auto_or_float(text):
    """A threshold parameter: ``auto`` (calibrated to the target) or a number."""
    t = str(text).strip().lower()
    return "auto" if t == "auto" else float(t)


class Method:
    """Base class. Subclasses set the class attributes and implement ``select`` (and
    ``prepare`` / ``cost`` where they calibrate or cost something).

    ``PARAMS``: name -> (parser, default, help); parameters arrive as text or values.
    """

    name = ""
    paper = ""
    axis = "rows"
    exact_for_relu = False
    bound = False                    # an unrealisable upper bound (reads the true h1)
    needs_calibration = False
    # thresholds magnitudes at the target's quantile of calibration values: where a model has more
    # exact zeros than the target, the threshold is 0 and drops exactly those zeros
    quantile_threshold = False
    PARAMS: dict = {}

    def __init__(self, **params):
        self.params = {}
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            known = ", ".join(self.PARAMS) or "none"
            raise SparseInferError(f"method {self.name}: unknown parameter {unknown[0]!r} (known: {known})")
        for key, (parse, default, _) in self.PARAMS.items():
            value = params.get(key, default)
            if value is not None and key in params:
                try:
                    value = parse(value)
                except (TypeError, ValueError) as e:
                    raise SparseInferError(f"method {self.name}: parameter {key}={params[key]!r}: {e}") from None
            self.params[key] = value
        self.target = 0.0
        self.shape = None
        self.act = None

    # -- lifecycle ---------------------------------------------------------------------
    def prepare(self, weights, calibration: "Calibration | None", target: float) -> None:
        """Set up for ``target`` sparsity on a model (``reference.llama.LlamaWeights``)."""
        self.target = check_sparsity(target)
        self.shape = weights.shape
        self.act = weights.activation
        if self.needs_calibration and calibration is None:
            raise SparseInferError(f"method {self.name} needs calibration prompts")

    def select(self, inp: LayerInput) -> Plan:
        raise NotImplementedError

    def cost(self, shape) -> MethodCost:
        return MethodCost()

    def extra_stats(self) -> dict:
        """Method-specific statistics gathered while selecting (e.g. clustering precision)."""
        return {}

    def describe(self) -> dict:
        return {"method": self.name, "paper": self.paper, "axis": self.axis,
                "exact_for_relu": self.exact_for_relu, "bound": self.bound,
                "quantile_threshold": self.quantile_threshold,
                "params": {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                           for k, v in self.params.items()}}


class Calibration:
    """Each layer's MLP inputs on calibration prompts (dense prefill), with cached products.

    ``xs[l]``: [T, d] float32. ``z(l)`` = xs[l] W_gate^T, ``h2(l)`` = xs[l] W_up^T.
    """

    def __init__(self, weights, xs: list[np.ndarray], source: str = "", prompts: int = 0):
        if len(xs) != weights.shape.num_layers:
            raise SparseInferError(f"calibration has {len(xs)} layers, the model {weights.shape.num_layers}")
        if any(x.ndim != 2 or x.shape[0] == 0 for x in xs):
            raise SparseInferError("calibration needs at least one token per layer")
        self.weights = weights
        self.act = weights.activation
        self.xs = [np.ascontiguousarray(x, dtype=_F32) for x in xs]
        self.source = source
        self.prompts = prompts
        self._f32: dict = {}
        self._z: dict = {}
        self._h2: dict = {}

    @property
    def tokens(self) -> int:
        return int(self.xs[0].shape[0])

    def w(self, layer: int, name: str) -> np.ndarray:
        key = (layer, name)
        if key not in self._f32:
            self._f32[key] = np.ascontiguousarray(getattr(self.weights.layers[layer], name), dtype=_F32)
        return self._f32[key]

    def z(self, layer: int) -> np.ndarray:
        if layer not in self._z:
            self._z[layer] = (self.xs[layer] @ self.w(layer, "gate").T).astype(_F32)
        return self._z[layer]

    def h2(self, layer: int) -> np.ndarray:
        if layer not in self._h2:
            self._h2[layer] = (self.xs[layer] @ self.w(layer, "up").T).astype(_F32)
        return self._h2[layer]

    def h1(self, layer: int) -> np.ndarray:
        return self.act(self.z(layer))

    def reference_zero(self, layer: int, sparsity: float) -> np.ndarray:
        return reference_zero(self.act, self.z(layer), sparsity)

    def describe(self) -> dict:
        return {"source": self.source, "prompts": self.prompts, "tokens": self.tokens}


parse_bool = _parse_bool
