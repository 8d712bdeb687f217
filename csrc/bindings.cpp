// pybind11 module a2r_kernels._C: the CUDA kernels, with tensors crossing as DLPack capsules.
//
// No libtorch: a2r_kernels/_cuda_ops.py hands each tensor over as torch.utils.dlpack.to_dlpack(t)
// (no copy, no stream sync) and the stream as the integer handle of
// torch.cuda.current_stream().cuda_stream. Each capsule becomes an a2r::TensorView that borrows
// the tensor for the call; the entry points (ops.h) check the views next to their launch and
// throw std::invalid_argument (ValueError in Python) naming the argument; CUDA errors surface as
// RuntimeError.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

#include "dlpack_capsule.h"
#include "ops.h"

namespace py = pybind11;

namespace {

a2r::TensorView view(const py::handle& obj, const char* name) { return a2r::dlpack_view(obj, name); }

std::optional<a2r::TensorView> optional_view(const py::handle& obj, const char* name) {
  return a2r::optional_dlpack_view(obj, name);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "a2r-kernels CUDA backend (no libtorch). Call through a2r_kernels._cuda_ops: tensors cross "
      "as DLPack capsules and are checked next to the launch; the last argument is a CUDA stream "
      "handle.";
  // Public ops (a2r_kernels) that this extension implements, for backend selection.
  m.attr("PUBLIC_OPS") = py::make_tuple("tree_decode_attention", "paged_decode_attention",
                                        "merge_attention_states", "denoise_step");
  // The constants the Python side shares with the kernels (a2r_kernels/vocab.py holds the same
  // values for machines without the extension; tests/test_cuda.py holds the two equal).
  m.attr("MAX_HEAD_DIM") = a2r::kMaxHeadDim;
  m.attr("WORK_INFO_COLUMNS") = a2r::kWorkInfoColumns;
  py::dict remasking_codes;
  remasking_codes["low_confidence"] = static_cast<int>(a2r::Remasking::kLowConfidence);
  remasking_codes["margin"] = static_cast<int>(a2r::Remasking::kMargin);
  remasking_codes["entropy"] = static_cast<int>(a2r::Remasking::kEntropy);
  remasking_codes["random"] = static_cast<int>(a2r::Remasking::kRandom);
  m.attr("REMASKING_CODES") = remasking_codes;
  m.def("cuda_runtime_version", &a2r::cuda_runtime_version,
        "CUDA runtime version the extension was linked with (e.g. 13000).");
  m.def("device_count", &a2r::cuda_device_count,
        "CUDA devices visible to the extension's runtime; 0 without a driver or GPU.");

  m.def(
      "tree_attention_partials",
      [](py::handle q, py::handle k_cache, py::handle v_cache, py::handle work_info,
         py::handle row_seq, py::handle page_table, py::handle partial_o, py::handle partial_lse,
         double sm_scale, uintptr_t stream) {
        // One statement per view: arguments are converted (and rejected) in their order.
        const a2r::TensorView q_view = view(q, "q");
        const a2r::TensorView k_view = view(k_cache, "k_cache");
        const a2r::TensorView v_view = view(v_cache, "v_cache");
        const a2r::TensorView work_view = view(work_info, "work_info");
        const a2r::TensorView row_seq_view = view(row_seq, "row_seq");
        const a2r::TensorView page_view = view(page_table, "page_table");
        const a2r::TensorView po_view = view(partial_o, "partial_o");
        const a2r::TensorView plse_view = view(partial_lse, "partial_lse");
        py::gil_scoped_release release;
        a2r::tree_attention_partials(q_view, k_view, v_view, work_view, row_seq_view, page_view,
                                     po_view, plse_view, static_cast<float>(sm_scale), stream);
      },
      "Partial (o, lse) per tree work item and q head; see csrc/ops.h and tree_attention.cu.",
      py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("work_info"),
      py::arg("row_seq"), py::arg("page_table"), py::arg("partial_o"), py::arg("partial_lse"),
      py::arg("sm_scale"), py::arg("stream"));
  m.def(
      "merge_partials",
      [](py::handle partial_o, py::handle partial_lse, py::handle merge_indptr,
         py::handle merge_rows, py::handle out, py::handle lse, uintptr_t stream) {
        const a2r::TensorView po_view = view(partial_o, "partial_o");
        const a2r::TensorView plse_view = view(partial_lse, "partial_lse");
        const a2r::TensorView indptr_view = view(merge_indptr, "merge_indptr");
        const a2r::TensorView rows_view = view(merge_rows, "merge_rows");
        const a2r::TensorView out_view = view(out, "out");
        const a2r::TensorView lse_view = view(lse, "lse");
        py::gil_scoped_release release;
        a2r::merge_partials(po_view, plse_view, indptr_view, rows_view, out_view, lse_view,
                            stream);
      },
      "Per sequence, the LSE merge of its partial rows into out / lse.", py::arg("partial_o"),
      py::arg("partial_lse"), py::arg("merge_indptr"), py::arg("merge_rows"), py::arg("out"),
      py::arg("lse"), py::arg("stream"));
  m.def(
      "merge_states",
      [](py::handle out_a, py::handle lse_a, py::handle out_b, py::handle lse_b, py::handle out,
         py::handle lse, uintptr_t stream) {
        const a2r::TensorView a_view = view(out_a, "out_a");
        const a2r::TensorView lse_a_view = view(lse_a, "lse_a");
        const a2r::TensorView b_view = view(out_b, "out_b");
        const a2r::TensorView lse_b_view = view(lse_b, "lse_b");
        const a2r::TensorView out_view = view(out, "out");
        const a2r::TensorView lse_view = view(lse, "lse");
        py::gil_scoped_release release;
        a2r::merge_states(a_view, lse_a_view, b_view, lse_b_view, out_view, lse_view, stream);
      },
      "LSE merge of two attention states.", py::arg("out_a"), py::arg("lse_a"), py::arg("out_b"),
      py::arg("lse_b"), py::arg("out"), py::arg("lse"), py::arg("stream"));
  m.def(
      "denoise_step",
      [](py::handle logits, py::handle tokens, py::handle num_transfer, py::handle x0,
         py::handle confidence, py::handle transferred, py::handle split_stats, int64_t mask_id,
         std::optional<double> threshold, double temperature, int remasking, uint64_t seed,
         int64_t num_splits, uintptr_t stream) {
        const a2r::TensorView logits_view = view(logits, "logits");
        const a2r::TensorView tokens_view = view(tokens, "tokens");
        const auto num_transfer_view = optional_view(num_transfer, "num_transfer");
        const a2r::TensorView x0_view = view(x0, "x0");
        const a2r::TensorView confidence_view = view(confidence, "confidence");
        const a2r::TensorView transferred_view = view(transferred, "transferred");
        const auto split_stats_view = optional_view(split_stats, "split_stats");
        a2r::DenoiseOptions options{};
        options.mask_id = mask_id;
        options.has_threshold = threshold.has_value();
        options.threshold = threshold ? static_cast<float>(*threshold) : 0.f;
        options.temperature = temperature;
        options.remasking = static_cast<a2r::Remasking>(remasking);
        options.seed = seed;
        options.num_splits = num_splits;
        py::gil_scoped_release release;
        a2r::denoise_step(logits_view, tokens_view,
                          num_transfer_view ? &*num_transfer_view : nullptr, x0_view,
                          confidence_view, transferred_view,
                          split_stats_view ? &*split_stats_view : nullptr, options, stream);
      },
      "One masked-diffusion denoising step (predict + select + commit in place).",
      py::arg("logits"), py::arg("tokens"), py::arg("num_transfer"), py::arg("x0"),
      py::arg("confidence"), py::arg("transferred"), py::arg("split_stats"), py::arg("mask_id"),
      py::arg("threshold"), py::arg("temperature"), py::arg("remasking"), py::arg("seed"),
      py::arg("num_splits"), py::arg("stream"));
}
