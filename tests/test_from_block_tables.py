"""TreeLayout.from_block_tables: the tree of a paged (vLLM-like) batch found from its block
tables, equal to paged decode on every backend, reading each shared block once; partial blocks
read to different lengths; the checks of its inputs.

Triton kernels run in Triton's CPU interpreter without a GPU (TRITON_INTERPRET=1, set before
anything imports triton).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402

import a2r_kernels as ak  # noqa: E402
from _attention_helpers import (BACKENDS, DEVICE, _backend_or_skip, _pool, _wrapper,  # noqa: E402
                                check_close)


# ------------------------------------------------------------------------- from_block_tables
def vllm_like_tables(rng: random.Random, block_size: int):
    """Block tables as vLLM hands them over: groups of requests (n > 1 samples of one prompt)
    share the prompt's full blocks, each has private blocks after them (its partial last
    prompt block recomputed, then its samples), some requests share nothing; rows padded with
    junk ids past their length."""
    next_block = [0]

    def fresh(n):
        ids = list(range(next_block[0], next_block[0] + n))
        next_block[0] += n
        return ids

    tables, lens = [], []
    for _ in range(rng.randint(2, 4)):
        prompt = rng.randint(0, 5 * block_size)
        shared = fresh(prompt // block_size)
        for _ in range(rng.randint(1, 5)):
            total = prompt + rng.randint(0, 3 * block_size)
            own = fresh(-(-total // block_size) - len(shared))
            tables.append(shared + own)
            lens.append(total)
    for _ in range(rng.randint(1, 3)):
        total = rng.randint(0, 4 * block_size)
        tables.append(fresh(-(-total // block_size)))
        lens.append(total)
    order = list(range(len(tables)))
    rng.shuffle(order)
    tables, lens = [tables[i] for i in order], [lens[i] for i in order]
    width = max(map(len, tables)) + 1
    junk = next_block[0] + 1000
    return [t + [junk] * (width - len(t)) for t in tables], lens, next_block[0]


def unique_kv_tokens(tables, lens, block_size):
    """Tokens of the distinct blocks read (a block read by several rows counted once)."""
    read = {}
    for table, n in zip(tables, lens):
        for p in range(-(-n // block_size)):
            read[table[p]] = max(read.get(table[p], 0), min(block_size, n - p * block_size))
    return sum(read.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(4))
def test_from_block_tables_matches_paged_decode(backend, seed):
    _backend_or_skip(backend)
    rng = random.Random(seed)
    bs = [1, 4, 16, 5][seed]
    hq, hkv, d, dtype = [(4, 1, 32, torch.float32), (8, 2, 64, torch.bfloat16),
                         (8, 8, 16, torch.float16), (6, 2, 24, torch.float32)][seed]
    tables, lens, num_blocks = vllm_like_tables(rng, bs)
    bt = torch.tensor(tables, dtype=torch.int32, device=DEVICE)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    k, v = _pool(max(num_blocks, 1), bs, hkv, d, dtype, seed)
    q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(seed))
    q = q.to(dtype).to(DEVICE)
    layout = ak.TreeLayout.from_block_tables(bt, sl, bs, DEVICE)
    from_lists = ak.TreeLayout.from_block_tables(tables, lens, bs, DEVICE)
    assert from_lists.paths == layout.paths and from_lists.node_lengths == layout.node_lengths
    per_token = 2 * hkv * d * torch.empty((), dtype=dtype).element_size()
    assert ak.kv_bytes(layout, hkv, d, dtype)["shared"] == \
        unique_kv_tokens(tables, lens, bs) * per_token
    assert ak.kv_bytes(layout, hkv, d, dtype)["unshared"] == sum(lens) * per_token
    ref_out, ref_lse = ak.paged_decode_attention(q, k, v, bt, sl, backend="torch",
                                                 return_lse=True)
    out, lse = ak.tree_decode_attention(q, k, v, layout, backend=backend, return_lse=True)
    check_close(out, lse, ref_out.float(), ref_lse, dtype)
    w = _wrapper(backend, hq, hkv, d, bs, dtype, max_seqs=len(lens), max_blocks=bt.numel(),
                 max_nodes=64, max_work=64, max_partials=96)
    w.plan(layout)
    out, lse = w.run(q, k, v, return_lse=True)
    check_close(out, lse, ref_out.float(), ref_lse, dtype)


def test_from_block_tables_finds_the_tree():
    """Shared full blocks become one node per run of blocks with the same readers."""
    bs = 4
    tables = [[7, 8, 9, 1], [7, 8, 9, 2], [7, 8, 3, 0], [5, 6, 0, 0], [7, 8, 9, 1]]
    lens = [14, 13, 10, 8, 14]
    layout = ak.TreeLayout.from_block_tables(tables, lens, bs)
    nodes = [[(layout.node_block_tables[j][:-(-layout.node_lengths[j] // bs)],
               layout.node_lengths[j]) for j in path] for path in layout.paths]
    assert nodes == [
        [([7, 8], 8), ([9], 4), ([1], 2)],      # rows 0 and 4: identical, partial block shared
        [([7, 8], 8), ([9], 4), ([2], 1)],
        [([7, 8], 8), ([3], 2)],
        [([5, 6], 8)],
        [([7, 8], 8), ([9], 4), ([1], 2)],
    ]
    assert len(layout.node_lengths) == 6
    assert ak.kv_bytes(layout, 1, 1, torch.float32)["shared"] == (8 + 4 + 2 + 1 + 2 + 8) * 8


def test_from_block_tables_partial_block_read_to_different_lengths():
    """Block 3 is row 0's partial last block (2 tokens) and a full block of row 1: each reads
    it to its own length (not shared), and the result still equals paged decode."""
    bs, hq, hkv, d = 4, 2, 1, 8
    tables, lens = [[1, 3], [1, 3, 4]], [6, 9]
    layout = ak.TreeLayout.from_block_tables(tables, lens, bs)
    assert [[layout.node_lengths[j] for j in path] for path in layout.paths] == [[4, 2], [4, 5]]
    assert ak.kv_bytes(layout, hkv, d, torch.float32)["shared"] == (4 + 2 + 4 + 1) * 2 * hkv * d * 4
    k, v = _pool(5, bs, hkv, d, torch.float32, seed=0)
    q = torch.randn(2, hq, d, device=DEVICE)
    bt = torch.tensor([[1, 3, 0], [1, 3, 4]], dtype=torch.int32, device=DEVICE)
    ref = ak.paged_decode_attention(q, k, v, bt, torch.tensor(lens, dtype=torch.int32,
                                                              device=DEVICE), backend="torch")
    out = ak.tree_decode_attention(q, k, v, layout.to(DEVICE), backend="torch")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


def test_from_block_tables_validation():
    with pytest.raises(ValueError, match="seq_lens"):
        ak.TreeLayout.from_block_tables([[0, 1]], [9], 4)
    with pytest.raises(ValueError, match="seq_lens"):
        ak.TreeLayout.from_block_tables([[0, 1]], [-1], 4)
    with pytest.raises(ValueError, match="seq_lens"):
        ak.TreeLayout.from_block_tables([[0, 1], [2]], [3], 4)
    with pytest.raises(ValueError, match="negative block id"):
        ak.TreeLayout.from_block_tables([[0, -1]], [5], 4)
    with pytest.raises(ValueError, match="block_tables"):
        ak.TreeLayout.from_block_tables(torch.zeros(2, 2, 2, dtype=torch.int32), [1, 1], 4)
    with pytest.raises(ValueError, match="block_size"):
        ak.TreeLayout.from_block_tables([[0]], [1], 0)
    empty = ak.TreeLayout.from_block_tables([[3], [4]], [0, 0], 4)
    assert empty.paths == [[], []] and empty.num_work == 0
    # junk past a row's length is ignored, even negative ids
    assert ak.TreeLayout.from_block_tables([[2, -5]], [3], 4).paths == [[0]]
