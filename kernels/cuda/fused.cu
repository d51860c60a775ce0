// The whole sparse MLP in one persistent launch: predict, gate, up and down of each neuron.
//
// A block takes one part at a time: sub-chunk s of chunk c of the order contract's down
// projection (PART_ROWS = DOWN_ROW_CHUNK / DOWN_SUB_CHUNKS consecutive neurons, part
// c * DOWN_SUB_CHUNKS + s); a grid of the blocks resident at once strides over the parts.
//  1. warp per neuron of the part: eq. 2 on the sign words; a neuron predicted active reads
//     its gate and up rows together (warp_dot_pair_batched), h1 = act(gate . x),
//     h3 = fl(h1 * (up . x)) where h1 != 0, else +0 (+AS); counts, mask, h1 and h3 written.
//  2. the part's rows with h3 != 0, ascending (list_nonzero_rows), and for every column j
//     q[part, j] = their products h3[i] * Wt[i, j] added from +0.0 in that order: the
//     contract's sub-chunk sum. Each neuron's W_down^T row is read right after its gate and
//     up rows: with the neuron-major layout (layout.py) the three are one contiguous record.
//  3. the last part of chunk c to finish (threadfence + counter) adds the chunk's q in
//     sub-chunk order into partial[c, j]; the last chunk to finish adds the partials in chunk
//     order into out[j]: down_reduce_chunks' sums, bit for bit. Each counter is reset by the
//     block that completes it, so one zeroed buffer serves every launch on one stream.
// Weights come as three row pointers with one row stride: the row-major matrices, or the
// three rows of the neuron-major records (stride 3 x the padded row).
#include "common.cuh"
#include "down_rows.cuh"

#define PART_ROWS (DOWN_ROW_CHUNK / DOWN_SUB_CHUNKS)
#ifndef FUSED_PAIR_BATCH
#define FUSED_PAIR_BATCH 5          // gate and up chunks per lane in flight (13B fp16: 20 = 4 round trips, as v6's 6)
#endif
#define FUSED_DOWN_BATCH 4          // W_down^T rows per thread in flight

#define FUSED_SUM_BATCH 8           // rows of partials per thread in flight in the in-order sums

// out[j] = (((+0.0 + p[0, j]) + p[1, j]) + ...) over the n rows of p [n, d] (row stride d), for
// every column j, by the whole block: the contract's in-order sum of partials, which other
// blocks wrote (read via L2). Where d allows, each thread takes 4 adjacent columns with 16-byte
// loads and loads FUSED_SUM_BATCH rows before adding them: 4 x FUSED_SUM_BATCH values in flight
// per thread instead of one row's value per round trip; else one column at a time.
__device__ __forceinline__ void block_sum_rows_in_order(const float* p, int n, int d, float* out) {
    if (d % 4 == 0 && aligned16(p) && aligned16(out)) {
#pragma unroll 1
        for (int j = threadIdx.x * 4; j < d; j += blockDim.x * 4) {
            const float4* col = reinterpret_cast<const float4*>(p + j);
            const i64 stride = d / 4;                   // float4s per row
            float4 s = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 1
            for (int r0 = 0; r0 < n; r0 += FUSED_SUM_BATCH, col += FUSED_SUM_BATCH * stride) {
                float4 v[FUSED_SUM_BATCH];
#pragma unroll
                for (int u = 0; u < FUSED_SUM_BATCH; ++u)
                    if (r0 + u < n) v[u] = __ldcg(col + u * stride);
#pragma unroll
                for (int u = 0; u < FUSED_SUM_BATCH; ++u)
                    if (r0 + u < n) {
                        s.x = __fadd_rn(s.x, v[u].x);
                        s.y = __fadd_rn(s.y, v[u].y);
                        s.z = __fadd_rn(s.z, v[u].z);
                        s.w = __fadd_rn(s.w, v[u].w);
                    }
            }
            *reinterpret_cast<float4*>(out + j) = s;
        }
        return;
    }
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float s = 0.0f;
        for (int r = 0; r < n; ++r) s = __fadd_rn(s, __ldcg(p + (i64)r * d + j));
        out[j] = s;
    }
}

template <typename T>
__device__ __forceinline__ void mlp_fused_impl(const float* __restrict__ x, const u32* __restrict__ x_signs,
                                               const u32* __restrict__ w_signs, i64 sign_ld,
                                               const T* __restrict__ w_gate, const T* __restrict__ w_up,
                                               const T* __restrict__ w_down_t, i64 ld, int d, int k, int alpha_milli,
                                               int act_kind, float threshold, int* __restrict__ counts,
                                               unsigned char* __restrict__ zero, float* h1, float* h3, float* q,
                                               float* partial, u32* done, float* __restrict__ out) {
    const int V = Elem<T>::V;
    const int GROUPS = PART_ROWS / WARP_SIZE;
    __shared__ int rows_s[PART_ROWS];
    __shared__ float h_s[PART_ROWS];
    __shared__ int group_count[GROUPS];
    __shared__ int last;
    const int n_chunks = (k + DOWN_ROW_CHUNK - 1) / DOWN_ROW_CHUNK;
    const int n_parts = n_chunks * DOWN_SUB_CHUNKS;
    const int lane = lane_id();
    const int warp = threadIdx.x / WARP_SIZE;
    const int n_warps = blockDim.x / WARP_SIZE;
    bool final_block = false;

    for (int part = blockIdx.x; part < n_parts; part += gridDim.x) {      // uniform per block
        const int r0 = part * PART_ROWS;
        for (int r = warp; r < PART_ROWS && r0 + r < k; r += n_warps) {  // uniform per warp
            const i64 row = r0 + r;
            const int n_neg = row_negative_count<true>(w_signs + row * sign_ld, x_signs, d, lane);
            const bool skip = predicted_zero(n_neg, d, alpha_milli);
            float a = 0.0f, h = 0.0f;
            if (!skip) {
                float z_gate, z_up;
                warp_dot_pair_batched<T, FUSED_PAIR_BATCH>(w_gate + row * ld, w_up + row * ld, x, d, lane, z_gate,
                                                           z_up);
                a = activate(z_gate, act_kind, threshold);
                h = a != 0.0f ? __fmul_rn(a, z_up) : 0.0f;
            }
            if (lane == 0) {
                counts[row] = n_neg;
                zero[row] = skip ? 1 : 0;
                h1[row] = a;
                h3[row] = h;
            }
        }
        __syncthreads();                            // the part's h3 written (read back below)
        list_nonzero_rows<GROUPS>(h3, r0, k, 0, rows_s, h_s, group_count);
        int n = 0;
        for (int g = 0; g < GROUPS; ++g) n += group_count[g];
        for (int col0 = threadIdx.x * V; col0 < d; col0 += blockDim.x * V) {
            float acc[V];
#pragma unroll
            for (int v = 0; v < V; ++v) acc[v] = 0.0f;
            down_add_rows<T, FUSED_DOWN_BATCH>(w_down_t, ld, rows_s, h_s, 0, n, col0, d,
                                               down_vector_ok(w_down_t, ld, col0, d), acc);
#pragma unroll
            for (int v = 0; v < V; ++v)
                if (col0 + v < d) q[(i64)part * d + col0 + v] = acc[v];
        }

        const int chunk = part / DOWN_SUB_CHUNKS;
        __threadfence();                            // this part's q visible to every block
        __syncthreads();
        if (threadIdx.x == 0) last = atomicAdd(done + chunk, 1u) == DOWN_SUB_CHUNKS - 1;
        __syncthreads();
        if (last) {                                 // uniform per block
            __threadfence();
            block_sum_rows_in_order(q + (i64)chunk * DOWN_SUB_CHUNKS * d, DOWN_SUB_CHUNKS, d, partial + (i64)chunk * d);
            __threadfence();
            __syncthreads();
            if (threadIdx.x == 0) {
                done[chunk] = 0u;
                last = atomicAdd(done + n_chunks, 1u) == n_chunks - 1;
            }
            __syncthreads();
            final_block = final_block || last;      // the last chunk: this block adds the partials below
        }
        __syncthreads();                            // shared memory free for the next part
    }
    if (final_block) {                              // after the loop: its registers are free by then
        __threadfence();
        block_sum_rows_in_order(partial, n_chunks, d, out);
        if (threadIdx.x == 0) done[n_chunks] = 0u;
    }
}

// Two blocks per SM (up to 128 registers; left alone, ptxas gives the fp16 kernel 165 on sm_90:
// one block of 8 warps per SM). The batches above are the largest that fit 128 without a spill
// on sm_80/87/90 (6 gate/up chunks or 8 down rows spill).
#define MLP_FUSED(NAME, T)                                                                                       \
    extern "C" __global__ void __launch_bounds__(FUSED_THREADS, 2)                                               \
    mlp_fused_##NAME(const float* x, const u32* x_signs, const u32* w_signs, i64 sign_ld, const T* w_gate,       \
                     const T* w_up, const T* w_down_t, i64 ld, int d, int k, int alpha_milli, int act_kind,      \
                     float threshold, int* counts, unsigned char* zero, float* h1, float* h3, float* q,          \
                     float* partial, u32* done, float* out) {                                                    \
        mlp_fused_impl<T>(x, x_signs, w_signs, sign_ld, w_gate, w_up, w_down_t, ld, d, k, alpha_milli, act_kind, \
                          threshold, counts, zero, h1, h3, q, partial, done, out);                               \
    }
MLP_FUSED(fp32, float)
MLP_FUSED(fp16, half_bits)
MLP_FUSED(bf16, bf16_bits)
