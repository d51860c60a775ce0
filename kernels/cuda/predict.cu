// The predictor (paper eq. 2): N_neg = popcount(w_signs[i] XOR x_signs) over the d real
// elements; row i is predicted zero when 1000 * N_neg > alpha_milli * (d - N_neg).
#include "common.cuh"

// One warp per row: counts[i] = N_neg, zero[i] = 1 where predicted zero. VEC: 16-byte
// loads of the sign words (predict_rows_vec), else one word per lane per step (predict_rows).
// sign_ld: words per row of w_signs (>= ceil(d/32); words past ceil(d/32) are not read).
template <bool VEC>
__device__ __forceinline__ void predict_rows_impl(const u32* __restrict__ w_signs, i64 sign_ld,
                                                  const u32* __restrict__ x_signs, int k, int d, int alpha_milli,
                                                  int* __restrict__ counts, unsigned char* __restrict__ zero) {
    const i64 row = global_warp_id();
    if (row >= k) return;
    const int lane = lane_id();
    const int n_neg = row_negative_count<VEC>(w_signs + row * sign_ld, x_signs, d, lane);
    if (lane == 0) {
        counts[row] = n_neg;
        zero[row] = predicted_zero(n_neg, d, alpha_milli) ? 1 : 0;
    }
}

extern "C" __global__ void __launch_bounds__(256)
predict_rows(const u32* __restrict__ w_signs, i64 sign_ld, const u32* __restrict__ x_signs, int k, int d,
             int alpha_milli, int* __restrict__ counts, unsigned char* __restrict__ zero) {
    predict_rows_impl<false>(w_signs, sign_ld, x_signs, k, d, alpha_milli, counts, zero);
}

extern "C" __global__ void __launch_bounds__(256)
predict_rows_vec(const u32* __restrict__ w_signs, i64 sign_ld, const u32* __restrict__ x_signs, int k, int d,
                 int alpha_milli, int* __restrict__ counts, unsigned char* __restrict__ zero) {
    predict_rows_impl<true>(w_signs, sign_ld, x_signs, k, d, alpha_milli, counts, zero);
}

// v4: PREDICT_ROWS_PER_WARP rows per warp, each on WARP_SIZE / PREDICT_ROWS_PER_WARP
// consecutive lanes (a "sub-warp"); a lane loads all of its 16-byte quads of sign words (of
// the row and of x, up to PREDICT_QUADS each) before it counts any, so a 13B row (40 quads,
// 5 per lane) costs one round trip to memory and a warp has 4 rows' words in flight. Rows
// that are not 16-byte aligned and the words past the last whole quad go word by word. The
// count is an integer sum, the same in any order; the sub-warp's sum is a butterfly over
// its lanes only (offsets below its width), every lane of the warp taking part.
#ifndef PREDICT_ROWS_PER_WARP
#define PREDICT_ROWS_PER_WARP 4
#endif
#define PREDICT_QUADS 5
extern "C" __global__ void __launch_bounds__(256)
predict_rows_multi(const u32* __restrict__ w_signs, i64 sign_ld, const u32* __restrict__ x_signs, int k, int d,
                   int alpha_milli, int* __restrict__ counts, unsigned char* __restrict__ zero) {
    const int SUB = WARP_SIZE / PREDICT_ROWS_PER_WARP;
    const int lane = lane_id();
    const int sl = lane % SUB;                       // lane within the sub-warp
    const i64 row = global_warp_id() * PREDICT_ROWS_PER_WARP + lane / SUB;
    if (global_warp_id() * PREDICT_ROWS_PER_WARP >= k) return;    // uniform per warp
    const bool valid = row < k;
    const u32* w_row = w_signs + (valid ? row : 0) * sign_ld;
    const int n_words = (d + WARP_SIZE - 1) / WARP_SIZE;
    const u32 tail = (d % WARP_SIZE) ? ((1u << (d % WARP_SIZE)) - 1u) : FULL_MASK;
    int count = 0;
    int w0 = 0;
    if (valid && aligned16(w_row) && aligned16(x_signs)) {
        const int n_quads = (d / WARP_SIZE) / 4;
        const uint4* wq = reinterpret_cast<const uint4*>(w_row);
        const uint4* xq = reinterpret_cast<const uint4*>(x_signs);
        for (int q0 = sl; q0 < n_quads; q0 += PREDICT_QUADS * SUB) {
            uint4 a[PREDICT_QUADS], b[PREDICT_QUADS];
#pragma unroll
            for (int u = 0; u < PREDICT_QUADS; ++u)
                if (q0 + u * SUB < n_quads) { a[u] = __ldg(wq + q0 + u * SUB); b[u] = __ldg(xq + q0 + u * SUB); }
#pragma unroll
            for (int u = 0; u < PREDICT_QUADS; ++u)
                if (q0 + u * SUB < n_quads)
                    count += __popc(a[u].x ^ b[u].x) + __popc(a[u].y ^ b[u].y) + __popc(a[u].z ^ b[u].z) +
                             __popc(a[u].w ^ b[u].w);
        }
        w0 = 4 * n_quads;
    }
    if (valid) {
        for (int w = w0 + sl; w < n_words; w += SUB) {
            u32 bits = __ldg(w_row + w) ^ __ldg(x_signs + w);
            if (w == n_words - 1) bits &= tail;
            count += __popc(bits);
        }
    }
#pragma unroll
    for (int offset = SUB / 2; offset >= 1; offset >>= 1) count += __shfl_xor_sync(FULL_MASK, count, offset);
    if (valid && sl == 0) {
        counts[row] = count;
        zero[row] = predicted_zero(count, d, alpha_milli) ? 1 : 0;
    }
}

// One block: the ascending list of rows with zero[i] == 0, and its length. Each pass
// takes blockDim.x rows; ballots and a per-warp prefix keep the list in row order.
extern "C" __global__ void __launch_bounds__(1024)
compact_active(const unsigned char* __restrict__ zero, int k, int* __restrict__ active, int* __restrict__ n_active) {
    __shared__ int warp_counts[32];
    const int lane = lane_id();
    const int warp = threadIdx.x / WARP_SIZE;
    const int n_warps = blockDim.x / WARP_SIZE;
    int base = 0;
    for (int start = 0; start < k; start += blockDim.x) {
        const int i = start + threadIdx.x;
        const bool keep = i < k && zero[i] == 0;
        const u32 bits = __ballot_sync(FULL_MASK, keep);
        if (lane == 0) warp_counts[warp] = __popc(bits);
        __syncthreads();
        int offset = base, total = 0;
        for (int w = 0; w < n_warps; ++w) {
            if (w < warp) offset += warp_counts[w];
            total += warp_counts[w];
        }
        if (keep) active[offset + __popc(bits & ((1u << lane) - 1u))] = i;
        __syncthreads();
        base += total;
    }
    if (threadIdx.x == 0) *n_active = base;
}
