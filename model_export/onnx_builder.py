"""A small ONNX graph builder: one ``make_<op>`` helper per op, node names by namespace.

Every node is named ``{scope}/{OpType}`` (``/model/layers.3/mlp/SparseGateUp``) and its
outputs ``{name}/output_{j}``, the convention of onnxruntime-genai's model builder, so a
profile or a graph viewer can be grepped by layer and block. Constants are shared
initializers under ``/const/...``; a child builder (an ``If`` branch) uses its root's
constants, which subgraphs see from the outer scope.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
IR_VERSION = 10


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
                  **attrs) -> list[str]:
        name = self._unique(f"{scope}/{op}{suffix}")
        outs = [f"{name}/output_{j}" for j in range(n_out)]
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

    def make_nonzero_flat(self, mask, scope):
        """Indices [n] int64 of the True entries of a 1-D mask."""
        return self.make_reshape(self.op("NonZero", [mask], scope), [-1], scope)


def make_model(graph: onnx.GraphProto, functions=(), extra_domains=()) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in extra_domains]
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions),
                              producer_name="sparseinfer")
    model.ir_version = IR_VERSION
    return model


FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
