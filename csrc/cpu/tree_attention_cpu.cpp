// Entry points of the CPU tree attention (tree_attention_cpu.h): memory checks, the choice of
// instruction set for the partial kernel, per-thread scratch, and the two LSE merges.
//
// Unlike the CUDA entry points, these also validate the values inside the plan tensors (row ids,
// page ids, partial rows): on the host that costs one pass over the plan and no device sync, and
// a wrong plan then raises ValueError instead of reading outside the pool.
#include "tree_attention_cpu.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../ops.h"

namespace a2r {
namespace cpu {
namespace {

// ------------------------------------------------------------------------- instruction sets
enum class Isa : int { kBaseline = 0, kAvx2 = 1 };

bool cpu_has_avx2() {
#if defined(A2R_CPU_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

Isa parse_isa(const char* name) {
  const std::string s = name == nullptr ? "auto" : name;
  if (s.empty() || s == "auto") return cpu_has_avx2() ? Isa::kAvx2 : Isa::kBaseline;
  if (s == "baseline") return Isa::kBaseline;
  if (s == "avx2") {
    if (!cpu_has_avx2()) {
      throw std::invalid_argument("isa 'avx2' needs a CPU with AVX2, FMA and F16C (this one "
                                  "lacks one of them, or this is not an x86-64 build)");
    }
    return Isa::kAvx2;
  }
  throw std::invalid_argument("isa must be 'auto', 'avx2' or 'baseline', got '" + s + "'");
}

// A2R_CPU_ISA (auto | avx2 | baseline) picks the first value; select_isa changes it.
std::atomic<int>& isa_setting() {
  static std::atomic<int> isa{static_cast<int>(parse_isa(std::getenv("A2R_CPU_ISA")))};
  return isa;
}

int resolve_threads(int num_threads) {
#if defined(_OPENMP)
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  return 1;
#endif
}

// ------------------------------------------------------------------------- output rounding
uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as torch's .to(bfloat16); NaN stays a (quiet) NaN.
uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Round to nearest even, as torch's .to(float16): overflow to inf, subnormals exact
// (F. Giesen's float_to_half_fast3_rtne).
uint16_t float_to_half(float f) {
  const uint32_t f32_infinity = 255u << 23;
  const uint32_t f16_max = (127u + 16u) << 23;
  const uint32_t denorm_magic_bits = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t u = float_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t out;
  if (u >= f16_max) {
    out = u > f32_infinity ? 0x7e00 : 0x7c00;
  } else if (u < (113u << 23)) {
    const float sum = bits_float(u) + bits_float(denorm_magic_bits);
    out = static_cast<uint16_t>(float_bits(sum) - denorm_magic_bits);
  } else {
    const uint32_t mantissa_odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu;
    u += mantissa_odd;
    out = static_cast<uint16_t>(u >> 13);
  }
  return static_cast<uint16_t>(out | (sign >> 16));
}

float load_float(const void* base, DType dtype, int64_t index) {
  if (dtype == DType::kFloat32) return static_cast<const float*>(base)[index];
  const uint16_t h = static_cast<const uint16_t*>(base)[index];
  if (dtype == DType::kBFloat16) return bits_float(static_cast<uint32_t>(h) << 16);
  uint32_t bits = static_cast<uint32_t>(h & 0x7fffu) << 13;
  float f = bits_float(bits) * 5.192296858534828e33f;   // 2^112
  bits = float_bits(f);
  if (f >= 65536.0f) bits |= 255u << 23;
  return bits_float(bits | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

void store_float(void* base, DType dtype, int64_t index, float value) {
  if (dtype == DType::kFloat32) {
    static_cast<float*>(base)[index] = value;
  } else {
    static_cast<uint16_t*>(base)[index] =
        dtype == DType::kBFloat16 ? float_to_bf16(value) : float_to_half(value);
  }
}

// ------------------------------------------------------------------------- checks
void check_heads(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache) {
  q.expect_host(3, "[S, Hq, D]").expect_float();
  k_cache.expect_host(4, "[num_blocks, block_size, Hkv, D]").expect_dtype(q.dtype());
  v_cache.expect_host(4, "[num_blocks, block_size, Hkv, D]").expect_dtype(q.dtype());
  for (int d = 0; d < 4; ++d) v_cache.expect_size(d, k_cache.size(d), "k_cache's");
  k_cache.expect_size(3, q.size(2), "q's head_dim");
  const int64_t head_dim = q.size(2), num_kv_heads = k_cache.size(2);
  if (head_dim < 1 || head_dim > kMaxHeadDim) {
    q.fail("head_dim must be in [1, " + std::to_string(kMaxHeadDim) + "], got " +
           std::to_string(head_dim));
  }
  if (num_kv_heads < 1 || q.size(1) % num_kv_heads != 0) {
    q.fail("num_q_heads " + std::to_string(q.size(1)) + " must be a multiple of num_kv_heads " +
           std::to_string(num_kv_heads));
  }
  if (k_cache.size(1) < 1) k_cache.fail("must have block_size >= 1");
}

[[noreturn]] void bad_value(const TensorView& t, int64_t index, const std::string& what) {
  throw std::invalid_argument(t.name() + "[" + std::to_string(index) + "] " + what);
}

// Every work item reads rows of q, pages of the pool and writes partial rows inside their
// tensors; returns the most query rows (q_len * group) of an item.
int check_work_items(const TensorView& work_info, const TensorView& row_seq,
                     const TensorView& page_table, int64_t num_seqs, int64_t num_blocks,
                     int64_t block_size, int64_t num_partials, int64_t group) {
  const int32_t* info = work_info.data_as<int32_t>();
  const int32_t* seqs = row_seq.data_as<int32_t>();
  const int32_t* pages = page_table.data_as<int32_t>();
  int64_t max_q_len = 0;
  for (int64_t w = 0; w < work_info.size(0); ++w) {
    const int32_t* item = info + w * kWorkInfoColumns;
    const int64_t q_start = item[0], q_len = item[1], page_start = item[2];
    const int64_t kv_start = item[3], kv_end = item[4], partial_start = item[5];
    if (q_len <= 0) continue;
    if (q_start < 0 || q_start + q_len > row_seq.size(0)) {
      bad_value(work_info, w, "reads row_seq past its " + std::to_string(row_seq.size(0)) +
                                  " entries");
    }
    if (partial_start < 0 || partial_start + q_len > num_partials) {
      bad_value(work_info, w, "writes partial rows past the " + std::to_string(num_partials) +
                                  " of partial_o");
    }
    if (kv_start < 0 || kv_end < kv_start) bad_value(work_info, w, "has a bad kv range");
    if (kv_end > kv_start) {
      const int64_t first = page_start + kv_start / block_size;
      const int64_t last = page_start + (kv_end - 1) / block_size;
      if (page_start < 0 || last >= page_table.size(0)) {
        bad_value(work_info, w, "reads page_table past its " +
                                    std::to_string(page_table.size(0)) + " entries");
      }
      for (int64_t p = first; p <= last; ++p) {
        if (pages[p] < 0 || pages[p] >= num_blocks) {
          bad_value(page_table, p, "= " + std::to_string(pages[p]) + " is outside the pool's " +
                                       std::to_string(num_blocks) + " blocks");
        }
      }
    }
    for (int64_t i = q_start; i < q_start + q_len; ++i) {
      if (seqs[i] < 0 || seqs[i] >= num_seqs) {
        bad_value(row_seq, i, "= " + std::to_string(seqs[i]) + " is not a row of q (" +
                                  std::to_string(num_seqs) + ")");
      }
    }
    if (q_len > max_q_len) max_q_len = q_len;
  }
  if (max_q_len * group > (int64_t{1} << 24)) work_info.fail("has a work item of too many rows");
  return static_cast<int>(max_q_len * group);
}

void check_merge_plan(const TensorView& merge_indptr, const TensorView& merge_rows,
                      int64_t num_partials) {
  const int32_t* indptr = merge_indptr.data_as<int32_t>();
  const int32_t* rows = merge_rows.data_as<int32_t>();
  for (int64_t i = 0; i + 1 < merge_indptr.size(0); ++i) {
    if (indptr[i] < 0 || indptr[i + 1] < indptr[i] || indptr[i + 1] > merge_rows.size(0)) {
      bad_value(merge_indptr, i, "starts a bad range of merge_rows");
    }
    for (int64_t j = indptr[i]; j < indptr[i + 1]; ++j) {
      if (rows[j] < 0 || rows[j] >= num_partials) {
        bad_value(merge_rows, j, "= " + std::to_string(rows[j]) + " is not a row of partial_o (" +
                                     std::to_string(num_partials) + ")");
      }
    }
  }
}

// Growing per-calling-thread scratch (the GIL is released: two Python threads each get theirs).
float* scratch_buffer(int64_t floats) {
  static thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(static_cast<size_t>(floats));
  return buffer.data();
}

}  // namespace

const char* selected_isa() {
  return isa_setting().load() == static_cast<int>(Isa::kAvx2) ? "avx2" : "baseline";
}

void select_isa(const char* name) { isa_setting().store(static_cast<int>(parse_isa(name))); }

void tree_attention_partials(const TensorView& q, const TensorView& k_cache,
                             const TensorView& v_cache, const TensorView& work_info,
                             const TensorView& row_seq, const TensorView& page_table,
                             const TensorView& partial_o, const TensorView& partial_lse,
                             float sm_scale, int num_threads) {
  check_heads(q, k_cache, v_cache);
  work_info.expect_host(2, "[W, 6]").expect_dtype(DType::kInt32).expect_contiguous();
  work_info.expect_size(1, kWorkInfoColumns, "kWorkInfoColumns");
  row_seq.expect_host(1, "[S]").expect_dtype(DType::kInt32).expect_contiguous();
  page_table.expect_host(1, "[P]").expect_dtype(DType::kInt32).expect_contiguous();
  partial_o.expect_host(3, "[R, Hq, D]").expect_dtype(DType::kFloat32).expect_unit_last_stride();
  partial_o.expect_size(1, q.size(1), "num_q_heads").expect_size(2, q.size(2), "head_dim");
  partial_lse.expect_host(2, "[R, Hq]").expect_dtype(DType::kFloat32).expect_unit_last_stride();
  partial_lse.expect_size(0, partial_o.size(0), "partial_o rows");
  partial_lse.expect_size(1, q.size(1), "num_q_heads");
  if (!(sm_scale > 0.0f) || std::isinf(sm_scale)) {
    throw std::invalid_argument("sm_scale must be a positive finite float");
  }
  const int64_t group = q.size(1) / k_cache.size(2);
  const int max_rows = check_work_items(work_info, row_seq, page_table, q.size(0),
                                        k_cache.size(0), k_cache.size(1), partial_o.size(0),
                                        group);
  if (max_rows == 0) return;

  PartialArgs args{};
  args.dtype = q.dtype();
  args.q = q.data();
  args.q_stride_seq = q.stride(0);
  args.q_stride_head = q.stride(1);
  args.q_stride_dim = q.stride(2);
  args.k = {k_cache.data(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            k_cache.stride(3)};
  args.v = {v_cache.data(), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            v_cache.stride(3)};
  args.work_info = work_info.data_as<int32_t>();
  args.num_work = work_info.size(0);
  args.row_seq = row_seq.data_as<int32_t>();
  args.page_table = page_table.data_as<int32_t>();
  args.partial_o = partial_o.data_as<float>();
  args.po_stride_row = partial_o.stride(0);
  args.po_stride_head = partial_o.stride(1);
  args.partial_lse = partial_lse.data_as<float>();
  args.plse_stride_row = partial_lse.stride(0);
  args.num_q_heads = static_cast<int>(q.size(1));
  args.num_kv_heads = static_cast<int>(k_cache.size(2));
  args.head_dim = static_cast<int>(q.size(2));
  args.block_size = static_cast<int>(k_cache.size(1));
  args.qk_scale = sm_scale * 1.4426950408889634f;
  args.num_threads = resolve_threads(num_threads);
  args.max_rows = max_rows;
  args.scratch = scratch_buffer(args.num_threads * scratch_floats(max_rows, args.head_dim));
#if defined(A2R_CPU_HAVE_AVX2)
  if (isa_setting().load() == static_cast<int>(Isa::kAvx2)) {
    avx2::tree_attention_partials(args);
    return;
  }
#endif
  baseline::tree_attention_partials(args);
}

void merge_partials(const TensorView& partial_o, const TensorView& partial_lse,
                    const TensorView& merge_indptr, const TensorView& merge_rows,
                    const TensorView& out, const TensorView& lse, int num_threads) {
  partial_o.expect_host(3, "[R, H, D]").expect_dtype(DType::kFloat32).expect_unit_last_stride();
  partial_lse.expect_host(2, "[R, H]").expect_dtype(DType::kFloat32);
  partial_lse.expect_size(0, partial_o.size(0), "partial_o rows");
  partial_lse.expect_size(1, partial_o.size(1), "partial_o heads");
  merge_indptr.expect_host(1, "[S + 1]").expect_dtype(DType::kInt32).expect_contiguous();
  merge_rows.expect_host(1, "[M]").expect_dtype(DType::kInt32).expect_contiguous();
  out.expect_host(3, "[S, H, D]").expect_float();
  out.expect_size(1, partial_o.size(1), "partial_o heads");
  out.expect_size(2, partial_o.size(2), "partial_o head_dim");
  lse.expect_host(2, "[S, H]").expect_dtype(DType::kFloat32);
  lse.expect_size(0, out.size(0), "out rows").expect_size(1, out.size(1), "out heads");
  merge_indptr.expect_size(0, out.size(0) + 1, "out rows + 1");
  check_merge_plan(merge_indptr, merge_rows, partial_o.size(0));

  const int64_t num_seqs = out.size(0), num_heads = out.size(1), head_dim = out.size(2);
  const int32_t* indptr = merge_indptr.data_as<int32_t>();
  const int32_t* rows = merge_rows.data_as<int32_t>();
  const float* po = partial_o.data_as<float>();
  const float* plse = partial_lse.data_as<float>();
  const int threads = resolve_threads(num_threads);
  (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && num_seqs > 1)
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    std::vector<float> acc(static_cast<size_t>(head_dim));
    for (int64_t h = 0; h < num_heads; ++h) {
      float m = -INFINITY, l = 0.0f;
      for (float& a : acc) a = 0.0f;
      for (int64_t i = indptr[seq]; i < indptr[seq + 1]; ++i) {
        const int64_t row = rows[i];
        const float lse_r = plse[row * partial_lse.stride(0) + h * partial_lse.stride(1)];
        const float m_new = m > lse_r ? m : lse_r;
        const float m_ref = m_new == -INFINITY ? 0.0f : m_new;   // only empty states so far
        const float w_old = std::exp(m - m_ref), w_new = std::exp(lse_r - m_ref);
        const float l_old = l * w_old;
        l = l_old + w_new;
        // acc stays a convex combination of the rows so far (no overflow for finite rows).
        const float c_old = l > 0.0f ? l_old / l : 0.0f, c_new = l > 0.0f ? w_new / l : 0.0f;
        const float* o_r = po + row * partial_o.stride(0) + h * partial_o.stride(1);
        // An empty state (weight 0) adds nothing, whatever its o holds (0 * NaN = NaN).
        for (int64_t d = 0; d < head_dim; ++d) {
          acc[d] = acc[d] * c_old + (c_new > 0.0f ? o_r[d] * c_new : 0.0f);
        }
        m = m_new;
      }
      const bool nonempty = l > 0.0f;
      const int64_t base = seq * out.stride(0) + h * out.stride(1);
      for (int64_t d = 0; d < head_dim; ++d) {
        store_float(out.data(), out.dtype(), base + d * out.stride(2), nonempty ? acc[d] : 0.0f);
      }
      lse.data_as<float>()[seq * lse.stride(0) + h * lse.stride(1)] =
          nonempty ? m + std::log(l) : -INFINITY;
    }
  }
}

void merge_states(const TensorView& out_a, const TensorView& lse_a, const TensorView& out_b,
                  const TensorView& lse_b, const TensorView& out, const TensorView& lse,
                  int num_threads) {
  out_a.expect_host(3, "[S, H, D]").expect_float();
  out_b.expect_host(3, "[S, H, D]").expect_dtype(out_a.dtype());
  out.expect_host(3, "[S, H, D]").expect_float();
  for (int d = 0; d < 3; ++d) {
    out_b.expect_size(d, out_a.size(d), "out_a's");
    out.expect_size(d, out_a.size(d), "out_a's");
  }
  for (const TensorView* t : {&lse_a, &lse_b, &lse}) {
    t->expect_host(2, "[S, H]").expect_dtype(DType::kFloat32);
    t->expect_size(0, out_a.size(0), "out_a rows").expect_size(1, out_a.size(1), "out_a heads");
  }
  const int64_t num_seqs = out_a.size(0), num_heads = out_a.size(1), head_dim = out_a.size(2);
  const int threads = resolve_threads(num_threads);
  (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && num_seqs > 1)
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    for (int64_t h = 0; h < num_heads; ++h) {
      const float la = lse_a.data_as<float>()[seq * lse_a.stride(0) + h * lse_a.stride(1)];
      const float lb = lse_b.data_as<float>()[seq * lse_b.stride(0) + h * lse_b.stride(1)];
      const float m = la > lb ? la : lb;
      const float m_ref = m == -INFINITY ? 0.0f : m;
      const float wa = std::exp(la - m_ref), wb = std::exp(lb - m_ref);
      const float l = wa + wb;
      const bool nonempty = l > 0.0f;
      // Weights normalised before the sum: no overflow for finite states.
      const float ca = nonempty ? wa / l : 0.0f, cb = nonempty ? wb / l : 0.0f;
      for (int64_t d = 0; d < head_dim; ++d) {
        const float a = ca > 0.0f ? ca * load_float(out_a.data(), out_a.dtype(),
                                                    seq * out_a.stride(0) + h * out_a.stride(1) +
                                                        d * out_a.stride(2))
                                  : 0.0f;
        const float b = cb > 0.0f ? cb * load_float(out_b.data(), out_b.dtype(),
                                                    seq * out_b.stride(0) + h * out_b.stride(1) +
                                                        d * out_b.stride(2))
                                  : 0.0f;
        store_float(out.data(), out.dtype(),
                    seq * out.stride(0) + h * out.stride(1) + d * out.stride(2), a + b);
      }
      lse.data_as<float>()[seq * lse.stride(0) + h * lse.stride(1)] =
          nonempty ? m_ref + std::log(l) : -INFINITY;
    }
  }
}

}  // namespace cpu
}  // namespace a2r
