"""Decode an exported model with onnxruntime: KV cache, greedy / top-p sampling, statistics.

``OnnxDecoder`` feeds the genai-style I/O of ``export.py``; on CUDA it keeps the KV cache
on the device with IOBinding (only logits come back to the host). A fused export's KV
cache (``sparseinfer.kv_cache = shared``) is one zeroed [1, kv_heads, max_length, head_dim]
buffer per tensor, allocated at each reset and bound as both past and present (the same
OrtValue), which GroupQueryAttention writes in place, on every provider. ``generate`` streams
tokens to a callback and measures prefill time, decode tokens/s and, when the model has
debug outputs, the decode sparsity and the predictor's precision / recall.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparseinfer.reference.errors import SparseInferError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
MLP_KERNELS = ("auto", "native", "function")
MLP_KERNELS_HELP = ("How a sparse export's SparseMLP nodes run: 'native' = this project's op library "
                    "(C++ on the CPU provider, the CUDA kernels on the CUDA provider; built on first use and "
                    "cached, see 'sparseinfer build-ops'); 'function' = the ONNX function bodies carried in the "
                    "model (standard ops, any onnxruntime); 'auto' = native where the library builds here.")


def session_options(threads: int | None = None, profile: str | None = None):
    """onnxruntime SessionOptions: intra-op threads, and with ``profile`` (a path prefix) its
    own profiler on (``session.end_profiling()`` writes ``<prefix>_<time>.json``; see ort_profile)."""
    import onnxruntime as ort

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise SparseInferError(f"threads must be a whole number >= 1 (or left to onnxruntime), got {threads!r}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 4      # fatal only: a failed run is raised, and reported, once (onnxruntime_errors)
    if threads:
        opts.intra_op_num_threads = threads
    if profile:
        Path(profile).parent.mkdir(parents=True, exist_ok=True)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile)
    return opts


def make_session(path, provider: str = "cpu", threads: int | None = None, profile: str | None = None,
                 library: Path | None = None, cuda_graph: bool = False):
    """An onnxruntime session of ``path``; ``library``: a custom-op library to register first;
    ``cuda_graph``: the CUDA provider captures and replays runs as CUDA graphs (``enable_cuda_graph``)."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise SparseInferError(f"unknown provider {provider!r}; expected cpu or cuda")
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise SparseInferError(f"CUDA execution provider not available in this onnxruntime "
                               f"({', '.join(ort.get_available_providers())}); install onnxruntime-gpu on a CUDA machine")
    if provider == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()       # CUDA / cuDNN from the nvidia-* pip packages or PyTorch's, if any
    opts = session_options(threads, profile)
    if library is not None:
        opts.register_custom_ops_library(str(library))
    try:
        # full float32 MatMuls on CUDA (no TF32): the exports' logits are compared with fp32 error bounds
        options = [{"use_tf32": "0", **({"enable_cuda_graph": "1"} if cuda_graph else {})}] \
            if provider == "cuda" else None
        session = ort.InferenceSession(str(path), opts, providers=[PROVIDERS[provider]], provider_options=options)
    except Exception as e:  # onnxruntime raises its own exception types
        raise SparseInferError(f"cannot load {path}: {str(e).splitlines()[0]}") from None
    # onnxruntime falls back to the CPU, with only a logged warning, when the CUDA
    # provider's libraries (CUDA, cuBLAS, cuDNN) fail to load: never time that as CUDA.
    if PROVIDERS[provider] not in session.get_providers():
        raise SparseInferError(f"{PROVIDERS[provider]} failed to load for {path} (onnxruntime fell back to "
                               f"{', '.join(session.get_providers())}); check its CUDA / cuDNN libraries")
    return session


@contextlib.contextmanager
def onnxruntime_errors(path):
    """An error onnxruntime raises while running ``path`` (one in a custom op included, e.g. the
    op library's status for NaN in an MLP input) as a one-line SparseInferError naming the file."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    raised = (RuntimeError, *(c for c in vars(state).values() if isinstance(c, type) and issubclass(c, Exception)))
    try:
        yield
    except raised as e:
        line = next((x for x in str(e).splitlines() if x.strip()), type(e).__name__)
        raise SparseInferError(f"{path}: onnxruntime failed: {line}") from None


def resolve_mlp_kernels(requested: str, has_op: bool, provider: str) -> tuple[str, Path | None]:
    """('native', library path) or ('function', None) for a model; ``has_op``: it holds SparseMLP
    nodes. Explicit requests that cannot be met are errors; 'auto' falls back to the bodies."""
    from . import op_library

    if requested not in MLP_KERNELS:
        raise SparseInferError(f"unknown MLP kernels {requested!r}; expected {', '.join(MLP_KERNELS)}")
    if requested == "function" or not has_op:
        return "function", None            # a dense (or older) export has no SparseMLP node to override
    try:
        library = op_library.cpu_library() if provider == "cpu" else op_library.cuda_library()
    except SparseInferError:
        if requested == "native":
            raise
        return "function", None
    return "native", library


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

    from sparseinfer.reference.alpha import MAX_ALPHA_MILLI
    from sparseinfer.reference.shapes import MAX_POSITIONS

    from .mlp_functions import DOMAIN, OP_TYPE

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
    nodes = [node for node in model.graph.node if node.domain == DOMAIN and node.op_type == OP_TYPE]
    if not sparse:
        if nodes:
            fail(f"metadata calls it dense, but the graph holds {len(nodes)} {OP_TYPE} nodes")
        return ExportInfo(**sizes, sparse=sparse, shared_kv=shared, max_length=max_length)
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
                      alpha_milli=tuple(int(a) for a in alphas))


def export_info(path) -> ExportInfo:
    """``check_export`` of the model at ``path`` (its graph and metadata; weights left on disk)."""
    return check_export(read_model_proto(path), path)


def has_sparse_mlp_op(model) -> bool:
    """True when the graph holds the op library's SparseMLP nodes."""
    from .mlp_functions import DOMAIN, OP_TYPE

    return any(n.domain == DOMAIN and n.op_type == OP_TYPE for n in model.graph.node)


class OnnxDecoder:
    def __init__(self, path, provider: str = "cpu", threads: int | None = None, mlp_kernels: str = "auto",
                 io_binding: bool | None = None, profile: str | None = None, max_length: int | None = None,
                 static_decode: bool = False, cuda_graph: bool = False):
        """``io_binding``: keep the KV cache in onnxruntime's own buffers on the provider's device
        between steps (IOBinding); default on for cuda, off for cpu (where it also works, and is
        tested, but copies nothing less); always on for a shared-buffer (fused) export.
        ``profile``: a path prefix for onnxruntime's profiler (:meth:`end_profiling`,
        ``ort_profile.summarize``). ``max_length``: a shared KV buffer's length (default: the
        export's ``sparseinfer.max_length``; smaller saves memory, caps the context).

        ``static_decode`` (a fused export, no debug outputs): every decode step runs with the
        same shapes and the same buffers, bound once: input_ids and position_ids [1, 1] and an
        attention_mask of the buffer's full length (ones for the tokens so far, zeros after),
        updated in place, and the logits written into one buffer. That is what a CUDA graph
        replays: ``cuda_graph`` (CUDA provider) turns it on and has onnxruntime capture the
        first decode step and replay it for the next ones; the prefill runs uncaptured
        (``gpu_graph_id`` -1). On the CPU the static path runs as it is (and is tested there)."""
        if cuda_graph and provider != "cuda":
            raise SparseInferError("cuda_graph needs the cuda provider")
        self.static_decode = bool(static_decode or cuda_graph)
        self.cuda_graph = bool(cuda_graph)
        self.path = path
        model = read_model_proto(path)
        info = check_export(model, path)
        self.mlp_kernels, self.library = resolve_mlp_kernels(mlp_kernels, has_sparse_mlp_op(model), provider)
        del model
        self.session = make_session(path, provider, threads, profile, self.library, cuda_graph)
        self.provider = provider
        self.device = "cuda" if provider == "cuda" else "cpu"        # where the bound buffers live
        self.io_binding = provider == "cuda" if io_binding is None else bool(io_binding)
        self.num_layers, self.kv_heads, self.head_dim = info.num_layers, info.kv_heads, info.head_dim
        self.max_positions, self.vocab_size = info.max_positions, info.vocab_size
        self.sparse, self.shared_kv = info.sparse, info.shared_kv
        if self.shared_kv:
            if io_binding is False:
                raise SparseInferError(f"{path}: its KV cache is one buffer shared by past and present, which "
                                       f"needs io_binding (re-export with --portable for plain session.run)")
            self.io_binding = True
            exported = info.max_length
            if max_length is not None and not 0 < max_length <= exported:
                raise SparseInferError(f"max_length {max_length} is outside 1-{exported} (the export's max_length)")
            self.max_positions = min(self.max_positions, max_length or exported)
        self.output_names = [o.name for o in self.session.get_outputs()]
        kv_type = next((i.type for i in self.session.get_inputs() if i.name.startswith("past_key_values.")), "")
        self.kv_dtype = np.float16 if kv_type == "tensor(float16)" else np.float32       # --dtype of the export
        self.debug = any(n.startswith("debug.") for n in self.output_names)
        if self.static_decode and (not self.shared_kv or self.debug):
            raise SparseInferError(f"{path}: static decoding (CUDA graphs) needs a fused export (shared KV buffer) "
                                   f"without debug outputs")
        self.reset()

    def end_profiling(self) -> Path:
        """Stop onnxruntime's profiler; the trace file it wrote (only for ``profile=`` decoders)."""
        return Path(self.session.end_profiling())

    def row_counts(self, reset: bool = False) -> dict | None:
        """Rows the native CPU kernel skipped / computed since the last reset (None elsewhere).

        ``predicted_sparsity``: rows predicted zero / rows, over layers and decode steps;
        ``rows_computed``: the fraction whose up and down products were computed. Both come
        for free from the kernel, with no debug outputs; the actual sparsity (and so the
        predictor's precision / recall) needs the full gate product, i.e. a ``--debug`` export.
        The kernel's counters are process-wide: they count this decoder's steps as long as
        no other native session runs meanwhile.
        """
        if self.mlp_kernels != "native" or self.provider != "cpu":
            return None
        from .op_library import counters

        c = counters(self.library, reset)
        rows = c["rows"]
        return {"decode_steps_counted": c["decode_steps"] // max(self.num_layers, 1),
                "predicted_sparsity": c["rows_skipped"] / rows if rows else float("nan"),
                "rows_computed": c["rows_computed"] / rows if rows else float("nan")}

    def reset(self) -> None:
        names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        if self.shared_kv:
            # one zeroed buffer per tensor for the whole sequence, on the provider's device; bound
            # as past and present alike, GroupQueryAttention writes each step's keys in place
            import onnxruntime as ort

            shape = (1, self.kv_heads, self.max_positions, self.head_dim)
            self.past = {name: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.kv_dtype), self.device, 0)
                         for name in names}
        else:
            empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
            self.past = {name: empty for name in names}
        self.length = 0
        self._static = None

    def step(self, ids) -> tuple[np.ndarray, dict]:
        """Run ``ids`` (prompt or one token); returns logits [len(ids), vocab] and debug outputs."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        if self.length + n > self.max_positions:
            raise SparseInferError(f"{self.length + n} tokens exceed the context of {self.max_positions}")
        with onnxruntime_errors(self.path):
            if self.static_decode and n == 1 and self.length > 0:
                logits = self._run_static(int(ids[0, 0]))
                self.length += 1
                return logits, {}
            feed = {"input_ids": ids, "attention_mask": np.ones((1, self.length + n), dtype=np.int64),
                    "position_ids": np.arange(self.length, self.length + n, dtype=np.int64)[None]}
            if self.io_binding:
                out = self._run_bound(feed)
            else:
                out = dict(zip(self.output_names, self.session.run(None, {**feed, **self.past})))
        if not self.shared_kv:                       # a shared buffer was written in place
            for name in self.past:
                self.past[name] = out[name.replace("past_key_values", "present")]
        self.length += n
        return out["logits"][0], {k: v for k, v in out.items() if k.startswith("debug.")}

    def _run_static(self, token: int) -> np.ndarray:
        """One decode step on the buffers bound once (see ``static_decode``); logits [1, vocab]."""
        import onnxruntime as ort

        if self._static is None:
            vocab = self.session.get_outputs()[0].shape[-1]
            values = {"input_ids": np.zeros((1, 1), np.int64), "position_ids": np.zeros((1, 1), np.int64),
                      "attention_mask": np.zeros((1, self.max_positions), np.int64)}
            values = {k: ort.OrtValue.ortvalue_from_numpy(v, self.device, 0) for k, v in values.items()}
            logits = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, vocab), np.float32, self.device, 0)
            binding = self.session.io_binding()
            for name, value in {**values, **self.past}.items():
                binding.bind_ortvalue_input(name, value)
            for name in self.output_names:
                target = logits if name == "logits" else self.past[name.replace("present", "past_key_values")]
                binding.bind_ortvalue_output(name, target)
            run_options = ort.RunOptions()
            if self.cuda_graph:
                run_options.add_run_config_entry("gpu_graph_id", "1")
            self._static = (values, logits, binding, run_options)
        values, logits, binding, run_options = self._static
        mask = np.zeros((1, self.max_positions), np.int64)
        mask[0, :self.length + 1] = 1
        values["input_ids"].update_inplace(np.array([[token]], np.int64))
        values["position_ids"].update_inplace(np.array([[self.length]], np.int64))
        values["attention_mask"].update_inplace(mask)
        self.session.run_with_iobinding(binding, run_options)
        return np.array(logits.numpy()[0])         # a copy: the buffer is rewritten by the next step

    def _run_bound(self, feed) -> dict:
        """IOBinding: the KV cache stays on the provider's device as OrtValues (fed back as the
        next step's past, or, shared, bound as both past and present); logits and debug outputs
        come back to the host."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        for name, value in self.past.items():
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(value, self.device, 0)
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            if name.startswith("present.") and self.shared_kv:
                binding.bind_ortvalue_output(name, self.past[name.replace("present", "past_key_values")])
            elif name.startswith("present."):
                binding.bind_output(name, self.device, 0)
            else:
                binding.bind_output(name, "cpu")
        run_options = None
        if self.cuda_graph:               # the prefill (and any other shape) runs uncaptured
            run_options = ort.RunOptions()
            run_options.add_run_config_entry("gpu_graph_id", "-1")
        self.session.run_with_iobinding(binding, run_options)
        values = binding.get_outputs()
        return {name: (v if name.startswith("present.") else v.numpy()) for name, v in zip(self.output_names, values)}


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when temperature is 0; else temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):              # shifted first: a tiny temperature gives -inf, exp 0, never NaN
        p = np.exp((z - z.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.cumsum(p[order]) - p[order] < top_p          # smallest prefix with mass >= top_p
    kept = order[keep]
    q = p[kept] / p[kept].sum()
    return int(kept[rng.choice(len(kept), p=q)])


@dataclass
class Generation:
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)   # logits that chose each token
    prefill_s: float = 0.0
    decode_s: float = 0.0
    predicted_zero: list[list[np.ndarray]] = field(default_factory=list)   # [step][layer]
    actual_zero: list[list[np.ndarray]] = field(default_factory=list)
    kernel_rows: dict | None = None          # native kernels' own counts (no debug outputs needed)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else float("nan")

    def stats(self) -> dict:
        out = {"prompt_tokens": len(self.prompt_ids), "new_tokens": len(self.tokens),
               "prefill_s": self.prefill_s, "decode_s": self.decode_s,
               "decode_tokens_per_s": self.decode_tokens_per_s}
        if self.kernel_rows and self.kernel_rows["decode_steps_counted"]:
            out.update({"predicted_sparsity": self.kernel_rows["predicted_sparsity"],
                        "rows_computed": self.kernel_rows["rows_computed"]})
        if self.predicted_zero:
            pred = np.concatenate([np.concatenate(s) for s in self.predicted_zero])
            act = np.concatenate([np.concatenate(s) for s in self.actual_zero])
            both = int((pred & act).sum())
            out.update({"decode_steps_measured": len(self.predicted_zero),
                        "predicted_sparsity": float(pred.mean()), "actual_sparsity": float(act.mean()),
                        "precision": both / max(int(pred.sum()), 1), "recall": both / max(int(act.sum()), 1)})
        return out


def generate(decoder: OnnxDecoder, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, on_token=None, stop_id=None, keep_logits: bool = False) -> Generation:
    """Prefill, then decode up to ``max_new_tokens`` tokens (the first comes from prefill);
    ``stop_id``: an id, or several, any of which ends the generation."""
    from .checkpoint import stop_ids

    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise SparseInferError("the prompt is empty")
    stops = stop_ids(stop_id)
    outside = next((t for t in [*prompt_ids, *sorted(stops)] if not 0 <= t < decoder.vocab_size), None)
    if outside is not None:
        raise SparseInferError(f"token id {outside} is outside the model's vocabulary (0-{decoder.vocab_size - 1}); "
                               f"is the tokenizer the model's own?")
    if len(prompt_ids) + max_new_tokens > decoder.max_positions:
        raise SparseInferError(f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new tokens exceeds "
                               f"the context of {decoder.max_positions}")
    rng = np.random.default_rng(seed)
    gen = Generation(prompt_ids)
    decoder.reset()
    t0 = time.perf_counter()
    logits, _ = decoder.step(prompt_ids)
    logits = logits[-1]
    gen.prefill_s = time.perf_counter() - t0
    decoder.row_counts(reset=True)
    t0 = time.perf_counter()
    for n in range(max_new_tokens):
        tok = sample(logits, temperature, top_p, rng)
        gen.tokens.append(tok)
        if keep_logits:
            gen.logits.append(logits)
        if on_token:
            on_token(tok)
        if n + 1 == max_new_tokens or tok in stops:
            break
        logits, debug = decoder.step([tok])
        logits = logits[-1]
        if debug and decoder.sparse:
            layers = range(decoder.num_layers)
            gen.predicted_zero.append([debug[f"debug.{i}.predicted_zero"] for i in layers])
            gen.actual_zero.append([debug[f"debug.{i}.actual_zero"] for i in layers])
    gen.decode_s = time.perf_counter() - t0
    gen.kernel_rows = decoder.row_counts()
    return gen


def compare_generations(dense: Generation, sparse: Generation) -> dict:
    """First divergence, agreement (positions with the same token) and max |Δlogit| while the
    two saw the same tokens; at the divergence, how far apart the dense logits of the two
    chosen tokens were (a near tie is flipped by a small |Δlogit|)."""
    n = min(len(dense.tokens), len(sparse.tokens))
    same = [a == b for a, b in zip(dense.tokens[:n], sparse.tokens[:n])]
    first = next((j for j, s in enumerate(same) if not s), None)
    upto = n if first is None else first + 1          # logits at the divergence still share inputs
    dl = [float(np.abs(a - b).max()) for a, b in zip(dense.logits[:upto], sparse.logits[:upto])]
    gap = None
    if first is not None and first < len(dense.logits):
        at = dense.logits[first]
        gap = float(at[dense.tokens[first]] - at[sparse.tokens[first]])
    return {"tokens_compared": n, "first_divergence": first, "token_agreement": float(np.mean(same)) if n else 1.0,
            "tokens_agreeing": int(sum(same)), "dense_logit_gap_at_divergence": gap,
            "max_abs_logit_diff": max(dl) if dl else 0.0,
            "dense_tokens_per_s": dense.decode_tokens_per_s, "sparse_tokens_per_s": sparse.decode_tokens_per_s}
