// The op's CPU kernel: sparse_mlp_cpu.h's functions on onnxruntime's intra-op thread pool, one
// token as the sparse decode step, several tokens densely (prefill), and the counts of what the
// decode steps skipped.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "op_common.h"

namespace sparseinfer::op {

namespace {

// What the CPU kernel skipped, process-wide, since the last reset (sparseinfer_ops_counters):
// decode steps (one per layer and token), rows seen, rows predicted zero, rows computed (+AS).
std::atomic<int64_t> g_counters[4];

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

}  // namespace

OrtStatus* ORT_API_CALL compute_cpu(void* op_kernel, OrtKernelContext* ctx) {
    const auto& kernel = *static_cast<Kernel*>(op_kernel);
    try {
        const Inputs in = read_inputs(ctx, kernel.node);
        const Outputs o = outputs(ctx, in);
        const bool fp16 = in.gate.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
        if (in.tokens == 1)
            fp16 ? compute_decode<half>(ctx, kernel, in, o.out, o.predicted_zero, o.computed, o.actual_zero)
                 : compute_decode<float>(ctx, kernel, in, o.out, o.predicted_zero, o.computed, o.actual_zero);
        else if (in.tokens > 1)
            fp16 ? compute_dense<half>(ctx, kernel, in, o.out) : compute_dense<float>(ctx, kernel, in, o.out);
        return nullptr;
    } catch (const OpError& e) {
        return status_of(e, ORT_INVALID_ARGUMENT);
    } catch (const std::exception& e) {
        return status_of(e, ORT_RUNTIME_EXCEPTION);
    }
}

void read_counters(int64_t* out, bool reset) {
    for (int i = 0; i < 4; ++i) out[i] = reset ? g_counters[i].exchange(0) : g_counters[i].load();
}

}  // namespace sparseinfer::op
