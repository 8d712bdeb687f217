"""TreeLayout.from_paths: the plan's work items read each shared node once per run of readers,
the adaptive split-KV chunk, and the checks of its inputs (ValueError naming the argument).
"""

import os

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402

import a2r_kernels as ak  # noqa: E402

from _attention_helpers import random_tree  # noqa: E402


@pytest.mark.parametrize("plan", [{"kv_chunk_size": 32}, {}, {"max_seqs_per_item": 1},
                                  {"kv_chunk_size": 16, "max_seqs_per_item": 3}])
def test_layout_reads_each_shared_node_once(plan):
    """In a tree, the work items cover each node's tokens once per chunk, whatever the fan-out:
    a run of sequences split into groups gives adjacent items over the same chunk (the later ones
    read it from L2), and every sequence sees every token of its path exactly once."""
    rng = random.Random(5)
    for _ in range(20):
        paths, tables, lengths, _ = random_tree(rng, rng.randint(1, 12), rng.randint(1, 5), 16)
        layout = ak.TreeLayout.from_paths(paths, tables, lengths, 16, **plan)
        used = {j for p in paths for j in p}
        work = layout.work_info.tolist()
        chunks = [(w[2], w[3], w[4]) for w in work]
        assert sum(c[2] - c[1] for c in set(chunks)) == sum(lengths[j] for j in used)
        # the items of one chunk are adjacent, and together cover a contiguous run
        for c in set(chunks):
            idx = [i for i, other in enumerate(chunks) if other == c]
            assert idx == list(range(idx[0], idx[-1] + 1))
            for a, b in zip(idx, idx[1:]):
                assert work[a][0] + work[a][1] == work[b][0]
        limit = plan.get("max_seqs_per_item", ak.layout.MAX_SEQS_PER_ITEM)
        assert all(1 <= w[1] <= limit for w in work)
        # every (seq, chunk) pair is covered once, and each sequence sees its whole path
        covered = [(layout.row_seq[w[0] + r].item(), w[2], w[3]) for w in work for r in range(w[1])]
        assert len(covered) == len(set(covered))
        seen = [0] * len(paths)
        for w in work:
            for r in range(w[1]):
                seen[layout.row_seq[w[0] + r].item()] += w[4] - w[3]
        assert seen == layout.seq_lens.tolist()
        assert layout.num_partials == len(covered)
        bytes_ = ak.kv_bytes(layout, 8, 128, torch.bfloat16)
        assert bytes_["shared"] <= bytes_["unshared"]


def test_layout_adaptive_chunk_grows_with_the_run():
    """Default plan: chunks of at least max(256, 16 * sequences under the node), balanced; runs
    split into groups of 16; partial states per sequence stay few under a wide prefix (here 8 + 1
    instead of 33)."""
    def plan(n, prefix, **kw):
        paths = [[0, 1 + i] for i in range(n)]
        first = -(-prefix // 16)
        tables = [list(range(first))] + [[first + i] for i in range(n)]
        return ak.TreeLayout.from_paths(paths, tables, [prefix] + [16] * n, 16, **kw)

    def chunk_lengths(layout):
        return sorted({w[4] - w[3] for w in layout.work_info.tolist() if w[2] == 0})

    wide = plan(64, 8192)
    assert chunk_lengths(wide) == [1024]
    assert wide.max_q_len == 16 and wide.num_partials == 64 * (8 + 1)
    assert wide.merge_indptr.diff().tolist() == [9] * 64
    assert chunk_lengths(plan(4, 1024)) == [256]            # few branches: the shortest chunk
    assert chunk_lengths(plan(20, 1000)) == [328, 336]      # 3 chunks of >= 16 * 20 tokens
    assert chunk_lengths(plan(20, 300)) == [300]            # shorter than one chunk
    fixed = plan(64, 8192, kv_chunk_size=256, max_seqs_per_item=64)
    assert chunk_lengths(fixed) == [256] and fixed.max_q_len == 64
    assert fixed.num_partials == 64 * (32 + 1)
    with pytest.raises(ValueError, match="max_seqs_per_item"):
        plan(2, 16, max_seqs_per_item=0)
    with pytest.raises(ValueError, match="kv_chunk_size"):
        plan(2, 16, kv_chunk_size=-4)


def test_layout_validation():
    with pytest.raises(ValueError, match="block_size"):
        ak.TreeLayout.from_paths([[0]], [[0]], [1], 0)
    with pytest.raises(ValueError, match="node_block_tables"):
        ak.TreeLayout.from_paths([[0]], [[0], [1]], [1], 16)
    with pytest.raises(ValueError, match="paths\\[0\\]"):
        ak.TreeLayout.from_paths([[1]], [[0]], [1], 16)
    with pytest.raises(ValueError, match="repeats"):
        ak.TreeLayout.from_paths([[0, 0]], [[0]], [1], 16)
    with pytest.raises(ValueError, match="does not fit"):
        ak.TreeLayout.from_paths([[0]], [[0]], [17], 16)
    with pytest.raises(ValueError, match="node_lengths\\[0\\]"):
        ak.TreeLayout.from_paths([[0]], [[0]], [-1], 16)


# Each case differs from the valid call from_paths([[0]], [[0]], [3], 16) in one argument, in a
# way that used to be truncated (2.7 -> 2, 0.9 -> 0, True -> 1), overflow or raise TypeError.
@pytest.mark.parametrize("name, paths, tables, lengths, block_size", [
    ("node_lengths", [[0]], [[0]], [2.7], 16),
    ("node_lengths", [[0]], [[0]], [True], 16),
    ("node_lengths", [[0]], [[0]], torch.tensor([3.0]), 16),
    ("node_lengths", [[0]], [[0]], torch.tensor([True]), 16),
    ("node_lengths", [[0]], [[0]], None, 16),
    (r"paths\[0\]", [[0.9]], [[0]], [3], 16),
    (r"paths\[0\]", [[False]], [[0]], [3], 16),
    (r"paths\[0\]", [torch.tensor([0.0])], [[0]], [3], 16),
    ("paths", None, [[0]], [3], 16),
    ("paths", 7, [[0]], [3], 16),
    (r"node_block_tables\[0\]", [[0]], [[1.5]], [3], 16),
    (r"node_block_tables\[0\]", [[0]], [[True]], [3], 16),
    (r"node_block_tables\[0\]", [[0]], [torch.tensor([1.0])], [3], 16),
    (r"node_block_tables\[0\]", [[0]], [[2 ** 31]], [3], 16),
    (r"node_block_tables\[0\]", [[0]], [[-1]], [3], 16),
    ("node_block_tables", [[0]], None, [3], 16),
    ("block_size", [[0]], [[0]], [3], 16.0),
    ("block_size", [[0]], [[0]], [3], True),
])
def test_layout_rejects_non_integers(name, paths, tables, lengths, block_size):
    with pytest.raises(ValueError, match=name):
        ak.TreeLayout.from_paths(paths, tables, lengths, block_size)


def test_layout_accepts_numpy_and_integer_tensors():
    np = pytest.importorskip("numpy")
    ref = ak.TreeLayout.from_paths([[0, 1]], [[0], [1]], [3, 2], 16)
    for ints in (np.array, lambda x: torch.tensor(x, dtype=torch.int32)):
        layout = ak.TreeLayout.from_paths([ints([0, 1])], [ints([0]), ints([1])], ints([3, 2]),
                                          np.int64(16))
        assert layout.paths == [[0, 1]] and layout.node_lengths == [3, 2]
        assert torch.equal(layout.work_info, ref.work_info)
    big = ak.TreeLayout.from_paths([[0]], [[2 ** 31 - 1]], [1], 16)   # the largest int32 id
    assert big.max_block_id == 2 ** 31 - 1
