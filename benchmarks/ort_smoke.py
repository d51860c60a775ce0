"""A small graph that onnxruntime's own CUDA kernels must run right before anything is timed.

:func:`smoke` runs MatMul, Add, Greater, Where,
NonZero, Gather, ReduceSum and Softmax on the requested provider, with integer-valued
inputs so that every result is exact in float32 whatever the summation order, and compares
them with NumPy. A kernel image missing for the device fails here, in seconds, with
onnxruntime's own message; a node the provider left to the CPU is listed (from
onnxruntime's profile).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from sparseinfer.model_export.session import PROVIDERS, make_session
from sparseinfer.model_export.onnx_builder import make_model
from sparseinfer.model_export.ort_profile import read_events
from sparseinfer.reference.errors import SparseInferError

def _model():
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "b"], ["z"]),
             helper.make_node("Greater", ["z", "zero"], ["m"]), helper.make_node("Where", ["m", "z", "zero"], ["r"]),
             helper.make_node("NonZero", ["m"], ["nz"]), helper.make_node("Gather", ["r", "rows"], ["g"], axis=0),
             helper.make_node("ReduceSum", ["r", "axes"], ["s"], keepdims=0),
             helper.make_node("Softmax", ["g"], ["p"], axis=-1)]
    graph = helper.make_graph(
        nodes, "smoke",
        [helper.make_tensor_value_info("x", f, [4, 64]), helper.make_tensor_value_info("w", f, [64, 32]),
         helper.make_tensor_value_info("b", f, [32]), helper.make_tensor_value_info("rows", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info(n, t, None) for n, t in (("r", f), ("nz", TensorProto.INT64), ("s", f),
                                                                ("p", f))],
        initializer=[helper.make_tensor("zero", f, [], [0.0]), helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    return make_model(graph)     # the exports' IR version and opset, which the oldest supported onnxruntime reads


def _expected(x, w, b, rows):
    z = x @ w + b
    r = np.where(z > 0, z, np.float32(0))
    g = r[rows]
    e = np.exp(g - g.max(axis=-1, keepdims=True))
    return {"r": r, "nz": np.stack(np.nonzero(z > 0)).astype(np.int64), "s": r.sum(axis=1), "p": e / e.sum(-1, keepdims=True)}


def smoke(provider: str = "cuda") -> dict:
    """Run the graph on ``provider``; raises SparseInferError with the first difference."""
    try:
        import onnxruntime as ort
    except ImportError as e:     # e.g. a wheel for another Python on PYTHONPATH
        raise SparseInferError(f"onnxruntime is not importable: {e}") from None

    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (4, 64)).astype(np.float32)
    w = rng.integers(-3, 4, (64, 32)).astype(np.float32)
    b = rng.integers(-5, 6, 32).astype(np.float32) + np.float32(0.5)     # z is never 0
    rows = np.array([2, 0], dtype=np.int64)
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise SparseInferError(f"onnxruntime {ort.__version__} ({ort.__file__}) has no {PROVIDERS[provider]}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "smoke.onnx"
        path.write_bytes(_model().SerializeToString())
        # the decoder's own session: CUDA / cuDNN preloaded, no TF32, and an error (not a
        # silent CPU fallback) when the provider's libraries do not load
        session = make_session(path, provider, profile=str(Path(tmp) / "smoke"))
        try:
            got = dict(zip(["r", "nz", "s", "p"], session.run(None, {"x": x, "w": w, "b": b, "rows": rows})))
        except Exception as e:   # onnxruntime's own exception types
            raise SparseInferError(f"onnxruntime {ort.__version__} on {provider}: {str(e).splitlines()[0]}") from None
        placed = {}
        for ev in read_events(session.end_profiling()):
            args = ev.get("args", {})
            if ev.get("cat") == "Node" and "op_name" in args:
                placed.setdefault(args.get("provider", "?"), set()).add(args["op_name"])
    want = _expected(x, w, b, rows)
    for name in ("r", "nz", "s"):
        if got[name].shape != want[name].shape or not np.array_equal(got[name], want[name]):
            raise SparseInferError(f"onnxruntime on {provider}: output {name} differs from NumPy's")
    if not np.allclose(got["p"], want["p"], rtol=1e-5, atol=1e-7):
        raise SparseInferError(f"onnxruntime on {provider}: Softmax differs from NumPy's beyond 1e-5")
    return {"onnxruntime": ort.__version__, "module": ort.__file__, "providers": session.get_providers(),
            "ops_by_provider": {p: sorted(ops) for p, ops in sorted(placed.items())}}
