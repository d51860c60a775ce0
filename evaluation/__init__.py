"""Accuracy through lm-evaluation-harness.

* ``backend``: the lm-eval model ``sparseinfer`` (onnxruntime decoding of this project's
  exports); its requests are ``decoder_lm``'s (greedy ``generate_until`` with stop strings,
  ``loglikelihood`` and ``loglikelihood_rolling`` on the dense prefill), on any decoder.
* ``data`` + ``tasks/``: lm-eval's own ``gsm8k_cot`` and ``bbh_cot_fewshot`` definitions on
  local files (an ``--include_path`` folder; ``taskgen`` writes it from lm-eval's YAMLs).
* ``exports``: the rows of a Table II/III run (dense, each α, fixed-mask random row
  dropping), each exported once and cached, and the ``method`` rows (any ``methods.registry``
  method at a target sparsity), which have no export.
* ``method_backend``: the same lm-eval model with ``method=NAME,sparsity=S``, decoding on the
  NumPy reference model with the method in each decode step (prefill dense); ``random`` is
  the paper's per-token control.
* ``runner``: runs the rows through ``lm_eval.simple_evaluate`` and builds the table; the
  accuracy columns of ``compare-methods --tasks`` and ``sweep --tasks``.
* ``estimate``: how long a full Table II/III run takes on one GPU, from the latency model.
* ``ray_shards``: ``--ray``, a row's requests on Ray workers (one model session each),
  gathered in request order.
* ``traced_runs`` + ``design_space``: the runs of ``predictor-stats``, ``sweep`` and
  ``compare-methods`` (a checkpoint traced on prompts by the NumPy reference model, or by
  ``ort_runner`` on onnxruntime exports with debug outputs), their accuracy columns from
  ``runner``.
* ``side_by_side``: a checkpoint exported dense and sparse and decoded side by side
  (``compare``, ``--quantize`` too).
* ``quant_quality``: what a block format costs (dense quantized vs float32) and what the sparse
  MLP costs in it (sparse vs dense quantized), teacher-forced over a fixed text (``quant-quality``).

lm-eval is an optional extra (``pip install 'sparseinfer[eval]'``), and so is Ray
(``pip install 'sparseinfer[ray]'``). Nothing here imports lm-eval at module level except
``backend``, ``decoder_lm``, ``method_backend``, ``estimate`` and ``ray_shards``, and nothing imports Ray
until ``--ray`` is given.
"""
