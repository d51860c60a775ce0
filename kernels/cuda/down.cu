// Down projection (step 4) on W_down^T [k, d] (row stride ld): out[j] = sum_i h3[i] * Wt[i, j].
// Each thread owns V = 16 bytes' worth of output columns and reads 16 bytes of every row
// it adds (coalesced across the block); rows whose h3 is exactly zero are never read.
#include "common.cuh"
#include "down_rows.cuh"

// v1 (deterministic, the contract's order). Block (column tile, chunk c of DOWN_ROW_CHUNK
// rows), DOWN_SUB_CHUNKS groups of DOWN_THREADS threads. The block first lists the chunk's
// rows with h3 != 0 in ascending order (ballots and a per-32-row-group prefix in shared
// memory; dense = every row). Group s then adds the rows of sub-chunk s in that order from
// +0.0 (q[s]), for the same columns as every other group: several independent load streams
// per column tile. Group 0 finally adds q[1], q[2], ... in order and writes partial[c, j];
// down_reduce_chunks adds the chunks. v4 (down_chunks_batched) is v1 with DOWN_BATCH rows'
// loads in flight per thread (down_add_rows). TILE: threads per column tile and sub-chunk
// (DOWN_THREADS; v5, down_chunks_narrow, takes DOWN_NARROW_THREADS: narrower tiles, so more
// and smaller blocks per chunk, with the same per-column order).
template <typename T, int BATCH = 1, int TILE = DOWN_THREADS>
__device__ __forceinline__ void down_chunks_impl(const float* __restrict__ h3, const T* __restrict__ wt, i64 ld,
                                                 int k, int d, int dense, float* __restrict__ partial) {
    const int V = Elem<T>::V;
    const int GROUPS = DOWN_ROW_CHUNK / WARP_SIZE;                  // 32-row ballot groups per chunk
    const int GROUPS_PER_SUB = GROUPS / DOWN_SUB_CHUNKS;
    __shared__ int rows_s[DOWN_ROW_CHUNK];
    __shared__ float h_s[DOWN_ROW_CHUNK];
    __shared__ int group_count[GROUPS];
    __shared__ float sub_s[DOWN_SUB_CHUNKS - 1][TILE][Elem<T>::V];
    const int chunk = blockIdx.y;
    const int r0 = chunk * DOWN_ROW_CHUNK;

    list_nonzero_rows<GROUPS>(h3, r0, k, dense, rows_s, h_s, group_count);

    const int sub = threadIdx.x / TILE;             // the sub-chunk this thread adds
    const int ct = threadIdx.x % TILE;              // its column slot in the tile
    int begin, end;                                 // sub-chunk's slice of rows_s
    sub_chunk_slice<GROUPS_PER_SUB>(group_count, sub, begin, end);
    const int col0 = (blockIdx.x * TILE + ct) * V;
    const bool has_cols = col0 < d;                 // no early return: barriers follow
    float acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = 0.0f;
    if (has_cols) {
        const bool vec = down_vector_ok(wt, ld, col0, d);
        down_add_rows<T, BATCH>(wt, ld, rows_s, h_s, begin, end, col0, d, vec, acc);
        if (sub > 0) {
#pragma unroll
            for (int v = 0; v < V; ++v) sub_s[sub - 1][ct][v] = acc[v];
        }
    }
    __syncthreads();
    if (sub != 0 || !has_cols) return;
    add_sub_chunk_sums<TILE, Elem<T>::V>(sub_s, ct, acc);
    float* out = partial + (i64)chunk * d;
#pragma unroll
    for (int v = 0; v < V; ++v)
        if (col0 + v < d) out[col0 + v] = acc[v];
}

// out[j] = (((+0.0 + partial[0, j]) + partial[1, j]) + ...), chunks ascending.
extern "C" __global__ void __launch_bounds__(256)
down_reduce_chunks(const float* __restrict__ partial, int n_chunks, int d, float* __restrict__ out) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    float s = 0.0f;
    for (int c = 0; c < n_chunks; ++c) s = __fadd_rn(s, partial[(i64)c * d + j]);
    out[j] = s;
}

// v3 (deterministic, one launch): v1, then the last block of each column tile to finish
// adds the tile's per-chunk partials in chunk order (the sum down_reduce_chunks makes, bit
// for bit) instead of a second launch. Every block fences its partials, then counts itself
// in tile_done[tile]; the block that brings the count to the number of chunks is the last
// and resets the count to 0 for the next launch (one stream at a time per buffer).
template <typename T>
__device__ __forceinline__ void down_chunks_serial_impl(const float* __restrict__ h3, const T* __restrict__ wt,
                                                        i64 ld, int k, int d, float* __restrict__ partial,
                                                        u32* __restrict__ tile_done, float* __restrict__ out) {
    __shared__ int last;
    down_chunks_impl<T>(h3, wt, ld, k, d, 0, partial);
    __threadfence();                                // this block's partials visible to every block
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(tile_done + blockIdx.x, 1u) == gridDim.y - 1;
    __syncthreads();
    if (!last) return;                              // uniform per block
    __threadfence();
    const int tile = DOWN_THREADS * Elem<T>::V;
    const int end = min(d, (int)(blockIdx.x + 1) * tile);
    for (int j = blockIdx.x * tile + threadIdx.x; j < end; j += blockDim.x) {
        float s = 0.0f;
        for (int c = 0; c < (int)gridDim.y; ++c) s = __fadd_rn(s, __ldcg(partial + (i64)c * d + j));
        out[j] = s;
    }
    if (threadIdx.x == 0) tile_done[blockIdx.x] = 0u;
}

// v2 (order free, the paper's atomicAdd down projection as split-K): block (column tile,
// group of rows_per_block rows) adds its nonzero rows in registers, then one atomicAdd
// per column. The caller zeroes out first.
template <typename T>
__device__ __forceinline__ void down_atomic_impl(const float* __restrict__ h3, const T* __restrict__ wt, i64 ld,
                                                 int k, int d, int rows_per_block, float* __restrict__ out) {
    const int V = Elem<T>::V;
    const int col0 = (blockIdx.x * blockDim.x + threadIdx.x) * V;
    if (col0 >= d) return;
    const bool vec = down_vector_ok(wt, ld, col0, d);
    const int r0 = blockIdx.y * rows_per_block;
    const int r1 = min(k, r0 + rows_per_block);
    float acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = 0.0f;
    bool any = false;
    for (int i = r0; i < r1; ++i) {
        const float h = __ldg(h3 + i);              // same i on every thread: uniform branch
        if (h == 0.0f) continue;
        any = true;
        down_add_row(wt, ld, (i64)i, h, col0, d, vec, acc);
    }
    if (!any) return;
#pragma unroll
    for (int v = 0; v < V; ++v)
        if (col0 + v < d) atomicAdd(out + col0 + v, acc[v]);
}

#define DOWN_BATCH 8      // rows whose weights a thread of down_chunks_batched loads before adding them
#ifndef DOWN_NARROW_THREADS
#define DOWN_NARROW_THREADS 64    // v5's column tile: 64 threads x V columns, 4 sub-chunks per block
#endif
#define DOWN(NAME, T)                                                                                        \
    extern "C" __global__ void __launch_bounds__(DOWN_THREADS * DOWN_SUB_CHUNKS)                             \
    down_chunks_##NAME(const float* h3, const T* wt, i64 ld, int k, int d, int dense, float* partial) {      \
        down_chunks_impl<T>(h3, wt, ld, k, d, dense, partial);                                               \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(DOWN_THREADS * DOWN_SUB_CHUNKS)                             \
    down_chunks_batched_##NAME(const float* h3, const T* wt, i64 ld, int k, int d, int dense, float* partial) { \
        down_chunks_impl<T, DOWN_BATCH>(h3, wt, ld, k, d, dense, partial);                                   \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(DOWN_NARROW_THREADS * DOWN_SUB_CHUNKS)                      \
    down_chunks_narrow_##NAME(const float* h3, const T* wt, i64 ld, int k, int d, int dense, float* partial) { \
        down_chunks_impl<T, DOWN_BATCH, DOWN_NARROW_THREADS>(h3, wt, ld, k, d, dense, partial);              \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(DOWN_THREADS * DOWN_SUB_CHUNKS)                             \
    down_chunks_serial_##NAME(const float* h3, const T* wt, i64 ld, int k, int d, float* partial,            \
                              u32* tile_done, float* out) {                                                  \
        down_chunks_serial_impl<T>(h3, wt, ld, k, d, partial, tile_done, out);                               \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(DOWN_THREADS)                                               \
    down_atomic_##NAME(const float* h3, const T* wt, i64 ld, int k, int d, int rows_per_block, float* out) { \
        down_atomic_impl<T>(h3, wt, ld, k, d, rows_per_block, out);                                          \
    }
DOWN(fp32, float)
DOWN(fp16, half_bits)
DOWN(bf16, bf16_bits)
