// The op's CUDA-provider kernel (built into the library's cuda flavour only): the node's inputs
// checked as on the CPU (float32/float16 or block-quantized weights, a dense node), the
// launcher's arguments (sparse_mlp_cuda.h) filled in, scratch from the provider's allocator,
// and kernels/cuda's kernels enqueued on its compute stream.
#include <string>

#include "op_common.h"
#include "sparse_mlp_cuda.h"

namespace sparseinfer::op {

namespace {

// The launcher's SPARSEINFER_WEIGHTS_* code of a block format.
int launcher_format(WeightFormat f) {
    switch (f) {
        case FORMAT_Q8_0: return SPARSEINFER_WEIGHTS_Q8_0;
        case FORMAT_Q4_0: return SPARSEINFER_WEIGHTS_Q4_0;
        case FORMAT_Q4_1: return SPARSEINFER_WEIGHTS_Q4_1;
        default: throw std::logic_error("not a block format");
    }
}

}  // namespace

OrtStatus* ORT_API_CALL compute_cuda(void* op_kernel, OrtKernelContext* ctx) {
    const auto& kernel = *static_cast<Kernel*>(op_kernel);
    OrtMemoryInfo* mem = nullptr;
    OrtAllocator* alloc = nullptr;
    void* scratch = nullptr;
    try {
        if (kernel.int8_activations)
            throw OpError(kernel.node + ": accuracy_level 4 (int8 activations) runs on the CPU provider only; export "
                          "with accuracy level 0 for CUDA");
        const Inputs in = read_inputs(ctx, kernel);
        const int64_t k = in.k, d = in.d;
        SparseMlpCudaArgs a{};
        a.x = static_cast<const float*>(in.x.data);
        a.w_gate = in.gate.data;
        a.w_up = in.up.data;
        a.w_down_t = in.down_t.data;
        if (kernel.weights != FORMAT_FLOAT) {
            a.weight_dtype = launcher_format(kernel.weights);
            a.down_dtype = launcher_format(kernel.down);
        } else {
            a.weight_dtype = in.gate.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? SPARSEINFER_WEIGHTS_FP16
                                                                                   : SPARSEINFER_WEIGHTS_FP32;
            a.down_dtype = a.weight_dtype;
        }
        a.dense = kernel.dense ? 1 : 0;
        a.w_signs = static_cast<const uint32_t*>(in.signs.data);
        a.sign_stride = 2 * in.signs.shape[1];
        a.n_tokens = int(in.tokens);
        a.d = int(d);
        a.k = int(k);
        a.alpha_milli = kernel.p.alpha_milli;
        a.activation = kernel.p.act;           // activation.h's codes, the kernels' too
        a.threshold = kernel.p.threshold;
        const Outputs o = outputs(ctx, in, kernel);
        a.out = o.out;
        a.predicted_zero = o.predicted_zero;
        a.computed = o.computed;
        a.actual_zero = o.actual_zero;
        if (in.tokens == 0) return nullptr;
        void* stream = nullptr;
        check(g_api->KernelContext_GetGPUComputeStream(ctx, &stream));
        // scratch on the device that holds x (the session's device_id)
        const OrtValue* x_value = nullptr;
        check(g_api->KernelContext_GetInput(ctx, kX, &x_value));
        const OrtMemoryInfo* x_mem = nullptr;
        check(g_api->GetTensorMemoryInfo(x_value, &x_mem));
        int device = 0;
        check(g_api->MemoryInfoGetId(x_mem, &device));
        check(g_api->CreateMemoryInfo("Cuda", OrtDeviceAllocator, device, OrtMemTypeDefault, &mem));
        check(g_api->KernelContext_GetAllocator(ctx, mem, &alloc));
        check(g_api->KernelContext_GetScratchBuffer(ctx, mem, sparseinfer_cuda_scratch_bytes(a.n_tokens, a.d, a.k),
                                                    &scratch));
        a.scratch = scratch;
        const int err = sparseinfer_cuda_sparse_mlp(&a, stream);
        alloc->Free(alloc, scratch);           // stream-ordered: reused only after this stream's work
        scratch = nullptr;
        g_api->ReleaseAllocator(alloc);
        g_api->ReleaseMemoryInfo(mem);
        if (err) throw std::runtime_error(kernel.node + ": CUDA launch failed: " + sparseinfer_cuda_error_string(err));
        return nullptr;
    } catch (const std::exception& e) {
        if (scratch && alloc) alloc->Free(alloc, scratch);
        if (alloc) g_api->ReleaseAllocator(alloc);
        if (mem) g_api->ReleaseMemoryInfo(mem);
        return status_of(e, dynamic_cast<const OpError*>(&e) ? ORT_INVALID_ARGUMENT : ORT_RUNTIME_EXCEPTION);
    }
}

}  // namespace sparseinfer::op
