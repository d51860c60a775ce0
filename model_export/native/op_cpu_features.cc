// The instruction-set extensions this build was compiled for (g++ -march=native on the building
// machine), checked against the running CPU before any kernel is registered, so that a library
// copied beside an export and loaded on an older CPU fails to register with a message instead of
// stopping the host on an illegal instruction. Compiled for baseline x86-64 itself.
// SPARSEINFER_REQUIRE_CPU_FEATURE adds one more (a __builtin_cpu_supports name) to test the path.
#include "op_common.h"

namespace sparseinfer::op {

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
#ifdef __AVX512VNNI__
    if (!__builtin_cpu_supports("avx512vnni")) return "avx512vnni";
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

}  // namespace sparseinfer::op
