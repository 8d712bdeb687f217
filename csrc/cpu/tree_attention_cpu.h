// CPU tree decode attention (module a2r_kernels._cpu): the host twin of csrc/tree_attention.cu.
//
// Plain C++17 (no torch headers, no CUDA), built by the host compiler on every install. It runs
// the same TreeLayout work items and LSE merge as the Triton and CUDA kernels; OpenMP spreads the
// (work item, kv head) pairs over threads. K and V are read in place through element strides in
// fp32, fp16 or bf16, so both our pool [num_blocks, block_size, Hkv, D] and vLLM-cpu's CPU_ATTN
// cache (per block and head a transposed key tile [D, block_size], then a value tile) are views.
//
// The partial kernel's inner loops are compiled twice: a baseline build (what the compiler
// targets by default: SSE2 on x86-64, NEON on aarch64) and, on x86-64, an AVX2 + FMA + F16C
// build, picked at run time from CPUID (__builtin_cpu_supports). No instruction the machine
// lacks is ever executed, and no build uses -march=native.
#pragma once

#include <cstdint>

#include "../tensor_view.h"

namespace a2r {
namespace cpu {

// K or V of the pool: element strides of [num_blocks, block_size, Hkv, D] (any signs/orders).
struct PoolView {
  const void* data;
  int64_t stride_block, stride_slot, stride_head, stride_dim;
};

// Everything the partial kernel reads; filled from checked TensorViews (tree_attention_cpu.cpp).
struct PartialArgs {
  DType dtype;                     // of q, k, v
  const void* q;                   // [S, Hq, D]
  int64_t q_stride_seq, q_stride_head, q_stride_dim;
  PoolView k, v;
  const int32_t* work_info;        // [W, kWorkInfoColumns] contiguous
  int64_t num_work;
  const int32_t* row_seq;          // [S]
  const int32_t* page_table;       // [P]
  float* partial_o;                // [R, Hq, D], unit stride in D
  int64_t po_stride_row, po_stride_head;
  float* partial_lse;              // [R, Hq], unit stride in Hq
  int64_t plse_stride_row;
  int num_q_heads, num_kv_heads, head_dim, block_size;
  float qk_scale;                  // sm_scale * log2(e): scores in base 2
  int num_threads;
  int max_rows;                    // most q_len * group of a work item (sizes the scratch)
  float* scratch;                  // num_threads * scratch_floats(max_rows, head_dim) floats
};

// Tokens of one KV tile (a multiple of 16: the score kernel takes 16 per pass; 32 halves the
// per-tile softmax and bookkeeping of 16) and the padded head_dim of the scratch rows.
constexpr int kTileTokens = 32;
inline int padded_head_dim(int head_dim) { return (head_dim + 15) / 16 * 16; }

// fp32 scratch of one thread: q rows, o rows, scores / probabilities, m, l, alpha, K^T tile,
// converted V tile, one zero row.
inline int64_t scratch_floats(int max_rows, int head_dim) {
  const int64_t dp = padded_head_dim(head_dim);
  return 2 * max_rows * dp + max_rows * kTileTokens + 3 * max_rows + dp * kTileTokens +
         kTileTokens * dp + dp + 16;
}

// The partial kernel, one build per instruction set (partials_baseline.cpp, partials_avx2.cpp).
namespace baseline {
void tree_attention_partials(const PartialArgs& args);
}
#if defined(__x86_64__) || defined(_M_X64)
#define A2R_CPU_HAVE_AVX2 1
namespace avx2 {
void tree_attention_partials(const PartialArgs& args);
}
#endif

// ------------------------------------------------------------------------------ entry points
// The instruction set the partial kernel runs with: "avx2" or "baseline".
const char* selected_isa();
// Pick it: "auto" (the best this CPU has), "avx2" (std::invalid_argument when the CPU lacks
// AVX2, FMA or F16C) or "baseline".
void select_isa(const char* name);

// One partial (o, lse) per (work item, q head) of a TreeLayout plan: q [S, Hq, D] float;
// k_cache, v_cache [num_blocks, block_size, Hkv, D] in q's dtype, any strides; work_info int32
// [W, kWorkInfoColumns], row_seq int32 [S], page_table int32 [P] contiguous; partial_o fp32
// [R, Hq, D] (unit stride in D), partial_lse fp32 [R, Hq] (unit stride in Hq), written.
// num_threads <= 0: OpenMP's default.
void tree_attention_partials(const TensorView& q, const TensorView& k_cache,
                             const TensorView& v_cache, const TensorView& work_info,
                             const TensorView& row_seq, const TensorView& page_table,
                             const TensorView& partial_o, const TensorView& partial_lse,
                             float sm_scale, int num_threads);

// Per sequence, the LSE merge of its partial rows: partial_o fp32 [R, H, D] (unit stride in D),
// partial_lse fp32 [R, H], merge_indptr int32 [S + 1], merge_rows int32 [M] (contiguous) ->
// out [S, H, D] float (any strides), lse fp32 [S, H] (any strides).
void merge_partials(const TensorView& partial_o, const TensorView& partial_lse,
                    const TensorView& merge_indptr, const TensorView& merge_rows,
                    const TensorView& out, const TensorView& lse, int num_threads);

// LSE merge of two states: out_a, out_b [S, H, D] (one float dtype), lse_a, lse_b fp32 [S, H]
// -> out [S, H, D] float, lse fp32 [S, H]; any strides.
void merge_states(const TensorView& out_a, const TensorView& lse_a, const TensorView& out_b,
                  const TensorView& lse_b, const TensorView& out, const TensorView& lse,
                  int num_threads);

}  // namespace cpu
}  // namespace a2r
