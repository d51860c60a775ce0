"""ort_profile.summarize on a hand-made trace, where every figure is known."""
from __future__ import annotations

import json

import pytest

from sparseinfer.model_export.ort_profile import one_line, summarize
from sparseinfer.reference.errors import SparseInferError


def _run(ts, dur):
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}


def _node(name, op, provider, ts, dur, suffix="_kernel_time"):
    return {"cat": "Node", "name": f"{name}{suffix}", "ts": ts, "dur": dur, "args": {"op_name": op, "provider": provider}}


def test_summary_of_a_two_provider_trace(tmp_path):
    events = [
        _run(0, 1000), _node("/prefill/MatMul", "MatMul", "CUDAExecutionProvider", 10, 900),      # prefill: skipped
        _run(2000, 400),
        _node("/l0/MatMul", "MatMul", "CUDAExecutionProvider", 2010, 100),
        _node("/l0/NonZero", "NonZero", "CUDAExecutionProvider", 2120, 150),
        _node("/l0/Shape", "Shape", "CPUExecutionProvider", 2280, 10),
        _node("/l0/mlp/If", "If", "CUDAExecutionProvider", 2000, 390),                            # holds the above
        _node("/l0/MatMul", "MatMul", "CUDAExecutionProvider", 2300, 5, suffix="_fence_before"),  # not a kernel
        _run(3000, 600),
        _node("/l0/MatMul", "MatMul", "CUDAExecutionProvider", 3010, 300),
        _node("/l0/NonZero", "NonZero", "CUDAExecutionProvider", 3320, 50),
        _node("/l0/Shape", "Shape", "CPUExecutionProvider", 3380, 30),
        _node("/between/Add", "Add", "CPUExecutionProvider", 3700, 999),                           # outside any run
        {"cat": "Session", "name": "SequentialExecutor::Execute", "ts": 3000, "dur": 590},
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(events))
    s = summarize(path, skip_runs=1, top=2)
    assert s["runs"] == 2 and s["us_per_run"] == 500.0
    assert s["node_us_per_run"] == (100 + 150 + 10 + 300 + 50 + 30) / 2
    assert s["by_provider"] == {"CPUExecutionProvider": {"us_per_run": 20.0, "nodes_per_run": 1.0},
                                "CUDAExecutionProvider": {"us_per_run": 300.0, "nodes_per_run": 2.0}}
    assert s["top_ops"] == [
        {"op": "MatMul", "provider": "CUDAExecutionProvider", "us_per_run": 200.0, "calls_per_run": 1.0,
         "share_of_nodes": round(400 / 640, 3)},
        {"op": "NonZero", "provider": "CUDAExecutionProvider", "us_per_run": 100.0, "calls_per_run": 1.0,
         "share_of_nodes": round(200 / 640, 3)}]
    assert one_line(s, top=2) == "0.50 ms/token in run (CPU 0.02 ms, CUDA 0.30 ms); MatMul 62%, NonZero 31%"
    assert summarize(path, skip_runs=0)["runs"] == 3


def test_bad_traces_are_one_line_errors(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([_run(0, 10)]))
    with pytest.raises(SparseInferError, match="1 model runs, none left after skipping 1"):
        summarize(path)
    path.write_text("{not json")
    with pytest.raises(SparseInferError, match="cannot read onnxruntime profile"):
        summarize(path)
    path.write_text("{}")
    with pytest.raises(SparseInferError, match="not an onnxruntime profile"):
        summarize(path)
