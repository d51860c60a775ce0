"""What a decoder needs to know of an export, read from its metadata and checked against its
graph: a model this project did not export, or whose metadata and graph disagree, is one line
naming the file and what is wrong."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sparseinfer.reference.alpha import MAX_ALPHA_MILLI
from sparseinfer.reference.block_quant import FORMATS
from sparseinfer.reference.errors import SparseInferError
from sparseinfer.reference.shapes import MAX_POSITIONS

from .op_library import DOMAIN, OP_TYPE
from .quant_graph import DENSE

def read_model_proto(path):
    """The model's graph and metadata, external weights left on disk (one-line errors)."""
    import onnx

    if not Path(path).is_file():
        raise SparseInferError(f"no such model: {path}")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's and onnx's own exception types
        raise SparseInferError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


@dataclass(frozen=True)
class ExportInfo:
    """What a decoder needs to know of an export, read from its metadata and checked against
    its graph (``check_export``)."""

    num_layers: int
    kv_heads: int
    head_dim: int
    max_positions: int
    vocab_size: int
    sparse: bool
    shared_kv: bool
    max_length: int
    alpha_milli: tuple[int, ...] | None = None      # a sparse export's α per layer, in thousandths
    quantize: str | None = None                     # a quantized export's block format (q8_0, q4_0, q4_1)


_SIZES = {"num_layers": "sparseinfer.num_layers", "kv_heads": "sparseinfer.num_kv_heads",
          "head_dim": "sparseinfer.head_dim", "max_positions": "sparseinfer.max_position_embeddings",
          "vocab_size": "sparseinfer.vocab_size"}
_FEEDS = ("input_ids", "attention_mask", "position_ids")


def _dims(value) -> list:
    """A graph input's or output's dimensions: ints where fixed, names (or None) where not."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value.type.tensor_type.shape.dim]


def check_export(model, path) -> ExportInfo:
    """The export's metadata, checked: the sizes are positive whole numbers, the flags hold one of
    their values, and the graph is the decoder they describe (its inputs and outputs, the KV
    cache's heads and head size, the vocabulary, a SparseMLP node per layer with the recorded α
    in a sparse export and none in a dense one). A model this project did not export, or whose
    metadata and graph disagree, is one line naming the file and what is wrong."""
    from onnx import TensorProto

    meta = {p.key: p.value for p in model.metadata_props}
    if not any(key.startswith("sparseinfer.") for key in meta):
        raise SparseInferError(f"{path}: not a sparseinfer export (no sparseinfer.* metadata)")

    def fail(what):
        raise SparseInferError(f"{path}: {what}")

    def whole(key, default=None) -> int:
        text = meta.get(key, default)
        if text is None:
            fail(f"metadata {key} is missing")
        if not (text.isascii() and text.isdigit() and int(text) > 0):
            fail(f"metadata {key} = {text!r} is not a positive whole number")
        return int(text)

    def one_of(key, values, default):
        text = meta.get(key, default)
        if text not in values:
            fail(f"metadata {key} = {text!r} is not one of {', '.join(values)}")
        return text

    sizes = {field: whole(key) for field, key in _SIZES.items()}
    quantize = meta.get("sparseinfer.quantize") or None
    if quantize is not None:
        one_of("sparseinfer.quantize", tuple(FORMATS), None)
    if sizes["max_positions"] > MAX_POSITIONS:             # a KV buffer is allocated at this length
        fail(f"metadata sparseinfer.max_position_embeddings {sizes['max_positions']} exceeds {MAX_POSITIONS}")
    sparse = one_of("sparseinfer.sparse", ("True", "False"), None) == "True"
    shared = one_of("sparseinfer.kv_cache", ("shared", "concat"), "concat") == "shared"
    max_length = whole("sparseinfer.max_length", str(sizes["max_positions"]))
    if max_length > sizes["max_positions"]:
        fail(f"metadata sparseinfer.max_length {max_length} exceeds sparseinfer.max_position_embeddings "
             f"{sizes['max_positions']}")
    n = sizes["num_layers"]
    if len(model.graph.input) != len(_FEEDS) + 2 * n:
        fail(f"the graph has {len(model.graph.input)} inputs, but a {n}-layer decoder (its metadata) has "
             f"{len(_FEEDS) + 2 * n}")
    kv = [f"past_key_values.{i}.{t}" for i in range(n) for t in ("key", "value")]
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name: o for o in model.graph.output}
    for what, have, want in (("inputs", inputs, [*_FEEDS, *kv]),
                             ("outputs", {k: v for k, v in outputs.items() if not k.startswith("debug.")},
                              ["logits", *(name.replace("past_key_values", "present") for name in kv)])):
        missing, extra = [x for x in want if x not in have], [x for x in have if x not in want]
        if missing or extra:
            fail(f"the graph's {what} are not those of a {n}-layer decoder (its metadata): "
                 + "; ".join(f"{label} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                             for label, names in (("missing", missing), ("unexpected", extra)) if names))
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    types = {**dict.fromkeys(_FEEDS, (TensorProto.INT64,)), "logits": (TensorProto.FLOAT,),
             **dict.fromkeys(kv, floats), **{name.replace("past_key_values", "present"): floats for name in kv}}
    for name, allowed in types.items():
        got = (inputs[name] if name in inputs else outputs[name]).type.tensor_type.elem_type
        if got not in allowed:
            fail(f"{name} holds {TensorProto.DataType.Name(got)}, where a decoder's holds "
                 f"{' or '.join(map(TensorProto.DataType.Name, allowed))}")
    fits = lambda dim, want: not isinstance(dim, int) or dim == want       # noqa: E731 (a named dim fits)
    for name in kv:
        for value in (inputs[name], outputs[name.replace("past_key_values", "present")]):
            dims = _dims(value)
            if len(dims) != 4 or not fits(dims[1], sizes["kv_heads"]) or not fits(dims[3], sizes["head_dim"]):
                fail(f"{value.name} has dimensions {dims}, but the metadata gives {sizes['kv_heads']} key/value "
                     f"heads of size {sizes['head_dim']}")
        past, present = _dims(inputs[name])[2], _dims(outputs[name.replace("past_key_values", "present")])[2]
        if (past == present) != shared:               # one buffer for both, or present = past + new tokens
            fail(f"metadata sparseinfer.kv_cache is {'shared' if shared else 'concat'}, but {name} is "
                 f"{past!r} long and its present {present!r}")
    logits = _dims(outputs["logits"])
    if len(logits) != 3 or not fits(logits[2], sizes["vocab_size"]):
        fail(f"logits have dimensions {logits}, but metadata sparseinfer.vocab_size is {sizes['vocab_size']}")
    all_nodes = [node for node in model.graph.node if node.domain == DOMAIN and node.op_type == OP_TYPE]
    nodes = [node for node in all_nodes if not any(a.name == DENSE and a.i for a in node.attribute)]
    if not sparse:                     # a quantized dense MLP may be the op's, always dense (dense=1)
        if nodes:
            fail(f"metadata calls it dense, but the graph holds {len(nodes)} {OP_TYPE} nodes")
        if all_nodes and quantize is None:
            fail(f"metadata calls it dense and unquantized, but the graph holds {len(all_nodes)} {OP_TYPE} nodes")
        return ExportInfo(**sizes, sparse=sparse, shared_kv=shared, max_length=max_length, quantize=quantize)
    if len(all_nodes) != len(nodes):
        fail(f"metadata calls it sparse, but the graph holds {len(all_nodes) - len(nodes)} {OP_TYPE} nodes with "
             f"dense=1")
    if len(nodes) != n:
        fail(f"a sparse export of {n} layers should hold {n} {OP_TYPE} nodes, the graph holds {len(nodes)}")
    alphas = meta.get("sparseinfer.alpha_milli", "").split(",")
    if len(alphas) != n or not all(a.isascii() and a.isdigit() and 1 <= int(a) <= MAX_ALPHA_MILLI for a in alphas):
        fail(f"metadata sparseinfer.alpha_milli = {meta.get('sparseinfer.alpha_milli')!r} is not {n} whole "
             f"numbers in 1-{MAX_ALPHA_MILLI}")
    for node, alpha in zip(nodes, alphas):
        got = next((a.i for a in node.attribute if a.name == "alpha_milli"), None)
        if got != int(alpha):
            fail(f"node {node.name} has alpha_milli {got}, but the metadata records {alpha}")
    return ExportInfo(**sizes, sparse=sparse, shared_kv=shared, max_length=max_length,
                      alpha_milli=tuple(int(a) for a in alphas), quantize=quantize)


def export_info(path) -> ExportInfo:
    """``check_export`` of the model at ``path`` (its graph and metadata; weights left on disk)."""
    return check_export(read_model_proto(path), path)


def needs_op_library(model) -> bool:
    """True when the graph holds the op library's nodes (SparseMLP, BlockMatMul): a host runs them
    with the library registered, or, a SparseMLP on float weights only, on its function body."""
    return any(n.domain == DOMAIN for n in model.graph.node)
