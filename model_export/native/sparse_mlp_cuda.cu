// The CUDA launcher of the op library (sparse_mlp_cuda.h): the project's own kernels, from
// kernels/cuda/ (one source of truth: the build passes -I kernels/cuda and the -D defines of
// kernels/sources.py: COMPILE_OPTIONS), launched as kernels/ops.py launches them.
//
// * n_tokens == 1: the default pipeline, sparse-batched (kernels/registry.py): pack x's sign
//   words (pack_signs_fp32), predict + gate + up in one launch with 8 weight chunks in flight
//   per lane (gate_up_batched_fp32), the deterministic down projection with 8 rows' loads in
//   flight per thread (down_chunks_batched_fp32), then the chunks' partials added in order
//   (down_reduce_chunks). predicted_zero is the gate kernel's own mask; computed comes from
//   one small kernel below.
// * n_tokens > 1, or dense: the dense pipeline, token by token: gate_up_mask_fp32 without a
//   mask (every gate and up row), down_chunks_fp32 over every row, down_reduce_chunks.
// * Block-quantized weights (Q8_0, Q4_0, Q4_1) run the same pipelines on quant.cu's kernels
//   (the registry's QUANT_PIPELINES sparse-FMT and dense-FMT): gate_up_quant_paired_FMT,
//   gate_up_quant_mask_FMT and down_quant_chunks_FMT (W_down^T in its own format).
//
// Everything lives in the caller's scratch; grids depend on d and k only; nothing
// allocates, synchronizes or needs zeroed state (every scratch word a kernel reads was
// written earlier in the same call), so a call can be captured in a CUDA graph.
//
// The same text builds two ways: with nvcc into the op library (launches are <<<>>> on the
// caller's stream), and with g++ against kernels/cuda/cpu_emulation.h
// (-DSPARSEINFER_CPU_EMULATION: launches run on the CPU emulator, the stream is ignored),
// which is how tests/test_native_cuda_launch.py checks this host code bit for bit without a
// GPU.
#include "sparse_mlp_cuda.h"

#if !defined(WARP_SIZE) || !defined(VECTOR_BYTES) || !defined(DOWN_ROW_CHUNK) || !defined(DOWN_SUB_CHUNKS) || \
    !defined(DOWN_THREADS) || !defined(GATE_UP_BATCHED_THREADS)
#error "the kernels' constants come from kernels/sources.py: COMPILE_OPTIONS as -D defines"
#endif

#ifdef SPARSEINFER_CPU_EMULATION
#include "cpu_emulation.h"
typedef void* cudaStream_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
#else
#include <cuda_runtime.h>
#endif

#include "signs.cu"
#include "predict.cu"
#include "gate_up.cu"
#include "down.cu"
#include "quant.cu"

namespace {

const int kThreads = 256;                  // kernels/ops.py THREADS: 8 warps per warp-per-row block
const int kWarpsPerBlock = kThreads / WARP_SIZE;
const unsigned kMaxGridY = 65535;

dim3 grid_of(long long x, long long y = 1) {
    dim3 g;
    g.x = (unsigned)x;
    g.y = (unsigned)y;
    g.z = 1;
    return g;
}

long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }

// One launch on `stream`: 0, or the error code of the launch. The arguments are converted to
// the kernel's parameter types first (as CuPy's sized NumPy scalars are in ops.py).
#ifdef SPARSEINFER_CPU_EMULATION
template <typename... A, typename... B>
int si_launch(void (*kernel)(A...), dim3 grid, dim3 block, cudaStream_t, B... args) {
    // what a GPU refuses at launch (kernels/emulator.py _check_launch)
    if (grid.x < 1 || grid.y < 1 || grid.y > kMaxGridY || block.x < 1 || block.x > 1024)
        return cudaErrorInvalidConfiguration;
    return emu::launch<A...>(kernel, grid, block, static_cast<A>(args)...);
}
#else
template <typename... A, typename... B>
int si_launch(void (*kernel)(A...), dim3 grid, dim3 block, cudaStream_t stream, B... args) {
    kernel<<<grid, block, 0, stream>>>(static_cast<A>(args)...);
    return (int)cudaGetLastError();
}
#endif

#define SI_LAUNCH(...) SI_CALL(si_launch(__VA_ARGS__))
// Returns the error code of a launch (or of a function that launches) that failed.
#define SI_CALL(...)                         \
    do {                                     \
        const int rc_ = (__VA_ARGS__);       \
        if (rc_ != 0) return rc_;            \
    } while (0)

// computed[i] = 1 where up and down were computed (+AS): the row was kept by the predictor
// and its h1 is nonzero (a predicted-zero row's h1 is +0, so h1 != 0 alone decides).
__global__ void __launch_bounds__(256)
sparseinfer_computed_rows(const float* __restrict__ h1, int k, unsigned char* __restrict__ computed) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < k) computed[i] = h1[i] != 0.0f ? 1 : 0;
}

// actual_zero[i] = 1 where the dense gate's h1 (every row computed) is zero; with `negative`
// (silu, gelu: no exact zeros) where the gate is negative, i.e. h1's sign bit is set (these
// activations keep the gate's sign, down to -0.0 on underflow, and a warp sum from +0.0 is
// never -0.0).
__global__ void __launch_bounds__(256)
sparseinfer_zero_rows(const float* __restrict__ h1, int k, int negative, unsigned char* __restrict__ actual_zero) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= k) return;
    unsigned bits;
    memcpy(&bits, h1 + i, sizeof bits);
    actual_zero[i] = (negative ? (bits >> 31) != 0 : h1[i] == 0.0f) ? 1 : 0;
}

// The kernels of one weight type: float32 and float16 rows (gate_up.cu, down.cu), or rows of
// one block format (quant.cu). Their signatures match kind for kind but for the weights'
// pointer type (si_launch converts a.w_gate's const void*), so the pipelines below are one
// text. ld: the row stride the kernels take (elements, or bytes for blocks); down_tiles: the
// down kernel's column tiles of DOWN_THREADS threads.
template <typename T> struct Kernels;
template <> struct Kernels<float> {
    static constexpr auto gate_up_sparse = gate_up_batched_fp32;     // gate_up v5_batched
    static constexpr auto gate_up_dense = gate_up_mask_fp32;         // gate_up v1, no mask
    static constexpr auto down_sparse = down_chunks_batched_fp32;    // down v4_batched
    static constexpr auto down_dense = down_chunks_fp32;             // down v1 over every row
    static long long ld(long long d) { return d; }
    static long long down_tiles(long long d) { return ceil_div(d, DOWN_THREADS * (VECTOR_BYTES / 4)); }
};
template <> struct Kernels<half_bits> {
    static constexpr auto gate_up_sparse = gate_up_batched_fp16;
    static constexpr auto gate_up_dense = gate_up_mask_fp16;
    static constexpr auto down_sparse = down_chunks_batched_fp16;
    static constexpr auto down_dense = down_chunks_fp16;
    static long long ld(long long d) { return d; }
    static long long down_tiles(long long d) { return ceil_div(d, DOWN_THREADS * (VECTOR_BYTES / 2)); }
};
// A block format F: gate_up_quant_paired (predicts as it goes), gate_up_quant_mask (no mask:
// dense), down_quant_chunks (its dense flag reads every row); each thread of the down
// kernel owns QUANT_DOWN_COLS columns of a block.
#define SI_BLOCK_KERNELS(F, NAME)                                                                          \
    template <> struct Kernels<F> {                                                                        \
        static constexpr auto gate_up_sparse = gate_up_quant_paired_##NAME;                                \
        static constexpr auto gate_up_dense = gate_up_quant_mask_##NAME;                                   \
        static constexpr auto down_sparse = down_quant_chunks_##NAME;                                      \
        static constexpr auto down_dense = down_quant_chunks_##NAME;                                       \
        static long long ld(long long d) { return d / WARP_SIZE * F::BYTES; }                              \
        static long long down_tiles(long long d) { return ceil_div(d, DOWN_THREADS * QUANT_DOWN_COLS); }   \
    };
SI_BLOCK_KERNELS(Q8_0, q8_0)
SI_BLOCK_KERNELS(Q4_0, q4_0)
SI_BLOCK_KERNELS(Q4_1, q4_1)
#undef SI_BLOCK_KERNELS

// fn(T{}) for a SPARSEINFER_WEIGHTS_* code (checked by valid()).
template <typename Fn>
int with_weights(int code, Fn&& fn) {
    switch (code) {
        case SPARSEINFER_WEIGHTS_FP16: return fn(half_bits{});
        case SPARSEINFER_WEIGHTS_Q8_0: return fn(Q8_0{});
        case SPARSEINFER_WEIGHTS_Q4_0: return fn(Q4_0{});
        case SPARSEINFER_WEIGHTS_Q4_1: return fn(Q4_1{});
        default: return fn(0.0f);
    }
}

bool is_block_format(int code) {
    return code == SPARSEINFER_WEIGHTS_Q8_0 || code == SPARSEINFER_WEIGHTS_Q4_0 || code == SPARSEINFER_WEIGHTS_Q4_1;
}

// The scratch, in sections at 256-byte offsets.
struct Layout {
    size_t x_signs, counts, zero, h1, h3, partial, h1_all, h3_all, total;
};

size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

Layout layout(int d, int k) {
    const size_t n_words = (size_t)ceil_div(d, WARP_SIZE);
    const size_t n_chunks = (size_t)ceil_div(k, DOWN_ROW_CHUNK);
    Layout l;
    size_t at = 0;
    l.x_signs = at; at += align256(n_words * sizeof(u32));
    l.counts = at; at += align256((size_t)k * sizeof(int));
    l.zero = at; at += align256((size_t)k);
    l.h1 = at; at += align256((size_t)k * sizeof(float));
    l.h3 = at; at += align256((size_t)k * sizeof(float));
    l.partial = at; at += align256(n_chunks * (size_t)d * sizeof(float));
    l.h1_all = at; at += align256((size_t)k * sizeof(float));      // actual_zero's dense gate
    l.h3_all = at; at += align256((size_t)k * sizeof(float));
    l.total = at;
    return l;
}

template <typename P>
P* section(void* scratch, size_t offset) {
    return reinterpret_cast<P*>(static_cast<char*>(scratch) + offset);
}

// Predict + gate + up of one token (the decode step): counts, zero, h1, h3 for every row.
int gate_up_sparse(const SparseMlpCudaArgs& a, const u32* x_signs, int* counts, unsigned char* zero, float* h1,
                   float* h3, cudaStream_t stream) {
    return with_weights(a.weight_dtype, [&](auto t) {
        typedef Kernels<decltype(t)> K;
        // warp per row, GATE_UP_BATCHED_THREADS per block
        SI_LAUNCH(K::gate_up_sparse, grid_of(ceil_div(a.k, GATE_UP_BATCHED_THREADS / WARP_SIZE)),
                  grid_of(GATE_UP_BATCHED_THREADS), stream, a.x, x_signs, a.w_signs, a.sign_stride, a.w_gate, a.w_up,
                  K::ld(a.d), a.d, a.k, a.alpha_milli, a.activation, a.threshold, counts, zero, h1, h3);
        return 0;
    });
}

// Gate + up of every row for token x (no mask): h1, h3.
int gate_up_dense(const SparseMlpCudaArgs& a, const float* x, float* h1, float* h3, cudaStream_t stream) {
    return with_weights(a.weight_dtype, [&](auto t) {
        typedef Kernels<decltype(t)> K;
        const unsigned char* no_mask = nullptr;
        SI_LAUNCH(K::gate_up_dense, grid_of(ceil_div(a.k, kWarpsPerBlock)), grid_of(kThreads), stream, x, a.w_gate,
                  a.w_up, K::ld(a.d), a.d, a.k, no_mask, a.activation, a.threshold, h1, h3);
        return 0;
    });
}

// out = the down projection of h3 in the contract's order: (column tiles, chunks) blocks, then
// the chunks added in order. dense: every row (the dense pipeline's kernel), else the rows
// whose h3 != 0.
int down(const SparseMlpCudaArgs& a, const float* h3, int dense, float* partial, float* out, cudaStream_t stream) {
    const long long n_chunks = ceil_div(a.k, DOWN_ROW_CHUNK);
    const int rc = with_weights(a.down_dtype, [&](auto t) {
        typedef Kernels<decltype(t)> K;
        SI_LAUNCH(dense ? K::down_dense : K::down_sparse, grid_of(K::down_tiles(a.d), n_chunks),
                  grid_of(DOWN_THREADS * DOWN_SUB_CHUNKS), stream, h3, a.w_down_t, K::ld(a.d), a.k, a.d, dense,
                  partial);
        return 0;
    });
    if (rc) return rc;
    SI_LAUNCH(down_reduce_chunks, grid_of(ceil_div(a.d, kThreads)), grid_of(kThreads), stream, partial, n_chunks, a.d,
              out);
    return 0;
}

int decode(const SparseMlpCudaArgs& a, cudaStream_t stream) {
    const Layout l = layout(a.d, a.k);
    const long long n_words = ceil_div(a.d, WARP_SIZE);
    u32* x_signs = section<u32>(a.scratch, l.x_signs);
    int* counts = section<int>(a.scratch, l.counts);
    unsigned char* zero = a.predicted_zero ? a.predicted_zero : section<unsigned char>(a.scratch, l.zero);
    float* h1 = section<float>(a.scratch, l.h1);
    float* h3 = section<float>(a.scratch, l.h3);

    // ops.pack_x_signs
    SI_LAUNCH(pack_signs_fp32, grid_of(ceil_div(n_words, kWarpsPerBlock)), grid_of(kThreads), stream,
              a.x, x_signs, 1, a.d, (long long)a.d);
    SI_CALL(gate_up_sparse(a, x_signs, counts, zero, h1, h3, stream));
    SI_CALL(down(a, h3, 0, section<float>(a.scratch, l.partial), a.out, stream));
    if (a.computed)
        SI_LAUNCH(sparseinfer_computed_rows, grid_of(ceil_div(a.k, kThreads)), grid_of(kThreads), stream, h1, a.k,
                  a.computed);
    if (a.actual_zero) {       // debug: the full gate product (the dense pipeline's gate+up kernel)
        float* h1_all = section<float>(a.scratch, l.h1_all);
        SI_CALL(gate_up_dense(a, a.x, h1_all, section<float>(a.scratch, l.h3_all), stream));
        const int negative = !act_exact_zeros(a.activation);
        SI_LAUNCH(sparseinfer_zero_rows, grid_of(ceil_div(a.k, kThreads)), grid_of(kThreads), stream, h1_all, a.k,
                  negative, a.actual_zero);
    }
    return 0;
}

// Every token densely (prefill, or a dense node): the registry's dense pipeline, token by token
// in stream order (each token's kernels reuse the scratch).
int prefill(const SparseMlpCudaArgs& a, cudaStream_t stream) {
    const Layout l = layout(a.d, a.k);
    float* h1 = section<float>(a.scratch, l.h1);
    float* h3 = section<float>(a.scratch, l.h3);
    float* partial = section<float>(a.scratch, l.partial);
    for (int t = 0; t < a.n_tokens; ++t) {
        const long long at = (long long)t * a.d;
        SI_CALL(gate_up_dense(a, a.x + at, h1, h3, stream));
        SI_CALL(down(a, h3, 1, partial, a.out + at, stream));
    }
    return 0;
}

bool valid(const SparseMlpCudaArgs* a) {
    if (!a || !a->x || !a->w_gate || !a->w_up || !a->w_down_t || !a->out || !a->scratch) return false;
    if (a->n_tokens < 1 || a->d < 1 || a->k < 1) return false;
    if (ceil_div(a->k, DOWN_ROW_CHUNK) > kMaxGridY) return false;
    if (a->activation < 0 || a->activation >= ACT_KIND_COUNT) return false;
    if (a->dense != 0 && a->dense != 1) return false;
    if (reinterpret_cast<uintptr_t>(a->scratch) % 16 != 0) return false;
    if (is_block_format(a->weight_dtype)) {            // whole blocks; W_down^T in any block format
        if (a->d % WARP_SIZE != 0 || !is_block_format(a->down_dtype)) return false;
    } else {
        if (a->weight_dtype != SPARSEINFER_WEIGHTS_FP32 && a->weight_dtype != SPARSEINFER_WEIGHTS_FP16) return false;
        if (a->down_dtype != a->weight_dtype) return false;
    }
    if (a->n_tokens == 1 && !a->dense) {
        if (!a->w_signs || a->sign_stride < ceil_div(a->d, WARP_SIZE) || a->alpha_milli <= 0) return false;
    }
    return true;
}

}  // namespace

extern "C" size_t sparseinfer_cuda_scratch_bytes(int n_tokens, int d, int k) {
    (void)n_tokens;                              // tokens run one after another in the same scratch
    if (d < 1 || k < 1) return 0;
    return layout(d, k).total;
}

extern "C" int sparseinfer_cuda_sparse_mlp(const SparseMlpCudaArgs* args, void* stream) {
    if (!valid(args)) return cudaErrorInvalidValue;
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    return args->n_tokens == 1 && !args->dense ? decode(*args, s) : prefill(*args, s);
}

extern "C" const char* sparseinfer_cuda_error_string(int code) {
#ifdef SPARSEINFER_CPU_EMULATION
    switch (code) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case -2: return "emulated kernel deadlocked (threads diverged around a barrier, ballot or shuffle)";
        case -3: return "emulated kernel read a misaligned address";
        case -4: return "emulated kernel shuffled or balloted over exited lanes";
        default: return "unknown error";
    }
#else
    return cudaGetErrorString(static_cast<cudaError_t>(code));
#endif
}

#ifdef SPARSEINFER_CPU_EMULATION
// Emulation only: run threads last-to-first between barriers (a result that changes is a race).
extern "C" void sparseinfer_cuda_emulation_order(int reverse) { emu::S.reverse = reverse != 0; }
#endif
