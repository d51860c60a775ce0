"""Set a platform's efficiency constants from measured kernel timings.

Input: a benchmark results file (``benchmarks/results/*.json``, written by the kernels
benchmarks) of the form::

    {"device": str, "cuda_version": str, "date": "YYYY-MM-DD", "peak_bandwidth_gb_per_s": float,
     "rows": [{"kernel", "version", "model", "d", "k", "dtype", "sparsity", "verified",
               "latency_us", "latency_us_spread", "bytes", "gb_per_s", "pct_peak",
               "dense_baseline_us", "speedup_vs_dense"}, ...]}

A row of a version that failed on the device holds ``error`` and ``verified: false`` and no
timings; it is skipped like an unverified one. Each verified row is one kernel family's launch that moved ``bytes`` (rows of whole
MLP pipelines, ``kernel`` ``mlp`` or ``mlp_quant``, run several kernels and are left out of the fit); the latency model predicts
``kernel_launch_us + bytes / (fraction · peak)`` with the dense fraction for kernels that
stream whole matrices (dense GEMV, predictors) and the sparse fraction for row-gathering
kernels. A linear least-squares fit over the rows gives both fractions, and the launch time
unless the file measured an empty launch (``empty_launch_us``); a constant with no rows to
fit it keeps the platform's value. Fitted to one pipeline's kernels (``versions``) the
cuBLAS timings of the same steps stand for the dense class. The report lists the model's
relative error on every fitted row.
"""
from __future__ import annotations

import json
from dataclasses import asdict
import numpy as np

from sparseinfer.reference.errors import SparseInferError

from .files import read_document
from .hardware import HardwareSpec

ROW_FIELDS = {"kernel": str, "version": str, "model": str, "d": int, "k": int, "dtype": str, "sparsity": (int, float),
              "verified": bool, "latency_us": (int, float), "latency_us_spread": (int, float), "bytes": int,
              "gb_per_s": (int, float), "pct_peak": (int, float), "dense_baseline_us": (int, float),
              "speedup_vs_dense": (int, float)}
TOP_FIELDS = {"device": str, "cuda_version": str, "date": str, "peak_bandwidth_gb_per_s": (int, float), "rows": list}
DENSE_KERNEL_WORDS = ("dense", "predict", "pack", "cublas")   # kernels/registry.py families and versions
BASELINE_FAMILIES = ("gate_up", "down")             # rows whose dense_baseline_us is cuBLAS doing that step
PIPELINE_KERNELS = ("mlp", "mlp_quant")             # whole-MLP pipeline rows (float, block-quantized): several launches


def _check_fields(where: str, obj, spec: dict) -> None:
    if not isinstance(obj, dict):
        raise SparseInferError(f"{where}: expected a JSON object")
    missing = [k for k in spec if k not in obj]
    if missing:
        raise SparseInferError(f"{where}: missing {', '.join(missing)}")
    for key, kind in spec.items():
        value = obj[key]
        if isinstance(value, bool) and kind is not bool:
            raise SparseInferError(f"{where}: {key} has the wrong type ({value!r})")
        if not isinstance(value, kind):
            raise SparseInferError(f"{where}: {key} has the wrong type ({type(value).__name__})")


def validate_results(data: dict, where: str = "results") -> dict:
    """Check a results document against the schema above (one-line errors)."""
    _check_fields(where, data, TOP_FIELDS)
    if data["peak_bandwidth_gb_per_s"] <= 0:
        raise SparseInferError(f"{where}: peak_bandwidth_gb_per_s must be > 0")
    for i, row in enumerate(data["rows"]):
        if isinstance(row, dict) and "error" in row and row.get("verified") is False:
            continue                     # a version that failed on the device: nothing timed (fit skips it)
        _check_fields(f"{where}: rows[{i}]", row, ROW_FIELDS)
        if row["latency_us"] <= 0 or row["bytes"] <= 0:
            raise SparseInferError(f"{where}: rows[{i}] needs latency_us > 0 and bytes > 0")
    return data


def read_results(path) -> dict:
    return validate_results(read_document(path, "results file", json.loads, (json.JSONDecodeError,)), str(path))


def row_class(row: dict) -> str:
    """``dense`` for kernels that stream whole matrices (dense versions, sign packing, the
    predictor), else ``sparse`` (row-gathering); judged on kernel family and version."""
    name = f"{row['kernel']} {row['version']}".lower()
    if row["sparsity"] == 0 or any(w in name for w in DENSE_KERNEL_WORDS):
        return "dense"
    return "sparse"


def predicted_latency_us(row: dict, peak_gb_per_s: float, eff: dict) -> float:
    fraction = eff[f"{row_class(row)}_bandwidth_fraction"]
    return eff["kernel_launch_us"] + row["bytes"] / (fraction * peak_gb_per_s * 1e9) * 1e6


def cublas_rows(results: dict) -> list[dict]:
    """The cuBLAS dense steps measured beside the kernels, as rows of class dense: each
    verified ``dense`` version row of gate_up / down carries ``dense_baseline_us``, cuBLAS
    doing the same step on the same bytes (two fp16 GEMVs, or one)."""
    return [dict(r, version="cublas", latency_us=r["dense_baseline_us"]) for r in results["rows"]
            if r["verified"] and r["kernel"] in BASELINE_FAMILIES and r["version"] == "dense"]


def calibrate(hw: HardwareSpec, results: dict, versions=None) -> dict:
    """Fit the dense / sparse bandwidth fractions (and the launch time) to verified rows.

    ``versions``: None fits every verified kernel row. A set of (kernel, version) pairs (the
    kernels of one pipeline, say) fits those rows plus the cuBLAS dense steps of the file
    (:func:`cublas_rows`): the sparse fraction then describes the kernels a decode would use,
    and the dense one cuBLAS, not the slower versions kept for comparison. Where the file
    measured an empty kernel launch (``empty_launch_us``) that is the launch time, not fitted.
    """
    verified = [r for r in results["rows"] if r["verified"] and r["kernel"].lower() not in PIPELINE_KERNELS]
    if versions is None:
        rows = verified
    else:
        versions = {(str(k), str(v)) for k, v in versions}
        missing = sorted(versions - {(r["kernel"], r["version"]) for r in verified})
        if missing:
            raise SparseInferError("results have no verified rows of " + ", ".join(f"{k} {v}" for k, v in missing))
        rows = [r for r in verified if (r["kernel"], r["version"]) in versions] + cublas_rows(results)
    skipped = [f"{r['kernel']} {r['version']}" + (" (failed)" if "error" in r else "")
               for r in results["rows"] if not r["verified"]]
    pipelines = [f"{r['kernel']} {r['version']}" for r in results["rows"]
                 if r["verified"] and r["kernel"].lower() in PIPELINE_KERNELS]
    if not rows:
        raise SparseInferError("results have no verified rows to calibrate against")
    peak = float(results["peak_bandwidth_gb_per_s"])
    eff = asdict(hw.efficiency)
    classes = sorted({row_class(r) for r in rows})
    measured_launch = results.get("empty_launch_us")
    if isinstance(measured_launch, (int, float)) and not isinstance(measured_launch, bool) and measured_launch > 0:
        eff["kernel_launch_us"] = float(measured_launch)
        launch_source = "empty_launch_us"
    else:
        launch_source = None
    # unknowns: launch (shared), then 1/fraction per class present: latency = a + bytes/(f·peak)
    fit_launch = launch_source is None and len({(row_class(r), r["bytes"]) for r in rows}) > len(classes)
    launch_source = launch_source or ("fitted" if fit_launch else "platform")
    cols = (["launch"] if fit_launch else []) + classes
    a = np.zeros((len(rows), len(cols)))
    y = np.array([r["latency_us"] for r in rows], dtype=np.float64)
    for i, r in enumerate(rows):
        if fit_launch:
            a[i, 0] = 1.0
        else:
            y[i] -= eff["kernel_launch_us"]
        a[i, cols.index(row_class(r))] = r["bytes"] / (peak * 1e9) * 1e6
    solution, *_ = np.linalg.lstsq(a, y, rcond=None)
    fitted = dict(zip(cols, solution))
    if fit_launch:
        eff["kernel_launch_us"] = max(0.0, float(fitted["launch"]))
    for c in classes:
        inv = float(fitted[c])
        if inv <= 0:
            raise SparseInferError(f"calibration gave a non-positive {c} bandwidth term; check the results rows")
        eff[f"{c}_bandwidth_fraction"] = min(1.0, 1.0 / inv)
    report = []
    for r in rows:
        pred = predicted_latency_us(r, peak, eff)
        report.append({"kernel": r["kernel"], "version": r["version"], "model": r["model"], "class": row_class(r),
                       "sparsity": r["sparsity"], "measured_us": r["latency_us"], "model_us": pred,
                       "rel_error": pred / r["latency_us"] - 1.0})
    return {"device": results["device"], "date": results["date"], "hardware": hw.name,
            "peak_bandwidth_gb_per_s": peak, "fitted": sorted(cols), "launch_source": launch_source,
            "versions": None if versions is None else sorted(f"{k} {v}" for k, v in versions), "efficiency": eff,
            "previous_efficiency": asdict(hw.efficiency), "skipped_unverified": skipped,
            "skipped_pipelines": pipelines, "rows": report,
            "max_abs_rel_error": max(abs(r["rel_error"]) for r in report)}


def calibrated_hardware(hw: HardwareSpec, report: dict) -> HardwareSpec:
    return hw.with_efficiency(**report["efficiency"])


def calibrated_decode_latency(m, hw: HardwareSpec, results: dict | None = None, versions=None, **latency) -> dict:
    """``latency.decode_latency`` of every method on ``hw``; with ``results`` (``read_results``)
    on ``hw`` calibrated to them first (``calibrate`` of ``versions``), the report under
    ``calibration``."""
    from .latency import METHODS, decode_latency

    calibration = None
    if results is not None:
        calibration = calibrate(hw, results, versions)
        hw = calibrated_hardware(hw, calibration)
    data = decode_latency(m, hw, methods=METHODS, **latency)
    if calibration:
        data["calibration"] = calibration
    return data


def synthesise_results(hw: HardwareSpec, rows: list[dict], device: str = "synthetic") -> dict:
    """A results document whose latencies are exactly the model's at ``hw``'s constants.

    Each input row needs kernel, version, model, d, k, sparsity and bytes; used by tests
    (and as an example of the schema) to check that ``calibrate`` recovers the constants.
    """
    eff = asdict(hw.efficiency)
    peak = hw.memory_bandwidth_gb_per_s
    out = []
    for r in rows:
        latency = predicted_latency_us(r, peak, eff)
        dense_us = eff["kernel_launch_us"] + r["bytes"] / max(1e-9, 1.0 - r["sparsity"]) / (
            eff["dense_bandwidth_fraction"] * peak * 1e9) * 1e6
        gb_per_s = r["bytes"] / (latency * 1e-6) / 1e9
        out.append({"kernel": r["kernel"], "version": r["version"], "model": r["model"], "d": r["d"], "k": r["k"],
                    "dtype": "fp16", "sparsity": r["sparsity"], "verified": r.get("verified", True),
                    "latency_us": latency, "latency_us_spread": 0.0, "bytes": r["bytes"], "gb_per_s": gb_per_s,
                    "pct_peak": 100.0 * gb_per_s / peak, "dense_baseline_us": dense_us,
                    "speedup_vs_dense": dense_us / latency})
    return {"device": device, "cuda_version": "n/a", "date": "2026-11-22", "peak_bandwidth_gb_per_s": peak,
            "rows": out}
