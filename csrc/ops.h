// Host entry points of the a2r-kernels CUDA backend.
//
// Plain C++ (no CUDA, no torch headers): bindings.cpp is compiled by the host compiler and talks
// to the kernels only through these functions. Tensors arrive as TensorViews (DLPack, see
// tensor_view.h); every launch goes to `stream` on the tensors' device. The public ops
// (a2r_kernels/attention.py, denoise.py, wrapper.py) check their inputs once; these functions
// check, next to the launch, what a wrong value would turn into an out-of-bounds access and
// throw std::invalid_argument (ValueError in Python) naming the argument.
#pragma once

#include <cstdint>

#include "tensor_view.h"

namespace a2r {

// ------------------------------------------------------------------------------ entry points
// Shapes: S sequences, Hq / Hkv query / kv heads, D head_dim, W work items, R partial rows.

// One partial (o, lse) per (work item, q head) of a TreeLayout plan (csrc/tree_attention.cu):
// q [S, Hq, D] float; k_cache, v_cache [num_blocks, block_size, Hkv, D] in q's dtype; work_info
// int32 [W, kWorkInfoColumns], row_seq int32 [S], page_table int32 [P], all contiguous;
// partial_o fp32 [R, Hq, D], partial_lse fp32 [R, Hq] (written). Unit stride in D everywhere.
void tree_attention_partials(const TensorView& q, const TensorView& k_cache,
                             const TensorView& v_cache, const TensorView& work_info,
                             const TensorView& row_seq, const TensorView& page_table,
                             const TensorView& partial_o, const TensorView& partial_lse,
                             float sm_scale, uintptr_t stream);

// Per sequence, the LSE merge of its partial rows: partial_o fp32 [R, H, D], partial_lse fp32
// [R, H], merge_indptr int32 [S + 1], merge_rows int32 [M] (contiguous) -> out [S, H, D] float,
// lse fp32 [S, H].
void merge_partials(const TensorView& partial_o, const TensorView& partial_lse,
                    const TensorView& merge_indptr, const TensorView& merge_rows,
                    const TensorView& out, const TensorView& lse, uintptr_t stream);

// LSE merge of two states: out_a, out_b [S, H, D] (one float dtype), lse_a, lse_b fp32 [S, H]
// -> out [S, H, D] float, lse fp32 [S, H].
void merge_states(const TensorView& out_a, const TensorView& lse_a, const TensorView& out_b,
                  const TensorView& lse_b, const TensorView& out, const TensorView& lse,
                  uintptr_t stream);

// Remasking modes of denoise_step; the code of a mode is its index in a2r_kernels/vocab.py
// REMASKING (exported as _C.REMASKING_CODES, which tests hold equal to the vocabulary's).
enum class Remasking : int { kLowConfidence = 0, kMargin = 1, kEntropy = 2, kRandom = 3 };

struct DenoiseOptions {
  int64_t mask_id;
  bool has_threshold;  // threshold mode (num_transfer absent) or top-k mode
  float threshold;
  double temperature;  // >= 0
  Remasking remasking;
  uint64_t seed;
  int64_t num_splits;  // CTAs per position over V (1: no combine step)
};

// One masked-denoising step (csrc/denoise.cu): logits [B, L, V] float, unit stride in V;
// tokens int64 [B, L] (updated in place); num_transfer int64 [B] (top-k mode) or null
// (threshold mode); x0 int64, confidence fp32, transferred bool, all [B, L] (written);
// split_stats fp32 scratch of at least B * L * num_splits * 8 elements, 16-byte aligned, or null
// when num_splits == 1.
void denoise_step(const TensorView& logits, const TensorView& tokens,
                  const TensorView* num_transfer, const TensorView& x0,
                  const TensorView& confidence, const TensorView& transferred,
                  const TensorView* split_stats, const DenoiseOptions& options, uintptr_t stream);

// ------------------------------------------------------------- kernel parameter blocks
// Filled by the entry points above from the checked views; passed to the kernels by value.
// Element strides of a [d0, d1, d2, d3] tensor (the last one must be 1).
struct Strides4 {
  int64_t s0, s1, s2;
};
struct Strides3 {
  int64_t s0, s1;
};
struct Strides2 {
  int64_t s0, s1;
};

// Head dims the attention kernels are compiled for: any head_dim in [1, kMaxHeadDim] runs, in the
// instantiation of the next multiple of 32 (32, 64, 96, 128, or 256 for 129..256).
constexpr int kMaxHeadDim = 256;

// int32 columns of one work item of a TreeLayout plan: (q_start, q_len, page_start, kv_start,
// kv_end, partial_start), a2r_kernels/vocab.py WORK_FIELDS.
constexpr int kWorkInfoColumns = 6;

struct TreePartialsArgs {
  const void* q;        // [S, Hq, D]
  const void* k_cache;  // [num_blocks, block_size, Hkv, D]
  const void* v_cache;  // [num_blocks, block_size, Hkv, D]
  const int32_t* work_info;   // [W, kWorkInfoColumns] contiguous
  const int32_t* row_seq;     // [S]
  const int32_t* page_table;  // [P]
  float* partial_o;           // [R, Hq, D]
  float* partial_lse;         // [R, Hq]
  Strides3 q_stride;
  Strides4 k_stride, v_stride;
  Strides3 po_stride;
  Strides2 plse_stride;
  int64_t num_work, num_seqs, num_q_heads, num_kv_heads, head_dim, block_size;
  float sm_scale;
  DType dtype;
};

struct MergePartialsArgs {
  const float* partial_o;     // [R, Hq, D]
  const float* partial_lse;   // [R, Hq]
  const int32_t* merge_indptr;  // [S + 1]
  const int32_t* merge_rows;    // [merge_indptr[S]]
  void* out;                  // [S, Hq, D] in out_dtype
  float* lse;                 // [S, Hq]
  Strides3 po_stride;
  Strides2 plse_stride;
  Strides3 out_stride;
  Strides2 lse_stride;
  int64_t num_seqs, num_heads, head_dim;
  DType out_dtype;
};

struct MergeStatesArgs {
  const void* out_a;  // [S, H, D] in in_dtype
  const float* lse_a;  // [S, H]
  const void* out_b;
  const float* lse_b;
  void* out;  // [S, H, D] in out_dtype
  float* lse;
  Strides3 a_stride, b_stride, out_stride;
  Strides2 lse_a_stride, lse_b_stride, lse_stride;
  int64_t num_seqs, num_heads, head_dim;
  DType in_dtype, out_dtype;
};

struct DenoiseArgs {
  const void* logits;  // [B, L, V]
  int64_t* tokens;     // [B, L], updated in place
  const int64_t* num_transfer;  // [B] or nullptr (threshold mode)
  int64_t* x0;                  // [B, L]
  float* confidence;            // [B, L]
  bool* transferred;            // [B, L]
  int64_t logits_stride_b, logits_stride_l;
  int64_t tokens_stride_b, tokens_stride_l;
  int64_t num_transfer_stride;
  int64_t x0_stride_b, x0_stride_l;
  int64_t conf_stride_b, conf_stride_l;
  int64_t transferred_stride_b, transferred_stride_l;
  int64_t batch, length, vocab;
  int64_t mask_id;
  float threshold;  // used when num_transfer == nullptr
  float temperature;
  float inv_temperature;  // fp32(1 / temperature) rounded once from double, as the reference
  uint64_t seed;
  Remasking remasking;
  DType dtype;
  int64_t num_splits;  // CTAs per position over V (1: no combine step)
  float* split_stats;  // [B * L, num_splits, 8] fp32 scratch, 16-byte aligned; when num_splits > 1
};

// ------------------------------------------------------------- host builds, for the tests
// Exposed only by the test-only module tests/_C_testing (csrc/testing_bindings.cpp), never by _C.

// The uniform the denoise kernels draw at Philox counter (c0, c1, c2, c3) with key `seed`, computed
// on the host by the same code (tests compare it with a2r_kernels.reference_denoise).
float philox_uniform_host(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3);

// The per-position part of denoise_step (x0, confidence of one masked position pos = b * L + l
// whose fp32 logits are the host array row[vocab]), by the kernel's own code compiled for the
// host, with the kernels' work split: groups of `group_width` logits (4: the fp32 kernel, 8: the
// fp16 / bf16 kernels) and `num_splits` splits of V; x0 = mask_id for a row without a
// distribution (a NaN logit, or none above -inf). For tests on machines without a GPU.
void denoise_predict_row_host(const float* row, int64_t vocab, float temperature,
                              float inv_temperature, Remasking remasking, uint64_t seed,
                              uint32_t pos, int64_t mask_id, int group_width, int num_splits,
                              int64_t* x0, float* confidence);

// Diagnostics for the Python side and the tests.
int cuda_runtime_version();
int cuda_device_count();  // 0 (never throws) when there is no device or driver

}  // namespace a2r
