"""Export a checkpoint to one ONNX model for prefill and decode, dense or sparse.

Graph I/O follows onnxruntime-genai: inputs ``input_ids`` [batch, seq], ``attention_mask``
[batch, total_seq], ``position_ids`` [batch, seq], ``past_key_values.{i}.key/.value``
[batch, kv_heads, past_seq, head_dim]; outputs ``logits`` [batch, seq, vocab] and
``present.{i}.key/.value``. All tensors are float32 (fp16 / bf16 weights are widened,
exactly).

Two forms (metadata ``sparseinfer.attention`` / ``sparseinfer.kv_cache``):

* fused (``gqa`` / ``shared``, the default), onnxruntime-genai's model builder's form: per
  layer one QKV MatMul, onnxruntime's ``GroupQueryAttention`` (rotary inside, rotate_half
  convention, from ``cos_cache`` / ``sin_cache`` [max_length, head_dim / 2]), RMSNorms as
  ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (residual add
  fused). ``seqlens_k`` = rows of ``attention_mask`` summed - 1 and ``total_sequence_length``
  = its width are computed in the graph; positions come from them, so batches are padded
  on the right and ``position_ids`` is accepted but unused. The KV cache is one buffer per
  tensor, [batch, kv_heads, max_length, head_dim], bound as both past and present and
  written in place (genai's ``past_present_share_buffer``); ``sparseinfer.max_length`` is
  its largest length. Given distinct past and present, GroupQueryAttention also grows the
  cache by concatenation.
* portable (``portable`` / ``concat``, ``ExportOptions(portable=True)``): standard ONNX ops
  only, for runtimes without onnxruntime's contrib ops; rotary, attention and RMSNorm
  composed, left padding allowed (causal + ``attention_mask`` bias), the KV cache grown
  by Concat at every step.

Tied embeddings are stored once: the LM head is a ``Gemm`` with transB=1 on the embedding
initializer itself.

Sparse exports: each layer's MLP is one ``SparseMLP`` node (``mlp_functions``): for one
token (batch 1, seq 1) the predictor, then only the rows it keeps (+AS for up and down;
α baked per layer); for more tokens (prefill) the dense MLP, as in the paper. The node runs
on the native op library where a host registers it, else on its function body.
``debug=True`` adds per-layer outputs ``debug.{i}.mlp_input`` [batch, seq, d],
``debug.{i}.predicted_zero`` and ``debug.{i}.actual_zero`` [k] bool and ``debug.{i}.rows``
(the rows computed in the up/down steps); in prefill they are empty. ``actual_zero`` needs
the full gate product, so debug exports do extra work.

Quantized exports (``ExportOptions(quantize="q8_0" | "q4_0" | "q4_1")``, fused form, float32
activations): every linear layer on GGUF blocks, read from the checkpoint one layer at a time
(``quant_weights``), as onnxruntime's MatMulNBits or the op library's BlockMatMul and SparseMLP
on blocks (``quant_graph``); those nodes carry no function body.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from sparseinfer.reference.activations import Activation
from sparseinfer.reference.alpha import AlphaSchedule
from sparseinfer.reference.block_quant import block_format
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.llama import LlamaWeights, rope_tables

from . import mlp_functions as mf
from . import quant_graph as qg
from .export_check import needs_op_library
from .gguf_blocks import DEFAULT_DOWN_POLICY
from .onnx_builder import (BOOL, FLOAT, FLOAT16, INT32, INT64, MS_DOMAIN, ExternalData, GraphBuilder, make_model,
                           register_onnxruntime_schemas)
from .op_library import DOMAIN, OP_TYPE
from .quant_linear import ACCURACY_LEVELS
from .quant_weights import QuantizedModel

EXTERNAL_DATA_BYTES = 1 << 30     # fp32 weights above this go to a side file (protobuf's 2 GiB limit)


@dataclass(frozen=True)
class ExportOptions:
    sparse: bool = True
    alpha: str = "1.00"
    target: str = "cpu"
    debug: bool = False
    portable: bool = False            # standard ops only (no GroupQueryAttention etc.), KV cache grown by Concat
    max_length: int | None = None     # longest sequence (shared KV buffer, rotary caches); default: the model's
    dtype: str = "float32"            # weights and activations: float32 or float16 (fused form only)
    approximate: bool = False         # sparse SiLU / GELU: rows the sign predictor skips are taken as zero
    quantize: str | None = None       # q8_0, q4_0, q4_1: every linear layer on blocks (quant_weights, quant_graph)
    down_policy: str = DEFAULT_DOWN_POLICY    # a GGUF's ffn_down re-blocked along d: in q8_0, or 'same' format
    accuracy_level: int = 0           # MatMulNBits' and SparseMLP's (0: float32 activations; 4: int8 activations)


def quantize_conflicts(quantize, portable: bool = False, dtype: str = "float32", target: str = "cpu",
                       accuracy_level: int = 0) -> str | None:
    """Why ``quantize`` cannot go with the other settings (None if it can): the block ops are
    onnxruntime's MatMulNBits and the op library's CPU kernels, in float32."""
    if not quantize:
        return "--accuracy-level applies to --quantize exports (their MatMulNBits nodes)" if accuracy_level else None
    if portable:
        return ("--quantize needs the fused form: MatMulNBits and the op library's block ops are not standard ONNX "
                "ops (drop --portable)")
    if dtype != "float32":
        return "--quantize computes in float32 (weights in blocks, activations float32; drop --dtype float16)"
    if target != "cpu":
        return ("--target shapes the MLP's function body, and a --quantize export carries none (its SparseMLP "
                "nodes need the op library, whose CPU and CUDA kernels both take blocks): drop --target cuda")
    return None


def export_form(options: ExportOptions) -> dict[str, str]:
    """The metadata that says which graph form an export is (see the module docstring)."""
    return ({"sparseinfer.attention": "portable", "sparseinfer.kv_cache": "concat"} if options.portable
            else {"sparseinfer.attention": "gqa", "sparseinfer.kv_cache": "shared"})


DTYPES = {"float32": (np.float32, FLOAT), "float16": (np.float16, FLOAT16)}
FP16_MAX = float(np.finfo(np.float16).max)


def check_fp16_range(weights: LlamaWeights) -> None:
    """Every finite weight fits float16 (|w| <= 65504); else a one-line error naming the tensor."""
    from .loaders.names import named_tensors

    for name, a in named_tensors(weights).items():
        a = np.asarray(a)
        big = np.abs(a[np.isfinite(a)].astype(np.float32)) > FP16_MAX
        if big.any():
            raise SparseInferError(f"{name}: {int(big.sum())} value(s) overflow float16 (largest "
                                   f"{float(np.abs(a.astype(np.float32)).max()):g} > {FP16_MAX:g}); export with "
                                   f"--dtype float32")


# onnxruntime 1.32's GroupQueryAttention (CPU) checks "head_size must be a multiple of 8", and
# with do_rotary "head_size shall be a multiple of 16"
GQA_HEAD_MULTIPLE = 16


def gqa_head_dim(head_dim: int) -> int:
    """The head size the fused form runs at: head_dim rounded up to a multiple of 16 (64, 128
    for real Llamas: no padding; the tiny test shape's 50 runs at 64)."""
    return -(-head_dim // GQA_HEAD_MULTIPLE) * GQA_HEAD_MULTIPLE


def pad_head_rows(w: np.ndarray, heads: int, head_dim: int, padded: int) -> np.ndarray:
    """Rows [heads * head_dim, n] -> [heads * padded, n]: each rotary half of each head gets
    (padded - head_dim) / 2 zero rows at its end, so rotate_half still pairs element j with
    j + padded / 2 and the padding only adds exact zeros to the attention dot products."""
    if padded == head_dim:
        return w
    halves = w.reshape(heads, 2, head_dim // 2, -1)
    out = np.zeros((heads, 2, padded // 2, halves.shape[-1]), dtype=w.dtype)
    out[:, :, :head_dim // 2] = halves
    return out.reshape(heads * padded, -1)


class LlamaExporter:
    def __init__(self, weights: LlamaWeights | QuantizedModel, options: ExportOptions, progress=None,
                 external: ExternalData | None = None):
        """``weights``: a ``QuantizedModel`` for a quantized export (``options.quantize``)."""
        self.w, self.s, self.o = weights, weights.shape, options
        self.quant = options.quantize is not None
        if self.quant:
            block_format(options.quantize)
            why = quantize_conflicts(options.quantize, options.portable, options.dtype, options.target)
            if why:
                raise SparseInferError(why)
            if options.accuracy_level not in ACCURACY_LEVELS:
                raise SparseInferError(f"accuracy level {options.accuracy_level!r} is not one of "
                                       f"{', '.join(map(str, ACCURACY_LEVELS))} (MatMulNBits')")
            if not isinstance(weights, QuantizedModel) or (weights.fmt.name, weights.sparse) != \
                    (block_format(options.quantize).name, options.sparse):
                raise SparseInferError(f"a {options.quantize} {'sparse' if options.sparse else 'dense'} export takes "
                                       f"a QuantizedModel (quant_weights) of that format and mode")
        self.act = Activation.parse(self.s.hidden_act)
        self.progress = progress or (lambda: None)
        if options.target not in mf.TARGETS:
            raise SparseInferError(f"unknown target {options.target!r}; expected cpu or cuda")
        if options.sparse and not self.act.sparse_capable and not options.approximate:
            raise SparseInferError(f"activation {self.act} has no exact zeros; export it with --dense, or "
                                   f"sparse with --approximate (rows predicted negative taken as zero)")
        self.alpha_milli = AlphaSchedule.parse(options.alpha).per_layer_milli(self.s.num_layers)
        self.max_length = options.max_length or self.s.max_position_embeddings
        if not 0 < self.max_length <= self.s.max_position_embeddings:
            raise SparseInferError(f"max_length {self.max_length} is outside 1-{self.s.max_position_embeddings} "
                                   f"(the model's max_position_embeddings)")
        if self.s.head_dim % 2:
            raise SparseInferError(f"head_dim {self.s.head_dim} is odd; rotary embeddings need an even head_dim")
        if options.dtype not in DTYPES:
            raise SparseInferError(f"unknown dtype {options.dtype!r}; expected float32 or float16")
        if options.dtype == "float16":
            if options.portable:
                raise SparseInferError("--dtype float16 needs the fused form (GroupQueryAttention); drop --portable")
            check_fp16_range(weights)
        self.np_dtype, self.onnx_dtype = DTYPES[options.dtype]
        self.tied = weights.tied if self.quant else weights.lm_head is weights.embed
        self.kv_head_dim = self.s.head_dim if options.portable else gqa_head_dim(self.s.head_dim)
        self.g = GraphBuilder(external=external)

    # -- graph inputs and shared values ---------------------------------------------------
    def _cast(self, a) -> np.ndarray:
        """A weight in the export's dtype (float16 values were checked to fit at __init__)."""
        return np.ascontiguousarray(np.asarray(a).astype(self.np_dtype))

    def _inputs(self):
        g, s = self.g, self.s
        self.ids = g.add_input("input_ids", INT64, ["batch_size", "sequence_length"])
        self.mask = g.add_input("attention_mask", INT64, ["batch_size", "total_sequence_length"])
        self.pos = g.add_input("position_ids", INT64, ["batch_size", "sequence_length"])
        kv_len = "past_sequence_length" if self.o.portable else "max_sequence_length"
        kv_shape = ["batch_size", s.num_kv_heads, kv_len, self.kv_head_dim]
        self.past = [(g.add_input(f"past_key_values.{i}.key", self.onnx_dtype, kv_shape),
                      g.add_input(f"past_key_values.{i}.value", self.onnx_dtype, kv_shape)) for i in range(s.num_layers)]

    def _attention_bias(self) -> str:
        """[batch, 1, 1, seq, total] additive mask: causal and attention_mask."""
        g, sc = self.g, "/model/attn_mask"
        past_len = g.make_shape(self.past[0][0], sc, 2, 3)
        total = g.make_shape(self.mask, sc, 1, 2)
        key_pos = g.op("Range", [g.make_reshape(g.const([0]), [], sc), g.make_reshape(total, [], sc),
                                 g.const(1)], sc)
        q_pos = g.op("Range", [g.make_reshape(past_len, [], sc), g.make_reshape(total, [], sc), g.const(1)], sc)
        causal = g.op("LessOrEqual", [g.make_unsqueeze(key_pos, [0], sc), g.make_unsqueeze(q_pos, [1], sc)], sc)
        padded = g.make_unsqueeze(g.make_cast(self.mask, BOOL, sc), [1, 2, 3], sc)
        allowed = g.op("And", [causal, padded], sc)
        lowest = g.const(np.finfo(np.float32).min, np.float32)
        return g.make_where(allowed, g.const(0.0, np.float32), lowest, sc)

    def _rope_tables(self):
        g, s, sc = self.g, self.s, "/model/rotary_emb"
        cos, sin = rope_tables(s.head_dim, s.rope_theta, self.max_length)
        c = g.make_gather(g.initializer("model.rotary_emb.cos_cache", cos), self.pos, sc)
        si = g.make_gather(g.initializer("model.rotary_emb.sin_cache", sin), self.pos, sc)
        return g.make_unsqueeze(c, [1], sc), g.make_unsqueeze(si, [1], sc)     # [b, 1, s, hd/2]

    # -- blocks ---------------------------------------------------------------------------
    def _rope(self, x, cos, sin, sc):
        g = self.g
        x1, x2 = g.make_split_halves(x, sc)
        first = g.make_sub(g.make_mul(x1, cos, sc), g.make_mul(x2, sin, sc), sc)
        second = g.make_add(g.make_mul(x2, cos, sc), g.make_mul(x1, sin, sc), sc)
        return g.make_concat([first, second], -1, sc)

    def _attention(self, i, x, bias, cos, sin):
        g, s, lw = self.g, self.s, self.w.layers[i]
        sc, hd, kvh = f"/model/layers.{i}/attn", s.head_dim, s.num_kv_heads
        rep = s.num_heads // kvh
        pre = f"model.layers.{i}.self_attn"

        def proj(name, w, heads):
            y = g.make_matmul(x, g.initializer(f"{pre}.{name}.weight_t", self._cast(w).T), f"{sc}/{name}")
            return g.make_transpose(g.make_reshape(y, [0, 0, heads, hd], f"{sc}/{name}"), [0, 2, 1, 3], f"{sc}/{name}")

        q = self._rope(proj("q_proj", lw.q, s.num_heads), cos, sin, f"{sc}/q_rotary")
        k = self._rope(proj("k_proj", lw.k, kvh), cos, sin, f"{sc}/k_rotary")
        v = proj("v_proj", lw.v, kvh)
        past_k, past_v = self.past[i]
        present_k = g.make_concat([past_k, k], 2, f"{sc}/present_key")
        present_v = g.make_concat([past_v, v], 2, f"{sc}/present_value")
        g.nodes.append(onnx.helper.make_node("Identity", [present_k], [f"present.{i}.key"], name=f"{sc}/present.key"))
        g.nodes.append(onnx.helper.make_node("Identity", [present_v], [f"present.{i}.value"], name=f"{sc}/present.value"))
        # grouped-query attention without copying K/V: query heads grouped per key/value head
        q5 = g.make_reshape(q, [0, kvh, rep, -1, hd], f"{sc}/gqa")
        k5 = g.make_unsqueeze(g.make_transpose(present_k, [0, 1, 3, 2], f"{sc}/gqa"), [2], f"{sc}/gqa")
        v5 = g.make_unsqueeze(present_v, [2], f"{sc}/gqa")
        scores = g.make_mul(g.make_matmul(q5, k5, f"{sc}/qk"), g.const(1.0 / np.sqrt(hd), np.float32), f"{sc}/qk")
        probs = g.make_softmax(g.make_add(scores, bias, f"{sc}/qk"), f"{sc}/qk")
        ctx = g.make_reshape(g.make_matmul(probs, v5, f"{sc}/pv"), [0, s.num_heads, -1, hd], f"{sc}/pv")
        ctx = g.make_reshape(g.make_transpose(ctx, [0, 2, 1, 3], f"{sc}/pv"), [0, 0, s.num_heads * hd], f"{sc}/pv")
        return g.make_matmul(ctx, g.initializer(f"{pre}.o_proj.weight_t", self._cast(lw.o).T), f"{sc}/o_proj")

    # -- fused form (onnxruntime contrib ops) ------------------------------------------------
    def _gqa_lengths(self):
        """seqlens_k [batch] int32 (= tokens per row - 1) and total_sequence_length (scalar int32)
        from attention_mask, as onnxruntime-genai's builder computes them."""
        g, sc = self.g, "/model/attn_mask"
        last = g.make_sub(g.make_reduce_sum(self.mask, [1], f"{sc}/seqlens_k"), g.const(1), f"{sc}/seqlens_k")
        seqlens_k = g.make_cast(last, INT32, f"{sc}/seqlens_k")
        total = g.make_reshape(g.make_shape(self.mask, f"{sc}/total_seq_len", 1, 2), [], f"{sc}/total_seq_len")
        return seqlens_k, g.make_cast(total, INT32, f"{sc}/total_seq_len")

    def _attention_gqa(self, i, lw, x, lengths, caches):
        g, s = self.g, self.s
        sc, pre = f"/model/layers.{i}/attn", f"model.layers.{i}.self_attn"
        hd, hdp = s.head_dim, self.kv_head_dim
        qkv = self._qkv_quant(lw, x, sc, pre) if self.quant else [self._qkv(lw, x, sc, pre)]
        past_k, past_v = self.past[i]
        ctx = g.make_group_query_attention(
            qkv, past_k, past_v, *lengths, *caches, f"{sc}", num_heads=s.num_heads, kv_num_heads=s.num_kv_heads,
            scale=1.0 / np.sqrt(hd), outputs=[f"{sc}/GroupQueryAttention/output_0", f"present.{i}.key",
                                              f"present.{i}.value"])[0]
        if self.quant:
            if hdp != hd:              # the padded columns out, so that o_proj keeps its own blocks
                ctx = g.make_gather(ctx, g.const(qg.attention_columns(s.num_heads, hd, hdp)), f"{sc}/o_proj",
                                    axis=-1)
            return qg.linear(g, ctx, lw.o, f"{sc}/o_proj", f"{pre}.o_proj.weight", self.o.accuracy_level)
        o_t = pad_head_rows(self._cast(lw.o).T, s.num_heads, hd, hdp)                         # [h hdp, d]
        return g.make_matmul(ctx, g.initializer(f"{pre}.o_proj.weight_t", o_t), f"{sc}/o_proj")

    def _qkv(self, lw, x, sc, pre) -> str:
        """The packed QKV projection [b, s, (h + 2 kvh) hdp] as one MatMul."""
        s, hd, hdp = self.s, self.s.head_dim, self.kv_head_dim

        def pad(w, heads):
            return pad_head_rows(self._cast(w), heads, hd, hdp)

        qkv_t = np.concatenate([pad(lw.q, s.num_heads), pad(lw.k, s.num_kv_heads), pad(lw.v, s.num_kv_heads)]).T
        return self.g.make_matmul(x, self.g.initializer(f"{pre}.qkv_proj.weight_t", qkv_t), f"{sc}/qkv_proj")

    def _qkv_quant(self, lw, x, sc, pre) -> list[str]:
        """The QKV projection on blocks: one packed linear layer where Q, K and V share a format
        (their rows of blocks concatenated, the padding rows zero bytes), else three (q, k, v)."""
        g, s, hd, hdp, level = self.g, self.s, self.s.head_dim, self.kv_head_dim, self.o.accuracy_level
        parts = {"q": (lw.q, s.num_heads), "k": (lw.k, s.num_kv_heads), "v": (lw.v, s.num_kv_heads)}
        padded = {n: tb._replace(blocks=pad_head_rows(tb.blocks, heads, hd, hdp)) for n, (tb, heads) in parts.items()}
        if len({tb.fmt for tb in padded.values()}) == 1:
            packed = padded["q"]._replace(blocks=np.concatenate([tb.blocks for tb in padded.values()]))
            return [qg.linear(g, x, packed, f"{sc}/qkv_proj", f"{pre}.qkv_proj.weight", level)]
        return [qg.linear(g, x, tb, f"{sc}/{n}_proj", f"{pre}.{n}_proj.weight", level) for n, tb in padded.items()]

    def _layers_fused(self, h):
        """Decoder layers with GroupQueryAttention and (Skip)SimplifiedLayerNormalization; the
        residual stream runs through the norms' sum outputs. Returns the final-normed hidden."""
        g, s, w = self.g, self.s, self.w
        eps, sc = s.rms_norm_eps, "/model"
        lengths = self._gqa_lengths()
        cos, sin = rope_tables(s.head_dim, s.rope_theta, self.max_length)
        half_pad = (self.kv_head_dim - s.head_dim) // 2          # identity rotations of the zero padding
        cos = np.pad(cos, ((0, 0), (0, half_pad)), constant_values=1.0)
        sin = np.pad(sin, ((0, 0), (0, half_pad)), constant_values=0.0)
        caches = (g.initializer("model.rotary_emb.cos_cache", self._cast(cos)),
                  g.initializer("model.rotary_emb.sin_cache", self._cast(sin)))
        mlp = None
        for i in range(s.num_layers):
            lw = self._layer(i)                  # read once (a quantized model reads it from the checkpoint now)
            lsc = f"/model/layers.{i}"
            norm = g.initializer(f"model.layers.{i}.input_layernorm.weight", self._cast(lw.input_norm))
            if mlp is None:
                xn = g.make_simplified_layer_norm(h, norm, eps, f"{lsc}/input_layernorm")
            else:                                # the previous layer's MLP output joins the residual here
                xn, h = g.make_skip_simplified_layer_norm(mlp, h, norm, eps, f"{lsc}/input_layernorm")
            attn = self._attention_gqa(i, lw, xn, lengths, caches)
            x, h = g.make_skip_simplified_layer_norm(
                attn, h, g.initializer(f"model.layers.{i}.post_attention_layernorm.weight", self._cast(lw.post_norm)),
                eps, f"{lsc}/post_attention_layernorm")
            mlp = self._mlp(i, lw, x)
            self.progress()
        return g.make_skip_simplified_layer_norm(mlp, h, g.initializer("model.norm.weight", self._cast(w.final_norm)), eps,
                                                 f"{sc}/norm", with_sum=False)[0]

    def _layer(self, i):
        return self.w.layer(i) if self.quant else self.w.layers[i]

    def _layers_portable(self, h):
        """Decoder layers of standard ops (today's portable form); returns the final-normed hidden."""
        g, s, w = self.g, self.s, self.w
        bias = self._attention_bias()
        cos, sin = self._rope_tables()
        eps = s.rms_norm_eps
        for i, lw in enumerate(w.layers):
            lsc = f"/model/layers.{i}"
            xn = g.make_rms_norm(h, g.initializer(f"model.layers.{i}.input_layernorm.weight", self._cast(lw.input_norm)),
                                 eps, f"{lsc}/input_layernorm")
            h = g.make_add(h, self._attention(i, xn, bias, cos, sin), f"{lsc}/attn_residual")
            x = g.make_rms_norm(h, g.initializer(f"model.layers.{i}.post_attention_layernorm.weight",
                                                 self._cast(lw.post_norm)), eps, f"{lsc}/post_attention_layernorm")
            h = g.make_add(h, self._mlp(i, lw, x), f"{lsc}/mlp_residual")
            self.progress()
        return g.make_rms_norm(h, g.initializer("model.norm.weight", self._cast(w.final_norm)), eps, "/model/norm")

    def _mlp(self, i, lw, x):
        """The layer's MLP (sparse op or dense MatMuls) on its normed input x; debug output of x."""
        g, lsc = self.g, f"/model/layers.{i}"
        if self.o.debug:
            g.nodes.append(onnx.helper.make_node("Identity", [x], [f"debug.{i}.mlp_input"], name=f"{lsc}/debug.mlp_input"))
            g.add_output(f"debug.{i}.mlp_input", self.onnx_dtype, ["batch_size", "sequence_length", self.s.d])
        if self.quant and not self.o.sparse and not lw.down_transposed:
            return qg.dense_mlp_nbits(g, x, lw, self.act, f"{lsc}/mlp", f"model.layers.{i}.mlp", self.o.accuracy_level)
        if self.quant:
            inputs, attrs = qg.sparse_mlp_inputs(g, x, lw, f"model.layers.{i}.mlp", dense=not self.o.sparse,
                                                 accuracy_level=self.o.accuracy_level)
            return self._sparse_mlp_node(i, inputs, attrs)
        return self._mlp_sparse(i, lw, x) if self.o.sparse else self._mlp_dense_t(g, i, lw, x, f"{lsc}/mlp")

    def _lm_head(self, hn, embed):
        """logits [b, s, vocab]. Untied: MatMul on the head's transposed copy. Tied: Gemm with
        transB=1 on the embedding initializer itself ([b*s, d] x [vocab, d]^T), so the file
        holds it once; on 2 CPU cores at vocab 49152 x d 576 it is as fast as a MatMul on a
        transposed copy (about 15-24 ms a token both, noisy), and a Transpose node would be
        constant-folded by onnxruntime into a second copy in memory."""
        g, s, sc = self.g, self.s, "/lm_head"
        if self.quant:
            return qg.linear(g, hn, self.w.lm_head(), sc, "lm_head.weight", self.o.accuracy_level)
        if not self.tied:
            return g.make_matmul(hn, g.initializer("lm_head.weight_t", self._cast(self.w.lm_head).T), sc)
        rows = g.make_gemm(g.make_reshape(hn, [-1, s.d], sc), embed, sc, trans_b=1)
        out_shape = g.make_concat([g.make_shape(self.ids, sc), g.const([s.vocab_size])], 0, sc)
        return g.op("Reshape", [rows, out_shape], sc)

    def _mlp_dense_t(self, b: GraphBuilder, i, lw, x, sc):
        """Dense MLP on transposed-free weights (dense export): x [.., d] @ W^T."""
        pre = f"model.layers.{i}.mlp"
        gate = b.make_matmul(x, b.initializer(f"{pre}.gate_proj.weight_t", self._cast(lw.gate).T), f"{sc}/gate_proj")
        up = b.make_matmul(x, b.initializer(f"{pre}.up_proj.weight_t", self._cast(lw.up).T), f"{sc}/up_proj")
        h3 = b.make_mul(mf.apply_activation(b, gate, self.act, f"{sc}/act", self.np_dtype), up, f"{sc}/act")
        return b.make_matmul(h3, b.initializer(f"{pre}.down_proj.weight_t", self._cast(lw.down).T), f"{sc}/down_proj")

    def _mlp_sparse(self, i, lw, x):
        """One ``SparseMLP`` node (``mlp_functions``): sparse for one token, dense for more."""
        g = self.g
        sc, pre = f"/model/layers.{i}/mlp", f"model.layers.{i}.mlp"
        x32 = x if self.onnx_dtype == FLOAT else g.make_cast(x, FLOAT, sc)       # the op takes x in float32
        inputs = [x32, g.initializer(f"{pre}.gate_proj.weight", self._cast(lw.gate)),
                  g.initializer(f"{pre}.up_proj.weight", self._cast(lw.up)),
                  g.initializer(f"{pre}.down_proj.weight_t", self._cast(lw.down).T),
                  g.initializer(f"{pre}.gate_proj.sign_words",
                                mf.pack_sign_words64(self._cast(lw.gate), groups=self.o.target == "cpu"))]
        if self.o.target == "cuda":            # the function body's predictor on the CUDA provider
            inputs.append(g.initializer(f"{pre}.gate_proj.signs_int8_t", mf.int8_signs_t(self._cast(lw.gate))))
        out = self._sparse_mlp_node(i, inputs, {})
        return out if self.onnx_dtype == FLOAT else g.make_cast(out, self.onnx_dtype, sc)

    def _sparse_mlp_node(self, i, inputs, attrs) -> str:
        """The layer's SparseMLP node on ``inputs`` (with ``attrs`` besides α and the activation)
        and, in a sparse debug export, its debug outputs; returns its output."""
        g, sc = self.g, f"/model/layers.{i}/mlp"
        debug = self.o.debug and self.o.sparse
        outs = g.make_node(OP_TYPE, inputs, sc, n_out=4 if debug else 1, domain=DOMAIN,
                           alpha_milli=self.alpha_milli[i], activation=self.act.kind,
                           threshold=float(self.act.threshold), **attrs)
        if debug:
            rows = g.make_nonzero_flat(outs[2], f"{sc}/debug")
            for name, src, kind, shape in (("predicted_zero", outs[1], BOOL, ["k_or_0"]),
                                           ("actual_zero", outs[3], BOOL, ["k_or_0"]),
                                           ("rows", rows, INT64, ["rows_computed"])):
                g.nodes.append(onnx.helper.make_node("Identity", [src], [f"debug.{i}.{name}"], name=f"{sc}/debug.{name}"))
                g.add_output(f"debug.{i}.{name}", kind, shape)
        return outs[0]

    # -- whole model ----------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        g, s, w = self.g, self.s, self.w
        self._inputs()
        embed = g.initializer("model.embed_tokens.weight", self._cast(w.embed))
        h = g.make_gather(embed, self.ids, "/model/embed_tokens")
        hn = self._layers_portable(h) if self.o.portable else self._layers_fused(h)
        logits = self._lm_head(hn, embed)
        if self.onnx_dtype != FLOAT:            # logits come out float32 whatever the weights
            logits = g.make_cast(logits, FLOAT, "/lm_head")
        g.nodes.append(onnx.helper.make_node("Identity", [logits], ["logits"], name="/lm_head/logits"))
        outputs = [("logits", FLOAT, ["batch_size", "sequence_length", s.vocab_size])]
        kv = ["batch_size", s.num_kv_heads, "total_sequence_length" if self.o.portable else "max_sequence_length",
              self.kv_head_dim]
        for i in range(s.num_layers):
            outputs += [(f"present.{i}.key", self.onnx_dtype, kv), (f"present.{i}.value", self.onnx_dtype, kv)]
        debug_outputs, g.outputs = g.outputs, []
        for name, kind, shape in outputs:
            g.add_output(name, kind, shape)
        g.outputs += debug_outputs
        functions = [mf.sparse_mlp_function(s.d, s.k, self.act, self.o.target, self.o.debug, self.onnx_dtype)] \
            if self.o.sparse and not self.quant else []           # block-quantized nodes have no body
        library = any(node.domain == DOMAIN for node in g.nodes)
        domains = ([DOMAIN] if library else []) + ([] if self.o.portable else [MS_DOMAIN])
        model = make_model(g.make_graph("sparseinfer_llama"), functions, domains)
        meta = {"sparseinfer.sparse": str(self.o.sparse), "sparseinfer.target": self.o.target,
                "sparseinfer.alpha_milli": ",".join(map(str, self.alpha_milli)),
                "sparseinfer.num_layers": str(s.num_layers), "sparseinfer.num_kv_heads": str(s.num_kv_heads),
                "sparseinfer.head_dim": str(self.kv_head_dim),           # the KV cache tensors' (padded) one
                "sparseinfer.model_head_dim": str(s.head_dim), "sparseinfer.vocab_size": str(s.vocab_size),
                "sparseinfer.max_position_embeddings": str(s.max_position_embeddings),
                "sparseinfer.activation": str(self.act), **export_form(self.o),
                "sparseinfer.approximate": str(self.o.sparse and not self.act.sparse_capable),
                "sparseinfer.max_length": str(self.max_length),
                "sparseinfer.tied_embeddings": str(self.tied),
                **({"sparseinfer.quantize": block_format(self.o.quantize).name,
                    "sparseinfer.accuracy_level": str(self.o.accuracy_level)} if self.quant else {})}
        onnx.helper.set_model_props(model, meta)
        return model


def export_onnx(weights, out_path, options: ExportOptions = ExportOptions(), progress=None,
                check: bool = True, token_ids: dict | None = None, ops_library: Path | None = None,
                companions: dict | None = None, note=None) -> Path:
    """Build, save and check the model, with ``genai_config.json`` beside it (``token_ids``:
    bos / eos / pad ids for it; ``ops_library``: the op library it names when the graph holds
    its nodes, copied beside it) and ``companions``, {file name: write(path)} of the other files
    that belong to the export (its tokenizer's); returns the model's path. Above 1 GiB of fp32
    weights the initializers are streamed into ``<name>.data`` beside it while the graph is built.

    ``weights``: ``LlamaWeights``, or for a quantized export (``options.quantize``) also a
    ``loaders.OpenCheckpoint``, read one layer at a time (``quant_weights``); ``note(line)`` is
    told what the quantization converted, once the export is written.

    Written whole: every file goes to a staging folder inside the output folder (the .data
    under its final name, which the model names), the model is checked there, and only then
    are they moved into place together, the model last (reference.files.commit), so a failed or
    interrupted export, a re-export over a good one included, leaves the previous files intact
    and no partial file, nor an output folder it made. A destination that is not a regular
    file (a device, a FIFO, a directory) is refused before any work."""
    from sparseinfer.reference.files import check_replaceable, commit, staging_folder

    from .genai_config import GENAI_CONFIG, write_genai_config
    from .loaders.weights import OpenCheckpoint

    out = Path(out_path)
    data_name = out.name + ".data"
    companions = dict(companions or {})
    beside = [*companions, GENAI_CONFIG]
    check_replaceable(out, "model")
    for name in [data_name, *beside, *([Path(ops_library).name] if ops_library else [])]:
        check_replaceable(out.with_name(name))
    if options.quantize:
        why = quantize_conflicts(options.quantize, options.portable, options.dtype, options.target)
        if why:
            raise SparseInferError(why)
        if isinstance(weights, LlamaWeights):
            weights = QuantizedModel.of_weights(weights, options.quantize, options.sparse, options.accuracy_level)
        elif isinstance(weights, OpenCheckpoint):
            weights = QuantizedModel(weights, options.quantize, options.sparse, options.down_policy,
                                     options.accuracy_level)
    big = 4 * weights.num_elements() > EXTERNAL_DATA_BYTES
    with staging_folder(out.parent, out.name) as stage:
        staged = stage / out.name
        with ExternalData(stage / data_name) if big else contextlib.nullcontext() as external:
            model = LlamaExporter(weights, options, progress, external).build()
        onnx.save_model(model, str(staged))
        if check:
            register_onnxruntime_schemas()
            onnx.checker.check_model(str(staged), full_check=True)
        library = ops_library if needs_op_library(model) else None
        beside += [Path(library).name] if library else []
        write_genai_config(staged, {p.key: p.value for p in model.metadata_props}, weights.shape, token_ids, library)
        for name, write in companions.items():
            write(stage / name)
        commit(stage, out.parent, [data_name, *beside, out.name])     # the model last: it names the data
    for line in weights.summary() if note and options.quantize else []:
        note(line)
    return out

