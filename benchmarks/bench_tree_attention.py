"""Tree decode attention: one decode step of N branches that share a P-token prefix.

Shape: one prefix node of P tokens, N leaf nodes of S tokens each (the explorer's tree after S
sampled tokens). Providers, all measured in the same run on the same pool:

- ``a2r-tree``      ours, Triton: every node's KV read once (cascade / Hydragen style).
- ``a2r-tree-wrapper`` the same through ``ak.TreeAttentionWrapper``: planned once, timed on
                    ``run(out=...)`` (fixed buffers, a grid of the plan's capacity).
- ``a2r-tree-graph`` (GPU) that ``run`` captured in a CUDA graph, timed on ``graph.replay()``.
- ``a2r-cuda``      ours, the CUDA extension (when built).
- ``a2r-paged``     ours, Triton paged decode over per-branch block tables (prefix blocks shared
                    in memory but read once per branch, as vLLM-style paged decode does).
- ``torch-sdpa``    ``F.scaled_dot_product_attention`` over K/V expanded per branch (copies made
                    outside the timed region; skipped when they would not fit).
- ``flashinfer-cascade`` / ``flashinfer-decode`` / ``flash-attn``: when installed.

``gbps`` is *unique* KV bytes (``ak.kv_bytes(...)["shared"]``) over the median time, compared with
``copy_gbps`` (device-to-device copy bandwidth measured in the same run). Results:
``benchmarks/results/tree_attention.json`` (+ ``tree_attention.png``); on CPU the script runs a
few tiny shapes with the torch reference and Triton's interpreter and writes
``tree_attention_cpu.json`` instead, so CPU numbers never mix with GPU ones.

``plan`` rows (host only, after the kernel rows; ``--no-plan-rows`` skips them) time one decode
step's planning at N in {64, 256} and P in {512, 32k}: ``cache.layout`` + ``wrapper.plan``, next
to ``from_paths`` copying the same tables; and ``from_block_tables`` at 256 rows x 512 blocks.

``--cpu`` measures the CPU kernels instead, at the issue-24 shape by default (P = 4096, N = 16,
S = 32, 16/8 heads x 128, fp32), on one thread, the providers interleaved call by call:
``a2r-cpu`` (``backend="cpu"``: a2r_kernels._cpu, the AVX2 build where the CPU has it),
``a2r-cpu-baseline`` (the same, its baseline build), ``torch-spec`` (``backend="torch"``, the
reference) and ``explorer-sdpa`` (the explorer decoder's torch path: one SDPA over the step's
gathered tree with a mask). It writes ``benchmarks/results/<--out>_cpu.json`` only when ``--out``
is given.

Usage: ``python benchmarks/bench_tree_attention.py [--quick] [--providers a2r-tree,a2r-paged]
[--P 8192 --N 64 --S 128 --heads 32/8] [--plan-sweep] [--tile-sweep]``. ``--plan-sweep`` adds
``a2r-tree`` rows under fixed split-KV plans, ``a2r-tree[c=<kv_chunk_size>,s=<max_seqs_per_item>]``,
beside the default (adaptive) plan, to tune ``a2r_kernels.layout``'s constants on the device;
``--tile-sweep`` adds rows with other (BLOCK_N, num_warps) for the 64-row tiles,
``a2r-tree(n=<BLOCK_N>,w=<num_warps>)``, to tune ``_tile_config``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import copy_gbps, device_name, plot, results_dir, time_fn, write_results  # noqa: E402

RESULTS = results_dir()

GPU_SHAPES = dict(P=[1024, 8192, 32768], N=[4, 16, 64, 256], S=[0, 128, 512],
                  heads=[(32, 8), (8, 1)], D=[128])
CPU_SHAPES = dict(P=[64, 192], N=[4, 8], S=[0, 17], heads=[(8, 2)], D=[64])
SDPA_BYTES_LIMIT = 16 * 1024 ** 3   # expanded K/V copies above this are skipped
# --plan-sweep: (kv_chunk_size, max_seqs_per_item); (256, 1 << 20) is the plan before the
# adaptive chunk (one work item per run, 256-token chunks).
# --tile-sweep: (BLOCK_N, num_warps) of the 64-row fp16/bf16 tiles (the shared-node work items)
TILE_SWEEP = [(32, 8), (64, 8), (64, 4), (128, 8)]
PLAN_SWEEP = [(256, 1 << 20), (256, 16), (512, 16), (1024, 16), (2048, 16), (4096, 16),
              (1024, 8), (1024, 32), (2048, 8), (2048, 32)]


def build_tree(P: int, N: int, S: int, block_size: int, Hkv: int, D: int, dtype, device):
    """Pool + layout + per-branch block tables for a prefix of P tokens and N leaves of S tokens."""
    import a2r_kernels as ak

    prefix_blocks = -(-P // block_size)
    leaf_blocks = -(-S // block_size)
    num_blocks = prefix_blocks + N * leaf_blocks
    g = torch.Generator(device="cpu").manual_seed(0)
    k = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype).to(device)
    v = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype).to(device)
    prefix = list(range(prefix_blocks))
    leaves = [list(range(prefix_blocks + i * leaf_blocks, prefix_blocks + (i + 1) * leaf_blocks))
              for i in range(N)]
    layout = ak.TreeLayout.from_paths([[0, 1 + i] for i in range(N)], [prefix] + leaves,
                                      [P] + [S] * N, block_size, device)
    return k, v, layout, prefix, leaves


def paged_inputs(k, v, P, S, prefix, leaves, block_size):
    """Block tables / seq_lens for paged decode: each branch's table names the shared prefix blocks
    (read once per branch) then its own. A paged table cannot skip the free tail of a partial
    prefix block, so the benchmark uses block-aligned prefixes."""
    N = len(leaves)
    if P % block_size and S:
        raise ValueError(f"P={P} must be a multiple of block_size={block_size} when S > 0")
    tables = [prefix + leaf for leaf in leaves]
    lens = [P + S] * N
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                      device=k.device)
    return bt, torch.tensor(lens, dtype=torch.int32, device=k.device)


def providers_available(device) -> list[str]:
    import a2r_kernels as ak
    names = ["a2r-tree", "a2r-tree-wrapper", "a2r-paged", "torch-sdpa"]
    if device.type == "cuda":
        names.insert(2, "a2r-tree-graph")
    if device.type == "cuda" and ak.backend.cuda_extension() is not None:
        names.insert(1, "a2r-cuda")
    for mod, name in (("flashinfer", "flashinfer-cascade"), ("flashinfer", "flashinfer-decode"),
                      ("flash_attn", "flash-attn")):
        try:
            __import__(mod)
            if device.type == "cuda":
                names.append(name)
        except ImportError:
            pass
    return names


def make_fn(provider, q, k, v, layout, P, S, prefix, leaves, block_size):
    """A zero-argument callable for one decode step, or None when the provider cannot run it."""
    import a2r_kernels as ak
    kernel_backend = "triton" if q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    N, Hq, D = q.shape
    Hkv = k.shape[2]
    if provider == "a2r-tree":
        return lambda: ak.tree_decode_attention(q, k, v, layout, backend=kernel_backend)
    if provider.startswith("a2r-tree(n="):   # a2r-tree(n=64,w=8): 64-row tile override
        from a2r_kernels.triton import attention as kernels
        opts = dict(kv.split("=") for kv in provider[len("a2r-tree("):-1].split(","))
        tile = (int(opts["n"]), int(opts["w"]))

        if kernel_backend != "triton":
            return None
        # The Triton launchers straight, with the tile as their argument (the public op always
        # takes the table's tile); buffers sized as tree_decode_attention sizes them.
        out = torch.empty_like(q)
        lse = torch.empty(N, Hq, dtype=torch.float32, device=q.device)
        partial_o = torch.empty(max(layout.num_partials, 1), Hq, D, dtype=torch.float32,
                                device=q.device)
        partial_lse = torch.empty(partial_o.shape[:2], dtype=torch.float32, device=q.device)
        max_rows = layout.max_q_len * (Hq // Hkv)

        def with_tile():
            kernels.tree_attention_partials(q, k, v, layout.work_info, layout.row_seq,
                                            layout.page_table, partial_o, partial_lse, D ** -0.5,
                                            max_rows, tile=tile)
            kernels.merge_partials(partial_o, partial_lse, layout.merge_indptr,
                                   layout.merge_rows, out, lse)
            return out
        return with_tile
    if provider.startswith("a2r-tree["):   # a2r-tree[c=1024,s=16]: a fixed plan
        opts = dict(kv.split("=") for kv in provider[len("a2r-tree["):-1].split(","))
        fixed = ak.TreeLayout.from_paths(layout.paths, layout.node_block_tables,
                                         layout.node_lengths, layout.block_size, layout.device,
                                         kv_chunk_size=int(opts["c"]),
                                         max_seqs_per_item=int(opts["s"]))
        return lambda: ak.tree_decode_attention(q, k, v, fixed, backend=kernel_backend)
    if provider in ("a2r-tree-wrapper", "a2r-tree-graph"):   # planned once, timed on run
        w = ak.TreeAttentionWrapper(Hq, Hkv, D, block_size, max_seqs=N,
                                    max_nodes=layout.num_nodes, max_blocks=max(
                                        layout.num_page_entries, 1),
                                    dtype=q.dtype, device=q.device, backend=kernel_backend)
        w.plan(layout)
        out = torch.empty_like(q)
        if provider == "a2r-tree-wrapper":
            return lambda: w.run(q, k, v, out=out)
        if not q.is_cuda:
            return None
        w.run(q, k, v, out=out)                 # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            w.run(q, k, v, out=out)
        return graph.replay
    if provider == "a2r-cuda":
        return lambda: ak.tree_decode_attention(q, k, v, layout, backend="cuda")
    if provider == "a2r-paged":
        bt, lens = paged_inputs(k, v, P, S, prefix, leaves, block_size)
        return lambda: ak.paged_decode_attention(q, k, v, bt, lens, backend=kernel_backend,
                                                 check_bounds=False)
    if provider == "torch-sdpa":
        T = P + S
        if 2 * N * T * Hkv * D * q.element_size() > SDPA_BYTES_LIMIT:
            return None
        slots = layout.seq_slots()                                  # [N, T]
        flat_k = k.reshape(-1, Hkv, D)
        flat_v = v.reshape(-1, Hkv, D)
        K = flat_k[slots].transpose(1, 2).contiguous()              # [N, Hkv, T, D], per branch
        V = flat_v[slots].transpose(1, 2).contiguous()
        q4 = q[:, :, None, :]
        return lambda: F.scaled_dot_product_attention(q4, K, V, enable_gqa=True)
    if provider.startswith("flashinfer") or provider == "flash-attn":
        return make_external_fn(provider, q, k, v, P, S, prefix, leaves, block_size)
    raise ValueError(f"unknown provider {provider!r}")


def make_external_fn(provider, q, k, v, P, S, prefix, leaves, block_size):  # pragma: no cover
    """FlashInfer / flash-attn baselines (GPU only, optional installs)."""
    N, Hq, D = q.shape
    Hkv = k.shape[2]
    dev = q.device
    bt, lens = paged_inputs(k, v, P, S, prefix, leaves, block_size)
    if provider == "flash-attn":
        from flash_attn import flash_attn_with_kvcache
        q4 = q[:, None]                                          # [N, 1, Hq, D]
        return lambda: flash_attn_with_kvcache(q4, k, v, cache_seqlens=lens, block_table=bt)
    import flashinfer
    workspace = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=dev)
    if provider == "flashinfer-decode":
        indptr = torch.arange(N + 1, dtype=torch.int32, device=dev) * bt.shape[1]
        indices = bt.reshape(-1)
        last = ((lens - 1) % block_size + 1).to(torch.int32)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
        wrapper.plan(indptr, indices, last, Hq, Hkv, D, block_size, q_data_type=q.dtype)
        return lambda: wrapper.run(q, (k, v))
    # cascade: level 0 = the shared prefix (one request for all N queries), level 1 = leaves
    wrapper = flashinfer.MultiLevelCascadeAttentionWrapper(2, workspace, "NHD")
    pre = torch.tensor(prefix, dtype=torch.int32, device=dev)
    leaf = torch.tensor([b for l in leaves for b in l], dtype=torch.int32, device=dev)
    nleaf = len(leaves[0]) if leaves else 0
    qo_indptr = [torch.tensor([0, N], dtype=torch.int32, device=dev),
                 torch.arange(N + 1, dtype=torch.int32, device=dev)]
    kv_indptr = [torch.tensor([0, len(prefix)], dtype=torch.int32, device=dev),
                 torch.arange(N + 1, dtype=torch.int32, device=dev) * nleaf]
    last = [torch.tensor([(P - 1) % block_size + 1], dtype=torch.int32, device=dev),
            torch.full((N,), (S - 1) % block_size + 1 if S else 0, dtype=torch.int32, device=dev)]
    wrapper.plan(qo_indptr, kv_indptr, [pre, leaf], last, Hq, Hkv, D, block_size,
                 q_data_type=q.dtype)
    return lambda: wrapper.run(q, (k, v))


PLAN_SHAPES = dict(N=[64, 256], P=[512, 32768], S=16)
FROM_BLOCK_TABLES_SHAPE = (256, 512)     # rows x blocks per row


def plan_rows(dev_name: str, device: torch.device, block_size: int, reps: int) -> list[dict]:
    """Host time of planning one decode step (no kernel runs).

    ``plan`` rows: a TreeKVCache tree (a P-token prompt forked into N branches of S tokens),
    one decode step = ``reserve`` + ``cache.layout`` (plans by reference into the cache's
    device block tables) + ``TreeAttentionWrapper.plan``, against ``from_paths`` over the same
    nodes (the node block lists copied into the plan, as ``cache.layout`` did before) timed in
    the same run. ``from_block_tables`` row: sharing discovered from vLLM-like block tables
    (FROM_BLOCK_TABLES_SHAPE; groups of 8 rows share a 448-block prompt, 64 private blocks each).
    """
    import statistics
    import time

    import a2r_kernels as ak

    rows = []

    def median_us(fn):
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    S = PLAN_SHAPES["S"]
    for N, P in itertools.product(PLAN_SHAPES["N"], PLAN_SHAPES["P"]):
        num_blocks = -(-P // block_size) + N * (-(-(S + 2 * reps + 2) // block_size) + 1)
        cache = ak.TreeKVCache(1, 1, 8, num_blocks, block_size=block_size, dtype=torch.float16,
                               device=device)
        root = cache.new_sequence()
        cache.reserve([root], P)
        kids = cache.fork(root, N)
        cache.reserve(kids, S)
        w = ak.TreeAttentionWrapper(32, 8, 128, block_size, max_seqs=N, max_nodes=N + 1,
                                    max_blocks=cache.block_table_capacity, dtype=torch.bfloat16,
                                    device=device, backend="torch")
        layouts = []

        def step():
            cache.reserve(kids, 1)
            layout = cache.layout(kids)
            w.plan(layout)
            layouts.append(layout)

        step_us = median_us(step)
        layout_us = median_us(lambda: cache.layout(kids))
        plan_us = median_us(lambda: w.plan(layouts[-1]))
        last = layouts[-1]
        tables = last.node_block_tables
        copied_us = median_us(lambda: ak.TreeLayout.from_paths(
            last.paths, tables, last.node_lengths, block_size, device))
        rows.append(dict(device=dev_name, provider="plan", kind="plan", N=N, P=P, S=S,
                         block_size=block_size, step_us=step_us, layout_us=layout_us,
                         wrapper_plan_us=plan_us, median_us=layout_us + plan_us,
                         from_paths_copied_us=copied_us, num_work=last.num_work,
                         num_partials=last.num_partials,
                         vs_copied=copied_us / (layout_us + plan_us)))
        print(f"{'plan':>24} {P:>6} {N:>4} {S:>4}   cache.layout {layout_us:7.1f} us + "
              f"wrapper.plan {plan_us:6.1f} us (reserve+layout+plan {step_us:7.1f} us); "
              f"from_paths copying the tables {copied_us:7.1f} us")
    num_rows, width = FROM_BLOCK_TABLES_SHAPE
    prompt = width - 64
    tables = []
    for i in range(num_rows):
        group = i // 8
        tables.append([group * prompt + b for b in range(prompt)]
                      + [num_rows * prompt + i * 64 + b for b in range(64)])
    bt = torch.tensor(tables, dtype=torch.int32, device=device)
    lens = torch.full((num_rows,), width * block_size - 3, dtype=torch.int32, device=device)
    fbt_us = median_us(lambda: ak.TreeLayout.from_block_tables(bt, lens, block_size, device))
    layout = ak.TreeLayout.from_block_tables(bt, lens, block_size, device)
    rows.append(dict(device=dev_name, provider="from_block_tables", kind="plan", N=num_rows,
                     max_blocks=width, block_size=block_size, median_us=fbt_us,
                     num_nodes=layout.num_nodes, num_work=layout.num_work))
    print(f"{'from_block_tables':>24} {num_rows} rows x {width} blocks: {fbt_us:.0f} us "
          f"({layout.num_nodes} nodes)")
    return rows


CPU_KERNEL_SHAPE = dict(P=4096, N=16, S=32, heads=(16, 8), D=128)


def cpu_kernel_fns(q, k, v, layout) -> dict:
    """The ``--cpu`` providers: name -> zero-argument callable of one decode step."""
    import a2r_kernels as ak
    from a2r_kernels import _cpu_ops

    def on_isa(isa):
        def step():
            _cpu_ops.select_isa(isa)
            return ak.tree_decode_attention(q, k, v, layout, backend="cpu")
        return step

    fns = {"a2r-cpu": on_isa("auto"), "a2r-cpu-baseline": on_isa("baseline"),
           "torch-spec": lambda: ak.tree_decode_attention(q, k, v, layout, backend="torch")}
    # The explorer's torch path: the wrapper's torch backend (a2r_kernels/torch_decode.py),
    # planned once per step as the decoder plans it.
    from a2r_kernels.torch_decode import TorchDecodePlan
    plan = TorchDecodePlan(q.dtype, q.device)
    plan.plan(layout)
    fns["explorer-sdpa"] = lambda: plan.run(q, k, v, q.shape[-1] ** -0.5)
    return fns


def cpu_kernel_rows(args, dtype) -> list[dict]:
    """``--cpu``: the CPU providers on one thread, interleaved, medians and ratios vs the spec."""
    import time

    import a2r_kernels as ak
    from a2r_kernels import _cpu_ops

    torch.set_num_threads(1)
    shape = dict(CPU_KERNEL_SHAPE)
    for key in ("P", "N", "S"):
        if getattr(args, key):
            shape[key] = int(getattr(args, key).split(",")[0])
    if args.heads:
        shape["heads"] = tuple(int(h) for h in args.heads.split(",")[0].split("/"))
    (Hq, Hkv), D = shape["heads"], shape["D"]
    k, v, layout, _, _ = build_tree(shape["P"], shape["N"], shape["S"], args.block_size, Hkv, D,
                                    dtype, torch.device("cpu"))
    q = torch.randn(shape["N"], Hq, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    fns = cpu_kernel_fns(q, k, v, layout)
    want = fns["torch-spec"]().float()
    times = {name: [] for name in fns}
    for name, fn in fns.items():   # warm up, and check each against the spec once
        err = (fn().float() - want).abs().max().item()
        print(f"# {name}: max |out - spec| = {err:.2e}")
    for _ in range(args.reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    _cpu_ops.select_isa("auto")
    dev = f"{device_name('cpu')}, 1 thread, kernel isa {_cpu_ops.isa()}"
    unique = ak.kv_bytes(layout, Hkv, D, dtype)
    spec_s = sorted(times["torch-spec"])[len(times["torch-spec"]) // 2]
    print(f"# device: {dev}   load average: {os.getloadavg()[0]:.2f}   dtype: {dtype}   "
          f"P={shape['P']} N={shape['N']} S={shape['S']} heads={Hq}/{Hkv} D={D}")
    rows = []
    for name, ts in times.items():
        median = sorted(ts)[len(ts) // 2]
        rows.append(dict(device=dev, provider=name, P=shape["P"], N=shape["N"], S=shape["S"],
                         Hq=Hq, Hkv=Hkv, D=D, dtype=str(dtype).replace("torch.", ""),
                         block_size=args.block_size, threads=1, reps=args.reps,
                         median_us=median * 1e6, min_us=min(ts) * 1e6,
                         gbps=unique["shared"] / median / 1e9, unique_kv_bytes=unique["shared"],
                         speedup_vs_spec=spec_s / median))
        print(f"{name:>18} median {median * 1e3:8.2f} ms  min {min(ts) * 1e3:8.2f} ms  "
              f"{rows[-1]['gbps']:6.2f} GB/s  {rows[-1]['speedup_vs_spec']:5.2f}x spec")
    return rows


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few small shapes")
    parser.add_argument("--providers", default="", help="comma-separated subset")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default=None, help="default bfloat16 (--cpu: float32)")
    parser.add_argument("--P", help="comma-separated prefix lengths (default: the issue's sweep)")
    parser.add_argument("--N", help="comma-separated branch counts")
    parser.add_argument("--S", help="comma-separated suffix lengths")
    parser.add_argument("--heads", help="comma-separated Hq/Hkv pairs, e.g. 32/8,8/1")
    parser.add_argument("--plan-sweep", action="store_true",
                        help="add a2r-tree rows under the fixed plans of PLAN_SWEEP")
    parser.add_argument("--tile-sweep", action="store_true",
                        help="add a2r-tree rows with the 64-row tile configs of TILE_SWEEP")
    parser.add_argument("--out", default=None, help="results name (default tree_attention)")
    parser.add_argument("--no-plan-rows", action="store_true",
                        help="skip the host-side plan rows (plan_rows)")
    parser.add_argument("--cpu", action="store_true",
                        help="the CPU kernel rows (one thread, interleaved; see the docstring)")
    parser.add_argument("--reps", type=int, default=15, help="--cpu: timed calls per provider")
    return parser.parse_args(argv)


def _shape_rows(args, shape, providers, device, dtype, dev_name, bw, warmup, rep) -> list[dict]:
    """Every provider's row at one (P, N, S, (Hq, Hkv), D), printed, with its speed-up over
    a2r-paged (and, for the graph replay, over the eager wrapper)."""
    import a2r_kernels as ak

    P, N, S, (Hq, Hkv), D = shape
    k, v, layout, prefix, leaves = build_tree(P, N, S, args.block_size, Hkv, D, dtype, device)
    q = torch.randn(N, Hq, D, device=device, dtype=dtype)
    unique = ak.kv_bytes(layout, Hkv, D, dtype)
    shape_rows = []
    for provider in providers:
        try:
            fn = make_fn(provider, q, k, v, layout, P, S, prefix, leaves, args.block_size)
            if fn is None:
                continue
            seconds = time_fn(fn, warmup=warmup, rep=rep, device=device)
        except Exception as exc:  # a baseline that cannot run this shape must not end the sweep
            print(f"{provider:>20} {P:>6} {N:>4} {S:>4}  skipped: {type(exc).__name__}: {exc}")
            continue
        shape_rows.append(dict(
            device=dev_name, provider=provider, P=P, N=N, S=S, Hq=Hq, Hkv=Hkv, D=D,
            dtype=str(dtype).replace("torch.", ""), block_size=args.block_size,
            median_us=seconds * 1e6, gbps=unique["shared"] / seconds / 1e9,
            unique_kv_bytes=unique["shared"], unshared_kv_bytes=unique["unshared"],
            copy_gbps=bw,
            **({"num_work": layout.num_work, "num_partials": layout.num_partials}
               if provider.startswith("a2r-tree") else {})))
    paged = next((r["median_us"] for r in shape_rows if r["provider"] == "a2r-paged"), None)
    eager = next((r["median_us"] for r in shape_rows if r["provider"] == "a2r-tree-wrapper"), None)
    for r in shape_rows:
        r["speedup_vs_paged"] = paged / r["median_us"] if paged else None
        if r["provider"] == "a2r-tree-graph" and eager:   # replay against the eager run
            r["speedup_vs_wrapper"] = eager / r["median_us"]
        print(f"{r['provider']:>24} {P:>6} {N:>4} {S:>4} {Hq:>3}/{Hkv:<3} "
              f"{r['median_us']:>10.1f} {r['gbps']:>8.1f} {100 * r['gbps'] / bw:>5.0f}% "
              f"{r['speedup_vs_paged'] or float('nan'):>7.2f}x")
    del k, v
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return shape_rows


def _write_and_plot(rows, name: str, shapes, dev_name: str, bw: float) -> None:
    write_results(os.path.join(RESULTS, f"{name}.json"), rows)
    Hq0, Hkv0 = shapes["heads"][0]
    S0 = shapes["S"][min(1, len(shapes["S"]) - 1)]
    for P in shapes["P"]:
        sel = [r for r in rows if r.get("kind") != "plan" and r["P"] == P and r["S"] == S0
               and r["Hq"] == Hq0]
        if sel:
            plot(os.path.join(RESULTS, f"{name}_P{P}.png"), sel, x="N", y="gbps", logx=True,
                 title=f"tree decode, P={P}, S={S0}, Hq/Hkv={Hq0}/{Hkv0}, {dev_name}",
                 ylabel="unique KV GB/s", ref_line=bw)
    print(f"# wrote {os.path.join(RESULTS, name + '.json')}")


def main(argv=None):
    args = _parse_args(argv)
    if args.cpu:
        rows = cpu_kernel_rows(args, getattr(torch, args.dtype or "float32"))
        if args.out:
            write_results(os.path.join(RESULTS, f"{args.out}_cpu.json"), rows)
            print(f"# wrote {os.path.join(RESULTS, args.out + '_cpu.json')}")
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = getattr(torch, args.dtype or "bfloat16")
    shapes = dict(GPU_SHAPES) if on_gpu else dict(CPU_SHAPES)
    if args.quick and on_gpu:
        shapes.update(P=[1024, 8192], N=[4, 64], S=[128])
    for key in ("P", "N", "S"):
        if getattr(args, key):
            shapes[key] = [int(x) for x in getattr(args, key).split(",")]
    if args.heads:
        shapes["heads"] = [tuple(int(h) for h in pair.split("/")) for pair in args.heads.split(",")]
    providers = providers_available(device)
    if args.providers:
        wanted = args.providers.split(",")
        providers = [p for p in providers if p in wanted]
    if args.plan_sweep:
        providers += [f"a2r-tree[c={c},s={s}]" for c, s in PLAN_SWEEP]
    if args.tile_sweep:
        providers += [f"a2r-tree(n={n},w={w})" for n, w in TILE_SWEEP]

    dev_name = device_name(device)
    bw = copy_gbps(device, nbytes=(512 if on_gpu else 64) * 1024 * 1024)
    print(f"# device: {dev_name}   copy bandwidth: {bw:.1f} GB/s   dtype: {dtype}")
    print(f"{'provider':>24} {'P':>6} {'N':>4} {'S':>4} {'Hq/Hkv':>7} {'median_us':>10} "
          f"{'GB/s':>8} {'%copy':>6} {'vs paged':>8}")
    warmup, rep = (10, 50) if on_gpu else (1, 3)
    rows = []
    for shape in itertools.product(shapes["P"], shapes["N"], shapes["S"], shapes["heads"],
                                   shapes["D"]):
        rows.extend(_shape_rows(args, shape, providers, device, dtype, dev_name, bw, warmup, rep))
    if not args.no_plan_rows:
        rows.extend(plan_rows(dev_name, device, args.block_size, reps=50 if on_gpu else 30))
    _write_and_plot(rows, (args.out or "tree_attention") + ("" if on_gpu else "_cpu"), shapes,
                    dev_name, bw)


if __name__ == "__main__":
    main()
