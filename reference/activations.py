"""Gate activations, bit-exact definitions shared with the kernels.

* ``relu``:            h1 = z if z > 0 else +0.0
* ``fatrelu:T``:       h1 = z if z >= float32(T) else +0.0 (ProSparse's FATReLU keeps z at
                       the threshold; ``hidden_act_param`` in the HF config, 0.01 for
                       ProSparse-Llama2)
* ``silu``:            z * sigmoid(z), dense baselines only (exp is not part of the
                       bit-exact contract, and SiLU is never exactly zero).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import SparseInferError

KINDS = ("relu", "fatrelu", "silu")


@dataclass(frozen=True)
class Activation:
    kind: str
    threshold: float = 0.0

    @classmethod
    def parse(cls, spec, threshold: float | None = None) -> "Activation":
        """From ``Activation``, ``"relu"``, ``"silu"``, ``"fatrelu:0.01"`` or ``("fatrelu", threshold=0.01)``."""
        if isinstance(spec, Activation):
            return spec
        kind, _, param = str(spec).strip().lower().partition(":")
        if kind not in KINDS:
            raise SparseInferError(f"unknown activation {spec!r}; expected relu, fatrelu:THRESHOLD or silu")
        if kind == "fatrelu":
            if param:
                try:
                    threshold = float(param)
                except ValueError:
                    raise SparseInferError(f"fatrelu threshold {param!r} is not a number") from None
            if threshold is None:
                raise SparseInferError("fatrelu needs a threshold, e.g. 'fatrelu:0.01'")
            if not np.isfinite(threshold):
                raise SparseInferError(f"fatrelu threshold must be finite, got {threshold}")
            return cls("fatrelu", float(np.float32(threshold)))
        if param or (threshold not in (None, 0, 0.0)):
            raise SparseInferError(f"activation {kind} takes no threshold")
        return cls(kind, 0.0)

    @property
    def sparse_capable(self) -> bool:
        """True where the activation outputs exact zeros (relu, fatrelu)."""
        return self.kind != "silu"

    def __call__(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=np.float32)
        if self.kind == "relu":
            return np.where(z > 0, z, np.float32(0))
        if self.kind == "fatrelu":
            return np.where(z >= np.float32(self.threshold), z, np.float32(0))
        with np.errstate(over="ignore"):
            return (z / (np.float32(1) + np.exp(-z))).astype(np.float32)

    def __str__(self) -> str:
        return f"fatrelu:{self.threshold:g}" if self.kind == "fatrelu" else self.kind
