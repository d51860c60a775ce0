// The BlockMatMul op: y[..., n] = x[..., d] . W[n, :]^T with W block-quantized (uint8 [n,
// d / 32 * block bytes], attribute weight_format q8_0 | q4_0 | q4_1), the linear layers that
// onnxruntime's MatMulNBits cannot hold exactly. Each y element is one row dot product in the
// V = 1 order of block_quant_cpu.h (reference/order_contract.py's warp_dot_rows on the
// dequantized W with v_width 1), bit for bit; output rows split over onnxruntime's intra-op
// pool; several tokens in block_quant_cpu.h's tiles of rows x tokens. NaN in x propagates, as in
// MatMul.
#include <string>
#include <vector>

#include "op_common.h"

namespace sparseinfer::op {

namespace {

enum { kMatMulX, kMatMulW };

struct BlockMatMulKernel {
    WeightFormat format = FORMAT_Q8_0;
    std::string node;
};

template <typename F>
void block_matmul(OrtKernelContext* ctx, const uint8_t* w, const float* x, int64_t tokens, int d, int n, float* y) {
    if (tokens == 1) {
        for_row_blocks(ctx, n, [&](int r0, int r1) { dot_q_listed<F>(w, d, nullptr, n, x, r0, r1, y); });
        return;
    }
    for_row_blocks(ctx, n, [&](int r0, int r1) { dot_q_tokens<F>(w, d, r0, r1, x, tokens, y + r0, n); });
}

}  // namespace

void* make_block_matmul_kernel(const OrtKernelInfo* info) {
    auto* kernel = new BlockMatMulKernel;
    try {
        kernel->node = node_label(info, kBlockMatMulName);
        std::string fmt;
        if (!string_attribute(info, "weight_format", &fmt))
            throw OpError(kernel->node + ": needs the weight_format attribute (q8_0, q4_0 or q4_1)");
        kernel->format = block_format_named(kernel->node, "weight_format", fmt);
    } catch (...) {
        delete kernel;
        throw;
    }
    return kernel;
}

void release_block_matmul_kernel(void* kernel) { delete static_cast<BlockMatMulKernel*>(kernel); }

OrtStatus* ORT_API_CALL compute_block_matmul_cpu(void* op_kernel, OrtKernelContext* ctx) {
    const auto& kernel = *static_cast<BlockMatMulKernel*>(op_kernel);
    try {
        const TensorView x = input(ctx, kMatMulX, kernel.node, "x");
        const TensorView w = input(ctx, kMatMulW, kernel.node, "W");
        const int64_t row_bytes = block_row_bytes(kernel.node, x, kernel.format);
        const int64_t d = x.shape.back();
        check_block_weights(kernel.node, "W", w, -1, "n", row_bytes, d, kernel.format);
        const int64_t n = w.shape[0], tokens = x.size() / d;
        std::vector<int64_t> y_shape = x.shape;
        y_shape.back() = n;
        auto* y = static_cast<float*>(output(ctx, 0, y_shape));
        if (tokens == 0) return nullptr;
        with_block_format(kernel.format, [&](auto f) {
            block_matmul<decltype(f)>(ctx, static_cast<const uint8_t*>(w.data), static_cast<const float*>(x.data),
                                      tokens, int(d), int(n), y);
        });
        return nullptr;
    } catch (const OpError& e) {
        return status_of(e, ORT_INVALID_ARGUMENT);
    } catch (const std::exception& e) {
        return status_of(e, ORT_RUNTIME_EXCEPTION);
    }
}

}  // namespace sparseinfer::op
