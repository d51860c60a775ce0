"""A small ONNX graph builder: one ``make_<op>`` helper per op, node names by namespace.

Every node is named ``{scope}/{OpType}`` (``/model/layers.3/mlp/SparseGateUp``) and its
outputs ``{name}/output_{j}``, the convention of onnxruntime-genai's model builder, so a
profile or a graph viewer can be grepped by layer and block. Constants are shared
initializers under ``/const/...``; a child builder (an ``If`` branch) uses its root's
constants, which subgraphs see from the outer scope.

Besides standard ops, helpers for onnxruntime's contrib ops (the fused export form):
``GroupQueryAttention`` and ``SkipSimplifiedLayerNormalization`` (domain com.microsoft) and
``SimplifiedLayerNormalization``, which onnxruntime registers in the default domain;
``register_onnxruntime_schemas`` tells onnx's checker about the latter.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
IR_VERSION = 10
MS_DOMAIN = "com.microsoft"          # onnxruntime's contrib ops


def register_onnxruntime_schemas() -> None:
    """Make onnx's checker accept onnxruntime's ``SimplifiedLayerNormalization``.

    onnxruntime registers that op (RMSNorm) in the default ONNX domain, where onnx itself
    has no such op, so ``onnx.checker`` would reject every fused export. This registers a
    schema with onnxruntime's inputs, outputs and attributes (its contrib_defs.cc); the
    com.microsoft ops need none, since the checker skips domains it does not know.
    """
    from onnx import defs

    if defs.has("SimplifiedLayerNormalization"):
        return
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    param, attr = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    defs.register_schema(defs.OpSchema(
        "SimplifiedLayerNormalization", "", 1, doc="onnxruntime's RMSNorm: X / sqrt(mean(X^2) + epsilon) * scale",
        inputs=[param("X", "T"), param("scale", "V")],
        outputs=[param("Y", "V"),
                 param("inv_std_var", "U", param_option=defs.OpSchema.FormalParameterOption.Optional)],
        type_constraints=[("T", floats, ""), ("V", floats, ""), ("U", ["tensor(float)", "tensor(double)"], "")],
        attributes=[attr("axis", helper.make_attribute("axis", -1), ""),
                    attr("epsilon", helper.make_attribute("epsilon", 1e-5), ""),
                    attr("stash_type", helper.make_attribute("stash_type", 1), "")]))


class ExternalData:
    """Initializers written straight into one external-data file as they are made.

    ``onnx.save_model(..., save_as_external_data=True)`` needs the whole model in memory
    with every weight inside the protobuf first (and ``make_graph`` / ``make_model`` copy
    it twice more): three times the model's size, a 7B fp32 export out of reach of a 24 GB
    machine. Here each tensor's bytes go to the file at once, page-aligned (so onnxruntime
    can map them), and the model holds only (location, offset, length).
    """

    ALIGN = 4096
    INLINE_BYTES = 1024          # smaller tensors stay in the model (onnx.save's default threshold)

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "wb")
        self.offset = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()
        return False

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        if array.nbytes < self.INLINE_BYTES:
            return numpy_helper.from_array(array, name)
        pad = -self.offset % self.ALIGN
        self.file.write(b"\0" * pad)
        self.offset += pad
        t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        self.file.write(memoryview(array.reshape(-1)).cast("B"))
        for key, value in (("location", self.path.name), ("offset", self.offset), ("length", array.nbytes)):
            t.external_data.add(key=key, value=str(value))
        t.data_location = onnx.TensorProto.EXTERNAL
        self.offset += array.nbytes
        return t


class GraphBuilder:
    def __init__(self, root: "GraphBuilder | None" = None, external: ExternalData | None = None):
        """``external``: where the root's large initializers are written (None: inside the model)."""
        self.root = root or self
        self.external = external
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}

    # -- plumbing ------------------------------------------------------------------------
    def _unique(self, name: str) -> str:
        root = self.root
        n = root._names.get(name, 0)
        root._names[name] = n + 1
        return name if n == 0 else f"{name}_{n}"

    def make_node(self, op: str, inputs, scope: str, n_out: int = 1, domain: str = "", suffix: str = "",
                  outputs=None, **attrs) -> list[str]:
        """``outputs``: explicit output names (graph outputs written in place, '' = unused)."""
        name = self._unique(f"{scope}/{op}{suffix}")
        outs = list(outputs) if outputs is not None else [f"{name}/output_{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, domain=domain or None, **attrs))
        return outs

    def op(self, op: str, inputs, scope: str, **attrs) -> str:
        """A single-output node; returns its output name."""
        return self.make_node(op, inputs, scope, **attrs)[0]

    def initializer(self, name: str, array: np.ndarray) -> str:
        array, ext = np.ascontiguousarray(array), self.root.external
        self.root.initializers.append(ext.tensor(name, array) if ext else numpy_helper.from_array(array, name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A shared constant initializer (int64 by default)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        root = self.root
        if key not in root._consts:
            flat = "_".join(str(v) for v in arr.reshape(-1)[:8]).replace("-", "m").replace(".", "p")
            name = root._unique(f"/const/{arr.dtype.name}/{flat or 'empty'}" + ("" if arr.ndim else "_scalar"))
            root.initializers.append(numpy_helper.from_array(arr, name))
            root._consts[key] = name
        return root._consts[key]

    def add_input(self, name: str, elem_type, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, name: str, elem_type, shape) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def make_graph(self, name: str) -> onnx.GraphProto:
        inits = self.initializers if self.root is self else []
        return helper.make_graph(self.nodes, name, self.inputs, self.outputs, initializer=inits)

    # -- one helper per op ---------------------------------------------------------------
    def make_matmul(self, a, b, scope):
        return self.op("MatMul", [a, b], scope)

    def make_add(self, a, b, scope):
        return self.op("Add", [a, b], scope)

    def make_sub(self, a, b, scope):
        return self.op("Sub", [a, b], scope)

    def make_mul(self, a, b, scope):
        return self.op("Mul", [a, b], scope)

    def make_div(self, a, b, scope):
        return self.op("Div", [a, b], scope)

    def make_reshape(self, x, shape, scope):
        return self.op("Reshape", [x, self.const(shape)], scope)

    def make_transpose(self, x, perm, scope):
        return self.op("Transpose", [x], scope, perm=list(perm))

    def make_unsqueeze(self, x, axes, scope):
        return self.op("Unsqueeze", [x, self.const(axes)], scope)

    def make_gather(self, data, indices, scope, axis=0):
        return self.op("Gather", [data, indices], scope, axis=axis)

    def make_concat(self, inputs, axis, scope):
        return self.op("Concat", list(inputs), scope, axis=axis)

    def make_cast(self, x, to, scope):
        return self.op("Cast", [x], scope, to=to)

    def make_where(self, cond, a, b, scope):
        return self.op("Where", [cond, a, b], scope)

    def make_shape(self, x, scope, start=None, end=None):
        attrs = {} if start is None else {"start": start, "end": end}
        return self.op("Shape", [x], scope, **attrs)

    def make_softmax(self, x, scope, axis=-1):
        return self.op("Softmax", [x], scope, axis=axis)

    def make_split_halves(self, x, scope):
        return self.make_node("Split", [x], scope, n_out=2, axis=-1, num_outputs=2)

    def make_rms_norm(self, x, weight, eps, scope):
        """weight * x / sqrt(mean(x^2) + eps), the ops of reference.llama.rms_norm."""
        sq = self.make_mul(x, x, scope)
        mean = self.op("ReduceMean", [sq, self.const([-1])], scope, keepdims=1)
        var = self.make_add(mean, self.const(eps, np.float32), scope)
        return self.make_mul(self.make_div(x, self.op("Sqrt", [var], scope), scope), weight, scope)

    def make_gemm(self, a, b, scope, trans_b=0):
        return self.op("Gemm", [a, b], scope, transB=trans_b)

    def make_reduce_sum(self, x, axes, scope, keepdims=0):
        return self.op("ReduceSum", [x, self.const(axes)], scope, keepdims=keepdims)

    def make_simplified_layer_norm(self, x, weight, eps, scope):
        """onnxruntime's RMSNorm: weight * x / sqrt(mean(x^2) + eps) in one node."""
        return self.op("SimplifiedLayerNormalization", [x, weight], scope, axis=-1, epsilon=float(eps),
                       stash_type=1)

    def make_skip_simplified_layer_norm(self, x, skip, weight, eps, scope, with_sum=True):
        """RMSNorm of x + skip in one node; returns (normed, x + skip) (the sum only if asked)."""
        name = self._unique(f"{scope}/SkipSimplifiedLayerNormalization")
        outs = [f"{name}/output_0", "", "", f"{name}/output_3" if with_sum else ""]
        self.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [x, skip, weight],
                                           outs if with_sum else outs[:1], name=name, domain=MS_DOMAIN,
                                           epsilon=float(eps)))
        return outs[0], (outs[3] if with_sum else None)

    def make_group_query_attention(self, qkv, past_k, past_v, seqlens_k, total_len, cos, sin, scope, *,
                                   num_heads, kv_num_heads, scale, outputs):
        """``qkv``: [packed QKV [b, s, (h + 2 kvh) hd]] or [Q, K, V] -> attention [b, s, h hd], rotary
        (rotate_half, non-interleaved) inside; ``outputs``: (attention, present key, present value) names."""
        inputs = [*(*qkv, "", "")[:3], past_k, past_v, seqlens_k, total_len, cos, sin]   # key, value: '' if packed
        return self.make_node("GroupQueryAttention", inputs, scope, domain=MS_DOMAIN, outputs=outputs,
                              num_heads=num_heads, kv_num_heads=kv_num_heads, scale=float(scale), do_rotary=1,
                              rotary_interleaved=0)

    def make_nonzero_flat(self, mask, scope):
        """Indices [n] int64 of the True entries of a 1-D mask."""
        return self.make_reshape(self.op("NonZero", [mask], scope), [-1], scope)


def make_model(graph: onnx.GraphProto, functions=(), extra_domains=()) -> onnx.ModelProto:
    """``extra_domains``: opset version 1 of each (custom / contrib domains)."""
    opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in extra_domains]
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions),
                              producer_name="sparseinfer")
    model.ir_version = IR_VERSION
    return model


FLOAT, FLOAT16, INT32, INT64, BOOL = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT32, TensorProto.INT64,
                                     TensorProto.BOOL)
