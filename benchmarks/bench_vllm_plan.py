"""Host time of planning a paged decode step: IncrementalTreePlanner against a fresh
TreeLayout.from_block_tables every step (what the vLLM backend did before issue 24).

    python benchmarks/bench_vllm_plan.py            # 64 x 520 and 256 x 512 blocks, 64 steps
    python benchmarks/bench_vllm_plan.py --quick    # 16 x 72, 16 steps

vLLM-like tables: rows in groups of ``--group`` (n paths of one prompt) that share the prompt's
full blocks (prefix caching), then private blocks; block size 16; every row grows one token a
step, so each row gets a fresh block every 16 steps (rows staggered: a few cross a boundary at
every step). Cases per shape: plain; ``repeated`` (one block id sits at two positions of a
row, which sent ``from_block_tables`` down its sorting path before issue 24); ``long_tails``
(24 private blocks, rows staggered over 192 tokens: some tail crosses a 256-token tail chunk
at most steps, so the planner rewrites its plan's tail items, as in long generations). Per
provider: host microseconds
per step, amortised over ``--steps`` steps including the first plan (``us_per_step``), and
without it (``us_per_step_after_first``); providers interleaved step by step, one thread, so
each runs with the caches the others left (as a plan runs after a model step). Providers:
``incremental`` (the C++ planner of ``a2r_kernels._cpu`` where built), ``incremental_numpy``
(its numpy reference) and ``from_block_tables``. Before timing, every provider plans one
small batch untimed (the process's first call of each code path is not a plan's cost; an
engine warms up the same way). Rows go to ``vllm_plan_cpu.json`` in ``common.results_dir()``
(``$A2R_BENCH_RESULTS_DIR``, else ``benchmarks/results``), with the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import device_name, results_dir, write_results  # noqa: E402

from a2r_kernels import TreeLayout, block_table_tree, incremental_plan  # noqa: E402
from a2r_kernels.incremental_plan import IncrementalTreePlanner  # noqa: E402

BLOCK_SIZE = 16
PRIVATE_BLOCKS = 8     # blocks each row holds alone at the first step
LONG_TAIL_BLOCKS = 24  # the same, --long-tails rows


def batch(rows: int, blocks: int, group: int, repeated: bool, long_tails: bool = False):
    """int32 tables [rows, blocks + 8] (room for the rows' fresh blocks) and int64 lengths:
    groups of ``group`` rows share ``blocks - PRIVATE_BLOCKS`` prompt blocks (``long_tails``:
    ``blocks - LONG_TAIL_BLOCKS``, and rows staggered over 192 tokens, so that tails cross
    the planner's 256-token tail chunks during the run, as long generations do)."""
    private = LONG_TAIL_BLOCKS if long_tails else PRIVATE_BLOCKS
    width = blocks + 8
    tables = np.zeros((rows, width), dtype=np.int32)
    rng = np.random.default_rng(0)
    ids = rng.permutation(rows * width * 2).astype(np.int32)   # block ids, no repeats
    taken = 0
    prompt = blocks - private
    for first in range(0, rows, group):
        shared = ids[taken:taken + prompt]
        taken += prompt
        for row in range(first, min(first + group, rows)):
            tables[row, :prompt] = shared
            tables[row, prompt:blocks] = ids[taken:taken + private]
            taken += private
    if repeated:
        tables[0, 1] = tables[0, 0]
    # staggered: row r is r % BLOCK_SIZE tokens short of its last block's end
    stagger = 192 if long_tails else BLOCK_SIZE
    lens = (blocks * BLOCK_SIZE - np.arange(rows) * 5 % stagger if long_tails
            else blocks * BLOCK_SIZE - np.arange(rows) % stagger).astype(np.int64)
    return tables, lens, ids[taken:].tolist()


def advance(tables: np.ndarray, lens: np.ndarray, free: list[int]) -> None:
    """One decode step: every row one token longer, a fresh block where it crosses a boundary."""
    crossing = np.nonzero(lens % BLOCK_SIZE == 0)[0]
    for row in crossing:
        tables[row, lens[row] // BLOCK_SIZE] = free.pop()
    lens += 1


@contextlib.contextmanager
def numpy_planner(on: bool):
    """The planner's numpy reference instead of its C++ twin while ``on``."""
    if not on:
        yield
        return
    saved = block_table_tree.planner_extension
    block_table_tree.planner_extension = incremental_plan.planner_extension = lambda: None
    try:
        yield
    finally:
        block_table_tree.planner_extension = incremental_plan.planner_extension = saved


PROVIDERS = ("incremental", "incremental_numpy", "from_block_tables")


def measure(rows: int, blocks: int, group: int, steps: int, repeated: bool,
            long_tails: bool = False) -> dict[str, list]:
    """Per provider, the host seconds of each step's plan."""
    tables, lens, free = batch(rows, blocks, group, repeated, long_tails)
    planners = {"incremental": IncrementalTreePlanner(BLOCK_SIZE),
                "incremental_numpy": IncrementalTreePlanner(BLOCK_SIZE)}
    times: dict[str, list] = {name: [] for name in PROVIDERS}
    for _ in range(steps):
        advance(tables, lens, free)
        for name, planner in planners.items():
            with numpy_planner(name == "incremental_numpy"):
                start = time.perf_counter()
                planner.plan(tables, lens)
                times[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        TreeLayout.from_block_tables(torch.from_numpy(tables), torch.from_numpy(lens),
                                     BLOCK_SIZE)
        times["from_block_tables"].append(time.perf_counter() - start)
    for name, planner in planners.items():
        times[f"{name}_replans"] = [planner.replans]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--group", type=int, default=16, help="rows per shared prompt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shapes = [(16, 72)] if args.quick else [(64, 520), (256, 512)]
    steps = args.steps or (16 if args.quick else 64)
    device = device_name("cpu")
    load = os.getloadavg()[0]
    measure(16, 72, args.group, 4, False)      # warm-up, untimed (module docstring)
    print(f"{device}, one thread, load average {load:.2f}, C++ planner: "
          f"{block_table_tree.planner_extension() is not None}")
    rows_out = []
    for rows, blocks in shapes:
        for repeated, long_tails in ((False, False), (True, False), (False, True)):
            times = measure(rows, blocks, args.group, steps, repeated, long_tails)
            baseline = sum(times["from_block_tables"]) / steps
            for provider in PROVIDERS:
                t = times[provider]
                row = {"device": device, "provider": provider, "rows": rows, "blocks": blocks,
                       "block_size": BLOCK_SIZE, "group": args.group, "steps": steps,
                       "repeated_block": repeated, "long_tails": long_tails,
                       "load_average": load,
                       "us_per_step": float(sum(t) / steps * 1e6),
                       "us_per_step_after_first": float(sum(t[1:]) / (steps - 1) * 1e6),
                       "us_median_step": float(statistics.median(t) * 1e6),
                       "us_first_step": float(t[0] * 1e6),
                       "speedup_vs_from_block_tables": float(baseline / (sum(t) / steps))}
                if provider != "from_block_tables":
                    row["replans"] = times[f"{provider}_replans"][0]
                rows_out.append(row)
                case = " repeated" if repeated else " longtail" if long_tails else " " * 9
                print(f"{rows:4d} x {blocks:4d}{case} "
                      f"{provider:>17}: {row['us_per_step']:9.1f} us/step amortised "
                      f"(first {row['us_first_step']:8.1f}, then "
                      f"{row['us_per_step_after_first']:7.1f})  x{row['speedup_vs_from_block_tables']:.1f}")
    if not args.quick:
        path = Path(results_dir()) / "vllm_plan_cpu.json"
        write_results(str(path), rows_out)
        print(f"wrote {path} ({device}; shared 2-core box, one thread)")


if __name__ == "__main__":
    main()
