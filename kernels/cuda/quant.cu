// Block-quantized weights (GGUF's Q8_0, Q4_0 and Q4_1; reference/block_quant.py): W_gate's
// sign words, sparse and dense gate + up, and the chunked down projection, one kernel of each
// per format (QUANT_KERNELS at the end).
//
// Every weight is dequantized to float32 exactly as the reference does: D and M, the block's
// fp16 scale and min, widened exactly; q8_0 fl(D * q), q4_0 fl(D * (q - 8)) (both exact),
// q4_1 fl(fl(D * q) + M). The sums keep reference/order_contract.py's order for blocks
// ("Block-quantized weights"): row dot products with V = 1, lane l of a warp owning element
// 32 t + l (its weight of block t) and adding fl(w * x) in order t = 0, 1, ..., then the
// butterfly; the down projection in the contract's chunks and sub-chunks, per column. d is a
// multiple of 32 (whole blocks). Rows are runs of blocks, row stride ld in bytes; a block is
// 2-byte aligned (34, 18 and 20 bytes), so its fields are read with 1- and 2-byte loads.
#include "common.cuh"
#include "down_rows.cuh"

typedef unsigned char u8;

// One format: BYTES per block, codes from byte HEADER on (after d, and m for q4_1); NIBBLES:
// byte j holds code j (low nibble) and code j + 16 (high); a code's value is q - ZERO.
template <int BYTES_, int HEADER_, bool NIBBLES_, int ZERO_, bool HAS_MIN_>
struct BlockFormat {
    enum { BYTES = BYTES_, HEADER = HEADER_, ZERO = ZERO_ };
    static constexpr bool NIBBLES = NIBBLES_, HAS_MIN = HAS_MIN_;
    // the byte of element e (0..31) of a block, from the block's start
    static __device__ __forceinline__ int byte_of(int e) { return HEADER + (NIBBLES ? (e & 15) : e); }
    // element e's code value as float32 (exact: at most 8 bits), from its byte
    static __device__ __forceinline__ float code(u32 byte, int e) {
        if (NIBBLES) return (float)((int)(e < 16 ? (byte & 15u) : (byte >> 4)) - ZERO);
        return (float)(int)(signed char)byte;
    }
    // the dequantized weight: fl(D * code), then + M for q4_1
    static __device__ __forceinline__ float value(u32 d_bits, u32 m_bits, u32 byte, int e) {
        const float v = __fmul_rn(fp16_bits_to_float(d_bits), code(byte, e));
        return HAS_MIN ? __fadd_rn(v, fp16_bits_to_float(m_bits)) : v;
    }
};
typedef BlockFormat<34, 2, false, 0, false> Q8_0;
typedef BlockFormat<18, 2, true, 8, false> Q4_0;
typedef BlockFormat<20, 4, true, 0, true> Q4_1;

// What a lane loads for its weight of one block: the scale's and min's bits and its code byte.
struct LaneWeight { u16 d, m; u8 q; };

template <typename F>
__device__ __forceinline__ LaneWeight load_lane_weight(const u8* __restrict__ block, int lane) {
    LaneWeight w;
    w.d = __ldg(reinterpret_cast<const u16*>(block));
    w.m = F::HAS_MIN ? __ldg(reinterpret_cast<const u16*>(block) + 1) : (u16)0;
    w.q = __ldg(block + F::byte_of(lane));
    return w;
}

template <typename F>
__device__ __forceinline__ float lane_value(LaneWeight w, int lane) {
    return F::value(w.d, w.m, w.q, lane);
}

// z = row . x in the contract's order for blocks, on all 32 lanes of a warp (all get z). Each
// lane loads its weight and x of up to U blocks before adding any (U x 3 loads in flight).
template <typename F, int U>
__device__ __forceinline__ float quant_row_dot(const u8* __restrict__ row, const float* __restrict__ x, int n_blocks,
                                               int lane) {
    float acc = 0.0f;
    for (int t0 = 0; t0 < n_blocks; t0 += U) {          // uniform per warp
        LaneWeight w[U];
        float xv[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (t0 + u < n_blocks) {
                w[u] = load_lane_weight<F>(row + (i64)(t0 + u) * F::BYTES, lane);
                xv[u] = __ldg(x + (t0 + u) * WARP_SIZE + lane);
            }
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (t0 + u < n_blocks) acc = __fadd_rn(acc, __fmul_rn(lane_value<F>(w[u], lane), xv[u]));
    }
    return warp_sum_butterfly(acc);
}

// Two rows' dot products with the same x (a neuron's gate and up rows): U blocks of BOTH rows
// loaded before any is added; each sum in the contract's order, as quant_row_dot's.
template <typename F, int U>
__device__ __forceinline__ void quant_pair_dot(const u8* __restrict__ row_a, const u8* __restrict__ row_b,
                                               const float* __restrict__ x, int n_blocks, int lane, float& z_a,
                                               float& z_b) {
    float acc_a = 0.0f, acc_b = 0.0f;
    for (int t0 = 0; t0 < n_blocks; t0 += U) {
        LaneWeight wa[U], wb[U];
        float xv[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (t0 + u < n_blocks) {
                wa[u] = load_lane_weight<F>(row_a + (i64)(t0 + u) * F::BYTES, lane);
                wb[u] = load_lane_weight<F>(row_b + (i64)(t0 + u) * F::BYTES, lane);
                xv[u] = __ldg(x + (t0 + u) * WARP_SIZE + lane);
            }
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (t0 + u < n_blocks) {
                acc_a = __fadd_rn(acc_a, __fmul_rn(lane_value<F>(wa[u], lane), xv[u]));
                acc_b = __fadd_rn(acc_b, __fmul_rn(lane_value<F>(wb[u], lane), xv[u]));
            }
    }
    z_a = warp_sum_butterfly(acc_a);
    z_b = warp_sum_butterfly(acc_b);
}

#define QUANT_BATCH 8         // blocks of a row a lane loads before adding them (mask kernel)
#define QUANT_PAIR_BATCH 6    // blocks of the gate and of the up row (paired kernel)

// --- sign words (load time) --------------------------------------------------------------

// Words [n, d/32] of the dequantized rows' signs, as pack_signs.cu's: one warp per block (= one
// word), lane l dequantizes element l; bit l is 1 iff the value is < 0 (-0.0 packs as 0).
template <typename F>
__device__ __forceinline__ void quant_pack_signs_impl(const u8* __restrict__ blocks, u32* __restrict__ words, int n,
                                                      int d, i64 ld) {
    const int n_words = d / WARP_SIZE;
    const i64 warp = global_warp_id();
    if (warp >= (i64)n * n_words) return;            // uniform per warp
    const int lane = lane_id();
    const i64 row = warp / n_words;
    const int w = (int)(warp % n_words);
    const float v = lane_value<F>(load_lane_weight<F>(blocks + row * ld + (i64)w * F::BYTES, lane), lane);
    const u32 bits = __ballot_sync(FULL_MASK, v < 0.0f);
    if (lane == 0) words[row * n_words + w] = bits;
}

// --- gate + up ---------------------------------------------------------------------------

// Masked (as gate_up.cu's v1): warp per row over all k rows; zero[i] != 0 writes h1 = h3 = +0
// without reading the row; h1 == 0 skips the up row (+AS). zero == null: dense, every gate
// and up row, h3 = fl(h1 * h2) always.
template <typename F>
__device__ __forceinline__ void quant_gate_up_mask_impl(const float* x, const u8* w_gate, const u8* w_up, i64 ld,
                                                        int d, int k, const unsigned char* __restrict__ zero,
                                                        int act_kind, float threshold, float* __restrict__ h1,
                                                        float* __restrict__ h3) {
    const i64 row = global_warp_id();
    if (row >= k) return;
    const int lane = lane_id();
    if (masked_row_zeroed(zero, row, h1, h3, lane)) return;
    const int n_blocks = d / WARP_SIZE;
    const float a = activate(quant_row_dot<F, QUANT_BATCH>(w_gate + row * ld, x, n_blocks, lane), act_kind, threshold);
    float h = 0.0f;
    if (zero == nullptr || a != 0.0f)                // a is the same on every lane: uniform branch
        h = __fmul_rn(a, quant_row_dot<F, QUANT_BATCH>(w_up + row * ld, x, n_blocks, lane));
    if (lane == 0) { h1[row] = a; h3[row] = h; }
}

// Paired (as gate_up.cu's v6): warp per row predicts it (eq. 2 on the sign words), then reads
// its gate and up rows together; h3 = fl(h1 * h2) where h1 != 0, else +0 (+AS in the result;
// the up row of every predicted-active row is read).
template <typename F>
__device__ __forceinline__ void quant_gate_up_paired_impl(const float* x, const u32* __restrict__ x_signs,
                                                          const u32* __restrict__ w_signs, i64 sign_ld,
                                                          const u8* w_gate, const u8* w_up, i64 ld, int d, int k,
                                                          int alpha_milli, int act_kind, float threshold,
                                                          int* __restrict__ counts, unsigned char* __restrict__ zero,
                                                          float* __restrict__ h1, float* __restrict__ h3) {
    const i64 row = global_warp_id();
    if (row >= k) return;
    const int lane = lane_id();
    if (!predict_row_kept(row, x_signs, w_signs, sign_ld, d, alpha_milli, counts, zero, h1, h3, lane)) return;
    float z_gate, z_up;
    quant_pair_dot<F, QUANT_PAIR_BATCH>(w_gate + row * ld, w_up + row * ld, x, d / WARP_SIZE, lane, z_gate, z_up);
    store_paired_row(row, z_gate, z_up, act_kind, threshold, h1, h3, lane);
}

// --- down projection ---------------------------------------------------------------------

// A thread owns QUANT_DOWN_COLS columns of one block of every row, the block's part p (0..3):
// q8_0 columns 8p .. 8p+7 (code bytes 8p ..), q4_x columns 4p .. 4p+3 and 16+4p .. 16+4p+3
// (code bytes 4p .. 4p+3, low nibbles then high). What it loads of a row: the scale's and
// min's bits and its code bytes, 2 bytes a load (as u16 pairs, little endian).
#define QUANT_DOWN_COLS 8
#define QUANT_DOWN_BATCH 4    // rows a thread loads before adding them
struct RowSlice { u16 d, m; u16 codes[QUANT_DOWN_COLS / 2]; };

template <typename F>
__device__ __forceinline__ int slice_column(int p, int v) {      // column within the block of the part's v-th
    return F::NIBBLES ? 4 * p + (v & 3) + 16 * (v >> 2) : 8 * p + v;
}

template <typename F>
__device__ __forceinline__ RowSlice load_slice(const u8* __restrict__ block, int p) {
    const int CODE_BYTES = F::NIBBLES ? QUANT_DOWN_COLS / 2 : QUANT_DOWN_COLS;
    RowSlice s;
    const u16* h = reinterpret_cast<const u16*>(block);
    s.d = __ldg(h);
    s.m = F::HAS_MIN ? __ldg(h + 1) : (u16)0;
    const u16* c = reinterpret_cast<const u16*>(block + F::HEADER + CODE_BYTES * p);
#pragma unroll
    for (int i = 0; i < CODE_BYTES / 2; ++i) s.codes[i] = __ldg(c + i);
    return s;
}

template <typename F>
__device__ __forceinline__ float slice_value(const RowSlice& s, int p, int v) {
    const int b = F::NIBBLES ? (v & 3) : v;                        // its byte among the slice's
    const u32 byte = ((u32)s.codes[b >> 1] >> (8 * (b & 1))) & 0xffu;
    return F::value(s.d, s.m, byte, slice_column<F>(p, v));
}

// Add rows rows_s[begin .. end) (weights h_s) in ascending order to the part's columns: up to
// QUANT_DOWN_BATCH rows' slices loaded before any is added.
template <typename F>
__device__ __forceinline__ void quant_down_add_rows(const u8* __restrict__ wt, i64 ld, const int* rows_s,
                                                    const float* h_s, int begin, int end, int blk, int p,
                                                    float* acc) {
    for (int n = begin; n < end; n += QUANT_DOWN_BATCH) {
        RowSlice s[QUANT_DOWN_BATCH];
#pragma unroll
        for (int u = 0; u < QUANT_DOWN_BATCH; ++u)
            if (n + u < end) s[u] = load_slice<F>(wt + (i64)rows_s[n + u] * ld + (i64)blk * F::BYTES, p);
#pragma unroll
        for (int u = 0; u < QUANT_DOWN_BATCH; ++u) {
            if (n + u >= end) break;
            const float h = h_s[n + u];
#pragma unroll
            for (int v = 0; v < QUANT_DOWN_COLS; ++v) acc[v] = __fadd_rn(acc[v], __fmul_rn(h, slice_value<F>(s[u], p, v)));
        }
    }
}

// down.cu's v1 on block rows: block (column tile, chunk c of DOWN_ROW_CHUNK rows), DOWN_SUB_CHUNKS
// groups of DOWN_THREADS threads, each thread one part of a block (QUANT_DOWN_COLS columns). The
// block lists the chunk's rows with h3 != 0 in ascending order (dense: every row); group s adds
// sub-chunk s's rows from +0.0; group 0 adds the other groups' sums in order into partial[c, j];
// down_reduce_chunks (down.cu) adds the chunks.
template <typename F>
__device__ __forceinline__ void quant_down_chunks_impl(const float* __restrict__ h3, const u8* __restrict__ wt, i64 ld,
                                                       int k, int d, int dense, float* __restrict__ partial) {
    const int GROUPS = DOWN_ROW_CHUNK / WARP_SIZE;
    const int GROUPS_PER_SUB = GROUPS / DOWN_SUB_CHUNKS;
    const int PARTS = WARP_SIZE / QUANT_DOWN_COLS;                   // parts of a block
    __shared__ int rows_s[DOWN_ROW_CHUNK];
    __shared__ float h_s[DOWN_ROW_CHUNK];
    __shared__ int group_count[GROUPS];
    __shared__ float sub_s[DOWN_SUB_CHUNKS - 1][DOWN_THREADS][QUANT_DOWN_COLS];
    const int chunk = blockIdx.y;

    list_nonzero_rows<GROUPS>(h3, chunk * DOWN_ROW_CHUNK, k, dense, rows_s, h_s, group_count);

    const int sub = threadIdx.x / DOWN_THREADS;
    const int ct = threadIdx.x % DOWN_THREADS;
    int begin, end;
    sub_chunk_slice<GROUPS_PER_SUB>(group_count, sub, begin, end);
    const int slot = blockIdx.x * DOWN_THREADS + ct;
    const int blk = slot / PARTS, p = slot % PARTS;
    const bool has_cols = blk < d / WARP_SIZE;      // no early return: a barrier follows
    float acc[QUANT_DOWN_COLS];
#pragma unroll
    for (int v = 0; v < QUANT_DOWN_COLS; ++v) acc[v] = 0.0f;
    if (has_cols) {
        quant_down_add_rows<F>(wt, ld, rows_s, h_s, begin, end, blk, p, acc);
        if (sub > 0) {
#pragma unroll
            for (int v = 0; v < QUANT_DOWN_COLS; ++v) sub_s[sub - 1][ct][v] = acc[v];
        }
    }
    __syncthreads();
    if (sub != 0 || !has_cols) return;
    add_sub_chunk_sums<DOWN_THREADS, QUANT_DOWN_COLS>(sub_s, ct, acc);
    float* out = partial + (i64)chunk * d + blk * WARP_SIZE;
#pragma unroll
    for (int v = 0; v < QUANT_DOWN_COLS; ++v) out[slice_column<F>(p, v)] = acc[v];
}

// Per format: pack_signs_quant_, gate_up_quant_mask_ (null mask: dense), gate_up_quant_paired_,
// down_quant_chunks_ (reads every row with dense != 0).
#define QUANT_KERNELS(NAME, F)                                                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                                          \
    pack_signs_quant_##NAME(const u8* blocks, u32* words, int n, int d, i64 ld) {                              \
        quant_pack_signs_impl<F>(blocks, words, n, d, ld);                                                     \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                                          \
    gate_up_quant_mask_##NAME(const float* x, const u8* w_gate, const u8* w_up, i64 ld, int d, int k,          \
                              const unsigned char* zero, int act_kind, float threshold, float* h1, float* h3) { \
        quant_gate_up_mask_impl<F>(x, w_gate, w_up, ld, d, k, zero, act_kind, threshold, h1, h3);              \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(GATE_UP_BATCHED_THREADS)                                      \
    gate_up_quant_paired_##NAME(const float* x, const u32* x_signs, const u32* w_signs, i64 sign_ld,           \
                                const u8* w_gate, const u8* w_up, i64 ld, int d, int k, int alpha_milli,       \
                                int act_kind, float threshold, int* counts, unsigned char* zero, float* h1,    \
                                float* h3) {                                                                   \
        quant_gate_up_paired_impl<F>(x, x_signs, w_signs, sign_ld, w_gate, w_up, ld, d, k, alpha_milli,        \
                                     act_kind, threshold, counts, zero, h1, h3);                               \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(DOWN_THREADS * DOWN_SUB_CHUNKS)                               \
    down_quant_chunks_##NAME(const float* h3, const u8* wt, i64 ld, int k, int d, int dense, float* partial) { \
        quant_down_chunks_impl<F>(h3, wt, ld, k, d, dense, partial);                                           \
    }
QUANT_KERNELS(q8_0, Q8_0)
QUANT_KERNELS(q4_0, Q4_0)
QUANT_KERNELS(q4_1, Q4_1)
