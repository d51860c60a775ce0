"""Our dense export against onnxruntime-genai's model builder, same checkpoint, same runner:
``python -m sparseinfer.benchmarks.genai_builder``.

Three steps, each a subcommand (``cli``), each printing what it did:

* ``convert CHECKPOINT --out HF_DIR`` (``convert``): any checkpoint ``load_checkpoint`` reads
  (a GGUF file too, quantized ones dequantized to float32) written as the Hugging Face Llama
  folder the builder reads: ``config.json``, ``model.safetensors`` (float32, tied embeddings
  once), and the tokenizer's files. Both models are then built from the same float32 weights.
  ``--as-silu`` writes a ReLU-family checkpoint's SiLU twin (same weights, ``hidden_act``
  silu), which the builder's Llama accepts: for a dense model's speed the activation does not
  matter.
* ``build HF_DIR --out DIR --python PY`` (``build``): runs the builder (``PY -m
  onnxruntime_genai.models.builder -i HF_DIR -o DIR -p fp32 -e cpu``) with an interpreter that
  has torch, transformers and onnx_ir (a side virtual environment: they are no dependency of this
  project). ``--precision int4``: the builder's int4 model (round to nearest, blocks of 32,
  accuracy level 4; see ``build``).
* ``run --ours DIR --builder DIR --out RESULT.json`` (``report``): decodes both folders with
  onnxruntime-genai's Generator (the same runner for both) and ours also with
  :class:`~sparseinfer.model_export.decode.OnnxDecoder` (``runners``), greedy, same prompt,
  same number of new tokens, same intra-op threads, in rounds (``rounds``): one warm-up
  round, then ``--rounds`` rounds whose order alternates (forward, then reversed), so that a
  slow spell of the machine falls on every runner alike. Decode tokens/s = (new tokens - 1) /
  the time from the first sampled token to the last (the first comes from the prefill's
  logits), the definition of ``Generation.decode_tokens_per_s``. The result holds the
  medians, the ratio ours / builder per round and of the medians, the models' node counts
  and file sizes (``facts``), the machine, whether the runners chose the same tokens, the
  commands (``--commands-file``: the setup commands, one per line, ``#`` comments skipped;
  this run's own command line is appended) and, with ``--profile-dir``, onnxruntime's
  profile of each model's decode under genai (``model_export.ort_profile``: time per token,
  top ops and top nodes).

``peer.peer_rounds`` times a peer (the builder's int4 model of the same shape) beside one of
our exports in the same rounds and returns the peer's entry for ``bench-decode --peer
genai-int4``: its median tokens/s, ours, and ours / peer.

Other processes on the machine disturb the numbers. Nothing here pauses them; each run
records ``other_cores``, the cores they kept busy meanwhile (/proc/stat less this
process's own CPU time), the result also summarises the quiet rounds alone (every run
under ``rounds.QUIET_CORES``), and ``--quiet-wait-s`` has each round first wait for a quiet
second.

Exit code 0 on success, 1 when a step fails (a message, no traceback), 2 for bad arguments.
"""
