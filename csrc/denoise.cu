// One masked iterative-denoising step (CUDA backend of ak.denoise_step), two launches.
//
// 1. denoise_predict_kernel, one CTA per position (b, l). An unmasked position (token != mask_id)
//    never reads its logits: x0 = token, confidence = -inf. A masked position makes one pass over
//    its V logits keeping, per thread and then per CTA, in fp32:
//      max m, Z = sum_v exp(x_v - m), Zx = sum_v exp(x_v - m) (x_v - m)    (online, rescaled)
//      top-1 (value, lowest index) and top-2 value of x
//      for temperature T > 0: the Gumbel-max argmax of x_v / T - log(-log u_v)
//    and writes
//      x0         = argmax_v x_v (T == 0; ties -> lowest index) or the Gumbel-max sample
//      confidence = p(x0) = exp(x_x0 - m) / Z                    ("low_confidence")
//                   p1 - p2 = (exp(top1 - m) - exp(top2 - m)) / Z ("margin")
//                   -H(p) = Zx / Z - log Z                        ("entropy")
//                   u ~ U(0, 1)                                   ("random")
//    from the untempered softmax p = softmax(x).
// 2. denoise_select_kernel, one CTA per row b: among the masked positions of the row, position i
//    is committed when rank_i < k (top-k mode, k = clamp(num_transfer[b], 0, #masked)) or when
//    confidence_i >= threshold or rank_i == 0 (threshold mode: at least the most confident one),
//    where rank_i = #{masked j : c_j > c_i or (c_j == c_i and j < i)} (ties -> lower position).
//    transferred[b, i] is written for every position and tokens[b, i] = x0[b, i] where committed.
//
// Random numbers (the layout of a2r_kernels/reference_denoise.py and the Triton backend, so a
// seeded step samples the same tokens on every backend up to fp32 rounding): Philox4x32-10
// (Salmon et al., SC'11; the generator of curand and of Triton's tl.philox), key
// (seed & 0xffffffff, seed >> 32); the first output word r of counter (c0, c1, c2, c3) becomes
// u = ((r >> 9) + 0.5) * 2^-23, in [2^-24, 1 - 2^-24], so log(-log u) is always finite.
//   Gumbel noise of vocabulary entry v at flat position pos = b * L + l: counter (v, pos, 0, 0)
//   "random" remasking score of position pos:                            counter (0, pos, 1, 0)

#include <climits>
#include <string>

#include "common.cuh"

namespace a2r {
namespace {

constexpr int kPredictThreads = 256;
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
// Running statistics of one position's logits (per thread, then merged across the CTA).
struct VocabStats {
  float max;        // m
  float sum;        // Z  = sum exp(x - m)
  float sum_xs;     // Zx = sum exp(x - m) (x - m)
  float top1;       // largest x, at index top1_idx (lowest index among ties)
  int top1_idx;
  float top2;       // second largest x (equal to top1 when the maximum is repeated)
  float best_key;   // largest Gumbel key x / T - log(-log u), at best_idx
  int best_idx;
  float best_logit; // x at best_idx
};

A2R_HD VocabStats empty_stats() {
  return VocabStats{kNegInf, 0.f, 0.f, kNegInf, INT_MAX, kNegInf, kNegInf, INT_MAX, kNegInf};
}

A2R_HD bool beats(float value, int idx, float best, int best_idx) {
  return value > best || (value == best && idx < best_idx);
}

A2R_HD void add_logit(VocabStats& st, float x, int idx) {
  if (beats(x, idx, st.top1, st.top1_idx)) {
    st.top2 = st.top1;
    st.top1 = x;
    st.top1_idx = idx;
  } else if (x > st.top2) {
    st.top2 = x;
  }
  if (!(x > kNegInf)) return;  // -inf (and NaN) carry no probability mass
  if (x > st.max) {
    if (st.max == kNegInf) {
      st.sum = 1.f;
      st.sum_xs = 0.f;
    } else {
      const float delta = st.max - x;  // < 0
      const float scale = fast_exp(delta);
      st.sum_xs = (st.sum_xs + st.sum * delta) * scale;
      st.sum = st.sum * scale + 1.f;
    }
    st.max = x;
  } else {
    const float z = x - st.max;
    const float e = fast_exp(z);
    st.sum += e;
    st.sum_xs = fmaf(e, z, st.sum_xs);
  }
}

A2R_HD void add_gumbel(VocabStats& st, float x, int idx, float inv_temperature,
                                           uint32_t bits) {
  if (!(x > kNegInf)) return;
  const float u = uniform_open01(bits);
  // Unfused multiply and add, rounded as the reference's `x * (1 / T) + g` in torch.
  const float key = mul_add_unfused(x, inv_temperature, -logf(-logf(u)));
  if (beats(key, idx, st.best_key, st.best_idx)) {
    st.best_key = key;
    st.best_idx = idx;
    st.best_logit = x;
  }
}

A2R_HD void merge_stats(VocabStats& a, const VocabStats& b) {
  const float m = fmaxf(a.max, b.max);
  if (m == kNegInf) {
    a.sum = 0.f;
    a.sum_xs = 0.f;
  } else {
    float sum = 0.f, sum_xs = 0.f;
    if (a.max != kNegInf) {
      const float delta = a.max - m, scale = fast_exp(delta);
      sum += a.sum * scale;
      sum_xs += (a.sum_xs + a.sum * delta) * scale;
    }
    if (b.max != kNegInf) {
      const float delta = b.max - m, scale = fast_exp(delta);
      sum += b.sum * scale;
      sum_xs += (b.sum_xs + b.sum * delta) * scale;
    }
    a.sum = sum;
    a.sum_xs = sum_xs;
  }
  a.max = m;
  if (beats(b.top1, b.top1_idx, a.top1, a.top1_idx)) {
    a.top2 = fmaxf(b.top2, a.top1);
    a.top1 = b.top1;
    a.top1_idx = b.top1_idx;
  } else {
    a.top2 = fmaxf(a.top2, b.top1);
  }
  if (beats(b.best_key, b.best_idx, a.best_key, a.best_idx)) {
    a.best_key = b.best_key;
    a.best_idx = b.best_idx;
    a.best_logit = b.best_logit;
  }
}

__device__ __forceinline__ VocabStats shfl_xor_stats(const VocabStats& s, int offset) {
  VocabStats o;
  o.max = __shfl_xor_sync(kFullMask, s.max, offset);
  o.sum = __shfl_xor_sync(kFullMask, s.sum, offset);
  o.sum_xs = __shfl_xor_sync(kFullMask, s.sum_xs, offset);
  o.top1 = __shfl_xor_sync(kFullMask, s.top1, offset);
  o.top1_idx = __shfl_xor_sync(kFullMask, s.top1_idx, offset);
  o.top2 = __shfl_xor_sync(kFullMask, s.top2, offset);
  o.best_key = __shfl_xor_sync(kFullMask, s.best_key, offset);
  o.best_idx = __shfl_xor_sync(kFullMask, s.best_idx, offset);
  o.best_logit = __shfl_xor_sync(kFullMask, s.best_logit, offset);
  return o;
}

// x0 and confidence of one masked position from its merged statistics (see the header comment).
A2R_HD void finish_position(const VocabStats& st, bool sample, Remasking remasking, uint32_t pos32,
                            uint32_t key0, uint32_t key1, int& x0, float& confidence) {
  const bool sampled = sample && st.best_idx != INT_MAX;
  x0 = sampled ? st.best_idx : st.top1_idx;
  if (x0 == INT_MAX) x0 = 0;  // only for rows of NaN logits
  const float x0_logit = sampled ? st.best_logit : st.top1;
  const bool has_mass = st.sum > 0.f;
  const float inv_sum = has_mass ? 1.f / st.sum : 0.f;
  switch (remasking) {
    case Remasking::kMargin:
      confidence = (fast_exp(st.top1 - st.max) - fast_exp(st.top2 - st.max)) * inv_sum;
      break;
    case Remasking::kEntropy:
      confidence = has_mass ? st.sum_xs * inv_sum - logf(st.sum) : 0.f;
      break;
    case Remasking::kRandom: {
      const Philox4 r = philox4x32_10(Philox4{0u, pos32, kRandomScoreStream, 0u}, key0, key1);
      confidence = uniform_open01(r.x);
      break;
    }
    case Remasking::kLowConfidence:
    default:
      confidence = x0_logit > kNegInf ? fast_exp(x0_logit - st.max) * inv_sum : 0.f;
      break;
  }
}

// Four consecutive logits v0 .. v0 + 3 (fewer at the end of the row) as floats.
template <typename T>
__device__ __forceinline__ void load4(const T* __restrict__ row, int v0, int vocab, bool vec_ok,
                                      float (&x)[4]) {
  if (vec_ok && v0 + 4 <= vocab) {
    if constexpr (sizeof(T) == 4) {
      const float4 f = __ldg(reinterpret_cast<const float4*>(row + v0));
      x[0] = f.x; x[1] = f.y; x[2] = f.z; x[3] = f.w;
    } else {
      const uint2 raw = __ldg(reinterpret_cast<const uint2*>(row + v0));
      const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < 4; ++e) x[e] = to_float(h[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) x[e] = v0 + e < vocab ? to_float(row[v0 + e]) : kNegInf;
  }
}

template <typename T>
__global__ void __launch_bounds__(kPredictThreads)
denoise_predict_kernel(const DenoiseArgs args, bool vec_ok) {
  const int64_t pos = blockIdx.x;
  const int64_t b = pos / args.length;
  const int64_t l = pos % args.length;
  const int64_t token = args.tokens[b * args.tokens_stride_b + l * args.tokens_stride_l];
  int64_t* x0_out = args.x0 + b * args.x0_stride_b + l * args.x0_stride_l;
  float* conf_out = args.confidence + b * args.conf_stride_b + l * args.conf_stride_l;
  if (token != args.mask_id) {  // unmasked: its logits are never read
    if (threadIdx.x == 0) {
      *x0_out = token;
      *conf_out = kNegInf;
    }
    return;
  }

  const T* __restrict__ row =
      static_cast<const T*>(args.logits) + b * args.logits_stride_b + l * args.logits_stride_l;
  const int vocab = static_cast<int>(args.vocab);
  const bool sample = args.temperature > 0.f;
  const float inv_temperature = args.inv_temperature;
  const uint32_t key0 = static_cast<uint32_t>(args.seed);
  const uint32_t key1 = static_cast<uint32_t>(args.seed >> 32);
  const uint32_t pos32 = static_cast<uint32_t>(pos);  // B * L < 2^31 (checked on the host)

  VocabStats st = empty_stats();
  const int num_groups = (vocab + 3) / 4;
  for (int g = threadIdx.x; g < num_groups; g += kPredictThreads) {
    float x[4];
    load4<T>(row, 4 * g, vocab, vec_ok, x);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (4 * g + e < vocab) add_logit(st, x[e], 4 * g + e);
    }
    if (sample) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int v = 4 * g + e;
        if (v < vocab) {
          const Philox4 r = philox4x32_10(Philox4{static_cast<uint32_t>(v), pos32, kGumbelStream, 0u},
                                          key0, key1);
          add_gumbel(st, x[e], v, inv_temperature, r.x);
        }
      }
    }
  }

  // CTA reduction: warps by shuffles, then warp 0 over the per-warp results.
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) merge_stats(st, shfl_xor_stats(st, offset));
  __shared__ VocabStats warp_stats[kPredictThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_stats[warp] = st;
  __syncthreads();
  if (threadIdx.x != 0) return;
  st = warp_stats[0];
  for (int w = 1; w < kPredictThreads / 32; ++w) merge_stats(st, warp_stats[w]);

  int x0;
  float confidence;
  finish_position(st, sample, args.remasking, pos32, key0, key1, x0, confidence);
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

  auto is_masked = [&](int j) -> bool {
    if constexpr (kStageInSmem) return sm_masked[j] != 0;
    else return tokens_row[j * args.tokens_stride_l] == args.mask_id;
  };
  auto conf_of = [&](int j) -> float {
    if constexpr (kStageInSmem) return sm_conf[j];
    else return conf_row[j * args.conf_stride_l];
  };

  int count = 0;
  for (int i = threadIdx.x; i < length; i += kSelectThreads) {
    const bool masked = tokens_row[i * args.tokens_stride_l] == args.mask_id;
    if constexpr (kStageInSmem) {
      sm_masked[i] = masked;
      sm_conf[i] = conf_row[i * args.conf_stride_l];
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
  const bool vec_ok = reinterpret_cast<uintptr_t>(args.logits) % (4 * sizeof(T)) == 0 &&
                      args.logits_stride_b % 4 == 0 && args.logits_stride_l % 4 == 0;
  const unsigned blocks = static_cast<unsigned>(args.batch * args.length);
  denoise_predict_kernel<T><<<blocks, kPredictThreads, 0, stream>>>(args, vec_ok);
  check_launch("denoise_predict_kernel launch");
}

}  // namespace

void denoise_step(const DenoiseArgs& args, int device, uintptr_t stream_handle) {
  require(args.batch >= 0 && args.length >= 0, "denoise_step: batch and length must be >= 0");
  require(args.batch * args.length < (int64_t{1} << 31),
          "denoise_step: logits must have fewer than 2^31 positions (B * L)");
  require(args.batch < (int64_t{1} << 31), "denoise_step: batch must be < 2^31");
  require(args.length < (int64_t{1} << 30), "denoise_step: length must be < 2^30");
  require(args.vocab >= 1 && args.vocab < (int64_t{1} << 31) - 4,
          "denoise_step: vocab (logits.shape[2]) must be in [1, 2^31 - 4)");
  require(args.temperature >= 0.f, "denoise_step: temperature must be >= 0");
  if (args.batch == 0 || args.length == 0) return;
  set_device(device);
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
                              uint32_t pos, int64_t* x0, float* confidence) {
  // The kernel's work split: thread t takes groups t, t + kPredictThreads, ...; the per-thread
  // states are then merged (the kernel merges pairwise by warps; any order is equivalent).
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  const bool sample = temperature > 0.f;
  const int num_groups = static_cast<int>((vocab + 3) / 4);
  VocabStats total = empty_stats();
  for (int t = 0; t < kPredictThreads; ++t) {
    VocabStats st = empty_stats();
    for (int g = t; g < num_groups; g += kPredictThreads) {
      for (int e = 0; e < 4; ++e) {
        const int v = 4 * g + e;
        if (v >= vocab) continue;
        add_logit(st, row[v], v);
        if (sample) {
          const Philox4 r = philox4x32_10(Philox4{static_cast<uint32_t>(v), pos, kGumbelStream, 0u},
                                          key0, key1);
          add_gumbel(st, row[v], v, inv_temperature, r.x);
        }
      }
    }
    merge_stats(total, st);
  }
  int token;
  finish_position(total, sample, remasking, pos, key0, key1, token, *confidence);
  *x0 = token;
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
