"""Is the explorer's host planning of step t + 1 hidden behind step t on the device?

One level of ``n`` sampled branches of one prompt, with a stop read every step (EOS is an id
outside the vocabulary: each step's tokens come to the host for the stop check, and no branch
stops, so both orders below do exactly the same work), two loop orders in the same run:

- ``pipelined``: :func:`a2r.explore.explore`. Once step t's forward and sampling are queued, the
  host reserves and plans step t + 1 (``TreeDecoder.plan_step``), then waits for step t's tokens,
  then runs step t + 1 (``run_step``).
- ``serial``: the same :func:`explore` call with each ``plan_step`` deferred to its ``run_step``
  (the bench wraps the decoder's two methods), i.e. made after step t's stop read: the former
  order, with the same host work. Both orders sample the same tokens (asserted).

Rows (``benchmarks/results/step_overlap.json``; CPU runs ``step_overlap_cpu.json``):
``step_us`` (median wall time of one run, less its prefill, per decode step), ``plan_us`` (host
time of one ``plan_step``, median, in that run), ``device_step_us`` (CUDA only:
``torch.cuda.Event`` time of one ``run_step`` plus its sampling on the device) and, on the
pipelined row, ``hidden_fraction`` = (serial ``step_us`` - pipelined ``step_us``) / serial
``plan_us``: about 1 when the planning is hidden (the device step is longer than it), about 0
when nothing overlaps, as on the CPU, where every op runs inline. Repetitions of the two orders
are interleaved.

Run:  python benchmarks/bench_step_overlap.py          (CUDA: Qwen3-0.6B shape, bf16, graphs)
      python benchmarks/bench_step_overlap.py --quick  (tiny model; the default on CPU)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_explore import QWEN3_0_6B, RESULTS, SAMPLING, TINY, build_model  # noqa: E402
from common import device_name, write_results  # noqa: E402

import a2r_kernels.hf as akhf  # noqa: E402
from a2r.explore import explore, tree_blocks_needed  # noqa: E402
from a2r.sampling import sample_tokens  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_explore(dec, ids, n: int, new_tokens: int, never: int, plan_times: list,
                serial: bool) -> list:
    """:func:`explore` in ``dec``, timing each plan_step on the host. ``serial``: each plan is
    deferred to its run_step, i.e. made after the stop read instead of before it (the former
    order; with no stops, nothing else changes). Instance attributes: this decoder, this run."""
    plan, run = dec.plan_step, dec.run_step
    deferred = []

    def timed_plan(seqs):
        start = time.perf_counter()
        plan(seqs)
        plan_times.append(time.perf_counter() - start)

    def defer(seqs):
        deferred.append(list(seqs))

    def plan_then_run(token_ids):
        timed_plan(deferred.pop())
        return run(token_ids)

    if serial:
        dec.plan_step, dec.run_step = defer, plan_then_run
    else:
        dec.plan_step = timed_plan
    try:
        res = explore(dec, ids, [n], new_tokens, **SAMPLING, seed=0, eos_token_id=never)
    finally:
        del dec.plan_step
        if serial:
            del dec.run_step
    assert not any(res.stopped) and not deferred
    return res.sequences


@torch.inference_mode()
def device_step_us(dec, ids, n: int, steps: int = 8) -> float:
    """Median CUDA-event time of one run_step plus its sampling, on the device."""
    generator = torch.Generator(device=dec.device).manual_seed(1)
    root, logits = dec.prefill(ids)
    kids = dec.fork(root, n)
    dec.free(root)
    tokens = sample_tokens(logits.expand(n, -1), **SAMPLING, generator=generator)
    times = []
    for _ in range(steps + 1):
        dec.plan_step(kids)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        logits = dec.run_step(tokens)
        tokens = sample_tokens(logits, **SAMPLING, generator=generator)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    for kid in kids:
        dec.free(kid)
    return statistics.median(times[1:])   # the first may capture the bucket's graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model (default on CPU)")
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--ns", type=int, nargs="*")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rep", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type != "cuda"
    config, dtype = (TINY, torch.float32) if quick else (QWEN3_0_6B, torch.bfloat16)
    prompt_len = args.prompt_len or (64 if quick else 2048)
    ns = args.ns or ([4] if quick else [8, 32])
    new_tokens = args.new_tokens or (16 if quick else 64)
    stem = "step_overlap_cpu" if device.type != "cuda" else "step_overlap"
    out = args.out or os.path.join(RESULTS, f"{stem}.json")
    model = build_model(config, dtype, device)
    never = config["vocab_size"]   # an EOS id no step can sample
    name = device_name(device) + (" [quick: tiny model]" if quick else "")
    print(f"# {name}  model {'tiny' if quick else 'Qwen3-0.6B shape'} {dtype}  P={prompt_len} "
          f"new_tokens={new_tokens}  rep={args.rep}"
          + (f"  load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""))
    print(f"{'provider':>10} {'n':>4} {'step_us':>9} {'plan_us':>9} {'device_us':>10} "
          f"{'hidden':>7}")
    ids = torch.randint(0, config["vocab_size"], (1, prompt_len), device=device,
                        generator=torch.Generator(device=device).manual_seed(prompt_len))
    rows = []
    for n in ns:
        blocks = tree_blocks_needed(prompt_len, [n], [new_tokens], args.block_size) + 1
        decoders = {p: akhf.TreeDecoder(model, blocks, block_size=args.block_size)
                    for p in ("pipelined", "serial", "prefill")}
        plan_times = {"pipelined": [], "serial": []}
        runs = {p: (lambda p=p: run_explore(decoders[p], ids, n, new_tokens, never,
                                            plan_times[p], serial=p == "serial"))
                for p in ("pipelined", "serial")}

        def prefill():   # the part of a run that is not decode steps
            seq, _ = decoders["prefill"].prefill(ids)
            decoders["prefill"].free(seq)
        runs["prefill"] = prefill
        results = {p: fn() for p, fn in runs.items()}   # warm-up: graphs captured, kernels built
        assert results["pipelined"] == results["serial"], "the two orders sampled differently"
        for values in plan_times.values():
            values.clear()
        times = {p: [] for p in runs}
        for _ in range(args.rep):
            for p, fn in runs.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[p].append(time.perf_counter() - start)
        base = statistics.median(times["prefill"])
        # decode steps per run: new_tokens - 1 forwards (the last token is never fed)
        step_us = {p: 1e6 * (statistics.median(times[p]) - base) / (new_tokens - 1)
                   for p in ("pipelined", "serial")}
        plan_us = {p: 1e6 * statistics.median(plan_times[p]) for p in plan_times}
        dev_us = device_step_us(decoders["serial"], ids, n) if device.type == "cuda" else None
        for p in ("pipelined", "serial"):
            row = dict(device=name, provider=p, P=prompt_len, n=n, new_tokens=new_tokens,
                       dtype=str(dtype).replace("torch.", ""), block_size=args.block_size,
                       step_us=step_us[p], plan_us=plan_us[p],
                       cuda_graphs=decoders[p].cuda_graphs)
            if dev_us is not None:
                row["device_step_us"] = dev_us
            if p == "pipelined":
                row["hidden_fraction"] = ((step_us["serial"] - step_us["pipelined"])
                                          / plan_us["serial"])
            rows.append(row)
            print(f"{p:>10} {n:>4} {step_us[p]:>9.0f} {plan_us[p]:>9.0f} "
                  f"{dev_us if dev_us is not None else float('nan'):>10.0f} "
                  f"{row.get('hidden_fraction', float('nan')):>7.2f}", flush=True)
    write_results(out, rows, key_fields=("device", "provider", "P", "n", "new_tokens", "dtype"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
