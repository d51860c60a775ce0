// The sparse-MLP op library for onnxruntime, domain `ai.sparseinfer`, loadable by any host
// with SessionOptions.register_custom_ops_library. Two ops:
//
// SparseMLP, one node per layer:
//   inputs : x [..., d] float; W_gate, W_up, W_down^T: [k, d] float or float16 (initializers,
//            read in place; fp16 widened exactly, float32 accumulation), or with weight_format
//            uint8 rows of GGUF blocks [k, d / 32 * block bytes] (blocks along d; dequantized
//            to float32 as reference/block_quant.py does); W_gate's sign words [k, >= ceil(d/64)]
//            uint64; optionally W_gate's +-1 int8 signs [d, k] (read only by the exports'
//            function bodies, ignored here)
//   attrs  : alpha_milli (eq. 2's alpha in thousandths), activation (a name of ACT_NAMES in
//            kernels/cuda/activation.h: relu, fatrelu, silu, gelu, gelu_tanh), threshold
//            (fatrelu); weight_format ("" or absent: float weights; q8_0, q4_0, q4_1),
//            down_format (W_down^T's block format; "" or absent: weight_format's), dense (1:
//            the dense MLP even for one token)
//   outputs: out (x's shape); optionally predicted_zero, computed (up and down were
//            computed: the +AS rows) and actual_zero (the full gate product is zero), bool
//            [k] for one sparse token and [0] for several or a dense node
// One token is the sparse decode step; several tokens (prefill) run every row, densely,
// in the same order. Results follow reference/order_contract.py bit for bit (block formats:
// its V = 1 row order, reference/quant_mlp.py). Errors (bad shapes, widths, NaN in x) come
// back to the host as onnxruntime statuses naming the node.
//
// BlockMatMul (op_block_matmul.cc): y [..., n] = x [..., d] . W^T, W uint8 [n, d / 32 * block
// bytes] in attribute weight_format, each element one V = 1 row dot product.
//
// The CPU kernels are sparse_mlp_cpu.h and block_quant_cpu.h on onnxruntime's intra-op thread
// pool; with SPARSEINFER_WITH_CUDA the library also registers SparseMLP for the CUDA provider
// (float or block-quantized weights, dense nodes too), running kernels/cuda's sources through
// sparse_mlp_cuda.h on the provider's compute stream. BlockMatMul has a CPU kernel only
// (onnxruntime places it on the CPU provider).
//
// The library's files: this one (the ops' schemas and their registration, the exported C
// functions), op_common.h (what they share), op_checks.cc (a SparseMLP node's attributes and
// inputs), op_kernel_cpu.cc and op_kernel_cuda.cc (its two providers' kernels),
// op_block_matmul.cc (BlockMatMul), op_cpu_features.cc (the build's CPU extensions against the
// running CPU).
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

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

// One op as onnxruntime sees it: inputs (UNDEFINED: any type, checked by the kernel) of which
// the first `required` must be present, outputs of which the first is required, its kernel.
struct OpSpec {
    const char* name;
    std::vector<ONNXTensorElementDataType> inputs, outputs;
    size_t required;
    void* (*create)(const OrtKernelInfo*);          // throws OpError
    void (*release)(void*);
    OrtStatusPtr(ORT_API_CALL* compute)(void*, OrtKernelContext*);
    const char* provider;
};

// onnxruntime's op record with its spec beside it: the callbacks find the spec from the record.
struct OpDef : OrtCustomOp {
    const OpSpec* spec;
};

const OpSpec& spec_of(const OrtCustomOp* op) { return *static_cast<const OpDef*>(op)->spec; }

// A kernel with the spec that made it (KernelComputeV2 and KernelDestroy see only the kernel).
struct Bound {
    const OpSpec* spec;
    void* kernel;
};

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info, void** out) {
    try {
        *out = new Bound{&spec_of(op), spec_of(op).create(info)};
        return nullptr;
    } catch (const std::exception& e) {
        return status_of(e, ORT_INVALID_ARGUMENT);
    }
}

OrtStatus* ORT_API_CALL compute(void* bound, OrtKernelContext* ctx) {
    const auto* b = static_cast<const Bound*>(bound);
    return b->spec->compute(b->kernel, ctx);
}

void ORT_API_CALL destroy(void* bound) {
    auto* b = static_cast<Bound*>(bound);
    b->spec->release(b->kernel);
    delete b;
}

OpDef make_op(const OpSpec* spec) {
    OpDef op;
    std::memset(static_cast<OrtCustomOp*>(&op), 0, sizeof(OrtCustomOp));
    op.spec = spec;
    op.version = kApiVersion;
    op.GetName = [](const OrtCustomOp* o) { return spec_of(o).name; };
    op.GetExecutionProviderType = [](const OrtCustomOp* o) { return spec_of(o).provider; };
    op.GetInputTypeCount = [](const OrtCustomOp* o) { return spec_of(o).inputs.size(); };
    op.GetInputType = [](const OrtCustomOp* o, size_t i) { return spec_of(o).inputs[i]; };
    op.GetOutputTypeCount = [](const OrtCustomOp* o) { return spec_of(o).outputs.size(); };
    op.GetOutputType = [](const OrtCustomOp* o, size_t i) { return spec_of(o).outputs[i]; };
    op.GetInputCharacteristic = [](const OrtCustomOp* o, size_t i) {
        return i < spec_of(o).required ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
    };
    op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t i) {
        return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
    };
    op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
    op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
    op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
    op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
    op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
    op.CreateKernelV2 = create_kernel;
    op.KernelComputeV2 = compute;
    op.KernelDestroy = destroy;
    op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
    op.GetEndVersion = [](const OrtCustomOp*) { return 2147483647; };
    return op;
}

constexpr auto kFloat = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, kBool = ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL,
               kAnyType = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
constexpr const char* kCpu = "CPUExecutionProvider";

void* create_mlp(const OrtKernelInfo* info) { return make_kernel(info); }
void release_mlp(void* kernel) { delete static_cast<Kernel*>(kernel); }

// SparseMLP: x float32; the weights float32, float16 or uint8 blocks (checked in read_inputs).
const std::vector<ONNXTensorElementDataType> kMlpInputs = {
    kFloat, kAnyType, kAnyType, kAnyType, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8};
const std::vector<ONNXTensorElementDataType> kMlpOutputs = {kFloat, kBool, kBool, kBool};
const OpSpec g_mlp_cpu{kOpName, kMlpInputs, kMlpOutputs, kRequiredInputs, create_mlp, release_mlp, compute_cpu, kCpu};
// BlockMatMul: x float32, W uint8 blocks (checked by the kernel).
const OpSpec g_block_matmul{kBlockMatMulName, {kFloat, kAnyType}, {kFloat}, 2, make_block_matmul_kernel,
                            release_block_matmul_kernel, compute_block_matmul_cpu, kCpu};
OpDef g_cpu_op = make_op(&g_mlp_cpu);
OpDef g_block_matmul_op = make_op(&g_block_matmul);
#ifdef SPARSEINFER_WITH_CUDA
const OpSpec g_mlp_cuda{kOpName, kMlpInputs, kMlpOutputs, kRequiredInputs, create_mlp, release_mlp, compute_cuda,
                        "CUDAExecutionProvider"};
OpDef g_cuda_op = make_op(&g_mlp_cuda);
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
    if (OrtStatus* s = api->CustomOpDomain_Add(domain, &g_block_matmul_op)) return s;
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
