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

std::string shape_text(const std::vector<int64_t>& s) {
    std::string out = "[";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + "]";
}

TensorView input(OrtKernelContext* ctx, size_t index, const std::string& node, const char* name) {
    const OrtValue* value = nullptr;
    check(g_api->KernelContext_GetInput(ctx, index, &value));
    if (!value) throw OpError(node + ": input " + name + " is missing");
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

std::string node_label(const OrtKernelInfo* info, const char* op_type) {
    size_t len = 0;
    check(g_api->KernelInfo_GetNodeName(info, nullptr, &len));
    std::string name(len, '\0');
    check(g_api->KernelInfo_GetNodeName(info, name.data(), &len));
    name.resize(len ? len - 1 : 0);
    return std::string(op_type) + " node '" + name + "'";
}

bool string_attribute(const OrtKernelInfo* info, const char* name, std::string* value) {
    size_t len = 0;
    if (OrtStatus* absent = g_api->KernelInfoGetAttribute_string(info, name, nullptr, &len)) {
        g_api->ReleaseStatus(absent);
        return false;
    }
    value->assign(len, '\0');
    check(g_api->KernelInfoGetAttribute_string(info, name, value->data(), &len));
    value->resize(len ? len - 1 : 0);
    return true;
}

WeightFormat block_format_named(const std::string& node, const char* attr, const std::string& value) {
    std::string expected;
    for (WeightFormat f : kBlockFormats) {
        if (value == format_name(f)) return f;
        expected += std::string(expected.empty() ? "" : ", ") + format_name(f);
    }
    throw OpError(node + ": " + attr + " '" + value + "' is not a supported block format; expected one of " +
                  expected);
}

int64_t block_row_bytes(const std::string& node, const TensorView& x, WeightFormat format) {
    if (x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw OpError(node + ": x must be float32");
    if (x.shape.empty()) throw OpError(node + ": x must have a last axis d, got a scalar");
    const int64_t d = x.shape.back();
    if (d < kBlock || d % kBlock || d > INT32_MAX)
        throw OpError(node + ": x has shape " + shape_text(x.shape) + "; its last axis d must be a positive multiple "
                      "of " + std::to_string(kBlock) + " (whole " + format_name(format) + " blocks) below 2^31");
    return d / kBlock * block_bytes(format);
}

void check_block_weights(const std::string& node, const char* name, const TensorView& w, int64_t rows,
                         const char* rows_name, int64_t row_bytes, int64_t d, WeightFormat format) {
    const bool rows_ok = w.shape.size() == 2 && (rows < 0 ? w.shape[0] >= 1 && w.shape[0] <= INT32_MAX
                                                         : w.shape[0] == rows);
    if (w.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || !rows_ok || w.shape[1] != row_bytes)
        throw OpError(node + ": " + name + " is " + (w.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 ? "uint8 " : "") +
                      shape_text(w.shape) + "; expected uint8 [" + (rows < 0 ? rows_name : std::to_string(rows)) + ", " +
                      std::to_string(row_bytes) + "]: d = " + std::to_string(d) + " in " + format_name(format) +
                      " blocks of " + std::to_string(block_bytes(format)) + " bytes per 32 weights");
}

namespace {

const char* const kInputNames[] = {"x", "W_gate", "W_up", "W_down^T", "sign words"};

// Float weights: W_gate [k, d] float32 or float16, W_up and W_down^T alike; d from W_gate.
void check_float_weights(const std::string& node, Inputs& in) {
    if (in.gate.shape.size() != 2) throw OpError(node + ": W_gate must be [k, d], got " + shape_text(in.gate.shape));
    if (in.gate.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && in.gate.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
        throw OpError(node + ": W_gate must be float32 or float16" +
                      (in.gate.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 ? " (uint8 blocks need the weight_format "
                                                                             "attribute)" : ""));
    for (const TensorView* w : {&in.up, &in.down_t})
        if (w->type != in.gate.type)
            throw OpError(node + ": " + (w == &in.up ? "W_up" : "W_down^T") + " has another element type than W_gate");
    in.k = in.gate.shape[0];
    in.d = in.gate.shape[1];
    if (in.k < 1 || in.d < 1 || in.k > INT32_MAX || in.d > INT32_MAX)
        throw OpError(node + ": W_gate has shape " + shape_text(in.gate.shape) + "; k and d must be in [1, 2^31)");
    for (const TensorView* w : {&in.up, &in.down_t})
        if (w->shape != in.gate.shape)
            throw OpError(node + ": " + (w == &in.up ? "W_up" : "W_down^T") + " has shape " + shape_text(w->shape) +
                          "; expected " + shape_text(in.gate.shape) + " like W_gate");
    if (in.x.shape.empty() || in.x.shape.back() != in.d)
        throw OpError(node + ": x has shape " + shape_text(in.x.shape) + "; its last axis must be d = " +
                      std::to_string(in.d));
    if (in.x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw OpError(node + ": x must be float32");
}

// Block-quantized weights: uint8 rows of whole blocks along d = x's last axis.
void check_quantized_weights(const Kernel& kernel, Inputs& in) {
    const int64_t row_bytes = block_row_bytes(kernel.node, in.x, kernel.weights);
    in.d = in.x.shape.back();
    in.k = in.gate.shape.size() == 2 ? in.gate.shape[0] : 0;
    check_block_weights(kernel.node, "W_gate", in.gate, -1, "k", row_bytes, in.d, kernel.weights);
    check_block_weights(kernel.node, "W_up", in.up, in.k, "k", row_bytes, in.d, kernel.weights);
    check_block_weights(kernel.node, "W_down^T", in.down_t, in.k, "k", in.d / kBlock * block_bytes(kernel.down), in.d,
                        kernel.down);
}

}  // namespace

Inputs read_inputs(OrtKernelContext* ctx, const Kernel& kernel) {
    const std::string& node = kernel.node;
    size_t count = 0;
    check(g_api->KernelContext_GetInputCount(ctx, &count));
    if (count < kRequiredInputs) throw OpError(node + ": needs inputs x, W_gate, W_up, W_down^T, sign words");
    Inputs in;
    TensorView* slots[] = {&in.x, &in.gate, &in.up, &in.down_t, &in.signs};
    for (size_t i = 0; i < kRequiredInputs; ++i) *slots[i] = input(ctx, i, node, kInputNames[i]);
    if (kernel.weights == FORMAT_FLOAT) check_float_weights(node, in);
    else check_quantized_weights(kernel, in);
    if (in.signs.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64) throw OpError(node + ": sign words must be uint64");
    if (in.signs.shape.size() != 2 || in.signs.shape[0] != in.k || in.signs.shape[1] < (in.d + 63) / 64)
        throw OpError(node + ": sign words have shape " + shape_text(in.signs.shape) + "; expected [" +
                      std::to_string(in.k) + ", >= " + std::to_string((in.d + 63) / 64) + "] uint64");
    in.tokens = in.x.size() / in.d;
    return in;
}

Kernel* make_kernel(const OrtKernelInfo* info) {
    auto* kernel = new Kernel;
    try {
        kernel->node = node_label(info, kOpName);
        int64_t alpha = 0;
        check(g_api->KernelInfoGetAttribute_int64(info, "alpha_milli", &alpha));
        if (alpha < 1 || alpha > SPARSEINFER_MAX_ALPHA_MILLI)     // reference/alpha.py's range, passed by the build
            throw OpError(kernel->node + ": alpha_milli " + std::to_string(alpha) + " is outside [1, " +
                          std::to_string(SPARSEINFER_MAX_ALPHA_MILLI) + "]");
        kernel->p.alpha_milli = int(alpha);
        std::string act;
        if (!string_attribute(info, "activation", &act)) throw OpError(kernel->node + ": needs the activation attribute");
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
        // weight_format absent or "": float weights; down_format absent or "": weight_format's
        std::string fmt, down;
        if (string_attribute(info, "weight_format", &fmt) && !fmt.empty())
            kernel->weights = kernel->down = block_format_named(kernel->node, "weight_format", fmt);
        if (string_attribute(info, "down_format", &down) && !down.empty()) {
            if (kernel->weights == FORMAT_FLOAT)
                throw OpError(kernel->node + ": down_format '" + down + "' needs a weight_format (float weights have "
                              "none)");
            kernel->down = block_format_named(kernel->node, "down_format", down);
        }
        int64_t dense = 0;
        if (OrtStatus* absent = g_api->KernelInfoGetAttribute_int64(info, "dense", &dense)) g_api->ReleaseStatus(absent);
        if (dense != 0 && dense != 1) throw OpError(kernel->node + ": dense is " + std::to_string(dense) + "; expected 0 or 1");
        kernel->dense = dense == 1;
        // accuracy_level as MatMulNBits': 0 / 1 float32 activations, 4 int8 (block formats only)
        int64_t level = 0;
        if (OrtStatus* absent = g_api->KernelInfoGetAttribute_int64(info, "accuracy_level", &level))
            g_api->ReleaseStatus(absent);
        if (level != 0 && level != 1 && level != kInt8Activations)
            throw OpError(kernel->node + ": accuracy_level is " + std::to_string(level) + "; expected 0 or 1 (float32 "
                          "activations) or 4 (int8 activations)");
        if (level == kInt8Activations && kernel->weights == FORMAT_FLOAT)
            throw OpError(kernel->node + ": accuracy_level 4 (int8 activations) needs a block weight_format");
        kernel->int8_activations = level == kInt8Activations;
    } catch (...) {
        delete kernel;
        throw;
    }
    return kernel;
}

Outputs outputs(OrtKernelContext* ctx, const Inputs& in, const Kernel& kernel) {
    const std::vector<int64_t> mask_dims{in.tokens == 1 && !kernel.dense ? in.k : 0};
    Outputs o;
    o.out = static_cast<float*>(output(ctx, kOut, in.x.shape));
    o.predicted_zero = static_cast<uint8_t*>(output(ctx, kPredictedZero, mask_dims));
    o.computed = static_cast<uint8_t*>(output(ctx, kComputed, mask_dims));
    o.actual_zero = static_cast<uint8_t*>(output(ctx, kActualZero, mask_dims));
    return o;
}

}  // namespace sparseinfer::op
