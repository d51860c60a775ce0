// The gate activations, once: their codes and their float32 algorithm, reference/activations.py
// step by step (see its docstring for the algorithm and its error), every product and sum
// rounded separately (no FMA) and no library exp / erf (libdevice's contract into FMA and flush
// in ex2.approx.ftz), so every build of the code below gets the reference's bits. No #include
// (kernels/sources.py pastes the text into each kernel source for NVRTC).
//
// One text, three builds:
// * CUDA device code: the kernels (common.cuh includes this file; NVRTC through kernels/sources.py,
//   which expands the include, and nvcc for the op library's launcher, -I kernels/cuda), products
//   and sums as __fmul_rn / __fadd_rn;
// * the CPU emulator (kernels/cuda/cpu_emulation.h, included first): the same device spelling,
//   its __fmul_rn / __fadd_rn being g++'s float operations;
// * host C++ (the op library's CPU kernel, model_export/native/sparse_mlp_cpu.h): plain float
//   operations, which round separately because the library is built with -ffp-contract=off and
//   no fast math.
#pragma once

// The kinds, by code: reference/activations.py KINDS, in order (its Activation.code). silu, gelu
// and gelu_tanh are never exactly zero (but by underflow): sparse only as an approximation.
enum ActivationKind { ACT_RELU = 0, ACT_FATRELU = 1, ACT_SILU = 2, ACT_GELU = 3, ACT_GELU_TANH = 4 };

#ifndef __CUDACC_RTC__              // host code (NVRTC compiles device code only): the op library's
constexpr int ACT_KIND_COUNT = 5;   // CPU kernel and the CUDA launcher's checks
constexpr bool act_exact_zeros(int kind) { return kind == ACT_RELU || kind == ACT_FATRELU; }
#ifndef __CUDACC__
// The kinds' names by code (the op's `activation` attribute).
constexpr const char* ACT_NAMES[ACT_KIND_COUNT] = {"relu", "fatrelu", "silu", "gelu", "gelu_tanh"};
#endif
#endif

#if defined(__CUDACC__) || defined(__CUDACC_RTC__) || defined(SPARSEINFER_CPU_EMULATION)
#if defined(SPARSEINFER_CPU_EMULATION) && !defined(__forceinline__)
#error "an emulated build includes kernels/cuda/cpu_emulation.h before activation.h"
#endif
#define ACT_FN __device__ __forceinline__
#define ACT_UNROLL _Pragma("unroll")
#define ACT_TABLE const float                    // a local table: constants once unrolled
ACT_FN float act_add(float a, float b) { return __fadd_rn(a, b); }
ACT_FN float act_mul(float a, float b) { return __fmul_rn(a, b); }
ACT_FN float act_abs(float a) { return fabsf(a); }
ACT_FN float act_float_of_bits(unsigned u) { return __uint_as_float(u); }
#else
#ifdef __FAST_MATH__
#error "activation.h's host build needs IEEE float operations: no -ffast-math"
#endif
#define ACT_FN inline
#define ACT_UNROLL
#define ACT_TABLE static constexpr float
ACT_FN float act_add(float a, float b) { return a + b; }
ACT_FN float act_mul(float a, float b) { return a * b; }
ACT_FN float act_abs(float a) { return __builtin_fabsf(a); }     // g++'s built-ins: no header
ACT_FN float act_float_of_bits(unsigned u) {
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
}
#endif

template <int N>
ACT_FN float act_horner(const float (&c)[N], float x) {
    float acc = c[N - 1];
    ACT_UNROLL
    for (int i = N - 2; i >= 0; --i) acc = act_add(act_mul(acc, x), c[i]);
    return acc;
}

// e^x for x <= 0 (exp_nonpositive): n = round(x log2 e), Cody-Waite r, Taylor degree 7, 2^n.
ACT_FN float act_exp_nonpositive(float x) {
    if (x < -104.0f) return 0.0f;
    ACT_TABLE taylor[8] = {1.0f, 1.0f, 0.5f, 0.166666672f, 0.0416666679f, 0.00833333377f, 0.00138888892f,
                           0.000198412701f};
    const float n = act_add(act_add(act_mul(x, 1.44269502f), 12582912.0f), -12582912.0f);
    const float r = act_add(act_add(x, -act_mul(n, 0.693145752f)), -act_mul(n, 1.42860677e-06f));
    const float p = act_horner(taylor, r);
    const int ni = (int)n;                                 // in [-150, 0]
    if (ni < -100)                                         // 2^n subnormal: p 2^(n + 50) 2^-50
        return act_mul(act_mul(p, act_float_of_bits((unsigned)(ni + 50 + 127) << 23)), 8.8817841970012523e-16f);
    return act_mul(p, act_float_of_bits((unsigned)(ni + 127) << 23));
}

// 1 / w for w in [0.5, 2.6] (recip): a linear guess, 5 Newton steps; no division (on a GPU a
// correctly rounded one is a sequence of FMAs).
ACT_FN float act_recip(float w) {
    float r = act_add(1.41176474f, -act_mul(0.470588237f, w));
    ACT_UNROLL
    for (int i = 0; i < 5; ++i) r = act_add(r, act_mul(r, act_add(1.0f, -act_mul(w, r))));
    return r;
}

// z * sigmoid(y) (z_sigmoid): no argument of exp is positive.
ACT_FN float act_z_sigmoid(float z, float y) {
    const bool pos = y >= 0.0f;
    const float e = act_exp_nonpositive(pos ? -y : y);
    const float r = act_recip(act_add(1.0f, e));
    return pos ? act_mul(z, r) : act_mul(act_mul(z, e), r);
}

// 1 + erf(z / sqrt 2) (gelu_q): Taylor below v = 0.75, else erfc(v) = e^(-z^2 / 2) F(v).
ACT_FN float act_gelu_q(float z) {
    const float a = act_abs(z);
    const float v = act_mul(a, 0.707106769f);
    const bool neg = z < 0.0f;
    if (v < 0.75f) {
        ACT_TABLE erf_a[10] = {1.12837923f, -0.376126379f, 0.112837918f, -0.0268661715f, 0.00522397785f,
                               -0.000854832702f, 0.000120553326f, -1.49256502e-05f, 1.64621144e-06f,
                               -1.63658441e-07f};
        const float e = act_mul(v, act_horner(erf_a, act_mul(v, v)));
        return neg ? act_add(1.0f, -e) : act_add(1.0f, e);
    }
    if (!(v < 10.1f)) return neg ? 0.0f : 2.0f;
    float f;
    if (v < 2.5f) {
        ACT_TABLE erfc_b[11] = {0.302261204f, -0.146030247f, 0.0649620891f, -0.026977513f, 0.0105612651f,
                                -0.00392907206f, 0.00139501656f, -0.000466224708f, 0.000152627908f,
                                -5.98844708e-05f, 1.84624841e-05f};
        f = act_horner(erfc_b, act_add(v, -1.625f));
    } else {
        ACT_TABLE erfc_c[9] = {0.564191163f, -6.97239957e-05f, -0.280794591f, -0.0131913386f, 0.500216901f,
                               -0.236754f, -0.924873114f, 1.55624056f, -0.79137522f};
        const float s = act_mul(act_recip(act_mul(v, 0.25f)), 0.25f);     // 1 / v
        f = act_mul(act_horner(erfc_c, s), s);
    }
    const float c = act_mul(a, 4097.0f);                  // Dekker: a = hi + lo, hi of 12 bits
    const float hi = act_add(c, -act_add(c, -a));
    const float lo = act_add(a, -hi);
    const float g = act_mul(act_exp_nonpositive(act_mul(-0.5f, act_mul(hi, hi))),
                            act_exp_nonpositive(act_mul(-0.5f, act_mul(lo, act_add(a, hi)))));
    const float erfc = act_mul(g, f);
    return neg ? erfc : act_add(2.0f, -erfc);
}

// h1 = act(z): relu z > 0 ? z : +0; fatrelu z >= threshold ? z : +0; silu z sigmoid(z);
// gelu_tanh z sigmoid(z (K1 + K2 z^2)); gelu (0.5 z) (1 + erf(z / sqrt 2)).
ACT_FN float activate(float z, int kind, float threshold) {
    if (kind == ACT_RELU) return z > 0.0f ? z : 0.0f;
    if (kind == ACT_FATRELU) return z >= threshold ? z : 0.0f;
    if (kind == ACT_SILU) return act_z_sigmoid(z, z);
    if (kind == ACT_GELU_TANH)
        return act_z_sigmoid(z, act_mul(z, act_add(1.59576917f, act_mul(0.0713548139f, act_mul(z, z)))));
    return act_mul(act_mul(0.5f, z), act_gelu_q(z));
}
