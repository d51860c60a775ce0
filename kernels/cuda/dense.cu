// The strong dense baseline (issue 17): the dense fp16 MLP as two bandwidth-tuned GEMVs,
// the yardstick beside cuBLAS for the sparse pipelines' headline ratio. It is not bound by
// the order contract's down projection and is checked against rigorous_error_bound.
//
// dense_gate_up: warp per neuron; the gate and up rows' chunks are loaded together
//   (warp_dot_pair_batched, DENSE_PAIR_BATCH chunks of each row per lane in flight, x read
//   once for both rows), h1 = act(gate . x), h3 = fl(h1 * (up . x)) for every neuron.
//   Each dot product is in the contract's order, so h1 and h3 are the dense reference's bits.
// dense_rows: out = W . v on W in the Hugging Face layout (W_down [d, k], row stride ld):
//   warp per output row, DENSE_ROW_BATCH chunks per lane in flight (warp_dot_row_batched),
//   no per-chunk partial sums and no second launch (the order-contract down projection
//   over W_down^T needs both).
#include "common.cuh"

#ifndef DENSE_PAIR_BATCH
#define DENSE_PAIR_BATCH 4
#endif
#ifndef DENSE_ROW_BATCH
#define DENSE_ROW_BATCH 8
#endif

template <typename T>
__device__ __forceinline__ void dense_gate_up_impl(const float* __restrict__ x, const T* __restrict__ w_gate,
                                                   const T* __restrict__ w_up, i64 ld, int d, int k, int act_kind,
                                                   float threshold, float* __restrict__ h1, float* __restrict__ h3) {
    const i64 row = global_warp_id();
    if (row >= k) return;
    const int lane = lane_id();
    float z_gate, z_up;
    warp_dot_pair_batched<T, DENSE_PAIR_BATCH>(w_gate + row * ld, w_up + row * ld, x, d, lane, z_gate, z_up);
    if (lane == 0) {
        const float a = activate(z_gate, act_kind, threshold);
        h1[row] = a;
        h3[row] = __fmul_rn(a, z_up);
    }
}

template <typename T>
__device__ __forceinline__ void dense_rows_impl(const T* __restrict__ w, i64 ld, const float* __restrict__ v, int rows,
                                                int cols, float* __restrict__ out) {
    const i64 row = global_warp_id();
    if (row >= rows) return;
    const float z = warp_dot_row_batched<T, DENSE_ROW_BATCH>(w + row * ld, v, cols, lane_id());
    if (lane_id() == 0) out[row] = z;
}

#define DENSE(NAME, T)                                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                                       \
    dense_gate_up_##NAME(const float* x, const T* w_gate, const T* w_up, i64 ld, int d, int k, int act_kind, \
                         float threshold, float* h1, float* h3) {                                           \
        dense_gate_up_impl<T>(x, w_gate, w_up, ld, d, k, act_kind, threshold, h1, h3);                      \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256)                                                       \
    dense_rows_##NAME(const T* w, i64 ld, const float* v, int rows, int cols, float* out) {                 \
        dense_rows_impl<T>(w, ld, v, rows, cols, out);                                                      \
    }
DENSE(fp32, float)
DENSE(fp16, half_bits)
DENSE(bf16, bf16_bits)
