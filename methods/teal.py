"""Training-free thresholding methods: TEAL and CATS.

* ``teal`` — Liu, Ponnusamy, Cai, Guo, Kim, Athiwaratkun: "Training-Free Activation
  Sparsity in Large Language Models" (TEAL, 2024). Magnitude thresholds on the inputs of
  the MLP's projections, per layer, calibrated from the calibration activations to the
  target sparsity: x's channels with ``|x_i| <= t_x`` are dropped for gate and up (input
  channel axis: columns of W_gate / W_up not read), and the down projection's input
  channels with ``|h3_j| <= t_h``. t is the target quantile of the calibration
  magnitudes (TEAL's histogram quantile). Simplification: one uniform sparsity for every
  projection input (TEAL's greedy per-layer allocation is not reproduced; WiSparse below
  allocates across blocks).
* ``cats`` — Lee, Lee, Zhang, Tiwari, Mirhoseini: "CATS: Contextually-Aware Thresholding
  for Sparsity in Large Language Models" (2024). The gate is computed densely; rows with
  ``|act(x W_gate^T)| <= t`` skip up and down; t is the target quantile of the calibration
  |h1|. ``threshold=VALUE`` fixes t (at 0 on a ReLU model it skips exactly the true zeros).
"""
from __future__ import annotations

import numpy as np

from .method_base import LayerInput, Method, MethodCost, Plan

_F32 = np.float32


def magnitude_threshold(values: np.ndarray, sparsity: float) -> float:
    """t such that a fraction ``sparsity`` of |values| is <= t (the calibration quantile)."""
    if sparsity <= 0:
        return -1.0                    # keep everything, zeros included
    return float(np.quantile(np.abs(np.asarray(values, dtype=np.float64)).ravel(), sparsity))


def _threshold_param(text):
    t = str(text).strip().lower()
    return "auto" if t == "auto" else float(t)


class Teal(Method):
    """TEAL (Liu et al. 2024): calibrated magnitude thresholds on the MLP's projection inputs."""

    name = "teal"
    paper = "Liu et al.: TEAL, Training-Free Activation Sparsity in LLMs (2024)"
    axis = "channels"
    needs_calibration = True
    quantile_threshold = True

    def prepare(self, weights, calibration, target):
        super().prepare(weights, calibration, target)
        self.t_x, self.t_h = [], []
        for i in range(self.shape.num_layers):
            x = calibration.xs[i]
            t_x = magnitude_threshold(x, self.target)
            xk = np.where(np.abs(x) > t_x, x, _F32(0))
            h3 = calibration.act(xk @ calibration.w(i, "gate").T) * (xk @ calibration.w(i, "up").T)
            self.t_x.append(t_x)
            self.t_h.append(magnitude_threshold(h3, self.target))

    def select(self, inp: LayerInput) -> Plan:
        i = inp.layer
        return Plan(x_keep=np.abs(inp.x) > self.t_x[i], h_threshold=self.t_h[i])

    def cost(self, shape) -> MethodCost:
        # one compare per input channel of gate/up and of down; two thresholds per layer
        return MethodCost(ops=float(shape.d + shape.k), unit="fp32_cuda", bytes_read=8.0, memory_bytes=8.0,
                          launches=0)


class Cats(Method):
    """CATS (Lee et al. 2024): threshold on |act(x W_gate^T)|, gate dense, up/down sparse."""

    name = "cats"
    paper = "Lee et al.: CATS, Contextually-Aware Thresholding for Sparsity (2024)"
    PARAMS = {"threshold": (_threshold_param, "auto",
                            "'auto' (target quantile of the calibration |h1|) or a fixed value")}

    @property
    def needs_calibration(self):
        return self.params["threshold"] == "auto"

    @property
    def exact_for_relu(self):
        return self.params["threshold"] == 0.0

    @property
    def quantile_threshold(self):
        return self.params["threshold"] == "auto"

    def prepare(self, weights, calibration, target):
        super().prepare(weights, calibration, target)
        if self.params["threshold"] == "auto":
            self.t = [magnitude_threshold(calibration.h1(i), self.target) for i in range(self.shape.num_layers)]
        else:
            self.t = [float(self.params["threshold"])] * self.shape.num_layers

    def select(self, inp: LayerInput) -> Plan:
        return Plan(gate_dense=True, h1_threshold=self.t[inp.layer])

    def cost(self, shape) -> MethodCost:
        # the compare against t is fused into the dense gate kernel: k compares, one float
        return MethodCost(ops=float(shape.k), unit="fp32_cuda", bytes_read=4.0, memory_bytes=4.0, launches=0)
