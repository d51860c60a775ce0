// CPU emulation of the CUDA subset the SparseInfer kernels use, so that the very same
// kernel sources run on a machine without a GPU (kernels/emulator.py compiles them with
// g++ against this header).
//
// Every CUDA thread of a block is a fiber on one OS thread; the blocks of a
// launch run one after another, so `__shared__` becomes a function-local static that the
// block's fibers share. Fibers switch only at barriers, in thread order: __syncthreads is
// a block barrier; __ballot_sync and __shfl_xor_sync publish each lane's value in the
// warp's slots between two warp barriers. A thread that returns drops out of its block's
// and its warp's barriers, as an exited thread does on the GPU. A barrier that can never
// complete (threads of a warp or block diverged around it) ends the launch with an error
// instead of hanging. Products and sums round separately (compiled with -ffp-contract=off),
// as NVRTC's --fmad=false makes them on the GPU. Threads run first-to-last between
// barriers, or last-to-first (S.reverse): a result that depends on that order is a race a
// missing barrier left, which the GPU would show only now and then.
//
// What it checks: the kernels' logic (indexing, tails, compaction, accumulation order),
// bit for bit. What it cannot: timing, coalescing, races of the GPU's memory model.
#pragma once

// Fiber switches: on x86-64 a few instructions (callee-saved registers, the SSE and x87
// control words, the stack pointer), because glibc's swapcontext makes a sigprocmask system
// call at every switch and getcontext one more per fiber and block, which made the emulation
// several times slower. Under AddressSanitizer (which must see the stack switches) and on
// other processors, ucontext (also with -DSPARSEINFER_UCONTEXT_FIBERS, for the tests).
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__) && !defined(SPARSEINFER_UCONTEXT_FIBERS)
#define SPARSEINFER_FAST_FIBERS 1
#else
#include <ucontext.h>
#endif

#include <cmath>                 // CUDA's float math functions (fabsf, ...) are the C library's here
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define SPARSEINFER_CPU_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__ __restrict

struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };

namespace emu {

constexpr std::size_t STACK_BYTES = 64 * 1024;

#ifdef SPARSEINFER_FAST_FIBERS
// A suspended fiber's stack holds, from `sp` up: the MXCSR and x87 control words (8 bytes),
// r15, r14, r13, r12, rbx, rbp and the address to return to.
struct Context { void* sp = nullptr; };

extern "C" void sparseinfer_emu_switch(void** save_sp, void* load_sp);
extern "C" void sparseinfer_emu_fiber_start();
asm(R"(
    .text
    .globl sparseinfer_emu_switch
    .hidden sparseinfer_emu_switch
    .type sparseinfer_emu_switch, @function
sparseinfer_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size sparseinfer_emu_switch, .-sparseinfer_emu_switch

    .globl sparseinfer_emu_fiber_start
    .hidden sparseinfer_emu_fiber_start
    .type sparseinfer_emu_fiber_start, @function
sparseinfer_emu_fiber_start:
    movl %r12d, %edi
    callq *%r13
    ud2
    .size sparseinfer_emu_fiber_start, .-sparseinfer_emu_fiber_start
)");

inline void ctx_swap(Context& from, Context& to) { sparseinfer_emu_switch(&from.sp, to.sp); }
inline void ctx_jump(Context& to) { void* unused; sparseinfer_emu_switch(&unused, to.sp); }

// A fresh fiber that will run entry(index) on [stack, stack + bytes) when first switched to.
inline void ctx_make(Context& c, char* stack, std::size_t bytes, void (*entry)(int), int index) {
    auto** sp = reinterpret_cast<void**>(((uintptr_t)(stack + bytes) & ~(uintptr_t)15) - 128);
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0; fnstcw %1" : "=m"(mxcsr), "=m"(fpucw));
    uint64_t control = mxcsr | ((uint64_t)fpucw << 32);
    std::memcpy(&sp[0], &control, 8);
    sp[1] = sp[2] = nullptr;                                      // r15, r14
    sp[3] = reinterpret_cast<void*>(entry);                       // r13: called by fiber_start
    sp[4] = reinterpret_cast<void*>((uintptr_t)(unsigned)index);  // r12: its argument
    sp[5] = sp[6] = nullptr;                                      // rbx, rbp
    sp[7] = reinterpret_cast<void*>(&sparseinfer_emu_fiber_start);
    c.sp = sp;                 // 16-aligned, so fiber_start calls entry with the ABI's alignment
}
#else
struct Context { ucontext_t uc; };

inline void ctx_swap(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void ctx_jump(Context& to) { setcontext(&to.uc); }

inline void ctx_make(Context& c, char* stack, std::size_t bytes, void (*entry)(int), int index) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, reinterpret_cast<void (*)()>(entry), 1, index);
}
#endif

struct Barrier {
    int expected = 0, arrived = 0;
    unsigned generation = 0;
};

struct Fiber {
    Context ctx;
    std::unique_ptr<char[]> stack;
    dim3 tid;
    bool done = false;
};

struct Scheduler {
    Context main;
    std::vector<Fiber> fibers;
    std::vector<Barrier> warp_bars;
    std::vector<uint32_t> slots;          // 32 per warp
    Barrier block_bar;
    dim3 block_idx, block_dim, grid_dim;
    std::function<void()> body;
    int current = 0, alive = 0, idle_switches = 0;
    bool deadlock = false;
    bool reverse = false;                 // run threads last-to-first (exposes missing barriers)
    const void* misaligned = nullptr;     // the first load or atomic off its natural alignment
    bool partial_warp = false;            // a shuffle / ballot while lanes of its warp had exited
    unsigned long block_serial = 0;       // one number per block run, for poison_shared
};

inline Scheduler S;

inline int lane() { return S.current % 32; }

// The fiber after `from` in this launch's order, skipping finished ones.
inline int next_fiber(int from) {
    const int n = (int)S.fibers.size(), step = S.reverse ? n - 1 : 1;
    int next = from;
    do next = (next + step) % n; while (S.fibers[next].done && next != from);
    return next;
}
inline int warp_index() { return S.current / 32; }

inline void switch_to(int next) {
    const int me = S.current;
    S.current = next;
    ctx_swap(S.fibers[me].ctx, S.fibers[next].ctx);
}

// Give the CPU to the next unfinished fiber in thread order; a full round with no barrier
// progress means nobody can ever go on: end the launch.
inline void yield() {
    if (++S.idle_switches > 2 * S.alive + 2) {
        S.deadlock = true;
        ctx_jump(S.main);
    }
    const int next = next_fiber(S.current);
    if (next != S.current) switch_to(next);
}

inline void arrive_and_wait(Barrier& b) {
    S.idle_switches = 0;
    if (++b.arrived == b.expected) {
        b.arrived = 0;
        ++b.generation;
        return;
    }
    const unsigned g = b.generation;
    while (b.generation == g) yield();
}

inline void drop(Barrier& b) {
    S.idle_switches = 0;
    if (--b.expected > 0 && b.arrived == b.expected) {
        b.arrived = 0;
        ++b.generation;
    }
}

inline void fiber_entry(int index) {
    S.body();
    S.fibers[index].done = true;
    drop(S.warp_bars[index / 32]);
    drop(S.block_bar);
    if (--S.alive == 0) ctx_jump(S.main);
    const int next = next_fiber(index);
    S.current = next;
    ctx_jump(S.fibers[next].ctx);
}

// Run kernel(args...) on grid x block threads: 0 on success, -2 on a barrier deadlock, -3
// when a thread loaded from a misaligned address (S.misaligned: the first such address), -4
// when a shuffle or ballot ran in a warp with exited or missing lanes.
template <typename... A>
int launch(void (*kernel)(A...), dim3 grid, dim3 blk, A... args) {
    const int n = (int)blk.x;
    S.grid_dim = grid;
    S.block_dim = blk;
    S.body = [&] { kernel(args...); };
    S.fibers.resize(n);                   // contexts are made below, after any reallocation
    S.warp_bars.assign((n + 31) / 32, Barrier{});
    S.slots.assign(32 * S.warp_bars.size(), 0u);
    for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            S.block_idx = dim3{bx, by, 0};
            ++S.block_serial;
            S.block_bar = Barrier{n, 0, 0};
            for (int w = 0; w < (int)S.warp_bars.size(); ++w)
                S.warp_bars[w] = Barrier{n - 32 * w < 32 ? n - 32 * w : 32, 0, 0};
            for (int t = 0; t < n; ++t) {
                Fiber& f = S.fibers[t];
                if (!f.stack) f.stack.reset(new char[STACK_BYTES]);
                f.tid = dim3{(unsigned)t, 0, 0};
                f.done = false;
                ctx_make(f.ctx, f.stack.get(), STACK_BYTES, &fiber_entry, t);
            }
            S.alive = n;
            S.idle_switches = 0;
            S.deadlock = false;
            S.misaligned = nullptr;
            S.partial_warp = false;
            S.current = S.reverse ? n - 1 : 0;
            ctx_swap(S.main, S.fibers[S.current].ctx);
            if (S.deadlock) return -2;
            if (S.misaligned) return -3;
            if (S.partial_warp) return -4;
        }
    return 0;
}

// The C entry point's argument list, as cuLaunchKernel takes it: one pointer per argument.
template <typename... A, std::size_t... I>
int launch_packed(void (*kernel)(A...), dim3 grid, dim3 blk, void** args, std::index_sequence<I...>) {
    return launch<A...>(kernel, grid, blk, *static_cast<A*>(args[I])...);
}

template <typename... A>
int launch_args(void (*kernel)(A...), dim3 grid, dim3 blk, void** args) {
    return launch_packed(kernel, grid, blk, args, std::index_sequence_for<A...>{});
}

// The kernels' shuffles and ballots name all 32 lanes (FULL_MASK); on a GPU that is
// undefined once a lane of the warp has exited (or never existed), so it is an error here.
inline void check_full_warp() {
    if (S.warp_bars[warp_index()].expected != 32) S.partial_warp = true;
}

// A GPU's shared memory holds, when a block starts, whatever an earlier block left; here a
// __shared__ variable is a static that would keep the last block's values (or zeros). The
// emulator's translation unit (kernels/emulator.py) follows every __shared__ declaration
// with a call to this: the first thread of each block to pass the declaration fills the
// variable with 0xFF bytes (NaN as float, -1 as int), so a read before the block wrote shows.
inline void poison_shared(void* p, std::size_t bytes) {
    static std::vector<std::pair<void*, unsigned long>> stamps;   // (variable, block that poisoned it)
    for (auto& [q, serial] : stamps)
        if (q == p) {
            if (serial != S.block_serial) { serial = S.block_serial; std::memset(p, 0xFF, bytes); }
            return;
        }
    stamps.emplace_back(p, S.block_serial);
    std::memset(p, 0xFF, bytes);
}

template <typename T>
inline T exchange(T v, int src_lane) {            // every lane publishes v, reads src_lane's
    check_full_warp();
    static_assert(sizeof(T) == 4, "32-bit exchanges only");
    uint32_t* slot = &S.slots[32 * warp_index()];
    std::memcpy(&slot[lane()], &v, 4);
    arrive_and_wait(S.warp_bars[warp_index()]);
    T out;
    std::memcpy(&out, &slot[src_lane], 4);
    arrive_and_wait(S.warp_bars[warp_index()]);   // nobody overwrites a slot before all have read
    return out;
}

}  // namespace emu

#define threadIdx (emu::S.fibers[emu::S.current].tid)
#define blockIdx (emu::S.block_idx)
#define blockDim (emu::S.block_dim)
#define gridDim (emu::S.grid_dim)

inline void __syncthreads() { emu::arrive_and_wait(emu::S.block_bar); }

inline unsigned __ballot_sync(unsigned, bool pred) {
    emu::check_full_warp();
    unsigned bits = 0;
    uint32_t* slot = &emu::S.slots[32 * emu::warp_index()];
    slot[emu::lane()] = pred ? 1u : 0u;
    emu::arrive_and_wait(emu::S.warp_bars[emu::warp_index()]);
    for (int l = 0; l < 32; ++l) bits |= (slot[l] & 1u) << l;
    emu::arrive_and_wait(emu::S.warp_bars[emu::warp_index()]);
    return bits;
}

inline float __shfl_xor_sync(unsigned, float v, int offset) { return emu::exchange(v, emu::lane() ^ offset); }
inline int __shfl_xor_sync(unsigned, int v, int offset) { return emu::exchange(v, emu::lane() ^ offset); }

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
// A GPU faults ("misaligned address") on an access that is not aligned to its size (a
// 16-byte uint4 / float4 load at an address that is not a multiple of 16); x86 does not, so
// the emulation records the first one and the launch reports it (-3).
template <typename T> inline void check_aligned(const T* p) {
    if (((uintptr_t)p % sizeof(T)) != 0 && !emu::S.misaligned) emu::S.misaligned = p;
}
template <typename T> inline T __ldg(const T* p) { check_aligned(p); return *p; }
template <typename T> inline T __ldcg(const T* p) { check_aligned(p); return *p; }
inline void __threadfence() {}                       // one OS thread: every write is seen in order
inline int min(int a, int b) { return a < b ? a : b; }
inline float atomicAdd(float* p, float v) { check_aligned(p); const float old = *p; *p = old + v; return old; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { check_aligned(p); const unsigned old = *p; *p = old + v; return old; }
