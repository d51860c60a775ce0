// Row dot products of block-quantized weights with int8 activations (onnxruntime's accuracy
// level 4), in reference/order_contract.py's order for them ("Block-quantized weights with int8
// activations"); every result equals reference/q8_activation.py's bit for bit
// (tests/test_block_quant_cpu.py):
//
// * x is quantized per block of 32 once per token (quantize_x): s = fl(amax / 127), codes
//   rint(fl(x / s)) ties to even, clamped to [-127, 127], 0 where s == 0.
// * A weight block and x's block give 8 exact integer sums n_g of 4 code products (q4_0 codes
//   less 8); lane 8 (b mod 2) + g of 16 float accumulators adds fl(fl(D s) n_g) (q4_1: plus
//   fl(fl(M s) u_g), u_g the group's sum of x codes), blocks in order; then the butterfly 8, 4,
//   2, 1.
//
// The integer sums come from the target's integer dot instructions, on unsigned weight bytes
// times signed x codes: AVX-512 VNNI's vpdpbusd (two blocks a 512-bit register, which is the
// 16 lanes' layout), else AVX-512BW's / AVX2's vpmaddubsw + vpmaddwd (exact: a pair's sum is at
// most 2 * 128 * 127 < 2^15), else plain loops. q4_x bytes are the nibbles as they are, q4_0's
// 8 taken off by starting each group's sum at -8 u_g; q8_0's codes go in as |c| times x's codes
// with c's sign. All integer sums are exact, the float steps element-wise IEEE in the lanes'
// order (no FMA: -ffp-contract=off), so every build gives the same bits.
#pragma once

#include <cfloat>

#include "block_quant_cpu.h"

namespace sparseinfer {

#if !defined(Q8_GROUP) || !defined(Q8_LANES)
#error "the int8-activation constants come from reference/order_contract.py as -D defines (Q8_GROUP, Q8_LANES)"
#endif
constexpr int kQ8Group = Q8_GROUP;                 // elements an integer sum
constexpr int kQ8Groups = kBlock / kQ8Group;       // sums a block
constexpr int kQ8Lanes = Q8_LANES;                 // float accumulators
constexpr int kQ8Max = 127;
static_assert(kQ8Group == 4, "one integer sum is what vpdpbusd / vpmaddwd give per 4 bytes");
static_assert(kQ8Lanes == 2 * kQ8Groups, "two blocks' sums a set of lanes (one AVX-512 register)");

// x quantized per block for a format F's rows: codes [d]; per group of 4 (d / 4 entries, a block's
// 8 in a row) its block's scale s (repeated: two blocks' 16 are one register), u = the sum of its
// codes as float, and the integer sums' start (-8 u for q4_0, else 0).
struct QuantizedX {
    std::vector<int8_t> codes;
    std::vector<float> scale, u;
    std::vector<int32_t> start;
};

// rint(v) ties to even for |v| <= 127 in the default rounding mode, as nearbyint: 1.5 * 2^23
// added makes the float's last place 1, so the sum is rounded to an integer; taking it off again
// is exact. Plain float steps that vectorize (no libm call, no rounding-mode instruction).
inline float round_to_even_small(float v) {
    constexpr float kShift = 12582912.0f;
    return (v + kShift) - kShift;
}

// Fills qx for d elements of x (d a multiple of 32) and weights whose codes are offset by
// `offset` (q4_0: 8); returns the index of the first non-finite x, or -1. Clamping before the
// rounding is the contract's rounding then clamping (127 is an integer, rounding monotonic).
inline int64_t quantize_x(const float* x, int d, int offset, QuantizedX& qx) {
    qx.codes.assign(d, 0);
    qx.scale.assign(d / kQ8Group, 0.0f);
    qx.u.assign(d / kQ8Group, 0.0f);
    qx.start.assign(d / kQ8Group, 0);
    constexpr int kHalf = kBlock / 2;
    int8_t* __restrict codes_out = qx.codes.data();     // (int8 stores may alias the vectors' own pointers)
    float* __restrict scale = qx.scale.data();
    float* __restrict u = qx.u.data();
    int32_t* __restrict start = qx.start.data();
    for (int b = 0; b < d / kBlock; ++b) {
        const float* xb = x + b * kBlock;
        float m[kHalf];                                 // the block's |x| maxima, two elements a lane
        bool finite = true;
        for (int l = 0; l < kHalf; ++l) {
            const float a = std::fabs(xb[l]), c = std::fabs(xb[l + kHalf]);
            finite = finite & (a <= FLT_MAX) & (c <= FLT_MAX);    // false for an Inf or a NaN
            m[l] = std::max(a, c);
        }
        if (!finite)
            for (int j = 0; j < kBlock; ++j)
                if (!std::isfinite(xb[j])) return int64_t(b) * kBlock + j;
        float amax = 0.0f;
        for (int l = 0; l < kHalf; ++l) amax = std::max(amax, m[l]);
        const float s = amax / float(kQ8Max);
        int32_t codes[kBlock] = {};
        if (s != 0.0f)
            for (int j = 0; j < kBlock; ++j) {
                const float v = std::min(float(kQ8Max), std::max(-float(kQ8Max), xb[j] / s));
                codes[j] = int32_t(round_to_even_small(v));
            }
        for (int j = 0; j < kBlock; ++j) codes_out[b * kBlock + j] = int8_t(codes[j]);
        for (int g = 0; g < kQ8Groups; ++g) {
            int32_t sum = 0;
            for (int e = 0; e < kQ8Group; ++e) sum += codes[g * kQ8Group + e];
            scale[b * kQ8Groups + g] = s;
            u[b * kQ8Groups + g] = float(sum);
            start[b * kQ8Groups + g] = -offset * sum;
        }
    }
    return -1;
}

template <typename F> constexpr int code_offset() { return std::is_same_v<F, Q4_0> ? 8 : 0; }

// The 16 lanes reduced by the butterfly 8, 4, 2, 1.
inline float butterfly_q8(float* acc) {
    for (int off = kQ8Lanes / 2; off >= 1; off /= 2)
        for (int a = 0; a < off; ++a) acc[a] = acc[a] + acc[a + off];
    return acc[0];
}

#if defined(__AVX512BW__)
// (Full-mask maskz forms where GCC 12 warns of an uninitialized value in the plain ones, as in
// block_quant_cpu.h: the same instructions.)

// A row's operand for two blocks b0 and b1 (b1 null: zeros in lanes 8..15): its unsigned code
// bytes in x's code order (each block's codes 0..31), and for q8_0 where they are negative.
struct Q8Weights {
    __m512i u;
    __mmask64 negative = 0;
};

template <typename F>
inline Q8Weights q8_weights(const uint8_t* b0, const uint8_t* b1) {
    Q8Weights w;
    if constexpr (std::is_same_v<F, Q8_0>) {
        const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes_of<F>(b0)));
        const __m256i c1 = b1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes_of<F>(b1))) : _mm256_setzero_si256();
        const __m512i c = _mm512_maskz_inserti64x4(0xFF, _mm512_castsi256_si512(c0), c1, 1);
        w.u = _mm512_abs_epi8(c);
        w.negative = _mm512_movepi8_mask(c);
    } else {
        const __m128i c0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes_of<F>(b0)));
        const __m128i c1 = b1 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes_of<F>(b1))) : _mm_setzero_si128();
        const __m256i pair = _mm256_inserti128_si256(_mm256_castsi128_si256(c0), c1, 1);
        // [low0 low1 high0 high1] (one mask for both halves) -> [low0 high0 low1 high1]: each
        // block's codes 0..31
        const __m512i both =
            _mm512_maskz_inserti64x4(0xFF, _mm512_castsi256_si512(pair), _mm256_srli_epi16(pair, 4), 1);
        const __m512i lh = _mm512_and_si512(both, _mm512_set1_epi8(0x0F));
        w.u = _mm512_maskz_shuffle_i64x2(0xFF, lh, lh, _MM_SHUFFLE(3, 1, 2, 0));
    }
    return w;
}

// The 16 integer sums of a row's two blocks (w) with x's codes q (two blocks' 64 bytes; past
// the end for a lone block, zeros) from `start`: q8_0's x codes take the weights' signs.
template <typename F>
inline __m512i q8_sums(const Q8Weights& w, __m512i q, __m512i start) {
    if constexpr (std::is_same_v<F, Q8_0>)
        q = _mm512_mask_sub_epi8(q, w.negative, _mm512_setzero_si512(), q);   // q * sign(c)
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(start, w.u, q);
#else
    return _mm512_add_epi32(start, _mm512_madd_epi16(_mm512_maddubs_epi16(w.u, q), _mm512_set1_epi16(1)));
#endif
}

// x's side of a pair of blocks b, b + 1 (`two`: b + 1 exists): codes, sums' starts, scales and,
// for q4_1, the groups' code sums, in the 16 lanes.
struct Q8Pair {
    __m512i q, start;
    __m512 s, u;
};

template <typename F>
inline Q8Pair q8_pair(const QuantizedX& qx, int b, bool two) {
    const __mmask16 lanes = two ? 0xFFFF : 0x00FF;
    Q8Pair x;
    x.q = two ? _mm512_loadu_si512(qx.codes.data() + b * kBlock)
              : _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx.codes.data() + b * kBlock)));
    x.start = _mm512_maskz_loadu_epi32(lanes, qx.start.data() + b * kQ8Groups);
    x.s = _mm512_maskz_loadu_ps(lanes, qx.scale.data() + b * kQ8Groups);
    if constexpr (F::kFields == 2) x.u = _mm512_maskz_loadu_ps(lanes, qx.u.data() + b * kQ8Groups);
    return x;
}

// A row's pair term: fl(fl(D s) n) per lane (q4_1: plus fl(fl(M s) u)), dv / mv its fields in
// the lanes.
template <typename F>
inline __m512 q8_term(const Q8Weights& w, const Q8Pair& x, __m512 dv, __m512 mv) {
    const __m512 n = _mm512_maskz_cvtepi32_ps(0xFFFF, q8_sums<F>(w, x.q, x.start));
    __m512 term = _mm512_mul_ps(_mm512_mul_ps(dv, x.s), n);
    if constexpr (F::kFields == 2) term = _mm512_add_ps(term, _mm512_mul_ps(_mm512_mul_ps(mv, x.s), x.u));
    return term;
}

// A tile: z[t][r] = rows[r] . x_t for kRows rows and kT tokens (qx[t]), each (row, token) sum
// in the steps and order of the 16 lanes above, so a tile's sums are one row's and one token's
// alone, bit for bit: the rows' codes are unpacked once for the kT tokens and each token's x
// loaded once for the kRows rows. `ahead`: kRows rows prefetched meanwhile (null: the rows
// themselves, in cache by then, so that the loop has no branch for it). A run of 16 blocks is
// 8 whole pairs; only a short last run can end with a lone block.
template <typename F, int kRows, int kT>
inline void dot_q8_tile(const uint8_t* const* rows, const QuantizedX* const* qx, int d, float* const* z,
                        const uint8_t* const* ahead = nullptr) {
    const int blocks = d / kBlock;
    __m512 acc[kT][kRows];
    for (int t = 0; t < kT; ++t)
        for (int r = 0; r < kRows; ++r) acc[t][r] = _mm512_setzero_ps();
    const __m512i pair0 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const uint8_t* const* pf = ahead ? ahead : rows;
    BlockFields<F, true> fields[kRows];
    auto pair = [&](int b, int j, auto two_c) {
        constexpr bool two = decltype(two_c)::value;
        const __m512i idx = _mm512_add_epi32(pair0, _mm512_set1_epi32(j));
        Q8Weights w[kRows];
        __m512 dv[kRows], mv[kRows];
        for (int r = 0; r < kRows; ++r) {
            const uint8_t* block = rows[r] + int64_t(b) * F::kBytes;
            prefetch_blocks<F, 2>(pf[r] + int64_t(b) * F::kBytes);
            w[r] = q8_weights<F>(block, two ? block + F::kBytes : nullptr);
            dv[r] = _mm512_maskz_permutexvar_ps(0xFFFF, idx, _mm512_load_ps(fields[r].f));
            mv[r] = F::kFields == 2 ? _mm512_maskz_permutexvar_ps(0xFFFF, idx, _mm512_load_ps(fields[r].f + kScaleRun))
                                    : dv[r];
        }
        for (int t = 0; t < kT; ++t) {
            const Q8Pair x = q8_pair<F>(*qx[t], b, two);
            for (int r = 0; r < kRows; ++r) acc[t][r] = _mm512_add_ps(acc[t][r], q8_term<F>(w[r], x, dv[r], mv[r]));
        }
    };
    for (int b0 = 0; b0 < blocks; b0 += kScaleRun) {
        const int n = std::min(kScaleRun, blocks - b0);
        for (int r = 0; r < kRows; ++r) fields[r].load(rows[r], b0, n);
        if (n == kScaleRun) {
            for (int j = 0; j < kScaleRun; j += 2) pair(b0 + j, j, std::true_type{});
        } else {
            int j = 0;
            for (; j + 1 < n; j += 2) pair(b0 + j, j, std::true_type{});
            if (j < n) pair(b0 + j, j, std::false_type{});
        }
    }
    for (int t = 0; t < kT; ++t)
        for (int r = 0; r < kRows; ++r) {
            alignas(64) float lanes[kQ8Lanes];
            _mm512_store_ps(lanes, acc[t][r]);
            z[t][r] = butterfly_q8(lanes);
        }
}

// z[r] = rows[r] . x for kRows rows side by side, x quantized (qx); `ahead`: rows to prefetch.
template <typename F, int kRows>
inline void dot_q8_rows(const uint8_t* const* rows, const QuantizedX& qx, int d, float* z,
                        const uint8_t* const* ahead = nullptr) {
    const QuantizedX* x = &qx;
    float* zs = z;
    dot_q8_tile<F, kRows, 1>(rows, &x, d, &zs, ahead);
}

#else
// The 8 integer sums of a block with x's codes q (32) from start[0..7].
template <typename F>
inline void q8_block_sums(const uint8_t* block, const int8_t* q, const int32_t* start, int32_t* sums) {
    const uint8_t* c = codes_of<F>(block);
#if defined(__AVX2__)
    __m256i u, qs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    if constexpr (std::is_same_v<F, Q8_0>) {
        const __m256i cv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c));
        u = _mm256_abs_epi8(cv);
        qs = _mm256_sign_epi8(qs, cv);      // q * sign(c) (0 where c == 0, whose |c| is 0 too)
    } else {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c));
        const __m128i low = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
        const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
        u = _mm256_inserti128_si256(_mm256_castsi128_si256(low), high, 1);
    }
    const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(u, qs), _mm256_set1_epi16(1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums),
                        _mm256_add_epi32(dot, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(start))));
#else
    for (int g = 0; g < kQ8Groups; ++g) {
        int32_t n = start[g];
        for (int j = g * kQ8Group; j < (g + 1) * kQ8Group; ++j) {
            const int32_t code = std::is_same_v<F, Q8_0> ? int32_t(int8_t(c[j])) : int32_t(j < 16 ? c[j] & 15 : c[j - 16] >> 4);
            n += code * q[j];
        }
        sums[g] = n;
    }
#endif
}

template <typename F, int kRows>
inline void dot_q8_rows(const uint8_t* const* rows, const QuantizedX& qx, int d, float* z,
                        const uint8_t* const* ahead = nullptr) {
    typedef float Vec8 __attribute__((vector_size(32)));
    typedef int32_t Int8 __attribute__((vector_size(32)));
    Vec8 acc[kRows][2] = {};                        // lanes 0..7 (even blocks), 8..15 (odd)
    for (int b = 0; b < d / kBlock; ++b) {
        const Vec8 s = load_vec<Vec8>(qx.scale.data() + b * kQ8Groups);
        for (int r = 0; r < kRows; ++r) {
            const uint8_t* block = rows[r] + int64_t(b) * F::kBytes;
            if (ahead) __builtin_prefetch(ahead[r] + int64_t(b) * F::kBytes, 0, 1);
            float f[F::kFields];
            widen_fields<F>(block, f);
            Int8 sums;
            q8_block_sums<F>(block, qx.codes.data() + b * kBlock, qx.start.data() + b * kQ8Groups,
                             reinterpret_cast<int32_t*>(&sums));
            Vec8 term = (f[0] * s) * __builtin_convertvector(sums, Vec8);
            if constexpr (F::kFields == 2) term = term + (f[1] * s) * load_vec<Vec8>(qx.u.data() + b * kQ8Groups);
            acc[r][b % 2] = acc[r][b % 2] + term;
        }
    }
    for (int r = 0; r < kRows; ++r) {
        alignas(32) float lanes[kQ8Lanes];
        std::memcpy(lanes, acc[r], sizeof lanes);
        z[r] = butterfly_q8(lanes);
    }
}
#endif

// z[r] = W[row r] . x (quantized) for r in [r0, r1) of a list of n_rows rows (rows[r], or r where
// rows is null): kQuantSideBySide rows side by side, the next ones prefetched meanwhile.
template <typename F>
inline void dot_q8_listed(const uint8_t* w, int d, const int32_t* rows, int n_rows, const QuantizedX& qx, int r0,
                          int r1, float* z, const Upcoming& next = {}) {
    walk_listed<F>(w, d, rows, n_rows, r0, r1,
                   [&](const uint8_t* const* now, const uint8_t* const* ahead, int r) {
                       dot_q8_rows<F, kQuantSideBySide>(now, qx, d, z + r, ahead);
                   },
                   [&](const uint8_t* row, const uint8_t* ahead, int r) {
                       dot_q8_rows<F, 1>(&row, qx, d, z + r, ahead ? &ahead : nullptr);
                   },
                   next);
}

// Prefill on int8 activations: z[t * stride + i - r0] = W[i] . x_t for the rows i in [r0, r1)
// and the n tokens' quantized x (qx[0 .. n)), each sum dot_q8_rows's bit for bit. With
// AVX-512 in tiles of kQuantSideBySide rows x kQ8Tokens tokens, a tile's rows read once for all
// the tokens (x's codes, a few KiB a token, stay in L2); elsewhere token after token.
constexpr int kQ8Tokens = 4;

template <typename F>
inline void dot_q8_tokens(const uint8_t* w, int d, int r0, int r1, const QuantizedX* qx, int n, float* z,
                          int stride) {
#if defined(__AVX512BW__)
    const int64_t row_bytes = row_bytes_q<F>(d);
    auto tile = [&](auto rows_c, auto tokens_c, int i, int t0) {
        constexpr int R = decltype(rows_c)::value, T = decltype(tokens_c)::value;
        const uint8_t* rows[R];
        const QuantizedX* xs[T];
        float zt[T][R];
        float* zp[T];
        for (int r = 0; r < R; ++r) rows[r] = w + int64_t(i + r) * row_bytes;
        for (int t = 0; t < T; ++t) xs[t] = qx + t0 + t, zp[t] = zt[t];
        dot_q8_tile<F, R, T>(rows, xs, d, zp);
        for (int t = 0; t < T; ++t)
            for (int r = 0; r < R; ++r) z[size_t(t0 + t) * stride + i + r - r0] = zt[t][r];
    };
    auto all_tokens = [&](auto rows_c, int i) {
        using Ic = std::integral_constant<int, kQ8Tokens>;
        int t0 = 0;
        for (; t0 + kQ8Tokens <= n; t0 += kQ8Tokens) tile(rows_c, Ic{}, i, t0);
        static_assert(kQ8Tokens == 4, "the tails below");
        switch (n - t0) {
            case 3: tile(rows_c, std::integral_constant<int, 3>{}, i, t0); break;
            case 2: tile(rows_c, std::integral_constant<int, 2>{}, i, t0); break;
            case 1: tile(rows_c, std::integral_constant<int, 1>{}, i, t0); break;
            default: break;
        }
    };
    int i = r0;
    for (; i + kQuantSideBySide <= r1; i += kQuantSideBySide)
        all_tokens(std::integral_constant<int, kQuantSideBySide>{}, i);
    for (; i < r1; ++i) all_tokens(std::integral_constant<int, 1>{}, i);
#else
    for (int t = 0; t < n; ++t)
        dot_q8_listed<F>(w + int64_t(r0) * row_bytes_q<F>(d), d, nullptr, r1 - r0, qx[t], 0, r1 - r0,
                         z + size_t(t) * stride);
#endif
}

}  // namespace sparseinfer
