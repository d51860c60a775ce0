"""onnxruntime sessions of an export: the provider, threads and profiler, the op library
registered for a sparse export's SparseMLP nodes (or its function bodies left to run), and
onnxruntime's errors while running as one line naming the model."""
from __future__ import annotations

import contextlib
from pathlib import Path

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


def resolve_mlp_kernels(requested: str, has_op: bool, provider: str, required: str | None = None
                        ) -> tuple[str, Path | None]:
    """('native', library path) or ('function', None) for a model; ``has_op``: it holds the op
    library's nodes. Explicit requests that cannot be met are errors; 'auto' falls back to the
    bodies, except where the nodes have none (``required``: why the library is needed, e.g. a
    quantized export), where it is the library or an error naming why it cannot be had."""
    from . import op_library

    if requested not in MLP_KERNELS:
        raise SparseInferError(f"unknown MLP kernels {requested!r}; expected {', '.join(MLP_KERNELS)}")
    if has_op and required and requested == "function":
        raise SparseInferError(f"{required}; --mlp-kernels function cannot run it (use native or auto)")
    if requested == "function" or not has_op:
        return "function", None            # a dense (or older) export has no SparseMLP node to override
    try:
        library = op_library.cpu_library() if provider == "cpu" else op_library.cuda_library()
    except SparseInferError as e:
        if requested == "native":
            raise
        if required:
            raise SparseInferError(f"{required}, which cannot be had here: {e}") from None
        return "function", None
    return "native", library
