"""Accuracy through lm-evaluation-harness (issue 15).

* ``backend``: the lm-eval model ``sparseinfer`` (onnxruntime decoding of this project's
  exports; greedy ``generate_until`` with stop strings, ``loglikelihood`` and
  ``loglikelihood_rolling`` on the dense prefill).
* ``data`` + ``tasks/``: lm-eval's own ``gsm8k_cot`` and ``bbh_cot_fewshot`` definitions on
  local files (an ``--include_path`` folder; ``taskgen`` writes it from lm-eval's YAMLs).
* ``exports``: the rows of a Table II/III run (dense, each α, random row dropping), each
  exported once and cached.
* ``runner``: runs the rows through ``lm_eval.simple_evaluate`` and builds the table.
* ``ray_shards``: ``--ray``, a row's requests on Ray workers (one model session each),
  gathered in request order.

lm-eval is an optional extra (``pip install 'sparseinfer[eval]'``), and so is Ray
(``pip install 'sparseinfer[ray]'``). Nothing here imports lm-eval at module level except
``backend`` and ``ray_shards``, and nothing imports Ray until ``--ray`` is given.
"""
