// Block-quantized weights (GGUF's Q8_0, Q4_0, Q4_1) on the CPU, in reference/order_contract.py's
// order for them ("Block-quantized weights"): every result equals the NumPy reference on the
// dequantized weights bit for bit (tests/test_block_quant_cpu.py).
//
// * Blocks: 32 consecutive weights of a row in F::kBytes bytes, as reference/block_quant.py
//   and a GGUF file lay them out: an fp16 scale D (q4_1: then an fp16 min M), then the codes;
//   q8_0 32 int8, q4_0 / q4_1 16 bytes whose low nibble is code j and high nibble code j + 16.
//   A weight is dequantized to float32 as q8_0 D * q, q4_0 D * (q - 8) (both exact), q4_1
//   fl(D * q + M) (D * q exact), D and M widened exactly from fp16.
// * Row dot products (gate, up): V = 1, lane l owns element 32 t + l of iteration t, i.e. one
//   block is one iteration of the 32 lanes; each lane adds fl(w * x) in order t = 0, 1, ...,
//   then the butterfly 16, 8, 4, 2, 1 (sparse_mlp_cpu.h's finish_row). d is a multiple of 32.
//   So a block is dequantized straight into SIMD registers that hold consecutive lanes, and
//   added to the lanes' accumulators vertically: no transposes. On AVX-512 the fp16 fields of
//   a run of 16 q4_x blocks are widened together first (BlockFields), so that a block's scale
//   costs a broadcast load, not a conversion of its own.
// * Down projection on W_down^T blocks along d: sparse_mlp_cpu.h's walks (down_walk /
//   down_walk_tokens: chunks, sub-chunks, rows ascending, h3 == 0 skipped), each row's
//   weights dequantized block by block (scaled_lanes: on AVX-512 a q4_x block's products
//   h3 * w come out of its table of 16 values times h3, the same roundings). Column ranges are
//   whole blocks (multiples of 32).
//
// SIMD through GCC vector extensions, as wide as the target allows (AVX-512 16 floats, AVX2 8,
// else 4), codes widened to int32 by the target's one instruction (SSE4.1 and up; else a plain
// loop): element-wise IEEE products and sums, so every width gives the same bits (the library is
// built with -ffp-contract=off, no fast math: no FMA, no reassociation).
#pragma once

#include "sparse_mlp_cpu.h"

#if defined(__SSE4_1__)
#include <immintrin.h>
#endif

namespace sparseinfer {

constexpr int kBlock = 32;                         // weights per block, every format
static_assert(kBlock == kLanes, "one block is one iteration of the 32 lanes (V = 1)");

#if defined(__AVX512F__)
constexpr int kVecFloats = 16;
#elif defined(__AVX2__)
constexpr int kVecFloats = 8;
#else
constexpr int kVecFloats = 4;
#endif
constexpr int kBlockVecs = kBlock / kVecFloats;    // registers a block's lanes take
typedef float VecF __attribute__((vector_size(kVecFloats * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kVecFloats * sizeof(int32_t))));

// A block's 32 dequantized weights, lanes v * kVecFloats .. in w[v].
struct BlockLanes {
    VecF w[kBlockVecs];
};

// A little-endian fp16 field, widened exactly. With F16C through vcvtph2ps, which writes its whole
// register: the scalar float(_Float16) of AVX512-FP16 (vcvtsh2ss) merges into its destination, a
// false dependency that chains every block's scale conversion into one serial sequence.
inline float half_at(const uint8_t* p) {
#if defined(__F16C__)
    uint16_t bits;
    std::memcpy(&bits, p, sizeof bits);
    return _cvtsh_ss(bits);
#else
    half h;
    std::memcpy(&h, p, sizeof h);
    return float(h);
#endif
}

// The lines of kN blocks from p prefetched (into L2): one a line over their span, and their last
// byte's, so that calls a span apart leave no line out (q8_0's 34-byte blocks: 68 bytes a pair,
// where one prefetch a pair would skip one line in 17; q4_x's 36 or 40 bytes take one).
template <typename F, int kN>
inline void prefetch_blocks(const uint8_t* p) {
    constexpr int kSpan = kN * F::kBytes;
    for (int off = 0; off < kSpan; off += kCacheLine) __builtin_prefetch(p + off, 0, 1);
    if constexpr (kSpan % kCacheLine != 0 && kSpan > kCacheLine) __builtin_prefetch(p + kSpan - 1, 0, 1);
}

// Blocks whose fp16 fields are widened together (BlockFields).
constexpr int kScaleRun = 16;

#if defined(__AVX512F__)
// n <= kScaleRun fp16 fields at p, p + stride, ... widened exactly into out[0 : kScaleRun] (zeros
// past n): gathered as bits by scalar loads, then one conversion for them all.
inline void halves_to_floats(const uint8_t* p, int64_t stride, int n, float* out) {
    alignas(32) uint16_t bits[kScaleRun] = {};
    for (int i = 0; i < n; ++i) std::memcpy(&bits[i], p + i * stride, sizeof bits[i]);
    _mm512_storeu_ps(out, _mm512_maskz_cvtph_ps(0xFFFF, _mm256_load_si256(reinterpret_cast<const __m256i*>(bits))));
}
#endif

// kVecFloats bytes at p widened to int32 lanes, signed (int8 codes) or not (nibble pairs): one
// instruction where the target has it (GCC's generic __builtin_convertvector goes byte by byte).
template <bool kSigned>
inline VecI widen_bytes(const uint8_t* p) {
#if defined(__AVX512F__)
    // (the maskz forms throughout: GCC 12 warns of an uninitialized value in the unmasked ones)
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return VecI(kSigned ? _mm512_maskz_cvtepi8_epi32(0xFFFF, b) : _mm512_maskz_cvtepu8_epi32(0xFFFF, b));
#elif defined(__AVX2__)
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return VecI(kSigned ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
#elif defined(__SSE4_1__)
    const __m128i b = _mm_cvtsi32_si128(load_vec<int32_t>(p));
    return VecI(kSigned ? _mm_cvtepi8_epi32(b) : _mm_cvtepu8_epi32(b));
#else
    VecI out;
    for (int i = 0; i < kVecFloats; ++i) out[i] = kSigned ? int32_t(int8_t(p[i])) : int32_t(p[i]);
    return out;
#endif
}

// Codes of q4_x lanes [lane0, lane0 + kVecFloats): low nibbles of bytes lane0.. for lanes
// below 16, high nibbles of bytes lane0 - 16.. above.
inline VecI nibbles(const uint8_t* codes, int lane0) {
    const VecI bytes = widen_bytes<false>(codes + lane0 % 16);
    return lane0 < 16 ? (bytes & 15) : (bytes >> 4);
}

// A block format F: kBytes bytes a block, kFields fp16 fields (D; q4_1: D, M) and then the codes;
// F::lanes(b, f) is the block's weights from its fields f already widened.
template <typename F>
inline const uint8_t* codes_of(const uint8_t* b) {
    return b + 2 * F::kFields;
}

// A block's fp16 fields widened, each on its own.
template <typename F>
inline void widen_fields(const uint8_t* b, float* f) {
    for (int k = 0; k < F::kFields; ++k) f[k] = half_at(b + 2 * k);
}

struct Q8_0 {
    static constexpr const char* kName = "q8_0";   // reference/block_quant.py's name
    static constexpr int kBytes = 34;
    static constexpr int kFields = 1;               // fp16 fields before the codes: D
    static constexpr bool kTable = false;           // no table of 16 values (see q4_lookup)
    static inline BlockLanes lanes(const uint8_t* b, const float* f) {
        const float d = f[0];
        BlockLanes out;
        for (int v = 0; v < kBlockVecs; ++v)
            out.w[v] = d * __builtin_convertvector(widen_bytes<true>(codes_of<Q8_0>(b) + v * kVecFloats), VecF);
        return out;
    }
};

#if defined(__AVX512F__)
// q4_x on AVX-512: a block's 16 possible values (value[c] of code c, one vector) are computed
// once, then each lane's picked by its code with vpermps, which reads an index's low 4 bits:
// lanes 0..15 index by their byte as it is (the low nibble), lanes 16..31 by it shifted by 4.
// The same values as the element-wise rule, in fewer instructions than widening and scaling.
static_assert(kBlockVecs == 2, "16 lanes a register");
inline BlockLanes q4_lookup(const uint8_t* codes, __m512 values) {
    const __m512i bytes = _mm512_maskz_cvtepu8_epi32(0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
    BlockLanes out;
    out.w[0] = VecF(_mm512_maskz_permutexvar_ps(0xFFFF, bytes, values));
    out.w[1] = VecF(_mm512_maskz_permutexvar_ps(0xFFFF, __m512i(VecI(bytes) >> 4), values));
    return out;
}
inline __m512 q4_codes() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
#endif

struct Q4_0 {
    static constexpr const char* kName = "q4_0";   // reference/block_quant.py's name
    static constexpr int kBytes = 18;
    static constexpr int kFields = 1;               // D
    static constexpr bool kTable = true;
#if defined(__AVX512F__)
    static inline __m512 values(const float* f) {   // value[c] = D * (c - 8), exact
        return _mm512_mul_ps(_mm512_set1_ps(f[0]), _mm512_sub_ps(q4_codes(), _mm512_set1_ps(8.0f)));
    }
    static inline BlockLanes lanes(const uint8_t* b, const float* f) { return q4_lookup(codes_of<Q4_0>(b), values(f)); }
#else
    static inline BlockLanes lanes(const uint8_t* b, const float* f) {
        BlockLanes out;
        for (int v = 0; v < kBlockVecs; ++v)
            out.w[v] = f[0] * __builtin_convertvector(nibbles(codes_of<Q4_0>(b), v * kVecFloats) - 8, VecF);
        return out;
    }
#endif
};

struct Q4_1 {
    static constexpr const char* kName = "q4_1";   // reference/block_quant.py's name
    static constexpr int kBytes = 20;
    static constexpr int kFields = 2;               // D, M
    static constexpr bool kTable = true;
#if defined(__AVX512F__)
    static inline __m512 values(const float* f) {   // value[c] = fl(D * c + M)
        return _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(f[0]), q4_codes()), _mm512_set1_ps(f[1]));
    }
    static inline BlockLanes lanes(const uint8_t* b, const float* f) { return q4_lookup(codes_of<Q4_1>(b), values(f)); }
#else
    static inline BlockLanes lanes(const uint8_t* b, const float* f) {
        BlockLanes out;
        for (int v = 0; v < kBlockVecs; ++v) {
            const VecF dq = f[0] * __builtin_convertvector(nibbles(codes_of<Q4_1>(b), v * kVecFloats), VecF);
            out.w[v] = dq + f[1];
        }
        return out;
    }
#endif
};

// A block's 32 weights dequantized.
template <typename F>
inline BlockLanes dequantize(const uint8_t* b) {
    float f[F::kFields];
    widen_fields<F>(b, f);
    return F::lanes(b, f);
}

// fl(h * w) for each of a block's weights w (fields f widened). With a table (q4_x on AVX-512) h
// multiplies its 16 values first and the lookup picks the products: value[c] is w exactly, so
// fl(h * value[c]) is the same product, one multiply for the block instead of one a register.
template <typename F>
inline BlockLanes scaled_lanes(const uint8_t* b, const float* f, float h) {
#if defined(__AVX512F__)
    if constexpr (F::kTable) return q4_lookup(codes_of<F>(b), _mm512_mul_ps(_mm512_set1_ps(h), F::values(f)));
#endif
    const BlockLanes w = F::lanes(b, f);
    BlockLanes out;
    for (int v = 0; v < kBlockVecs; ++v) out.w[v] = h * w.w[v];
    return out;
}

// The fp16 fields of a row's blocks, widened: each block's own where it is used, or (kRun) a run
// of up to kScaleRun blocks' converted together into `f` by load(), so that in the loop a
// block's scale is a broadcast load. Runs serve q4_x on AVX-512, where the conversion was a
// measurable part of a block's work; for q8_0, or without AVX-512, they cost more than they save.
#if defined(__AVX512F__)
template <typename F, bool kRun = F::kTable>
#else
template <typename F, bool kRun = false>
#endif
struct BlockFields {
    void load(const uint8_t*, int, int) {}
    void of(const uint8_t* block, int, float* out) const { widen_fields<F>(block, out); }   // block b0 + j's
};

#if defined(__AVX512F__)
template <typename F>
struct BlockFields<F, true> {
    alignas(64) float f[F::kFields * kScaleRun];
    void load(const uint8_t* row, int b0, int n) {
        for (int k = 0; k < F::kFields; ++k)
            halves_to_floats(row + int64_t(b0) * F::kBytes + 2 * k, F::kBytes, n, f + k * kScaleRun);
    }
    void of(const uint8_t*, int j, float* out) const {
        for (int k = 0; k < F::kFields; ++k) out[k] = f[k * kScaleRun + j];
    }
};
#endif

// A node's weight format: float weights (fp32 / fp16), or one of the block formats.
enum WeightFormat { FORMAT_FLOAT, FORMAT_Q8_0, FORMAT_Q4_0, FORMAT_Q4_1 };
constexpr WeightFormat kBlockFormats[] = {FORMAT_Q8_0, FORMAT_Q4_0, FORMAT_Q4_1};

// fn(F{}) for a block format's struct (F::kName, F::kBytes, F::lanes); f is not FORMAT_FLOAT.
template <typename Fn>
inline decltype(auto) with_block_format(WeightFormat f, Fn&& fn) {
    switch (f) {
        case FORMAT_Q4_0: return fn(Q4_0{});
        case FORMAT_Q4_1: return fn(Q4_1{});
        default: return fn(Q8_0{});
    }
}

inline const char* format_name(WeightFormat f) {
    return with_block_format(f, [](auto q) { return decltype(q)::kName; });
}

inline int block_bytes(WeightFormat f) {
    return with_block_format(f, [](auto q) { return decltype(q)::kBytes; });
}

// Bytes of one row of d weights (d a multiple of 32).
template <typename F>
inline int64_t row_bytes_q(int d) {
    return int64_t(d / kBlock) * F::kBytes;
}

// The 32 lanes' accumulators at acc (lane order: vectors of kVecFloats lanes, or floats), reduced
// by the butterfly.
inline float butterfly_lanes(const void* acc) {
    alignas(64) float lanes[kLanes];
    std::memcpy(lanes, acc, sizeof lanes);
    return finish_row<float, false>(lanes, nullptr, nullptr, 0);
}

// z[r] = rows[r] . x for kRows rows read side by side (independent accumulator chains and
// memory streams), each in the V = 1 order. `ahead` (or null): kRows rows prefetched meanwhile.
template <typename F, int kRows>
inline void dot_q_rows(const uint8_t* const* rows, const float* __restrict x, int d, float* z,
                       const uint8_t* const* ahead = nullptr) {
    VecF acc[kRows][kBlockVecs] = {};
    const int blocks = d / kBlock;
    BlockFields<F> fields[kRows];
    for (int b0 = 0; b0 < blocks; b0 += kScaleRun) {
        const int n = std::min(kScaleRun, blocks - b0);
        for (int r = 0; r < kRows; ++r) fields[r].load(rows[r], b0, n);
        for (int j = 0; j < n; ++j) {
            const int b = b0 + j;
            VecF xv[kBlockVecs];
            for (int v = 0; v < kBlockVecs; ++v) xv[v] = load_vec<VecF>(x + b * kBlock + v * kVecFloats);
            for (int r = 0; r < kRows; ++r) {
                if (ahead) __builtin_prefetch(ahead[r] + int64_t(b) * F::kBytes, 0, 1);
                const uint8_t* block = rows[r] + int64_t(b) * F::kBytes;
                float fj[F::kFields];
                fields[r].of(block, j, fj);
                const BlockLanes w = F::lanes(block, fj);
                for (int v = 0; v < kBlockVecs; ++v) {
                    const VecF prod = w.w[v] * xv[v];
                    acc[r][v] = acc[r][v] + prod;
                }
            }
        }
    }
    for (int r = 0; r < kRows; ++r) z[r] = butterfly_lanes(acc[r]);
}

// One row's dot product (`ahead`: a row to prefetch meanwhile, or null).
template <typename F>
inline float dot_q(const uint8_t* row, const float* x, int d, const uint8_t* ahead = nullptr) {
    float z;
    dot_q_rows<F, 1>(&row, x, d, &z, ahead ? &ahead : nullptr);
    return z;
}

// Two rows at once (a neuron's gate and up rows): z[0] = row_a . x, z[1] = row_b . x;
// `ahead_a`, `ahead_b` (both or neither): the next two rows, prefetched meanwhile.
template <typename F>
inline void dot_q2(const uint8_t* row_a, const uint8_t* row_b, const float* x, int d, float* z,
                   const uint8_t* ahead_a = nullptr, const uint8_t* ahead_b = nullptr) {
    const uint8_t* rows[2] = {row_a, row_b};
    const uint8_t* ahead[2] = {ahead_a, ahead_b};
    dot_q_rows<F, 2>(rows, x, d, z, ahead_a ? ahead : nullptr);
}

constexpr int kQuantSideBySide = 4;      // rows read at once by dot_q_listed

// The first rows (up to kQuantSideBySide) that the next phase of a token will read: the phase
// before prefetches them as its own list runs out, so that the next one does not start cold.
struct Upcoming {
    const uint8_t* rows[kQuantSideBySide];
    int n = 0;
};

// Upcoming rows of a matrix with `stride` bytes a row at w: rows[0 ..] of a list of n.
inline Upcoming upcoming_rows(const uint8_t* w, int64_t stride, const int32_t* rows, int n) {
    Upcoming u;
    for (; u.n < std::min(n, kQuantSideBySide); ++u.n) u.rows[u.n] = w + int64_t(rows[u.n]) * stride;
    return u;
}

// z[r] = W[row r] . x for r in [r0, r1) of a list of n_rows rows, row r being rows[r] (or r
// itself where rows is null): kQuantSideBySide rows side by side, the next ones prefetched
// meanwhile, the last few one at a time.
// The walk of such a list: group(now, ahead, r) for kQuantSideBySide rows r.. at a time (`ahead`
// the next ones: past the list's end the `next` phase's first rows, then its last row again),
// then one(row, ahead, r) for the last few (`ahead` the next row, or null).
template <typename F, typename Group, typename One>
inline void walk_listed(const uint8_t* w, int d, const int32_t* rows, int n_rows, int r0, int r1, Group&& group,
                        One&& one, const Upcoming& next = {}) {
    const int64_t stride = row_bytes_q<F>(d);
    auto row = [&](int r) { return w + int64_t(rows ? rows[r] : r) * stride; };
    auto ahead_of = [&](int r) {
        return r < n_rows ? row(r) : r - n_rows < next.n ? next.rows[r - n_rows] : row(n_rows - 1);
    };
    constexpr int kRows = kQuantSideBySide;
    int r = r0;
    for (; r + kRows <= r1; r += kRows) {
        const uint8_t *now[kRows], *ahead[kRows];
        for (int a = 0; a < kRows; ++a) {
            now[a] = row(r + a);
            ahead[a] = ahead_of(r + kRows + a);
        }
        group(now, ahead, r);
    }
    for (; r < r1; ++r) one(row(r), r + 1 < n_rows || next.n ? ahead_of(r + 1) : nullptr, r);
}

template <typename F>
inline void dot_q_listed(const uint8_t* w, int d, const int32_t* rows, int n_rows, const float* x, int r0, int r1,
                         float* z, const Upcoming& next = {}) {
    walk_listed<F>(w, d, rows, n_rows, r0, r1,
                   [&](const uint8_t* const* now, const uint8_t* const* ahead, int r) {
                       dot_q_rows<F, kQuantSideBySide>(now, x, d, z + r, ahead);
                   },
                   [&](const uint8_t* row, const uint8_t* ahead, int r) { z[r] = dot_q<F>(row, x, d, ahead); }, next);
}

// Prefill: rows' dot products with several tokens' x, each sum in the V = 1 order above (lane l
// of a row and a token adds fl(w * x) block after block, then the butterfly), so each equals
// dot_q's bit for bit. A tile of kTileRows rows x kTileTokens tokens keeps its sums in registers,
// one register's kVecFloats lanes at a time: a weight register serves kTileTokens tokens and an x
// register kTileRows rows, every product added vertically, no broadcasts or transposes. The
// tile's rows are dequantized kChunkBlocks blocks at a time into a buffer (in L1) that serves all
// the tokens, their sums waiting in memory between chunks; tokens go in groups of kTokenGroup,
// whose x stays in L2 while the rows pass.
constexpr int kTileRows = 4;
#if defined(__AVX512F__)
constexpr int kTileTokens = 4;           // 32 registers: 16 sums, 4 weights, x
#else
constexpr int kTileTokens = 2;           // 16 registers: 8 sums, 4 weights, x
#endif
constexpr int kChunkBlocks = 32;
constexpr int kTokenGroup = 64;

// acc[(r * n + t) * 32 + l] += lane l's products of row r and token t over cb blocks, for r <
// kTileRows, t < kT: weights w[(r * kChunkBlocks + b) * 32 + l], x_t[b * 32 + l] at x + t * d.
template <int kT>
inline void add_tile_chunk(const float* __restrict w, int cb, const float* __restrict x, int d,
                           float* __restrict acc, int n) {
    for (int v = 0; v < kBlockVecs; ++v) {
        const int lane0 = v * kVecFloats;
        VecF a[kTileRows][kT];
        for (int r = 0; r < kTileRows; ++r)
            for (int t = 0; t < kT; ++t) a[r][t] = load_vec<VecF>(acc + (size_t(r) * n + t) * kBlock + lane0);
        for (int b = 0; b < cb; ++b) {
            VecF wv[kTileRows];
            for (int r = 0; r < kTileRows; ++r) wv[r] = load_vec<VecF>(w + (r * kChunkBlocks + b) * kBlock + lane0);
            for (int t = 0; t < kT; ++t) {
                const VecF xv = load_vec<VecF>(x + size_t(t) * d + b * kBlock + lane0);
                for (int r = 0; r < kTileRows; ++r) {
                    const VecF prod = wv[r] * xv;
                    a[r][t] = a[r][t] + prod;
                }
            }
        }
        for (int r = 0; r < kTileRows; ++r)
            for (int t = 0; t < kT; ++t) std::memcpy(acc + (size_t(r) * n + t) * kBlock + lane0, &a[r][t], sizeof(VecF));
    }
}

// z[t * z_stride + r] = rows[r] . x_t for r < n_rows (at most kTileRows), t < n (at most
// kTokenGroup), x_t at x + t * d; `scratch`: kPrefillScratch floats.
constexpr size_t kPrefillScratch = size_t(kTileRows) * (kChunkBlocks + kTokenGroup) * kBlock;
template <typename F>
inline void dot_q_tile(const uint8_t* const* rows, int n_rows, const float* x, int n, int d, float* z,
                       int64_t z_stride, float* scratch) {
    float* w = scratch;
    float* acc = scratch + size_t(kTileRows) * kChunkBlocks * kBlock;
    std::fill(acc, acc + size_t(kTileRows) * n * kBlock, 0.0f);
    const int blocks = d / kBlock;
    for (int c0 = 0; c0 < blocks; c0 += kChunkBlocks) {
        const int cb = std::min(kChunkBlocks, blocks - c0);
        for (int r = 0; r < kTileRows; ++r)      // a short tile repeats its last row (sums unused)
            for (int b = 0; b < cb; ++b) {
                const BlockLanes lanes = dequantize<F>(rows[std::min(r, n_rows - 1)] + int64_t(c0 + b) * F::kBytes);
                std::memcpy(w + (r * kChunkBlocks + b) * kBlock, lanes.w, sizeof lanes.w);
            }
        const float* xc = x + c0 * kBlock;
        int t = 0;
        for (; t + kTileTokens <= n; t += kTileTokens)
            add_tile_chunk<kTileTokens>(w, cb, xc + size_t(t) * d, d, acc + size_t(t) * kBlock, n);
        for (; t < n; ++t) add_tile_chunk<1>(w, cb, xc + size_t(t) * d, d, acc + size_t(t) * kBlock, n);
    }
    for (int r = 0; r < n_rows; ++r)
        for (int t = 0; t < n; ++t) z[t * z_stride + r] = butterfly_lanes(acc + (size_t(r) * n + t) * kBlock);
}

// z[t * z_stride + (i - r0)] = W[row i] . x_t for rows i in [r0, r1) of W (rows of d weights in
// format F at w) and tokens t < n_tokens (x_t at x + t * d): groups of tokens, tiles of rows.
template <typename F>
inline void dot_q_tokens(const uint8_t* w, int d, int r0, int r1, const float* x, int64_t n_tokens, float* z,
                         int64_t z_stride) {
    std::vector<float> scratch(kPrefillScratch);
    const int64_t stride = row_bytes_q<F>(d);
    for (int64_t g0 = 0; g0 < n_tokens; g0 += kTokenGroup) {
        const int n = int(std::min<int64_t>(kTokenGroup, n_tokens - g0));
        for (int i = r0; i < r1; i += kTileRows) {
            const uint8_t* rows[kTileRows];
            const int n_rows = std::min(kTileRows, r1 - i);
            for (int r = 0; r < n_rows; ++r) rows[r] = w + (i + r) * stride;
            dot_q_tile<F>(rows, n_rows, x + g0 * d, n, d, z + g0 * z_stride + (i - r0), z_stride, scratch.data());
        }
    }
}

// (((q + h[0] * row 0) + h[1] * row 1) + ...) for kRows rows' blocks (32 * blocks columns), per
// column in that order, q and where the sums go as `how` says (down_walk's DownStep):
// down_columns's one-, two- and four-row steps. The rows `ahead` are
// prefetched meanwhile, a line every other block (36 bytes apart, so no line is missed): spread
// over the work instead of in one burst that would wait for the memory before any arithmetic.
template <typename F, int kRows>
inline void add_rows_q(const uint8_t* const* src, const uint8_t* const* ahead, const float* h, int blocks,
                       const DownStep& how) {
    BlockFields<F> fields[kRows];
    float hr[kRows];                 // (copied: the sums' stores could alias h, which would be reloaded)
    for (int r = 0; r < kRows; ++r) hr[r] = h[r];
    for (int b0 = 0; b0 < blocks; b0 += kScaleRun) {
        const int n = std::min(kScaleRun, blocks - b0);
        for (int r = 0; r < kRows; ++r) fields[r].load(src[r], b0, n);
        for (int j = 0; j < n; ++j) {
            if ((j & 1) == 0)
                for (int r = 0; r < kRows; ++r) prefetch_blocks<F, 2>(ahead[r] + int64_t(b0 + j) * F::kBytes);
            const int col = (b0 + j) * kBlock;
            VecF a[kBlockVecs];
            for (int v = 0; v < kBlockVecs; ++v) a[v] = how.start<VecF>(col + v * kVecFloats);
            for (int r = 0; r < kRows; ++r) {
                const uint8_t* block = src[r] + int64_t(b0 + j) * F::kBytes;
                float fj[F::kFields];
                fields[r].of(block, j, fj);
                const BlockLanes prod = scaled_lanes<F>(block, fj, hr[r]);
                for (int v = 0; v < kBlockVecs; ++v) a[v] = a[v] + prod.w[v];
            }
            for (int v = 0; v < kBlockVecs; ++v) how.finish(col + v * kVecFloats, a[v]);   // register by register
        }
    }
    for (int r = 0; r < kRows; ++r) __builtin_prefetch(ahead[r] + int64_t(blocks) * F::kBytes - 1, 0, 1);
}

// out[j0:j1] = the contract's down projection over the listed rows of W_down^T (ascending,
// h3[r] != 0 the value of rows[r]); j0 and j1 multiples of 32. down_columns's walk exactly.
template <typename F>
inline void down_columns_q(const uint8_t* __restrict wt, int d, const int32_t* rows, const float* h3, int n, int j0,
                           int j1, float* __restrict out) {
    const int blocks = (j1 - j0) / kBlock;
    const int64_t stride = row_bytes_q<F>(d), first = int64_t(j0 / kBlock) * F::kBytes;
    down_walk(rows, h3, n, j1 - j0, out + j0, [&](int r) { return wt + int64_t(rows[r]) * stride + first; }, 0,
              [&](const uint8_t* const* src, const uint8_t* const* ahead, const float* h, auto step,
                  const DownStep& how) {
                  add_rows_q<F, decltype(step)::value>(src, ahead, h, blocks, how);
              });
}

// down_columns_q for `n_tokens` tokens at once (prefill): h3 [n_tokens, k], out [n_tokens, d];
// down_columns_tokens's walk exactly. Each row's blocks in [j0, j1) are dequantized once into a
// buffer, then added to each of the tokens whose h3 of that row is nonzero, token by token (one
// token's sums in order: their rows lie m floats apart, often a multiple of 4 KiB, so going
// token after token within a block would make each load wait on the store before it).
template <typename F>
inline void down_columns_tokens_q(const uint8_t* __restrict wt, int d, int k, const float* __restrict h3,
                                  int n_tokens, int j0, int j1, float* __restrict out) {
    const int m = j1 - j0, blocks = m / kBlock;
    const int64_t stride = row_bytes_q<F>(d), first = int64_t(j0 / kBlock) * F::kBytes;
    std::vector<float> row(m);
    down_walk_tokens(k, h3, n_tokens, m, out + j0, d, [&](int i, const int* users, const float* h, int n_users,
                                                          float* q) {
        const uint8_t* src = wt + int64_t(i) * stride + first;
        if (i + 1 < k) prefetch_span(src + stride, size_t(blocks) * F::kBytes);
        float* __restrict w = row.data();
        for (int b = 0; b < blocks; ++b) {
            const BlockLanes lanes = dequantize<F>(src + int64_t(b) * F::kBytes);
            std::memcpy(w + b * kBlock, lanes.w, sizeof lanes.w);
        }
        const int columns = m;                  // (m is captured by reference: a copy stays in a register)
        for (int u = 0; u < n_users; ++u) {
            float* __restrict qu = q + size_t(users[u]) * columns;
            const float hu = h[u];
            for (int j = 0; j < columns; j += kVecFloats) {
                const VecF prod = hu * load_vec<VecF>(w + j);
                const VecF sum = load_vec<VecF>(qu + j) + prod;
                std::memcpy(qu + j, &sum, sizeof sum);
            }
        }
    });
}

}  // namespace sparseinfer
