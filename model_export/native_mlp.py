"""Registered native kernels for a sparse export's MLPs on onnxruntime's CPU provider.

A sparse export carries its MLP custom ops (``mlp_functions``) as ONNX function bodies
made of standard ops; every onnxruntime runs them, but the bodies copy the kept rows
(Gather) before multiplying and count sign bits with a dozen elementwise ops. Here the
decoder registers a native kernel instead, through onnxruntime-extensions, which
registers Python ops in the functions' domain ``ai.onnx.contrib``; the kernel is
:class:`sparseinfer.kernels.host_mlp.HostSparseMLP` (numba, the reference's order
contract, so its output is the reference's bit for bit).

Why the decode branch is rewritten rather than the four ops overridden one by one:
onnxruntime-extensions hands a Python op a *copy* of every input (measured: 42 ms per
call for one 180 MB weight), so weights cannot travel as inputs. At load time each
decode branch's ``SignPack -> PredictZeroRows -> SparseGateUp -> SparseDown`` becomes one
``SparseMLPHost`` node whose input is x alone; its attributes name a per-session store
holding that layer's weights and α, and say whether anything reads the mask and row
outputs (debug exports); if not, they come back empty. The weights are memory-mapped from the model's
external data file and handed to onnxruntime as its initializers too, so the prefill
branch and the native kernel share one copy. The file on disk is never modified.
"""
from __future__ import annotations

import itertools
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from sparseinfer.reference.errors import SparseInferError

from .mlp_functions import DOMAIN

NATIVE_OP = "SparseMLPHost"
INLINE_BYTES = 1 << 16            # external tensors smaller than this are read into the model
_STORES: dict[str, dict[int, "_Layer"]] = {}     # store key -> layer -> its kernel, α and counters
_KEYS = itertools.count()
_registered = False


@dataclass
class _Layer:
    mlp: object                    # HostSparseMLP
    alpha_milli: int
    calls: int = 0                 # decode steps run
    rows_skipped: int = 0          # rows predicted zero, summed over the steps
    rows_computed: int = 0         # rows whose up and down products were computed (+AS)


def available() -> str | None:
    """None when native kernels can run here, else the reason they cannot."""
    try:
        import numba  # noqa: F401
        import onnxruntime_extensions  # noqa: F401
    except ImportError as e:
        return f"native MLP kernels need numba and onnxruntime-extensions ({e})"
    return None


def _register_op() -> str:
    """Declare the Python op once per process; returns the extensions library to register."""
    global _registered
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    if not _registered:
        @onnx_op(op_type=NATIVE_OP, inputs=[PyCustomOpDef.dt_float],
                 outputs=[PyCustomOpDef.dt_bool, PyCustomOpDef.dt_int64, PyCustomOpDef.dt_float],
                 attrs={"store": PyCustomOpDef.dt_string, "layer": PyCustomOpDef.dt_int64,
                        "masks": PyCustomOpDef.dt_int64})
        def sparse_mlp_host(x, store, layer, masks):
            entry = _STORES[store][layer]
            out, zero, rows = entry.mlp(np.ascontiguousarray(x, dtype=np.float32).reshape(-1), entry.alpha_milli)
            entry.calls += 1
            entry.rows_skipped += int(np.count_nonzero(zero))
            entry.rows_computed += rows.size
            if not masks:          # nothing reads them: skip handing k bools back through Python lists
                zero, rows = zero[:0], rows[:0]
            return zero, rows, out.reshape(1, -1)
        _registered = True
    return get_library_path()


def _tensor_array(t: onnx.TensorProto, base: Path) -> np.ndarray:
    """An initializer as numpy: memory-mapped when its data is external, else decoded."""
    if not uses_external_data(t):
        return onnx.numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    path = base / info["location"]
    if not path.is_file():
        raise SparseInferError(f"external data file {path} of initializer {t.name} is missing")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.memmap(path, dtype=dtype, mode="r", offset=int(info.get("offset", 0)), shape=tuple(t.dims))


def _decode_branches(graph: onnx.GraphProto):
    """The ``then`` graphs of the MLP ``If`` nodes that hold the custom ops, in layer order."""
    for node in graph.node:
        if node.op_type != "If":
            continue
        for attr in node.attribute:
            if attr.name == "then_branch" and any(n.domain == DOMAIN for n in attr.g.node):
                yield attr.g


def _rewrite_branch(branch: onnx.GraphProto, store: str, layer: int) -> dict:
    """Replace the four custom ops by one SparseMLPHost node; returns what the layer needs."""
    ops = {n.op_type: n for n in branch.node if n.domain == DOMAIN}
    pack = ops.get("SignPack") or ops.get("SignPackInt8")
    predict = ops.get("PredictZeroRows") or ops.get("PredictZeroRowsInt8")
    gate_up, down = ops.get("SparseGateUp"), ops.get("SparseDown")
    if not (pack and predict and gate_up and down):
        raise SparseInferError(f"decode branch {branch.name} lacks the sparse MLP ops "
                               f"(found {', '.join(sorted(ops)) or 'none'})")
    alpha = next((a.i for a in predict.attribute if a.name == "alpha_milli"), None)
    if alpha is None:
        raise SparseInferError(f"{predict.name} has no alpha_milli attribute")
    kept = [n for n in branch.node if n.domain != DOMAIN]
    read = {name for n in kept for name in n.input} | {o.name for o in branch.output}
    masks = predict.output[0], gate_up.output[1]
    fused = onnx.helper.make_node(NATIVE_OP, [pack.input[0]], [*masks, down.output[0]],
                                  name=down.name.rsplit("/", 1)[0] + f"/{NATIVE_OP}", domain=DOMAIN,
                                  store=store, layer=layer, masks=int(any(m in read for m in masks)))
    first = min(i for i, n in enumerate(branch.node) if n.domain == DOMAIN)
    kept.insert(first, fused)
    del branch.node[:]
    branch.node.extend(kept)
    return {"w_gate": gate_up.input[2], "w_up": gate_up.input[3], "w_down_t": down.input[2], "alpha_milli": alpha,
            "signs": predict.input[1]}


def _passive_openmp_threads() -> None:
    """Ask numba's OpenMP threads to sleep, not spin, once a kernel ends.

    By default libgomp's threads spin for a while after each parallel region; here they
    would take the cores from onnxruntime's next MatMuls (measured on the 7B shape, 2
    cores: the attention MatMuls of a token took 43-45 ms after the native MLP, 27-36 ms
    with passive threads). libgomp reads the setting once, when numba first loads it,
    so it is set before the first kernel runs; a value the user set is kept.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def native_session(path, threads: int | None = None, model: onnx.ModelProto | None = None,
                   profile: str | None = None):
    """An onnxruntime CPU session of the sparse export at ``path`` with native MLP kernels.

    ``model``: the file's proto when the caller has already read it (it is rewritten here).
    """
    import onnxruntime as ort

    _passive_openmp_threads()
    from sparseinfer.kernels.host_mlp import HostSparseMLP

    from .decode import is_sparse_export, read_model_proto, session_options

    reason = available()
    if reason:
        raise SparseInferError(reason)
    path = Path(path)
    model = read_model_proto(path) if model is None else model
    if not is_sparse_export(model):
        raise SparseInferError(f"{path}: not a sparse export; native MLP kernels apply to sparse exports only")
    meta = {p.key: p.value for p in model.metadata_props}
    if "sparseinfer.activation" not in meta:
        raise SparseInferError(f"{path}: metadata sparseinfer.activation missing; re-export the model")
    store = f"s{next(_KEYS)}"
    layers = [_rewrite_branch(branch, store, i) for i, branch in enumerate(_decode_branches(model.graph))]
    if not layers:
        raise SparseInferError(f"{path}: no sparse MLP decode branches found")

    unused = {l["signs"] for l in layers}                  # the kernel packs W_gate's signs itself
    kept = [t for t in model.graph.initializer if t.name not in unused]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    base = path.parent
    arrays = {t.name: _tensor_array(t, base) for t in model.graph.initializer}
    for t in model.graph.initializer:             # small constants inline: shape inference reads them
        if uses_external_data(t) and arrays[t.name].nbytes < INLINE_BYTES:
            t.raw_data = np.ascontiguousarray(arrays[t.name]).tobytes()
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    external = [t.name for t in model.graph.initializer if uses_external_data(t)]
    activation = meta["sparseinfer.activation"]
    _STORES[store] = {i: _Layer(HostSparseMLP(arrays[l["w_gate"]], arrays[l["w_up"]], arrays[l["w_down_t"]],
                                              activation), l["alpha_milli"]) for i, l in enumerate(layers)}
    first = _STORES[store][0]
    first.mlp(np.ones(first.mlp.d, np.float32), first.alpha_milli)     # compile / load the kernels now

    opts = session_options(threads, profile)
    # onnxruntime's pool threads spin after each op by default; the native kernel's own
    # threads (numba) would then compete with them for the same cores.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.register_custom_ops_library(_register_op())
    values = [ort.OrtValue.ortvalue_from_numpy(arrays[n]) for n in external]
    if external:
        opts.add_external_initializers(external, values)
    try:
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        del _STORES[store]
        raise SparseInferError(f"cannot load {path} with native MLP kernels: {str(e).splitlines()[0]}") from None
    session._sparseinfer_keepalive = (arrays, values)     # the mapped weights live as long as the session
    session._sparseinfer_store = store
    weakref.finalize(session, _STORES.pop, store, None)
    return session


def row_counts(session, reset: bool = False) -> dict | None:
    """What the native kernels of ``session`` skipped since the last reset; None for other sessions.

    ``predicted_sparsity``: rows predicted zero / rows, over layers and decode steps;
    ``rows_computed``: the fraction whose up and down products were computed. Both come
    for free from the kernels, with no debug outputs; the actual sparsity (and so the
    predictor's precision / recall) needs the full gate product, i.e. a ``--debug`` export.
    """
    layers = _STORES.get(getattr(session, "_sparseinfer_store", None))
    if layers is None:
        return None
    rows = sum(e.calls * e.mlp.k for e in layers.values())
    counts = {"decode_steps_counted": min(e.calls for e in layers.values()),
              "predicted_sparsity": sum(e.rows_skipped for e in layers.values()) / rows if rows else float("nan"),
              "rows_computed": sum(e.rows_computed for e in layers.values()) / rows if rows else float("nan")}
    if reset:
        for e in layers.values():
            e.calls = e.rows_skipped = e.rows_computed = 0
    return counts
