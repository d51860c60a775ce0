"""Synthetic ProSparse-like checkpoints in the Hugging Face format.

``make_checkpoint(shape, out_dir, ...)`` writes ``config.json``, ``model.safetensors``
and a byte-level ``tokenizer.json``. Layer shapes come from ``reference.shapes``
(``prosparse-7b`` / ``prosparse-13b`` are the built-in ProSparse-Llama2 shapes with fewer
layers if asked); ``tiny`` is the test shape below. The vocabulary is the byte-level
tokenizer's (258 ids), not Llama's 32000: it only sizes the embedding and the LM head.

How the gate is made sparse, the way ProSparse's is, with a sign predictor that works.
ProSparse's gate pre-activations are far below zero for most (row, token) pairs and far
above for the few active ones, and the sign agreement of x and a W_gate row tracks the
pre-activation: the paper's predictor precision is over 99 % in most layers (Fig. 3),
with a predicted zero set close to the true one. Gaussian rows shifted along the mean
of x give a sparsity target but not that: every row then sits near its threshold on
every token, and the XOR/popcount count (which ignores magnitudes) errs often. So:

* Sign features. ``N_FEATURES`` random ±1 vectors v_f. Every token carries the same
  number n = round((1 - target) * N_FEATURES) of them, chosen at random per token id:
  embedding = ``EMBED_COMMON`` * a fixed ±1 pattern s (the common direction of the
  residual stream) + N(0, 1) noise + ``FEATURE_EMBED`` / sqrt(n) * sum of its v_f.
* Feature detectors. Row i of W_gate detects feature f(i) = i mod N_FEATURES:
  w_i = g_i + ``FEATURE_GATE`` d^-1/2 v_f(i) - gamma_i u, g_i ~ N(0, 1/d), u the common
  direction of the layer's MLP inputs (``common_direction``: the unit vector whose
  smallest cosine with any input is largest; close to s). On a token that carries f(i), both the
  pre-activation and the count of agreeing signs are large; on the others the shift
  -gamma_i u turns the row's signs against the typical signs of x, so the product is
  negative and most sign products are negative too: the popcount tracks the
  pre-activation, because magnitude and sign carry the same information.
* Calibration. ``z_it = (g_i + v-part) . x_t - gamma_i (u . x_t)`` is linear in gamma_i.
  Layers are calibrated in order during one prefill of ``CALIBRATION_TEXT`` (each sees
  the inputs the calibrated layers below produce); gamma_i is put midway in the gap
  between the tokens that lack feature f(i) and those that carry it (mean of the two
  group medians if they overlap), with the FATReLU threshold T included. This needs
  u . x_t > 0 for every calibration token. The plain mean of the inputs does not give
  that: it leans towards the features of the frequent tokens (space, e, t), so a rare
  token whose features point elsewhere, after a few layers of attention and MLP
  outputs, can land on its far side (``--layers 4`` with seed 0 did). The max-min
  direction keeps every token on the positive side whenever any direction does, and
  also spreads the shift evenly over the tokens (per-token sparsity closer to target).

Range: ``--layers`` 1..``MAX_LAYERS`` and any seed >= 0 (tests/test_checkpoint.py sweeps
1..8 layers of the tiny shape over several seeds).

Decode-time sparsity is then about 1 - n / N_FEATURES = the target per token (tested
within ±2 points on held-out text), and the predictor's precision and recall on held-out
text are ProSparse-like (tested). Attention and the residual mixing add the
token-to-token variation. The construction is the same for every shape and target; on
the 7B shape (4 layers, target 0.9) predicted and actual sparsity agree within a point.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from sparseinfer.reference.activations import Activation
from sparseinfer.reference.dtypes import WEIGHT_DTYPE_NAMES, dtype_name
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.files import commit, staging_folder, write_json
from sparseinfer.reference.llama import LayerWeights, LlamaReference, LlamaWeights
from sparseinfer.reference.shapes import BUILTIN_MODELS, ModelShape

from .loaders.config import hf_config
from .loaders.names import hf_tensors
from .tokenizer import BYTE_SPECIAL_TOKENS, byte_level_tokenizer

BYTE_VOCAB = 256 + len(BYTE_SPECIAL_TOKENS)
BOS_ID, EOS_ID = 256, 257

# The test shape: GQA (4 heads, 2 key/value heads), d and k not multiples of 32 or 64
# on purpose (tails of the sign words), FATReLU as in ProSparse. d = 200 rather than
# smaller: per-token sparsity varies as 1/sqrt(d) around the target.
TINY = ModelShape("synthetic-tiny", hidden_size=200, intermediate_size=552, num_layers=2, num_heads=4,
                  num_kv_heads=2, vocab_size=BYTE_VOCAB, hidden_act="fatrelu:0.01",
                  max_position_embeddings=512, source="model_export/synthetic.py test shape",
                  rope_theta=10000.0, rms_norm_eps=1e-5)

SYNTHETIC_SHAPES = {
    "tiny": TINY,
    "prosparse-7b": replace(BUILTIN_MODELS["prosparse-llama2-7b"], vocab_size=BYTE_VOCAB),
    "prosparse-13b": replace(BUILTIN_MODELS["prosparse-llama2-13b"], vocab_size=BYTE_VOCAB),
}

EMBED_COMMON = 1.0        # size of the shared ±1 component of every embedding (noise is N(0, 1))
N_FEATURES = 40           # sign features; a token carries round((1 - target) * N_FEATURES) of them
FEATURE_EMBED = 4.0       # total size of a token's features in its embedding (the common part is 1, noise N(0, 1))
FEATURE_GATE = 1.5        # size of a row's feature in its W_gate row, relative to the N(0, 1/d) noise
BRANCH_SCALE = 0.3        # attention / MLP outputs relative to the residual stream
NORM_JITTER = 0.05        # RMSNorm weights are 1 + NORM_JITTER * N(0, 1)
DEFAULT_TARGET_SPARSITY = 0.9   # fraction of MLP rows zero at decode time, unless told
MAX_LAYERS = 40           # --layers range 1..MAX_LAYERS: ProSparse-Llama2-13B's depth, the deepest built-in shape

CALIBRATION_TEXT = (
    "The quick brown fox jumps over the lazy dog. Sparse activations let a decoder skip most "
    "rows of its MLP weights: predict the zeros from sign bits, then read only the rows that "
    "matter. 0123456789 Jetson Orin, LPDDR5, 204.8 GB/s. In the beginning was the Word, and "
    "the Word was with God. Call me Ishmael. It was the best of times, it was the worst of "
    "times, it was the age of wisdom, it was the age of foolishness; {x: [1, 2, 3]} == True?\n")


def synthetic_shape(name: str, layers: int | None = None, kv_heads: int | None = None,
                    hidden_act: str | None = None, tie_embeddings: bool = False) -> ModelShape:
    if name not in SYNTHETIC_SHAPES:
        raise SparseInferError(f"unknown synthetic shape {name!r}; expected one of {', '.join(SYNTHETIC_SHAPES)}")
    shape = SYNTHETIC_SHAPES[name]
    changes = {"tie_word_embeddings": bool(tie_embeddings), "name": f"synthetic-{name}"}
    if layers is not None:
        if not 1 <= layers <= MAX_LAYERS:
            raise SparseInferError(f"--layers must be in 1..{MAX_LAYERS}, got {layers}")
        changes["num_layers"] = int(layers)
    if kv_heads is not None:
        if kv_heads < 1 or shape.num_heads % kv_heads:
            raise SparseInferError(f"--kv-heads {kv_heads} must divide the {shape.num_heads} attention heads")
        changes["num_kv_heads"] = int(kv_heads)
    if hidden_act is not None:
        changes["hidden_act"] = str(Activation.parse(hidden_act))
    return replace(shape, **changes)


def features_per_token(target: float) -> int:
    return max(1, round((1.0 - target) * N_FEATURES))


def token_features(vocab: int, target: float, rng: np.random.Generator) -> np.ndarray:
    """Bool [vocab, N_FEATURES]: the features each token carries (the same number for every token)."""
    n = features_per_token(target)
    out = np.zeros((vocab, N_FEATURES), dtype=bool)
    for t in range(vocab):
        out[t, rng.choice(N_FEATURES, n, replace=False)] = True
    return out


def row_features(k: int) -> np.ndarray:
    """The feature each W_gate row detects: rows spread evenly over the features."""
    return np.arange(k) % N_FEATURES


def _random_weights(shape: ModelShape, target: float, rng: np.random.Generator) -> LlamaWeights:
    d, k, hd = shape.d, shape.k, shape.head_dim
    f32 = np.float32

    def normal(rows, cols, scale):
        return (rng.standard_normal((rows, cols), dtype=f32) * f32(scale))

    def norm():
        return (1 + NORM_JITTER * rng.standard_normal(d, dtype=f32)).astype(f32)

    def signs(*size):
        return np.where(rng.random(size) < 0.5, -1, 1).astype(f32)

    common = signs(d) * f32(EMBED_COMMON)
    features = signs(N_FEATURES, d)                                    # v_f
    carried = token_features(shape.vocab_size, target, rng).astype(f32)
    feature_part = carried @ features * f32(FEATURE_EMBED / np.sqrt(features_per_token(target)))
    embed = rng.standard_normal((shape.vocab_size, d), dtype=f32) + common + feature_part
    row_feature = features[row_features(k)] * f32(FEATURE_GATE * d ** -0.5)
    layers = []
    for _ in range(shape.num_layers):
        layers.append(LayerWeights(
            input_norm=norm(), q=normal(shape.num_heads * hd, d, d ** -0.5),
            k=normal(shape.num_kv_heads * hd, d, d ** -0.5), v=normal(shape.num_kv_heads * hd, d, d ** -0.5),
            o=normal(d, shape.num_heads * hd, BRANCH_SCALE * (shape.num_heads * hd) ** -0.5),
            post_norm=norm(), gate=normal(k, d, d ** -0.5) + row_feature, up=normal(k, d, d ** -0.5),
            down=normal(d, k, BRANCH_SCALE * 3 * k ** -0.5)))
    lm_head = embed if shape.tie_word_embeddings else normal(shape.vocab_size, d, d ** -0.5)
    weights = LlamaWeights(shape=shape, embed=embed, layers=layers, final_norm=norm(), lm_head=lm_head)
    return weights, carried.astype(bool)


def common_direction(x: np.ndarray, iterations: int = 2000, rel_gap: float = 1e-2) -> np.ndarray:
    """The unit vector u whose smallest cosine with any row of x [T, d] is (nearly) largest.

    u is the direction of the point w of the convex hull of the normalised rows p_t nearest
    the origin, found by Gilbert's algorithm (1966): step from the current w towards the
    row it is least aligned with, by the exact line search. Every u . x_t is positive iff
    the origin lies outside that hull, i.e. iff the rows have any common direction. The
    best smallest cosine lies between min_t u . p_t and |w|, whose difference is
    gap / |w| (gap = |w|^2 - min_t w . p_t); the loop stops when that is within
    ``rel_gap`` of |w|, i.e. u's smallest cosine is within 1 % of the best. float32 [d].
    """
    p = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float64)
    w = p.mean(axis=0)
    for _ in range(iterations):
        worst = p[int(np.argmin(p @ w))]
        step = w - worst
        gap = float(w @ step)                   # |w|^2 - min_t w . p_t: zero at the optimum
        if gap <= rel_gap * float(w @ w):
            break
        w = w - min(1.0, gap / float(step @ step)) * step
    return (w / np.linalg.norm(w)).astype(np.float32)


def _calibrate_gate(gate: np.ndarray, x: np.ndarray, threshold: float, present: np.ndarray,
                    layer: int = 0) -> None:
    """Shift every row of ``gate`` [k, d] (in place) against the common direction of x [T, d].

    ``present`` [T, k]: whether token t carries row i's feature. Row i is active on token t
    iff gamma_i <= ratio_ti; gamma_i is put midway between the ratios of the tokens that
    lack the feature and of those that carry it (between the two group medians' nearest
    members: the largest ratio of the first group and the smallest of the second, when
    the groups separate; else the mean of the group medians).
    """
    u = common_direction(x)
    proj = x @ u                                    # u . x_t, positive for every token
    if not (proj > 0).all():
        raise SparseInferError(f"synthetic maker: the calibration inputs of layer {layer} lack a common direction "
                               f"({int((proj <= 0).sum())} of {proj.size} tokens on its far side)")
    ratio = (x @ gate.T - np.float32(threshold)) / proj[:, None]     # [T, k]
    absent_max = np.where(present, -np.inf, ratio).max(axis=0)
    present_min = np.where(present, ratio, np.inf).min(axis=0)
    medians = 0.5 * (np.nanmedian(np.where(present, np.nan, ratio), axis=0)
                     + np.nanmedian(np.where(present, ratio, np.nan), axis=0))
    gamma = np.where(absent_max < present_min, 0.5 * (absent_max + present_min), medians).astype(np.float32)
    gate -= gamma[:, None] * u[None, :]


def calibration_ids() -> np.ndarray:
    return np.array([BOS_ID] + list(CALIBRATION_TEXT.encode()), dtype=np.int64)


def make_weights(shape: ModelShape, target_sparsity: float = DEFAULT_TARGET_SPARSITY, seed: int = 0) -> LlamaWeights:
    """Random float32 weights whose decode-time MLP sparsity is ``target_sparsity``."""
    if not 0.0 <= target_sparsity < 1.0:
        raise SparseInferError(f"--target-sparsity must be in [0, 1), got {target_sparsity}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SparseInferError(f"--seed must be an integer >= 0, got {seed!r}")
    act = Activation.parse(shape.hidden_act)
    weights, carried = _random_weights(shape, target_sparsity, np.random.default_rng(seed))
    if act.sparse_capable and target_sparsity > 0:
        ids = calibration_ids()
        present = carried[ids][:, row_features(shape.k)]             # [T, k]
        model = LlamaReference(weights)
        model.prefill(ids, mlp_hook=lambda i, x: _calibrate_gate(weights.layers[i].gate, x, act.threshold, present, i))
    return weights


def synthetic_config(shape: ModelShape, dtype: str, target_sparsity: float, seed: int) -> dict:
    """The checkpoint's ``config.json``: ``loaders.config.hf_config``, the byte-level tokenizer's
    special tokens, the name the tools show and how the weights were made."""
    return {"_name_or_path": f"{shape.name}-{shape.num_layers}l",      # the name the tools show (synthetic-tiny-2l)
            **hf_config(shape, dtype, BOS_ID, EOS_ID),
            "sparseinfer_synthetic": {"shape": shape.name, "target_sparsity": target_sparsity, "seed": seed}}


def make_checkpoint(shape_name: str, out_dir, layers: int | None = None,
                    target_sparsity: float = DEFAULT_TARGET_SPARSITY, seed: int = 0, dtype: str = "fp32",
                    kv_heads: int | None = None, hidden_act: str | None = None, tie_embeddings: bool = False) -> Path:
    """Write a synthetic checkpoint directory; returns its path."""
    if dtype not in WEIGHT_DTYPE_NAMES:
        raise SparseInferError(f"unknown dtype {dtype!r}; expected one of {', '.join(WEIGHT_DTYPE_NAMES)}")
    shape = synthetic_shape(shape_name, layers, kv_heads, hidden_act, tie_embeddings)
    return write_checkpoint(make_weights(shape, target_sparsity, seed), out_dir, dtype, target_sparsity, seed)


def write_checkpoint(weights: LlamaWeights, out_dir, dtype: str = "fp32",
                     target_sparsity: float = DEFAULT_TARGET_SPARSITY, seed: int = 0) -> Path:
    """A synthetic model's weights (``make_weights`` of any shape) as a checkpoint directory with
    the byte-level tokenizer; returns its path."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    with staging_folder(out, "checkpoint", target=out) as stage:    # written whole, moved in together, config last
        save_file(hf_tensors(weights, dtype), str(stage / "model.safetensors"), metadata={"format": "pt"})
        byte_level_tokenizer().save(str(stage / "tokenizer.json"))
        write_json(stage / "config.json", synthetic_config(weights.shape, dtype, target_sparsity, seed))
        commit(stage, out, ["model.safetensors", "tokenizer.json", "config.json"])
    return out


__all__ = ["SYNTHETIC_SHAPES", "TINY", "MAX_LAYERS", "make_checkpoint", "make_weights", "synthetic_config",
           "synthetic_shape", "calibration_ids", "common_direction", "dtype_name", "write_checkpoint"]
