// The op's CPU kernel: sparse_mlp_cpu.h's functions (float weights) or block_quant_cpu.h's
// (block-quantized weights) on onnxruntime's intra-op thread pool, one token as the sparse
// decode step, several tokens (or a dense node) densely, and the counts of what the decode
// steps skipped.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "op_common.h"

namespace sparseinfer::op {

namespace {

// What the CPU kernel skipped, process-wide, since the last reset (sparseinfer_ops_counters):
// decode steps (one per layer and token), rows seen, rows predicted zero, rows computed (+AS).
std::atomic<int64_t> g_counters[4];

// A layer's three matrices and what the kernel does with a row of them, for float weights W
// [k, d] (float or half). BlockRows below is the same for block-quantized rows.
template <typename W>
struct FloatRows {
    const W *gate, *up, *down_t;
    int d;
    static constexpr int kColumnStep = kCacheLine / sizeof(float);   // down tasks: whole cache lines

    // z[r] = w[rows[r]] . x for r in [r0, r1) of the n listed rows (`next`: BlockRows's; float rows
    // keep their own prefetching)
    void dots(const W* w, const int32_t* rows, int n, const float* x, int r0, int r1, float* z,
              const Upcoming& = {}) const {
        dot_listed_rows(w, d, rows, n, x, r0, r1, z);
    }
    Upcoming up_rows(const int32_t*, int) const { return {}; }
    Upcoming down_rows(const int32_t*, int) const { return {}; }
    float dot_row(const W* w, int i, const float* x) const { return dot<W>(w + int64_t(i) * d, x, d, nullptr); }
    FloatRows for_token(const float*) const { return *this; }
    // The prefill's x [n, d] and its tokens interleaved kTokens at a time (dot_row_tokens; a short
    // last group padded with zeros, its results dropped).
    struct TokensX {
        const float* x;
        int n;
        std::vector<float> xi;
    };
    TokensX tokens_x(const float* x, int n) const {
        TokensX tx{x, n, std::vector<float>(size_t((n + kTokens - 1) / kTokens) * d * kTokens, 0.0f)};
        for (int t = 0; t < n; ++t)
            for (int j = 0; j < d; ++j) tx.xi[(size_t(t / kTokens) * d + j) * kTokens + t % kTokens] = x[int64_t(t) * d + j];
        return tx;
    }
    // zg[t * (r1 - r0) + i - r0], zu[...] = W_gate[i] . x_t, W_up[i] . x_t for rows [r0, r1), every
    // token: kTokens tokens at a time, row by row (a row is read once for them while in cache)
    void gate_up_tokens(const TokensX& tx, int r0, int r1, float* zg, float* zu) const {
        for (int g0 = 0; g0 < tx.n; g0 += kTokens) {
            const float* xs[kTokens];
            for (int t = 0; t < kTokens; ++t) xs[t] = g0 + t < tx.n ? tx.x + int64_t(g0 + t) * d : nullptr;
            const float* group = tx.xi.data() + size_t(g0 / kTokens) * d * kTokens;
            for (int i = r0; i < r1; ++i) {
                float z[kTokens], zz[kTokens];
                dot_row_tokens<W>(gate + int64_t(i) * d, group, xs, d, z);
                dot_row_tokens<W>(up + int64_t(i) * d, group, xs, d, zz);
                for (int t = 0; t < kTokens && g0 + t < tx.n; ++t) {
                    zg[size_t(g0 + t) * (r1 - r0) + i - r0] = z[t];
                    zu[size_t(g0 + t) * (r1 - r0) + i - r0] = zz[t];
                }
            }
        }
    }
    void down(const int32_t* rows, const float* h3, int n, int j0, int j1, float* out) const {
        down_columns(down_t, d, rows, h3, n, j0, j1, out);
    }
    void down_tokens(int k, const float* h3, int n_tokens, int j0, int j1, float* out) const {
        down_columns_tokens(down_t, d, k, h3, n_tokens, j0, j1, out);
    }
};

// W_gate and W_up in block format F, W_down^T in `down_format`: uint8 rows of d / 32 blocks. With
// `qx` (int8 activations) the gate and up rows' dot products take x quantized (for_token), the x
// passed to dots / dot_row being the same token's.
template <typename F>
struct BlockRows {
    const uint8_t *gate, *up, *down_t;
    int d;
    WeightFormat down_format;
    const std::string* node = nullptr;                                 // for messages
    bool int8_activations = false;
    std::shared_ptr<const QuantizedX> qx;
    static constexpr int kColumnStep = kBlock;                         // down tasks: whole blocks

    // This node's rows for one token x: with int8 activations x quantized once here.
    BlockRows for_token(const float* x) const {
        BlockRows m = *this;
        if (int8_activations) m.qx = std::make_shared<const QuantizedX>(quantized(x, 0));
        return m;
    }
    QuantizedX quantized(const float* x, int64_t token) const {
        QuantizedX q;
        const int64_t bad = quantize_x(x, d, code_offset<F>(), q);
        if (bad >= 0)
            throw OpError(*node + ": x has " + std::to_string(x[bad]) + " at token " + std::to_string(token) +
                          ", index " + std::to_string(bad) + "; int8 activations (accuracy_level 4) need a finite x");
        return q;
    }
    // z[r] = w[rows[r]] . x for r in [r0, r1) of the n listed rows; `next`: the rows the token's
    // next phase starts with, prefetched as these run out.
    void dots(const uint8_t* w, const int32_t* rows, int n, const float* x, int r0, int r1, float* z,
              const Upcoming& next = {}) const {
        if (qx) dot_q8_listed<F>(w, d, rows, n, *qx, r0, r1, z, next);
        else dot_q_listed<F>(w, d, rows, n, x, r0, r1, z, next);
    }
    // The first of the listed rows of W_up, of W_down^T (the next phases' Upcoming)
    Upcoming up_rows(const int32_t* rows, int n) const { return upcoming_rows(up, row_bytes_q<F>(d), rows, n); }
    Upcoming down_rows(const int32_t* rows, int n) const {
        return upcoming_rows(down_t, int64_t(d / kBlock) * block_bytes(down_format), rows, n);
    }
    float dot_row(const uint8_t* w, int i, const float* x) const {
        const int32_t row = i;
        float z;
        dots(w, &row, 1, x, 0, 1, &z);
        return z;
    }
    struct TokensX {                                                   // x [n, d] as it is (and quantized)
        const float* x;
        int n;
        std::vector<QuantizedX> q;
    };
    TokensX tokens_x(const float* x, int n) const {
        TokensX tx{x, n, {}};
        for (int t = 0; int8_activations && t < n; ++t) tx.q.push_back(quantized(x + int64_t(t) * d, t));
        return tx;
    }
    void gate_up_tokens(const TokensX& tx, int r0, int r1, float* zg, float* zu) const {
        if (int8_activations) {
            dot_q8_tokens<F>(gate, d, r0, r1, tx.q.data(), tx.n, zg, r1 - r0);
            dot_q8_tokens<F>(up, d, r0, r1, tx.q.data(), tx.n, zu, r1 - r0);
            return;
        }
        dot_q_tokens<F>(gate, d, r0, r1, tx.x, tx.n, zg, r1 - r0);
        dot_q_tokens<F>(up, d, r0, r1, tx.x, tx.n, zu, r1 - r0);
    }
    void down(const int32_t* rows, const float* h3, int n, int j0, int j1, float* out) const {
        with_block_format(down_format, [&](auto f) {
            down_columns_q<decltype(f)>(down_t, d, rows, h3, n, j0, j1, out);
        });
    }
    void down_tokens(int k, const float* h3, int n_tokens, int j0, int j1, float* out) const {
        with_block_format(down_format, [&](auto f) {
            down_columns_tokens_q<decltype(f)>(down_t, d, k, h3, n_tokens, j0, j1, out);
        });
    }
};

// fn(rows) for the node's weights: FloatRows<float>, FloatRows<half> or BlockRows<F>.
template <typename Fn>
void with_rows(const Kernel& kernel, const Inputs& in, Fn&& fn) {
    const int d = int(in.d);
    if (kernel.weights != FORMAT_FLOAT) {
        with_block_format(kernel.weights, [&](auto f) {
            fn(BlockRows<decltype(f)>{static_cast<const uint8_t*>(in.gate.data), static_cast<const uint8_t*>(in.up.data),
                                      static_cast<const uint8_t*>(in.down_t.data), d, kernel.down, &kernel.node,
                                      kernel.int8_activations, nullptr});
        });
    } else if (in.gate.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
        fn(FloatRows<half>{static_cast<const half*>(in.gate.data), static_cast<const half*>(in.up.data),
                           static_cast<const half*>(in.down_t.data), d});
    } else {
        fn(FloatRows<float>{static_cast<const float*>(in.gate.data), static_cast<const float*>(in.up.data),
                            static_cast<const float*>(in.down_t.data), d});
    }
}

MlpParams params(const Kernel& kernel, const Inputs& in) {
    MlpParams p = kernel.p;
    p.k = int(in.k);
    p.d = int(in.d);
    p.sign_stride = in.signs.shape[1];
    return p;
}

// The down projection of one token over its listed rows, column blocks as tasks.
template <typename Rows>
void down(OrtKernelContext* ctx, const MlpParams& p, const Rows& m, const std::vector<int32_t>& rows,
          const std::vector<float>& h3, float* out) {
    const int block = down_block(p.d, 2, Rows::kColumnStep);
    const int tasks = (p.d + block - 1) / block;
    parallel_for(ctx, tasks, tasks, [&](size_t b) {
        const int j0 = int(b) * block;
        m.down(rows.data(), h3.data(), int(rows.size()), j0, std::min(p.d, j0 + block), out);
    });
}

// What one token's row phase found, per row of the layer.
struct RowPhase {
    std::vector<uint8_t> zero;      // predicted zero (all 0 without the predictor)
    std::vector<uint8_t> computed;  // up was computed
    std::vector<float> h3;          // h1 * up; 0 where not computed
    explicit RowPhase(int k) : zero(k), computed(k), h3(k) {}
};

constexpr int kDecodeRowsPerTask = 256;        // a dense node's row tasks
constexpr int kChunkRows = DOWN_ROW_CHUNK;      // a sparse token's tasks: one chunk of the down projection each
static_assert(kDecodeRowsPerTask <= kChunkRows, "row_phase's buffers hold a chunk");

// The row phase of one token for rows [r0, r1) (at most kChunkRows), one task: the predictor
// (with `signs`, else every row kept), the gate rows kept, then the up rows: those whose
// h1 != 0 (+AS), or every kept row with `every_up` (the dense MLP reads every row).
template <typename Rows>
void row_phase(const MlpParams& p, const Rows& m, const float* x, const uint64_t* signs, const uint64_t* x_words,
               bool every_up, int r0, int r1, RowPhase& out) {
    if (signs) predict_rows(p, signs, x_words, r0, r1, out.zero.data());
    int32_t kept[kChunkRows] = {}, live[kChunkRows] = {};     // (zeroed: g++ cannot see that only n are read)
    float z[kChunkRows], h1[kChunkRows], up[kChunkRows];
    int n_kept = 0, n_live = 0;
    for (int i = r0; i < r1; ++i)
        if (!out.zero[i]) kept[n_kept++] = i;
    m.dots(m.gate, kept, n_kept, x, 0, n_kept, z, m.up_rows(kept, n_kept));   // (most kept rows are live)
    for (int r = 0; r < n_kept; ++r) {
        const float h = activate(p, z[r]);
        if (h != 0.0f || every_up) live[n_live] = kept[r], h1[n_live++] = h;
    }
    m.dots(m.up, live, n_live, x, 0, n_live, up, m.down_rows(live, n_live));
    for (int r = 0; r < n_live; ++r) {
        out.computed[live[r]] = 1;
        out.h3[live[r]] = h1[r] != 0.0f ? h1[r] * up[r] : 0.0f;
    }
}

template <typename Rows>
void all_row_phases(OrtKernelContext* ctx, const MlpParams& p, const Rows& m, const float* x, const uint64_t* signs,
                    const uint64_t* x_words, bool every_up, RowPhase& out) {
    const int tasks = (p.k + kDecodeRowsPerTask - 1) / kDecodeRowsPerTask;
    parallel_for(ctx, tasks, 0, [&](size_t b) {
        const int r0 = int(b) * kDecodeRowsPerTask;
        row_phase(p, m, x, signs, x_words, every_up, r0, std::min(p.k, r0 + kDecodeRowsPerTask), out);
    });
}

// x's sign words; an OpError naming the node where x holds a NaN.
std::vector<uint64_t> sign_words_of_x(const Kernel& kernel, const MlpParams& p, const float* x) {
    std::vector<uint64_t> words((p.d + 63) / 64);
    const int64_t nan_at = pack_signs(x, p.d, words.data(), int64_t(words.size()));
    if (nan_at >= 0) throw OpError(kernel.node + ": x contains NaN at index " + std::to_string(nan_at));
    return words;
}

// One token, sparse: the sign predictor, the gate rows it keeps, the up rows whose h1 != 0
// (+AS), the down rows whose h3 != 0. One parallel phase, a task per chunk of the down
// projection's rows: the chunk's predictor, gate and up rows, then its partial over every
// column (from +0.0, as the contract's walk starts each chunk), while the rows just read are
// in cache and with no wait between the phases. The partials are then added in chunk order
// (chunks with no row skipped), which is the contract's sum bit for bit: the walk adds each
// chunk's partial to a total that starts at +0.0, and a chunk's partial here is that partial
// plus +0.0 (the same, but for a -0.0 turned +0.0, which a total that is never -0.0 adds the same).
template <typename Rows>
void compute_decode(OrtKernelContext* ctx, const Kernel& kernel, const Inputs& in, const Rows& node_rows,
                    const Outputs& o) {
    const MlpParams p = params(kernel, in);
    const auto* x = static_cast<const float*>(in.x.data);
    const std::vector<uint64_t> x_words = sign_words_of_x(kernel, p, x);
    const Rows m = node_rows.for_token(x);
    const auto* signs = static_cast<const uint64_t*>(in.signs.data);
    RowPhase rows(p.k);
    const int chunks = (p.k + kChunkRows - 1) / kChunkRows;
    const std::unique_ptr<float[]> partials(new float[size_t(chunks) * p.d]);     // written before read
    std::vector<uint8_t> has_rows(chunks);
    parallel_for(ctx, chunks, chunks, [&](size_t c) {
        const int r0 = int(c) * kChunkRows, r1 = std::min(p.k, r0 + kChunkRows);
        row_phase(p, m, x, signs, x_words.data(), false, r0, r1, rows);
        int32_t down_rows[kChunkRows];          // the contract skips rows whose h3 is exactly zero
        float h3[kChunkRows];
        int n = 0;
        for (int i = r0; i < r1; ++i)
            if (rows.h3[i] != 0.0f) down_rows[n] = i, h3[n++] = rows.h3[i];
        has_rows[c] = n > 0;
        if (n) m.down(down_rows, h3, n, 0, p.d, partials.get() + size_t(c) * p.d);
    });
    const int block = down_block(p.d, 2, Rows::kColumnStep);
    parallel_for(ctx, (p.d + block - 1) / block, 0, [&](size_t b) {
        const int j0 = int(b) * block, j1 = std::min(p.d, j0 + block);
        std::fill(o.out + j0, o.out + j1, 0.0f);
        for (int c = 0; c < chunks; ++c)
            if (has_rows[c]) add_in_place(o.out + j0, partials.get() + size_t(c) * p.d + j0, size_t(j1 - j0));
    });
    int64_t skipped = 0, computed = 0;
    for (int i = 0; i < p.k; ++i) {
        skipped += rows.zero[i];
        computed += rows.computed[i];
    }

    g_counters[0] += 1;
    g_counters[1] += p.k;
    g_counters[2] += skipped;
    g_counters[3] += computed;
    if (o.predicted_zero) std::memcpy(o.predicted_zero, rows.zero.data(), p.k);
    if (o.computed) std::memcpy(o.computed, rows.computed.data(), p.k);
    if (o.actual_zero) {
        for_row_blocks(ctx, p.k, [&](int r0, int r1) {
            for (int i = r0; i < r1; ++i) o.actual_zero[i] = actually_zero(p, m.dot_row(m.gate, i, x));
        });
    }
}

// One token, dense (a dense node): every row of W_gate, W_up and W_down^T is read, in the
// decode's two phases; rows whose h3 is zero add +-0.0 in the down projection, which leaves
// every sum's bits as the contract's skipping does.
template <typename Rows>
void compute_dense_token(OrtKernelContext* ctx, const Kernel& kernel, const Inputs& in, const Rows& node_rows,
                         float* out) {
    const MlpParams p = params(kernel, in);
    const auto* x = static_cast<const float*>(in.x.data);
    sign_words_of_x(kernel, p, x);              // the NaN check
    const Rows m = node_rows.for_token(x);
    RowPhase rows(p.k);
    all_row_phases(ctx, p, m, x, nullptr, nullptr, true, rows);
    std::vector<int32_t> every(p.k);
    for (int i = 0; i < p.k; ++i) every[i] = i;
    down(ctx, p, m, every, rows.h3, out);
}

// Every token densely: every row, token by token in the contract's order (each task's rows
// for all the tokens, as Rows::gate_up_tokens reads them).
template <typename Rows>
void compute_dense(OrtKernelContext* ctx, const Kernel& kernel, const Inputs& in, const Rows& m, float* out) {
    const MlpParams p = params(kernel, in);
    const int n = int(in.tokens);
    const auto* x = static_cast<const float*>(in.x.data);
    for (int64_t j = 0; j < int64_t(n) * p.d; ++j)
        if (x[j] != x[j])
            throw OpError(kernel.node + ": x contains NaN at token " + std::to_string(j / p.d) + ", index " +
                          std::to_string(j % p.d));
    const auto tokens = m.tokens_x(x, n);
    std::vector<float> h3(size_t(n) * p.k);    // [token, row]
    for_row_blocks(ctx, p.k, [&](int r0, int r1) {
        const int rows = r1 - r0;
        std::vector<float> z(size_t(n) * rows), zu(size_t(n) * rows);    // [token, row - r0]
        m.gate_up_tokens(tokens, r0, r1, z.data(), zu.data());
        for (int t = 0; t < n; ++t)
            for (int i = r0; i < r1; ++i) {
                const float h = activate(p, z[size_t(t) * rows + i - r0]);
                h3[size_t(t) * p.k + i] = h != 0.0f ? h * zu[size_t(t) * rows + i - r0] : 0.0f;
            }
    });
    // the down projection in the same groups of tokens x column blocks: W_down^T read once per group
    const int block = down_block(p.d, 2, Rows::kColumnStep);
    const int blocks = (p.d + block - 1) / block, groups = (n + kTokens - 1) / kTokens;
    parallel_for(ctx, size_t(blocks) * groups, 0, [&](size_t b) {
        const int j0 = int(b % blocks) * block, t0 = int(b / blocks) * kTokens;
        m.down_tokens(p.k, h3.data() + size_t(t0) * p.k, std::min(kTokens, n - t0), j0, std::min(p.d, j0 + block),
                      out + int64_t(t0) * p.d);
    });
}

}  // namespace

OrtStatus* ORT_API_CALL compute_cpu(void* op_kernel, OrtKernelContext* ctx) {
    const auto& kernel = *static_cast<Kernel*>(op_kernel);
    try {
        const Inputs in = read_inputs(ctx, kernel);
        const Outputs o = outputs(ctx, in, kernel);
        if (in.tokens == 0) return nullptr;
        with_rows(kernel, in, [&](const auto& m) {
            if (in.tokens > 1) compute_dense(ctx, kernel, in, m, o.out);
            else if (kernel.dense) compute_dense_token(ctx, kernel, in, m, o.out);
            else compute_decode(ctx, kernel, in, m, o);
        });
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
