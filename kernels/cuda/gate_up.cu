// Sparse gate + up (steps 1-3 fused): h1 = act(W_gate[i] . x), h3 = h1 * (W_up[i] . x).
// Warp per row. A row predicted zero writes 0 without reading its weights; a row whose
// h1 is exactly zero skips its up row and writes h3 = +0 (+AS). The dense kernel of the
// same structure computes every row and every up row (h3 = fl(h1 * h2) always).
#include "common.cuh"

// One row's dot product: warp_dot_row, or with BATCH > 0 warp_dot_row_batched<T, BATCH>.
template <typename T, int BATCH>
__device__ __forceinline__ float row_dot(const T* __restrict__ row, const float* __restrict__ x, int d, int lane) {
    if constexpr (BATCH > 0) return warp_dot_row_batched<T, BATCH>(row, x, d, lane);
    else return warp_dot_row(row, x, d, lane);
}

template <typename T, int BATCH = 0>
__device__ __forceinline__ void gate_up_row(i64 row, const float* __restrict__ x, const T* __restrict__ w_gate,
                                            const T* __restrict__ w_up, i64 ld, int d, bool skip_zero_gate,
                                            int act_kind, float threshold, float* __restrict__ h1_out,
                                            float* __restrict__ h3_out, int lane) {
    const float z = row_dot<T, BATCH>(w_gate + row * ld, x, d, lane);
    const float h1 = activate(z, act_kind, threshold);
    float h3 = 0.0f;
    if (!skip_zero_gate || h1 != 0.0f) {      // h1 is the same on every lane: uniform branch
        const float h2 = row_dot<T, BATCH>(w_up + row * ld, x, d, lane);
        h3 = __fmul_rn(h1, h2);
    }
    if (lane == 0) {
        h1_out[row] = h1;
        h3_out[row] = h3;
    }
}

// v1: warp per row over all k rows, reading the predicted-zero mask (null = dense).
template <typename T>
__device__ __forceinline__ void gate_up_mask_impl(const float* x, const T* w_gate, const T* w_up, i64 ld, int d, int k,
                                                  const unsigned char* __restrict__ zero, int act_kind, float threshold,
                                                  float* h1, float* h3) {
    const i64 row = global_warp_id();
    if (row >= k) return;
    const int lane = lane_id();
    if (masked_row_zeroed(zero, row, h1, h3, lane)) return;
    gate_up_row(row, x, w_gate, w_up, ld, d, zero != nullptr, act_kind, threshold, h1, h3, lane);
}

// v2: warps only over the compacted list of active rows (*n_active of them, read on the
// device); the caller zeroes h1 and h3 first.
template <typename T>
__device__ __forceinline__ void gate_up_list_impl(const float* x, const T* w_gate, const T* w_up, i64 ld, int d,
                                                  const int* __restrict__ active, const int* __restrict__ n_active,
                                                  int act_kind, float threshold, float* h1, float* h3) {
    const i64 w = global_warp_id();
    if (w >= *n_active) return;
    gate_up_row((i64)active[w], x, w_gate, w_up, ld, d, true, act_kind, threshold, h1, h3, lane_id());
}

// Predict one row (common.cuh: predict_row_kept), then gate + up unless it is predicted zero.
template <typename T, int BATCH>
__device__ __forceinline__ void predict_gate_up_row(i64 row, const float* x, const u32* __restrict__ x_signs,
                                                    const u32* __restrict__ w_signs, i64 sign_ld, const T* w_gate,
                                                    const T* w_up, i64 ld, int d, int alpha_milli, int act_kind,
                                                    float threshold, int* __restrict__ counts,
                                                    unsigned char* __restrict__ zero, float* h1, float* h3, int lane) {
    if (predict_row_kept(row, x_signs, w_signs, sign_ld, d, alpha_milli, counts, zero, h1, h3, lane))
        gate_up_row<T, BATCH>(row, x, w_gate, w_up, ld, d, true, act_kind, threshold, h1, h3, lane);
}

// v3 (BATCH 0) and v5 (BATCH GATE_UP_BATCH, below): predict + gate + up in one launch (x's
// sign words packed beforehand), every row its own warp.
template <typename T, int BATCH>
__device__ __forceinline__ void gate_up_row_per_warp(const float* x, const u32* __restrict__ x_signs,
                                                     const u32* __restrict__ w_signs, i64 sign_ld, const T* w_gate,
                                                     const T* w_up, i64 ld, int d, int k, int alpha_milli, int act_kind,
                                                     float threshold, int* __restrict__ counts,
                                                     unsigned char* __restrict__ zero, float* h1, float* h3) {
    const i64 row = global_warp_id();
    if (row >= k) return;
    predict_gate_up_row<T, BATCH>(row, x, x_signs, w_signs, sign_ld, w_gate, w_up, ld, d, alpha_milli, act_kind,
                                  threshold, counts, zero, h1, h3, lane_id());
}

// v4: v3 on a grid that fits on the device at once, each warp striding over the rows
// (row = warp, warp + all warps, ...). A warp whose row is predicted zero moves on at once
// instead of holding its block's slot, so every active row is in flight together; each
// lane loads GATE_UP_BATCH chunks of weights before adding them (warp_dot_row_batched).
#define GATE_UP_BATCH 8
template <typename T>
__device__ __forceinline__ void gate_up_persistent_impl(const float* x, const u32* __restrict__ x_signs,
                                                        const u32* __restrict__ w_signs, i64 sign_ld,
                                                        const T* w_gate, const T* w_up, i64 ld, int d, int k,
                                                        int alpha_milli, int act_kind, float threshold,
                                                        int* __restrict__ counts, unsigned char* __restrict__ zero,
                                                        float* h1, float* h3) {
    const i64 stride = (i64)gridDim.x * (blockDim.x / WARP_SIZE);
    const int lane = lane_id();
    for (i64 row = global_warp_id(); row < k; row += stride)        // uniform per warp
        predict_gate_up_row<T, GATE_UP_BATCH>(row, x, x_signs, w_signs, sign_ld, w_gate, w_up, ld, d, alpha_milli,
                                              act_kind, threshold, counts, zero, h1, h3, lane);
}

// v5: v3 (warp per row, every row its own warp) with the weight loads of v4: each lane
// loads GATE_UP_BATCH chunks of a row before adding them, so an active row of the 13B shape
// (20 chunks per lane) takes 3 round trips to memory for its gate row instead of 5. Blocks
// of GATE_UP_BATCHED_THREADS (2 warps), so that the few active rows, not the blocks that
// hold them, decide how many are in flight: gate_up_row_per_warp<T, GATE_UP_BATCH>.

// v6: v5 (warp per row, 2-warp blocks) with the gate and up rows of an active neuron read
// together: each lane loads GATE_UP_PAIR_BATCH chunks of the gate row AND of the up row
// before adding any (warp_dot_pair_batched), so the up row no longer waits for the gate
// row's last round trip (13B fp16, 20 chunks per lane: 4 round trips for both rows instead
// of v5's 3 + 3; 6 chunks per row, 72 registers on sm_90, where 8 took 101). Both
// sums keep the contract's order; h3 = fl(h1 * h2) where h1 != 0, else +0 (+AS: the up
// row's sum is dropped, so the bits are v5's, but its bytes were read for every row
// predicted active, not only for those whose h1 != 0).
#ifndef GATE_UP_PAIR_BATCH
#define GATE_UP_PAIR_BATCH 6
#endif
template <typename T>
__device__ __forceinline__ void gate_up_paired_impl(const float* x, const u32* __restrict__ x_signs,
                                                    const u32* __restrict__ w_signs, i64 sign_ld, const T* w_gate,
                                                    const T* w_up, i64 ld, int d, int k, int alpha_milli, int act_kind,
                                                    float threshold, int* __restrict__ counts,
                                                    unsigned char* __restrict__ zero, float* h1, float* h3) {
    const i64 row = global_warp_id();
    if (row >= k) return;
    const int lane = lane_id();
    if (!predict_row_kept(row, x_signs, w_signs, sign_ld, d, alpha_milli, counts, zero, h1, h3, lane)) return;
    float z_gate, z_up;
    warp_dot_pair_batched<T, GATE_UP_PAIR_BATCH>(w_gate + row * ld, w_up + row * ld, x, d, lane, z_gate, z_up);
    store_paired_row(row, z_gate, z_up, act_kind, threshold, h1, h3, lane);
}

// The kernels that predict as they go (v3 fused, v4 persistent, v5 batched, v6 paired) share one
// signature; IMPL is the device function each calls with its arguments.
// BOUNDS: v4 asks for 2 blocks per SM (up to 128 registers): left to its own heuristics,
// ptxas gives it 64 on sm_87 and spills.
#define GATE_UP_PREDICTING(KIND, NAME, T, BOUNDS, IMPL)                                                    \
    extern "C" __global__ void BOUNDS                                                                      \
    gate_up_##KIND##_##NAME(const float* x, const u32* x_signs, const u32* w_signs, i64 sign_ld,           \
                            const T* w_gate, const T* w_up, i64 ld, int d, int k, int alpha_milli,         \
                            int act_kind, float threshold, int* counts, unsigned char* zero, float* h1,    \
                            float* h3) {                                                                   \
        IMPL(x, x_signs, w_signs, sign_ld, w_gate, w_up, ld, d, k, alpha_milli, act_kind, threshold,       \
             counts, zero, h1, h3);                                                                        \
    }

#define GATE_UP(NAME, T)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256)                                                      \
    gate_up_mask_##NAME(const float* x, const T* w_gate, const T* w_up, i64 ld, int d, int k,              \
                        const unsigned char* zero, int act_kind, float threshold, float* h1, float* h3) {  \
        gate_up_mask_impl<T>(x, w_gate, w_up, ld, d, k, zero, act_kind, threshold, h1, h3);                \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                                      \
    gate_up_list_##NAME(const float* x, const T* w_gate, const T* w_up, i64 ld, int d, const int* active,  \
                        const int* n_active, int act_kind, float threshold, float* h1, float* h3) {        \
        gate_up_list_impl<T>(x, w_gate, w_up, ld, d, active, n_active, act_kind, threshold, h1, h3);       \
    }                                                                                                      \
    GATE_UP_PREDICTING(fused, NAME, T, __launch_bounds__(256), (gate_up_row_per_warp<T, 0>))               \
    GATE_UP_PREDICTING(persistent, NAME, T, __launch_bounds__(256, 2), gate_up_persistent_impl<T>)         \
    GATE_UP_PREDICTING(batched, NAME, T, __launch_bounds__(GATE_UP_BATCHED_THREADS),                      \
                       (gate_up_row_per_warp<T, GATE_UP_BATCH>))                                           \
    GATE_UP_PREDICTING(paired, NAME, T, __launch_bounds__(GATE_UP_BATCHED_THREADS), gate_up_paired_impl<T>)
GATE_UP(fp32, float)
GATE_UP(fp16, half_bits)
GATE_UP(bf16, bf16_bits)
