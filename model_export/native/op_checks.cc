// A node's attributes and inputs, checked: every error names the node (an OpError, which the
// host receives as an onnxruntime status); its outputs, shaped; the C API's errors as exceptions
// and back.
#include <algorithm>
#include <iterator>

#include "op_common.h"

namespace sparseinfer::op {

void check(OrtStatus* status) {
    if (!status) return;
    std::string msg = g_api->GetErrorMessage(status);
    g_api->ReleaseStatus(status);
    throw OpError(msg);
}

OrtStatus* status_of(const std::exception& e, OrtErrorCode code) { return g_api->CreateStatus(code, e.what()); }

namespace {

TensorView view(const OrtValue* value) {
    TensorView t;
    OrtTensorTypeAndShapeInfo* info = nullptr;
    check(g_api->GetTensorTypeAndShape(value, &info));
    size_t rank = 0;
    check(g_api->GetDimensionsCount(info, &rank));
    t.shape.resize(rank);
    check(g_api->GetDimensions(info, t.shape.data(), rank));
    check(g_api->GetTensorElementType(info, &t.type));
    g_api->ReleaseTensorTypeAndShapeInfo(info);
    void* data = nullptr;
    check(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
    t.data = data;
    return t;
}

std::string shape_text(const std::vector<int64_t>& s) {
    std::string out = "[";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + "]";
}

// Output `index` if the node has it, shaped `dims`; else null.
void* output(OrtKernelContext* ctx, size_t index, const std::vector<int64_t>& dims) {
    size_t count = 0;
    check(g_api->KernelContext_GetOutputCount(ctx, &count));
    if (index >= count) return nullptr;
    OrtValue* v = nullptr;
    check(g_api->KernelContext_GetOutput(ctx, index, dims.data(), dims.size(), &v));
    if (!v) return nullptr;
    void* data = nullptr;
    check(g_api->GetTensorMutableData(v, &data));
    return data;
}

}  // namespace

Inputs read_inputs(OrtKernelContext* ctx, const std::string& node) {
    size_t count = 0;
    check(g_api->KernelContext_GetInputCount(ctx, &count));
    if (count < kRequiredInputs) throw OpError(node + ": needs inputs x, W_gate, W_up, W_down^T, sign words");
    const char* names[] = {"x", "W_gate", "W_up", "W_down^T", "sign words"};
    TensorView* slots[5];
    Inputs in;
    slots[0] = &in.x; slots[1] = &in.gate; slots[2] = &in.up; slots[3] = &in.down_t; slots[4] = &in.signs;
    for (size_t i = 0; i < kRequiredInputs; ++i) {
        const OrtValue* v = nullptr;
        check(g_api->KernelContext_GetInput(ctx, i, &v));
        if (!v) throw OpError(node + ": input " + names[i] + " is missing");
        *slots[i] = view(v);
    }
    if (in.gate.shape.size() != 2) throw OpError(node + ": W_gate must be [k, d], got " + shape_text(in.gate.shape));
    if (in.gate.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && in.gate.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
        throw OpError(node + ": W_gate must be float32 or float16");
    for (const TensorView* w : {&in.up, &in.down_t})
        if (w->type != in.gate.type)
            throw OpError(node + ": " + (w == &in.up ? "W_up" : "W_down^T") + " has another element type than W_gate");
    if (in.signs.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64) throw OpError(node + ": sign words must be uint64");
    const int64_t k = in.gate.shape[0], d = in.gate.shape[1];
    if (k < 1 || d < 1 || k > INT32_MAX || d > INT32_MAX)
        throw OpError(node + ": W_gate has shape " + shape_text(in.gate.shape) + "; k and d must be in [1, 2^31)");
    for (const TensorView* w : {&in.up, &in.down_t})
        if (w->shape != in.gate.shape)
            throw OpError(node + ": " + (w == &in.up ? "W_up" : "W_down^T") + " has shape " + shape_text(w->shape) +
                          "; expected " + shape_text(in.gate.shape) + " like W_gate");
    if (in.signs.shape.size() != 2 || in.signs.shape[0] != k || in.signs.shape[1] < (d + 63) / 64)
        throw OpError(node + ": sign words have shape " + shape_text(in.signs.shape) + "; expected [" +
                      std::to_string(k) + ", >= " + std::to_string((d + 63) / 64) + "] uint64");
    if (in.x.shape.empty() || in.x.shape.back() != d || in.x.size() % d != 0)
        throw OpError(node + ": x has shape " + shape_text(in.x.shape) + "; its last axis must be d = " +
                      std::to_string(d));
    in.tokens = in.x.size() / d;
    if (in.x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw OpError(node + ": x must be float32");
    return in;
}

Kernel* make_kernel(const OrtKernelInfo* info) {
    auto* kernel = new Kernel;
    try {
        size_t len = 0;
        check(g_api->KernelInfo_GetNodeName(info, nullptr, &len));
        std::string name(len, '\0');
        check(g_api->KernelInfo_GetNodeName(info, name.data(), &len));
        name.resize(len ? len - 1 : 0);
        kernel->node = std::string(kOpName) + " node '" + name + "'";
        int64_t alpha = 0;
        check(g_api->KernelInfoGetAttribute_int64(info, "alpha_milli", &alpha));
        if (alpha < 1 || alpha > SPARSEINFER_MAX_ALPHA_MILLI)     // reference/alpha.py's range, passed by the build
            throw OpError(kernel->node + ": alpha_milli " + std::to_string(alpha) + " is outside [1, " +
                          std::to_string(SPARSEINFER_MAX_ALPHA_MILLI) + "]");
        kernel->p.alpha_milli = int(alpha);
        len = 0;
        check(g_api->KernelInfoGetAttribute_string(info, "activation", nullptr, &len));
        std::string act(len, '\0');
        check(g_api->KernelInfoGetAttribute_string(info, "activation", act.data(), &len));
        act.resize(len ? len - 1 : 0);
        const auto* names_end = std::end(ACT_NAMES);
        const auto* found = std::find_if(std::begin(ACT_NAMES), names_end,
                                         [&](const char* name) { return act == name; });
        if (found == names_end) {
            std::string expected;
            for (const char* name : ACT_NAMES) expected += std::string(expected.empty() ? "" : ", ") + name;
            throw OpError(kernel->node + ": activation '" + act + "' is not supported; expected one of " + expected);
        }
        kernel->p.act = ActivationKind(found - std::begin(ACT_NAMES));   // silu, gelu: an approximation
        if (kernel->p.act == ACT_FATRELU) {
            check(g_api->KernelInfoGetAttribute_float(info, "threshold", &kernel->p.threshold));
            if (!(kernel->p.threshold == kernel->p.threshold) || kernel->p.threshold - kernel->p.threshold != 0.0f)
                throw OpError(kernel->node + ": fatrelu threshold must be finite");
        }
    } catch (...) {
        delete kernel;
        throw;
    }
    return kernel;
}

Outputs outputs(OrtKernelContext* ctx, const Inputs& in) {
    const std::vector<int64_t> mask_dims{in.tokens == 1 ? in.gate.shape[0] : 0};
    Outputs o;
    o.out = static_cast<float*>(output(ctx, kOut, in.x.shape));
    o.predicted_zero = static_cast<uint8_t*>(output(ctx, kPredictedZero, mask_dims));
    o.computed = static_cast<uint8_t*>(output(ctx, kComputed, mask_dims));
    o.actual_zero = static_cast<uint8_t*>(output(ctx, kActualZero, mask_dims));
    return o;
}

}  // namespace sparseinfer::op
