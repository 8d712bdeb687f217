// Host planning of paged decode steps: see block_table_plan.h.
#include "block_table_plan.h"

#include <cstring>
#include <unordered_map>

#include "../ops.h"   // kWorkInfoColumns

namespace a2r::cpu {
namespace {

// The per-row bookkeeping every step writes, and the step's sums (tail tokens, tokens, longest
// row), as IncrementalTreePlanner reads them back.
struct StepTotals {
  int64_t tail_sum = 0, lens_sum = 0, lens_max = 0;

  void row(int64_t i, int64_t len, int64_t tail_len, int64_t tail_node, int32_t* seq_lens,
           int64_t* lengths) {
    seq_lens[i] = static_cast<int32_t>(len);
    lengths[tail_node] = tail_len;
    tail_sum += tail_len;
    lens_sum += len;
    lens_max = len > lens_max ? len : lens_max;
  }
  void write(int64_t* sums) const {
    sums[0] = tail_sum;
    sums[1] = lens_sum;
    sums[2] = lens_max;
  }
};

// (column, block id, tokens read) of an entry whose block id was first read elsewhere or to
// another length: the rare key of a repeated block.
struct EntryKey {
  int64_t col, block, fill;
  bool operator==(const EntryKey& o) const {
    return col == o.col && block == o.block && fill == o.fill;
  }
};
struct EntryKeyHash {
  size_t operator()(const EntryKey& k) const {
    uint64_t h = static_cast<uint64_t>(k.block) * 0x9E3779B97F4A7C15ull;
    h ^= static_cast<uint64_t>(k.col) + 0x7F4A7C159E3779B9ull + (h << 6) + (h >> 2);
    h ^= static_cast<uint64_t>(k.fill) + (h << 6) + (h >> 2);
    return static_cast<size_t>(h);
  }
};

}  // namespace

BlockTableTree block_table_tree(const int32_t* tables, int64_t num_rows, int64_t width,
                                const int64_t* lens, int64_t block_size) {
  BlockTableTree tree;
  std::vector<int64_t> row_first(num_rows + 1, 0);   // each row's first entry
  for (int64_t i = 0; i < num_rows; ++i) {
    row_first[i + 1] = row_first[i] + (lens[i] + block_size - 1) / block_size;
  }
  const int64_t num_entries = row_first[num_rows];
  int32_t max_id = -1;
  for (int64_t i = 0; i < num_rows; ++i) {
    const int32_t* row = tables + i * width;
    for (int64_t c = 0, n = row_first[i + 1] - row_first[i]; c < n; ++c) {
      if (row[c] < 0) {
        tree.bad_row = i;
        return tree;
      }
      max_id = row[c] > max_id ? row[c] : max_id;
    }
  }
  tree.max_block_id = max_id;
  // Group of each entry, numbered by first entry: the group of the block id's first entry
  // when that one has the same column and fill (the paged engine's case: one random access
  // per entry, into int32s), else through a hash map. Per group: its first entry's row,
  // column and fill, its reader count.
  std::vector<int32_t> group_of_block(static_cast<size_t>(max_id) + 1, -1);
  std::unordered_map<EntryKey, int32_t, EntryKeyHash> other_keys;
  std::vector<int32_t> group(num_entries);
  std::vector<int64_t> group_row, group_col, group_fill, counts;
  for (int64_t i = 0; i < num_rows; ++i) {
    const int32_t* row = tables + i * width;
    const int64_t n = row_first[i + 1] - row_first[i];
    for (int64_t c = 0; c < n; ++c) {
      const int32_t block = row[c];
      const int64_t fill = c + 1 == n ? lens[i] - c * block_size : block_size;
      int32_t g = group_of_block[block];
      if (g >= 0 && (group_col[g] != c || group_fill[g] != fill)) {
        g = other_keys.try_emplace(EntryKey{c, block, fill},
                                   static_cast<int32_t>(counts.size())).first->second;
      } else if (g < 0) {
        g = group_of_block[block] = static_cast<int32_t>(counts.size());
      }
      if (g == static_cast<int32_t>(counts.size())) {   // a new group
        group_row.push_back(i);
        group_col.push_back(c);
        group_fill.push_back(fill);
        counts.push_back(0);
      }
      group[row_first[i] + c] = g;
      ++counts[g];
    }
  }
  const int64_t num_groups = static_cast<int64_t>(counts.size());
  // A group merges into the next one when all its readers continue into the same group and
  // nobody else reads that one (block_table_tree.py says why that is one node).
  std::vector<int64_t> group_next(num_groups, -2);   // -2: not seen yet
  std::vector<uint8_t> merges(num_groups, 1), is_head(num_groups, 1);
  for (int64_t i = 0; i < num_rows; ++i) {
    for (int64_t e = row_first[i]; e < row_first[i + 1]; ++e) {
      const int64_t g = group[e];
      const int64_t next = e + 1 < row_first[i + 1] ? group[e + 1] : -1;
      if (group_next[g] == -2) group_next[g] = next;   // at the group's first entry
      else if (group_next[g] != next) merges[g] = 0;
    }
  }
  for (int64_t g = 0; g < num_groups; ++g) {
    merges[g] = merges[g] && group_next[g] >= 0 && counts[g] == counts[group_next[g]];
    if (merges[g]) is_head[group_next[g]] = 0;
  }
  std::vector<int64_t> head_node(num_groups, -1);
  for (int64_t g = 0; g < num_groups; ++g) {
    if (!is_head[g]) continue;
    head_node[g] = static_cast<int64_t>(tree.page_starts.size());
    tree.page_starts.push_back(group_row[g] * width + group_col[g]);
  }
  tree.node_lengths.assign(tree.page_starts.size(), 0);
  std::vector<int64_t> node_of_group(num_groups, -1);
  tree.path_counts.assign(num_rows, 0);
  for (int64_t i = 0; i < num_rows; ++i) {
    int64_t node = -1;
    for (int64_t e = row_first[i]; e < row_first[i + 1]; ++e) {
      if (e == row_first[i] || !merges[group[e - 1]]) {   // a run starts: a new node
        node = head_node[group[e]];
        tree.path_nodes.push_back(node);
        ++tree.path_counts[i];
      }
      node_of_group[group[e]] = node;
    }
  }
  for (int64_t g = 0; g < num_groups; ++g) {
    tree.node_lengths[node_of_group[g]] += group_fill[g];
  }
  return tree;
}

void mark_used_blocks(const int32_t* tables, int64_t num_rows, int64_t width,
                      const int64_t* lens, int64_t block_size, uint8_t* in_use) {
  for (int64_t i = 0; i < num_rows; ++i) {
    const int32_t* row = tables + i * width;
    for (int64_t c = 0, n = (lens[i] + block_size - 1) / block_size; c < n; ++c) {
      in_use[row[c]] = 1;
    }
  }
}

int append_step(const int32_t* tables, int32_t* kept, int64_t num_rows, int64_t width,
                const int64_t* lens, int64_t* old_lens, const uint8_t* can_grow,
                uint8_t* in_use, int64_t in_use_size, int64_t block_size, int64_t* value) {
  for (int64_t i = 0; i < num_rows; ++i) {
    if (lens[i] < 0 || lens[i] > width * block_size) return 4;
  }
  int64_t top = -1;
  for (int64_t i = 0; i < num_rows; ++i) {
    if (lens[i] < old_lens[i] || (lens[i] > old_lens[i] && !can_grow[i])) return 1;
    const int64_t old_used = (old_lens[i] + block_size - 1) / block_size;
    const int64_t used = (lens[i] + block_size - 1) / block_size;
    const int32_t* row = tables + i * width;
    if (std::memcmp(row, kept + i * width, sizeof(int32_t) * old_used) != 0) return 1;
    for (int64_t c = old_used; c < used; ++c) {
      if (row[c] < 0) {
        *value = i;
        return 2;
      }
      if (row[c] > top) top = row[c];
    }
  }
  if (top >= in_use_size) {
    *value = top;
    return 3;
  }
  // Fresh ids: marked as they come (a second place of one id finds its mark), unmarked again
  // when the step is not append-only.
  std::vector<int32_t> marked;
  for (int64_t i = 0; i < num_rows; ++i) {
    const int64_t old_used = (old_lens[i] + block_size - 1) / block_size;
    const int64_t used = (lens[i] + block_size - 1) / block_size;
    for (int64_t c = old_used; c < used; ++c) {
      const int32_t block = tables[i * width + c];
      if (in_use[block]) {
        for (const int32_t b : marked) in_use[b] = 0;
        return 1;
      }
      in_use[block] = 1;
      marked.push_back(block);
    }
  }
  for (int64_t i = 0; i < num_rows; ++i) {
    const int64_t old_used = (old_lens[i] + block_size - 1) / block_size;
    const int64_t used = (lens[i] + block_size - 1) / block_size;
    std::memcpy(kept + i * width + old_used, tables + i * width + old_used,
                sizeof(int32_t) * (used - old_used));
    old_lens[i] = lens[i];
  }
  *value = top;
  return 0;
}

bool advance_tails(const int64_t* lens, const int64_t* tail_start, const int64_t* chunks,
                   const int64_t* item_first, const int64_t* tail_node, int64_t num_rows,
                   int64_t chunk, int32_t* work, int32_t* seq_lens, int64_t* lengths,
                   int64_t* sums) {
  for (int64_t i = 0; i < num_rows; ++i) {
    if ((lens[i] - tail_start[i] + chunk - 1) / chunk != chunks[i]) return false;
  }
  StepTotals totals;
  constexpr int64_t kEnd = 4;   // kv_end's column in WORK_FIELDS
  for (int64_t i = 0; i < num_rows; ++i) {
    const int64_t tail_len = lens[i] - tail_start[i];
    if (chunks[i] > 0) {
      // Items cover [k * chunk, min((k + 1) * chunk, tail_len)): the last one ends the tail.
      work[(item_first[i] + chunks[i] - 1) * kWorkInfoColumns + kEnd] =
          static_cast<int32_t>(tail_len);
    }
    totals.row(i, lens[i], tail_len, tail_node[i], seq_lens, lengths);
  }
  totals.write(sums);
  return true;
}

int64_t tail_chunks(const int64_t* lens, const int64_t* tail_start, int64_t num_rows,
                    int64_t chunk, int64_t* chunks, int64_t* item_first) {
  int64_t total = 0;
  for (int64_t i = 0; i < num_rows; ++i) {
    chunks[i] = (lens[i] - tail_start[i] + chunk - 1) / chunk;
    item_first[i] = total;
    total += chunks[i];
  }
  return total;
}

void write_step_plan(const SharedPlanPart& shared, const int64_t* lens, int64_t num_rows,
                     const int64_t* chunks, const int64_t* item_first, int32_t* work,
                     int32_t* row_seq, int32_t* merge_indptr, int32_t* merge_rows,
                     int32_t* seq_lens, int64_t* lengths, int64_t* sums) {
  std::memcpy(work, shared.work, sizeof(int32_t) * shared.num_work * kWorkInfoColumns);
  std::memcpy(row_seq, shared.row_seq, sizeof(int32_t) * num_rows);
  int32_t* tail_items = work + shared.num_work * kWorkInfoColumns;
  StepTotals totals;
  int64_t merged = 0;
  merge_indptr[0] = 0;
  for (int64_t i = 0; i < num_rows; ++i) {
    const int64_t tail_len = lens[i] - shared.tail_start[i];
    const int64_t page_start = i * shared.width + shared.tail_start[i] / shared.block_size;
    for (int64_t r = shared.indptr[i]; r < shared.indptr[i + 1]; ++r) {
      merge_rows[merged++] = shared.rows[r];
    }
    for (int64_t k = 0; k < chunks[i]; ++k) {
      const int64_t item = item_first[i] + k;
      int32_t* out = tail_items + item * kWorkInfoColumns;
      const int64_t kv_start = k * shared.chunk;
      const int64_t kv_end = kv_start + shared.chunk < tail_len ? kv_start + shared.chunk
                                                                : tail_len;
      out[0] = static_cast<int32_t>(shared.pos_of_row[i]);
      out[1] = 1;
      out[2] = static_cast<int32_t>(page_start);
      out[3] = static_cast<int32_t>(kv_start);
      out[4] = static_cast<int32_t>(kv_end);
      out[5] = static_cast<int32_t>(shared.num_partials + item);
      merge_rows[merged++] = out[5];
    }
    merge_indptr[i + 1] = static_cast<int32_t>(merged);
    totals.row(i, lens[i], tail_len, shared.tail_node[i], seq_lens, lengths);
  }
  totals.write(sums);
}

}  // namespace a2r::cpu
