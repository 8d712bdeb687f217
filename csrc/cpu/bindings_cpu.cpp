// pybind11 module a2r_kernels._cpu: the CPU tree attention (csrc/cpu/tree_attention_cpu.h),
// built by the host compiler on every install (no nvcc, no libtorch). Tensors cross as DLPack
// capsules (a2r_kernels/_cpu_ops.py: torch.utils.dlpack.to_dlpack, no copy), are checked by the
// entry points (std::invalid_argument -> ValueError naming the argument), and the GIL is released
// while the kernels run.
#include <algorithm>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "../dlpack_capsule.h"
#include "../ops.h"
#include "block_table_plan.h"
#include "tree_attention_cpu.h"

namespace py = pybind11;
using a2r::dlpack_view;

namespace {

// Host arrays of the planner: C-contiguous numpy arrays of one dtype (no conversion: a copy
// would hide a write into a temporary).
template <typename T>
T* host_array(py::array& array, const char* name) {
  if (!py::isinstance<py::array_t<T>>(array) ||
      !(array.flags() & py::array::c_style)) {
    throw std::invalid_argument(std::string(name) + " must be a C-contiguous " +
                                py::str(py::dtype::of<T>()).cast<std::string>() + " array");
  }
  return static_cast<T*>(array.mutable_data());
}

py::tuple block_table_tree(py::array tables, py::array lens, int64_t block_size) {
  if (tables.ndim() != 2 || lens.ndim() != 1 || lens.shape(0) != tables.shape(0)) {
    throw std::invalid_argument("tables must be [S, W] and lens [S]");
  }
  const int32_t* table_data = host_array<int32_t>(tables, "tables");
  const int64_t* lens_data = host_array<int64_t>(lens, "lens");
  const int64_t num_rows = tables.shape(0), width = tables.shape(1);
  a2r::cpu::BlockTableTree tree;
  {
    py::gil_scoped_release release;
    tree = a2r::cpu::block_table_tree(table_data, num_rows, width, lens_data, block_size);
  }
  if (tree.bad_row >= 0) return py::make_tuple(tree.bad_row);
  py::list paths(num_rows);
  size_t pos = 0;
  for (int64_t i = 0; i < num_rows; ++i) {
    py::list path(tree.path_counts[i]);
    for (int64_t k = 0; k < tree.path_counts[i]; ++k) path[k] = tree.path_nodes[pos++];
    paths[i] = path;
  }
  return py::make_tuple(paths, py::cast(tree.node_lengths), py::cast(tree.page_starts),
                        tree.max_block_id);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() =
      "a2r-kernels CPU backend (no libtorch). Call through a2r_kernels._cpu_ops: tensors cross "
      "as DLPack capsules and are checked by the entry points; the last argument is the number "
      "of OpenMP threads (<= 0: OpenMP's default).";
  // Public ops (a2r_kernels) that this extension implements, for backend selection.
  m.attr("PUBLIC_OPS") = py::make_tuple("tree_decode_attention", "paged_decode_attention",
                                        "merge_attention_states");
  m.attr("MAX_HEAD_DIM") = a2r::kMaxHeadDim;
  m.attr("WORK_INFO_COLUMNS") = a2r::kWorkInfoColumns;
#if defined(_OPENMP)
  m.attr("OPENMP") = true;
#else
  m.attr("OPENMP") = false;
#endif
  m.def("isa", &a2r::cpu::selected_isa,
        "Instruction set the partial kernel runs with: 'avx2' or 'baseline'.");
  m.def("select_isa", [](const std::string& name) { a2r::cpu::select_isa(name.c_str()); },
        "Pick the instruction set: 'auto' (the best this CPU has), 'avx2' (ValueError when the "
        "CPU lacks AVX2, FMA or F16C) or 'baseline'. A2R_CPU_ISA sets the initial choice.",
        py::arg("name"));

  m.def(
      "tree_attention_partials",
      [](py::handle q, py::handle k_cache, py::handle v_cache, py::handle work_info,
         py::handle row_seq, py::handle page_table, py::handle partial_o, py::handle partial_lse,
         double sm_scale, int num_threads) {
        // One statement per view: arguments are converted (and rejected) in their order.
        const a2r::TensorView q_view = dlpack_view(q, "q");
        const a2r::TensorView k_view = dlpack_view(k_cache, "k_cache");
        const a2r::TensorView v_view = dlpack_view(v_cache, "v_cache");
        const a2r::TensorView work_view = dlpack_view(work_info, "work_info");
        const a2r::TensorView row_seq_view = dlpack_view(row_seq, "row_seq");
        const a2r::TensorView page_view = dlpack_view(page_table, "page_table");
        const a2r::TensorView po_view = dlpack_view(partial_o, "partial_o");
        const a2r::TensorView plse_view = dlpack_view(partial_lse, "partial_lse");
        py::gil_scoped_release release;
        a2r::cpu::tree_attention_partials(q_view, k_view, v_view, work_view, row_seq_view,
                                          page_view, po_view, plse_view,
                                          static_cast<float>(sm_scale), num_threads);
      },
      "Partial (o, lse) per tree work item and q head; see csrc/cpu/tree_attention_cpu.h.",
      py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("work_info"),
      py::arg("row_seq"), py::arg("page_table"), py::arg("partial_o"), py::arg("partial_lse"),
      py::arg("sm_scale"), py::arg("num_threads"));
  m.def(
      "merge_partials",
      [](py::handle partial_o, py::handle partial_lse, py::handle merge_indptr,
         py::handle merge_rows, py::handle out, py::handle lse, int num_threads) {
        const a2r::TensorView po_view = dlpack_view(partial_o, "partial_o");
        const a2r::TensorView plse_view = dlpack_view(partial_lse, "partial_lse");
        const a2r::TensorView indptr_view = dlpack_view(merge_indptr, "merge_indptr");
        const a2r::TensorView rows_view = dlpack_view(merge_rows, "merge_rows");
        const a2r::TensorView out_view = dlpack_view(out, "out");
        const a2r::TensorView lse_view = dlpack_view(lse, "lse");
        py::gil_scoped_release release;
        a2r::cpu::merge_partials(po_view, plse_view, indptr_view, rows_view, out_view, lse_view,
                                 num_threads);
      },
      "Per sequence, the LSE merge of its partial rows into out / lse.", py::arg("partial_o"),
      py::arg("partial_lse"), py::arg("merge_indptr"), py::arg("merge_rows"), py::arg("out"),
      py::arg("lse"), py::arg("num_threads"));
  m.def(
      "merge_states",
      [](py::handle out_a, py::handle lse_a, py::handle out_b, py::handle lse_b, py::handle out,
         py::handle lse, int num_threads) {
        const a2r::TensorView a_view = dlpack_view(out_a, "out_a");
        const a2r::TensorView lse_a_view = dlpack_view(lse_a, "lse_a");
        const a2r::TensorView b_view = dlpack_view(out_b, "out_b");
        const a2r::TensorView lse_b_view = dlpack_view(lse_b, "lse_b");
        const a2r::TensorView out_view = dlpack_view(out, "out");
        const a2r::TensorView lse_view = dlpack_view(lse, "lse");
        py::gil_scoped_release release;
        a2r::cpu::merge_states(a_view, lse_a_view, b_view, lse_b_view, out_view, lse_view,
                               num_threads);
      },
      "LSE merge of two attention states.", py::arg("out_a"), py::arg("lse_a"), py::arg("out_b"),
      py::arg("lse_b"), py::arg("out"), py::arg("lse"), py::arg("num_threads"));

  m.def("block_table_tree", &block_table_tree,
        "The tree of a paged decode step (a2r_kernels.block_table_tree.block_table_nodes): "
        "int32 C-contiguous tables [S, W], int64 lens [S] -> (paths, node lengths, page starts, "
        "max block id), or (row,) when that row holds a negative block id.",
        py::arg("tables"), py::arg("lens"), py::arg("block_size"));
  m.def(
      "advance_tails",
      [](py::array lens, py::array tail_start, py::array chunks, py::array item_first,
         py::array tail_node, int64_t chunk, py::array work, py::array seq_lens,
         py::array lengths) -> py::object {
        const int64_t num_rows = lens.size();
        int64_t num_items = 0;
        const int64_t* chunk_data = host_array<int64_t>(chunks, "chunks");
        const int64_t* first_data = host_array<int64_t>(item_first, "item_first");
        const int64_t* node_data = host_array<int64_t>(tail_node, "tail_node");
        if (tail_start.size() != num_rows || chunks.size() != num_rows ||
            item_first.size() != num_rows || tail_node.size() != num_rows ||
            seq_lens.size() != num_rows || chunk <= 0) {
          throw std::invalid_argument("advance_tails: row arrays of one size, chunk > 0");
        }
        for (int64_t i = 0; i < num_rows; ++i) {   // the writes stay inside the arrays
          num_items = std::max(num_items, first_data[i] + chunk_data[i]);
          if (node_data[i] < 0 || node_data[i] >= lengths.size() || chunk_data[i] < 0) {
            throw std::invalid_argument("advance_tails: tail_node outside lengths");
          }
        }
        if (num_items * 6 > work.size()) {
          throw std::invalid_argument("advance_tails: work holds too few items");
        }
        int64_t sums[3];
        const bool same = a2r::cpu::advance_tails(
            host_array<int64_t>(lens, "lens"), host_array<int64_t>(tail_start, "tail_start"),
            chunk_data, first_data, node_data, num_rows, chunk, host_array<int32_t>(work, "work"),
            host_array<int32_t>(seq_lens, "seq_lens"), host_array<int64_t>(lengths, "lengths"),
            sums);
        if (!same) return py::none();
        return py::make_tuple(sums[0], sums[1], sums[2]);
      },
      "IncrementalTreePlanner's common step (block_table_plan.h): (tail tokens, tokens, "
      "longest row) when every tail keeps its work items, else None.",
      py::arg("lens"), py::arg("tail_start"), py::arg("chunks"), py::arg("item_first"),
      py::arg("tail_node"), py::arg("chunk"), py::arg("work"), py::arg("seq_lens"),
      py::arg("lengths"));
  m.def(
      "tail_chunks",
      [](py::array lens, py::array tail_start, int64_t chunk, py::array chunks,
         py::array item_first) {
        const int64_t num_rows = lens.size();
        if (tail_start.size() != num_rows || chunks.size() != num_rows ||
            item_first.size() != num_rows || chunk <= 0) {
          throw std::invalid_argument("tail_chunks: row arrays of one size, chunk > 0");
        }
        return a2r::cpu::tail_chunks(host_array<int64_t>(lens, "lens"),
                                     host_array<int64_t>(tail_start, "tail_start"), num_rows,
                                     chunk, host_array<int64_t>(chunks, "chunks"),
                                     host_array<int64_t>(item_first, "item_first"));
      },
      "Each row's tail items (block_table_plan.h): fills chunks and item_first, returns the "
      "total.",
      py::arg("lens"), py::arg("tail_start"), py::arg("chunk"), py::arg("chunks"),
      py::arg("item_first"));
  m.def(
      "write_step_plan",
      [](py::array work, py::array row_seq, py::array indptr, py::array rows,
         py::array pos_of_row, py::array tail_start, py::array tail_node, int64_t num_partials,
         int64_t width, int64_t block_size, int64_t chunk, py::array lens, py::array chunks,
         py::array item_first, py::array buffer, std::vector<int64_t> offsets,
         py::array lengths) {
        const int64_t num_rows = lens.size();
        a2r::cpu::SharedPlanPart shared{
            host_array<int32_t>(work, "work"), work.size() / 6,
            host_array<int32_t>(row_seq, "row_seq"), host_array<int64_t>(indptr, "indptr"),
            host_array<int32_t>(rows, "rows"), host_array<int64_t>(pos_of_row, "pos_of_row"),
            host_array<int64_t>(tail_start, "tail_start"),
            host_array<int64_t>(tail_node, "tail_node"), num_partials, width, block_size,
            chunk};
        const int64_t* chunk_data = host_array<int64_t>(chunks, "chunks");
        const int64_t* first_data = host_array<int64_t>(item_first, "item_first");
        // Every write stays inside buffer and lengths (the plan's sizes from the inputs).
        bool ok = work.size() % 6 == 0 && row_seq.size() == num_rows &&
                  indptr.size() == num_rows + 1 && pos_of_row.size() == num_rows &&
                  tail_start.size() == num_rows && tail_node.size() == num_rows &&
                  chunks.size() == num_rows && item_first.size() == num_rows &&
                  offsets.size() == 5 && chunk > 0 && block_size > 0;
        int64_t items = 0;
        for (int64_t i = 0; ok && i < num_rows; ++i) {
          ok = first_data[i] == items && chunk_data[i] >= 0 && shared.tail_node[i] >= 0 &&
               shared.tail_node[i] < lengths.size() && shared.indptr[i] <= shared.indptr[i + 1];
          items += chunk_data[i];
        }
        ok = ok && (num_rows == 0 || (shared.indptr[0] == 0 &&
                                      shared.indptr[num_rows] == rows.size()));
        const int64_t sizes[5] = {work.size() + items * 6, num_rows, num_rows + 1,
                                  rows.size() + items, num_rows};
        for (int k = 0; ok && k < 5; ++k) {
          ok = offsets[k] >= 0 && offsets[k] + sizes[k] <= buffer.size();
        }
        if (!ok) throw std::invalid_argument("write_step_plan: inconsistent plan arrays");
        int32_t* out = host_array<int32_t>(buffer, "buffer");
        int64_t sums[3];
        a2r::cpu::write_step_plan(shared, host_array<int64_t>(lens, "lens"), num_rows,
                                  chunk_data, first_data, out + offsets[0], out + offsets[1],
                                  out + offsets[2], out + offsets[3], out + offsets[4],
                                  host_array<int64_t>(lengths, "lengths"), sums);
        return py::make_tuple(sums[0], sums[1], sums[2]);
      },
      "The host plan of an incremental step into buffer at offsets (work_info, row_seq, "
      "merge_indptr, merge_rows, seq_lens); (tail tokens, tokens, longest row).",
      py::arg("work"), py::arg("row_seq"), py::arg("indptr"), py::arg("rows"),
      py::arg("pos_of_row"), py::arg("tail_start"), py::arg("tail_node"),
      py::arg("num_partials"), py::arg("width"), py::arg("block_size"), py::arg("chunk"),
      py::arg("lens"), py::arg("chunks"), py::arg("item_first"), py::arg("buffer"),
      py::arg("offsets"), py::arg("lengths"));
  m.def(
      "mark_used_blocks",
      [](py::array tables, py::array lens, int64_t block_size, py::array in_use) {
        if (tables.ndim() != 2 || lens.size() != tables.shape(0)) {
          throw std::invalid_argument("mark_used_blocks: tables [S, W], lens [S]");
        }
        const int32_t* table_data = host_array<int32_t>(tables, "tables");
        const int64_t* lens_data = host_array<int64_t>(lens, "lens");
        uint8_t* use_data = reinterpret_cast<uint8_t*>(host_array<bool>(in_use, "in_use"));
        const int64_t num_rows = tables.shape(0), width = tables.shape(1);
        for (int64_t i = 0; i < num_rows; ++i) {   // the ids must fit in_use
          const int64_t n = (lens_data[i] + block_size - 1) / block_size;
          for (int64_t c = 0; c < n; ++c) {
            const int32_t block = table_data[i * width + c];
            if (block < 0 || block >= in_use.size()) {
              throw std::invalid_argument("mark_used_blocks: a block id outside in_use");
            }
          }
        }
        a2r::cpu::mark_used_blocks(table_data, num_rows, width, lens_data, block_size,
                                   use_data);
      },
      "in_use[b] = True for every block id b read within lens.", py::arg("tables"),
      py::arg("lens"), py::arg("block_size"), py::arg("in_use"));
  m.def(
      "append_step",
      [](py::array tables, py::array kept, py::array lens, py::array old_lens,
         py::array can_grow, py::array in_use, int64_t block_size) {
        if (tables.ndim() != 2 || kept.ndim() != 2 || kept.shape(0) != tables.shape(0) ||
            kept.shape(1) != tables.shape(1) || lens.size() != tables.shape(0) ||
            old_lens.size() != tables.shape(0) || can_grow.size() != tables.shape(0)) {
          throw std::invalid_argument("append_step: tables, kept [S, W]; lens, old_lens, "
                                      "can_grow [S]");
        }
        const int32_t* table_data = host_array<int32_t>(tables, "tables");
        int32_t* kept_data = host_array<int32_t>(kept, "kept");
        const int64_t* lens_data = host_array<int64_t>(lens, "lens");
        int64_t* old_data = host_array<int64_t>(old_lens, "old_lens");
        const uint8_t* grow_data = reinterpret_cast<uint8_t*>(host_array<bool>(can_grow,
                                                                              "can_grow"));
        uint8_t* use_data = reinterpret_cast<uint8_t*>(host_array<bool>(in_use, "in_use"));
        int64_t value = -1;
        const int status = a2r::cpu::append_step(table_data, kept_data, tables.shape(0),
                                                 tables.shape(1), lens_data, old_data,
                                                 grow_data, use_data, in_use.size(),
                                                 block_size, &value);
        return py::make_tuple(status, value);
      },
      "IncrementalTreePlanner's append-only check and record of one step (block_table_plan.h): "
      "(status, value).",
      py::arg("tables"), py::arg("kept"), py::arg("lens"), py::arg("old_lens"),
      py::arg("can_grow"), py::arg("in_use"), py::arg("block_size"));
}
