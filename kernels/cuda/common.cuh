// Shared device helpers of the SparseInfer kernels.
//
// Needs no CUDA header (NVRTC built-ins only), so the same text compiles in CuPy at run
// time and in the CPU compile gate. The Python side expands `#include "common.cuh"` into
// each source before compiling (kernels/sources.py), so CuPy's cache sees every change.
//
// The float32 accumulation order is reference/order_contract.py's, bit for bit:
// warp per row; lane l owns chunks c = t*32 + l of V = 16 bytes of weights; element
// j = c*V + v; one accumulator per lane from +0.0, products and sums rounded separately
// (__fmul_rn / __fadd_rn, and the module is compiled with --fmad=false); butterfly
// __shfl_xor_sync over offsets 16, 8, 4, 2, 1. WARP_SIZE, VECTOR_BYTES and DOWN_ROW_CHUNK
// come from the Python contract as -D defines.
#pragma once

// The gate activations (activate) and their ACT_* codes, shared with the op library's CPU kernel.
#include "activation.h"

typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu

// 16-bit weights travel as raw bits: the widening to float32 is exact and header-free.
struct half_bits { u16 b; };
struct bf16_bits { u16 b; };

__device__ __forceinline__ float fp16_bits_to_float(u32 bits) {
#ifdef SPARSEINFER_CPU_EMULATION             // kernels/cuda/cpu_emulation.h (g++, x86-64 _Float16)
    const u16 b = (u16)bits;
    _Float16 h;
    std::memcpy(&h, &b, 2);
    return (float)h;
#else
    float f;
    asm("{ .reg .b16 h; cvt.u16.u32 h, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "r"(bits));
    return f;
#endif
}

// Elem<T>: V (elements per 16 bytes), scalar widening load, and 16-byte unpack.
template <typename T> struct Elem;

template <> struct Elem<float> {
    enum { V = VECTOR_BYTES / 4 };
    static __device__ __forceinline__ float load(const float* p, i64 i) { return p[i]; }
    static __device__ __forceinline__ void unpack(uint4 u, float* w) {
        w[0] = __uint_as_float(u.x); w[1] = __uint_as_float(u.y);
        w[2] = __uint_as_float(u.z); w[3] = __uint_as_float(u.w);
    }
};

template <> struct Elem<half_bits> {
    enum { V = VECTOR_BYTES / 2 };
    static __device__ __forceinline__ float load(const half_bits* p, i64 i) { return fp16_bits_to_float(p[i].b); }
    static __device__ __forceinline__ void unpack(uint4 u, float* w) {
        const u32 q[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {           // little-endian: element 2i is the low half
            w[2 * i] = fp16_bits_to_float(q[i] & 0xffffu);
            w[2 * i + 1] = fp16_bits_to_float(q[i] >> 16);
        }
    }
};

template <> struct Elem<bf16_bits> {
    enum { V = VECTOR_BYTES / 2 };
    static __device__ __forceinline__ float load(const bf16_bits* p, i64 i) { return __uint_as_float(((u32)p[i].b) << 16); }
    static __device__ __forceinline__ void unpack(uint4 u, float* w) {
        const u32 q[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            w[2 * i] = __uint_as_float(q[i] << 16);
            w[2 * i + 1] = __uint_as_float(q[i] & 0xffff0000u);
        }
    }
};

__device__ __forceinline__ bool aligned16(const void* p) { return (((u64)p) & 15u) == 0; }

// x[j0 .. j0+V) as float32, 16-byte loads (x aligned, j0 a multiple of 4).
template <int V>
__device__ __forceinline__ void load_x(const float* __restrict__ x, int j0, float* xv) {
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
        const float4 f = __ldg(reinterpret_cast<const float4*>(x + j0) + q);
        xv[4 * q] = f.x; xv[4 * q + 1] = f.y; xv[4 * q + 2] = f.z; xv[4 * q + 3] = f.w;
    }
}

// Butterfly sum over the warp; every lane ends with the same bits (IEEE + is commutative).
__device__ __forceinline__ float warp_sum_butterfly(float acc) {
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset >= 1; offset >>= 1)
        acc = __fadd_rn(acc, __shfl_xor_sync(FULL_MASK, acc, offset));
    return acc;
}

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset >= 1; offset >>= 1)
        v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

// acc += the V products of one 16-byte chunk of weights (elements j0 .. j0+V) with x, in order.
template <typename T>
__device__ __forceinline__ float chunk_dot_add(float acc, uint4 chunk, const float* __restrict__ x, int j0) {
    const int V = Elem<T>::V;
    float w[V], xv[V];
    Elem<T>::unpack(chunk, w);
    load_x<V>(x, j0, xv);
#pragma unroll
    for (int v = 0; v < V; ++v) acc = __fadd_rn(acc, __fmul_rn(w[v], xv[v]));
    return acc;
}

// acc += the products of the chunks c, c + 32, ... below n_chunks, element by element (the
// tail after the vector loop, or every chunk where row or x is not 16-byte aligned).
template <typename T>
__device__ __forceinline__ float scalar_chunks_add(float acc, const T* __restrict__ row, const float* __restrict__ x,
                                                   int d, int c, int n_chunks) {
    const int V = Elem<T>::V;
    for (; c < n_chunks; c += WARP_SIZE) {
        const int j0 = c * V;
        const int n = min(V, d - j0);
        for (int v = 0; v < n; ++v) acc = __fadd_rn(acc, __fmul_rn(Elem<T>::load(row, j0 + v), x[j0 + v]));
    }
    return acc;
}

// z = row . x in the contract's order; called by all 32 lanes of a warp, all get z.
// Full 16-byte chunks first (vector loads when row and x are aligned), then the scalar
// tail: a lane's chunks ascend in c either way, so the order is the contract's.
template <typename T>
__device__ __forceinline__ float warp_dot_row(const T* __restrict__ row, const float* __restrict__ x, int d, int lane) {
    const int V = Elem<T>::V;
    const int n_chunks = (d + V - 1) / V;
    const int n_vec = (aligned16(row) && aligned16(x)) ? d / V : 0;
    float acc = 0.0f;
    int c = lane;
#pragma unroll 4
    for (; c < n_vec; c += WARP_SIZE)
        acc = chunk_dot_add<T>(acc, __ldg(reinterpret_cast<const uint4*>(row + (i64)c * V)), x, c * V);
    return warp_sum_butterfly(scalar_chunks_add(acc, row, x, d, c, n_chunks));
}

// warp_dot_row with the weights of U consecutive chunks of a lane loaded before any of them
// is added: U x 16 bytes in flight per lane (U x 512 per warp) while the sums keep the
// contract's order (chunks ascending per lane, elements in order within a chunk). The last,
// partial batch is loaded at once too (predicated), so a row of n chunks per lane costs
// ceil(n / U) round trips to memory.
template <typename T, int U>
__device__ __forceinline__ float warp_dot_row_batched(const T* __restrict__ row, const float* __restrict__ x, int d,
                                                      int lane) {
    const int V = Elem<T>::V;
    const int n_chunks = (d + V - 1) / V;
    const int n_vec = (aligned16(row) && aligned16(x)) ? d / V : 0;
    const uint4* rv = reinterpret_cast<const uint4*>(row);
    float acc = 0.0f;
    int c = lane;
    for (; c < n_vec; c += U * WARP_SIZE) {
        uint4 wv[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (c + u * WARP_SIZE < n_vec) wv[u] = __ldg(rv + c + u * WARP_SIZE);
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (c + u * WARP_SIZE < n_vec) acc = chunk_dot_add<T>(acc, wv[u], x, (c + u * WARP_SIZE) * V);
    }
    // c now lies past n_vec by a multiple of 32 from the first chunk this lane did not add:
    // step back to it for the scalar tail.
    c = n_vec + ((lane - n_vec % WARP_SIZE) + WARP_SIZE) % WARP_SIZE;
    return warp_sum_butterfly(scalar_chunks_add(acc, row, x, d, c, n_chunks));
}

// Two rows' dot products with the same x at once (a neuron's gate and up rows): each lane
// loads U chunks of BOTH rows before adding any, so 2 x U x 16 bytes are in flight per lane
// and the two rows share their round trips and their loads of x. Each row's sum keeps the
// contract's order exactly as warp_dot_row_batched does (chunks ascending per lane, elements
// in order, the same butterfly), so z_a and z_b are warp_dot_row's bits.
template <typename T>
__device__ __forceinline__ void chunk_pair_dot_add(float& acc_a, float& acc_b, uint4 ca, uint4 cb,
                                                   const float* __restrict__ x, int j0) {
    const int V = Elem<T>::V;
    float wa[V], wb[V], xv[V];
    Elem<T>::unpack(ca, wa);
    Elem<T>::unpack(cb, wb);
    load_x<V>(x, j0, xv);
#pragma unroll
    for (int v = 0; v < V; ++v) {
        acc_a = __fadd_rn(acc_a, __fmul_rn(wa[v], xv[v]));
        acc_b = __fadd_rn(acc_b, __fmul_rn(wb[v], xv[v]));
    }
}

template <typename T, int U>
__device__ __forceinline__ void warp_dot_pair_batched(const T* __restrict__ row_a, const T* __restrict__ row_b,
                                                      const float* __restrict__ x, int d, int lane, float& z_a,
                                                      float& z_b) {
    const int V = Elem<T>::V;
    const int n_chunks = (d + V - 1) / V;
    const int n_vec = (aligned16(row_a) && aligned16(row_b) && aligned16(x)) ? d / V : 0;
    const uint4* av = reinterpret_cast<const uint4*>(row_a);
    const uint4* bv = reinterpret_cast<const uint4*>(row_b);
    float acc_a = 0.0f, acc_b = 0.0f;
    int c = lane;
    for (; c < n_vec; c += U * WARP_SIZE) {
        uint4 wa[U], wb[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (c + u * WARP_SIZE < n_vec) {
                wa[u] = __ldg(av + c + u * WARP_SIZE);
                wb[u] = __ldg(bv + c + u * WARP_SIZE);
            }
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (c + u * WARP_SIZE < n_vec) chunk_pair_dot_add<T>(acc_a, acc_b, wa[u], wb[u], x, (c + u * WARP_SIZE) * V);
    }
    c = n_vec + ((lane - n_vec % WARP_SIZE) + WARP_SIZE) % WARP_SIZE;    // as in warp_dot_row_batched
    z_a = warp_sum_butterfly(scalar_chunks_add(acc_a, row_a, x, d, c, n_chunks));
    z_b = warp_sum_butterfly(scalar_chunks_add(acc_b, row_b, x, d, c, n_chunks));
}

__device__ __forceinline__ i64 global_warp_id() { return ((i64)blockIdx.x * blockDim.x + threadIdx.x) / WARP_SIZE; }
__device__ __forceinline__ int lane_id() { return threadIdx.x & (WARP_SIZE - 1); }

// --- the predictor (paper eq. 2), shared by predict_rows and the fused kernel ---

// N_neg of one row; all lanes of the warp get it. Bits past d are masked off. With VEC, the
// whole words (all 32 bits below d) are read 4 at a time (16-byte loads) where the row
// and x's words are 16-byte aligned (every row when ceil(d/32) is a multiple of 4, as at
// the 7B and 13B shapes); an integer sum, so the count is the same in any order.
template <bool VEC>
__device__ __forceinline__ int row_negative_count(const u32* __restrict__ w_row, const u32* __restrict__ x_signs,
                                                  int d, int lane) {
    const int n_words = (d + WARP_SIZE - 1) / WARP_SIZE;
    const u32 tail = (d % WARP_SIZE) ? ((1u << (d % WARP_SIZE)) - 1u) : FULL_MASK;
    int count = 0;
    int w0 = 0;                                      // first word of the scalar loop
    if (VEC && aligned16(w_row) && aligned16(x_signs)) {
        const int n_quads = (d / WARP_SIZE) / 4;     // quads of whole words (no tail bits to mask)
        for (int q = lane; q < n_quads; q += WARP_SIZE) {
            const uint4 a = __ldg(reinterpret_cast<const uint4*>(w_row) + q);
            const uint4 b = __ldg(reinterpret_cast<const uint4*>(x_signs) + q);
            count += __popc(a.x ^ b.x) + __popc(a.y ^ b.y) + __popc(a.z ^ b.z) + __popc(a.w ^ b.w);
        }
        w0 = 4 * n_quads;
    }
    for (int w = w0 + lane; w < n_words; w += WARP_SIZE) {
        u32 b = __ldg(w_row + w) ^ __ldg(x_signs + w);
        if (w == n_words - 1) b &= tail;
        count += __popc(b);
    }
    return warp_sum_int(count);
}

__device__ __forceinline__ bool predicted_zero(int n_neg, int d, int alpha_milli) {
    return 1000LL * n_neg > (i64)alpha_milli * (i64)(d - n_neg);
}

// --- rows of the kernels that predict as they go (gate_up.cu v3-v6, quant.cu's paired) ---

// Predict one row (eq. 2, 16-byte sign loads): lane 0 writes counts[row] and zero[row], and for
// a row predicted zero h1 = h3 = +0 (its weights are never read). True where the row is kept.
// sign_ld: words per row of w_signs (>= ceil(d/32); words past ceil(d/32) are not read).
__device__ __forceinline__ bool predict_row_kept(i64 row, const u32* __restrict__ x_signs,
                                                 const u32* __restrict__ w_signs, i64 sign_ld, int d, int alpha_milli,
                                                 int* __restrict__ counts, unsigned char* __restrict__ zero,
                                                 float* __restrict__ h1, float* __restrict__ h3, int lane) {
    const int n_neg = row_negative_count<true>(w_signs + row * sign_ld, x_signs, d, lane);
    const bool skip = predicted_zero(n_neg, d, alpha_milli);
    if (lane == 0) {
        counts[row] = n_neg;
        zero[row] = skip ? 1 : 0;
        if (skip) { h1[row] = 0.0f; h3[row] = 0.0f; }
    }
    return !skip;
}

// Masked kernels (zero != null): a row the mask marks predicted zero gets h1 = h3 = +0 from
// lane 0, its weights never read. True for such a row.
__device__ __forceinline__ bool masked_row_zeroed(const unsigned char* __restrict__ zero, i64 row,
                                                  float* __restrict__ h1, float* __restrict__ h3, int lane) {
    if (zero == nullptr || !zero[row]) return false;
    if (lane == 0) { h1[row] = 0.0f; h3[row] = 0.0f; }
    return true;
}

// A kept row whose gate and up rows were read together (paired kernels): lane 0 writes
// h1 = act(z_gate) and h3 = fl(h1 * z_up) where h1 != 0, else +0 (+AS in the result).
__device__ __forceinline__ void store_paired_row(i64 row, float z_gate, float z_up, int act_kind, float threshold,
                                                 float* __restrict__ h1, float* __restrict__ h3, int lane) {
    const float a = activate(z_gate, act_kind, threshold);
    if (lane == 0) {
        h1[row] = a;
        h3[row] = a != 0.0f ? __fmul_rn(a, z_up) : 0.0f;
    }
}
