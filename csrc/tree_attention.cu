// Tree decode attention (CUDA backend): per-work-item partial states, then the LSE merge.
//
// Contract (same as a2r_kernels/triton/attention.py and a2r_kernels/layout.py): a work item
// w = (q_start, q_len, page_start, kv_start, kv_end, partial_start) is one chunk of one tree node
// and the contiguous run of sequences (kernel positions q_start .. q_start + q_len) under it. For
// kv head h, all q_len * G query rows of the run (G = Hq / Hkv, row r -> local sequence r / G,
// q head h * G + r % G) are processed against the chunk's K/V, so a node's KV is streamed from
// DRAM once for every sequence that shares it (Hydragen / cascade attention, generalised to a
// tree). With more rows than one tile (kBlockM) the kernel loops over row tiles and the chunk is
// re-read from L2.
//
//   s_t          = sm_scale * <q[seq, qh], k_t>          t in [kv_start, kv_end) of the node
//   partial_lse  = log(sum_t exp(s_t))                   natural log, fp32
//   partial_o    = sum_t exp(s_t - partial_lse) v_t      fp32
//
// Token t of the node lives at k_cache[page_table[page_start + t / block_size],
// t % block_size, h, :]. Scores are kept in base 2 (sm_scale * log2(e) folded into q) and all
// accumulation is fp32.
//
// Kernel shape (SIMT; see README "CUDA backend" for what is left to do): 4 warps per CTA; a row
// tile is 16 query rows (4 per warp), a KV tile 32 tokens (one per lane when scoring). K, V and the
// pre-scaled Q tile are staged in shared memory; K rows are padded by 2 elements so that lane j
// reading row j is free of bank conflicts.
//
// merge_partials: one warp per (sequence, head): lse = logsumexp over the sequence's partial rows,
// out = sum_rows exp(lse_row - lse) o_row, written in the output dtype. merge_states is the same
// merge of two given states (ak.merge_attention_states). An empty set (no rows, or all -inf) gives
// out 0 and lse -inf, never NaN.

#include <algorithm>
#include <string>

#include "common.cuh"

namespace a2r {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;
constexpr int kBlockM = kWarps * kRowsPerWarp;  // query rows per row tile
constexpr int kBlockN = 32;                     // KV tokens per tile: one per lane when scoring
constexpr int kKPad = 2;  // K row padding (elements): row stride becomes an odd number of pairs

template <typename T, int D_PAD>
constexpr size_t partial_smem_bytes() {
  return sizeof(float) * kBlockM * D_PAD                  // q tile, fp32, pre-scaled
         + sizeof(T) * kBlockN * (D_PAD + kKPad)          // k tile, padded rows
         + sizeof(T) * kBlockN * D_PAD;                   // v tile
}

// Two elements of T stored as one 4-byte (16-bit T) or 8-byte (fp32) word.
template <typename T>
struct PairWord {
  using type = typename std::conditional<sizeof(T) == 2, uint32_t, uint2>::type;
};

// Stage one KV tile of `tile_len` tokens (tokens n0 .. n0 + tile_len of the node) of one kv head
// into shared memory; rows and columns past the data are zero-filled.
template <typename T, int D_PAD>
__device__ __forceinline__ void load_kv_tile(T* __restrict__ k_smem, T* __restrict__ v_smem,
                                             const T* __restrict__ k_cache,
                                             const T* __restrict__ v_cache,
                                             const int32_t* __restrict__ page_table,
                                             const TreePartialsArgs& args, int page_start,
                                             int n0, int tile_len, int kv_head, bool vec_ok) {
  constexpr int kVec = 16 / sizeof(T);       // elements per 16-byte load
  constexpr int kChunks = D_PAD / kVec;      // 16-byte chunks per padded row
  const int head_dim = static_cast<int>(args.head_dim);
  const int block_size = static_cast<int>(args.block_size);
  for (int idx = threadIdx.x; idx < kBlockN * kChunks; idx += kThreads) {
    const int j = idx / kChunks;
    const int d0 = (idx % kChunks) * kVec;
    alignas(16) T k_vals[kVec];
    alignas(16) T v_vals[kVec];
    if (j < tile_len && d0 < head_dim) {
      const int t = n0 + j;
      const int64_t page = page_table[page_start + t / block_size];
      const int64_t slot = t % block_size;
      const T* k_src = k_cache + page * args.k_stride.s0 + slot * args.k_stride.s1 +
                       kv_head * args.k_stride.s2 + d0;
      const T* v_src = v_cache + page * args.v_stride.s0 + slot * args.v_stride.s1 +
                       kv_head * args.v_stride.s2 + d0;
      if (vec_ok && d0 + kVec <= head_dim) {
        *reinterpret_cast<uint4*>(k_vals) = __ldg(reinterpret_cast<const uint4*>(k_src));
        *reinterpret_cast<uint4*>(v_vals) = __ldg(reinterpret_cast<const uint4*>(v_src));
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const bool inside = d0 + e < head_dim;
          k_vals[e] = inside ? k_src[e] : from_float<T>(0.f);
          v_vals[e] = inside ? v_src[e] : from_float<T>(0.f);
        }
      }
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        k_vals[e] = from_float<T>(0.f);
        v_vals[e] = from_float<T>(0.f);
      }
    }
    // K rows are padded (stride D_PAD + 2), so only pair-aligned stores are legal there.
    using Pair = typename PairWord<T>::type;
    Pair* k_dst = reinterpret_cast<Pair*>(k_smem + j * (D_PAD + kKPad) + d0);
    Pair* v_dst = reinterpret_cast<Pair*>(v_smem + j * D_PAD + d0);
#pragma unroll
    for (int e = 0; e < kVec / 2; ++e) {
      k_dst[e] = reinterpret_cast<const Pair*>(k_vals)[e];
      v_dst[e] = reinterpret_cast<const Pair*>(v_vals)[e];
    }
  }
}

template <typename T, int D_PAD>
__global__ void __launch_bounds__(kThreads)
tree_attention_partials_kernel(const TreePartialsArgs args, float qk_scale_log2, bool vec_ok) {
  static_assert(D_PAD % 32 == 0, "D_PAD must be a multiple of 32");
  constexpr int kPerLane = D_PAD / 32;  // output columns per lane: d = lane + 32 * i
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* q_smem = reinterpret_cast<float*>(smem_raw);
  T* k_smem = reinterpret_cast<T*>(q_smem + kBlockM * D_PAD);
  T* v_smem = k_smem + kBlockN * (D_PAD + kKPad);

  const T* __restrict__ q = static_cast<const T*>(args.q);
  const T* __restrict__ k_cache = static_cast<const T*>(args.k_cache);
  const T* __restrict__ v_cache = static_cast<const T*>(args.v_cache);

  const int32_t* info = args.work_info + static_cast<int64_t>(blockIdx.x) * kWorkInfoColumns;
  const int q_start = info[0];
  const int q_len = info[1];
  const int page_start = info[2];
  const int kv_start = info[3];
  const int kv_end = info[4];
  const int partial_start = info[5];
  const int kv_head = blockIdx.y;
  const int group = static_cast<int>(args.num_q_heads / args.num_kv_heads);
  const int num_rows = q_len * group;
  const int head_dim = static_cast<int>(args.head_dim);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  for (int row0 = 0; row0 < num_rows; row0 += kBlockM) {
    __syncthreads();  // the previous row tile is done with q_smem
    for (int idx = threadIdx.x; idx < kBlockM * D_PAD; idx += kThreads) {
      const int m = idx / D_PAD;
      const int d = idx % D_PAD;
      const int row = row0 + m;
      float value = 0.f;
      if (row < num_rows && d < head_dim) {
        const int64_t seq = args.row_seq[q_start + row / group];
        const int64_t q_head = static_cast<int64_t>(kv_head) * group + row % group;
        value = to_float(q[seq * args.q_stride.s0 + q_head * args.q_stride.s1 + d]) *
                qk_scale_log2;
      }
      q_smem[idx] = value;
    }

    float row_max[kRowsPerWarp];
    float row_sum[kRowsPerWarp];
    float acc[kRowsPerWarp][kPerLane];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      row_max[r] = kNegInf;
      row_sum[r] = 0.f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[r][i] = 0.f;
    }
    const float* q_rows = q_smem + warp * kRowsPerWarp * D_PAD;

    for (int n0 = kv_start; n0 < kv_end; n0 += kBlockN) {
      const int tile_len = min(kBlockN, kv_end - n0);
      __syncthreads();  // every warp is done with the previous KV tile (and q_smem is written)
      load_kv_tile<T, D_PAD>(k_smem, v_smem, k_cache, v_cache, args.page_table, args, page_start,
                             n0, tile_len, kv_head, vec_ok);
      __syncthreads();

      // Scores: lane j scores token n0 + j against the warp's rows (q reads are broadcasts).
      float score[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) score[r] = 0.f;
      const T* k_row = k_smem + lane * (D_PAD + kKPad);
#pragma unroll 8
      for (int d = 0; d < D_PAD; d += 2) {
        const float2 k2 = load_float2<T>(k_row + d);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const float2 q2 = *reinterpret_cast<const float2*>(q_rows + r * D_PAD + d);
          score[r] = fmaf(q2.x, k2.x, fmaf(q2.y, k2.y, score[r]));
        }
      }

      // Online softmax (base 2). tile_len >= 1, so every tile max is finite.
      float prob[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const float s = lane < tile_len ? score[r] : kNegInf;
        const float new_max = fmaxf(row_max[r], warp_max(s));
        const float rescale = exp2f(row_max[r] - new_max);  // 0 on the first tile
        prob[r] = exp2f(s - new_max);
        row_sum[r] = row_sum[r] * rescale + warp_sum(prob[r]);
        row_max[r] = new_max;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) acc[r][i] *= rescale;
      }

      // acc += P V: token j's probability is broadcast from lane j.
      for (int j = 0; j < tile_len; ++j) {
        float p_j[kRowsPerWarp];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) p_j[r] = __shfl_sync(kFullMask, prob[r], j);
        const T* v_row = v_smem + j * D_PAD;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const float v = to_float(v_row[lane + 32 * i]);
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) acc[r][i] = fmaf(p_j[r], v, acc[r][i]);
        }
      }
    }

#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = row0 + warp * kRowsPerWarp + r;
      if (row >= num_rows) continue;
      const int64_t partial_row = partial_start + row / group;
      const int64_t q_head = static_cast<int64_t>(kv_head) * group + row % group;
      const bool nonempty = row_sum[r] > 0.f;  // false only for an empty chunk
      const float inv_sum = nonempty ? 1.f / row_sum[r] : 0.f;
      float* o_dst = args.partial_o + partial_row * args.po_stride.s0 + q_head * args.po_stride.s1;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < head_dim) o_dst[d] = acc[r][i] * inv_sum;
      }
      if (lane == 0) {
        args.partial_lse[partial_row * args.plse_stride.s0 + q_head * args.plse_stride.s1] =
            nonempty ? (row_max[r] + log2f(row_sum[r])) * kLn2 : kNegInf;
      }
    }
  }
}

template <typename TOut>
__global__ void __launch_bounds__(kThreads) merge_partials_kernel(const MergePartialsArgs args) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (pair >= args.num_seqs * args.num_heads) return;
  const int lane = threadIdx.x % 32;
  const int64_t seq = pair / args.num_heads;
  const int64_t head = pair % args.num_heads;
  const int begin = args.merge_indptr[seq];
  const int end = args.merge_indptr[seq + 1];
  auto lse_of = [&](int i) {
    const int64_t row = args.merge_rows[i];
    return args.partial_lse[row * args.plse_stride.s0 + head * args.plse_stride.s1];
  };

  float max_lse = kNegInf;
  for (int i = begin + lane; i < end; i += 32) max_lse = fmaxf(max_lse, lse_of(i));
  max_lse = warp_max(max_lse);
  float sum = 0.f;
  if (max_lse != kNegInf) {
    for (int i = begin + lane; i < end; i += 32) sum += expf(lse_of(i) - max_lse);
  }
  sum = warp_sum(sum);
  const bool nonempty = sum > 0.f;
  const float lse = nonempty ? max_lse + logf(sum) : kNegInf;

  TOut* out = static_cast<TOut*>(args.out) + seq * args.out_stride.s0 + head * args.out_stride.s1;
  for (int d = lane; d < args.head_dim; d += 32) {
    float value = 0.f;
    if (nonempty) {
      for (int i = begin; i < end; ++i) {
        const float weight = expf(lse_of(i) - lse);
        // An empty partial (lse -inf, weight 0) contributes nothing, whatever its o holds.
        if (weight > 0.f) {
          const int64_t row = args.merge_rows[i];
          value = fmaf(weight, args.partial_o[row * args.po_stride.s0 + head * args.po_stride.s1 + d],
                       value);
        }
      }
    }
    out[d] = from_float<TOut>(value);
  }
  if (lane == 0) args.lse[seq * args.lse_stride.s0 + head * args.lse_stride.s1] = lse;
}

template <typename TIn, typename TOut>
__global__ void __launch_bounds__(kThreads) merge_states_kernel(const MergeStatesArgs args) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (pair >= args.num_seqs * args.num_heads) return;
  const int lane = threadIdx.x % 32;
  const int64_t seq = pair / args.num_heads;
  const int64_t head = pair % args.num_heads;
  const float lse_a = args.lse_a[seq * args.lse_a_stride.s0 + head * args.lse_a_stride.s1];
  const float lse_b = args.lse_b[seq * args.lse_b_stride.s0 + head * args.lse_b_stride.s1];
  const float max_lse = fmaxf(lse_a, lse_b);
  const float ref = max_lse == kNegInf ? 0.f : max_lse;
  const float w_a = expf(lse_a - ref);
  const float w_b = expf(lse_b - ref);
  const float sum = w_a + w_b;
  const bool nonempty = sum > 0.f;
  const float inv_sum = nonempty ? 1.f / sum : 0.f;
  const TIn* a = static_cast<const TIn*>(args.out_a) + seq * args.a_stride.s0 + head * args.a_stride.s1;
  const TIn* b = static_cast<const TIn*>(args.out_b) + seq * args.b_stride.s0 + head * args.b_stride.s1;
  TOut* out = static_cast<TOut*>(args.out) + seq * args.out_stride.s0 + head * args.out_stride.s1;
  for (int d = lane; d < args.head_dim; d += 32) {
    float value = 0.f;
    if (w_a > 0.f) value += w_a * to_float(a[d]);
    if (w_b > 0.f) value += w_b * to_float(b[d]);
    out[d] = from_float<TOut>(value * inv_sum);
  }
  if (lane == 0) {
    args.lse[seq * args.lse_stride.s0 + head * args.lse_stride.s1] =
        nonempty ? ref + logf(sum) : kNegInf;
  }
}

// ------------------------------------------------------------------------------------ host

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, int D_PAD>
void launch_partials(const TreePartialsArgs& args, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = aligned16(args.k_cache) && aligned16(args.v_cache) &&
                      args.k_stride.s0 % kVec == 0 && args.k_stride.s1 % kVec == 0 &&
                      args.k_stride.s2 % kVec == 0 && args.v_stride.s0 % kVec == 0 &&
                      args.v_stride.s1 % kVec == 0 && args.v_stride.s2 % kVec == 0;
  constexpr size_t smem = partial_smem_bytes<T, D_PAD>();
  auto kernel = tree_attention_partials_kernel<T, D_PAD>;
  if (smem > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               "cudaFuncSetAttribute(tree_attention_partials_kernel)");
  }
  const dim3 grid(static_cast<unsigned>(args.num_work), static_cast<unsigned>(args.num_kv_heads));
  kernel<<<grid, kThreads, smem, stream>>>(args, args.sm_scale * kLog2e, vec_ok);
  check_launch("tree_attention_partials_kernel launch");
}

template <typename T>
void dispatch_head_dim(const TreePartialsArgs& args, cudaStream_t stream) {
  const int64_t d = args.head_dim;
  if (d <= 32) return launch_partials<T, 32>(args, stream);
  if (d <= 64) return launch_partials<T, 64>(args, stream);
  if (d <= 96) return launch_partials<T, 96>(args, stream);
  if (d <= 128) return launch_partials<T, 128>(args, stream);
  return launch_partials<T, 256>(args, stream);
}

template <typename TOut>
void launch_merge_partials(const MergePartialsArgs& args, cudaStream_t stream) {
  const int64_t pairs = args.num_seqs * args.num_heads;
  const unsigned blocks = static_cast<unsigned>((pairs + kWarps - 1) / kWarps);
  merge_partials_kernel<TOut><<<blocks, kThreads, 0, stream>>>(args);
  check_launch("merge_partials_kernel launch");
}

template <typename TIn, typename TOut>
void launch_merge_states(const MergeStatesArgs& args, cudaStream_t stream) {
  const int64_t pairs = args.num_seqs * args.num_heads;
  const unsigned blocks = static_cast<unsigned>((pairs + kWarps - 1) / kWarps);
  merge_states_kernel<TIn, TOut><<<blocks, kThreads, 0, stream>>>(args);
  check_launch("merge_states_kernel launch");
}

// A float tensor [d0, d1, D] with unit stride in D, on `device`.
void expect_rows(const TensorView& t, const char* shape_doc, const TensorView& device) {
  t.expect(3, shape_doc).expect_float().expect_same_device(device).expect_unit_last_stride();
}

// An fp32 [d0, d1] tensor on `device`.
void expect_lse(const TensorView& t, const char* shape_doc, const TensorView& device) {
  t.expect(2, shape_doc).expect_dtype(DType::kFloat32).expect_same_device(device);
}

// A contiguous int32 tensor of rank `ndim` on `device`.
void expect_plan(const TensorView& t, int ndim, const char* shape_doc, const TensorView& device) {
  t.expect(ndim, shape_doc).expect_dtype(DType::kInt32).expect_same_device(device)
      .expect_contiguous();
}

Strides3 strides3(const TensorView& t) { return {t.stride(0), t.stride(1)}; }
Strides2 strides2(const TensorView& t) { return {t.stride(0), t.stride(1)}; }

}  // namespace

void tree_attention_partials(const TensorView& q, const TensorView& k_cache,
                             const TensorView& v_cache, const TensorView& work_info,
                             const TensorView& row_seq, const TensorView& page_table,
                             const TensorView& partial_o, const TensorView& partial_lse,
                             float sm_scale, uintptr_t stream_handle) {
  expect_rows(q, "[S, Hq, D]", q);
  const int64_t num_seqs = q.size(0), num_q_heads = q.size(1), head_dim = q.size(2);
  // The kernels are instantiated for head_dim up to kMaxHeadDim: a longer row overruns the tiles.
  if (head_dim < 1 || head_dim > kMaxHeadDim) {
    q.fail("must have head_dim (shape[2]) in [1, " + std::to_string(kMaxHeadDim) + "], got " +
           std::to_string(head_dim));
  }
  k_cache.expect(4, "[num_blocks, block_size, Hkv, D]").expect_dtype(q.dtype())
      .expect_same_device(q).expect_unit_last_stride().expect_size(3, head_dim, "q's head_dim");
  v_cache.expect(4, "[num_blocks, block_size, Hkv, D]").expect_dtype(q.dtype())
      .expect_same_device(q).expect_unit_last_stride();
  for (int d = 0; d < 4; ++d) v_cache.expect_size(d, k_cache.size(d), "k_cache's");
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  if (block_size < 1) k_cache.fail("must have block_size (shape[1]) >= 1");
  // Hkv is the grid's y dimension. (That Hq is a multiple of Hkv is the public op's check: any
  // ratio stays in bounds, q head h * (Hq / Hkv) + g < Hq.)
  if (num_kv_heads < 1 || num_kv_heads > 65535) {
    k_cache.fail("must have Hkv (shape[2]) in [1, 65535], got " + std::to_string(num_kv_heads));
  }
  expect_plan(work_info, 2, "int32 [W, kWorkInfoColumns]", q);
  work_info.expect_size(1, kWorkInfoColumns, "kWorkInfoColumns");
  if (work_info.size(0) >= (int64_t{1} << 31)) work_info.fail("must have fewer than 2^31 rows");
  expect_plan(row_seq, 1, "int32 [S]", q);
  row_seq.expect_size(0, num_seqs, "q's S");
  expect_plan(page_table, 1, "int32 [P]", q);
  expect_rows(partial_o, "fp32 [R, Hq, D]", q);
  partial_o.expect_dtype(DType::kFloat32).expect_size(1, num_q_heads, "Hq")
      .expect_size(2, head_dim, "D");
  expect_lse(partial_lse, "fp32 [R, Hq]", q);
  partial_lse.expect_size(0, partial_o.size(0), "partial_o's R").expect_size(1, num_q_heads, "Hq");
  if (work_info.size(0) == 0) return;

  TreePartialsArgs args{};
  args.q = q.data();
  args.k_cache = k_cache.data();
  args.v_cache = v_cache.data();
  args.work_info = work_info.data_as<const int32_t>();
  args.row_seq = row_seq.data_as<const int32_t>();
  args.page_table = page_table.data_as<const int32_t>();
  args.partial_o = partial_o.data_as<float>();
  args.partial_lse = partial_lse.data_as<float>();
  args.q_stride = strides3(q);
  args.k_stride = {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  args.v_stride = {v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  args.po_stride = strides3(partial_o);
  args.plse_stride = strides2(partial_lse);
  args.num_work = work_info.size(0);
  args.num_seqs = num_seqs;
  args.num_q_heads = num_q_heads;
  args.num_kv_heads = num_kv_heads;
  args.head_dim = head_dim;
  args.block_size = block_size;
  args.sm_scale = sm_scale;
  args.dtype = q.dtype();
  set_device(q.device_index());
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  A2R_DISPATCH_FLOAT(args.dtype, "tree_attention_partials", T,
                     dispatch_head_dim<T>(args, stream));
}

void merge_partials(const TensorView& partial_o, const TensorView& partial_lse,
                    const TensorView& merge_indptr, const TensorView& merge_rows,
                    const TensorView& out, const TensorView& lse, uintptr_t stream_handle) {
  expect_rows(out, "[S, H, D]", out);
  const int64_t num_seqs = out.size(0), num_heads = out.size(1), head_dim = out.size(2);
  expect_rows(partial_o, "fp32 [R, H, D]", out);
  partial_o.expect_dtype(DType::kFloat32).expect_size(1, num_heads, "out's H")
      .expect_size(2, head_dim, "out's D");
  expect_lse(partial_lse, "fp32 [R, H]", out);
  partial_lse.expect_size(0, partial_o.size(0), "partial_o's R").expect_size(1, num_heads, "H");
  expect_plan(merge_indptr, 1, "int32 [S + 1]", out);
  merge_indptr.expect_size(0, num_seqs + 1, "S + 1");
  expect_plan(merge_rows, 1, "int32 [M]", out);
  expect_lse(lse, "fp32 [S, H]", out);
  lse.expect_size(0, num_seqs, "S").expect_size(1, num_heads, "H");
  const int64_t pairs = num_seqs * num_heads;
  if (pairs / kWarps >= (int64_t{1} << 31)) out.fail("has too many (sequence, head) pairs");
  if (pairs == 0) return;

  MergePartialsArgs args{};
  args.partial_o = partial_o.data_as<const float>();
  args.partial_lse = partial_lse.data_as<const float>();
  args.merge_indptr = merge_indptr.data_as<const int32_t>();
  args.merge_rows = merge_rows.data_as<const int32_t>();
  args.out = out.data();
  args.lse = lse.data_as<float>();
  args.po_stride = strides3(partial_o);
  args.plse_stride = strides2(partial_lse);
  args.out_stride = strides3(out);
  args.lse_stride = strides2(lse);
  args.num_seqs = num_seqs;
  args.num_heads = num_heads;
  args.head_dim = head_dim;
  args.out_dtype = out.dtype();
  set_device(out.device_index());
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  A2R_DISPATCH_FLOAT(args.out_dtype, "merge_partials (out)", TOut,
                     launch_merge_partials<TOut>(args, stream));
}

void merge_states(const TensorView& out_a, const TensorView& lse_a, const TensorView& out_b,
                  const TensorView& lse_b, const TensorView& out, const TensorView& lse,
                  uintptr_t stream_handle) {
  expect_rows(out_a, "[S, H, D]", out_a);
  const int64_t num_seqs = out_a.size(0), num_heads = out_a.size(1), head_dim = out_a.size(2);
  expect_rows(out_b, "[S, H, D]", out_a);
  out_b.expect_dtype(out_a.dtype());
  expect_rows(out, "[S, H, D]", out_a);
  for (int d = 0; d < 3; ++d) {
    out_b.expect_size(d, out_a.size(d), "out_a's");
    out.expect_size(d, out_a.size(d), "out_a's");
  }
  for (const TensorView* t : {&lse_a, &lse_b, &lse}) {
    expect_lse(*t, "fp32 [S, H]", out_a);
    t->expect_size(0, num_seqs, "S").expect_size(1, num_heads, "H");
  }
  const int64_t pairs = num_seqs * num_heads;
  if (pairs / kWarps >= (int64_t{1} << 31)) out_a.fail("has too many (sequence, head) pairs");
  if (pairs == 0) return;

  MergeStatesArgs args{};
  args.out_a = out_a.data();
  args.lse_a = lse_a.data_as<const float>();
  args.out_b = out_b.data();
  args.lse_b = lse_b.data_as<const float>();
  args.out = out.data();
  args.lse = lse.data_as<float>();
  args.a_stride = strides3(out_a);
  args.b_stride = strides3(out_b);
  args.out_stride = strides3(out);
  args.lse_a_stride = strides2(lse_a);
  args.lse_b_stride = strides2(lse_b);
  args.lse_stride = strides2(lse);
  args.num_seqs = num_seqs;
  args.num_heads = num_heads;
  args.head_dim = head_dim;
  args.in_dtype = out_a.dtype();
  args.out_dtype = out.dtype();
  set_device(out_a.device_index());
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  A2R_DISPATCH_FLOAT(args.in_dtype, "merge_states (out_a)", TIn, {
    A2R_DISPATCH_FLOAT(args.out_dtype, "merge_states (out)", TOut,
                       (launch_merge_states<TIn, TOut>(args, stream)));
  });
}

}  // namespace a2r
