"""Helpers shared by the attention tests (tree, paged, merge, wrapper, CPU kernel): the device and
kernel backends under test, per-dtype tolerances, random trees of nodes over a paged pool, the
inputs of a tree decode step and the closeness check.

Without a GPU, Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here too,
before anything imports triton).
"""

import os

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402

import a2r_kernels as ak  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# "cpu" (a2r_kernels._cpu) runs on CPU tensors; on a GPU machine its cases skip.
KERNEL_BACKENDS = ["triton"] + (["cuda"] if torch.cuda.is_available() else ["cpu"])
BACKENDS = ["torch"] + KERNEL_BACKENDS   # the ops with a torch backend (the wrapper, the layouts)
# Absolute tolerance on outputs (values are O(1)): the output rounding of each dtype, with room for
# the different summation order of split-KV + merge.
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LSE_ATOL = 1e-4  # LSE is always accumulated in fp32


def _backend_or_skip(backend):
    try:
        ak.backend.resolve_backend("tree_decode_attention", backend, torch.device(DEVICE))
    except ak.BackendUnavailable as exc:
        pytest.skip(str(exc))


def random_tree(rng: random.Random, num_leaves: int, depth: int, block_size: int,
                lengths=(0, 1, 17, 50)):
    """A random tree as (paths, node_block_tables, node_lengths, num_blocks).

    Every node gets its own scattered blocks (a shuffled pool), so block tables are not ranges.
    """
    node_lengths: list[int] = []
    parents: list[int] = []

    def new_node(parent):
        node_lengths.append(rng.choice(lengths) if rng.random() < 0.7 else rng.randint(0, 40))
        parents.append(parent)
        return len(node_lengths) - 1

    root = new_node(-1)
    frontier = [root]
    for _ in range(depth - 1):
        nxt = []
        for node in frontier:
            for _ in range(rng.randint(1, 3)):
                nxt.append(new_node(node))
        frontier = nxt
    leaves = [rng.choice(frontier) for _ in range(num_leaves)]
    paths = []
    for leaf in leaves:
        path = []
        node = leaf
        while node != -1:
            path.append(node)
            node = parents[node]
        paths.append(path[::-1])
    needed = [-(-n // block_size) for n in node_lengths]
    num_blocks = sum(needed) + 3
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables, pos = [], 0
    for n in needed:
        tables.append(pool[pos:pos + n])
        pos += n
    return paths, tables, node_lengths, num_blocks


def make_inputs(paths, num_blocks, block_size, num_q_heads, num_kv_heads, head_dim, dtype, seed,
                noncontiguous=False):
    g = torch.Generator().manual_seed(seed)
    if noncontiguous:
        # q with a padded head stride; pool as a slice of a [2, ...] layer stack with extra heads.
        q = torch.randn(len(paths), num_q_heads + 3, head_dim, generator=g).to(dtype)
        q = q[:, 1:num_q_heads + 1]
        kv = torch.randn(2, num_blocks, block_size, num_kv_heads + 1, head_dim, generator=g)
        kv = kv.to(dtype)
        k, v = kv[0, :, :, 1:], kv[1, :, :, 1:]
        assert not q.is_contiguous() and not k.is_contiguous()
    else:
        q = torch.randn(len(paths), num_q_heads, head_dim, generator=g).to(dtype)
        k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)  # .to(same device) keeps the strides


def check_close(out, lse, ref_out, ref_lse, dtype):
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.float().cpu(), ref_out.float().cpu(), atol=ATOL[dtype], rtol=0)
    # -inf must match exactly (empty paths); finite values within LSE_ATOL
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(ref_lse.cpu()))
    finite = torch.isfinite(ref_lse.cpu())
    torch.testing.assert_close(lse.cpu()[finite], ref_lse.cpu()[finite], atol=LSE_ATOL, rtol=0)


def _pool(num_blocks, block_size, num_kv_heads, head_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return (torch.randn(shape, generator=g).to(dtype).to(DEVICE),
            torch.randn(shape, generator=g).to(dtype).to(DEVICE))


def _wrapper(backend, hq, hkv, d, bs, dtype, **capacity):
    kw = dict(max_seqs=8, max_nodes=48, max_blocks=512, max_work=48, max_partials=96)
    kw.update(capacity)
    return ak.TreeAttentionWrapper(hq, hkv, d, bs, dtype=dtype, device=DEVICE, backend=backend,
                                   **kw)
