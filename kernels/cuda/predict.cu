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
