"""Hardware specs as data: one TOML file per platform in ``sim/hardware/``.

Every figure carries its unit in its name and a source in the file's ``[sources]`` table;
every efficiency constant (the few numbers the latency model does not derive from a
datasheet) carries a note in ``[efficiency_notes]``. A new platform is one small TOML
file of the same form, passed as ``--hw-file PATH`` (or ``--hw PATH.toml``).
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

from sparseinfer.reference.errors import SparseInferError

from .files import read_document

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

HARDWARE_DIR = Path(__file__).with_name("hardware")
DEFAULT_HARDWARE = "jetson-orin-agx"     # the paper's platform (Fig. 4)


@dataclass(frozen=True)
class Efficiency:
    """The latency model's named efficiency constants, set once per platform.

    dense_bandwidth_fraction: achieved fraction of peak DRAM bandwidth of a kernel that
        streams whole weight matrices (dense GEMV, both predictors).
    sparse_bandwidth_fraction: achieved fraction of peak bandwidth on the rows a
        row-gathering sparse kernel actually reads (skip flags, idle warps, atomics).
    kernel_launch_us: launch plus dependency gap per kernel (graph node).
    compute_fraction: achieved fraction of the compute roof.
    """

    dense_bandwidth_fraction: float
    sparse_bandwidth_fraction: float
    kernel_launch_us: float
    compute_fraction: float


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    title: str
    memory_bandwidth_gb_per_s: float
    memory_gib: float
    l2_cache_mib: float
    sm_count: int
    gpu_clock_ghz: float
    fp16_tensor_tflops: float
    fp32_cuda_tflops: float
    popc_tera_per_s: float
    efficiency: Efficiency
    sources: dict
    efficiency_notes: dict
    path: str = ""

    def with_efficiency(self, **changes) -> "HardwareSpec":
        return replace(self, efficiency=replace(self.efficiency, **changes))

    def to_dict(self) -> dict:
        return asdict(self)


_FIGURES = ("memory_bandwidth_gb_per_s", "memory_gib", "l2_cache_mib", "sm_count", "gpu_clock_ghz",
            "fp16_tensor_tflops", "fp32_cuda_tflops", "popc_tera_per_s")
_EFFICIENCY = tuple(f.name for f in fields(Efficiency))
_FRACTIONS = ("dense_bandwidth_fraction", "sparse_bandwidth_fraction", "compute_fraction")


def _positive(where: str, key: str, value) -> float:
    """A finite number > 0 (TOML's inf and nan are floats too), or one line naming the file and field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SparseInferError(f"{where}: {key} must be a number, got {value!r}")
    if not math.isfinite(value) or not value > 0:
        raise SparseInferError(f"{where}: {key} must be a finite number > 0, got {value}")
    return float(value)


def _table(where: str, data: dict, key: str) -> dict:
    table = data.get(key)
    if not isinstance(table, dict):
        raise SparseInferError(f"{where}: missing [{key}] table")
    return table


def spec_from_dict(data: dict, where: str = "hardware spec") -> HardwareSpec:
    """Validate a parsed TOML document: every figure present, positive and sourced."""
    if "name" not in data:
        raise SparseInferError(f"{where}: missing 'name'")
    if not isinstance(data["name"], str) or not data["name"].strip():
        raise SparseInferError(f"{where}: 'name' must be a non-empty string, got {data['name']!r}")
    missing = [k for k in _FIGURES if k not in data]
    if missing:
        raise SparseInferError(f"{where}: missing {', '.join(missing)}")
    sources = _table(where, data, "sources")
    unsourced = [k for k in _FIGURES if not str(sources.get(k, "")).strip()]
    if unsourced:
        raise SparseInferError(f"{where}: no source given for {', '.join(unsourced)} (add them under [sources])")
    eff = _table(where, data, "efficiency")
    missing = [k for k in _EFFICIENCY if k not in eff]
    if missing:
        raise SparseInferError(f"{where}: [efficiency] is missing {', '.join(missing)}")
    notes = data.get("efficiency_notes", {})
    efficiency = Efficiency(**{k: _positive(where, k, eff[k]) for k in _EFFICIENCY})
    for k in _FRACTIONS:
        if getattr(efficiency, k) > 1:
            raise SparseInferError(f"{where}: {k} is a fraction of peak and must be <= 1, got {getattr(efficiency, k)}")
    figures = {k: _positive(where, k, data[k]) for k in _FIGURES}
    if not isinstance(data["sm_count"], int):
        raise SparseInferError(f"{where}: sm_count must be a whole number, got {data['sm_count']}")
    figures["sm_count"] = data["sm_count"]
    return HardwareSpec(name=data["name"].strip(), title=str(data.get("title", data["name"])), efficiency=efficiency,
                        sources=dict(sources), efficiency_notes=dict(notes), path=str(where), **figures)


def read_hardware_file(path) -> HardwareSpec:
    data = read_document(path, "hardware file", tomllib.loads, (tomllib.TOMLDecodeError,))
    return spec_from_dict(data, str(Path(path)))


@lru_cache(maxsize=1)
def builtin_hardware() -> dict[str, HardwareSpec]:
    """The shipped platforms by name (one TOML file each in sim/hardware/)."""
    specs = [read_hardware_file(p) for p in sorted(HARDWARE_DIR.glob("*.toml"))]
    return {s.name: s for s in specs}


def load_hardware(name_or_path) -> HardwareSpec:
    """A built-in platform by name, or a TOML file of the same form."""
    key = str(name_or_path).strip().lower()
    table = builtin_hardware()
    if key in table:
        return table[key]
    if str(name_or_path).endswith(".toml") or Path(name_or_path).is_file():
        return read_hardware_file(name_or_path)
    raise SparseInferError(f"unknown hardware {name_or_path!r}; built-in: {', '.join(table)} (or pass a .toml file)")
