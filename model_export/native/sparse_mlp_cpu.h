// The sparse MLP of one layer on the CPU, in reference/order_contract.py's float32 order.
//
// No onnxruntime header here: sparse_mlp_op.cc wraps these functions as the op's CPU
// kernel and hands them a parallel-for. Every result equals the NumPy reference bit for
// bit (tests/test_op_library.py):
//
// * Row dot products z = W[i, :] . x: 32 "lanes", lane l owning the V = 4 consecutive
//   floats of chunk t * 32 + l; each lane adds its products in order (t, then v), products
//   and sums rounded separately (the library is built with -ffp-contract=off, no fast
//   math); elements past d add nothing; then the butterfly 16, 8, 4, 2, 1 (lane 0's
//   value: acc[l] + acc[l + off] for l < off is what lane 0 ever reads). The 32
//   independent lane chains are what the compiler turns into SIMD.
// * Down projection out = sum_i h3[i] * Wt[i, :] over rows with h3 != 0 in ascending order:
//   per sub-chunk of DOWN_ROW_CHUNK / DOWN_SUB_CHUNKS rows a partial from +0.0, sub-chunks
//   added in order into the chunk's partial, chunks added in order into the output. Tasks
//   split the columns, so each column sees exactly the contract's sequence of roundings.
// * Sign words: bit j % 64 of uint64 word j / 64 is 1 iff element j < 0 (the reference's
//   uint32 words, paired little-endian); the predictor XORs a row's words with x's, counts
//   N_neg over the d real bits and applies eq. 2 on integers:
//   1000 * N_neg > alpha_milli * (d - N_neg).
#pragma once

#include <algorithm>
#include <cstdint>
#if defined(__SSE2__)
#include <emmintrin.h>
#include <xmmintrin.h>
#endif
#include <cstring>
#include <string>
#include <vector>

#if !defined(WARP_SIZE) || !defined(VECTOR_BYTES) || !defined(DOWN_ROW_CHUNK) || !defined(DOWN_SUB_CHUNKS)
#error "the order contract's constants come from reference/order_contract.py as -D defines (model_export/op_library.py)"
#endif

namespace sparseinfer {

constexpr int kLanes = WARP_SIZE;
constexpr int kV = VECTOR_BYTES / 4;                 // floats per lane per iteration (fp32 weights)
constexpr int kStep = kLanes * kV;                   // elements per warp iteration
constexpr int kSubRows = DOWN_ROW_CHUNK / DOWN_SUB_CHUNKS;
constexpr int kSubs = DOWN_SUB_CHUNKS;
constexpr int kCacheLine = 64;
static_assert(kLanes == 32, "the butterfly below is 16, 8, 4, 2, 1");
static_assert(DOWN_ROW_CHUNK % DOWN_SUB_CHUNKS == 0, "sub-chunks split a chunk evenly");

enum Activation { kRelu = 0, kFatRelu = 1 };

struct MlpParams {
    int d = 0, k = 0;
    int64_t sign_stride = 0;   // uint64 words per row of w_signs
    int alpha_milli = 1000;
    Activation act = kRelu;
    float threshold = 0.0f;    // fatrelu
};

inline float activate(const MlpParams& p, float z) {
    if (p.act == kRelu) return z > 0.0f ? z : 0.0f;
    return z >= p.threshold ? z : 0.0f;
}

inline void prefetch_span(const void* p, size_t bytes) {
    const char* c = static_cast<const char*>(p);
    for (size_t off = 0; off < bytes; off += kCacheLine) __builtin_prefetch(c + off, 0, 1);
}

// The lanes' accumulators after the whole iterations, then the tail and the butterfly.
template <bool kTail>
inline float finish_row(float* acc, const float* __restrict w, const float* __restrict x, int d) {
    if (kTail) {                                    // elements past d add nothing
        const int b = d / kStep * kStep;
        for (int l = 0; l < kLanes; ++l) {
            float a = acc[l];
            for (int v = 0; v < kV; ++v) {
                const int j = b + l * kV + v;
                if (j < d) {
                    const float prod = w[j] * x[j];
                    a = a + prod;
                }
            }
            acc[l] = a;
        }
    }
    for (int off = kLanes / 2; off >= 1; off /= 2)
        for (int l = 0; l < off; ++l) acc[l] = acc[l] + acc[l + off];
    return acc[0];
}

// z = w . x in the contract's order; `ahead` (or null) is prefetched as the row is read.
template <bool kTail>
inline float dot_row(const float* __restrict w, const float* __restrict x, int d, const float* ahead) {
    alignas(16) float acc[kLanes] = {};
    const int full = d / kStep;
#if defined(__SSE2__)
    static_assert(kV == 4, "one SSE register per lane's chunk of fp32 weights");
    // Four lanes at a time: their 16 products multiplied in place, transposed so that
    // register v holds the four lanes' v-th products, then added to the lanes'
    // accumulators in the order v = 0, 1, 2, 3: the contract's roundings, vertically.
    __m128 a[kLanes / 4];
    for (int q = 0; q < kLanes / 4; ++q) a[q] = _mm_setzero_ps();
    for (int t = 0; t < full; ++t) {
        const int b = t * kStep;
        if (ahead) prefetch_span(ahead + b, kStep * sizeof(float));
        for (int q = 0; q < kLanes / 4; ++q) {
            const float* wq = w + b + q * 16;
            const float* xq = x + b + q * 16;
            __m128 p0 = _mm_mul_ps(_mm_loadu_ps(wq), _mm_loadu_ps(xq));
            __m128 p1 = _mm_mul_ps(_mm_loadu_ps(wq + 4), _mm_loadu_ps(xq + 4));
            __m128 p2 = _mm_mul_ps(_mm_loadu_ps(wq + 8), _mm_loadu_ps(xq + 8));
            __m128 p3 = _mm_mul_ps(_mm_loadu_ps(wq + 12), _mm_loadu_ps(xq + 12));
            _MM_TRANSPOSE4_PS(p0, p1, p2, p3);
            a[q] = _mm_add_ps(_mm_add_ps(_mm_add_ps(_mm_add_ps(a[q], p0), p1), p2), p3);
        }
    }
    for (int q = 0; q < kLanes / 4; ++q) _mm_store_ps(acc + 4 * q, a[q]);
#else
    for (int t = 0; t < full; ++t) {
        const int b = t * kStep;
        if (ahead) prefetch_span(ahead + b, kStep * sizeof(float));
        for (int l = 0; l < kLanes; ++l) {
            float s = acc[l];
            for (int v = 0; v < kV; ++v) {
                const float prod = w[b + l * kV + v] * x[b + l * kV + v];
                s = s + prod;
            }
            acc[l] = s;
        }
    }
#endif
    return finish_row<kTail>(acc, w, x, d);
}

inline float dot(const float* w, const float* x, int d, const float* ahead) {
    return d % kStep ? dot_row<true>(w, x, d, ahead) : dot_row<false>(w, x, d, ahead);
}

// x's sign words; returns the index of the first NaN in x, or -1.
inline int64_t pack_signs(const float* x, int d, uint64_t* words, int64_t n_words) {
    std::memset(words, 0, n_words * sizeof(uint64_t));
    for (int j = 0; j < d; ++j) {
        if (x[j] != x[j]) return j;
        if (x[j] < 0.0f) words[j >> 6] |= uint64_t(1) << (j & 63);
    }
    return -1;
}

inline uint64_t tail_mask64(int d) {
    const int rem = d % 64;
    return rem == 0 ? ~uint64_t(0) : (uint64_t(1) << rem) - 1;
}

inline uint8_t predict_row(const MlpParams& p, const uint64_t* __restrict w, const uint64_t* __restrict x_words,
                           int n, uint64_t mask) {
    int64_t neg = 0;
    for (int j = 0; j < n - 1; ++j) neg += __builtin_popcountll(w[j] ^ x_words[j]);
    neg += __builtin_popcountll((w[n - 1] ^ x_words[n - 1]) & mask);
    return 1000 * neg > int64_t(p.alpha_milli) * (int64_t(p.d) - neg) ? 1 : 0;
}

// Eq. 2 for rows [r0, r1): zero[i] = 1 where predicted zero. The range is read as four
// interleaved quarters (four memory streams: see dot_rows_side_by_side).
inline void predict_rows(const MlpParams& p, const uint64_t* __restrict w_signs, const uint64_t* __restrict x_words,
                         int r0, int r1, uint8_t* __restrict zero) {
    const int n = (p.d + 63) / 64;
    const uint64_t mask = tail_mask64(p.d);
    const int quarter = (r1 - r0) / 4;
    for (int i = r0; i < r0 + quarter; ++i)
        for (int s = 0; s < 4; ++s) {
            const int row = i + s * quarter;
            zero[row] = predict_row(p, w_signs + int64_t(row) * p.sign_stride, x_words, n, mask);
        }
    for (int row = r0 + 4 * quarter; row < r1; ++row)
        zero[row] = predict_row(p, w_signs + int64_t(row) * p.sign_stride, x_words, n, mask);
}

#if defined(__SSE2__)
// z[j] = rows[j] . x for kRows rows read side by side (kRows concurrent memory streams: on
// the 2-core EPYC VM one stream reads 9.4 GB/s, four 15.6 GB/s), each in the contract's
// order; the lanes' accumulators live in a small array in L1. d is a multiple of kStep.
template <int kRows>
inline void dot_rows_side_by_side(const float* const* rows, const float* __restrict x, int d, float* z) {
    alignas(16) float acc[kRows][kLanes] = {};
    for (int b = 0; b < d; b += kStep) {
        for (int r = 0; r < kRows; ++r) {
            const float* w = rows[r] + b;
            for (int q = 0; q < kLanes / 4; ++q) {
                const float* wq = w + q * 16;
                const float* xq = x + b + q * 16;
                __m128 p0 = _mm_mul_ps(_mm_loadu_ps(wq), _mm_loadu_ps(xq));
                __m128 p1 = _mm_mul_ps(_mm_loadu_ps(wq + 4), _mm_loadu_ps(xq + 4));
                __m128 p2 = _mm_mul_ps(_mm_loadu_ps(wq + 8), _mm_loadu_ps(xq + 8));
                __m128 p3 = _mm_mul_ps(_mm_loadu_ps(wq + 12), _mm_loadu_ps(xq + 12));
                _MM_TRANSPOSE4_PS(p0, p1, p2, p3);
                __m128 a = _mm_load_ps(acc[r] + 4 * q);
                a = _mm_add_ps(_mm_add_ps(_mm_add_ps(_mm_add_ps(a, p0), p1), p2), p3);
                _mm_store_ps(acc[r] + 4 * q, a);
            }
        }
    }
    for (int r = 0; r < kRows; ++r) z[r] = finish_row<false>(acc[r], rows[r], x, d);
}
#endif

constexpr int kSideBySide = 4;      // rows read at once by dot_listed_rows

// z[r] = W[rows[r]] . x for r in [r0, r1): rows kSideBySide at a time where d allows, else
// one at a time prefetching the next listed row.
inline void dot_listed_rows(const float* w, int d, const int32_t* rows, int n_rows, const float* x, int r0, int r1,
                            float* z) {
    int r = r0;
#if defined(__SSE2__)
    if (d % kStep == 0) {
        for (; r + kSideBySide <= r1; r += kSideBySide) {
            const float* ptrs[kSideBySide];
            for (int j = 0; j < kSideBySide; ++j) ptrs[j] = w + int64_t(rows[r + j]) * d;
            dot_rows_side_by_side<kSideBySide>(ptrs, x, d, z + r);
        }
    }
#endif
    for (; r < r1; ++r) {
        const float* ahead = r + 1 < n_rows ? w + int64_t(rows[r + 1]) * d : nullptr;
        z[r] = dot(w + int64_t(rows[r]) * d, x, d, ahead);
    }
}

// out[j0:j1] = the contract's down projection over the listed rows (ascending, h3 != 0).
inline void down_columns(const float* __restrict wt, int d, const int32_t* rows, const float* h3, int n, int j0,
                         int j1, float* __restrict out) {
    const int m = j1 - j0;
    std::vector<float> buf(3 * size_t(m));
    float* __restrict total = buf.data();
    float* __restrict part = total + m;
    float* __restrict q = part + m;
    std::fill(total, total + m, 0.0f);
    int r = 0;
    while (r < n) {
        const int chunk = rows[r] / (kSubRows * kSubs);
        std::fill(part, part + m, 0.0f);
        for (int s = 0; s < kSubs; ++s) {
            const int end = chunk * kSubs + s + 1;            // first sub-chunk past this one
            std::fill(q, q + m, 0.0f);
            while (r < n && rows[r] / kSubRows < end) {
                if (r + 3 < n && rows[r + 3] / kSubRows < end) {
                    // four rows at a time (four memory streams), the same roundings in the same order
                    if (r + 7 < n)
                        for (int a = 4; a < 8; ++a) prefetch_span(wt + int64_t(rows[r + a]) * d + j0, m * sizeof(float));
                    const float h0 = h3[r], h1 = h3[r + 1], h2 = h3[r + 2], h3r = h3[r + 3];
                    const float* __restrict s0 = wt + int64_t(rows[r]) * d + j0;
                    const float* __restrict s1 = wt + int64_t(rows[r + 1]) * d + j0;
                    const float* __restrict s2 = wt + int64_t(rows[r + 2]) * d + j0;
                    const float* __restrict s3 = wt + int64_t(rows[r + 3]) * d + j0;
                    for (int j = 0; j < m; ++j) {
                        const float p0 = h0 * s0[j], p1 = h1 * s1[j], p2 = h2 * s2[j], p3 = h3r * s3[j];
                        const float a = q[j] + p0;
                        const float b = a + p1;
                        const float c = b + p2;
                        q[j] = c + p3;
                    }
                    r += 4;
                } else if (r + 1 < n && rows[r + 1] / kSubRows < end) {
                    // two rows at a time: the same roundings in the same order, half the passes over q
                    if (r + 2 < n) prefetch_span(wt + int64_t(rows[r + 2]) * d + j0, m * sizeof(float));
                    if (r + 3 < n) prefetch_span(wt + int64_t(rows[r + 3]) * d + j0, m * sizeof(float));
                    const float h0 = h3[r], h1 = h3[r + 1];
                    const float* __restrict s0 = wt + int64_t(rows[r]) * d + j0;
                    const float* __restrict s1 = wt + int64_t(rows[r + 1]) * d + j0;
                    for (int j = 0; j < m; ++j) {
                        const float p0 = h0 * s0[j];
                        const float a = q[j] + p0;
                        const float p1 = h1 * s1[j];
                        q[j] = a + p1;
                    }
                    r += 2;
                } else {
                    if (r + 1 < n) prefetch_span(wt + int64_t(rows[r + 1]) * d + j0, m * sizeof(float));
                    const float h = h3[r];
                    const float* __restrict src = wt + int64_t(rows[r]) * d + j0;
                    for (int j = 0; j < m; ++j) {
                        const float p0 = h * src[j];
                        q[j] = q[j] + p0;
                    }
                    r += 1;
                }
            }
            for (int j = 0; j < m; ++j) part[j] = part[j] + q[j];
        }
        for (int j = 0; j < m; ++j) total[j] = total[j] + part[j];
    }
    std::memcpy(out + j0, total, m * sizeof(float));
}

// Columns per down task: whole cache lines, about `target` columns, and at least
// `min_tasks` tasks when d allows (so every thread of the pool has work).
inline int down_block(int d, int min_tasks, int target = 1024) {
    const int line = kCacheLine / sizeof(float);
    int tasks = std::max(min_tasks, (d + target - 1) / target);
    int block = (d + tasks - 1) / tasks;
    block = (block + line - 1) / line * line;
    return std::max(block, line);
}

}  // namespace sparseinfer
