/* One core's fp32 FMA peak: 12 independent chains of 8-lane FMAs (AVX2 + FMA, the CPU kernel's
 * instruction set; 12 in flight cover the FMA's latency times its throughput on current x86
 * cores). Prints the best of 10 runs in GFLOP/s (2 flops per lane per FMA). Built and run by
 * common.fma_peak_gflops: an upper bound no fp32 kernel on this core can pass. */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

int main(void) {
  __m256 acc[12];
  const __m256 mul = _mm256_set1_ps(0.9999f), add = _mm256_set1_ps(1e-7f);
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps((float)i);
  const long iters = 40000000;
  double best = 0.0;
  for (int run = 0; run < 10; ++run) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long it = 0; it < iters; ++it) {
      for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], mul, add);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    const double seconds =
        (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    const double gflops = (double)iters * 12 * 16 / seconds / 1e9;
    if (gflops > best) best = gflops;
  }
  float sink = 0.0f;   /* keeps the chains live */
  for (int i = 0; i < 12; ++i) sink += _mm256_cvtss_f32(acc[i]);
  printf("%.2f %g\n", best, (double)sink);
  return 0;
}
