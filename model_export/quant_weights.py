"""The block-quantized weights of a quantized export, read one layer at a time.

``QuantizedModel(ck, fmt, sparse, down_policy)`` over a ``loaders.OpenCheckpoint``:

* a Hugging Face checkpoint (fp32 / fp16 / bf16) is quantized to ``fmt`` here, one tensor at a
  time (``reference.block_quant.quantize``: round-to-nearest per block), so no more than one
  tensor of one layer is ever held in float32; a NaN or Inf weight is refused naming the
  tensor and the block;
* a GGUF's Q8_0 / Q4_0 / Q4_1 tensors keep their blocks byte for byte, whatever ``fmt`` is; its
  K-quants and floats are converted to ``fmt`` (``gguf_blocks.tensor_blocks``, with a note); Q and
  K come back to the Hugging Face row order by permuting the rows of blocks (no byte changes).

Each linear layer is ``gguf_blocks.TensorBlocks``: uint8 [out, in / 32 * block_bytes], blocks
along ``in``. The MLP's down projection takes one of two layouts (``QuantLayer.down_transposed``):

* W_down^T [k, d] with blocks along d (neuron-major: a skipped neuron skips its bytes), for the
  op library's SparseMLP: sparse exports, and dense ones that MatMulNBits cannot run. A
  checkpoint's W_down^T is quantized in ``fmt`` directly; a GGUF's ffn_down (blocks along k) is
  re-blocked by ``down_policy`` (``gguf_blocks.down_blocks``, Q8_0 by default, with a note);
* W_down [d, k] with blocks along k (llama.cpp's own layout, a GGUF's ffn_down as it is), for
  dense exports whose gate, up and down run as MatMulNBits (``quant_linear.matmul_nbits_fast``:
  Q4_0, and Q8_0 at accuracy level 4), k a multiple of 32.

The SparseMLP op takes one format for W_gate and W_up: a GGUF that stores them in two has its
W_up converted to W_gate's (with a note). ``dequantized()`` is the float32 model the export
computes with (``reference.llama`` runs it as the oracle of the export's tests).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import NamedTuple

import numpy as np

from sparseinfer.reference.block_quant import BLOCK, block_format, dequantize, quantize
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.llama import LayerWeights, LlamaWeights
from sparseinfer.reference.shapes import ModelShape

from .gguf_blocks import DEFAULT_DOWN_POLICY, DOWN_POLICIES, TensorBlocks, down_blocks, tensor_blocks
from .loaders.gguf_file import rope_heads, rope_unpermute
from .loaders.names import EMBEDDING, FINAL_NORM, LAYER_TENSORS, LM_HEAD, expected_shapes, layer_tensor, named_tensors
from .loaders.weights import OpenCheckpoint, fetch_tensor
from .quant_linear import matmul_nbits_fast

LINEAR_FIELDS = ("q", "k", "v", "o", "gate", "up")


class QuantLayer(NamedTuple):
    """One decoder layer of a quantized export: float32 norms, blocks for every linear layer."""

    input_norm: np.ndarray
    post_norm: np.ndarray
    q: TensorBlocks
    k: TensorBlocks
    v: TensorBlocks
    o: TensorBlocks
    gate: TensorBlocks
    up: TensorBlocks
    down: TensorBlocks
    down_transposed: bool          # True: W_down^T [k, d] along d (SparseMLP); False: W_down [d, k] along k


def check_quantizable(shape: ModelShape, source: str) -> None:
    """The widths that blocks run along are whole blocks: d (every projection's input but
    o_proj's) and heads x head_dim (o_proj's input); refused, not padded."""
    attention = shape.num_heads * shape.head_dim
    for what, n in (("hidden size d", shape.d), ("attention width heads x head_dim", attention)):
        if n % BLOCK:
            raise SparseInferError(f"{source}: {what} = {n} is not a multiple of {BLOCK}; a quantized export needs "
                                   f"whole blocks of {BLOCK} weights along it (no padding is done)")


def dequantized(tb: TensorBlocks, name: str = "weights") -> np.ndarray:
    return dequantize(tb.blocks, tb.fmt, tb.cols, name)


def _note_key(note: str) -> str:
    return re.sub(r"(blk|layers)\.\d+\.", r"\1.*.", note)


class QuantizedModel:
    """The weights of a quantized export (module docstring): ``embed`` and ``final_norm`` float32,
    ``lm_head()`` and ``layer(i)`` read (and quantized) when called. ``notes``: one line for each
    conversion made so far."""

    def __init__(self, ck: OpenCheckpoint, fmt, sparse: bool, down_policy: str = DEFAULT_DOWN_POLICY,
                 accuracy_level: int = 0):
        self.ck, self.fmt, self.sparse, self.accuracy_level = ck, block_format(fmt), bool(sparse), accuracy_level
        self.shape = ck.shape
        if down_policy not in DOWN_POLICIES:
            raise SparseInferError(f"unknown ffn_down policy {down_policy!r}; expected one of "
                                   f"{', '.join(DOWN_POLICIES)}")
        self.down_policy = down_policy
        self.gguf = ck.gguf_tensor is not None
        self.tied = bool(self.shape.tie_word_embeddings)
        self.notes: list[str] = []
        self.kept: Counter = Counter()                  # a GGUF's tensors whose blocks travel as they are, by format
        self._expected = expected_shapes(self.shape)
        check_quantizable(self.shape, ck.source)
        self.embed = fetch_tensor(ck.get, EMBEDDING, (self.shape.vocab_size, self.shape.d), ck.source)
        self.final_norm = fetch_tensor(ck.get, FINAL_NORM, (self.shape.d,), ck.source)
        if not self.gguf:
            self.notes.append(f"{ck.source}: linear layers quantized to {self.fmt.name} at export (round-to-nearest "
                              f"per block of {BLOCK})")
        if not self.sparse and self.shape.k % BLOCK:
            self.notes.append(f"{ck.source}: intermediate size k = {self.shape.k} is not a multiple of {BLOCK}: the "
                              f"dense MLPs run in the op library's SparseMLP (dense=1), not in MatMulNBits")

    @classmethod
    def of_weights(cls, weights: LlamaWeights, fmt, sparse: bool, accuracy_level: int = 0,
                   source: str = "weights") -> "QuantizedModel":
        """Float weights in memory quantized the same way (tests, and checkpoints already loaded)."""
        get = named_tensors(weights).get
        return cls(OpenCheckpoint(weights.shape, None, source, get), fmt, sparse, accuracy_level=accuracy_level)

    def num_elements(self) -> int:
        """Weights of the float model (a tied head counted once), as ``LlamaWeights.num_elements``."""
        per_layer = sum(int(np.prod(s)) for s in self._expected.values())
        head = 0 if self.tied else self.shape.vocab_size * self.shape.d
        return self.shape.vocab_size * self.shape.d + self.shape.d + head + self.shape.num_layers * per_layer

    # -- one tensor --------------------------------------------------------------------------
    def _blocks(self, hf: str, expected: tuple[int, int]) -> TensorBlocks:
        """A weight matrix [rows, cols] as blocks along cols: quantized to ``fmt``, or a GGUF's own
        (legacy blocks as they are, other types converted to ``fmt``)."""
        if not self.gguf:
            w = fetch_tensor(self.ck.get, hf, expected, self.ck.source, keep_dtype=True, finite=False)
            return TensorBlocks(self.fmt, quantize(w, self.fmt, f"{self.ck.source}: tensor {hf}"), None)
        t = self._gguf_tensor(hf)
        got = self._checked(tensor_blocks(t, self.fmt), t.name, expected)
        heads = rope_heads(hf, self.shape)
        return got if heads is None else got._replace(blocks=rope_unpermute(got.blocks, heads))

    def _down_t(self, hf: str) -> TensorBlocks:
        """W_down^T [k, d], blocks along d."""
        d, k = self._expected["down"]
        if not self.gguf:
            w = fetch_tensor(self.ck.get, hf, (d, k), self.ck.source, keep_dtype=True, finite=False)
            name = f"{self.ck.source}: tensor {hf} transposed (W_down^T)"
            return TensorBlocks(self.fmt, quantize(np.ascontiguousarray(w.T), self.fmt, name), None)
        t = self._gguf_tensor(hf)
        return self._checked(down_blocks(t, self.fmt, self.down_policy), t.name, (k, d), transposed=True)

    def _gguf_tensor(self, hf: str):
        t = self.ck.gguf_tensor(hf)
        if t is None:
            raise SparseInferError(f"{self.ck.source}: tensor {hf} is missing")
        return t

    def _checked(self, got: TensorBlocks, name: str, expected: tuple[int, int], transposed: bool = False):
        rows, cols = got.blocks.shape[0], got.cols
        if (rows, cols) != tuple(expected):
            stored, implied = ((cols, rows), tuple(expected)[::-1]) if transposed else ((rows, cols), tuple(expected))
            raise SparseInferError(f"{self.ck.source}: tensor {name} has shape {stored}, but the config implies "
                                   f"{implied}")
        return got

    def _record(self, tb: TensorBlocks) -> TensorBlocks:
        if tb.note:
            self.notes.append(tb.note)
        elif self.gguf:
            self.kept[tb.fmt.name] += 1
        return tb

    def _same_format(self, up: TensorBlocks, fmt, name: str) -> TensorBlocks:
        if up.fmt is fmt:
            return up
        return TensorBlocks(fmt, quantize(dequantized(up, name), fmt, name),
                            f"{name}: {up.fmt.name} converted to {fmt.name}, W_gate's (SparseMLP takes one format "
                            f"for W_gate and W_up)")

    def _dense_down(self, gate: TensorBlocks, up: TensorBlocks, hf: str) -> TensorBlocks | None:
        """W_down along k for a dense MLP of MatMulNBits, where they run gate, up and down; else None."""
        def fast(fmt):
            return matmul_nbits_fast(fmt, self.accuracy_level)

        if self.sparse or self.shape.k % BLOCK or not (fast(gate.fmt) and fast(up.fmt)):
            return None
        down = self._blocks(hf, self._expected["down"])
        return down if fast(down.fmt) else None

    # -- what the exporter reads -------------------------------------------------------------
    def lm_head(self) -> TensorBlocks:
        """The LM head [vocab, d]: its own tensor, or the embedding's when tied."""
        hf = EMBEDDING if self.tied else LM_HEAD
        return self._record(self._blocks(hf, (self.shape.vocab_size, self.shape.d)))

    def layer(self, i: int) -> QuantLayer:
        """Layer ``i``'s norms and blocks, read now (module docstring for the down projection)."""
        src, e = self.ck.source, self._expected
        name = {field: layer_tensor(i, hf) for field, hf in LAYER_TENSORS.items()}
        norms = {f: fetch_tensor(self.ck.get, name[f], e[f], src) for f in ("input_norm", "post_norm")}
        lin = {f: self._blocks(name[f], e[f]) for f in LINEAR_FIELDS}
        down = self._dense_down(lin["gate"], lin["up"], name["down"])
        transposed = down is None
        if transposed:
            down = self._down_t(name["down"])
            lin["up"] = self._same_format(lin["up"], lin["gate"].fmt, name["up"])
        for tb in (*lin.values(), down):
            self._record(tb)
        return QuantLayer(**norms, **lin, down=down, down_transposed=transposed)

    def summary(self) -> list[str]:
        """The notes, one line per kind (the same conversion of every layer's tensor counted once)."""
        counts = Counter(_note_key(n) for n in self.notes)
        lines = [key + (f" (x{n})" if n > 1 else "") for key, n in counts.items()]
        if self.kept:
            kept = ", ".join(f"{n} in {fmt}" for fmt, n in sorted(self.kept.items()))
            other = "" if set(self.kept) == {self.fmt.name} else f"; {self.fmt.name} applies to converted tensors only"
            lines.append(f"{self.ck.source}: the file's blocks kept as they are, byte for byte: {kept}{other}")
        return lines

    def dequantized(self) -> LlamaWeights:
        """The float32 weights the export computes with (each layer read again; ``notes`` unchanged)."""
        notes, kept = list(self.notes), Counter(self.kept)
        layers = []
        for i in range(self.shape.num_layers):
            lw = self.layer(i)
            down = dequantized(lw.down)
            layers.append(LayerWeights(input_norm=lw.input_norm, post_norm=lw.post_norm,
                                       **{f: dequantized(getattr(lw, f)) for f in LINEAR_FIELDS},
                                       down=np.ascontiguousarray(down.T) if lw.down_transposed else down))
        weights = LlamaWeights(shape=self.shape, embed=self.embed, layers=layers, final_norm=self.final_norm,
                               lm_head=dequantized(self.lm_head()))
        self.notes, self.kept = notes, kept
        return weights
