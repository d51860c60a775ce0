"""Timing like the kernel people do: CUDA events, warm-up, L2 flushed between runs,
median and spread; and the device's peak bandwidth from its properties."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from sparseinfer.kernels.device import cupy

L2_FLUSH_BYTES = 256 * 2 ** 20      # larger than any current L2 (H100: 50 MB)
WARMUP = 5
REPEATS = 50
# cudaDevAttrMemoryClockRate (kHz) and cudaDevAttrGlobalMemoryBusWidth (bits)
_ATTR_MEMORY_CLOCK_KHZ = 36
_ATTR_BUS_WIDTH_BITS = 37


@dataclass
class Timing:
    median_us: float
    spread_us: float      # 90th minus 10th percentile


class Timer:
    def __init__(self, warmup: int = WARMUP, repeats: int = REPEATS):
        cp = cupy()
        self.cp = cp
        self.warmup, self.repeats = warmup, repeats
        self.flush_buffer = cp.empty(L2_FLUSH_BYTES // 4, dtype=cp.int32)

    def flush(self) -> None:
        """Evict the L2 cache (write a buffer larger than it); asynchronous."""
        self.flush_buffer.fill(0)

    def __call__(self, fn, flush: bool = True) -> Timing:
        """``flush=False``: back to back, the GPU waiting for whatever the host has not yet
        issued (a decode loop's view; its many layers keep the L2 cold anyway)."""
        cp = self.cp
        for _ in range(self.warmup):
            fn()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        samples = []
        for _ in range(self.repeats):
            if flush:
                self.flush()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            samples.append(cp.cuda.get_elapsed_time(start, stop) * 1000.0)
        p10, p50, p90 = np.percentile(samples, [10, 50, 90])
        return Timing(float(p50), float(p90 - p10))


def host_us(fn, runs: int = 10) -> float:
    """Mean host time to issue ``fn`` (no waiting on the device, but queued work drained
    before and after): the launch cost a decode loop pays per step when the GPU is faster."""
    stream = cupy().cuda.get_current_stream()
    stream.synchronize()
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    elapsed = time.perf_counter() - start
    stream.synchronize()
    return elapsed / runs * 1e6


def _attribute(cp, props: dict, key: str, attr: int, device: int) -> int:
    """A device property from the properties dict, else the attribute query (CUDA 13 dropped
    the memory clock from cudaDeviceProp); 0 where neither answers."""
    value = props.get(key)
    if not value:
        try:
            value = cp.cuda.runtime.deviceGetAttribute(attr, device)
        except Exception:        # CuPy's CUDARuntimeError, or an attribute this runtime lacks
            value = 0
    return int(value or 0)


def datasheet_peak(name: str):
    """(GB/s, source) of the built-in hardware spec whose model the device name names
    (``sim/hardware/*.toml``), or None."""
    from sparseinfer.sim.hardware import builtin_hardware

    lowered = name.lower()
    for spec in builtin_hardware().values():
        model = spec.name.split("-")[0]            # h100-sxm -> h100, rtx-4090 -> rtx
        if model in lowered and (model != "rtx" or spec.name.split("-")[1] in lowered):
            return spec.memory_bandwidth_gb_per_s, f"datasheet ({spec.name}): the driver reported no memory clock"
    return None


def device_info() -> dict:
    """Name, CUDA version and peak bandwidth: memory clock x bus width x 2 (DDR), or, where
    the driver does not report them, the datasheet figure of a built-in spec (``peak_source``)."""
    cp = cupy()
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    clock_khz = _attribute(cp, props, "memoryClockRate", _ATTR_MEMORY_CLOCK_KHZ, dev.id)
    bus_bits = _attribute(cp, props, "memoryBusWidth", _ATTR_BUS_WIDTH_BITS, dev.id)
    peak, source = clock_khz * 1e3 * bus_bits / 8 * 2 / 1e9, "memory clock x bus width x 2"
    if not peak:
        peak, source = datasheet_peak(name) or (0.0, "unknown: no memory clock from the driver, no datasheet")
    runtime = cp.cuda.runtime.runtimeGetVersion()
    return {"device": name, "cuda_version": f"{runtime // 1000}.{runtime % 1000 // 10}",
            "peak_bandwidth_gb_per_s": round(float(peak), 1), "peak_source": source,
            "memory_clock_khz": clock_khz, "memory_bus_width_bits": bus_bits}


def empty_launch_us(timer: Timer) -> float:
    """One empty kernel launch, the floor for the kernels too small to be bandwidth-bound."""
    empty = cupy().RawKernel('extern "C" __global__ void empty_kernel() {}', "empty_kernel")
    return timer(lambda: empty((1,), (32,), ())).median_us
