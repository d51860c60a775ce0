"""The emulator's fibers (kernels/cuda/cpu_emulation.h) in both of its switch mechanisms:
the x86-64 fast switch and ucontext (AddressSanitizer builds, other processors). A small
program with its own kernels runs barriers, shuffles and ballots across several blocks in
both thread orders, and a kernel whose threads diverge around a barrier must be reported
as deadlocked, not hang."""
from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from sparseinfer.kernels import emulator

CUDA_DIR = Path(emulator.__file__).resolve().parent / "cuda"

PROGRAM = r"""
#include "cpu_emulation.h"
#include <cstdio>

__global__ void diverged(int* out) {    // half of each warp shuffles while the other half waits at __syncthreads
    int v = threadIdx.x;
    if ((threadIdx.x & 31) < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    __syncthreads();
    out[threadIdx.x] = v;
}

__global__ void mix(const int* in, int* out) {    // shared memory, barrier, shuffle, ballot
    __shared__ int s[64];
    const int i = blockIdx.x * 64 + threadIdx.x;
    s[threadIdx.x] = in[i];
    __syncthreads();
    int v = s[63 - threadIdx.x];
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    const unsigned bits = __ballot_sync(0xffffffffu, (v & 1) != 0);
    out[i] = v * 100 + __popc(bits);
}

__global__ void vector_load(const unsigned* base, int offset_words, unsigned* out) {   // one 16-byte load
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(base + offset_words));
    out[threadIdx.x] = v.x + v.y + v.z + v.w;
}

__global__ void exited_lanes(int* out) {   // odd lanes leave, the even ones shuffle over all 32
    if (threadIdx.x & 1) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 2);
}

int main() {
    int in[192], out[192] = {0}, dead[64] = {0};
    alignas(16) unsigned words[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
    unsigned sums[32] = {0};
    for (int offset : {0, 4, 1, 2}) {       // 16-byte aligned, aligned, 4 bytes off, 8 bytes off
        const int rc = emu::launch(&vector_load, dim3{1, 1, 1}, dim3{32, 1, 1}, (const unsigned*)words, offset, sums);
        std::printf("load %d %d %u\n", offset, rc, sums[0]);
    }
    for (int i = 0; i < 192; ++i) in[i] = (i * 37 + 11) % 101;
    for (int order = 0; order < 2; ++order) {
        emu::S.reverse = order == 1;
        const int rc = emu::launch(&mix, dim3{3, 1, 1}, dim3{64, 1, 1}, (const int*)in, out);
        long sum = 0;
        for (int i = 0; i < 192; ++i) sum = sum * 31 % 1000000007 + out[i];
        std::printf("mix %d %ld\n", rc, sum);
    }
    std::printf("diverged %d\n", emu::launch(&diverged, dim3{1, 1, 1}, dim3{64, 1, 1}, dead));
    std::printf("exited %d\n", emu::launch(&exited_lanes, dim3{1, 1, 1}, dim3{64, 1, 1}, dead));
    std::printf("short warp %d\n", emu::launch(&mix, dim3{1, 1, 1}, dim3{48, 1, 1}, (const int*)in, out));
    return 0;
}
"""


def _expected_mix() -> int:
    inp = [(i * 37 + 11) % 101 for i in range(192)]
    out = []
    for b in range(3):
        s = inp[64 * b:64 * b + 64]
        v = [s[63 - t] for t in range(64)]
        v = [v[t] + v[t ^ 1] for t in range(64)]
        for w in (0, 32):
            bits = sum(1 for t in range(w, w + 32) if v[t] & 1)
            out += [v[t] * 100 + bits for t in range(w, w + 32)]
    total = 0
    for x in out:
        total = total * 31 % 1000000007 + x
    return total


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the emulation")
@pytest.mark.parametrize("mode", ["default", "ucontext"])
def test_fibers_switch_right_in_both_orders_and_report_deadlock(tmp_path, mode):
    src = tmp_path / "fibers.cpp"
    src.write_text(PROGRAM)
    exe = tmp_path / "fibers"
    flags = ["-DSPARSEINFER_UCONTEXT_FIBERS"] if mode == "ucontext" else []
    subprocess.run(["g++", "-std=c++20", "-O2", "-w", *flags, "-I", str(CUDA_DIR), str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=60).stdout.splitlines()
    want = _expected_mix()
    # a misaligned 16-byte load is reported (-3), as a GPU faults on it; aligned ones run
    assert lines == ["load 0 0 10", "load 4 0 26", "load 1 -3 14", "load 2 -3 18",
                     f"mix 0 {want}", f"mix 0 {want}", "diverged -2", "exited -4", "short warp -4"]


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the emulation")
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the fast switch is x86-64 only")
@pytest.mark.parametrize(("flags", "want"), [([], "fast"), (["-fsanitize=address"], "ucontext"),
                                             (["-DSPARSEINFER_UCONTEXT_FIBERS"], "ucontext")])
def test_which_switch_a_build_uses(tmp_path, flags, want):
    """x86-64 builds switch fibers by hand; AddressSanitizer builds keep ucontext, whose
    stack switches it follows (the emulated memcheck runs those)."""
    src = tmp_path / "which.cpp"
    src.write_text('#include "cpu_emulation.h"\n#include <cstdio>\nint main() {\n#ifdef SPARSEINFER_FAST_FIBERS\n'
                   '    std::puts("fast");\n#else\n    std::puts("ucontext");\n#endif\n}\n')
    exe = tmp_path / "which"
    subprocess.run(["g++", "-std=c++20", "-w", *flags, "-I", str(CUDA_DIR), str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    env = {"ASAN_OPTIONS": "detect_leaks=0"}
    assert subprocess.run([str(exe)], check=True, capture_output=True, text=True, env=env).stdout.strip() == want


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the emulation")
def test_every_block_starts_with_its_shared_memory_poisoned(tmp_path):
    """Block 0 writes its shared array, block 1 only reads it (a bug): on a GPU block 1 would
    see stale data; the emulator gives it 0xFF bytes, every block, also in a template."""
    program = r"""
#include "cpu_emulation.h"
#include <cstdio>
template <typename T> __device__ void impl(T* out) {
    __shared__ T s[64];
    if (blockIdx.x == 0) s[threadIdx.x] = (T)threadIdx.x;
    __syncthreads();
    out[blockIdx.x * 64 + threadIdx.x] = s[threadIdx.x];
}
__global__ void k(int* out) { impl<int>(out); }
int main() {
    int out[192];
    const int rc = emu::launch(&k, dim3{3, 1, 1}, dim3{64, 1, 1}, out);
    std::printf("%d %d %d %d\n", rc, out[5], out[64 + 5], out[128 + 63]);
}
"""
    src = tmp_path / "shared.cpp"
    src.write_text(emulator.poison_shared_declarations(program))
    assert "emu::poison_shared(&s, sizeof(s));" in src.read_text()
    exe = tmp_path / "shared"
    subprocess.run(["g++", "-std=c++20", "-O2", "-w", "-I", str(CUDA_DIR), str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    assert subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split() == ["0", "5", "-1",
                                                                                                   "-1"]
