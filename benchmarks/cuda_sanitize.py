"""Run every CUDA kernel of a2r_kernels._C once on a representative input, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/cuda_sanitize.py
    compute-sanitizer --tool racecheck python benchmarks/cuda_sanitize.py
    compute-sanitizer --tool synccheck python benchmarks/cuda_sanitize.py
    compute-sanitizer --tool initcheck python benchmarks/cuda_sanitize.py

Inputs are chosen to reach every code path once: a tree with shared, empty and chunked nodes,
more query rows than one row tile (GQA 8), every compiled head_dim class, fp16/bf16/fp32, a
strided (non-vectorisable) KV pool, paged decode with empty splits, both-empty LSE merges, and
denoise with top-k and threshold selection, Gumbel sampling and all remasking rules, including a
row long enough for the selection kernel's global-memory path. Each kernel's output is checked
against the torch reference too, so a wrong result is reported as well as a memory error.
Exits 0 on success; prints one line per kernel.

``--small`` runs one small case per CUDA kernel instead (tree partials + merge of partials, bf16
head_dim 128 contiguous and fp16 head_dim 96 strided; the same kernels through
TreeAttentionWrapper's fixed-capacity grid; paged decode; merge_states; denoise predict
+ combine + select with V split across CTAs, and the selection from global memory): the
``gpu_session.sh verify`` plan, where every second under the sanitizer counts.
``--quick`` (also chosen automatically without a GPU) only checks that the extension imports.
"""

from __future__ import annotations

import argparse
import sys

import torch

import a2r_kernels as ak
from a2r_kernels.backend import cuda_extension
from a2r_kernels.vocab import REMASKING


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    if not torch.allclose(got.float(), want.float(), atol=tol, rtol=tol, equal_nan=False):
        err = (got.float() - want.float()).abs().nan_to_num(float("inf")).max().item()
        raise SystemExit(f"{name}: mismatch vs reference (max abs err {err:.3g})")


def run_tree(dtype: torch.dtype, head_dim: int, strided: bool) -> None:
    gen = torch.Generator().manual_seed(head_dim)
    block_size, num_kv_heads, group = 16, 2, 8
    # node 0: shared prefix (chunked), 1/2: branches, 3: empty node, 4: a leaf under 1
    paths = [[0, 1, 4], [0, 1], [0, 2], [0, 2, 3]]
    lengths = [70, 17, 1, 0, 33]
    tables, next_block = [], 0
    for n in lengths:
        count = -(-n // block_size)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    layout = ak.TreeLayout.from_paths(paths, tables, lengths, block_size, "cuda",
                                      kv_chunk_size=32)
    pad = 3 if strided else 0
    shape = (next_block, block_size, num_kv_heads, head_dim + pad)
    k = torch.randn(shape, generator=gen).to(dtype).cuda()[..., :head_dim]
    v = torch.randn(shape, generator=gen).to(dtype).cuda()[..., :head_dim]
    q = torch.randn(len(paths), num_kv_heads * group, head_dim, generator=gen).to(dtype).cuda()
    out, lse = ak.tree_decode_attention(q, k, v, layout, backend="cuda", return_lse=True)
    ref, ref_lse = ak.tree_decode_attention(q, k, v, layout, backend="torch", return_lse=True)
    tol = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    _close(f"tree_decode {dtype} d={head_dim}", out, ref, tol)
    _close(f"tree_decode lse {dtype} d={head_dim}", lse, ref_lse, 1e-4)


def run_wrapper() -> None:
    """TreeAttentionWrapper on the CUDA backend: its grid is sized by the capacities (work items
    past the plan exit at once), q has padding rows past the plan's sequences, and the second,
    smaller plan must not read the first plan's stale work items."""
    gen = torch.Generator().manual_seed(7)
    block_size, num_kv_heads, group, head_dim, dtype = 16, 2, 4, 64, torch.bfloat16
    k = torch.randn(12, block_size, num_kv_heads, head_dim, generator=gen).to(dtype).cuda()
    v = torch.randn(12, block_size, num_kv_heads, head_dim, generator=gen).to(dtype).cuda()
    wrapper = ak.TreeAttentionWrapper(num_kv_heads * group, num_kv_heads, head_dim, block_size,
                                      max_seqs=6, max_nodes=6, max_blocks=12, dtype=dtype,
                                      device="cuda", backend="cuda")
    q = torch.randn(6, num_kv_heads * group, head_dim, generator=gen).to(dtype).cuda()
    steps = [([[0, 1], [0, 2], [0, 3]], [[0, 1, 2], [3], [4, 5], [6]], [40, 9, 17, 0]),
             ([[0]], [[7, 8]], [21])]
    for paths, tables, lengths in steps:
        layout = ak.TreeLayout.from_paths(paths, tables, lengths, block_size, "cuda")
        wrapper.plan(layout)
        out, lse = wrapper.run(q, k, v, return_lse=True)
        rows = len(paths)
        ref, ref_lse = ak.tree_decode_attention(q[:rows], k, v, layout, backend="torch",
                                                return_lse=True)
        _close(f"wrapper {len(paths)} seqs", out[:rows], ref, 2e-2)
        _close(f"wrapper lse {len(paths)} seqs", lse[:rows], ref_lse, 1e-4)
        if out[rows:].abs().max().item() != 0 or not bool((lse[rows:] == float("-inf")).all()):
            raise SystemExit("wrapper: padding rows past the plan are not 0 / -inf")


def run_paged() -> None:
    gen = torch.Generator().manual_seed(0)
    seq_lens = torch.tensor([0, 5, 300], dtype=torch.int32)
    block_tables = torch.randperm(60, generator=gen)[:57].view(3, 19).to(torch.int32).cuda()
    k = torch.randn(60, 16, 2, 128, generator=gen).half().cuda()
    v = torch.randn(60, 16, 2, 128, generator=gen).half().cuda()
    q = torch.randn(3, 4, 128, generator=gen).half().cuda()
    out = ak.paged_decode_attention(q, k, v, block_tables, seq_lens.cuda(), backend="cuda")
    ref = ak.paged_decode_attention(q, k, v, block_tables, seq_lens.cuda(), backend="torch")
    _close("paged_decode", out, ref, 3e-3)


def run_merge() -> None:
    gen = torch.Generator().manual_seed(1)
    out_a = torch.randn(5, 3, 100, generator=gen).bfloat16().cuda()
    out_b = torch.randn(5, 3, 100, generator=gen).bfloat16().cuda()
    lse_a = torch.randn(5, 3, generator=gen).cuda()
    lse_b = torch.randn(5, 3, generator=gen).cuda()
    lse_a[0] = lse_b[0] = float("-inf")
    out, lse = ak.merge_attention_states(out_a, lse_a, out_b, lse_b, backend="cuda")
    ref, ref_lse = ak.merge_attention_states(out_a, lse_a, out_b, lse_b, backend="torch")
    _close("merge_states", out, ref, 2e-2)
    _close("merge_states lse", lse, ref_lse, 1e-5)


def run_denoise(length: int, vocab: int, dtype: torch.dtype, **kwargs) -> None:
    gen = torch.Generator().manual_seed(length)
    logits = (torch.randn(2, length, vocab, generator=gen) * 3).to(dtype).cuda()
    tokens = torch.randint(0, vocab - 1, (2, length), generator=gen).cuda()
    tokens[:, ::2] = vocab - 1
    results = []
    for backend in ("cuda", "torch"):
        updated = tokens.clone()
        res = ak.denoise_step(logits, updated, vocab - 1, backend=backend,
                              generator=torch.Generator().manual_seed(5), **kwargs)
        results.append((res, updated))
    (res, updated), (ref, ref_updated) = results
    name = f"denoise L={length} V={vocab} {dtype} {kwargs}"
    if kwargs.get("temperature", 0) == 0:
        if not (torch.equal(res.x0, ref.x0) and torch.equal(updated, ref_updated)):
            raise SystemExit(f"{name}: x0 / tokens differ from the reference")
    _close(name, res.confidence.nan_to_num(neginf=-1), ref.confidence.nan_to_num(neginf=-1), 1e-4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only check that _C imports")
    parser.add_argument("--small", action="store_true", help="one small case per CUDA kernel")
    args = parser.parse_args()
    ext = cuda_extension()
    if ext is None:
        print("a2r_kernels._C is not built", file=sys.stderr)
        return 1
    if args.quick or not torch.cuda.is_available():
        print(f"a2r_kernels._C imports (CUDA runtime {ext.cuda_runtime_version()}); "
              f"no GPU run ({'--quick' if args.quick else 'no CUDA device'})")
        return 0
    if args.small:
        run_tree(torch.bfloat16, 128, strided=False)
        run_tree(torch.float16, 96, strided=True)
        print("tree_attention_partials + merge_partials: ok (bf16 d=128, fp16 d=96 strided)")
    else:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for head_dim in (32, 64, 96, 128, 256):
                run_tree(dtype, head_dim, strided=head_dim == 96)
        print("tree_attention_partials + merge_partials: ok (3 dtypes x 5 head_dim classes)")
    run_wrapper()
    print("TreeAttentionWrapper (capacity grid, padding rows, re-plan): ok")
    run_paged()
    print("paged decode (empty splits): ok")
    run_merge()
    print("merge_states: ok")
    if args.small:
        run_denoise(7, 50257, torch.bfloat16, threshold=0.5)     # predict + combine + select
        run_denoise(9000, 16, torch.float32, num_transfer=100)   # selection from global memory
        print("denoise_step (predict, combine, select): ok")
        torch.cuda.synchronize()
        return 0
    for remasking in REMASKING:
        run_denoise(33, 1000, torch.float32, num_transfer=5, remasking=remasking)
    run_denoise(7, 50257, torch.bfloat16, threshold=0.5)   # V split across CTAs (4 splits)
    run_denoise(3, 126464, torch.bfloat16, num_transfer=2, remasking="entropy", temperature=0.7)
    run_denoise(9, 1001, torch.float16, num_transfer=3, temperature=0.8)
    run_denoise(9000, 16, torch.float32, num_transfer=100)   # selection from global memory
    print("denoise_step (predict + select): ok")
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
