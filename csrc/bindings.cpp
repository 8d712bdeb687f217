// pybind11 module a2r_kernels._C: the CUDA kernels behind raw device addresses and strides.
//
// No libtorch: tensors cross as (data_ptr, strides) integers, the stream as the integer handle of
// torch.cuda.current_stream().cuda_stream. Call these through a2r_kernels/_cuda_ops.py, which
// checks devices, dtypes, shapes and strides first. std::invalid_argument surfaces as ValueError,
// CUDA errors as RuntimeError.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "ops.h"

namespace py = pybind11;

namespace {

using a2r::DType;

DType to_dtype(int code, const char* name) {
  if (code < 0 || code > 2) {
    throw std::invalid_argument(std::string(name) + ": dtype code must be 0 (float32), 1 (float16) "
                                "or 2 (bfloat16), got " + std::to_string(code));
  }
  return static_cast<DType>(code);
}

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

std::vector<int64_t> check_strides(const std::vector<int64_t>& strides, size_t rank,
                                   const char* name) {
  if (strides.size() != rank) {
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(rank) +
                                " strides, got " + std::to_string(strides.size()));
  }
  return strides;
}

void tree_attention_partials(uintptr_t q, uintptr_t k_cache, uintptr_t v_cache,
                             uintptr_t work_info, uintptr_t row_seq, uintptr_t page_table,
                             uintptr_t partial_o, uintptr_t partial_lse,
                             const std::vector<int64_t>& q_strides,
                             const std::vector<int64_t>& k_strides,
                             const std::vector<int64_t>& v_strides,
                             const std::vector<int64_t>& po_strides,
                             const std::vector<int64_t>& plse_strides, int64_t num_work,
                             int64_t num_seqs, int64_t num_q_heads, int64_t num_kv_heads,
                             int64_t head_dim, int64_t block_size, double sm_scale, int dtype,
                             int device, uintptr_t stream) {
  auto qs = check_strides(q_strides, 2, "q_strides");
  auto ks = check_strides(k_strides, 3, "k_strides");
  auto vs = check_strides(v_strides, 3, "v_strides");
  auto pos = check_strides(po_strides, 2, "po_strides");
  auto pls = check_strides(plse_strides, 2, "plse_strides");
  a2r::TreePartialsArgs args{};
  args.q = ptr<const void>(q);
  args.k_cache = ptr<const void>(k_cache);
  args.v_cache = ptr<const void>(v_cache);
  args.work_info = ptr<const int32_t>(work_info);
  args.row_seq = ptr<const int32_t>(row_seq);
  args.page_table = ptr<const int32_t>(page_table);
  args.partial_o = ptr<float>(partial_o);
  args.partial_lse = ptr<float>(partial_lse);
  args.q_stride = {qs[0], qs[1]};
  args.k_stride = {ks[0], ks[1], ks[2]};
  args.v_stride = {vs[0], vs[1], vs[2]};
  args.po_stride = {pos[0], pos[1]};
  args.plse_stride = {pls[0], pls[1]};
  args.num_work = num_work;
  args.num_seqs = num_seqs;
  args.num_q_heads = num_q_heads;
  args.num_kv_heads = num_kv_heads;
  args.head_dim = head_dim;
  args.block_size = block_size;
  args.sm_scale = static_cast<float>(sm_scale);
  args.dtype = to_dtype(dtype, "tree_attention_partials");
  py::gil_scoped_release release;
  a2r::tree_attention_partials(args, device, stream);
}

void merge_partials(uintptr_t partial_o, uintptr_t partial_lse, uintptr_t merge_indptr,
                    uintptr_t merge_rows, uintptr_t out, uintptr_t lse,
                    const std::vector<int64_t>& po_strides, const std::vector<int64_t>& plse_strides,
                    const std::vector<int64_t>& out_strides, const std::vector<int64_t>& lse_strides,
                    int64_t num_seqs, int64_t num_heads, int64_t head_dim, int out_dtype,
                    int device, uintptr_t stream) {
  auto pos = check_strides(po_strides, 2, "po_strides");
  auto pls = check_strides(plse_strides, 2, "plse_strides");
  auto os = check_strides(out_strides, 2, "out_strides");
  auto ls = check_strides(lse_strides, 2, "lse_strides");
  a2r::MergePartialsArgs args{};
  args.partial_o = ptr<const float>(partial_o);
  args.partial_lse = ptr<const float>(partial_lse);
  args.merge_indptr = ptr<const int32_t>(merge_indptr);
  args.merge_rows = ptr<const int32_t>(merge_rows);
  args.out = ptr<void>(out);
  args.lse = ptr<float>(lse);
  args.po_stride = {pos[0], pos[1]};
  args.plse_stride = {pls[0], pls[1]};
  args.out_stride = {os[0], os[1]};
  args.lse_stride = {ls[0], ls[1]};
  args.num_seqs = num_seqs;
  args.num_heads = num_heads;
  args.head_dim = head_dim;
  args.out_dtype = to_dtype(out_dtype, "merge_partials");
  py::gil_scoped_release release;
  a2r::merge_partials(args, device, stream);
}

void merge_states(uintptr_t out_a, uintptr_t lse_a, uintptr_t out_b, uintptr_t lse_b,
                  uintptr_t out, uintptr_t lse, const std::vector<int64_t>& a_strides,
                  const std::vector<int64_t>& lse_a_strides, const std::vector<int64_t>& b_strides,
                  const std::vector<int64_t>& lse_b_strides,
                  const std::vector<int64_t>& out_strides, const std::vector<int64_t>& lse_strides,
                  int64_t num_seqs, int64_t num_heads, int64_t head_dim, int in_dtype,
                  int out_dtype, int device, uintptr_t stream) {
  auto as = check_strides(a_strides, 2, "a_strides");
  auto las = check_strides(lse_a_strides, 2, "lse_a_strides");
  auto bs = check_strides(b_strides, 2, "b_strides");
  auto lbs = check_strides(lse_b_strides, 2, "lse_b_strides");
  auto os = check_strides(out_strides, 2, "out_strides");
  auto ls = check_strides(lse_strides, 2, "lse_strides");
  a2r::MergeStatesArgs args{};
  args.out_a = ptr<const void>(out_a);
  args.lse_a = ptr<const float>(lse_a);
  args.out_b = ptr<const void>(out_b);
  args.lse_b = ptr<const float>(lse_b);
  args.out = ptr<void>(out);
  args.lse = ptr<float>(lse);
  args.a_stride = {as[0], as[1]};
  args.b_stride = {bs[0], bs[1]};
  args.out_stride = {os[0], os[1]};
  args.lse_a_stride = {las[0], las[1]};
  args.lse_b_stride = {lbs[0], lbs[1]};
  args.lse_stride = {ls[0], ls[1]};
  args.num_seqs = num_seqs;
  args.num_heads = num_heads;
  args.head_dim = head_dim;
  args.in_dtype = to_dtype(in_dtype, "merge_states (out_a)");
  args.out_dtype = to_dtype(out_dtype, "merge_states (out)");
  py::gil_scoped_release release;
  a2r::merge_states(args, device, stream);
}

void denoise_step(uintptr_t logits, uintptr_t tokens, std::optional<uintptr_t> num_transfer,
                  uintptr_t x0, uintptr_t confidence, uintptr_t transferred,
                  const std::vector<int64_t>& logits_strides,
                  const std::vector<int64_t>& tokens_strides, int64_t num_transfer_stride,
                  const std::vector<int64_t>& x0_strides, const std::vector<int64_t>& conf_strides,
                  const std::vector<int64_t>& transferred_strides, int64_t batch, int64_t length,
                  int64_t vocab, int64_t mask_id, std::optional<double> threshold,
                  double temperature, int remasking, uint64_t seed, int dtype, int device,
                  uintptr_t stream, int64_t num_splits, std::optional<uintptr_t> split_stats) {
  if (num_transfer.has_value() == threshold.has_value()) {
    throw std::invalid_argument("denoise_step: give exactly one of num_transfer and threshold");
  }
  if (remasking < 0 || remasking > 3) {
    throw std::invalid_argument("denoise_step: remasking code must be in [0, 3], got " +
                                std::to_string(remasking));
  }
  auto lgs = check_strides(logits_strides, 2, "logits_strides");
  auto ts = check_strides(tokens_strides, 2, "tokens_strides");
  auto xs = check_strides(x0_strides, 2, "x0_strides");
  auto cs = check_strides(conf_strides, 2, "conf_strides");
  auto trs = check_strides(transferred_strides, 2, "transferred_strides");
  a2r::DenoiseArgs args{};
  args.logits = ptr<const void>(logits);
  args.tokens = ptr<int64_t>(tokens);
  args.num_transfer = num_transfer ? ptr<const int64_t>(*num_transfer) : nullptr;
  args.x0 = ptr<int64_t>(x0);
  args.confidence = ptr<float>(confidence);
  args.transferred = ptr<bool>(transferred);
  args.logits_stride_b = lgs[0];
  args.logits_stride_l = lgs[1];
  args.tokens_stride_b = ts[0];
  args.tokens_stride_l = ts[1];
  args.num_transfer_stride = num_transfer_stride;
  args.x0_stride_b = xs[0];
  args.x0_stride_l = xs[1];
  args.conf_stride_b = cs[0];
  args.conf_stride_l = cs[1];
  args.transferred_stride_b = trs[0];
  args.transferred_stride_l = trs[1];
  args.batch = batch;
  args.length = length;
  args.vocab = vocab;
  args.mask_id = mask_id;
  args.threshold = threshold ? static_cast<float>(*threshold) : 0.f;
  args.temperature = static_cast<float>(temperature);
  args.inv_temperature = temperature > 0 ? static_cast<float>(1.0 / temperature) : 0.f;
  args.seed = seed;
  args.remasking = static_cast<a2r::Remasking>(remasking);
  args.dtype = to_dtype(dtype, "denoise_step (logits)");
  args.num_splits = num_splits;
  args.split_stats = split_stats ? ptr<float>(*split_stats) : nullptr;
  py::gil_scoped_release release;
  a2r::denoise_step(args, device, stream);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "a2r-kernels CUDA backend (no libtorch). Call through a2r_kernels._cuda_ops, which checks "
      "the tensors; these functions take raw device addresses, element strides (all but the unit "
      "last one) and a CUDA stream handle.";
  // Public ops (a2r_kernels) that this extension implements, for backend selection.
  m.attr("PUBLIC_OPS") = py::make_tuple("tree_decode_attention", "paged_decode_attention",
                                        "merge_attention_states", "denoise_step");
  m.attr("MAX_HEAD_DIM") = a2r::kMaxHeadDim;
  m.def("cuda_runtime_version", &a2r::cuda_runtime_version,
        "CUDA runtime version the extension was linked with (e.g. 13000).");
  m.def("device_count", &a2r::cuda_device_count,
        "CUDA devices visible to the extension's runtime; 0 without a driver or GPU.");
  m.def("philox_uniform", &a2r::philox_uniform_host,
        "u = ((r >> 9) + 0.5) * 2^-23 of the first Philox4x32-10 word at counter (c0..c3), key "
        "seed: the denoise kernels' random stream, computed on the host.",
        py::arg("seed"), py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3") = 0);
  m.def(
      "denoise_predict_row_host",
      [](uintptr_t row, int64_t vocab, double temperature, int remasking, uint64_t seed,
         uint32_t pos, int64_t mask_id, int group_width, int num_splits) {
        if (vocab < 1) throw std::invalid_argument("denoise_predict_row_host: vocab must be >= 1");
        if (remasking < 0 || remasking > 3) {
          throw std::invalid_argument("denoise_predict_row_host: remasking code must be in [0, 3]");
        }
        int64_t x0 = 0;
        float confidence = 0.f;
        a2r::denoise_predict_row_host(
            reinterpret_cast<const float*>(row), vocab, static_cast<float>(temperature),
            temperature > 0 ? static_cast<float>(1.0 / temperature) : 0.f,
            static_cast<a2r::Remasking>(remasking), seed, pos, mask_id, group_width, num_splits,
            &x0, &confidence);
        return py::make_tuple(x0, confidence);
      },
      "(x0, confidence) of one masked position from a HOST fp32 row of logits, by the denoise "
      "kernel's per-position code compiled for the CPU (for tests without a GPU); group_width: "
      "logits per 16-byte load of the kernel being emulated (4: fp32, 8: fp16 / bf16); "
      "num_splits: CTAs per position over V; mask_id: the x0 of a row without a distribution.",
      py::arg("row"), py::arg("vocab"), py::arg("temperature"), py::arg("remasking"),
      py::arg("seed"), py::arg("pos"), py::arg("mask_id"), py::arg("group_width") = 4,
      py::arg("num_splits") = 1);
  m.def("tree_attention_partials", &tree_attention_partials,
        "Partial (o, lse) per tree work item and q head; see csrc/tree_attention.cu.",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("work_info"),
        py::arg("row_seq"), py::arg("page_table"), py::arg("partial_o"), py::arg("partial_lse"),
        py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"), py::arg("po_strides"),
        py::arg("plse_strides"), py::arg("num_work"), py::arg("num_seqs"), py::arg("num_q_heads"),
        py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_size"), py::arg("sm_scale"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("merge_partials", &merge_partials,
        "Per sequence, the LSE merge of its partial rows into out / lse.", py::arg("partial_o"),
        py::arg("partial_lse"), py::arg("merge_indptr"), py::arg("merge_rows"), py::arg("out"),
        py::arg("lse"), py::arg("po_strides"), py::arg("plse_strides"), py::arg("out_strides"),
        py::arg("lse_strides"), py::arg("num_seqs"), py::arg("num_heads"), py::arg("head_dim"),
        py::arg("out_dtype"), py::arg("device"), py::arg("stream"));
  m.def("merge_states", &merge_states, "LSE merge of two attention states.", py::arg("out_a"),
        py::arg("lse_a"), py::arg("out_b"), py::arg("lse_b"), py::arg("out"), py::arg("lse"),
        py::arg("a_strides"), py::arg("lse_a_strides"), py::arg("b_strides"),
        py::arg("lse_b_strides"), py::arg("out_strides"), py::arg("lse_strides"),
        py::arg("num_seqs"), py::arg("num_heads"), py::arg("head_dim"), py::arg("in_dtype"),
        py::arg("out_dtype"), py::arg("device"), py::arg("stream"));
  m.def("denoise_step", &denoise_step,
        "One masked-diffusion denoising step (predict + select + commit in place).",
        py::arg("logits"), py::arg("tokens"), py::arg("num_transfer"), py::arg("x0"),
        py::arg("confidence"), py::arg("transferred"), py::arg("logits_strides"),
        py::arg("tokens_strides"), py::arg("num_transfer_stride"), py::arg("x0_strides"),
        py::arg("conf_strides"), py::arg("transferred_strides"), py::arg("batch"),
        py::arg("length"), py::arg("vocab"), py::arg("mask_id"), py::arg("threshold"),
        py::arg("temperature"), py::arg("remasking"), py::arg("seed"), py::arg("dtype"),
        py::arg("device"), py::arg("stream"), py::arg("num_splits") = 1,
        py::arg("split_stats") = py::none());
}
