"""NumPy reference forward pass of a Llama / ProSparse model, with a KV cache.

The model is Hugging Face's ``LlamaForCausalLM`` in float32: RMSNorm, rotary embeddings
(``rotate_half`` convention), grouped-query attention, the gated MLP, a final RMSNorm and
the LM head. It is the oracle that the ONNX export is checked against.

* ``prefill(ids)`` runs the prompt with a dense MLP computed as batched float32 matrix
  products (prefill is dense in the paper and outside the bit-exact contract).
* ``decode(id)`` runs one token; its MLP is the reference's ``mlp_dense`` or, in sparse
  mode, ``mlp_sparse`` with α from an ``AlphaSchedule`` (the order contract of
  ``order_contract.py``). On request it returns each layer's MLP input and ``MLPTrace``:
  in sparse mode the trace of the sparse call, in dense mode the predictor's verdict on
  the same input (nothing skipped), so predictor precision / recall can be measured on a
  dense decode too.

Weights use Hugging Face layouts (``[out_features, in_features]``). Attention, norm and
embedding weights are float32; the MLP weights keep their stored dtype (fp32 / fp16 /
bf16), which the MLP functions widen exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from .activations import Activation
from .alpha import AlphaSchedule
from .errors import SparseInferError
from .shapes import ModelShape
from .mlp import MLPTrace, mlp_dense, mlp_sparse, transposed_down
from .dtypes import dtype_name
from .signs import pack_signs, predict_zero_rows

_F32 = np.float32


@dataclass
class LayerWeights:
    """One decoder layer, Hugging Face layouts."""

    input_norm: np.ndarray      # [d]
    q: np.ndarray               # [heads * head_dim, d]
    k: np.ndarray               # [kv_heads * head_dim, d]
    v: np.ndarray               # [kv_heads * head_dim, d]
    o: np.ndarray               # [d, heads * head_dim]
    post_norm: np.ndarray       # [d]
    gate: np.ndarray            # [k, d]
    up: np.ndarray              # [k, d]
    down: np.ndarray            # [d, k]


@dataclass
class LlamaWeights:
    """A whole model: its shape (``reference.shapes.ModelShape``) and its arrays."""

    shape: ModelShape
    embed: np.ndarray           # [vocab, d]
    layers: list[LayerWeights]
    final_norm: np.ndarray      # [d]
    lm_head: np.ndarray         # [vocab, d]; the embedding itself when tied

    @property
    def activation(self) -> Activation:
        return Activation.parse(self.shape.hidden_act)

    def num_elements(self) -> int:
        """Elements of every array (a tied head counted once)."""
        arrays = [self.embed, self.final_norm, *(getattr(lw, f.name) for lw in self.layers for f in fields(lw))]
        if self.lm_head is not self.embed:
            arrays.append(self.lm_head)
        return sum(int(np.asarray(a).size) for a in arrays)


def rope_tables(head_dim: int, theta: float, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_positions, head_dim // 2] float32 (HF: inv_freq = theta^(-2i/head_dim)).

    The one definition of the rotary tables; the ONNX export bakes these same arrays.
    """
    inv_freq = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.arange(max_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(_F32), np.sin(angles).astype(_F32)


def rms_norm(h: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """HF LlamaRMSNorm in float32: weight * h / sqrt(mean(h^2) + eps)."""
    var = np.mean(h * h, axis=-1, keepdims=True, dtype=_F32)
    return (weight * (h / np.sqrt(var + _F32(eps)))).astype(_F32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [heads, T, head_dim]; cos/sin [T, head_dim/2]; HF rotate_half convention."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(_F32)


@dataclass
class DecodeStep:
    """One decoded token: logits [vocab]; per-layer MLP inputs and traces when requested."""

    logits: np.ndarray
    mlp_inputs: list[np.ndarray] = field(default_factory=list)
    traces: list[MLPTrace] = field(default_factory=list)


class LlamaReference:
    """Prefill + decode with a KV cache; ``sparse=True`` makes decode MLPs sparse."""

    def __init__(self, weights: LlamaWeights, sparse: bool = False, alpha="1.00",
                 mode: str = "predicted+actual"):
        self.w = weights
        self.shape = weights.shape
        self.act = weights.activation
        self.sparse = bool(sparse)
        self.mode = mode
        self.schedule = AlphaSchedule.parse(alpha)
        self.alpha_milli = self.schedule.per_layer_milli(self.shape.num_layers)
        if self.sparse and not self.act.sparse_capable:
            raise SparseInferError(f"activation {self.act} has no exact zeros; sparse decode needs relu or fatrelu")
        self.cos, self.sin = rope_tables(self.shape.head_dim, self.shape.rope_theta,
                                         self.shape.max_position_embeddings)
        self._gate_signs = [None] * self.shape.num_layers   # packed once, on first use
        self._down_t = [None] * self.shape.num_layers       # W_down^T, transposed once, on first use
        self.reset()

    # -- cache ---------------------------------------------------------------------------
    def reset(self) -> None:
        s = self.shape
        empty = np.zeros((s.num_kv_heads, 0, s.head_dim), dtype=_F32)
        self.keys = [empty] * s.num_layers
        self.values = [empty] * s.num_layers

    @property
    def position(self) -> int:
        """Number of tokens in the KV cache."""
        return int(self.keys[0].shape[1])

    # -- building blocks -----------------------------------------------------------------
    def _attention(self, i: int, x: np.ndarray, start: int) -> np.ndarray:
        """x [T, d] normed input; appends to layer i's cache; returns [T, d]."""
        s, lw = self.shape, self.w.layers[i]
        t, hd = x.shape[0], s.head_dim
        q = (x @ lw.q.T).reshape(t, s.num_heads, hd).transpose(1, 0, 2)
        k = (x @ lw.k.T).reshape(t, s.num_kv_heads, hd).transpose(1, 0, 2)
        v = (x @ lw.v.T).reshape(t, s.num_kv_heads, hd).transpose(1, 0, 2)
        pos = slice(start, start + t)
        q = apply_rope(q, self.cos[pos], self.sin[pos])
        k = apply_rope(k, self.cos[pos], self.sin[pos])
        self.keys[i] = np.concatenate([self.keys[i], k], axis=1)
        self.values[i] = np.concatenate([self.values[i], v], axis=1)
        rep = s.num_heads // s.num_kv_heads
        keys = np.repeat(self.keys[i], rep, axis=0)          # [heads, total, hd]
        values = np.repeat(self.values[i], rep, axis=0)
        scores = (q @ keys.transpose(0, 2, 1)) * _F32(1.0 / np.sqrt(hd))
        total = keys.shape[1]
        causal = np.arange(total)[None, :] <= (start + np.arange(t))[:, None]
        scores = np.where(causal[None], scores, -np.inf)
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs = (probs / probs.sum(axis=-1, keepdims=True)).astype(_F32)
        ctx = (probs @ values).transpose(1, 0, 2).reshape(t, s.num_heads * hd)
        return (ctx @ lw.o.T).astype(_F32)

    def _mlp_batched(self, i: int, x: np.ndarray) -> np.ndarray:
        lw = self.w.layers[i]
        gate = x @ lw.gate.astype(_F32).T
        up = x @ lw.up.astype(_F32).T
        return ((self.act(gate) * up) @ lw.down.astype(_F32).T).astype(_F32)

    def gate_signs(self, i: int) -> np.ndarray:
        """pack_signs(W_gate) of layer i, packed once (as a kernel does at load time)."""
        if self._gate_signs[i] is None:
            self._gate_signs[i] = pack_signs(self.w.layers[i].gate)
        return self._gate_signs[i]

    def down_t(self, i: int) -> np.ndarray:
        """W_down^T of layer i, contiguous, transposed once (as a kernel does at load time)."""
        if self._down_t[i] is None:
            self._down_t[i] = transposed_down(self.w.layers[i].down)
        return self._down_t[i]

    def _mlp_token(self, i: int, x: np.ndarray, want_trace: bool):
        lw = self.w.layers[i]
        if self.sparse:
            return mlp_sparse(x, lw.gate, lw.up, lw.down, self.act, alpha=self.alpha_milli[i] / 1000,
                              mode=self.mode, w_signs=self.gate_signs(i), w_down_t=self.down_t(i))
        out = mlp_dense(x, lw.gate, lw.up, lw.down, self.act, w_down_t=self.down_t(i))
        return out, (self.dense_trace(i, x) if want_trace else None)

    def dense_trace(self, i: int, x: np.ndarray) -> MLPTrace:
        """The predictor's verdict on MLP input x of layer i, with every row computed."""
        lw, d, k = self.w.layers[i], self.shape.d, self.shape.k
        predicted = predict_zero_rows(self.gate_signs(i), pack_signs(x), d, self.alpha_milli[i] / 1000)
        actual = self.act((x @ lw.gate.astype(_F32).T).astype(_F32)) == 0
        everything = np.ones(k, dtype=bool)
        return MLPTrace(mode="dense", d=d, k=k, weight_dtype=dtype_name(lw.gate.dtype),
                        alpha_milli=self.alpha_milli[i], predicted_zero=predicted,
                        actual_zero=actual, computed_gate=everything, computed_up=everything.copy(),
                        computed_down=everything.copy())

    def _check_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise SparseInferError("no tokens given")
        bad = (ids < 0) | (ids >= self.shape.vocab_size)
        if bad.any():
            raise SparseInferError(f"token id {int(ids[bad][0])} is outside the vocabulary (0-{self.shape.vocab_size - 1})")
        if self.position + ids.size > self.shape.max_position_embeddings:
            raise SparseInferError(
                f"{self.position + ids.size} tokens exceed the context of {self.shape.max_position_embeddings}")
        return ids

    def _logits(self, h: np.ndarray) -> np.ndarray:
        return (rms_norm(h, self.w.final_norm, self.shape.rms_norm_eps) @ self.w.lm_head.T).astype(_F32)

    # -- public --------------------------------------------------------------------------
    def prefill(self, ids, mlp_hook=None) -> np.ndarray:
        """Reset the cache and run the prompt densely; logits [T, vocab].

        ``mlp_hook(layer, x)``, when given, sees each layer's MLP input x [T, d] just before
        that MLP runs (the synthetic checkpoint maker calibrates W_gate there).
        """
        self.reset()
        ids = self._check_ids(ids)
        h = self.w.embed[ids].astype(_F32)
        eps = self.shape.rms_norm_eps
        for i, lw in enumerate(self.w.layers):
            h = h + self._attention(i, rms_norm(h, lw.input_norm, eps), 0)
            x = rms_norm(h, lw.post_norm, eps)
            if mlp_hook is not None:
                mlp_hook(i, x)
            h = h + self._mlp_batched(i, x)
        return self._logits(h)

    def decode(self, token_id: int, trace: bool = False) -> DecodeStep:
        """One token through the cache; MLPs dense or sparse per the constructor."""
        ids = self._check_ids([token_id])
        h = self.w.embed[ids].astype(_F32)
        eps = self.shape.rms_norm_eps
        step = DecodeStep(logits=None)
        start = self.position
        for i, lw in enumerate(self.w.layers):
            h = h + self._attention(i, rms_norm(h, lw.input_norm, eps), start)
            x = rms_norm(h, lw.post_norm, eps)[0]
            out, tr = self._mlp_token(i, x, trace)
            h = h + out[None, :]
            if trace:
                step.mlp_inputs.append(x)
                step.traces.append(tr)
        step.logits = self._logits(h)[0]
        return step

    def greedy(self, prompt_ids, max_new_tokens: int) -> list[int]:
        """Greedy continuation of ``prompt_ids``: the new token ids."""
        logits = self.prefill(prompt_ids)[-1]
        out = []
        for n in range(max_new_tokens):
            tok = int(np.argmax(logits))
            out.append(tok)
            if n + 1 < max_new_tokens:
                logits = self.decode(tok).logits
        return out

