"""Accuracy through lm-evaluation-harness (issue 15).

* ``backend``: the lm-eval model ``sparseinfer`` (onnxruntime decoding of this project's
  exports; greedy ``generate_until`` with stop strings, ``loglikelihood`` and
  ``loglikelihood_rolling`` on the dense prefill).
* ``data`` + ``tasks/``: lm-eval's own ``gsm8k_cot`` and ``bbh_cot_fewshot`` definitions on
  local files (an ``--include_path`` folder; ``taskgen`` writes it from lm-eval's YAMLs).
* ``exports``: the rows of a Table II/III run (dense, each α, random row dropping), each
  exported once and cached.
* ``runner``: runs the rows through ``lm_eval.simple_evaluate`` and builds the table.

lm-eval is an optional extra (``pip install 'sparseinfer[eval]'``); nothing here imports it
at module level except ``backend``.
"""
