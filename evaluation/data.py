"""Local data for the shipped task configs (lm-eval ``custom_dataset`` functions).

Layout under a data directory (``--data-dir``, lm-eval ``--metadata '{"data_dir": DIR}'``
or ``$SPARSEINFER_DATA_DIR``):

* ``gsm8k/test.jsonl``: one problem per line, ``question`` and ``answer`` (ending ``#### N``);
* ``bbh/bbh/<task>.json`` (the BIG-Bench-Hard repository's layout) or ``bbh/<task>.json``:
  ``{"examples": [{"input": ..., "target": ...}, ...]}``.

Every problem is a one-line ``SparseInferError`` naming the path.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from sparseinfer.reference.errors import SparseInferError

DATA_DIR_ENV = "SPARSEINFER_DATA_DIR"

# lm-eval 0.4's bbh_cot_fewshot group, in its order (the BIG-Bench-Hard file names)
BBH_TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting",
)


def resolve_data_dir(data_dir=None) -> Path:
    """The data directory: the argument, else ``$SPARSEINFER_DATA_DIR``; it must exist."""
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
    if not data_dir:
        raise SparseInferError(f"no data directory: pass --data-dir DIR (or set {DATA_DIR_ENV}) holding "
                               f"gsm8k/test.jsonl and bbh/bbh/<task>.json")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise SparseInferError(f"data directory {path} does not exist")
    return path


def gsm8k_path(data_dir) -> Path:
    path = resolve_data_dir(data_dir) / "gsm8k" / "test.jsonl"
    if not path.is_file():
        raise SparseInferError(f"GSM8K data missing: {path} (one JSON object per line, question / answer)")
    return path


def bbh_path(data_dir, task: str) -> Path:
    if task not in BBH_TASKS:
        raise SparseInferError(f"unknown BBH task {task!r}")
    root = resolve_data_dir(data_dir) / "bbh"
    for path in (root / "bbh" / f"{task}.json", root / f"{task}.json"):
        if path.is_file():
            return path
    raise SparseInferError(f"BBH data missing: {root / 'bbh' / f'{task}.json'} (or {root / f'{task}.json'})")


def read_gsm8k(data_dir) -> list[dict]:
    path = gsm8k_path(data_dir)
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SparseInferError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not {"question", "answer"} <= set(row):
            raise SparseInferError(f"{path}:{n}: needs fields question and answer")
        rows.append({"question": str(row["question"]), "answer": str(row["answer"])})
    return rows


def read_bbh(data_dir, task: str) -> list[dict]:
    path = bbh_path(data_dir, task)
    try:
        examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
        return [{"input": str(e["input"]), "target": str(e["target"])} for e in examples]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise SparseInferError(f"{path}: expected {{\"examples\": [{{\"input\": ..., \"target\": ...}}]}}") from None


def _dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_gsm8k(data_dir=None, **_ignored):
    """custom_dataset of ``sparseinfer_gsm8k_cot``: {'test': GSM8K test.jsonl}."""
    return _dataset(read_gsm8k(data_dir))


def load_bbh(data_dir=None, task=None, **_ignored):
    """custom_dataset of each ``sparseinfer_bbh_cot_fewshot_<task>`` (dataset_kwargs: task)."""
    return _dataset(read_bbh(data_dir, task))


def check_data(data_dir, tasks) -> Path:
    """Fail early, one line, when a requested task's files are missing (``tasks``: 'gsm8k',
    'bbh' or 'bbh_<subtask>')."""
    root = resolve_data_dir(data_dir)
    for task in tasks:
        if task == "gsm8k":
            gsm8k_path(root)
        elif task == "bbh":
            for sub in BBH_TASKS:
                bbh_path(root, sub)
        else:
            bbh_path(root, task.removeprefix("bbh_"))
    return root


def task_documents(data_dir, tasks) -> list[str]:
    """The texts a run evaluates (GSM8K questions, BBH inputs) of ``tasks`` ('gsm8k', 'bbh' or
    'bbh_<subtask>'): what calibration prompts must not overlap."""
    texts = []
    for task in tasks:
        if task == "gsm8k":
            texts += [r["question"] for r in read_gsm8k(data_dir)]
        else:
            for sub in (BBH_TASKS if task == "bbh" else (task.removeprefix("bbh_"),)):
                texts += [r["input"] for r in read_bbh(data_dir, sub)]
    return texts
