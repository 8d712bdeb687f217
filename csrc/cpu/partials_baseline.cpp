// The CPU partial kernel built for the compiler's default target (SSE2 on x86-64, NEON on
// aarch64): it runs on every CPU of the architecture. Body: partials_kernel.inc.
#include <math.h>
#include <stdint.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../ops.h"
#include "tree_attention_cpu.h"

namespace a2r {
namespace cpu {
namespace baseline {
#include "partials_kernel.inc"
}  // namespace baseline
}  // namespace cpu
}  // namespace a2r
