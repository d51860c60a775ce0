// The sparse-MLP op library for onnxruntime: one `SparseMLP` node per layer, domain
// `ai.sparseinfer`, loadable by any host with SessionOptions.register_custom_ops_library.
//
//   inputs : x [..., d] float; W_gate, W_up, W_down^T [k, d] float or float16 (initializers,
//            read in place; fp16 widened exactly, float32 accumulation); W_gate's sign words [k, >= ceil(d/64)] uint64; optionally W_gate's
//            +-1 int8 signs [d, k] (read only by the exports' function bodies, ignored here)
//   attrs  : alpha_milli (eq. 2's alpha in thousandths), activation ("relu" | "fatrelu"),
//            threshold (fatrelu)
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
#include <onnxruntime_c_api.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <exception>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "sparse_mlp_cpu.h"
#ifdef SPARSEINFER_WITH_CUDA
#include "sparse_mlp_cuda.h"
static_assert(sparseinfer::kRelu == SPARSEINFER_ACT_RELU && sparseinfer::kFatRelu == SPARSEINFER_ACT_FATRELU &&
                  sparseinfer::kSilu == SPARSEINFER_ACT_SILU && sparseinfer::kGelu == SPARSEINFER_ACT_GELU &&
                  sparseinfer::kGeluTanh == SPARSEINFER_ACT_GELU_TANH,
              "the CPU kernel's activations and the CUDA launcher's share their codes");
#endif

namespace {

using namespace sparseinfer;

// The C API version asked of the host: the oldest that has every call used here
// (KernelContext_GetScratchBuffer came in onnxruntime 1.18), so any onnxruntime >= 1.18 loads
// the library, whichever headers built it.
constexpr uint32_t kApiVersion = 18;
static_assert(ORT_API_VERSION >= kApiVersion, "onnxruntime headers older than the C API version used");

constexpr const char* kDomain = "ai.sparseinfer";
constexpr const char* kOpName = "SparseMLP";
constexpr size_t kInputs = 6, kRequiredInputs = 5, kOutputs = 4;
enum { kX, kGate, kUp, kDownT, kSigns, kSignsInt8 };
enum { kOut, kPredictedZero, kComputed, kActualZero };

const OrtApi* g_api = nullptr;

// What the CPU kernel skipped, process-wide, since the last reset (sparseinfer_ops_counters):
// decode steps (one per layer and token), rows seen, rows predicted zero, rows computed (+AS).
std::atomic<int64_t> g_counters[4];

struct OpError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

void check(OrtStatus* status) {
    if (!status) return;
    std::string msg = g_api->GetErrorMessage(status);
    g_api->ReleaseStatus(status);
    throw OpError(msg);
}

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

// The node's inputs, checked against each other; d and k from W_gate.
struct Inputs {
    TensorView x, gate, up, down_t, signs;
    int64_t tokens = 0;
};

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
    return in;
}

struct Kernel {
    MlpParams p;
    std::string node;
};

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
        const auto* names_end = std::end(kActivationNames);
        const auto* found = std::find_if(std::begin(kActivationNames), names_end,
                                         [&](const char* name) { return act == name; });
        if (found == names_end) {
            std::string expected;
            for (const char* name : kActivationNames) expected += std::string(expected.empty() ? "" : ", ") + name;
            throw OpError(kernel->node + ": activation '" + act + "' is not supported; expected one of " + expected);
        }
        kernel->p.act = Activation(found - std::begin(kActivationNames));   // silu, gelu: an approximation
        if (kernel->p.act == kFatRelu) {
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

// onnxruntime's intra-op pool: fn(i) for i in [0, total), split into at most `batches`
// contiguous batches (0: one per thread).
template <typename F>
void parallel_for(OrtKernelContext* ctx, size_t total, size_t batches, F&& fn) {
    if (total == 0) return;
    struct Call {
        F* fn;
        std::exception_ptr error;
    } call{&fn, nullptr};
    auto trampoline = [](void* user, size_t i) {
        auto* c = static_cast<Call*>(user);
        try {
            (*c->fn)(i);
        } catch (...) {
            c->error = std::current_exception();
        }
    };
    check(g_api->KernelContext_ParallelFor(ctx, trampoline, total, batches, &call));
    if (call.error) std::rethrow_exception(call.error);
}

constexpr int kRowsPerTask = 32;

// Rows [0, n) in tasks of kRowsPerTask: fn(r0, r1).
template <typename F>
void for_row_blocks(OrtKernelContext* ctx, int n, F&& fn) {
    parallel_for(ctx, (n + kRowsPerTask - 1) / kRowsPerTask, 0, [&](size_t b) {
        const int r0 = int(b) * kRowsPerTask;
        fn(r0, std::min(n, r0 + kRowsPerTask));
    });
}

// The down projection of one token over its listed rows, column blocks as tasks.
template <typename W>
void down(OrtKernelContext* ctx, const MlpParams& p, const W* wt, const std::vector<int32_t>& rows,
          const std::vector<float>& h3, float* out) {
    const int block = down_block(p.d, 2);
    const int tasks = (p.d + block - 1) / block;
    parallel_for(ctx, tasks, tasks, [&](size_t b) {
        const int j0 = int(b) * block;
        down_columns(wt, p.d, rows.data(), h3.data(), int(rows.size()), j0, std::min(p.d, j0 + block), out);
    });
}

// One call's view of the node: the kernel's attributes with the inputs' sizes, and typed pointers.
template <typename W>
struct Layer {
    MlpParams p;
    const float* x;
    const W *w_gate, *w_up, *w_down_t;
    Layer(const Kernel& kernel, const Inputs& in)
        : p(kernel.p), x(static_cast<const float*>(in.x.data)), w_gate(static_cast<const W*>(in.gate.data)),
          w_up(static_cast<const W*>(in.up.data)), w_down_t(static_cast<const W*>(in.down_t.data)) {
        p.k = int(in.gate.shape[0]);
        p.d = int(in.gate.shape[1]);
        p.sign_stride = in.signs.shape[1];
    }
};

template <typename W>
void compute_decode(OrtKernelContext* ctx, const Kernel& kernel, const Inputs& in, float* out, uint8_t* predicted,
                    uint8_t* computed, uint8_t* actual) {
    const Layer<W> layer(kernel, in);
    const MlpParams& p = layer.p;
    const float* x = layer.x;
    const W *w_gate = layer.w_gate, *w_up = layer.w_up, *w_down_t = layer.w_down_t;
    const auto* signs = static_cast<const uint64_t*>(in.signs.data);

    std::vector<uint64_t> x_words((p.d + 63) / 64);
    const int64_t nan_at = pack_signs(x, p.d, x_words.data(), int64_t(x_words.size()));
    if (nan_at >= 0) throw OpError(kernel.node + ": x contains NaN at index " + std::to_string(nan_at));

    std::vector<uint8_t> zero(p.k);
    for_row_blocks(ctx, p.k, [&](int r0, int r1) { predict_rows(p, signs, x_words.data(), r0, r1, zero.data()); });
    std::vector<int32_t> active;
    active.reserve(p.k);
    for (int i = 0; i < p.k; ++i)
        if (!zero[i]) active.push_back(i);

    std::vector<float> z(active.size());
    for_row_blocks(ctx, int(active.size()), [&](int r0, int r1) {
        dot_listed_rows(w_gate, p.d, active.data(), int(active.size()), x, r0, r1, z.data());
    });
    std::vector<int32_t> rows;                 // +AS: rows whose h1 is non-zero compute up and down
    std::vector<float> h1;
    rows.reserve(active.size());
    h1.reserve(active.size());
    for (size_t r = 0; r < active.size(); ++r) {
        const float h = activate(p, z[r]);
        if (h != 0.0f) {
            rows.push_back(active[r]);
            h1.push_back(h);
        }
    }
    std::vector<float> up(rows.size());
    for_row_blocks(ctx, int(rows.size()), [&](int r0, int r1) {
        dot_listed_rows(w_up, p.d, rows.data(), int(rows.size()), x, r0, r1, up.data());
    });
    std::vector<int32_t> down_rows;            // the contract skips rows whose h3 is exactly zero
    std::vector<float> h3;
    for (size_t r = 0; r < rows.size(); ++r) {
        const float h = h1[r] * up[r];
        if (h != 0.0f) {
            down_rows.push_back(rows[r]);
            h3.push_back(h);
        }
    }
    down(ctx, p, w_down_t, down_rows, h3, out);

    g_counters[0] += 1;
    g_counters[1] += p.k;
    g_counters[2] += p.k - int64_t(active.size());
    g_counters[3] += int64_t(rows.size());
    if (predicted) std::memcpy(predicted, zero.data(), zero.size());
    if (computed) {
        std::memset(computed, 0, p.k);
        for (int32_t i : rows) computed[i] = 1;
    }
    if (actual) {
        for_row_blocks(ctx, p.k, [&](int r0, int r1) {
            for (int i = r0; i < r1; ++i) actual[i] = actually_zero(p, dot<W>(w_gate + int64_t(i) * p.d, x, p.d, nullptr));
        });
    }
}

// Several tokens: every row, token by token in the contract's order (a row is read once
// for all tokens while it is in cache).
template <typename W>
void compute_dense(OrtKernelContext* ctx, const Kernel& kernel, const Inputs& in, float* out) {
    const Layer<W> layer(kernel, in);
    const MlpParams& p = layer.p;
    const int n = int(in.tokens);
    const float* x = layer.x;
    const W *w_gate = layer.w_gate, *w_up = layer.w_up, *w_down_t = layer.w_down_t;
    for (int64_t j = 0; j < int64_t(n) * p.d; ++j)
        if (x[j] != x[j])
            throw OpError(kernel.node + ": x contains NaN at token " + std::to_string(j / p.d) + ", index " +
                          std::to_string(j % p.d));
    // x interleaved kTokens tokens at a time (a short last group padded with zeros, results dropped)
    std::vector<float> xi(size_t((n + kTokens - 1) / kTokens) * p.d * kTokens, 0.0f);
    for (int t = 0; t < n; ++t)
        for (int j = 0; j < p.d; ++j) xi[(size_t(t / kTokens) * p.d + j) * kTokens + t % kTokens] = x[int64_t(t) * p.d + j];
    std::vector<float> h3(size_t(n) * p.k);    // [token, row]
    for_row_blocks(ctx, p.k, [&](int r0, int r1) {
        for (int g0 = 0; g0 < n; g0 += kTokens) {
            const float* xs[kTokens];
            for (int t = 0; t < kTokens; ++t) xs[t] = g0 + t < n ? x + int64_t(g0 + t) * p.d : nullptr;
            const float* group = xi.data() + size_t(g0 / kTokens) * p.d * kTokens;
            for (int i = r0; i < r1; ++i) {
                float z[kTokens], zu[kTokens];
                dot_row_tokens<W>(w_gate + int64_t(i) * p.d, group, xs, p.d, z);
                dot_row_tokens<W>(w_up + int64_t(i) * p.d, group, xs, p.d, zu);
                for (int t = 0; t < kTokens && g0 + t < n; ++t) {
                    const float h = activate(p, z[t]);
                    h3[size_t(g0 + t) * p.k + i] = h != 0.0f ? h * zu[t] : 0.0f;
                }
            }
        }
    });
    // the down projection in the same groups of tokens x column blocks: W_down^T read once per group
    const int block = down_block(p.d, 2);
    const int blocks = (p.d + block - 1) / block, groups = (n + kTokens - 1) / kTokens;
    parallel_for(ctx, size_t(blocks) * groups, 0, [&](size_t b) {
        const int j0 = int(b % blocks) * block, t0 = int(b / blocks) * kTokens;
        down_columns_tokens(w_down_t, p.d, p.k, h3.data() + size_t(t0) * p.k, std::min(kTokens, n - t0), j0,
                            std::min(p.d, j0 + block), out + int64_t(t0) * p.d);
    });
}

OrtStatus* status_of(const std::exception& e, OrtErrorCode code) { return g_api->CreateStatus(code, e.what()); }

OrtStatus* ORT_API_CALL compute_cpu(void* op_kernel, OrtKernelContext* ctx) {
    const auto& kernel = *static_cast<Kernel*>(op_kernel);
    try {
        Inputs in = read_inputs(ctx, kernel.node);
        if (in.x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
            throw OpError(kernel.node + ": x must be float32");
        const int64_t k = in.gate.shape[0];
        auto* out = static_cast<float*>(output(ctx, kOut, in.x.shape));
        const std::vector<int64_t> mask_dims{in.tokens == 1 ? k : 0};
        auto* predicted = static_cast<uint8_t*>(output(ctx, kPredictedZero, mask_dims));
        auto* computed = static_cast<uint8_t*>(output(ctx, kComputed, mask_dims));
        auto* actual = static_cast<uint8_t*>(output(ctx, kActualZero, mask_dims));
        const bool fp16 = in.gate.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
        if (in.tokens == 1)
            fp16 ? compute_decode<half>(ctx, kernel, in, out, predicted, computed, actual)
                 : compute_decode<float>(ctx, kernel, in, out, predicted, computed, actual);
        else if (in.tokens > 1)
            fp16 ? compute_dense<half>(ctx, kernel, in, out) : compute_dense<float>(ctx, kernel, in, out);
        return nullptr;
    } catch (const OpError& e) {
        return status_of(e, ORT_INVALID_ARGUMENT);
    } catch (const std::exception& e) {
        return status_of(e, ORT_RUNTIME_EXCEPTION);
    }
}

#ifdef SPARSEINFER_WITH_CUDA
OrtStatus* ORT_API_CALL compute_cuda(void* op_kernel, OrtKernelContext* ctx) {
    const auto& kernel = *static_cast<Kernel*>(op_kernel);
    OrtMemoryInfo* mem = nullptr;
    OrtAllocator* alloc = nullptr;
    void* scratch = nullptr;
    try {
        Inputs in = read_inputs(ctx, kernel.node);
        if (in.x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw OpError(kernel.node + ": x must be float32");
        const int64_t k = in.gate.shape[0], d = in.gate.shape[1];
        const std::vector<int64_t> mask_dims{in.tokens == 1 ? k : 0};
        SparseMlpCudaArgs a{};
        a.x = static_cast<const float*>(in.x.data);
        a.w_gate = in.gate.data;
        a.w_up = in.up.data;
        a.w_down_t = in.down_t.data;
        a.weight_dtype = in.gate.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? SPARSEINFER_WEIGHTS_FP16
                                                                               : SPARSEINFER_WEIGHTS_FP32;
        a.w_signs = static_cast<const uint32_t*>(in.signs.data);
        a.sign_stride = 2 * in.signs.shape[1];
        a.n_tokens = int(in.tokens);
        a.d = int(d);
        a.k = int(k);
        a.alpha_milli = kernel.p.alpha_milli;
        a.activation = int(kernel.p.act);      // the same codes (static_asserts below)
        a.threshold = kernel.p.threshold;
        a.out = static_cast<float*>(output(ctx, kOut, in.x.shape));
        a.predicted_zero = static_cast<uint8_t*>(output(ctx, kPredictedZero, mask_dims));
        a.computed = static_cast<uint8_t*>(output(ctx, kComputed, mask_dims));
        a.actual_zero = static_cast<uint8_t*>(output(ctx, kActualZero, mask_dims));
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
#endif

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

// The instruction-set extensions this build was compiled for (g++ -march=native on the building
// machine), checked against the running CPU before any kernel is registered, so that a library
// copied beside an export and loaded on an older CPU fails to register with a message instead of
// stopping the host on an illegal instruction. Compiled for baseline x86-64 itself.
// SPARSEINFER_REQUIRE_CPU_FEATURE adds one more (a __builtin_cpu_supports name) to test the path.
#if defined(__x86_64__)
__attribute__((target("arch=x86-64"))) const char* missing_cpu_feature() {
    __builtin_cpu_init();
#ifdef SPARSEINFER_REQUIRE_CPU_FEATURE
    if (!__builtin_cpu_supports(SPARSEINFER_REQUIRE_CPU_FEATURE)) return SPARSEINFER_REQUIRE_CPU_FEATURE;
#endif
#ifdef __AVX512F__
    if (!__builtin_cpu_supports("avx512f")) return "avx512f";
#endif
#ifdef __AVX512BW__
    if (!__builtin_cpu_supports("avx512bw")) return "avx512bw";
#endif
#ifdef __AVX512VL__
    if (!__builtin_cpu_supports("avx512vl")) return "avx512vl";
#endif
#ifdef __AVX2__
    if (!__builtin_cpu_supports("avx2")) return "avx2";
#endif
#ifdef __FMA__
    if (!__builtin_cpu_supports("fma")) return "fma";
#endif
#ifdef __AVX__
    if (!__builtin_cpu_supports("avx")) return "avx";
#endif
#ifdef __BMI2__
    if (!__builtin_cpu_supports("bmi2")) return "bmi2";
#endif
#ifdef __F16C__
    if (!__builtin_cpu_supports("f16c")) return "f16c";
#endif
#ifdef __POPCNT__
    if (!__builtin_cpu_supports("popcnt")) return "popcnt";
#endif
#ifdef __SSE4_2__
    if (!__builtin_cpu_supports("sse4.2")) return "sse4.2";
#endif
    return nullptr;
}
#else
const char* missing_cpu_feature() { return nullptr; }
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
SPARSEINFER_EXPORT void sparseinfer_ops_counters(int64_t* out, int reset) {
    for (int i = 0; i < 4; ++i) out[i] = reset ? g_counters[i].exchange(0) : g_counters[i].load();
}

SPARSEINFER_EXPORT int sparseinfer_ops_has_cuda() {
#ifdef SPARSEINFER_WITH_CUDA
    return 1;
#else
    return 0;
#endif
}

}  // extern "C"
