"""Per-token decode latency from bytes and operations (roofline plus launch overheads).

Each kernel of one decode step is an ``Op``: the bytes it moves, the operations it
executes on one compute unit (fp16 tensor cores, fp32 CUDA cores, integer popcount), how
many kernels it launches, and whether it streams whole matrices (``dense`` bandwidth
fraction) or gathers rows (``sparse`` fraction). Its time is

    launches · kernel_launch_us + max(bytes / (bw_fraction · peak_bw),
                                      ops / (compute_fraction · peak_ops))

and the binding limit is whichever term is largest (memory, compute or launch). The
efficiency constants are the platform's, from ``sim/hardware/*.toml``; nothing here is
fitted per number. Weights and the KV cache are fp16 (the paper's llama.cpp setup).

Methods: ``llama.cpp`` (dense), ``PowerInfer`` (DejaVu predictor of rank r in fp16 on
tensor cores, its predicted set in gate, up and down), and ``SparseInfer`` with and
without kernel fusion (+KF: steps 1-3 in one kernel) and actual sparsity (+AS: rows with
h1 == 0 also skipped in steps 2 and 4).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sparseinfer.reference.dtypes import itemsize
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.shapes import ModelShape
from sparseinfer.reference.signs import words_per_row

from . import ops as counts
from . import paper
from .hardware import HardwareSpec
from .sparsity_model import LayerSparsity, alpha_table, powerinfer_layers, sign_predictor_layers

FP16 = counts.FP16_BYTES
FP32 = itemsize("fp32")
FLAG_BYTES = 4                   # one int skip flag per row (released code: int *skip)
DEFAULT_CONTEXT_TOKENS = 512     # KV-cache length of a GSM8K-style decode step (assumption)

SPARSEINFER_VARIANTS = ("SparseInfer", "SparseInfer+KF", "SparseInfer+AS", "SparseInfer+KF+AS")
METHODS = ("llama.cpp", "PowerInfer") + SPARSEINFER_VARIANTS
FIG4_METHOD = "SparseInfer+KF+AS"   # the paper's headline numbers use both optimisations
UNITS = ("fp32_cuda", "fp16_tensor", "popc")


@dataclass
class Op:
    """One kernel family of one decode step (summed over the layers it runs in)."""

    name: str
    stage: str                   # attention | mlp | predictor | lm_head
    bytes: float = 0.0
    ops: float = 0.0             # FLOPs (fp units) or popcounts (popc)
    unit: str = "fp32_cuda"
    launches: int = 0
    bandwidth: str = "dense"     # dense | sparse: which bandwidth fraction applies
    time_us: float = 0.0
    bound: str = ""
    memory_us: float = 0.0
    compute_us: float = 0.0
    launch_us: float = 0.0

    def add(self, other: "Op") -> None:
        for key in ("bytes", "ops", "launches", "time_us", "memory_us", "compute_us", "launch_us"):
            setattr(self, key, getattr(self, key) + getattr(other, key))

    def to_dict(self) -> dict:
        return asdict(self)


def peak_ops_per_s(hw: HardwareSpec, unit: str) -> float:
    if unit == "fp32_cuda":
        return hw.fp32_cuda_tflops * 1e12
    if unit == "fp16_tensor":
        return hw.fp16_tensor_tflops * 1e12
    if unit == "popc":
        return hw.popc_tera_per_s * 1e12
    raise SparseInferError(f"unknown compute unit {unit!r}; expected one of {', '.join(UNITS)}")


def time_op(op: Op, hw: HardwareSpec) -> Op:
    """Fill in the roofline time and binding limit of ``op`` on ``hw``."""
    eff = hw.efficiency
    fraction = eff.sparse_bandwidth_fraction if op.bandwidth == "sparse" else eff.dense_bandwidth_fraction
    op.memory_us = op.bytes / (fraction * hw.memory_bandwidth_gb_per_s * 1e9) * 1e6
    op.compute_us = op.ops / (eff.compute_fraction * peak_ops_per_s(hw, op.unit)) * 1e6 if op.ops else 0.0
    op.launch_us = op.launches * eff.kernel_launch_us
    op.time_us = op.launch_us + max(op.memory_us, op.compute_us)
    op.bound = max((op.memory_us, "memory"), (op.compute_us, "compute"), (op.launch_us, "launch"))[1]
    return op


def _gemv(name, stage, rows, cols, launches=1, bandwidth="dense", unit="fp32_cuda", extra_bytes=0.0) -> Op:
    """A fp16 matrix-vector product over ``rows`` rows of ``cols`` elements (2 FLOP per MAC)."""
    return Op(name, stage, bytes=rows * cols * FP16 + extra_bytes, ops=2.0 * rows * cols, unit=unit,
              launches=launches, bandwidth=bandwidth)


def attention_ops(m: ModelShape, context_tokens: int) -> list[Op]:
    """One layer's attention block (identical for every method: sparsity is MLP-only)."""
    d, kv = m.d, counts.kv_dim(m)
    return [
        Op("attn_norm", "attention", bytes=d * FP16 + 2 * d * FP32, ops=4.0 * d, launches=2),
        _gemv("attn_qkvo_proj", "attention", 1, counts.attention_projection_macs(m), launches=4),
        Op("rope", "attention", bytes=2 * (d + kv) * FP32, ops=6.0 * (d + kv), launches=2),
        Op("kv_cache", "attention", bytes=counts.kv_cache_bytes(m, context_tokens) + 2 * kv * FP16,
           ops=2.0 * counts.kv_cache_macs(m, context_tokens), launches=6),
        Op("attn_residual", "attention", bytes=3 * d * FP32, ops=float(d), launches=1),
    ]


def _elementwise(name, k, launches=1) -> Op:
    return Op(name, "mlp", bytes=3 * k * FP32, ops=float(k), launches=launches)


def dense_mlp_ops(m: ModelShape) -> list[Op]:
    d, k = m.d, m.k
    return [
        Op("ffn_norm", "mlp", bytes=d * FP16 + 2 * d * FP32, ops=4.0 * d, launches=2),
        _gemv("mlp_gate", "mlp", k, d), _gemv("mlp_up", "mlp", k, d),
        _elementwise("mlp_act_mul", k, launches=2),
        _gemv("mlp_down", "mlp", k, d),
        Op("ffn_residual", "mlp", bytes=3 * d * FP32, ops=float(d), launches=1),
    ]


def sparse_mlp_ops(m: ModelShape, gate_rows: float, up_rows: float, fused: bool) -> list[Op]:
    """Row-gathering steps 1-4 given the rows read in step 1 and in steps 2 and 4."""
    d, k = m.d, m.k
    flags = k * FLAG_BYTES
    dense = dense_mlp_ops(m)
    norm, residual = dense[0], dense[-1]
    if fused:  # +KF: steps 1-3 in one kernel; x loaded once, h1 and h2 stay in registers
        steps = [_gemv("mlp_gate_up_fused", "mlp", gate_rows + up_rows, d, bandwidth="sparse",
                       extra_bytes=flags + d * FP32 + k * FP32)]
    else:      # separate gate, act, up, mul kernels (llama.cpp graph order)
        steps = [_gemv("mlp_gate_sparse", "mlp", gate_rows, d, bandwidth="sparse", extra_bytes=flags + d * FP32),
                 _elementwise("mlp_act_flags", k),
                 _gemv("mlp_up_sparse", "mlp", up_rows, d, bandwidth="sparse", extra_bytes=flags + d * FP32),
                 _elementwise("mlp_mul", k)]
    # step 4 on W_down^T rows with atomicAdd: a memset of the output plus the kernel
    down = _gemv("mlp_down_sparse", "mlp", up_rows, d, launches=2, bandwidth="sparse",
                 extra_bytes=flags + k * FP32 + 2 * d * FP32)
    return [norm] + steps + [down, residual]


def sign_predictor_ops(m: ModelShape) -> list[Op]:
    """Pack x's sign bits, then k rows of ceil(d/32) XOR+popcount words (Table I: k·d/32)."""
    x_word_bytes = words_per_row(m.d) * counts.SIGN_WORD_BYTES
    xor_words = counts.sparseinfer_predictor_ops(m)
    return [Op("predictor_pack_x", "predictor", bytes=m.d * FP32 + x_word_bytes, ops=float(m.d), launches=1),
            Op("predictor_xor_popc", "predictor",
               bytes=xor_words * counts.SIGN_WORD_BYTES + x_word_bytes + m.k * FLAG_BYTES,
               ops=float(xor_words), unit="popc", launches=1)]


def dejavu_predictor_ops(m: ModelShape, rank: int) -> list[Op]:
    """PowerInfer: Linear d→r, ReLU, Linear r→k in fp16 on tensor cores, then a threshold."""
    r = counts.check_rank(rank)
    return [_gemv("predictor_fc1", "predictor", r, m.d, unit="fp16_tensor"),
            _elementwise("predictor_act", r),
            _gemv("predictor_fc2", "predictor", m.k, r, unit="fp16_tensor"),
            Op("predictor_threshold", "predictor", bytes=m.k * (FP16 + FLAG_BYTES), ops=float(m.k), launches=1)]


def lm_head_ops(m: ModelShape) -> list[Op]:
    d = m.d
    return [Op("embedding", "lm_head", bytes=d * FP16 + d * FP32, launches=1),
            Op("final_norm", "lm_head", bytes=d * FP16 + 2 * d * FP32, ops=4.0 * d, launches=2),
            _gemv("lm_head", "lm_head", m.vocab_size, d, extra_bytes=m.vocab_size * FP32)]


def mlp_layer_ops(m: ModelShape, method: str, layer: LayerSparsity, rank: int) -> list[Op]:
    k = m.k
    if method == "llama.cpp":
        return dense_mlp_ops(m)
    gate_rows = k * (1.0 - layer.predicted)
    if method == "PowerInfer":
        return dejavu_predictor_ops(m, rank) + sparse_mlp_ops(m, gate_rows, gate_rows, fused=False)
    if method not in SPARSEINFER_VARIANTS:
        raise SparseInferError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    up_rows = k * (1.0 - layer.union) if "+AS" in method else gate_rows
    return sign_predictor_ops(m) + sparse_mlp_ops(m, gate_rows, up_rows, fused="+KF" in method)


@dataclass
class MethodLatency:
    method: str
    ops: list[Op] = field(default_factory=list)

    @property
    def total_us(self) -> float:
        return sum(o.time_us for o in self.ops)

    def stage_us(self) -> dict:
        out: dict[str, float] = {}
        for o in self.ops:
            out[o.stage] = out.get(o.stage, 0.0) + o.time_us
        return out

    def to_dict(self) -> dict:
        return {"method": self.method, "total_us": self.total_us, "ms_per_token": self.total_us / 1000.0,
                "stage_us": self.stage_us(), "ops": [o.to_dict() for o in self.ops]}


def _accumulate(per_layer_ops: list[list[Op]], hw: HardwareSpec) -> list[Op]:
    """Sum each op over layers, keeping the binding limit of its most expensive instance."""
    merged: dict[str, Op] = {}
    worst: dict[str, float] = {}
    for layer_ops in per_layer_ops:
        for op in layer_ops:
            time_op(op, hw)
            if op.name not in merged:
                merged[op.name] = Op(op.name, op.stage, unit=op.unit, bandwidth=op.bandwidth)
                worst[op.name] = -1.0
            merged[op.name].add(op)
            if op.time_us > worst[op.name]:
                worst[op.name], merged[op.name].bound = op.time_us, op.bound
    return list(merged.values())


def method_latency(m: ModelShape, hw: HardwareSpec, method: str, layers: list[LayerSparsity],
                   context_tokens: int = DEFAULT_CONTEXT_TOKENS, rank: int = paper.TABLE1_POWERINFER_RANK) -> MethodLatency:
    """Per-token decode latency of one method given per-layer sparsity."""
    if len(layers) != m.num_layers:
        raise SparseInferError(f"need sparsity for {m.num_layers} layers, got {len(layers)}")
    context_tokens = counts.check_context(context_tokens)
    per_layer = [attention_ops(m, context_tokens) + mlp_layer_ops(m, method, layer, rank) for layer in layers]
    per_layer.append(lm_head_ops(m))
    return MethodLatency(method, _accumulate(per_layer, hw))


def weight_bytes(m: ModelShape) -> int:
    """fp16 weights resident on the device (attention, MLP, embeddings and LM head)."""
    per_layer = counts.attention_projection_macs(m) + counts.dense_mlp_ops(m) + 2 * m.d
    return (per_layer * m.num_layers + 2 * m.vocab_size * m.d + m.d) * FP16


def decode_latency(m: ModelShape, hw: HardwareSpec, alpha="1.00", sparsity=None, methods=METHODS,
                   context_tokens: int = DEFAULT_CONTEXT_TOKENS, rank: int = paper.TABLE1_POWERINFER_RANK,
                   sign_layers: list[LayerSparsity] | None = None) -> dict:
    """Every method's per-token latency, per-op breakdown and speedups, as data.

    ``sign_layers`` (measured per-layer sparsity from traces) replaces the sparsity model
    for the SparseInfer variants; PowerInfer always uses ``sparsity_model``'s assumption.
    """
    si_layers = sign_layers if sign_layers is not None else sign_predictor_layers(m, alpha, sparsity)
    pi_layers = powerinfer_layers(m, sparsity)
    results = {}
    for method in methods:
        layers = pi_layers if method == "PowerInfer" else (
            [LayerSparsity(0.0, 0.0)] * m.num_layers if method == "llama.cpp" else si_layers)
        results[method] = method_latency(m, hw, method, layers, context_tokens, rank)
    base = results.get("llama.cpp")
    pi = results.get("PowerInfer")
    rows = []
    for method, res in results.items():
        row = res.to_dict()
        row["speedup_vs_llama.cpp"] = base.total_us / res.total_us if base else None
        row["speedup_vs_PowerInfer"] = pi.total_us / res.total_us if pi else None
        rows.append(row)
    wb = weight_bytes(m)
    return {
        "model": m.name, "hardware": hw.name, "alpha": str(alpha), "context_tokens": int(context_tokens),
        "rank": rank, "weight_gib": wb / 2**30, "fits_in_memory": wb / 2**30 < hw.memory_gib,
        "efficiency": asdict(hw.efficiency),
        "sparseinfer_layers": [asdict(s) for s in si_layers],
        "sparsity_source": "measured" if sign_layers is not None else "model (sim/sparsity_model.py)",
        "assumed_alpha_table": alpha_table(m, sparsity=sparsity) if sign_layers is None else None,
        "powerinfer_predicted_sparsity": pi_layers[0].predicted,
        "methods": rows,
    }


def fig4_variants(hw: HardwareSpec, context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> list[dict]:
    """Speedup over llama.cpp of PowerInfer and every SparseInfer variant, per Fig. 4 setting."""
    from sparseinfer.reference.shapes import BUILTIN_MODELS

    rows = []
    for model_name, alpha in paper.FIG4_SPEEDUPS:
        data = decode_latency(BUILTIN_MODELS[model_name], hw, alpha, None, METHODS, context_tokens)
        rows += [{"model": model_name, "alpha": alpha, "method": r["method"],
                  "speedup_vs_llama.cpp": r["speedup_vs_llama.cpp"]} for r in data["methods"][1:]]
    return rows


def fig4(hw: HardwareSpec, context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> list[dict]:
    """Fig. 4 beside the simulation: one row per (model, α, baseline)."""
    from sparseinfer.reference.shapes import BUILTIN_MODELS

    rows = []
    for (model_name, alpha), (vs_llama, vs_pi) in paper.FIG4_SPEEDUPS.items():
        data = decode_latency(BUILTIN_MODELS[model_name], hw, alpha, None,
                              ("llama.cpp", "PowerInfer", FIG4_METHOD), context_tokens)
        sim = next(r for r in data["methods"] if r["method"] == FIG4_METHOD)
        for vs, published in (("llama.cpp", vs_llama), ("PowerInfer", vs_pi)):
            simulated = sim[f"speedup_vs_{vs}"]
            rows.append({"model": model_name, "alpha": alpha, "vs": vs, "paper": published,
                         "simulated": round(simulated, 4), "rel_error": round(simulated / published - 1.0, 4)})
    return rows
