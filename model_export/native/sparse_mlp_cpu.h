// The sparse MLP of one layer on the CPU, in reference/order_contract.py's float32 order.
//
// No onnxruntime header here: sparse_mlp_op.cc wraps these functions as the op's CPU
// kernel and hands them a parallel-for. Every result equals the NumPy reference bit for
// bit (tests/test_op_library.py):
//
// * Row dot products z = W[i, :] . x: 32 "lanes", lane l owning the V consecutive weights
//   (16 bytes: 4 fp32 or 8 fp16) of chunk t * 32 + l; each lane adds its products in order (t, then v), products
//   and sums rounded separately (the library is built with -ffp-contract=off, no fast
//   math); fp16 weights (V = 8) are widened to float32 exactly first; elements past d add
//   nothing; then the butterfly 16, 8, 4, 2, 1 (lane 0's
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
#include <cmath>
#include <cstdint>
#if defined(__SSE2__)
#include <emmintrin.h>
#include <xmmintrin.h>
#endif
#if defined(__F16C__)
#include <immintrin.h>
#endif
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

// The gate activations, one text with the CUDA kernels (the package's kernels/cuda).
#include "../../kernels/cuda/activation.h"

#if !defined(WARP_SIZE) || !defined(VECTOR_BYTES) || !defined(DOWN_ROW_CHUNK) || !defined(DOWN_SUB_CHUNKS)
#error "the order contract's constants come from reference/order_contract.py as -D defines (model_export/op_library.py)"
#endif

namespace sparseinfer {

constexpr int kLanes = WARP_SIZE;
constexpr int kSubRows = DOWN_ROW_CHUNK / DOWN_SUB_CHUNKS;
constexpr int kSubs = DOWN_SUB_CHUNKS;
constexpr int kCacheLine = 64;
static_assert(kLanes == 32, "the butterfly below is 16, 8, 4, 2, 1");
static_assert(DOWN_ROW_CHUNK % DOWN_SUB_CHUNKS == 0, "sub-chunks split a chunk evenly");

struct MlpParams {
    int d = 0, k = 0;
    int64_t sign_stride = 0;   // uint64 words per row of w_signs
    int alpha_milli = 1000;
    ActivationKind act = ACT_RELU;
    float threshold = 0.0f;    // fatrelu
};

// h1 of a gate value z: activation.h's algorithm, the reference's bits and the CUDA kernels'.
inline float activate(const MlpParams& p, float z) { return ::activate(z, p.act, p.threshold); }

// The debug output actual_zero: h1 == 0, or without exact zeros a negative gate.
inline bool actually_zero(const MlpParams& p, float z) {
    return act_exact_zeros(p.act) ? activate(p, z) == 0.0f : z < 0.0f;
}

inline void prefetch_span(const void* p, size_t bytes) {
    const char* c = static_cast<const char*>(p);
    for (size_t off = 0; off < bytes; off += kCacheLine) __builtin_prefetch(c + off, 0, 1);
}

// fp16 weights as IEEE binary16 (g++'s _Float16); widening to float32 is exact.
using half = _Float16;

// Weights of type W: V elements per lane per iteration (16 bytes: fp32 4, fp16 8), and
// (SSE) four consecutive elements widened into one register.
template <typename W> struct Weights;
template <> struct Weights<float> {
    static constexpr int V = VECTOR_BYTES / 4;
#if defined(__SSE2__)
    static __m128 load4(const float* p) { return _mm_loadu_ps(p); }
#endif
};
template <> struct Weights<half> {
    static constexpr int V = VECTOR_BYTES / 2;
#if defined(__SSE2__)
    static __m128 load4(const half* p) {
#if defined(__F16C__)
        return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
        return _mm_setr_ps(float(p[0]), float(p[1]), float(p[2]), float(p[3]));
#endif
    }
#endif
};
template <typename W> constexpr int step_of() { return kLanes * Weights<W>::V; }   // elements per iteration

// The lanes' accumulators after the whole iterations, then the tail and the butterfly.
template <typename W, bool kTail>
inline float finish_row(float* acc, const W* __restrict w, const float* __restrict x, int d) {
    constexpr int V = Weights<W>::V;
    if (kTail) {                                    // elements past d add nothing
        const int b = d / step_of<W>() * step_of<W>();
        for (int l = 0; l < kLanes; ++l) {
            float a = acc[l];
            for (int v = 0; v < V; ++v) {
                const int j = b + l * V + v;
                if (j < d) {
                    const float prod = float(w[j]) * x[j];
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

#if defined(__SSE2__)
// Four lanes' chunks at w / x (lane i's at offset i * V): their products widened, multiplied
// in place and transposed 4x4 per group of four, so that each register holds the four lanes'
// v-th products; added to the lanes' accumulators `a` in the order v = 0 .. V-1: the
// contract's roundings, vertically.
template <typename W>
inline __m128 add_four_lanes(__m128 a, const W* __restrict w, const float* __restrict x) {
    constexpr int V = Weights<W>::V;
    for (int g = 0; g < V / 4; ++g) {
        __m128 p0 = _mm_mul_ps(Weights<W>::load4(w + 4 * g), _mm_loadu_ps(x + 4 * g));
        __m128 p1 = _mm_mul_ps(Weights<W>::load4(w + V + 4 * g), _mm_loadu_ps(x + V + 4 * g));
        __m128 p2 = _mm_mul_ps(Weights<W>::load4(w + 2 * V + 4 * g), _mm_loadu_ps(x + 2 * V + 4 * g));
        __m128 p3 = _mm_mul_ps(Weights<W>::load4(w + 3 * V + 4 * g), _mm_loadu_ps(x + 3 * V + 4 * g));
        _MM_TRANSPOSE4_PS(p0, p1, p2, p3);
        a = _mm_add_ps(_mm_add_ps(_mm_add_ps(_mm_add_ps(a, p0), p1), p2), p3);
    }
    return a;
}
#endif

// z = w . x in the contract's order; `ahead` (or null) is prefetched as the row is read.
template <typename W, bool kTail>
inline float dot_row(const W* __restrict w, const float* __restrict x, int d, const W* ahead) {
    constexpr int V = Weights<W>::V, kStep = step_of<W>();
    alignas(16) float acc[kLanes] = {};
    const int full = d / kStep;
#if defined(__SSE2__)
    __m128 a[kLanes / 4];
    for (int q = 0; q < kLanes / 4; ++q) a[q] = _mm_setzero_ps();
    for (int t = 0; t < full; ++t) {
        const int b = t * kStep;
        if (ahead) prefetch_span(ahead + b, kStep * sizeof(W));
        for (int q = 0; q < kLanes / 4; ++q) a[q] = add_four_lanes(a[q], w + b + q * 4 * V, x + b + q * 4 * V);
    }
    for (int q = 0; q < kLanes / 4; ++q) _mm_store_ps(acc + 4 * q, a[q]);
#else
    for (int t = 0; t < full; ++t) {
        const int b = t * kStep;
        if (ahead) prefetch_span(ahead + b, kStep * sizeof(W));
        for (int l = 0; l < kLanes; ++l) {
            float s = acc[l];
            for (int v = 0; v < V; ++v) {
                const float prod = float(w[b + l * V + v]) * x[b + l * V + v];
                s = s + prod;
            }
            acc[l] = s;
        }
    }
#endif
    return finish_row<W, kTail>(acc, w, x, d);
}

template <typename W>
inline float dot(const W* w, const float* x, int d, const W* ahead) {
    return d % step_of<W>() ? dot_row<W, true>(w, x, d, ahead) : dot_row<W, false>(w, x, d, ahead);
}

// Prefill: kTokens tokens' dot products with one row at once. `xi` holds the tokens' x
// interleaved, xi[j * kTokens + t] = x_t[j], so that lane l's running sums of all the tokens
// are one vector and each product is added to it vertically: every token's sum takes the
// contract's roundings in its order (lane l: its chunk's V elements in order, chunk after
// chunk), then its own tail and butterfly (finish_row, on xs[t]). No transposes, and each
// weight is read once for the kTokens tokens (the prefill's down projection groups them alike).
constexpr int kTokens = 16;
typedef float TokenVec __attribute__((vector_size(kTokens * sizeof(float))));

template <typename W, bool kTail>
inline void dot_row_tokens_impl(const W* __restrict w, const float* __restrict xi, const float* const* xs, int d,
                                float* z) {
    constexpr int V = Weights<W>::V, kStep = step_of<W>();
    TokenVec acc[kLanes] = {};
    const int full = d / kStep;
    for (int t = 0; t < full; ++t)
        for (int l = 0; l < kLanes; ++l) {
            const int j0 = t * kStep + l * V;
            TokenVec a = acc[l];
            for (int v = 0; v < V; ++v) {
                TokenVec xv;
                std::memcpy(&xv, xi + size_t(j0 + v) * kTokens, sizeof xv);
                const TokenVec prod = float(w[j0 + v]) * xv;
                a = a + prod;
            }
            acc[l] = a;
        }
    for (int t = 0; t < kTokens; ++t) {
        if (!xs[t]) continue;                          // padding of a short group
        alignas(16) float lanes[kLanes];
        for (int l = 0; l < kLanes; ++l) lanes[l] = acc[l][t];
        z[t] = finish_row<W, kTail>(lanes, w, xs[t], d);
    }
}

template <typename W>
inline void dot_row_tokens(const W* w, const float* xi, const float* const* xs, int d, float* z) {
    d % step_of<W>() ? dot_row_tokens_impl<W, true>(w, xi, xs, d, z) : dot_row_tokens_impl<W, false>(w, xi, xs, d, z);
}

// x's sign words (bit j: x[j] < 0); returns the index of the first NaN in x, or -1. Four
// elements a compare where SSE2 has one (every x86-64): their bits land in one word.
inline int64_t pack_signs(const float* x, int d, uint64_t* words, int64_t n_words) {
    std::memset(words, 0, n_words * sizeof(uint64_t));
    int j = 0;
#if defined(__SSE2__)
    for (; j + 4 <= d; j += 4) {
        const __m128 v = _mm_loadu_ps(x + j);
        if (_mm_movemask_ps(_mm_cmpunord_ps(v, v))) break;          // the scalar loop finds it
        words[j >> 6] |= uint64_t(_mm_movemask_ps(_mm_cmplt_ps(v, _mm_setzero_ps()))) << (j & 63);
    }
#endif
    for (; j < d; ++j) {
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
// order; the lanes' accumulators live in a small array in L1. d is a multiple of the step.
template <typename W, int kRows>
inline void dot_rows_side_by_side(const W* const* rows, const float* __restrict x, int d, float* z) {
    constexpr int V = Weights<W>::V, kStep = step_of<W>();
    alignas(16) float acc[kRows][kLanes] = {};
    for (int b = 0; b < d; b += kStep)
        for (int r = 0; r < kRows; ++r)
            for (int q = 0; q < kLanes / 4; ++q) {
                __m128 a = _mm_load_ps(acc[r] + 4 * q);
                _mm_store_ps(acc[r] + 4 * q, add_four_lanes(a, rows[r] + b + q * 4 * V, x + b + q * 4 * V));
            }
    for (int r = 0; r < kRows; ++r) z[r] = finish_row<W, false>(acc[r], rows[r], x, d);
}
#endif

constexpr int kSideBySide = 4;      // rows read at once by dot_listed_rows

// z[r] = W[rows[r]] . x for r in [r0, r1): rows kSideBySide at a time where d allows, else
// one at a time prefetching the next listed row.
template <typename W>
inline void dot_listed_rows(const W* w, int d, const int32_t* rows, int n_rows, const float* x, int r0, int r1,
                            float* z) {
    int r = r0;
#if defined(__SSE2__)
    if (d % step_of<W>() == 0) {
        for (; r + kSideBySide <= r1; r += kSideBySide) {
            const W* ptrs[kSideBySide];
            for (int j = 0; j < kSideBySide; ++j) ptrs[j] = w + int64_t(rows[r + j]) * d;
            dot_rows_side_by_side<W, kSideBySide>(ptrs, x, d, z + r);
        }
    }
#endif
    for (; r < r1; ++r) {
        const W* ahead = r + 1 < n_rows ? w + int64_t(rows[r + 1]) * d : nullptr;
        z[r] = dot(w + int64_t(rows[r]) * d, x, d, ahead);
    }
}

inline void add_in_place(float* __restrict acc, const float* __restrict terms, size_t n) {
    for (size_t j = 0; j < n; ++j) acc[j] = acc[j] + terms[j];
}

// A vector (or scalar) of type V read from p, whatever p's alignment.
template <typename V>
inline V load_vec(const void* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// Where a step of down_walk (below) starts its columns' sums and where it leaves them: from q, or
// from +0.0 (`zeros`) where the step is its sub-chunk's first; into q, or where it is the
// sub-chunk's last, added to the chunk's partial so far, and where it is also the chunk's last,
// that added to the total so far (each +0.0 where it has none yet). The walk's additions in its
// order, done while a column's sum is in a register: no passes of their own over the columns.
// (+0.0 + v is v but for -0.0, which becomes +0.0, as the walk's sums from +0.0 do; a partial or
// total is never -0.0, so sub-chunks or chunks without rows, which would add +0.0 to them,
// change nothing and are not visited.)
struct DownStep {
    enum End { kToQ, kToPart, kToTotal };
    const float* from;        // q, or zeros
    End end;
    const float* part;        // kToPart, kToTotal: the partial so far (or zeros)
    const float* total;       // kToTotal: the total so far (or zeros)
    float* dst;               // q, the partial or the total

    template <typename V>
    V start(int j) const { return load_vec<V>(from + j); }
    template <typename V>
    void finish(int j, V sum) const {
        if (end != kToQ) sum = load_vec<V>(part + j) + sum;
        if (end == kToTotal) sum = load_vec<V>(total + j) + sum;
        std::memcpy(dst + j, &sum, sizeof sum);
    }
};

// The contract's walk of the down projection over the listed rows of W_down^T (ascending,
// h3 != 0), for one token, into out[0:m] (m columns of a task): per chunk a partial from
// +0.0, per sub-chunk q from +0.0 adding the sub-chunk's rows in order, sub-chunks added in
// order into the partial, chunks in order into out. What a row adds is the weights' business:
// `row(r)` points at listed row r's first column of the task, and `add(src, ahead, h, step, how)`
// adds the `step` rows src[0 ..] times h[0 ..] to the sums that `how` (a DownStep) starts from,
// column by column in that order, and leaves them where `how` says (step: a
// std::integral_constant 4, 2 or 1, as many memory streams; all the rows of one sub-chunk),
// `ahead` being the next step's rows (the last row where the list ends) for it to prefetch
// while it works. With `bytes` > 0 the walk prefetches those rows' `bytes` bytes itself, all
// at once before the step.
template <typename RowAt, typename AddRows>
inline void down_walk(const int32_t* rows, const float* h3, int n, int m, float* __restrict out, RowAt&& row,
                      size_t bytes, AddRows&& add) {
    if (n == 0) {
        std::fill(out, out + m, 0.0f);
        return;
    }
    const std::unique_ptr<float[]> buf(new float[3 * size_t(m)]);
    float* __restrict part = buf.get();                 // (part and q are read only where written)
    float* __restrict q = part + m;
    float* zeros = q + m;
    std::fill(zeros, zeros + m, 0.0f);
    auto chunk_of = [&](int r) { return rows[r] / (kSubRows * kSubs); };
    auto sub_of = [&](int r) { return rows[r] / kSubRows; };
    int r = 0;
    for (bool first_chunk = true; r < n; first_chunk = false) {
        const int chunk = chunk_of(r);
        for (bool first_sub = true; r < n && chunk_of(r) == chunk; first_sub = false) {
            const int sub = sub_of(r);
            for (bool first_step = true; r < n && sub_of(r) == sub; first_step = false) {
                int step = 1;
                if (r + 3 < n && sub_of(r + 3) == sub) step = 4;
                else if (r + 1 < n && sub_of(r + 1) == sub) step = 2;
                const bool ends_sub = r + step == n || sub_of(r + step) != sub;
                const bool ends_chunk = r + step == n || chunk_of(r + step) != chunk;
                const DownStep how{first_step ? zeros : q,
                                   !ends_sub ? DownStep::kToQ : !ends_chunk ? DownStep::kToPart : DownStep::kToTotal,
                                   first_sub ? zeros : part, first_chunk ? zeros : out,
                                   !ends_sub ? q : !ends_chunk ? part : out};
                if (bytes)
                    for (int a = r + step; a < std::min(n, r + 2 * step); ++a) prefetch_span(row(a), bytes);
                decltype(row(0)) src[4], ahead[4];
                for (int a = 0; a < step; ++a) src[a] = row(r + a), ahead[a] = row(std::min(n - 1, r + step + a));
                if (step == 4) add(src, ahead, h3 + r, std::integral_constant<int, 4>{}, how);
                else if (step == 2) add(src, ahead, h3 + r, std::integral_constant<int, 2>{}, how);
                else add(src, ahead, h3 + r, std::integral_constant<int, 1>{}, how);
                r += step;
            }
        }
    }
}

// down_walk for `n_tokens` tokens at once (prefill): h3 [n_tokens, k]; token t's m columns go
// to out + t * out_stride. Every row is visited once for all the tokens whose h3 of it is
// nonzero (its users), and each token's sums take exactly down_walk's roundings in its order: a
// chunk counts for a token only where one of its rows does (then all of the chunk's sub-chunks
// are added, as down_walk does). `add_row(i, users, h, n_users, q)` adds h[u] times row i to
// token users[u]'s q + users[u] * m, column by column in order; rows no token uses are skipped.
template <typename AddRow>
inline void down_walk_tokens(int k, const float* __restrict h3, int n_tokens, int m, float* __restrict out,
                             int64_t out_stride, AddRow&& add_row) {
    const size_t span = size_t(m) * n_tokens;
    std::vector<float> buf(3 * span);
    float* __restrict total = buf.data();
    float* __restrict part = total + span;
    float* __restrict q = part + span;
    std::fill(total, total + span, 0.0f);
    std::vector<uint8_t> live(n_tokens);
    std::vector<int> users(n_tokens);
    std::vector<float> h(n_tokens);
    constexpr int kChunkRows = kSubRows * kSubs;
    for (int c0 = 0; c0 < k; c0 += kChunkRows) {
        const int c1 = std::min(k, c0 + kChunkRows);
        bool any = false;
        for (int t = 0; t < n_tokens; ++t) {
            const float* ht = h3 + size_t(t) * k;
            live[t] = std::any_of(ht + c0, ht + c1, [](float v) { return v != 0.0f; });
            any = any || live[t];
        }
        if (!any) continue;
        std::fill(part, part + span, 0.0f);
        for (int s = 0; s < kSubs; ++s) {
            std::fill(q, q + span, 0.0f);
            for (int i = c0 + s * kSubRows; i < std::min(c1, c0 + (s + 1) * kSubRows); ++i) {
                int n_users = 0;
                for (int t = 0; t < n_tokens; ++t) {
                    const float ht = h3[size_t(t) * k + i];
                    if (ht != 0.0f) users[n_users] = t, h[n_users++] = ht;
                }
                if (n_users) add_row(i, users.data(), h.data(), n_users, q);
            }
            for (int t = 0; t < n_tokens; ++t)
                if (live[t]) add_in_place(part + size_t(t) * m, q + size_t(t) * m, m);
        }
        for (int t = 0; t < n_tokens; ++t)
            if (live[t]) add_in_place(total + size_t(t) * m, part + size_t(t) * m, m);
    }
    for (int t = 0; t < n_tokens; ++t) std::memcpy(out + t * out_stride, total + size_t(t) * m, m * sizeof(float));
}

// (((q + h[0] * src[0]) + h[1] * src[1]) + ...) for kRows rows, per column in that order, q and
// where the sums go as `how` says (down_walk's DownStep; its end a constant of the loop, which
// the compiler vectorizes).
template <typename W, int kRows, DownStep::End kEnd>
inline void add_rows_to(const W* const* src, const float* h, int m, const DownStep& how) {
    const W* __restrict s0 = src[0];
    const W* __restrict s1 = src[kRows > 1 ? 1 : 0];
    const W* __restrict s2 = src[kRows > 2 ? 2 : 0];
    const W* __restrict s3 = src[kRows > 3 ? 3 : 0];
    const float f0 = h[0], f1 = h[kRows > 1 ? 1 : 0], f2 = h[kRows > 2 ? 2 : 0], f3 = h[kRows > 3 ? 3 : 0];
    const float* from = how.from;             // (q, part and total may be dst itself: no __restrict;
                                              // h's values copied, so that dst's stores do not reload them)
    const float* part = how.part;
    const float* total = how.total;
    float* dst = how.dst;
    for (int j = 0; j < m; ++j) {
        float a = from[j] + f0 * float(s0[j]);
        if (kRows > 1) a = a + f1 * float(s1[j]);
        if (kRows > 2) a = a + f2 * float(s2[j]);
        if (kRows > 3) a = a + f3 * float(s3[j]);
        if (kEnd != DownStep::kToQ) a = part[j] + a;
        if (kEnd == DownStep::kToTotal) a = total[j] + a;
        dst[j] = a;
    }
}

template <typename W, int kRows>
inline void add_rows(const W* const* src, const float* h, int m, const DownStep& how) {
    static_assert(kRows == 1 || kRows == 2 || kRows == 4, "down_walk's steps");
    switch (how.end) {
        case DownStep::kToQ: return add_rows_to<W, kRows, DownStep::kToQ>(src, h, m, how);
        case DownStep::kToPart: return add_rows_to<W, kRows, DownStep::kToPart>(src, h, m, how);
        default: return add_rows_to<W, kRows, DownStep::kToTotal>(src, h, m, how);
    }
}

// out[j0:j1] = the contract's down projection over the listed rows (ascending, h3 != 0).
template <typename W>
inline void down_columns(const W* __restrict wt, int d, const int32_t* rows, const float* h3, int n, int j0,
                         int j1, float* __restrict out) {
    const int m = j1 - j0;
    down_walk(rows, h3, n, m, out + j0, [&](int r) { return wt + int64_t(rows[r]) * d + j0; }, m * sizeof(W),
              [&](const W* const* src, const W* const*, const float* h, auto step, const DownStep& how) {
                  add_rows<W, decltype(step)::value>(src, h, m, how);
              });
}

// down_columns for `n_tokens` tokens at once (prefill): h3 is [n_tokens, k], out [n_tokens, d];
// every row of W_down^T in [j0, j1) is read once for all its users while it is in cache.
template <typename W>
inline void down_columns_tokens(const W* __restrict wt, int d, int k, const float* __restrict h3, int n_tokens,
                                int j0, int j1, float* __restrict out) {
    const int m = j1 - j0;
    down_walk_tokens(k, h3, n_tokens, m, out + j0, d, [&](int i, const int* users, const float* h, int n_users,
                                                          float* q) {
        const W* __restrict src = wt + int64_t(i) * d + j0;
        if (i + 1 < k) prefetch_span(src + d, m * sizeof(W));
        for (int u = 0; u < n_users; ++u) {
            float* __restrict qt = q + size_t(users[u]) * m;
            for (int j = 0; j < m; ++j) {
                const float p0 = h[u] * float(src[j]);
                qt[j] = qt[j] + p0;
            }
        }
    });
}

// Columns per down task: a whole number of `step` columns (a cache line of float32 by default;
// a block where the weights are block-quantized), about `target` columns, and at least
// `min_tasks` tasks when d allows (so every thread of the pool has work).
inline int down_block(int d, int min_tasks, int step = kCacheLine / sizeof(float), int target = 1024) {
    int tasks = std::max(min_tasks, (d + target - 1) / target);
    int block = (d + tasks - 1) / tasks;
    block = (block + step - 1) / step * step;
    return std::max(block, step);
}

}  // namespace sparseinfer
