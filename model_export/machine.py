"""What a measured result (``bench-decode``, ``eval``, the benchmarks) records about the machine it
ran on: date, CPU, Python, onnxruntime, whether large buffers get huge pages and, with the cuda
provider, the GPUs."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MALLOC_HUGETLB = "glibc.malloc.hugetlb"      # glibc >= 2.35: 1 = madvise its mmap'd chunks MADV_HUGEPAGE
MALLOC_HUGETLB_SINCE = (2, 35)


def machine_description(provider: str = "cpu") -> dict:
    """Date, CPU, Python and onnxruntime; with the cuda provider also the GPUs nvidia-smi lists."""
    import datetime

    import onnxruntime as ort

    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"date": datetime.date.today().isoformat(), "cpu": cpu, "cpu_count": os.cpu_count(),
           "platform": platform.platform(), "python": platform.python_version(), "onnxruntime": ort.__version__,
           "huge_pages": huge_pages()}
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


# --- huge pages ---------------------------------------------------------------------------------
# onnxruntime keeps MatMulNBits' packed weights in buffers from malloc. Where the kernel gives
# transparent huge pages only to memory that asks for them ("madvise", Ubuntu's default) and glibc's
# malloc is not told to ask, those buffers sit on 4 KiB pages, and which model of a process decodes
# faster then depends on the order they were loaded in (measured: README, "Huge pages").

def transparent_huge_pages(mode_file=THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode, the bracketed word of ``mode_file`` ('always',
    'madvise' or 'never'); None where it cannot be read (not Linux, no THP)."""
    try:
        found = re.search(r"\[(\w+)\]", Path(mode_file).read_text())
    except (OSError, UnicodeDecodeError):
        return None
    return found.group(1) if found else None


def malloc_hugetlb(environ=None) -> str | None:
    """``glibc.malloc.hugetlb``'s value in GLIBC_TUNABLES (the last one given, as glibc reads them),
    None where it is not set."""
    value = None
    for item in (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "").split(":"):
        name, sep, given = item.partition("=")
        if sep and name == MALLOC_HUGETLB:
            value = given
    return value


def _major_minor(version: str | None) -> tuple[int, int] | None:
    parts = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(parts.group(1)), int(parts.group(2))) if parts else None


def glibc_version(libc_ver=platform.libc_ver) -> tuple[int, int] | None:
    """(major, minor) of the glibc this Python runs on; None for another C library."""
    lib, version = libc_ver()
    return _major_minor(version) if lib == "glibc" else None


def huge_pages(environ=None, mode_file=THP_MODE_FILE, libc_ver=platform.libc_ver) -> dict:
    """The kernel's THP mode, the malloc tunable as set, and glibc's version ("2.36"; None for
    another C library)."""
    glibc = glibc_version(libc_ver)
    return {"transparent_huge_pages": transparent_huge_pages(mode_file), MALLOC_HUGETLB: malloc_hugetlb(environ),
            "glibc": ".".join(map(str, glibc)) if glibc else None}


def huge_page_note(facts: dict) -> str | None:
    """One line for a user timing decodes on the CPU where onnxruntime's weight buffers will sit
    on 4 KiB pages and one environment variable would put them on 2 MiB pages; else None."""
    glibc = _major_minor(facts.get("glibc"))
    if (facts.get("transparent_huge_pages") != "madvise" or facts.get(MALLOC_HUGETLB) not in (None, "0")
            or glibc is None or glibc < MALLOC_HUGETLB_SINCE):
        return None
    return ("transparent huge pages are given here only on request (madvise) and glibc's malloc does not ask: "
            "onnxruntime's packed weights sit on 4 KiB pages, and the first model a process loads may decode "
            "slower than later ones; GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in the environment puts them on 2 MiB "
            "pages (README: Huge pages)")
