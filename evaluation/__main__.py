"""lm-eval's own command line with the ``sparseinfer`` model registered and the shipped task
folder on the include path (lm-eval has no plugin discovery). Its command line splits
``--model_args`` at every comma, so an α schedule takes ``;`` there:

    python -m sparseinfer.evaluation --model sparseinfer \\
        --model_args model=CHECKPOINT_OR_EXPORT,alpha='1.03@0-19;1.00',provider=cpu \\
        --tasks sparseinfer_gsm8k_cot,sparseinfer_bbh_cot_fewshot --metadata '{"data_dir": "DIR"}'
"""
import sys

from . import backend  # noqa: F401  (registers the model)
from .taskgen import TASKS_DIR


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    if "--include_path" not in sys.argv:
        sys.argv[1:1] = ["--include_path", str(TASKS_DIR)]
    cli_evaluate()


if __name__ == "__main__":
    main()
