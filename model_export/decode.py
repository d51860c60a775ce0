"""Decode an exported model with onnxruntime: the KV cache and one step at a time.

``OnnxDecoder`` feeds the genai-style I/O of ``export.py``; on CUDA it keeps the KV cache
on the device with IOBinding (only logits come back to the host). A fused export's KV
cache (``sparseinfer.kv_cache = shared``) is one zeroed [1, kv_heads, max_length, head_dim]
buffer per tensor, allocated at each reset and bound as both past and present (the same
OrtValue), which GroupQueryAttention writes in place, on every provider. The session and
its op library come from ``session``, what the export is from ``export_check``; generating
text on a decoder is ``generation``'s.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sparseinfer.reference.errors import SparseInferError

from .export_check import check_export, needs_op_library, read_model_proto
from .op_library import counters
from .session import make_session, onnxruntime_errors, resolve_mlp_kernels

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
        required = (f"{path}: its {info.quantize} block-quantized nodes need the op library (they carry no function "
                    f"body)") if info.quantize else None
        self.mlp_kernels, self.library = resolve_mlp_kernels(mlp_kernels, needs_op_library(model), provider, required)
        del model
        self.session = make_session(path, provider, threads, profile, self.library, cuda_graph)
        self.provider = provider
        self.device = "cuda" if provider == "cuda" else "cpu"        # where the bound buffers live
        self.io_binding = provider == "cuda" if io_binding is None else bool(io_binding)
        self.num_layers, self.kv_heads, self.head_dim = info.num_layers, info.kv_heads, info.head_dim
        self.max_positions, self.vocab_size = info.max_positions, info.vocab_size
        self.sparse, self.shared_kv, self.quantize = info.sparse, info.shared_kv, info.quantize
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
