// What the op library's files share (sparse_mlp_op.cc registers the op; op_checks.cc reads a
// node's attributes and inputs; op_kernel_cpu.cc and op_kernel_cuda.cc compute it;
// op_cpu_features.cc checks the CPU): the onnxruntime C API the host handed over, errors,
// tensor views, a node's kernel and the indices of its inputs and outputs.
#pragma once

#include <onnxruntime_c_api.h>

#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "sparse_mlp_cpu.h"

#if !defined(SPARSEINFER_OP_DOMAIN) || !defined(SPARSEINFER_OP_TYPE)
#error "the op's domain and name come from model_export/op_library.py (DOMAIN, OP_TYPE) as -D defines"
#endif

namespace sparseinfer::op {

constexpr const char* kDomain = SPARSEINFER_OP_DOMAIN;
constexpr const char* kOpName = SPARSEINFER_OP_TYPE;
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

// The node's inputs, checked against each other; d and k from W_gate.
struct Inputs {
    TensorView x, gate, up, down_t, signs;
    int64_t tokens = 0;
};

Inputs read_inputs(OrtKernelContext* ctx, const std::string& node);

// The node's outputs, shaped (out as x; the bool masks [k] for one token, [0] for several);
// null where the node does not have one.
struct Outputs {
    float* out = nullptr;
    uint8_t *predicted_zero = nullptr, *computed = nullptr, *actual_zero = nullptr;
};

Outputs outputs(OrtKernelContext* ctx, const Inputs& in);

// A node's kernel: its attributes, and its name for messages.
struct Kernel {
    MlpParams p;
    std::string node;
};

// The node's attributes, checked (throws OpError).
Kernel* make_kernel(const OrtKernelInfo* info);

// The op's compute functions: on the CPU provider, and (SPARSEINFER_WITH_CUDA) on the CUDA provider.
OrtStatus* ORT_API_CALL compute_cpu(void* op_kernel, OrtKernelContext* ctx);
OrtStatus* ORT_API_CALL compute_cuda(void* op_kernel, OrtKernelContext* ctx);

// The CPU kernel's counts since the last reset (decode steps, rows, rows predicted zero, rows
// computed) into out[0..3]; with reset, zeroed.
void read_counters(int64_t* out, bool reset);

// The first instruction-set extension this build needs that the running CPU lacks, or null.
const char* missing_cpu_feature();

}  // namespace sparseinfer::op
