// The down projection's row lists and row sums, shared by the chunked down kernels (down.cu)
// and the fused gate+up+down kernel (fused.cu): rows of W_down^T [k, d] (row stride ld),
// each thread owning V = 16 bytes' worth of output columns.
#pragma once
#include "common.cuh"

// The ascending list of rows i in [r0, r0 + 32 * GROUPS) with i < k and h3[i] != 0 (every
// row below k when dense): rows_s[0 ..) and their h3 in h_s, and each 32-row group's count in
// group_count (the list is the groups' lists in order). Ballots per 32-row group, warps
// striding over the groups; pass 0 counts, pass 1 scatters. Called by the whole block (it
// ends at a barrier). h3 is read with plain loads: the fused kernel wrote it in this launch.
template <int GROUPS>
__device__ __forceinline__ void list_nonzero_rows(const float* h3, int r0, int k, int dense, int* rows_s, float* h_s,
                                                  int* group_count) {
    const int lane = lane_id();
    const int warp = threadIdx.x / WARP_SIZE;
    const int n_warps = blockDim.x / WARP_SIZE;
    for (int pass = 0; pass < 2; ++pass) {          // pass 0: count per group; pass 1: scatter
        for (int g = warp; g < GROUPS; g += n_warps) {
            const int i = r0 + g * WARP_SIZE + lane;
            const float h = i < k ? h3[i] : 0.0f;
            const bool keep = i < k && (dense || h != 0.0f);
            const u32 bits = __ballot_sync(FULL_MASK, keep);
            if (pass == 0) {
                if (lane == 0) group_count[g] = __popc(bits);
            } else if (keep) {
                int offset = 0;
                for (int q = 0; q < g; ++q) offset += group_count[q];
                const int slot = offset + __popc(bits & ((1u << lane) - 1u));
                rows_s[slot] = i;
                h_s[slot] = h;
            }
        }
        __syncthreads();
    }
}

// The slice [begin, end) of the block's row list that sub-chunk `sub` adds: the rows of its
// GROUPS_PER_SUB 32-row groups (list_nonzero_rows' group_count).
template <int GROUPS_PER_SUB>
__device__ __forceinline__ void sub_chunk_slice(const int* group_count, int sub, int& begin, int& end) {
    begin = 0;
    end = 0;
    for (int q = 0; q < (sub + 1) * GROUPS_PER_SUB; ++q) {
        if (q < sub * GROUPS_PER_SUB) begin += group_count[q];
        end += group_count[q];
    }
}

// Sub-chunk group 0's total for its column slot ct: acc (its own sum) + the other groups'
// sums left in sub_s[s - 1][ct], s = 1, 2, ... in order.
template <int TILE, int N>
__device__ __forceinline__ void add_sub_chunk_sums(const float (*sub_s)[TILE][N], int ct, float* acc) {
#pragma unroll
    for (int s = 1; s < DOWN_SUB_CHUNKS; ++s) {
#pragma unroll
        for (int v = 0; v < N; ++v) acc[v] = __fadd_rn(acc[v], sub_s[s - 1][ct][v]);
    }
}

// Column tile of this thread: [col0, col0 + V) and whether it may use one 16-byte load.
template <typename T>
__device__ __forceinline__ bool down_vector_ok(const T* wt, i64 ld, int col0, int d) {
    return aligned16(wt) && ((ld * (i64)sizeof(T)) % 16 == 0) && col0 + Elem<T>::V <= d;
}

// acc[v] = fl(acc[v] + fl(h * Wt[row, col0 + v])) for the thread's columns below d.
template <typename T>
__device__ __forceinline__ void down_add_row(const T* __restrict__ wt, i64 ld, i64 row, float h, int col0, int d,
                                             bool vec, float* acc) {
    const int V = Elem<T>::V;
    const T* p = wt + row * ld + col0;
    if (vec) {
        float w[V];
        Elem<T>::unpack(__ldg(reinterpret_cast<const uint4*>(p)), w);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] = __fadd_rn(acc[v], __fmul_rn(h, w[v]));
    } else {
#pragma unroll
        for (int v = 0; v < V; ++v)
            if (col0 + v < d) acc[v] = __fadd_rn(acc[v], __fmul_rn(h, Elem<T>::load(p, v)));
    }
}

// Add rows rows_s[begin .. end) (weights h_s) in ascending order; BATCH > 1 loads the 16-byte
// vectors of up to BATCH rows before adding any of them (predicated for the last batch), so
// a thread has BATCH loads in flight instead of what the compiler hoists from an unrolled loop.
template <typename T, int BATCH>
__device__ __forceinline__ void down_add_rows(const T* __restrict__ wt, i64 ld, const int* rows_s, const float* h_s,
                                              int begin, int end, int col0, int d, bool vec, float* acc) {
    const int V = Elem<T>::V;
    if (BATCH > 1 && vec) {
        for (int n = begin; n < end; n += BATCH) {
            uint4 wv[BATCH];
#pragma unroll
            for (int u = 0; u < BATCH; ++u)
                if (n + u < end) wv[u] = __ldg(reinterpret_cast<const uint4*>(wt + (i64)rows_s[n + u] * ld + col0));
#pragma unroll
            for (int u = 0; u < BATCH; ++u) {
                if (n + u >= end) break;
                float w[V];
                Elem<T>::unpack(wv[u], w);
                const float h = h_s[n + u];
#pragma unroll
                for (int v = 0; v < V; ++v) acc[v] = __fadd_rn(acc[v], __fmul_rn(h, w[v]));
            }
        }
        return;
    }
#pragma unroll 4
    for (int n = begin; n < end; ++n) down_add_row(wt, ld, (i64)rows_s[n], h_s[n], col0, d, vec, acc);
}
