"""Tree decode attention: the fp32 reference against a naive per-path loop, and every backend's
tree kernel against the reference (odd shapes, edge cases, strides, pools past int32 offsets).

Without a GPU, Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before
anything imports triton). With a GPU the compiled kernels run unless TRITON_INTERPRET says
otherwise.
"""

import os
import subprocess
import sys
import textwrap

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402

import a2r_kernels as ak  # noqa: E402
from a2r_kernels import reference  # noqa: E402

from _attention_helpers import (ATOL, DEVICE, KERNEL_BACKENDS, LSE_ATOL,  # noqa: E402
                                _backend_or_skip, check_close, make_inputs, random_tree)


def naive_tree_attention(q, k_cache, v_cache, paths, tables, lengths, sm_scale):
    """Independent check of the reference: one sequence at a time, torch.softmax over the path."""
    bs = k_cache.shape[1]
    num_q_heads = q.shape[1]
    group = num_q_heads // k_cache.shape[2]
    outs, lses = [], []
    for i, path in enumerate(paths):
        ks, vs = [], []
        for j in path:
            for t in range(lengths[j]):
                b = tables[j][t // bs]
                ks.append(k_cache[b, t % bs].float())
                vs.append(v_cache[b, t % bs].float())
        if not ks:
            outs.append(torch.zeros(q.shape[1:]))
            lses.append(torch.full((num_q_heads,), float("-inf")))
            continue
        k = torch.stack(ks).repeat_interleave(group, dim=1)        # [T, Hq, D]
        v = torch.stack(vs).repeat_interleave(group, dim=1)
        s = torch.einsum("hd,thd->ht", q[i].float(), k) * sm_scale
        outs.append(torch.einsum("ht,thd->hd", torch.softmax(s, -1), v))
        lses.append(torch.logsumexp(s, -1))
    return torch.stack(outs), torch.stack(lses)


# ------------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("seed", range(4))
def test_reference_matches_naive_loop(seed):
    rng = random.Random(seed)
    paths, tables, lengths, nb = random_tree(rng, num_leaves=5, depth=3, block_size=16)
    q, k, v = make_inputs(paths, nb, 16, 4, 2, 32, torch.float32, seed)
    layout = ak.TreeLayout.from_paths(paths, tables, lengths, 16, DEVICE)
    out, lse = reference.tree_decode_attention(q, k, v, layout, 32 ** -0.5)
    want_out, want_lse = naive_tree_attention(q.cpu(), k.cpu(), v.cpu(), paths, tables, lengths,
                                              32 ** -0.5)
    torch.testing.assert_close(out.cpu(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu(), want_lse, atol=1e-5, rtol=1e-5)


REFERENCE_SHAPES = {
    # name: (paths, node_block_tables, node_lengths, num_blocks)
    "explore": ([[0, 1], [0, 2], [0, 3]], [[4, 0, 2], [1], [3], [5]], [37, 5, 16, 0], 6),
    "non_tree": ([[0, 2], [1, 2], [0, 3], [1, 3]], [[0], [1], [2, 3], [4]], [5, 9, 20, 3], 5),
    "no_private_tokens": ([[0], [0], [0, 1]], [[0, 1], []], [20, 0], 2),
    "empty_and_missing": ([[0, 1], [0, 2], []], [[], [], [3]], [0, 0, 1], 4),
    "one_sequence": ([[0, 1]], [[1], [0]], [3, 16], 2),
}


@pytest.mark.parametrize("name", list(REFERENCE_SHAPES))
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)], ids=lambda h: f"{h[0]}/{h[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_reads_shared_nodes_once_and_matches_by_path(name, heads, dtype):
    """The torch backend gathers a node read by several sequences once (its plan holds it once,
    with all its readers) and agrees with the literal per-path definition."""
    paths, tables, lengths, num_blocks = REFERENCE_SHAPES[name]
    q, k, v = make_inputs(paths, num_blocks, 16, *heads, 32, dtype, seed=len(name))
    layout = ak.TreeLayout.from_paths(paths, tables, lengths, 16, DEVICE)
    private, shared = layout.shared_node_slots()
    readers = {}
    for i, path in enumerate(paths):
        for j in path:
            readers.setdefault(j, []).append(i)
    assert sorted(sorted(seqs.tolist()) for seqs, _ in shared) == sorted(
        seqs for j, seqs in readers.items() if len(seqs) > 1 and lengths[j] > 0)
    assert sum(slots.numel() for _, slots in shared) == sum(
        lengths[j] for j, seqs in readers.items() if len(seqs) > 1)
    assert [int((row >= 0).sum()) for row in private] == [
        sum(lengths[j] for j in path if len(readers[j]) == 1) for path in paths]
    out, lse = reference.tree_decode_attention(q, k, v, layout, 32 ** -0.5)
    want_out, want_lse = reference.tree_decode_attention_by_path(q, k, v, layout, 32 ** -0.5)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


def head_major_pool(k, v):
    """``k, v`` ``[B, N, H, D]`` rewritten in vLLM's CPU cache layout, one ``[B, H, N, 2D]``
    tensor whose (block, head) tile holds the keys transposed ``[D, N]`` then the values
    ``[N, D]``; returns the strided ``[B, N, H, D]`` views of its keys and values (no copy)."""
    num_blocks, block_size, num_kv_heads, head_dim = k.shape
    cache = torch.empty(num_blocks, num_kv_heads, 2 * block_size * head_dim, dtype=k.dtype,
                        device=k.device)
    tiles = cache.view(num_blocks, num_kv_heads, 2 * block_size, head_dim)
    keys = tiles[:, :, :block_size].view(num_blocks, num_kv_heads, head_dim, block_size)
    keys.copy_(k.permute(0, 2, 3, 1))
    tiles[:, :, block_size:].copy_(v.permute(0, 2, 1, 3))
    return keys.permute(0, 3, 1, 2), tiles[:, :, block_size:].permute(0, 2, 1, 3)


class _LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op returns while active."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_head_major_transposed_key_pool_is_read_in_place(backend):
    """vLLM's CPU KV cache (head-major blocks, key tiles stored transposed: key strides
    ``(H*2*N*D, 1, 2*N*D, N)``) is a valid pool view: tree and paged decode give the contiguous
    pool's result, and the torch backend never materialises a pool-sized tensor (reshaping the
    view to flat slots copied the whole pool per call)."""
    _backend_or_skip(backend)
    paths, tables, lengths, num_blocks = REFERENCE_SHAPES["explore"]
    num_blocks = 40   # a pool much larger than what the step reads
    q, k, v = make_inputs(paths, num_blocks, 16, 8, 2, 64, torch.float32, seed=3)
    k_view, v_view = head_major_pool(k, v)
    assert torch.equal(k_view, k) and torch.equal(v_view, v)
    assert k_view.stride() == (2 * 16 * 2 * 64, 1, 2 * 16 * 64, 16)
    layout = ak.TreeLayout.from_paths(paths, tables, lengths, 16, DEVICE)
    block_tables = torch.tensor([[4, 0, 2, 1], [4, 0, 2, 3], [4, 0, 2, 5]], dtype=torch.int32)
    seq_lens = torch.tensor([42, 53, 37], dtype=torch.int32)
    calls = {
        "tree": lambda kc, vc: ak.tree_decode_attention(q, kc, vc, layout, backend=backend),
        "paged": lambda kc, vc: ak.paged_decode_attention(
            q, kc, vc, block_tables.to(DEVICE), seq_lens.to(DEVICE), backend=backend),
    }
    for name, call in calls.items():
        want = call(k, v)
        with _LargestAllocation() as mode:
            got = call(k_view, v_view)
        torch.testing.assert_close(got, want, atol=ATOL[torch.float32], rtol=0, msg=name)
        if backend == "torch":
            assert mode.largest < k.numel() // 2, (name, mode.largest, k.numel())


# ------------------------------------------------------------------------------- tree kernel
TREE_CASES = [
    # (seed, leaves, depth, block_size, Hq, Hkv, D, dtype, kv_chunk)
    (0, 4, 2, 16, 8, 2, 64, torch.float16, None),
    (1, 7, 3, 16, 8, 8, 64, torch.bfloat16, 16),
    (2, 5, 4, 32, 8, 1, 128, torch.float32, None),
    (3, 1, 1, 16, 4, 4, 64, torch.float16, 16),        # one sequence, one node
    (4, 9, 8, 16, 16, 2, 64, torch.bfloat16, 32),      # deep tree, GQA 8
    (5, 6, 2, 32, 4, 2, 128, torch.float16, 64),
    (6, 3, 5, 16, 2, 1, 40, torch.float32, 16),        # head_dim not a power of two
    (7, 12, 3, 16, 32, 8, 64, torch.bfloat16, None),   # GQA 4, many rows per tile
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", TREE_CASES, ids=lambda c: f"seed{c[0]}-{c[7]}".replace("torch.", ""))
def test_tree_kernel_matches_reference(backend, case):
    _backend_or_skip(backend)
    seed, leaves, depth, bs, hq, hkv, d, dtype, chunk = case
    rng = random.Random(seed)
    paths, tables, lengths, nb = random_tree(rng, leaves, depth, bs)
    q, k, v = make_inputs(paths, nb, bs, hq, hkv, d, dtype, seed)
    layout = ak.TreeLayout.from_paths(paths, tables, lengths, bs, DEVICE, kv_chunk_size=chunk)
    out, lse = ak.tree_decode_attention(q, k, v, layout, backend=backend, return_lse=True)
    ref_out, ref_lse = reference.tree_decode_attention(q, k, v, layout, d ** -0.5)
    check_close(out, lse, ref_out, ref_lse, dtype)


EDGE_CASES = {
    # name: (block_size, Hq, Hkv, D, dtype, paths, node_lengths, plan options)
    "block_size1-d256": (1, 4, 2, 256, torch.float16, [[0, 1], [0, 2]], [5, 3, 0], {}),
    "block_size64-d96": (64, 6, 2, 96, torch.bfloat16, [[0, 1], [0, 2], [0]], [130, 64, 1], {}),
    # one work item of 41 sequences x GQA 8 = 328 query rows (6 row tiles of 64, the last partial)
    "rows328": (16, 8, 1, 16, torch.float16, [[0, 1 + i] for i in range(41)], [37] + [1] * 41,
                {"max_seqs_per_item": 64}),
    # a wide node split both ways: adaptive chunk >= max(256, 16 * 41) = 656 -> 2 chunks of the
    # 1400 shared tokens, each over groups of 16, 16 and 9 sequences (last group partial)
    "groups-adaptive-chunk": (16, 8, 2, 16, torch.bfloat16, [[0, 1 + i] for i in range(41)],
                              [1400] + [i % 3 for i in range(41)], {}),
    # groups of 3 sequences over fixed 64-token chunks, GQA 1
    "groups3-chunk64": (16, 4, 4, 32, torch.float16, [[0, 1 + i % 2, 3 + i] for i in range(10)],
                        [150, 20, 0] + [5] * 10, {"kv_chunk_size": 64, "max_seqs_per_item": 3}),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_tree_kernel_edge_shapes(backend, name):
    _backend_or_skip(backend)
    bs, hq, hkv, d, dtype, paths, lengths, plan = EDGE_CASES[name]
    tables, next_block = [], 0
    for length in lengths:
        blocks = -(-length // bs)
        tables.append(list(range(next_block + blocks - 1, next_block - 1, -1)))  # reversed
        next_block += blocks
    q, k, v = make_inputs(paths, next_block + 1, bs, hq, hkv, d, dtype, 31)
    layout = ak.TreeLayout.from_paths(paths, tables, lengths, bs, DEVICE, **plan)
    out, lse = ak.tree_decode_attention(q, k, v, layout, backend=backend, return_lse=True)
    ref_out, ref_lse = reference.tree_decode_attention(q, k, v, layout, d ** -0.5)
    check_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_tree_kernel_noncontiguous_inputs_and_scale(backend, dtype):
    _backend_or_skip(backend)
    rng = random.Random(11)
    paths, tables, lengths, nb = random_tree(rng, 5, 3, 16)
    q, k, v = make_inputs(paths, nb, 16, 4, 2, 64, dtype, 11, noncontiguous=True)
    layout = ak.TreeLayout.from_paths(paths, tables, lengths, 16, DEVICE, kv_chunk_size=16)
    out, lse = ak.tree_decode_attention(q, k, v, layout, sm_scale=0.3, backend=backend,
                                        return_lse=True)
    ref_out, ref_lse = reference.tree_decode_attention(q, k, v, layout, 0.3)
    check_close(out, lse, ref_out, ref_lse, dtype)


# Run in a subprocess: before the fix, the wrapped int32 offset made the kernel read far outside
# the pool (a segfault under the interpreter, an illegal address on a GPU), which must fail this
# test, not kill the test session.
_HEAD_MAJOR_POOL = textwrap.dedent("""
    import sys
    import torch
    import a2r_kernels as ak
    from a2r_kernels import reference

    device, backend = sys.argv[1], sys.argv[2]
    num_kv_heads, block_size, head_dim, num_blocks = 3, 16, 16, 4
    # Head-major pool [Hkv, ..., block_size, D] seen as [num_blocks, block_size, Hkv, D]: the kv
    # head stride fits in int32, kv_head 2 times it does not (2**31 + 1024 elements).
    stride_kh = 2 ** 30 + 512
    try:  # 4.3 GB of address space; only the pages of the used blocks are ever touched
        storage = torch.empty((num_kv_heads - 1) * stride_kh + num_blocks * block_size * head_dim,
                              dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError) as exc:
        print("SKIP", exc)
        sys.exit(0)
    pool = storage.as_strided((num_blocks, block_size, num_kv_heads, head_dim),
                              (block_size * head_dim, head_dim, stride_kh, 1))
    gen = torch.Generator().manual_seed(0)
    for block in range(num_blocks):
        pool[block] = torch.randn(block_size, num_kv_heads, head_dim, generator=gen).half()
    paths, tables, lengths = [[0, 1], [0, 2]], [[0], [3], [1, 2]], [16, 7, 20]
    layout = ak.TreeLayout.from_paths(paths, tables, lengths, block_size, device)
    q = torch.randn(2, 2 * num_kv_heads, head_dim, generator=gen).half().to(device)
    out, lse = ak.tree_decode_attention(q, pool, pool, layout, backend=backend, return_lse=True)
    compact = pool.contiguous()     # the same values in an ordinary layout
    ref_out, ref_lse = reference.tree_decode_attention(q, compact, compact, layout,
                                                       head_dim ** -0.5)
    print("ERR", float((out.float() - ref_out).abs().max()), float((lse - ref_lse).abs().max()))
""")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_pool_offsets_beyond_int32(backend):
    """kv_head * stride_kh >= 2**31 with an int32 stride (head-major pool): 64-bit offsets."""
    _backend_or_skip(backend)
    env = dict(os.environ)
    if DEVICE == "cpu":
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", _HEAD_MAJOR_POOL, DEVICE, backend],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, f"crashed ({result.returncode}):\n{result.stderr[-3000:]}"
    if result.stdout.startswith("SKIP"):
        pytest.skip(f"cannot reserve 4.3 GB of address space: {result.stdout}")
    out_err, lse_err = map(float, result.stdout.split("ERR")[1].split())
    assert out_err <= ATOL[torch.float16] and lse_err <= LSE_ATOL, result.stdout


@pytest.fixture
def strict_cuda_ops(monkeypatch):
    """The public ops' ``"cuda"`` branch on any machine: ``_cuda_ops``' attention entry points
    replaced by stand-ins that enforce their layout contract (unit stride in head_dim, which the
    ``_C`` kernels assume; ValueError otherwise, as the real wrappers) and compute with the Triton
    kernels."""
    from a2r_kernels import _cuda_ops
    from a2r_kernels import attention as attention_op
    from a2r_kernels.triton import attention as triton_attention

    def require_unit_last(**tensors):
        for name, t in tensors.items():
            if t.stride(-1) != 1 and t.shape[-1] > 1:
                raise ValueError(f"{name} must have unit stride in its last dimension")

    def partials(q, k_cache, v_cache, work_info, row_seq, page_table, partial_o, partial_lse,
                 sm_scale):
        require_unit_last(q=q, k_cache=k_cache, v_cache=v_cache, partial_o=partial_o)
        triton_attention.tree_attention_partials(q, k_cache, v_cache, work_info, row_seq,
                                                 page_table, partial_o, partial_lse, sm_scale, 64)

    def merge_partials(partial_o, partial_lse, merge_indptr, merge_rows, out, lse):
        require_unit_last(partial_o=partial_o, out=out)
        triton_attention.merge_partials(partial_o, partial_lse, merge_indptr, merge_rows, out, lse)

    def merge_states(out_a, lse_a, out_b, lse_b, out, lse):
        require_unit_last(out_a=out_a, out_b=out_b, out=out)
        triton_attention.merge_two_states(out_a, lse_a, out_b, lse_b, out, lse)

    monkeypatch.setattr(_cuda_ops, "tree_attention_partials", partials)
    monkeypatch.setattr(_cuda_ops, "merge_partials", merge_partials)
    monkeypatch.setattr(_cuda_ops, "merge_states", merge_states)
    monkeypatch.setattr(attention_op, "resolve_backend", lambda op, backend, device: "cuda")


def test_cuda_branch_takes_any_q_out_and_state_strides(strict_cuda_ops):
    """q, out= and merge inputs with a non-unit head_dim stride are valid public inputs: the
    ``"cuda"`` branch must hand the kernels unit-stride copies (it raised ValueError before)."""
    paths, tables, lengths = [[0, 1], [0, 2], [3]], [[0, 1], [2], [4], []], [20, 9, 0, 0]
    layout = ak.TreeLayout.from_paths(paths, tables, lengths, 16, DEVICE, kv_chunk_size=16)
    q, k, v = make_inputs(paths, 5, 16, 4, 2, 64, torch.float16, 21)
    q_t = q.permute(2, 1, 0).contiguous().permute(2, 1, 0)        # stride(-1) == num_seqs
    assert q_t.stride(-1) != 1 and torch.equal(q_t, q)
    want, want_lse = ak.tree_decode_attention(q, k, v, layout, backend="torch", return_lse=True)
    out_buffer = torch.full((3, 4, 64, 2), 7.0, dtype=torch.float16, device=DEVICE)
    out_view = out_buffer[..., 0]                                 # stride(-1) == 2
    out, lse = ak.tree_decode_attention(q_t, k, v, layout, backend="cuda", return_lse=True,
                                        out=out_view)
    assert out.data_ptr() == out_view.data_ptr()
    check_close(out, lse, want, want_lse, torch.float16)
    assert torch.all(out_buffer[..., 1] == 7.0)                   # nothing else written

    block_tables = torch.tensor([[0, 1], [2, 0], [4, 0]], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([20, 9, 0], dtype=torch.int32, device=DEVICE)
    paged = ak.paged_decode_attention(q_t, k, v, block_tables, seq_lens, backend="cuda")
    paged_want = ak.paged_decode_attention(q, k, v, block_tables, seq_lens, backend="torch")
    torch.testing.assert_close(paged.float(), paged_want.float(), atol=ATOL[torch.float16], rtol=0)

    lse_b = torch.randn(3, 4, device=DEVICE)
    merged, merged_lse = ak.merge_attention_states(out, lse, q_t, lse_b, backend="cuda")
    ref, ref_lse = reference.merge_attention_states(want, want_lse, q, lse_b)
    check_close(merged, merged_lse, ref, ref_lse, torch.float16)


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
def test_empty_paths_give_zero_and_neg_inf(backend):
    _backend_or_skip(backend)
    # seq 0: only empty nodes; seq 1: empty + 1 token; seq 2: no nodes at all.
    paths = [[0, 1], [0, 2], []]
    tables = [[], [], [3]]
    lengths = [0, 0, 1]
    q, k, v = make_inputs(paths, 4, 16, 4, 2, 64, torch.float16, 0)
    layout = ak.TreeLayout.from_paths(paths, tables, lengths, 16, DEVICE)
    out, lse = ak.tree_decode_attention(q, k, v, layout, backend=backend, return_lse=True)
    assert torch.all(out[0] == 0) and torch.all(out[2] == 0)
    assert torch.all(lse[0] == float("-inf")) and torch.all(lse[2] == float("-inf"))
    # one token: softmax is 1, output is that token's V (GQA: heads 0,1 read kv head 0)
    torch.testing.assert_close(out[1].float(), v[3, 0].float().repeat_interleave(2, 0), atol=1e-3,
                               rtol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_tree_paths_still_exact(backend):
    """A node shared by sequences that are not contiguous in the kernel order gets several runs."""
    _backend_or_skip(backend)
    paths = [[0, 2], [1, 2], [0, 3], [1, 3]]
    tables = [[0], [1], [2, 3], [4]]
    lengths = [5, 9, 20, 3]
    q, k, v = make_inputs(paths, 5, 16, 4, 2, 64, torch.float32, 3)
    layout = ak.TreeLayout.from_paths(paths, tables, lengths, 16, DEVICE)
    out, lse = ak.tree_decode_attention(q, k, v, layout, backend=backend, return_lse=True)
    ref_out, ref_lse = reference.tree_decode_attention(q, k, v, layout, 64 ** -0.5)
    check_close(out, lse, ref_out, ref_lse, torch.float32)


def test_tree_attention_bad_inputs():
    layout = ak.TreeLayout.from_paths([[0]], [[2]], [3], 16, DEVICE)
    q, k, v = make_inputs([[0]], 3, 16, 4, 2, 64, torch.float16, 0)
    with pytest.raises(ValueError, match="q must be"):
        ak.tree_decode_attention(q[0], k, v, layout)
    with pytest.raises(ValueError, match="v_cache shape"):
        ak.tree_decode_attention(q, k, v[:, :8], layout)
    with pytest.raises(ValueError, match="k_cache dtype"):
        ak.tree_decode_attention(q, k.float(), v, layout)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ak.tree_decode_attention(q[:, :3], k, v, layout)
    with pytest.raises(ValueError, match="head_dim"):
        ak.tree_decode_attention(q[..., :32], k, v, layout)
    with pytest.raises(ValueError, match="sequences"):
        ak.tree_decode_attention(torch.cat([q, q]), k, v, layout)
    with pytest.raises(ValueError, match="only 2 blocks"):
        ak.tree_decode_attention(q, k[:2], v[:2], layout)
    with pytest.raises(ValueError, match="block_size"):
        ak.tree_decode_attention(q, k.reshape(6, 8, 2, 64), v.reshape(6, 8, 2, 64), layout)
    with pytest.raises(ValueError, match="backend"):
        ak.tree_decode_attention(q, k, v, layout, backend="nope")
    if not torch.cuda.is_available():
        with pytest.raises(ak.BackendUnavailable):
            ak.tree_decode_attention(q, k, v, layout, backend="cuda")
