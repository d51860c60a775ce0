"""TEAL: training-free magnitude thresholds on the MLP's projection inputs.

Liu, Ponnusamy, Cai, Guo, Kim, Athiwaratkun: "Training-Free Activation Sparsity in Large
Language Models" (TEAL, 2024). Magnitude thresholds on the inputs of the MLP's projections,
per layer, calibrated from the calibration activations to the target sparsity: x's channels
with ``|x_i| <= t_x`` are dropped for gate and up (input channel axis: columns of W_gate /
W_up not read), and the down projection's input channels with ``|h3_j| <= t_h``. t is the
target quantile of the calibration magnitudes (TEAL's histogram quantile). Simplification:
one uniform sparsity for every projection input (TEAL's greedy per-layer allocation is not
reproduced; WiSparse, ``wisparse.py``, allocates across blocks).
"""
from __future__ import annotations

import numpy as np

from .base import LayerInput, Method, MethodCost, Plan, magnitude_threshold

_F32 = np.float32


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
