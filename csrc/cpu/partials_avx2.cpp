// The CPU partial kernel built for AVX2 + FMA + F16C (x86-64 only). Only this file's own
// functions get the target (pragma after every header; the body calls no library template), and
// tree_attention_cpu.cpp calls them only after __builtin_cpu_supports said the CPU has all three.
// Body: partials_kernel.inc.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../ops.h"
#include "tree_attention_cpu.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define A2R_CPU_F16C 1

namespace a2r {
namespace cpu {
namespace avx2 {
#include "partials_kernel.inc"
}  // namespace avx2
}  // namespace cpu
}  // namespace a2r

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif
#endif  // x86-64
