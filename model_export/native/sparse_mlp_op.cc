// The sparse-MLP op library for onnxruntime: one `SparseMLP` node per layer, domain
// `ai.sparseinfer`, loadable by any host with SessionOptions.register_custom_ops_library.
//
//   inputs : x [..., d] float; W_gate, W_up, W_down^T [k, d] float or float16 (initializers,
//            read in place; fp16 widened exactly, float32 accumulation); W_gate's sign words [k, >= ceil(d/64)] uint64; optionally W_gate's
//            +-1 int8 signs [d, k] (read only by the exports' function bodies, ignored here)
//   attrs  : alpha_milli (eq. 2's alpha in thousandths), activation (a name of ACT_NAMES in
//            kernels/cuda/activation.h: relu, fatrelu, silu, gelu, gelu_tanh), threshold (fatrelu)
//   outputs: out (x's shape); optionally predicted_zero, computed (up and down were
//            computed: the +AS rows) and actual_zero (the full gate product is zero), bool
//            [k] for one token and [0] for several
//
// One token is the sparse decode step; several tokens (prefill) run every row, densely,
// in the same order. Results follow reference/order_contract.py bit for bit. Errors
// (bad shapes, NaN in x) come back to the host as onnxruntime statuses naming the node.
//
// The CPU kernel is sparse_mlp_cpu.h on onnxruntime's intra-op thread pool; with
// SPARSEINFER_WITH_CUDA the library also registers the op for the CUDA provider, running
// kernels/cuda's sources through sparse_mlp_cuda.h on the provider's compute stream.
//
// The library's files: this one (the op's schema and its registration, the exported C
// functions), op_common.h (what they share), op_checks.cc (a node's attributes and inputs),
// op_kernel_cpu.cc and op_kernel_cuda.cc (the two providers' kernels), op_cpu_features.cc (the
// build's CPU extensions against the running CPU).
#include <cstdio>
#include <cstring>
#include <string>

#include "op_common.h"

const OrtApi* sparseinfer::op::g_api = nullptr;

namespace {

using namespace sparseinfer::op;

// The C API version asked of the host: the oldest that has every call used here
// (KernelContext_GetScratchBuffer came in onnxruntime 1.18), so any onnxruntime >= 1.18 loads
// the library, whichever headers built it.
constexpr uint32_t kApiVersion = 18;
static_assert(ORT_API_VERSION >= kApiVersion, "onnxruntime headers older than the C API version used");

// --- the op definitions ------------------------------------------------------------------

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out) {
    try {
        *out = make_kernel(info);
        return nullptr;
    } catch (const std::exception& e) {
        return status_of(e, ORT_INVALID_ARGUMENT);
    }
}

// Weights are float32 or float16 (declared as any type, checked in read_inputs); x is float32.
ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp*, size_t i) {
    switch (i) {
        case kX: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
        case kSigns: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64;
        case kSignsInt8: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
        default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    }
}

ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp*, size_t i) {
    return i == kOut ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
}

const char* ORT_API_CALL cpu_provider(const OrtCustomOp*) { return "CPUExecutionProvider"; }
const char* ORT_API_CALL cuda_provider(const OrtCustomOp*) { return "CUDAExecutionProvider"; }

OrtCustomOp make_op(const char* provider, OrtStatusPtr(ORT_API_CALL* compute)(void*, OrtKernelContext*)) {
    OrtCustomOp op;
    std::memset(&op, 0, sizeof(op));
    op.version = kApiVersion;
    op.GetName = [](const OrtCustomOp*) { return kOpName; };
    op.GetExecutionProviderType = provider ? cuda_provider : cpu_provider;
    op.GetInputTypeCount = [](const OrtCustomOp*) { return kInputs; };
    op.GetInputType = input_type;
    op.GetOutputTypeCount = [](const OrtCustomOp*) { return kOutputs; };
    op.GetOutputType = output_type;
    op.GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
        return i < kRequiredInputs ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
    };
    op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t i) {
        return i == kOut ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
    };
    op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
    op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
    op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
    op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
    op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
    op.CreateKernelV2 = create_kernel;
    op.KernelComputeV2 = compute;
    op.KernelDestroy = [](void* k) { delete static_cast<Kernel*>(k); };
    op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
    op.GetEndVersion = [](const OrtCustomOp*) { return 2147483647; };
    return op;
}

OrtCustomOp g_cpu_op = make_op(nullptr, compute_cpu);
#ifdef SPARSEINFER_WITH_CUDA
OrtCustomOp g_cuda_op = make_op("cuda", compute_cuda);
#endif

}  // namespace

#define SPARSEINFER_EXPORT __attribute__((visibility("default")))

extern "C" {

// onnxruntime calls this when a host registers the library.
SPARSEINFER_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
    const OrtApi* api = api_base->GetApi(kApiVersion);
    if (!api) {
        std::fprintf(stderr, "sparseinfer ops: this onnxruntime (%s) does not offer C API version %u\n",
                     api_base->GetVersionString(), kApiVersion);
        return nullptr;   // no api to build a status with; onnxruntime reports the missing op at load
    }
    if (const char* feature = missing_cpu_feature())
        return api->CreateStatus(ORT_FAIL, (std::string("sparseinfer ops: this library was built for a CPU with ") +
                                            feature + ", which this CPU lacks; rebuild it on this machine with "
                                            "`sparseinfer build-ops` and use that copy").c_str());
    g_api = api;
    OrtCustomOpDomain* domain = nullptr;
    if (OrtStatus* s = api->CreateCustomOpDomain(kDomain, &domain)) return s;
    if (OrtStatus* s = api->CustomOpDomain_Add(domain, &g_cpu_op)) return s;
#ifdef SPARSEINFER_WITH_CUDA
    if (OrtStatus* s = api->CustomOpDomain_Add(domain, &g_cuda_op)) return s;
#endif
    return api->AddCustomOpDomain(options, domain);
}

// The C API version the library asks of onnxruntime, and whether it has the CUDA kernel.
SPARSEINFER_EXPORT int sparseinfer_ops_api_version() { return int(kApiVersion); }
// Copies the CPU kernel's counters (decode steps, rows, rows predicted zero, rows computed)
// into out[0..3]; with reset != 0 zeroes them.
SPARSEINFER_EXPORT void sparseinfer_ops_counters(int64_t* out, int reset) { read_counters(out, reset != 0); }

SPARSEINFER_EXPORT int sparseinfer_ops_has_cuda() {
#ifdef SPARSEINFER_WITH_CUDA
    return 1;
#else
    return 0;
#endif
}

}  // extern "C"
