// Host entry points of the a2r-kernels CUDA backend.
//
// Plain C++ (no CUDA, no torch headers): bindings.cpp is compiled by the host compiler and talks
// to the kernels only through these functions. Tensors arrive as raw device addresses plus
// element strides; every launch goes to `stream` on `device`. The Python side
// (a2r_kernels/_cuda_ops.py) checks shapes, dtypes and devices before calling; these functions
// re-check what a wrong value would turn into an out-of-bounds access and throw
// std::invalid_argument (ValueError in Python) naming the argument.
#pragma once

#include <cstdint>

namespace a2r {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

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

struct TreePartialsArgs {
  const void* q;        // [S, Hq, D]
  const void* k_cache;  // [num_blocks, block_size, Hkv, D]
  const void* v_cache;  // [num_blocks, block_size, Hkv, D]
  const int32_t* work_info;   // [W, 6] contiguous
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
void tree_attention_partials(const TreePartialsArgs& args, int device, uintptr_t stream);

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
void merge_partials(const MergePartialsArgs& args, int device, uintptr_t stream);

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
void merge_states(const MergeStatesArgs& args, int device, uintptr_t stream);

enum class Remasking : int { kLowConfidence = 0, kMargin = 1, kEntropy = 2, kRandom = 3 };

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
void denoise_step(const DenoiseArgs& args, int device, uintptr_t stream);

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
