"""Explorer throughput and KV memory: n samples of one prompt, three ways, in the same run.

Providers:
- ``a2r-explore``: :func:`a2r.explore.explore` -- the prompt is prefilled once and its KV blocks
  are shared by the n branches (TreeKVCache fork); one ``[n_live, 1]`` decode batch per step with
  ``tree_decode_attention``; each step padded to a batch bucket and, on CUDA, replayed
  from a CUDA graph per batch bucket (``TreeDecoder(cuda_graphs=None)``).
- ``a2r-explore-eager`` (CUDA only): the same with ``cuda_graphs=False`` (the padded step run
  eagerly, as ``a2r-explore`` does on the CPU).
- ``a2r-noshare``: the same loop and kernels, but each branch prefills its own copy of the prompt
  (n roots, no fork): the prompt's KV is computed and stored n times.
- ``hf-generate``: ``model.generate(do_sample=True, num_return_sequences=n)`` with the same
  sampling settings (transformers' DynamicCache, SDPA attention): the prompt is expanded n times.

Model: Qwen3-0.6B's shape (hidden 1024, 28 layers, 16 q / 8 kv heads, head_dim 128, intermediate
3072, vocab 151936) with random weights in bf16. EOS is disabled so every branch generates exactly
``new_tokens`` tokens and the providers do the same work. Random weights make the tokens
meaningless; throughput and memory do not depend on them.

Rows (``benchmarks/results/explore.json``; quick / CPU runs go to ``explore_cpu.json``): device, provider, P, n, new_tokens, median_s,
tokens_per_s (n * new_tokens / median_s), peak_kv_bytes (KV held at the peak, from the block
pool for ours, computed for DynamicCache), peak_mem_bytes (CUDA allocator peak during the run,
weights included; 0 on CPU), copy_gbps, load_average_1m (the machine's, after the timing: a shared
box's load), and speedup vs hf-generate. The providers' repetitions
are interleaved (rep 1 of each, then rep 2, ...), so a shared machine's drift hits all alike.

Per-step rows (``a2r-explore``, ``a2r-explore-eager`` and ``hf-generate``; a replayed graph
dispatches no aten ops, so ours counts only the ops outside it): ``step_us``, the median wall time of
one decode step of the n branches (forward + sampling; ours: ``TreeDecoder.step``, theirs: one
``model(...)`` over a ``DynamicCache``; the providers' steps interleaved, 16 each, after one
warm-up step), and ``host_us_per_step``, the part of it spent on the
host before the step's work is queued (on CUDA: the time until the call returns without a
synchronise; on the CPU every op runs inline, so it equals ``step_us``); ``aten_ops_per_layer``,
the aten ops one decode step dispatches (``TorchDispatchMode``) divided by the layer count.

Run:  python benchmarks/bench_explore.py            (CUDA: full grid P in {2k, 8k}, n in {8, 32})
      python benchmarks/bench_explore.py --quick    (tiny model and shapes; the default on CPU.
                                                     CPU numbers are not GPU numbers.)
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_gbps, device_name, plot, results_dir, write_results  # noqa: E402

from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

import a2r_kernels.hf as akhf  # noqa: E402
from a2r.explore import explore, tree_blocks_needed  # noqa: E402
from a2r.sampling import sample_tokens  # noqa: E402

RESULTS = results_dir()

QWEN3_0_6B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                  vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
                  tie_word_embeddings=True)
TINY = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, intermediate_size=256, vocab_size=1024, max_position_embeddings=40960)

SAMPLING = dict(temperature=0.8, top_p=0.95, top_k=0)


def build_model(config: dict, dtype: torch.dtype, device: torch.device):
    torch.manual_seed(0)
    cfg = Qwen3Config(**config, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    model = Qwen3ForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    model.set_attn_implementation(akhf.register())   # SDPA outside our forwards
    return model


def run_ours(model, ids, n, new_tokens, block_size, cuda_graphs=None) -> int:
    """The explorer; ``cuda_graphs`` as in ``TreeDecoder`` (None: captured on CUDA)."""
    blocks = max(tree_blocks_needed(ids.shape[1], [n], [new_tokens], block_size), 1)
    dec = akhf.TreeDecoder(model, blocks, block_size=block_size, cuda_graphs=cuda_graphs)
    res = explore(dec, ids, [n], new_tokens, **SAMPLING, seed=0, eos_token_id=[])
    assert all(len(s) == new_tokens for s in res.sequences)
    return res.peak_kv_bytes


@torch.inference_mode()
def run_noshare(model, ids, n, new_tokens, block_size) -> int:
    """Our loop with the prompt prefilled and stored once per branch (no fork, no sharing)."""
    prompt_len = ids.shape[1]
    blocks = n * (math.ceil(prompt_len / block_size) + math.ceil(max(new_tokens - 1, 0) / block_size) + 1)
    dec = akhf.TreeDecoder(model, blocks, block_size=block_size)
    generator = torch.Generator(device=ids.device).manual_seed(0)
    roots, rows = [], []
    for _ in range(n):
        seq, logits = dec.prefill(ids)
        roots.append(seq)
        rows.append(logits)
    logits = torch.cat(rows)
    for step in range(new_tokens):
        tokens = sample_tokens(logits, **SAMPLING, generator=generator)
        tokens.tolist()   # the per-step host sync the explorer also does
        if step + 1 < new_tokens:
            logits = dec.step(roots, tokens)
    return dec.peak_kv_bytes


@torch.inference_mode()
def run_hf(model, ids, n, new_tokens, block_size) -> int:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                         num_return_sequences=n, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, pad_token_id=0, **SAMPLING)
    assert out.shape == (n, ids.shape[1] + new_tokens)
    cfg = model.config
    stored = ids.shape[1] + new_tokens - 1   # the last token's KV is never computed
    elem = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * n * stored * cfg.num_key_value_heads * cfg.head_dim * elem


PROVIDERS = {"a2r-explore": run_ours, "a2r-noshare": run_noshare, "hf-generate": run_hf,
             # The same padded static-buffer step without CUDA graphs (on CPU it is a2r-explore).
             "a2r-explore-eager": functools.partial(run_ours, cuda_graphs=False)}
GPU_ONLY_PROVIDERS = ("a2r-explore-eager",)


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


STEP_PROVIDERS = ("a2r-explore", "a2r-explore-eager", "hf-generate")   # rows with step stats


def _decode_stepper(provider: str, model, ids, n: int, block_size: int, device, steps: int):
    """A function running one decode step of n branches after the prompt ``ids`` (sampling the
    previous step's logits, then the forward), state kept across calls."""
    generator = torch.Generator(device=device).manual_seed(0)
    if provider in ("a2r-explore", "a2r-explore-eager"):
        dec = akhf.TreeDecoder(model, math.ceil(ids.shape[1] / block_size)
                               + n * (math.ceil((steps + 4) / block_size) + 1),
                               block_size=block_size,
                               cuda_graphs=False if provider == "a2r-explore-eager" else None)
        root, logits = dec.prefill(ids)
        seqs = dec.fork(root, n)
        state = [logits.expand(n, -1)]

        def step():
            tokens = sample_tokens(state[0], **SAMPLING, generator=generator)
            state[0] = dec.step(seqs, tokens)
        return step
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(input_ids=ids.expand(n, -1), past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    state = [out.logits[:, -1].float(), ids.shape[1]]

    def step():
        tokens = sample_tokens(state[0], **SAMPLING, generator=generator)
        pos = torch.full((n, 1), state[1], dtype=torch.long, device=device)
        state[1] += 1
        state[0] = model(input_ids=tokens[:, None], position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1).logits[:, -1].float()
    return step


@torch.inference_mode()
def decode_step_stats(providers, model, ids, n: int, block_size: int, device,
                      steps: int = 16) -> dict[str, dict]:
    """Per provider: ``step_us``, ``host_us_per_step`` and ``aten_ops_per_layer`` of one decode
    step of n branches after a prompt ``ids`` (see the module docstring); the providers' steps
    are interleaved, like the end-to-end repetitions."""
    steppers = {p: _decode_stepper(p, model, ids, n, block_size, device, steps) for p in providers}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for step in steppers.values():
        step()   # warm-up
    walls = {p: [] for p in steppers}
    hosts = {p: [] for p in steppers}
    for _ in range(steps):
        for provider, step in steppers.items():
            sync()
            start = time.perf_counter()
            step()
            hosts[provider].append(time.perf_counter() - start)
            sync()
            walls[provider].append(time.perf_counter() - start)
    stats = {}
    for provider, step in steppers.items():
        with _CountOps() as ops:
            step()
        stats[provider] = dict(step_us=1e6 * statistics.median(walls[provider]),
                               host_us_per_step=1e6 * statistics.median(hosts[provider]),
                               aten_ops_per_layer=ops.count / model.config.num_hidden_layers)
    return stats


def measure_interleaved(runs: dict, device, warmup: int, rep: int) -> dict:
    """Per name: (median seconds, the run's return value, CUDA allocator peak bytes), with the
    runs' repetitions interleaved."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in runs}
    values, peaks = {}, {}
    for _ in range(rep):
        for name, fn in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            start = time.perf_counter()
            values[name] = fn()
            sync()
            times[name].append(time.perf_counter() - start)
            peaks[name] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {name: (statistics.median(times[name]), values[name], peaks[name]) for name in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and shapes (default on CPU)")
    parser.add_argument("--prompt-lens", type=int, nargs="*")
    parser.add_argument("--ns", type=int, nargs="*")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--providers", nargs="*", choices=list(PROVIDERS),
                        help="default: all (a2r-explore-eager only on CUDA)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rep", type=int, help="repetitions per provider (default: 3; --quick: 2)")
    parser.add_argument("--out", default=None,
                        help="results JSON (default: results/explore.json on a GPU, "
                        "results/explore_cpu.json for quick/CPU runs)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type != "cuda"
    if args.providers is None:
        args.providers = [p for p in PROVIDERS
                          if device.type == "cuda" or p not in GPU_ONLY_PROVIDERS]
    if quick:
        config, dtype = TINY, torch.float32
        prompt_lens, ns, new_tokens = args.prompt_lens or [64, 256], args.ns or [2, 4], args.new_tokens or 16
        rep = args.rep or 2
    else:
        config, dtype = QWEN3_0_6B, torch.bfloat16
        prompt_lens = args.prompt_lens or [2048, 8192]
        ns, new_tokens = args.ns or [8, 32], args.new_tokens or 256
        rep = args.rep or 3
    stem = "explore_cpu" if quick else "explore"
    args.out = args.out or os.path.join(RESULTS, f"{stem}.json")
    model = build_model(config, dtype, device)
    name = device_name(device) + (" [quick: tiny model]" if quick else "")
    gbps = copy_gbps(device, nbytes=(16 if quick else 256) * 1024 * 1024)
    print(f"# {name}  copy {gbps:.1f} GB/s  model {'tiny' if quick else 'Qwen3-0.6B shape'} {dtype}")
    print(f"{'provider':>12} {'P':>6} {'n':>4} {'new':>4} {'median_s':>9} {'tok/s':>9} "
          f"{'peak_kv_MB':>11} {'peak_mem_MB':>12} {'step_us':>9} {'host_us':>9} {'ops/layer':>8}")

    rows = []
    for prompt_len in prompt_lens:
        ids = torch.randint(0, config["vocab_size"], (1, prompt_len), device=device,
                            generator=torch.Generator(device=device).manual_seed(prompt_len))
        for n in ns:
            group = []
            runs = {provider: (lambda fn=PROVIDERS[provider]: fn(model, ids, n, new_tokens,
                                                                 args.block_size))
                    for provider in args.providers}
            timed = measure_interleaved(runs, device, warmup=1, rep=rep)
            step_stats = decode_step_stats([p for p in args.providers if p in STEP_PROVIDERS],
                                           model, ids, n, args.block_size, device)
            for provider in args.providers:
                seconds, kv_bytes, peak = timed[provider]
                row = dict(device=name, provider=provider, P=prompt_len, n=n, new_tokens=new_tokens,
                           median_s=seconds, tokens_per_s=n * new_tokens / seconds,
                           peak_kv_bytes=int(kv_bytes), peak_mem_bytes=int(peak),
                           copy_gbps=gbps, dtype=str(dtype).replace("torch.", ""),
                           block_size=args.block_size, load_average_1m=os.getloadavg()[0])
                row.update(step_stats.get(provider, {}))
                group.append(row)
                print(f"{provider:>12} {prompt_len:>6} {n:>4} {new_tokens:>4} {seconds:>9.3f} "
                      f"{row['tokens_per_s']:>9.1f} {kv_bytes / 2**20:>11.1f} {peak / 2**20:>12.1f}"
                      + (f" {row['step_us']:>9.0f} {row['host_us_per_step']:>9.0f} "
                         f"{row['aten_ops_per_layer']:>8.1f}" if "step_us" in row else ""),
                      flush=True)
            base = next((r for r in group if r["provider"] == "hf-generate"), None)
            for row in group:
                if base is not None:
                    row["speedup_vs_hf"] = base["median_s"] / row["median_s"]
                    row["kv_bytes_vs_hf"] = row["peak_kv_bytes"] / base["peak_kv_bytes"]
            rows += group
    merged = write_results(args.out, rows,
                           key_fields=("device", "provider", "P", "n", "new_tokens", "dtype"))
    directory = os.path.dirname(os.path.abspath(args.out))   # the plots go next to the JSON
    plot_results([r for r in merged if r["device"] == name], name, os.path.join(directory, stem))
    print(f"wrote {args.out} and {directory}/{stem}_*.png")


def plot_results(rows: list[dict], name: str, stem: str) -> None:
    """``<stem>_tokens_per_s.png`` and ``<stem>_peak_kv_bytes.png`` of one device's rows."""
    for metric, label in (("tokens_per_s", "generated tokens / s"), ("peak_kv_bytes", "peak KV bytes")):
        plot_rows = [dict(r, shape=f"P={r['P']} n={r['n']} new={r['new_tokens']}") for r in rows]
        plot(f"{stem}_{metric}.png", plot_rows, x="shape", y=metric,
             title=f"explorer ({name})", ylabel=label,
             logy=metric == "peak_kv_bytes")


if __name__ == "__main__":
    main()
