// The C boundary between the op library's CUDA-provider kernel (sparse_mlp_op.cc, g++) and
// its CUDA launcher (sparse_mlp_cuda.cu, nvcc): no onnxruntime header on the .cu side, no
// CUDA header on the .cc side.
//
// One call runs one layer's MLP for n_tokens tokens on `stream`, with no allocation and no
// host synchronization: n_tokens == 1 is the sparse decode step (the kernels' default
// pipeline: sign predictor, gate+up of the kept rows with +AS, deterministic down); more
// tokens (prefill), or `dense`, run the same kernels densely, token by token. Weights are
// float32, float16, or rows of GGUF blocks (Q8_0, Q4_0, Q4_1: kernels/cuda/quant.cu, W_down^T
// in its own block format). Every result follows reference/order_contract.py bit for bit.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SPARSEINFER_WEIGHTS_FP32 0
#define SPARSEINFER_WEIGHTS_FP16 1
#define SPARSEINFER_WEIGHTS_Q8_0 2     // block formats (reference/block_quant.py): uint8 rows of d / 32
#define SPARSEINFER_WEIGHTS_Q4_0 3     // blocks of 34, 18 and 20 bytes; d a multiple of 32
#define SPARSEINFER_WEIGHTS_Q4_1 4

typedef struct {
    const float* x;            // [n_tokens, d]
    const void* w_gate;        // [k, d] row-major, weight_dtype (block formats: [k, d / 32] blocks)
    const void* w_up;          // [k, d]
    const void* w_down_t;      // [k, d]: W_down transposed, down_dtype
    const uint32_t* w_signs;   // [k, sign_stride] words: bit j % 32 of word j / 32 is 1 iff W_gate[i, j] < 0
    int64_t sign_stride;       // uint32 words per row of w_signs, >= ceil(d / 32); words past ceil(d / 32) unread
    int n_tokens, d, k;
    int alpha_milli;           // eq. 2: row predicted zero when 1000 * N_neg > alpha_milli * (d - N_neg)
    int activation;            // an ACT_* code of kernels/cuda/activation.h (silu and the gelus:
                               // predicted-negative rows taken as zero)
    float threshold;           // fatrelu: h1 = z if z >= threshold else +0.0
    float* out;                // [n_tokens, d]
    uint8_t* predicted_zero;   // [k] or NULL (n_tokens == 1 only): 1 where the predictor skips the row
    uint8_t* computed;         // [k] or NULL (n_tokens == 1 only): 1 where up and down were computed (+AS)
    void* scratch;             // sparseinfer_cuda_scratch_bytes(n_tokens, d, k) bytes, 256-byte aligned
    uint8_t* actual_zero;      // [k] or NULL (n_tokens == 1 only): 1 where the full gate's h1 is zero, or
                               // without exact zeros (silu, gelu) where the gate is negative (debug:
                               // every gate row is computed once more, densely)
    int weight_dtype;          // SPARSEINFER_WEIGHTS_* of W_gate and W_up: fp16 weights are widened exactly,
                               // blocks dequantized exactly (quant.cu), float32 accumulation
    int down_dtype;            // SPARSEINFER_WEIGHTS_* of W_down^T: weight_dtype for float weights, any block
                               // format beside a block weight_dtype (Q8_0 beside Q4_0 gate and up)
    int dense;                 // 1: every token runs the dense pipeline (masks unused), as for n_tokens > 1
} SparseMlpCudaArgs;

// Bytes of device scratch one call needs (counts, masks, h1, h3, partial sums, counters).
size_t sparseinfer_cuda_scratch_bytes(int n_tokens, int d, int k);

// Enqueue the layer on `stream` (a cudaStream_t). Returns 0, or a cudaError_t code of the
// first failed launch (sparseinfer_cuda_error_string names it).
int sparseinfer_cuda_sparse_mlp(const SparseMlpCudaArgs* args, void* stream);

const char* sparseinfer_cuda_error_string(int code);

#ifdef __cplusplus
}
#endif
