"""CATS: a threshold on the activated gate, the gate computed densely.

Lee, Lee, Zhang, Tiwari, Mirhoseini: "CATS: Contextually-Aware Thresholding for Sparsity in
Large Language Models" (2024). The gate is computed densely; rows with
``|act(x W_gate^T)| <= t`` skip up and down; t is the target quantile of the calibration
|h1|. ``threshold=VALUE`` fixes t (at 0 on a ReLU model it skips exactly the true zeros).
"""
from __future__ import annotations

from .base import LayerInput, Method, MethodCost, Plan, magnitude_threshold, parse_auto_or_float


class Cats(Method):
    """CATS (Lee et al. 2024): threshold on |act(x W_gate^T)|, gate dense, up/down sparse."""

    name = "cats"
    paper = "Lee et al.: CATS, Contextually-Aware Thresholding for Sparsity (2024)"
    PARAMS = {"threshold": (parse_auto_or_float, "auto",
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
