"""What a measured result (``bench-decode``, ``eval``, the benchmarks) records about the machine it
ran on: date, CPU, Python, onnxruntime and, with the cuda provider, the GPUs."""
from __future__ import annotations

import os


def machine_description(provider: str = "cpu") -> dict:
    """Date, CPU, Python and onnxruntime; with the cuda provider also the GPUs nvidia-smi lists."""
    import datetime
    import platform

    import onnxruntime as ort

    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"date": datetime.date.today().isoformat(), "cpu": cpu, "cpu_count": os.cpu_count(),
           "platform": platform.platform(), "python": platform.python_version(), "onnxruntime": ort.__version__}
    if provider == "cuda":
        out["gpu"] = gpu_names()
    return out


def gpu_names() -> list[str]:
    """'name, driver, memory' of each GPU from nvidia-smi; [] where it is missing or fails."""
    import subprocess

    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()] if proc.returncode == 0 else []
