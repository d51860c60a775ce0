"""Gate activations, bit-exact definitions shared with the kernels.

* ``relu``:            h1 = z if z > 0 else +0.0
* ``fatrelu:T``:       h1 = z if z >= float32(T) else +0.0 (ProSparse's FATReLU keeps z at
                       the threshold; ``hidden_act_param`` in the HF config, 0.01 for
                       ProSparse-Llama2)
* ``silu``:            z * sigmoid(z) (Llama 3, Mistral, Qwen, SmolLM; HF ``silu``)
* ``gelu``:            0.5 * z * (1 + erf(z / sqrt 2)) (HF ``gelu``)
* ``gelu_tanh``:       0.5 * z * (1 + tanh(sqrt(2/pi) * (z + 0.044715 z^3))) (HF
                       ``gelu_pytorch_tanh`` and ``gelu_new``, Gemma's)

The last three are never exactly zero (``sparse_capable`` is False): the sign predictor
runs on them only as an approximation (``approximate``: a row predicted negative is taken
as zero). Their float32 evaluation is defined here step by step, with every product and sum
rounded separately (no FMA, no division) and no library ``exp``/``erf``: the CUDA kernels
and the op library's CPU kernel compute it from one C/C++ text, ``kernels/cuda/activation.h``
(``activate``), which gets this module's bits (tests/test_activation_header.py), so they are
inside the bit-exact contract like relu. The ONNX
function bodies use onnxruntime's ``Sigmoid`` and ``Erf`` instead and are held to
``Activation.error_bound``.

The algorithm (u: float32 unit roundoff 2^-24):

* ``exp_nonpositive(x)``, x <= 0: 0 below -104; else n = round(x log2 e) (the 1.5 * 2^23
  trick), r = (x - n LN2_HI) - n LN2_LO (LN2_HI has 15 significant bits, so n LN2_HI and
  the first difference are exact), e^r by its Taylor polynomial of degree 7 in Horner form
  (|r| <= 0.35: truncation < 0.1 ulp), times 2^n (two steps where 2^n is subnormal).
* no division (on a GPU a correctly rounded one is a sequence of FMAs): 1 / w, w in
  [0.5, 2.6], is ``recip``: a linear guess and 5 Newton steps.
* ``z * sigmoid(y)``: y >= 0: z / (1 + exp(-y)); y < 0: e = exp(y), (z e) / (1 + e). No
  argument of exp is positive, so nothing overflows. silu is z * sigmoid(z); gelu_tanh,
  since 0.5 (1 + tanh(v)) = sigmoid(2 v), is z * sigmoid(z (K1 + K2 z^2)) with
  K1 = 2 sqrt(2/pi), K2 = 0.044715 K1.
* gelu: q = 1 + erf(t), t = z / sqrt 2, then h1 = (0.5 z) q. With a = |z| and v = a / sqrt 2:
  v < 0.75: erf(v) = v P_A(v^2) (Taylor, 10 terms), q = 1 -+ erf(v); v >= 0.75: erfc(v) =
  exp(-a^2 / 2) F(v), q = erfc(v) for z < 0 (no cancellation) and 2 - erfc(v) for z >= 0;
  exp(-a^2 / 2) as exp(-hi^2 / 2) exp(-lo (a + hi) / 2) with a = hi + lo split exactly
  (Dekker: hi has 12 bits, so hi^2 is exact and the argument's rounding error stays
  relative to the small part); F(v) = e^(v^2) erfc(v) is P_B(v - 1.625) on [0.75, 2.5) and
  P_C(s) s, s = 1/v = recip(v / 4) / 4, on [2.5, 10.1) (least-squares fits on Chebyshev
  nodes, relative error < 3e-8 with float32 coefficients); from 10.1 on erfc(v) is 0 in
  float32.

Against float64, h1 is within ``OWN_ERROR_UNITS`` u |z| (+ ``SUBNORMAL_ERROR``) of the
exact value; exp and recip alone within 2 ulp.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import SparseInferError

KINDS = ("relu", "fatrelu", "silu", "gelu", "gelu_tanh")   # activation.h's ACT_* codes are the indices
EXACT_ZERO_KINDS = ("relu", "fatrelu")
APPROXIMATE_KINDS = tuple(k for k in KINDS if k not in EXACT_ZERO_KINDS)   # sparse only as an approximation
# Hugging Face ``hidden_act`` names of a kind, beside the kind's own name; the first is the
# one written into configs.
HF_NAMES = {"gelu_tanh": ("gelu_pytorch_tanh", "gelu_new")}

U = 2.0 ** -24                  # float32 unit roundoff
# |h1 - exact| <= OWN_ERROR_UNITS u |z| for this module's float32 algorithm (measured: at
# most 2.65 u |z| over 2.6 million z in [-20, 20] and +-e^[-100, 4]; tests/test_activations_gelu.py
# checks a sample); a library evaluation of the same function (onnxruntime's Sigmoid / Erf
# and the products around them: measured at most 3.4 u |z| on the CPU provider; CUDA's
# expf / erff are documented within 2 ulp) is assumed within LIBRARY_ERROR_UNITS u |z|.
OWN_ERROR_UNITS = 4
LIBRARY_ERROR_UNITS = 8
SUBNORMAL_ERROR = 2.0 ** -148   # where z or h1 is subnormal: two roundings of the smallest step

_F = np.float32
_LN2_HI, _LN2_LO, _LOG2E = _F(0.693145752), _F(1.42860677e-06), _F(1.44269502)
_ROUND = _F(12582912.0)         # 1.5 * 2^23: (x + _ROUND) - _ROUND rounds x to an integer
_EXP_TAYLOR = tuple(_F(c) for c in (1.0, 1.0, 0.5, 0.166666672, 0.0416666679, 0.00833333377, 0.00138888892,
                                    0.000198412701))
INV_SQRT2 = _F(0.707106769)
GELU_TANH_K1, GELU_TANH_K2 = _F(1.59576917), _F(0.0713548139)
_ERF_A = tuple(_F(c) for c in (1.12837923, -0.376126379, 0.112837918, -0.0268661715, 0.00522397785,
                               -0.000854832702, 0.000120553326, -1.49256502e-05, 1.64621144e-06, -1.63658441e-07))
_ERFC_B = tuple(_F(c) for c in (0.302261204, -0.146030247, 0.0649620891, -0.026977513, 0.0105612651,
                                -0.00392907206, 0.00139501656, -0.000466224708, 0.000152627908, -5.98844708e-05,
                                1.84624841e-05))
_ERFC_C = tuple(_F(c) for c in (0.564191163, -6.97239957e-05, -0.280794591, -0.0131913386, 0.500216901, -0.236754,
                                -0.924873114, 1.55624056, -0.79137522))
_B_CENTER, _A_END, _B_END, _C_END = _F(1.625), _F(0.75), _F(2.5), _F(10.1)
_RECIP_A, _RECIP_B = _F(1.41176474), _F(0.470588237)   # 24/17, 8/17
_SPLIT = _F(4097.0)             # 2^12 + 1: Dekker's split into 12 + 12 bits
ERF_CONSTANTS = {"A": _ERF_A, "B": _ERFC_B, "C": _ERFC_C}          # checked against the C++ / CUDA text


def _horner(coeffs, x):
    acc = np.full_like(x, coeffs[-1])
    for c in coeffs[-2::-1]:
        acc = acc * x + c
    return acc


def exp_nonpositive(x: np.ndarray) -> np.ndarray:
    """e^x in float32 for x <= 0 (the module docstring's algorithm)."""
    x = np.asarray(x, dtype=_F)
    n = (x * _LOG2E + _ROUND) - _ROUND
    with np.errstate(invalid="ignore"):                # x = -inf: 0 below
        r = (x - n * _LN2_HI) - n * _LN2_LO
        ni = np.clip(n, -150, 0).astype(np.int32)
    p = _horner(_EXP_TAYLOR, r)
    big = ni < -100                                    # 2^n subnormal: p 2^(n + 50) 2^-50
    scale = ((np.where(big, ni + 50, ni) + 127).astype(np.uint32) << 23).view(_F)
    y = p * scale
    y = np.where(big, y * _F(2.0 ** -50), y)
    return np.where(x < _F(-104.0), _F(0), y).astype(_F)


def recip(w: np.ndarray) -> np.ndarray:
    """1 / w in float32 for w in [0.5, 2.6]: the guess 24/17 - 8/17 w, then 5 Newton steps
    r + r (1 - w r) (relative error 0.51 at worst, squared by each step)."""
    r = _RECIP_A - _RECIP_B * w
    for _ in range(5):
        r = r + r * (_F(1) - w * r)
    return r


def z_sigmoid(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """z * sigmoid(y) in float32: y >= 0: z / (1 + e^-y); y < 0: (z e^y) / (1 + e^y)."""
    pos = y >= 0
    e = exp_nonpositive(np.where(pos, -y, y))
    r = recip(_F(1) + e)
    return np.where(pos, z * r, (z * e) * r).astype(_F)


def _exp_neg_half_square(a: np.ndarray) -> np.ndarray:
    """e^(-a^2 / 2) for 0 <= a < 15, the square split so that its rounding stays small."""
    c = a * _SPLIT
    hi = c - (c - a)
    lo = a - hi
    return exp_nonpositive(-_F(0.5) * (hi * hi)) * exp_nonpositive(-_F(0.5) * (lo * (a + hi)))


def gelu_q(z: np.ndarray) -> np.ndarray:
    """1 + erf(z / sqrt 2) in float32, in [0, 2]."""
    a = np.abs(z)
    v = a * INV_SQRT2
    neg = z < 0
    erf_small = v * _horner(_ERF_A, v * v)
    small = np.where(neg, _F(1) - erf_small, _F(1) + erf_small)
    vc = np.minimum(v, _C_END)                         # (past _C_END the value is not used)
    s = recip(vc * _F(0.25)) * _F(0.25)                # 1 / v
    f = np.where(v < _B_END, _horner(_ERFC_B, vc - _B_CENTER), _horner(_ERFC_C, s) * s)
    erfc = np.where(v < _C_END, _exp_neg_half_square(np.minimum(a, _F(15))) * f, _F(0))
    large = np.where(neg, erfc, _F(2) - erfc)
    return np.where(v < _A_END, small, large).astype(_F)


@dataclass(frozen=True)
class Activation:
    kind: str
    threshold: float = 0.0

    @classmethod
    def parse(cls, spec, threshold: float | None = None) -> "Activation":
        """From ``Activation``, ``"relu"``, ``"silu"``, ``"gelu"``, ``"fatrelu:0.01"``,
        ``("fatrelu", threshold=0.01)`` or a Hugging Face name of one (``gelu_pytorch_tanh``)."""
        if isinstance(spec, Activation):
            return spec
        kind, _, param = str(spec).strip().lower().partition(":")
        kind = kind_of_hf_name(kind)
        if kind not in KINDS:
            raise SparseInferError(f"unknown activation {spec!r}; expected {expected_names()}")
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
        return self.kind in EXACT_ZERO_KINDS

    @property
    def code(self) -> int:
        """The kernels' and the op library's ACT_* value (kernels/cuda/activation.h)."""
        return KINDS.index(self.kind)

    @property
    def hf_name(self) -> str:
        """The ``hidden_act`` a Hugging Face config names this activation by."""
        return HF_NAMES.get(self.kind, (self.kind,))[0]

    def __call__(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=_F)
        if self.kind == "relu":
            return np.where(z > 0, z, _F(0))
        if self.kind == "fatrelu":
            return np.where(z >= _F(self.threshold), z, _F(0))
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            if self.kind == "silu":
                return z_sigmoid(z, z)
            if self.kind == "gelu_tanh":
                return z_sigmoid(z, z * (GELU_TANH_K1 + GELU_TANH_K2 * (z * z)))
            return ((_F(0.5) * z) * gelu_q(z)).astype(_F)

    def error_bound(self, z: np.ndarray) -> np.ndarray:
        """Per element, a bound on |h1 - self(z)| for an evaluation of this activation
        through a float32 math library (the ONNX bodies: Sigmoid, Erf): the library's error
        against the exact value plus this module's, (LIBRARY_ERROR_UNITS + OWN_ERROR_UNITS)
        u |z| + SUBNORMAL_ERROR. Zero for relu and fatrelu (exact)."""
        if self.sparse_capable:
            return np.zeros(np.shape(z))
        units = LIBRARY_ERROR_UNITS + OWN_ERROR_UNITS
        return units * U * np.abs(np.asarray(z, np.float64)) + SUBNORMAL_ERROR

    def __str__(self) -> str:
        return f"fatrelu:{self.threshold:g}" if self.kind == "fatrelu" else self.kind


def kind_of_hf_name(name: str) -> str:
    """A Hugging Face ``hidden_act`` name -> the kind (unchanged when it names a kind)."""
    name = str(name).strip().lower()
    return next((kind for kind, names in HF_NAMES.items() if name in names), name)


def hf_activation_names() -> tuple:
    """Every ``hidden_act`` the loaders accept: the kinds and their Hugging Face names."""
    return KINDS + tuple(n for names in HF_NAMES.values() for n in names)


def expected_names() -> str:
    return ", ".join("fatrelu:THRESHOLD" if k == "fatrelu" else k for k in KINDS)
