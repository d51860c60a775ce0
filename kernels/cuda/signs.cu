// pack_signs: sign bits of rows [n, d] (row stride ld elements) -> uint32 words [n, ceil(d/32)].
// One warp per 32-element word: lane l tests element 32w + l, __ballot_sync packs the 32
// bits in one instruction (bit l = element 32w + l, least significant first). A bit is 1
// iff the element is < 0: -0.0 packs as 0 (reference/signs.py). Padding bits are 0.
#include "common.cuh"

__device__ __forceinline__ bool is_negative(float v) { return v < 0.0f; }
__device__ __forceinline__ bool is_negative(half_bits v) { return (v.b & 0x8000u) && (v.b & 0x7fffu); }
__device__ __forceinline__ bool is_negative(bf16_bits v) { return (v.b & 0x8000u) && (v.b & 0x7fffu); }
__device__ __forceinline__ bool is_negative(signed char v) { return v < 0; }

template <typename T>
__device__ __forceinline__ void pack_signs_impl(const T* __restrict__ a, u32* __restrict__ words, int n, int d, i64 ld) {
    const int n_words = (d + WARP_SIZE - 1) / WARP_SIZE;
    const i64 warp = global_warp_id();
    if (warp >= (i64)n * n_words) return;            // uniform per warp
    const int lane = lane_id();
    const i64 row = warp / n_words;
    const int w = (int)(warp % n_words);
    const int j = w * WARP_SIZE + lane;
    const bool neg = j < d && is_negative(a[row * ld + j]);
    const u32 bits = __ballot_sync(FULL_MASK, neg);
    if (lane == 0) words[row * n_words + w] = bits;
}

#define PACK_SIGNS(NAME, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                              \
    pack_signs_##NAME(const T* __restrict__ a, u32* __restrict__ words, int n, int d, i64 ld) {    \
        pack_signs_impl<T>(a, words, n, d, ld);                                                    \
    }
PACK_SIGNS(fp32, float)
PACK_SIGNS(fp16, half_bits)
PACK_SIGNS(bf16, bf16_bits)
PACK_SIGNS(int8, signed char)
