"""Checkpoints in, ONNX exports out, and the exports decoded on onnxruntime.

* Reading checkpoints: ``loaders`` (Hugging Face safetensors folders and GGUF files into
  ``reference.llama.LlamaWeights``, every problem one line), ``tokenizer`` (the tokenizers of
  both, and the byte-level one), ``synthetic`` (ProSparse-like checkpoints made from scratch).
* Writing exports: ``export`` (one prefill + decode ONNX model, dense or sparse, built with
  ``onnx_builder``), ``mlp_functions`` (the sparse MLP's ``SparseMLP`` node and its ONNX
  function body), ``export_folder`` and ``genai_config`` (the folder beside the model that
  onnxruntime-genai and this project's tools read).
* The native op library: ``op_library`` builds, caches and finds the C++ / CUDA library
  (``native/``) that runs the ``SparseMLP`` nodes.
* Decoding: ``session`` (onnxruntime sessions, the op library registered), ``export_check``
  (what an export is, from its metadata and graph), ``decode`` (``OnnxDecoder``: the KV cache,
  one step at a time), ``generation`` (greedy / top-p generation and its statistics),
  ``ort_profile`` (onnxruntime's profile, summarised) and ``machine`` (what a measurement
  records about the machine).

This package builds on ``reference`` (the model, the activations, the α schedule) and on
``kernels`` for the constants the native library is compiled with; ``evaluation``,
``benchmarks`` and ``tools`` build on it.
"""
