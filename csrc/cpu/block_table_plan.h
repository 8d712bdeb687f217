// Host planning of paged decode steps (a2r_kernels/block_table_tree.py and incremental_plan.py
// call these through a2r_kernels._cpu; the numpy code there is the reference they are tested
// against). Plain C++ on host arrays, no threads: linear in the table entries read.
#pragma once

#include <cstdint>
#include <vector>

namespace a2r::cpu {

// The tree of a paged decode step (a2r_kernels.block_table_tree.block_table_nodes): row i reads
// tables[i * width + c] for c < ceil(lens[i] / block_size). Groups of entries with the same
// (column, block id, tokens read) are numbered by first entry (row-major); chains of groups
// with the same readers merge into one node, numbered by head group.
struct BlockTableTree {
  std::vector<int64_t> path_nodes;    // every row's nodes, root to leaf, rows concatenated
  std::vector<int64_t> path_counts;   // [num_rows] nodes per row
  std::vector<int64_t> node_lengths;  // tokens per node
  std::vector<int64_t> page_starts;   // node's first entry, row * width + column
  int64_t max_block_id = -1;          // largest block id read, -1 if none
  int64_t bad_row = -1;               // first row holding a negative id (then nothing else set)
};

BlockTableTree block_table_tree(const int32_t* tables, int64_t num_rows, int64_t width,
                                const int64_t* lens, int64_t block_size);

// in_use[b] = 1 for every block id b that some row reads (ids checked by block_table_tree:
// non-negative, below in_use's size).
void mark_used_blocks(const int32_t* tables, int64_t num_rows, int64_t width,
                      const int64_t* lens, int64_t block_size, uint8_t* in_use);

// The incremental planner's check and record of one step (IncrementalTreePlanner._append_only):
// every row kept or grown, only rows with can_grow[i] grown, the entries read last step
// unchanged against kept, the entries new to this step fresh (not in in_use, none twice).
// Returns 0 when so (then kept, in_use and old_lens hold this step), 1 when not (nothing
// written), 2 when row *value holds a negative new id, 3 when in_use must hold *value + 1 ids,
// 4 when some lens[i] lies outside [0, width * block_size] (checked first).
int append_step(const int32_t* tables, int32_t* kept, int64_t num_rows, int64_t width,
                const int64_t* lens, int64_t* old_lens, const uint8_t* can_grow,
                uint8_t* in_use, int64_t in_use_size, int64_t block_size, int64_t* value);

// The tails of an incremental step (IncrementalTreePlanner._layout): row i's tail holds
// tail_len = lens[i] - tail_start[i] tokens in ceil(tail_len / chunk) work items, items
// item_first[i] ... of the tail items in work (int32 [items, 6], column 4: the item's end).
// When every row's item count equals chunks[i] (the last plan's), writes each row's last item
// end, seq_lens (int32) and lengths[tail_node[i]] = tail_len, sets *sums to (sum of tail_len,
// sum of lens, max of lens) and returns true; else writes nothing and returns false.
bool advance_tails(const int64_t* lens, const int64_t* tail_start, const int64_t* chunks,
                   const int64_t* item_first, const int64_t* tail_node, int64_t num_rows,
                   int64_t chunk, int32_t* work, int32_t* seq_lens, int64_t* lengths,
                   int64_t* sums);

// Each row's tail work items (IncrementalTreePlanner._write_plan): chunks[i] = ceil((lens[i] -
// tail_start[i]) / chunk), item_first[i] their running sum before row i; returns the total.
int64_t tail_chunks(const int64_t* lens, const int64_t* tail_start, int64_t num_rows,
                    int64_t chunk, int64_t* chunks, int64_t* item_first);

// The host plan of a step from the shared part (kept since the replan) and the tails (sizes
// from tail_chunks): work = the shared items, then each row's tail items in row and chunk
// order (partial rows after the shared ones); row_seq copied; the merge CSR by row (its shared
// rows, then its tail's); seq_lens; lengths[tail_node[i]] = tail length. *sums as in
// advance_tails.
struct SharedPlanPart {
  const int32_t* work;          // [num_work * 6]
  int64_t num_work;
  const int32_t* row_seq;       // [num_rows]
  const int64_t* indptr;        // [num_rows + 1] the shared merge CSR
  const int32_t* rows;          // [indptr[num_rows]]
  const int64_t* pos_of_row;    // [num_rows]
  const int64_t* tail_start;    // [num_rows]
  const int64_t* tail_node;     // [num_rows]
  int64_t num_partials;
  int64_t width, block_size, chunk;
};
void write_step_plan(const SharedPlanPart& shared, const int64_t* lens, int64_t num_rows,
                     const int64_t* chunks, const int64_t* item_first, int32_t* work,
                     int32_t* row_seq, int32_t* merge_indptr, int32_t* merge_rows,
                     int32_t* seq_lens, int64_t* lengths, int64_t* sums);

}  // namespace a2r::cpu
