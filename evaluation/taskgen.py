"""Write ``tasks/`` (the shipped ``--include_path`` folder) from lm-eval's own task YAMLs.

    python -m sparseinfer.evaluation.taskgen [--out DIR]

lm-eval's ``gsm8k_cot`` (``tasks/gsm8k/gsm8k-cot.yaml``: 8-shot chain of thought, strict and
flexible match) and ``bbh_cot_fewshot`` (``tasks/bbh/cot_fewshot``: 27 subtasks, 3-shot chain
of thought, exact match on "the answer is ...") are copied field for field; only where the
documents come from changes: ``dataset_path`` / ``dataset_name`` (the Hugging Face hub)
become ``custom_dataset`` (``data.load_gsm8k`` / ``data.load_bbh``, local files), the task
names get the prefix ``sparseinfer_`` (so they never shadow lm-eval's own), and the BBH
group averages its subtasks unweighted (macro; lm-eval's group weights them by size).
``tests/test_eval_tasks.py`` checks the shipped files against the installed lm-eval, so a
drift in lm-eval's definitions shows up as a failing test; rerun this module then.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from .data import BBH_TASKS

PREFIX = "sparseinfer_"
GSM8K_TASK = PREFIX + "gsm8k_cot"
BBH_GROUP = PREFIX + "bbh_cot_fewshot"
BBH_TEMPLATE = "_cot_fewshot_template_yaml"
DATA_FIELDS = ("dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset")
TASKS_DIR = Path(__file__).with_name("tasks")


def bbh_task(sub: str) -> str:
    return f"{BBH_GROUP}_{sub}"


def lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def lm_eval_config(relative: str, recursive: bool = True) -> dict:
    """An lm-eval YAML as data (``!function`` left as paths, includes merged when ``recursive``)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(lm_eval_tasks_dir() / relative, resolve_func=False, recursive=recursive)


def _dump(cfg: dict, function: str | None = None, header: str = "") -> str:
    text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=100)
    if function:
        text += f"custom_dataset: !function {function}\n"
    return header + text


def generate(out: Path = TASKS_DIR) -> list[Path]:
    import lm_eval

    version = getattr(lm_eval, "__version__", "0.4")
    header = (f"# Written by sparseinfer.evaluation.taskgen from lm-eval {version}'s {{src}};\n"
              f"# only the data source and the task name differ. Do not edit: rerun taskgen.\n")
    written = []
    out.mkdir(parents=True, exist_ok=True)

    def write(name, cfg, function=None, src=""):
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_dump(cfg, function, header.format(src=src) if src else ""), encoding="utf-8")
        written.append(path)

    gsm = lm_eval_config("gsm8k/gsm8k-cot.yaml")
    for key in (*DATA_FIELDS, "tag"):
        gsm.pop(key, None)
    gsm["task"] = GSM8K_TASK
    write("gsm8k/gsm8k-cot.yaml", gsm, "sparseinfer.evaluation.data.load_gsm8k", "tasks/gsm8k/gsm8k-cot.yaml")

    template = lm_eval_config(f"bbh/cot_fewshot/{BBH_TEMPLATE}")
    for key in DATA_FIELDS:
        template.pop(key, None)
    write(f"bbh/{BBH_TEMPLATE}", template, "sparseinfer.evaluation.data.load_bbh",
          f"tasks/bbh/cot_fewshot/{BBH_TEMPLATE}")
    for sub in BBH_TASKS:
        cfg = lm_eval_config(f"bbh/cot_fewshot/{sub}.yaml", recursive=False)
        cfg.pop("include", None)
        cfg.pop("dataset_name", None)
        cfg = {"include": BBH_TEMPLATE, "task": bbh_task(sub), "dataset_kwargs": {"task": sub},
               **{k: v for k, v in cfg.items() if k != "task"}}
        write(f"bbh/{sub}.yaml", cfg, src=f"tasks/bbh/cot_fewshot/{sub}.yaml")
    group = lm_eval_config("bbh/cot_fewshot/_bbh_cot_fewshot.yaml")
    group["group"] = BBH_GROUP
    group["task"] = [bbh_task(sub) for sub in BBH_TASKS]
    for agg in group.get("aggregate_metric_list", []):
        agg["weight_by_size"] = False          # macro average over the 27 subtasks
    write(f"bbh/_{BBH_GROUP}.yaml", group, src="tasks/bbh/cot_fewshot/_bbh_cot_fewshot.yaml (macro average)")
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=TASKS_DIR)
    for path in generate(ap.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
