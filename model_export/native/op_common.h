// What the op library's files share (sparse_mlp_op.cc registers the ops; op_checks.cc reads a
// SparseMLP node's attributes and inputs; op_kernel_cpu.cc and op_kernel_cuda.cc compute it;
// op_block_matmul.cc is the BlockMatMul op; op_cpu_features.cc checks the CPU): the onnxruntime
// C API the host handed over, errors, tensor views, attribute and output helpers, a node's
// kernel and the indices of its inputs and outputs.
#pragma once

#include <onnxruntime_c_api.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "q8_activation_cpu.h"

#if !defined(SPARSEINFER_OP_DOMAIN) || !defined(SPARSEINFER_OP_TYPE) || !defined(SPARSEINFER_BLOCK_MATMUL_TYPE)
#error "the ops' domain and names come from model_export/op_library.py (DOMAIN, OP_TYPE, BLOCK_MATMUL_TYPE) as -D defines"
#endif

namespace sparseinfer::op {

constexpr const char* kDomain = SPARSEINFER_OP_DOMAIN;
constexpr const char* kOpName = SPARSEINFER_OP_TYPE;
constexpr const char* kBlockMatMulName = SPARSEINFER_BLOCK_MATMUL_TYPE;
constexpr size_t kInputs = 6, kRequiredInputs = 5, kOutputs = 4;
enum { kX, kGate, kUp, kDownT, kSigns, kSignsInt8 };
enum { kOut, kPredictedZero, kComputed, kActualZero };

// The host's C API, set when the library is registered (sparse_mlp_op.cc).
extern const OrtApi* g_api;

// A bad node or input: reported as ORT_INVALID_ARGUMENT (other exceptions: ORT_RUNTIME_EXCEPTION).
struct OpError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Throws OpError with the status's message where a C API call failed.
void check(OrtStatus* status);

OrtStatus* status_of(const std::exception& e, OrtErrorCode code);

struct TensorView {
    const void* data = nullptr;
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    std::vector<int64_t> shape;
    int64_t size() const {
        int64_t n = 1;
        for (int64_t s : shape) n *= s;
        return n;
    }
};

// Input `index` of the node, viewed; throws OpError naming `node` and `name` where it is missing.
TensorView input(OrtKernelContext* ctx, size_t index, const std::string& node, const char* name);

// "[2, 3]"
std::string shape_text(const std::vector<int64_t>& shape);

// Output `index` if the node has it, shaped `dims`; else null.
void* output(OrtKernelContext* ctx, size_t index, const std::vector<int64_t>& dims);

// "<op> node '<name>'": how messages name a node.
std::string node_label(const OrtKernelInfo* info, const char* op_type);

// The node's string attribute `name`; false where it has none.
bool string_attribute(const OrtKernelInfo* info, const char* name, std::string* value);

// A block format's name ("q8_0", "q4_0", "q4_1") as the node's attribute `attr`; an OpError
// naming the node and the supported names otherwise.
WeightFormat block_format_named(const std::string& node, const char* attr, const std::string& value);

// The bytes of a row of d weights in `format`, d being x's last axis: x must be float32 with d
// a positive multiple of 32 (OpError otherwise).
int64_t block_row_bytes(const std::string& node, const TensorView& x, WeightFormat format);

// Checks a block-quantized weight tensor: uint8 [rows, row_bytes] (rows < 0: any count in
// [1, 2^31), called rows_name in the message).
void check_block_weights(const std::string& node, const char* name, const TensorView& w, int64_t rows,
                         const char* rows_name, int64_t row_bytes, int64_t d, WeightFormat format);

// A SparseMLP node's kernel: its attributes, and its name for messages. `weights` is W_gate's
// and W_up's format, `down` W_down^T's (both FORMAT_FLOAT for float weights); `dense`: run the
// dense MLP even for one token; `int8_activations` (accuracy_level 4): the gate and up rows on x
// quantized per block (q8_activation_cpu.h).
constexpr int64_t kInt8Activations = 4;
struct Kernel {
    MlpParams p;
    WeightFormat weights = FORMAT_FLOAT, down = FORMAT_FLOAT;
    bool dense = false, int8_activations = false;
    std::string node;
};

// The node's inputs, checked against each other and the kernel's formats; d from x (block
// formats) or W_gate (float), k from W_gate.
struct Inputs {
    TensorView x, gate, up, down_t, signs;
    int64_t d = 0, k = 0, tokens = 0;
};

Inputs read_inputs(OrtKernelContext* ctx, const Kernel& kernel);

// The node's outputs, shaped (out as x; the bool masks [k] for one sparse token, [0] for several
// tokens or a dense node); null where the node does not have one.
struct Outputs {
    float* out = nullptr;
    uint8_t *predicted_zero = nullptr, *computed = nullptr, *actual_zero = nullptr;
};

Outputs outputs(OrtKernelContext* ctx, const Inputs& in, const Kernel& kernel);

// The node's attributes, checked (throws OpError).
Kernel* make_kernel(const OrtKernelInfo* info);

// The op's compute functions: on the CPU provider, and (SPARSEINFER_WITH_CUDA) on the CUDA provider.
OrtStatus* ORT_API_CALL compute_cpu(void* op_kernel, OrtKernelContext* ctx);
OrtStatus* ORT_API_CALL compute_cuda(void* op_kernel, OrtKernelContext* ctx);

// The BlockMatMul op (op_block_matmul.cc): its kernel from a node's attributes (throws
// OpError), the kernel's release, and its CPU compute function.
void* make_block_matmul_kernel(const OrtKernelInfo* info);
void release_block_matmul_kernel(void* kernel);
OrtStatus* ORT_API_CALL compute_block_matmul_cpu(void* op_kernel, OrtKernelContext* ctx);

// onnxruntime's intra-op pool: fn(i) for i in [0, total), split into at most `batches`
// contiguous batches (0: one per thread); fn's exception is rethrown here.
template <typename F>
void parallel_for(OrtKernelContext* ctx, size_t total, size_t batches, F&& fn) {
    if (total == 0) return;
    struct Call {
        F* fn;
        std::atomic<bool> failed{false};
        std::exception_ptr error;            // the first task's that threw
    } call;
    call.fn = &fn;
    auto trampoline = [](void* user, size_t i) {
        auto* c = static_cast<Call*>(user);
        try {
            (*c->fn)(i);
        } catch (...) {
            if (!c->failed.exchange(true)) c->error = std::current_exception();
        }
    };
    check(g_api->KernelContext_ParallelFor(ctx, trampoline, total, batches, &call));
    if (call.error) std::rethrow_exception(call.error);
}

constexpr int kRowsPerTask = 32;

// Rows [0, n) in tasks of kRowsPerTask: fn(r0, r1).
template <typename F>
void for_row_blocks(OrtKernelContext* ctx, int64_t n, F&& fn) {
    parallel_for(ctx, size_t((n + kRowsPerTask - 1) / kRowsPerTask), 0, [&](size_t b) {
        const int r0 = int(b) * kRowsPerTask;
        fn(r0, int(std::min<int64_t>(n, r0 + kRowsPerTask)));
    });
}

// The CPU kernel's counts since the last reset (decode steps, rows, rows predicted zero, rows
// computed) into out[0..3]; with reset, zeroed.
void read_counters(int64_t* out, bool reset);

// The first instruction-set extension this build needs that the running CPU lacks, or null.
const char* missing_cpu_feature();

}  // namespace sparseinfer::op
