// One masked iterative-denoising step (CUDA backend of ak.denoise_step), two launches.
//
// 1. denoise_predict_kernel, grid (B * L, num_splits): CTA (pos, s) reads the token at
//    pos = b * L + l; an unmasked position never reads its logits: x0 = token, confidence = -inf.
//    A masked position makes one pass over its V logits (split s of them: num_splits > 1 keeps
//    the GPU busy when B * L is small) keeping, per thread and then per CTA, in fp32:
//      max m, Z = sum_v exp(x_v - m), Zx = sum_v exp(x_v - m) (x_v - m)    (online, rescaled)
//      the first group holding m (the argmax is found at the end by re-reading that group)
//      the second largest value x_(2) (m itself when m occurs twice)
//      for temperature T > 0: the Gumbel-max argmax of x_v / T - log(-log u_v)
//    and writes
//      x0         = argmax_v x_v (T == 0; ties -> lowest index) or the Gumbel-max sample
//      confidence = p(x0) = exp(x_x0 - m) / Z                    ("low_confidence")
//                   p1 - p2 = (1 - exp(x_(2) - m)) / Z            ("margin")
//                   -H(p) = Zx / Z - log Z                        ("entropy")
//                   u ~ U(0, 1)                                   ("random")
//    from the untempered softmax p = softmax(x). Non-finite logits (the rule of
//    a2r_kernels/reference_denoise.py) are classified by the row's max m, which propagates NaN
//    (max_nan), so no extra pass is needed: m NaN (a NaN logit) or m = -inf (no logit above -inf)
//    -> x0 = mask_id, confidence NaN, never committed; m = +inf -> the point mass on the lowest
//    +inf index: confidence 1 (p(x0), margin) or 0 (entropy). Thread t streams 16-byte groups (8 fp16 / bf16
//    or 4 fp32 logits) t, t + 256, ... and folds each whole group into its statistics: one
//    rescale per group and one exp2 per logit, with only the statistics its remasking mode needs
//    (a template parameter). That keeps the loop at 8.7 SASS instructions per bf16 logit for
//    p(x0) on sm_90 (benchmarks/sass_report.py; static count; 7.5 before the overflow-safe
//    (x - m) * log2e of fold_group, whose issue ceiling is still ~6.8 TB/s): memory-bound at
//    126k-entry vocabularies, where a per-logit online softmax (two exps and a branch per
//    logit) is not.
//    With num_splits > 1 each CTA writes its split's state (argmax resolved) to split_stats and
//    denoise_combine_kernel (one thread per position) merges the splits and writes x0 and
//    confidence.
// 2. denoise_select_kernel, one CTA per row b: among the masked positions of the row, position i
//    is committed when rank_i < k (top-k mode, k = clamp(num_transfer[b], 0, #masked)) or when
//    confidence_i >= threshold or rank_i == 0 (threshold mode: at least the most confident one),
//    where rank_i = #{masked j : c_j > c_i or (c_j == c_i and j < i)} (ties -> lower position).
//    transferred[b, i] is written for every position and tokens[b, i] = x0[b, i] where committed.
//    Only committable positions (masked, confidence not NaN) are ranked or committed.
//
// Random numbers (the layout of a2r_kernels/reference_denoise.py and the Triton backend, so a
// seeded step samples the same tokens on every backend up to fp32 rounding): Philox4x32-10
// (Salmon et al., SC'11; the generator of curand and of Triton's tl.philox), key
// (seed & 0xffffffff, seed >> 32); the first output word r of counter (c0, c1, c2, c3) becomes
// u = ((r >> 9) + 0.5) * 2^-23, in [2^-24, 1 - 2^-24], so log(-log u) is always finite.
//   Gumbel noise of vocabulary entry v at flat position pos = b * L + l: counter (v, pos, 0, 0)
//   "random" remasking score of position pos:                            counter (0, pos, 1, 0)

#include <algorithm>
#include <climits>
#include <type_traits>
#include <utility>
#include <string>

#include "common.cuh"

namespace a2r {
namespace {

constexpr int kPredictThreads = 256;
constexpr int kCombineThreads = 128;
constexpr int64_t kPartialWords = 8;  // fp32 words of one (position, split) state
constexpr int kSelectThreads = 256;
// Rows of up to this many positions stage confidence and mask flags in shared memory.
constexpr int64_t kSelectSmemMaxLen = 8192;
// Third Philox counter word: which random stream (see the header comment).
constexpr uint32_t kGumbelStream = 0u;
constexpr uint32_t kRandomScoreStream = 1u;

// Everything from here to the kernels is __host__ __device__: the host build of the same code
// (denoise_predict_row_host) lets CPU-only CI test the per-position math against the reference.
#define A2R_HD __host__ __device__ __forceinline__

A2R_HD float fast_exp(float x) {
#ifdef __CUDA_ARCH__
  return __expf(x);
#else
  return expf(x);
#endif
}

// x * y + z rounded twice (no FMA contraction), as torch's separate mul and add.
A2R_HD float mul_add_unfused(float x, float y, float z) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(__fmul_rn(x, y), z);
#else
  volatile float product = x * y;
  return product + z;
#endif
}

// ------------------------------------------------------------------------------------ Philox
struct Philox4 {
  uint32_t x, y, z, w;
};

A2R_HD uint32_t mul_hi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Host-callable too, so tests/test_cuda.py can check the stream against the reference on a CPU
// machine (philox_uniform_host below).
A2R_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mul_hi32(kMul0, ctr.x), lo0 = kMul0 * ctr.x;
    const uint32_t hi1 = mul_hi32(kMul1, ctr.z), lo1 = kMul1 * ctr.z;
    ctr = Philox4{hi1 ^ ctr.y ^ key0, lo1, hi0 ^ ctr.w ^ key1, lo0};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return ctr;
}

A2R_HD float uniform_open01(uint32_t bits) {
  return (static_cast<float>(bits >> 9) + 0.5f) * (1.0f / 8388608.0f);  // 2^-23
}

// ------------------------------------------------------------------------------------ stats
// What a step needs beyond max, sum-exp and argmax: a template parameter, so that each
// remasking mode's streaming loop carries only its own work.
enum class Extra : int { kNone = 0, kSecond = 1, kEntropy = 2 };

constexpr float kNegHuge = -1e30f;  // a finite shift whose exp2 underflows to exactly 0
constexpr float kPosInf = __builtin_huge_valf();

// max(a, b), NaN if either is NaN (fmaxf drops a NaN): the row max that classifies a row holding
// a NaN logit. One FMNMX.NAN on sm_80+, as cheap as fmaxf.
A2R_HD float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
#else
  return (a > b || a != a) ? a : b;  // b when b is NaN (a > NaN is false)
#endif
}

// exp2 as one MUFU.EX2 (ex2.approx.ftz: 2 ulp; exp2(-inf) = +0); exp2f on the host.
A2R_HD float fast_exp2(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// The Gumbel stream of one position: key and counter words (see the header comment).
struct GumbelKey {
  uint32_t key0, key1, pos;
  float inv_temperature;
};

// Running statistics of a slice of one position's logits, in fp32: per thread over the groups it
// streams, then merged across the CTA. A group is kGroup consecutive logits (one 16-byte load);
// the loop folds whole groups: one rescale per group, one exp per logit (a per-logit online
// softmax costs two exps and a compare-and-branch per logit and stops being memory-bound).
struct LaneStats {
  float max;           // m (-inf until a finite logit is seen)
  float sum;           // s = sum exp(x - m)
  float xlogx;         // a = sum exp(x - m) (x - m)                       (Extra::kEntropy)
  float second;        // largest logit once one occurrence of m is removed (Extra::kSecond)
  int max_at;          // column of m: while streaming, the first column of the lowest group
                       // holding m; once resolved (resolve_argmax), the argmax (INT_MAX: none)
  float gumbel;        // best Gumbel key x / T - log(-log u)              (sampling)
  int gumbel_idx;      // its column, lowest on ties
  float gumbel_logit;  // x at gumbel_idx
};

A2R_HD LaneStats empty_lane_stats() {
  return LaneStats{kNegInf, 0.f, 0.f, kNegInf, INT_MAX, kNegInf, INT_MAX, kNegInf};
}

A2R_HD bool beats(float value, int idx, float best, int best_idx) {
  return value > best || (value == best && idx < best_idx);
}

// Fold the group x[0 .. kGroup) of columns col0 .. col0 + kGroup (tail entries past the vocabulary
// are -inf) into st. A thread's groups must arrive in increasing column order.
template <int kGroup, Extra kExtra, bool kSample>
A2R_HD void fold_group(LaneStats& st, const float (&x)[kGroup], int col0, const GumbelKey& key) {
  float group_max = x[0], group_second = kNegInf;
#pragma unroll
  for (int e = 1; e < kGroup; ++e) {
    if constexpr (kExtra == Extra::kSecond) group_second = fmaxf(group_second, fminf(group_max, x[e]));
    group_max = max_nan(group_max, x[e]);
  }
  if constexpr (kExtra == Extra::kSecond) {
    st.second = fmaxf(fmaxf(st.second, group_second), fminf(st.max, group_max));
  }
  if (group_max > st.max) st.max_at = col0;  // strict: an earlier group keeps a tie
  const float new_max = max_nan(st.max, group_max);
  const float shift = new_max > kNegInf ? new_max : 0.f;    // never (-inf) - (-inf)
  const float alpha = fast_exp2((st.max - shift) * kLog2e);  // 0 while st.max is -inf
  if constexpr (kExtra == Extra::kEntropy) {
    // A -inf logit must add 0, not 0 * (-inf): its shift is clamped to a finite -1e30, whose
    // weight exp2(-1.4e30) is exactly 0 (one max instead of a compare and two selects).
    float group_sum = 0.f, group_xlogx = 0.f;
#pragma unroll
    for (int e = 0; e < kGroup; ++e) {
      const float z = fmaxf(x[e] - shift, kNegHuge);
      const float w = fast_exp2(z * kLog2e);
      group_sum += w;
      group_xlogx = fmaf(w, z, group_xlogx);
    }
    // Clamped like z: finfo.min - a positive max overflows to -inf, and alpha (0) * -inf would
    // be NaN where the reference adds 0 (also -1e30 while st.max is -inf: st.sum is 0 then).
    const float old_shift = fmaxf(st.max - shift, kNegHuge);
    st.xlogx = fmaf(alpha, fmaf(old_shift, st.sum, st.xlogx), group_xlogx);
    st.sum = fmaf(alpha, st.sum, group_sum);
  } else {
    // (x - m) * log2(e), not the fused fmaf(x, log2e, -m * log2e): -m * log2e overflows to
    // +-inf beyond |m| = 2.4e38 (logits near finfo.max, or rows at finfo.min as transformers'
    // InfNanRemoveLogitsProcessor writes them) and the sum becomes inf or NaN. x - m <= 0 is
    // safe: at worst -inf, whose exp2 is 0. One FADD more per logit, no extra pass.
    float group_sum = 0.f;
#pragma unroll
    for (int e = 0; e < kGroup; ++e) group_sum += fast_exp2((x[e] - shift) * kLog2e);
    st.sum = fmaf(alpha, st.sum, group_sum);
  }
  st.max = new_max;
  if constexpr (kSample) {
#pragma unroll
    for (int e = 0; e < kGroup; ++e) {
      const int v = col0 + e;
      float noisy = kNegInf;  // -inf (and NaN) entries are never sampled
      if (x[e] > kNegInf) {
        const Philox4 r = philox4x32_10(
            Philox4{static_cast<uint32_t>(v), key.pos, kGumbelStream, 0u}, key.key0, key.key1);
        // Unfused multiply and add, rounded as the reference's `x * (1 / T) + g` in torch.
        noisy = mul_add_unfused(x[e], key.inv_temperature, -logf(-logf(uniform_open01(r.x))));
      }
      // Strict: columns increase, so the lowest index keeps a tie. The thread's first column
      // counts even at -inf: finite logits whose x / T overflows to -inf tie there, and the
      // reference's argmax takes the lowest index (with its logit) among them.
      if (noisy > st.gumbel || st.gumbel_idx == INT_MAX) {
        st.gumbel = noisy;
        st.gumbel_idx = v;
        st.gumbel_logit = x[e];
      }
    }
  }
}

// a <- the statistics of a's and b's logits together (any order of merges gives the same
// values up to fp32 rounding; indices are exact).
template <Extra kExtra, bool kSample>
A2R_HD void merge_lane_stats(LaneStats& a, const LaneStats& b) {
  const float m = max_nan(a.max, b.max);
  const float shift = m > kNegInf ? m : 0.f;
  const float scale_a = fast_exp2((a.max - shift) * kLog2e);
  const float scale_b = fast_exp2((b.max - shift) * kLog2e);
  if constexpr (kExtra == Extra::kEntropy) {
    const float shift_a = fmaxf(a.max - shift, kNegHuge);  // finite: see fold_group
    const float shift_b = fmaxf(b.max - shift, kNegHuge);
    a.xlogx = scale_a * fmaf(shift_a, a.sum, a.xlogx) + scale_b * fmaf(shift_b, b.sum, b.xlogx);
  }
  a.sum = scale_a * a.sum + scale_b * b.sum;
  if constexpr (kExtra == Extra::kSecond) {
    // Equal maxima: the maximum occurs twice, so it is also the second largest value.
    a.second = a.max > b.max ? fmaxf(a.second, b.max)
             : b.max > a.max ? fmaxf(b.second, a.max)
                             : a.max;
  }
  a.max_at = a.max > b.max ? a.max_at
           : b.max > a.max ? b.max_at
                           : (a.max_at < b.max_at ? a.max_at : b.max_at);
  a.max = m;
  if constexpr (kSample) {
    if (beats(b.gumbel, b.gumbel_idx, a.gumbel, a.gumbel_idx)) {
      a.gumbel = b.gumbel;
      a.gumbel_idx = b.gumbel_idx;
      a.gumbel_logit = b.gumbel_logit;
    }
  }
}

// The lowest column of the group x[0 .. kGroup) at col0 whose logit equals max (the argmax:
// groups are disjoint and max_at is the lowest group holding max).
template <int kGroup>
A2R_HD int first_column_of(const float (&x)[kGroup], int col0, float max) {
  int found = col0 + kGroup;
#pragma unroll
  for (int e = kGroup - 1; e >= 0; --e) found = x[e] == max ? col0 + e : found;
  return found;
}

// x0 and confidence of one masked position from its merged statistics, argmax resolved (see the
// header comment); `no_prediction` (the mask id) is the x0 of a row without a distribution.
template <Extra kExtra, bool kSample>
A2R_HD void finish_position(const LaneStats& st, Remasking remasking, const GumbelKey& key,
                            int no_prediction, int& x0, float& confidence) {
  if (!(st.max > kNegInf)) {  // a NaN logit (the max propagates it) or no logit above -inf
    x0 = no_prediction;
    confidence = __builtin_nanf("");
    return;
  }
  const bool sampled = kSample && st.gumbel_idx != INT_MAX;
  // A row without a finite logit reports 0, as torch.argmax does for an all -inf row.
  x0 = sampled ? st.gumbel_idx : (st.max_at != INT_MAX ? st.max_at : 0);
  const float x0_logit = sampled ? st.gumbel_logit : st.max;
  const bool has_mass = st.sum > 0.f;
  const float inv_sum = has_mass ? 1.f / st.sum : 0.f;
  switch (remasking) {
    case Remasking::kMargin:  // p1 - p2 = (1 - exp(second - m)) / s
      confidence = has_mass && kExtra == Extra::kSecond
                       ? (1.f - fast_exp(st.second - st.max)) * inv_sum
                       : 0.f;
      break;
    case Remasking::kEntropy:  // sum p log p = a / s - log s
      confidence = has_mass && kExtra == Extra::kEntropy ? st.xlogx * inv_sum - logf(st.sum) : 0.f;
      break;
    case Remasking::kRandom: {
      const Philox4 r =
          philox4x32_10(Philox4{0u, key.pos, kRandomScoreStream, 0u}, key.key0, key.key1);
      confidence = uniform_open01(r.x);
      break;
    }
    case Remasking::kLowConfidence:
    default:  // p(x0)
      confidence = x0_logit > kNegInf ? fast_exp(x0_logit - st.max) * inv_sum : 0.f;
      break;
  }
  // A +inf logit: the point mass on the lowest +inf index, which is x0 at any temperature (x / T
  // + g is +inf there too); its statistics above are inf - inf = NaN.
  if (st.max == kPosInf && remasking != Remasking::kRandom) {
    confidence = remasking == Remasking::kEntropy ? 0.f : 1.f;
  }
}

// Calls fn(extra, sample) with the compile-time variant (std::integral_constant values) that a
// remasking mode and temperature need.
template <typename Fn>
void with_predict_variant(Remasking remasking, bool sample, Fn&& fn) {
  auto with_sample = [&](auto extra) {
    if (sample) fn(extra, std::true_type{});
    else fn(extra, std::false_type{});
  };
  switch (remasking) {
    case Remasking::kMargin: with_sample(std::integral_constant<Extra, Extra::kSecond>{}); break;
    case Remasking::kEntropy: with_sample(std::integral_constant<Extra, Extra::kEntropy>{}); break;
    default: with_sample(std::integral_constant<Extra, Extra::kNone>{}); break;  // p(x0), random
  }
}

template <Extra kExtra, bool kSample>
__device__ __forceinline__ LaneStats shfl_xor_stats(const LaneStats& s, int offset) {
  LaneStats o = s;
  o.max = __shfl_xor_sync(kFullMask, s.max, offset);
  o.sum = __shfl_xor_sync(kFullMask, s.sum, offset);
  o.max_at = __shfl_xor_sync(kFullMask, s.max_at, offset);
  if constexpr (kExtra == Extra::kEntropy) o.xlogx = __shfl_xor_sync(kFullMask, s.xlogx, offset);
  if constexpr (kExtra == Extra::kSecond) o.second = __shfl_xor_sync(kFullMask, s.second, offset);
  if constexpr (kSample) {
    o.gumbel = __shfl_xor_sync(kFullMask, s.gumbel, offset);
    o.gumbel_idx = __shfl_xor_sync(kFullMask, s.gumbel_idx, offset);
    o.gumbel_logit = __shfl_xor_sync(kFullMask, s.gumbel_logit, offset);
  }
  return o;
}

// The kGroup logits at col0 .. col0 + kGroup as floats, in one 16-byte load (evict-first: each
// logit is read once). `row + col0` must be 16-byte aligned.
template <typename T, int kGroup>
__device__ __forceinline__ void load_group_vector(const T* __restrict__ row, int col0,
                                                  float (&x)[kGroup]) {
  static_assert(kGroup * sizeof(T) == 16, "a group is 16 bytes");
  const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(row + col0));
  const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int e = 0; e < kGroup; ++e) x[e] = to_float(elems[e]);
}

// The same, element by element (rows that do not start on a 16-byte boundary).
template <typename T, int kGroup>
__device__ __forceinline__ void load_group_scalar(const T* __restrict__ row, int col0,
                                                  float (&x)[kGroup]) {
#pragma unroll
  for (int e = 0; e < kGroup; ++e) x[e] = to_float(row[col0 + e]);
}

// The same group with the columns at or past `vocab` read as -inf (the row's tail).
template <typename T, int kGroup>
__device__ __forceinline__ void load_group_tail(const T* __restrict__ row, int col0, int vocab,
                                                float (&x)[kGroup]) {
#pragma unroll
  for (int e = 0; e < kGroup; ++e) x[e] = col0 + e < vocab ? to_float(row[col0 + e]) : kNegInf;
}

// A (position, split) state in DenoiseArgs::split_stats: 8 words, 32-byte aligned.
__device__ __forceinline__ void store_partial(float* slot, const LaneStats& st) {
  reinterpret_cast<float4*>(slot)[0] = make_float4(st.max, st.sum, st.xlogx, st.second);
  reinterpret_cast<float4*>(slot)[1] = make_float4(__int_as_float(st.max_at), st.gumbel,
                                                   __int_as_float(st.gumbel_idx), st.gumbel_logit);
}

__device__ __forceinline__ LaneStats load_partial(const float* slot) {
  const float4 a = reinterpret_cast<const float4*>(slot)[0];
  const float4 b = reinterpret_cast<const float4*>(slot)[1];
  return LaneStats{a.x, a.y, a.z, a.w, __float_as_int(b.x), b.y, __float_as_int(b.z), b.w};
}

// Groups [begin, end) of split `split` when the row's num_groups groups (the last one partial
// when kGroup does not divide V) are cut into num_splits contiguous ranges.
A2R_HD void split_groups(int num_groups, int num_splits, int split, int& begin, int& end) {
  const int per_split = (num_groups + num_splits - 1) / num_splits;
  begin = split * per_split < num_groups ? split * per_split : num_groups;
  end = begin + per_split < num_groups ? begin + per_split : num_groups;
}

// Grid (B * L, num_splits): CTA (pos, split) streams its split's groups of position pos. With one
// split it writes x0 and confidence; with several it writes its partial state (argmax resolved)
// to split_stats and denoise_combine_kernel finishes the position.
template <typename T, Extra kExtra, bool kSample>
__global__ void __launch_bounds__(kPredictThreads)
denoise_predict_kernel(const DenoiseArgs args, bool aligned) {
  constexpr int kGroup = 16 / sizeof(T);
  const int64_t pos = blockIdx.x;
  const int split = blockIdx.y;
  const int64_t b = pos / args.length;
  const int64_t l = pos % args.length;
  const int64_t token = args.tokens[b * args.tokens_stride_b + l * args.tokens_stride_l];
  int64_t* x0_out = args.x0 + b * args.x0_stride_b + l * args.x0_stride_l;
  float* conf_out = args.confidence + b * args.conf_stride_b + l * args.conf_stride_l;
  if (token != args.mask_id) {  // unmasked: its logits are never read
    if (threadIdx.x == 0 && args.num_splits == 1) {  // else the combine kernel writes these
      *x0_out = token;
      *conf_out = kNegInf;
    }
    return;
  }

  const T* __restrict__ row =
      static_cast<const T*>(args.logits) + b * args.logits_stride_b + l * args.logits_stride_l;
  const int vocab = static_cast<int>(args.vocab);
  // B * L < 2^31 (checked on the host), so the position fits the 32-bit counter word.
  const GumbelKey key{static_cast<uint32_t>(args.seed), static_cast<uint32_t>(args.seed >> 32),
                      static_cast<uint32_t>(pos), args.inv_temperature};

  // Thread t streams groups begin + t, begin + t + kPredictThreads, ... (consecutive threads
  // read consecutive 16-byte groups: fully coalesced); the partial tail group of the row, when
  // it falls in this split, goes to the thread next in turn.
  const int full_groups = vocab / kGroup;
  const bool has_tail = vocab % kGroup != 0;
  int begin, end;
  split_groups(full_groups + (has_tail ? 1 : 0), static_cast<int>(args.num_splits), split, begin,
               end);
  const int full_end = end < full_groups ? end : full_groups;
  LaneStats st = empty_lane_stats();
  float x[kGroup];
  // Two copies of the loop, so that the aligned one holds nothing but its 16-byte loads.
  if (aligned) {
    for (int g = begin + threadIdx.x; g < full_end; g += kPredictThreads) {
      load_group_vector<T, kGroup>(row, g * kGroup, x);
      fold_group<kGroup, kExtra, kSample>(st, x, g * kGroup, key);
    }
  } else {
    for (int g = begin + threadIdx.x; g < full_end; g += kPredictThreads) {
      load_group_scalar<T, kGroup>(row, g * kGroup, x);
      fold_group<kGroup, kExtra, kSample>(st, x, g * kGroup, key);
    }
  }
  if (has_tail && begin <= full_groups && full_groups < end &&
      static_cast<int>(threadIdx.x) == (full_groups - begin) % kPredictThreads) {
    load_group_tail<T, kGroup>(row, full_groups * kGroup, vocab, x);
    fold_group<kGroup, kExtra, kSample>(st, x, full_groups * kGroup, key);
  }

  // CTA reduction: warps by shuffles, then thread 0 over the per-warp results.
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    merge_lane_stats<kExtra, kSample>(st, shfl_xor_stats<kExtra, kSample>(st, offset));
  }
  __shared__ LaneStats warp_stats[kPredictThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_stats[warp] = st;
  __syncthreads();
  if (threadIdx.x != 0) return;
  st = warp_stats[0];
  for (int w = 1; w < kPredictThreads / 32; ++w) merge_lane_stats<kExtra, kSample>(st, warp_stats[w]);

  // The argmax: read the lowest group holding the max again (kGroup logits, once per split).
  if (st.max_at != INT_MAX) {
    load_group_tail<T, kGroup>(row, st.max_at, vocab, x);
    st.max_at = first_column_of<kGroup>(x, st.max_at, st.max);
  }
  if (args.num_splits > 1) {
    store_partial(args.split_stats + (pos * args.num_splits + split) * kPartialWords, st);
    return;
  }
  int x0;
  float confidence;
  finish_position<kExtra, kSample>(st, args.remasking, key, static_cast<int>(args.mask_id), x0,
                                   confidence);
  *x0_out = x0;
  *conf_out = confidence;
}

// One thread per position: merges the position's split states (the argmax: the lowest column
// among the splits holding the max) and writes x0 and confidence.
template <Extra kExtra, bool kSample>
__global__ void __launch_bounds__(kCombineThreads) denoise_combine_kernel(const DenoiseArgs args) {
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * kCombineThreads + threadIdx.x;
  if (pos >= args.batch * args.length) return;
  const int64_t b = pos / args.length;
  const int64_t l = pos % args.length;
  const int64_t token = args.tokens[b * args.tokens_stride_b + l * args.tokens_stride_l];
  int64_t* x0_out = args.x0 + b * args.x0_stride_b + l * args.x0_stride_l;
  float* conf_out = args.confidence + b * args.conf_stride_b + l * args.conf_stride_l;
  if (token != args.mask_id) {
    *x0_out = token;
    *conf_out = kNegInf;
    return;
  }
  LaneStats st = empty_lane_stats();
  for (int64_t split = 0; split < args.num_splits; ++split) {
    merge_lane_stats<kExtra, kSample>(
        st, load_partial(args.split_stats + (pos * args.num_splits + split) * kPartialWords));
  }
  const GumbelKey key{static_cast<uint32_t>(args.seed), static_cast<uint32_t>(args.seed >> 32),
                      static_cast<uint32_t>(pos), args.inv_temperature};
  int x0;
  float confidence;
  finish_position<kExtra, kSample>(st, args.remasking, key, static_cast<int>(args.mask_id), x0,
                                   confidence);
  *x0_out = x0;
  *conf_out = confidence;
}

// rank_i < limit, counting masked j that beat position i (higher confidence, or equal and lower).
template <typename IsMasked, typename ConfOf>
__device__ __forceinline__ bool rank_below(int i, float conf_i, int length, int limit,
                                           IsMasked is_masked, ConfOf conf_of) {
  int rank = 0;
  for (int j = 0; j < length && rank < limit; ++j) {
    if (!is_masked(j)) continue;
    const float c = conf_of(j);
    rank += (c > conf_i || (c == conf_i && j < i)) ? 1 : 0;
  }
  return rank < limit;
}

template <bool kStageInSmem>
__global__ void __launch_bounds__(kSelectThreads) denoise_select_kernel(const DenoiseArgs args) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int warp_counts[kSelectThreads / 32];
  const int length = static_cast<int>(args.length);
  float* sm_conf = reinterpret_cast<float*>(smem_raw);
  unsigned char* sm_masked = smem_raw + sizeof(float) * (kStageInSmem ? length : 0);
  const int64_t b = blockIdx.x;
  const int64_t* tokens_row = args.tokens + b * args.tokens_stride_b;
  const float* conf_row = args.confidence + b * args.conf_stride_b;
  bool* transferred_row = args.transferred + b * args.transferred_stride_b;

  // Committable: masked with a confidence that is not NaN (a NaN row is never committed).
  auto committable = [&](bool masked, float conf) { return masked && conf == conf; };
  auto is_masked = [&](int j) -> bool {
    if constexpr (kStageInSmem) return sm_masked[j] != 0;
    else return committable(tokens_row[j * args.tokens_stride_l] == args.mask_id,
                            conf_row[j * args.conf_stride_l]);
  };
  auto conf_of = [&](int j) -> float {
    if constexpr (kStageInSmem) return sm_conf[j];
    else return conf_row[j * args.conf_stride_l];
  };

  int count = 0;
  for (int i = threadIdx.x; i < length; i += kSelectThreads) {
    const bool masked = tokens_row[i * args.tokens_stride_l] == args.mask_id;
    if constexpr (kStageInSmem) {
      sm_conf[i] = conf_row[i * args.conf_stride_l];
      sm_masked[i] = committable(masked, sm_conf[i]);
    }
    count += masked;
  }
  count = warp_sum_int(count);
  if (threadIdx.x % 32 == 0) warp_counts[threadIdx.x / 32] = count;
  __syncthreads();
  int num_masked = 0;
#pragma unroll
  for (int w = 0; w < kSelectThreads / 32; ++w) num_masked += warp_counts[w];

  const bool topk_mode = args.num_transfer != nullptr;
  int k = 0;
  if (topk_mode) {
    const int64_t requested = args.num_transfer[b * args.num_transfer_stride];
    k = static_cast<int>(requested < 0 ? 0 : (requested > num_masked ? num_masked : requested));
  }

  for (int i = threadIdx.x; i < length; i += kSelectThreads) {
    bool commit = false;
    if (is_masked(i)) {
      const float conf_i = conf_of(i);
      if (topk_mode) {
        commit = k > 0 && rank_below(i, conf_i, length, k, is_masked, conf_of);
      } else {
        commit = conf_i >= args.threshold || rank_below(i, conf_i, length, 1, is_masked, conf_of);
      }
    }
    transferred_row[i * args.transferred_stride_l] = commit;
  }
  // Tokens change only after every thread has read the mask flags it needs.
  __syncthreads();
  for (int i = threadIdx.x; i < length; i += kSelectThreads) {
    if (transferred_row[i * args.transferred_stride_l]) {
      args.tokens[b * args.tokens_stride_b + i * args.tokens_stride_l] =
          args.x0[b * args.x0_stride_b + i * args.x0_stride_l];
    }
  }
}

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

template <typename T>
void launch_predict(const DenoiseArgs& args, cudaStream_t stream) {
  // Every row starts on a 16-byte boundary: whole groups are single 16-byte loads.
  constexpr int64_t kGroup = 16 / sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(args.logits) % 16 == 0 &&
                       args.logits_stride_b % kGroup == 0 && args.logits_stride_l % kGroup == 0;
  const int64_t positions = args.batch * args.length;
  const dim3 grid(static_cast<unsigned>(positions), static_cast<unsigned>(args.num_splits));
  with_predict_variant(args.remasking, args.temperature > 0.f, [&](auto extra, auto sample) {
    constexpr Extra kExtra = decltype(extra)::value;
    constexpr bool kSample = decltype(sample)::value;
    denoise_predict_kernel<T, kExtra, kSample><<<grid, kPredictThreads, 0, stream>>>(args, aligned);
    check_launch("denoise_predict_kernel launch");
    if (args.num_splits > 1) {
      const auto blocks = static_cast<unsigned>((positions + kCombineThreads - 1) / kCombineThreads);
      denoise_combine_kernel<kExtra, kSample><<<blocks, kCombineThreads, 0, stream>>>(args);
      check_launch("denoise_combine_kernel launch");
    }
  });
}

template <int kGroup, Extra kExtra, bool kSample>
void predict_row_host(const float* row, int vocab, int num_splits, Remasking remasking,
                      const GumbelKey& key, int no_prediction, int64_t* x0, float* confidence) {
  // The kernels' work split and merge order: split s covers groups [begin, end); its thread t
  // folds groups begin + t, begin + t + kPredictThreads, ... and the row's partial tail group goes
  // to the thread next in turn; a split's thread states are merged as the kernel merges them
  // (xor-shuffle butterflies within each warp, then warps 0, 1, ... in order), its argmax
  // resolved by re-reading one group, and the split states merged in split order
  // (denoise_combine_kernel).
  const int full_groups = vocab / kGroup;
  const bool has_tail = vocab % kGroup != 0;
  float x[kGroup];
  auto load = [&](int col0) {
    for (int e = 0; e < kGroup; ++e) x[e] = col0 + e < vocab ? row[col0 + e] : kNegInf;
  };
  LaneStats total = empty_lane_stats();
  for (int split = 0; split < num_splits; ++split) {
    int begin, end;
    split_groups(full_groups + (has_tail ? 1 : 0), num_splits, split, begin, end);
    const int full_end = end < full_groups ? end : full_groups;
    LaneStats thread_stats[kPredictThreads];
    for (int t = 0; t < kPredictThreads; ++t) {
      LaneStats& st = thread_stats[t];
      st = empty_lane_stats();
      for (int g = begin + t; g < full_end; g += kPredictThreads) {
        load(g * kGroup);
        fold_group<kGroup, kExtra, kSample>(st, x, g * kGroup, key);
      }
      if (has_tail && begin <= full_groups && full_groups < end &&
          t == (full_groups - begin) % kPredictThreads) {
        load(full_groups * kGroup);
        fold_group<kGroup, kExtra, kSample>(st, x, full_groups * kGroup, key);
      }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {  // every lane merges its xor partner's state
      LaneStats before[kPredictThreads];
      std::copy(thread_stats, thread_stats + kPredictThreads, before);
      for (int t = 0; t < kPredictThreads; ++t) {
        merge_lane_stats<kExtra, kSample>(thread_stats[t], before[t ^ offset]);
      }
    }
    LaneStats split_stats = thread_stats[0];
    for (int warp = 1; warp < kPredictThreads / 32; ++warp) {
      merge_lane_stats<kExtra, kSample>(split_stats, thread_stats[32 * warp]);
    }
    if (split_stats.max_at != INT_MAX) {
      load(split_stats.max_at);
      split_stats.max_at = first_column_of<kGroup>(x, split_stats.max_at, split_stats.max);
    }
    merge_lane_stats<kExtra, kSample>(total, split_stats);
  }
  int token;
  finish_position<kExtra, kSample>(total, remasking, key, no_prediction, token, *confidence);
  *x0 = token;
}

}  // namespace

void denoise_step(const TensorView& logits, const TensorView& tokens,
                  const TensorView* num_transfer, const TensorView& x0,
                  const TensorView& confidence, const TensorView& transferred,
                  const TensorView* split_stats, const DenoiseOptions& options,
                  uintptr_t stream_handle) {
  logits.expect(3, "[B, L, V]").expect_float().expect_unit_last_stride();
  const int64_t batch = logits.size(0), length = logits.size(1), vocab = logits.size(2);
  const std::pair<const TensorView*, DType> outputs[] = {
      {&tokens, DType::kInt64}, {&x0, DType::kInt64}, {&confidence, DType::kFloat32},
      {&transferred, DType::kBool}};
  for (const auto& [t, dtype] : outputs) {
    t->expect(2, "[B, L]").expect_dtype(dtype).expect_same_device(logits)
        .expect_size(0, batch, "logits' B").expect_size(1, length, "logits' L");
  }
  if (options.has_threshold == (num_transfer != nullptr)) {
    throw std::invalid_argument("denoise_step: give exactly one of num_transfer and threshold");
  }
  if (num_transfer != nullptr) {
    num_transfer->expect(1, "int64 [B]").expect_dtype(DType::kInt64).expect_same_device(logits)
        .expect_size(0, batch, "logits' B");
  }
  // The kernels index positions, tokens and splits in 32-bit: these bounds keep them in range.
  if (batch * length >= (int64_t{1} << 31) || length >= (int64_t{1} << 30)) {
    logits.fail("must have B * L < 2^31 and L < 2^30, got " + logits.shape_string());
  }
  if (vocab < 1 || vocab >= (int64_t{1} << 31) - 16) {
    logits.fail("must have V (shape[2]) in [1, 2^31 - 16), got " + std::to_string(vocab));
  }
  const int remasking = static_cast<int>(options.remasking);
  if (remasking < 0 || remasking > static_cast<int>(Remasking::kRandom)) {
    throw std::invalid_argument("denoise_step: remasking code must be in [0, " +
                                std::to_string(static_cast<int>(Remasking::kRandom)) + "], got " +
                                std::to_string(remasking));
  }
  if (options.num_splits < 1 || options.num_splits > 65535) {
    throw std::invalid_argument("denoise_step: num_splits must be in [1, 65535], got " +
                                std::to_string(options.num_splits));
  }
  if (options.num_splits > 1) {
    if (split_stats == nullptr) {
      throw std::invalid_argument(
          "denoise_step: num_splits > 1 needs split_stats (B * L * num_splits * 8 fp32 words)");
    }
    const int64_t words = batch * length * options.num_splits * kPartialWords;
    split_stats->expect(1, "fp32 [B * L * num_splits * 8]").expect_dtype(DType::kFloat32)
        .expect_same_device(logits).expect_contiguous();
    if (split_stats->size(0) < words) {
      split_stats->fail("must hold at least B * L * num_splits * 8 = " + std::to_string(words) +
                        " elements, got " + std::to_string(split_stats->size(0)));
    }
    if (reinterpret_cast<uintptr_t>(split_stats->data()) % 16 != 0) {
      split_stats->fail("must be 16-byte aligned");
    }
  }

  DenoiseArgs args{};
  args.logits = logits.data();
  args.tokens = tokens.data_as<int64_t>();
  args.num_transfer = num_transfer ? num_transfer->data_as<const int64_t>() : nullptr;
  args.x0 = x0.data_as<int64_t>();
  args.confidence = confidence.data_as<float>();
  args.transferred = transferred.data_as<bool>();
  args.logits_stride_b = logits.stride(0);
  args.logits_stride_l = logits.stride(1);
  args.tokens_stride_b = tokens.stride(0);
  args.tokens_stride_l = tokens.stride(1);
  args.num_transfer_stride = num_transfer ? num_transfer->stride(0) : 0;
  args.x0_stride_b = x0.stride(0);
  args.x0_stride_l = x0.stride(1);
  args.conf_stride_b = confidence.stride(0);
  args.conf_stride_l = confidence.stride(1);
  args.transferred_stride_b = transferred.stride(0);
  args.transferred_stride_l = transferred.stride(1);
  args.batch = batch;
  args.length = length;
  args.vocab = vocab;
  args.mask_id = options.mask_id;
  args.threshold = options.has_threshold ? options.threshold : 0.f;
  args.temperature = static_cast<float>(options.temperature);
  args.inv_temperature =
      options.temperature > 0 ? static_cast<float>(1.0 / options.temperature) : 0.f;
  args.seed = options.seed;
  args.remasking = options.remasking;
  args.dtype = logits.dtype();
  args.num_splits = options.num_splits;
  args.split_stats = options.num_splits > 1 ? split_stats->data_as<float>() : nullptr;
  if (batch == 0 || length == 0) return;
  set_device(logits.device_index());
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  A2R_DISPATCH_FLOAT(args.dtype, "denoise_step (logits)", T, launch_predict<T>(args, stream));

  const unsigned rows = static_cast<unsigned>(args.batch);
  if (args.length <= kSelectSmemMaxLen) {
    const size_t smem = static_cast<size_t>(args.length) * (sizeof(float) + 1);
    denoise_select_kernel<true><<<rows, kSelectThreads, smem, stream>>>(args);
  } else {
    denoise_select_kernel<false><<<rows, kSelectThreads, 0, stream>>>(args);
  }
  check_launch("denoise_select_kernel launch");
}

void denoise_predict_row_host(const float* row, int64_t vocab, float temperature,
                              float inv_temperature, Remasking remasking, uint64_t seed,
                              uint32_t pos, int64_t mask_id, int group_width, int num_splits,
                              int64_t* x0, float* confidence) {
  require(vocab >= 1 && vocab < (int64_t{1} << 31) - 16,
          "denoise_predict_row_host: vocab must be in [1, 2^31 - 16)");
  require(num_splits >= 1 && num_splits <= 65535,
          "denoise_predict_row_host: num_splits must be in [1, 65535]");
  const GumbelKey key{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), pos,
                      inv_temperature};
  require(mask_id >= 0 && mask_id < vocab, "denoise_predict_row_host: mask_id must be in [0, vocab)");
  const int v = static_cast<int>(vocab);
  const int no_prediction = static_cast<int>(mask_id);
  with_predict_variant(remasking, temperature > 0.f, [&](auto extra, auto sample) {
    constexpr Extra kExtra = decltype(extra)::value;
    constexpr bool kSample = decltype(sample)::value;
    switch (group_width) {  // 16 bytes of fp32 (4) or of fp16 / bf16 (8)
      case 4:
        predict_row_host<4, kExtra, kSample>(row, v, num_splits, remasking, key, no_prediction, x0,
                                             confidence);
        break;
      case 8:
        predict_row_host<8, kExtra, kSample>(row, v, num_splits, remasking, key, no_prediction, x0,
                                             confidence);
        break;
      default: throw std::invalid_argument("denoise_predict_row_host: group_width must be 4 or 8");
    }
  });
}

float philox_uniform_host(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  const Philox4 r = philox4x32_10(Philox4{c0, c1, c2, c3}, static_cast<uint32_t>(seed),
                                  static_cast<uint32_t>(seed >> 32));
  return uniform_open01(r.x);
}

int cuda_runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return version;
}

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver / no device" error
    return 0;
  }
  return count;
}

}  // namespace a2r
