"""Benchmark ``denoise_step`` against LLaDA / Fast-dLLM style torch steps, in the same run.

Providers:
  a2r-denoise     ak.denoise_step(backend="triton"): logits streamed once, no [B, L, V] softmax
  a2r-cuda        ak.denoise_step(backend="cuda"), when the extension is built
  a2r-cuda[s=N]   with --cuda-split-sweep: the CUDA step with N CTAs per position over V forced
                  (shapes with B * L <= 256), to tune _cuda_ops.denoise_num_splits
  a2r-torch       (CPU) ak.denoise_step(backend="torch"), the fp32 reference that "auto" runs on CPU
  a2r-torch-sample  the same at temperature 1 (Gumbel-max: a Philox draw per logit)
  llada-torch     LLaDA generate.py step: softmax over all positions, argmax, gather, where,
                  per-row topk loop
  llada-torch-sample  (CPU) the same at temperature 1 (LLaDA's fp64 add_gumbel_noise)
  fastdllm-torch  Fast-dLLM threshold step (same, with the confidence-threshold rule)

Entropy-bound rows (``--ops entropy-bound``, results to benchmarks/results/entropy_bound*.json):
  a2r-eb-step     ak.entropy_bound_step(backend="auto"): Triton on GPU, the torch path on CPU
  a2r-eb-triton   the Triton backend, named (GPU)
  hf-eb-sampler   transformers' DiffusionGemma sampler step on the same logits: fp32 softmax,
                  multinomial, argmax, accept_canvas (Categorical entropy, sort), renoise_canvas
  at B=8, L=256, V=262144 bf16 on GPU (2x64x32000 on CPU), "flat" and "lm-like" logits.

GPU (default): B in {1, 8, 32}, L in {32, 256, 1024}, V in {126464 (LLaDA), 151936 (Qwen2)},
bf16 logits, all positions masked (``--half-masked`` adds a variant with every other position
masked). Rows go to benchmarks/results/denoise.json, the plot to benchmarks/results/denoise.png.
``gbps`` = logit bytes of the whole [B, L, V] tensor / time (what every provider must read at
least once when all positions are masked); ``copy_gbps`` is the device's copy bandwidth measured
in the same run.

CPU (no GPU, or ``--quick``): small shapes (V = 32000, B <= 2, L <= 64), torch providers only
(plus Triton when TRITON_INTERPRET=1, on the smallest shape); results to
benchmarks/results/denoise_cpu.json / denoise_cpu.png, never mixed with GPU numbers.

    python benchmarks/bench_denoise.py            # GPU sweep (or the CPU quick mode without one)
    python benchmarks/bench_denoise.py --quick    # small shapes anywhere
    python benchmarks/bench_denoise.py --shapes 8x256x126464   # given shapes only (GPU: denoise.json)
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_gbps, device_name, plot, results_dir, time_fn, write_results  # noqa: E402

import a2r_kernels as ak  # noqa: E402

RESULTS_DIR = results_dir()
MASK_ID = 126336   # LLaDA's [MASK]; any id < V works


def add_gumbel_noise(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """LLaDA generate.py's add_gumbel_noise (fp64, as LLaDA does)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def llada_step(logits: torch.Tensor, x: torch.Tensor, mask_id: int,
               num_transfer_tokens: torch.Tensor, temperature: float = 0.0) -> torch.Tensor:
    """LLaDA generate.py, low_confidence (fp64 softmax as LLaDA does)."""
    mask_index = x == mask_id
    x0 = torch.argmax(add_gumbel_noise(logits, temperature), dim=-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -math.inf)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    for j in range(confidence.shape[0]):
        _, select_index = torch.topk(confidence[j], k=num_transfer_tokens[j])
        transfer_index[j, select_index] = True
    x[transfer_index] = x0[transfer_index]
    return x


def fastdllm_step(logits: torch.Tensor, x: torch.Tensor, mask_id: int,
                  threshold: float) -> torch.Tensor:
    """Fast-dLLM's threshold step (get_transfer_index with a threshold), fp32 softmax."""
    mask_index = x == mask_id
    x0 = torch.argmax(logits, dim=-1)
    p = F.softmax(logits.to(torch.float32), dim=-1)
    x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -math.inf)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    num_transfer_tokens = mask_index.sum(dim=1)
    for j in range(confidence.shape[0]):
        k = int(num_transfer_tokens[j])
        if k == 0:
            continue
        values, select_index = torch.topk(confidence[j], k=k)
        keep = torch.cat([torch.ones(1, dtype=torch.bool, device=x.device),
                          values[1:] >= threshold])
        transfer_index[j, select_index[keep]] = True
    x[transfer_index] = x0[transfer_index]
    return x


def _available(backend: str, device: torch.device) -> bool:
    try:
        ak.backend.resolve_backend("denoise_step", backend, device)
        if backend == "cuda":
            from a2r_kernels import _cuda_ops
            return hasattr(_cuda_ops, "denoise_step")
    except (ak.BackendUnavailable, ImportError):
        return False
    return True


def providers_for(device: torch.device, allow_triton: bool) -> dict:
    """name -> fn(logits, tokens, mask_id, quota) running one step, updating tokens in place."""
    providers = {}
    threshold = 0.9
    for name, backend in (("a2r-denoise", "triton"), ("a2r-cuda", "cuda")):
        if (backend != "triton" or allow_triton) and _available(backend, device):
            if device.type == "cpu":
                name += "-interpreter"   # Triton's numpy interpreter: a smoke run, not a speed
            providers[name] = (
                lambda logits, tokens, mask_id, quota, _b=backend:
                ak.denoise_step(logits, tokens, mask_id, num_transfer=quota, backend=_b))
            providers[name + "-threshold"] = (
                lambda logits, tokens, mask_id, quota, _b=backend:
                ak.denoise_step(logits, tokens, mask_id, threshold=threshold, backend=_b))
    if device.type == "cpu":   # what "auto" runs on CPU: the fp32 reference
        providers["a2r-torch"] = (
            lambda logits, tokens, mask_id, quota:
            ak.denoise_step(logits, tokens, mask_id, num_transfer=quota, backend="torch"))
        # Gumbel-max sampling: the Philox stream of every (position, v), in int64 torch ops
        providers["a2r-torch-sample"] = (
            lambda logits, tokens, mask_id, quota:
            ak.denoise_step(logits, tokens, mask_id, num_transfer=quota, temperature=1.0,
                            backend="torch", generator=torch.Generator().manual_seed(0)))
    providers["llada-torch"] = (
        lambda logits, tokens, mask_id, quota: llada_step(logits, tokens, mask_id, quota.tolist()))
    if device.type == "cpu":   # the like-for-like baseline of a2r-torch-sample
        providers["llada-torch-sample"] = (
            lambda logits, tokens, mask_id, quota:
            llada_step(logits, tokens, mask_id, quota.tolist(), temperature=1.0))
    providers["fastdllm-torch"] = (
        lambda logits, tokens, mask_id, quota: fastdllm_step(logits, tokens, mask_id, threshold))
    return providers


CUDA_SPLIT_SWEEP = (1, 2, 4, 8, 16)
SPLIT_SWEEP_MAX_POSITIONS = 256   # V splits matter only where B * L leaves SMs idle


def cuda_split_providers(device: torch.device) -> dict:
    """``a2r-cuda[s=N]``: the CUDA step with N CTAs per position over V forced (the default picks
    N with ``_cuda_ops.denoise_num_splits``; this sweep is how its constants get tuned)."""
    if not _available("cuda", device):
        return {}
    from a2r_kernels import _cuda_ops

    def forced(num_splits: int):
        def step(logits, tokens, mask_id, quota):
            batch, length, _ = logits.shape
            x0 = torch.empty(batch, length, dtype=torch.int64, device=logits.device)
            confidence = torch.empty(batch, length, dtype=torch.float32, device=logits.device)
            transferred = torch.empty(batch, length, dtype=torch.bool, device=logits.device)
            _cuda_ops.denoise_step(logits, tokens, mask_id, quota, None, 0.0, "low_confidence", 0,
                                   x0, confidence, transferred, num_splits=num_splits)
        return step

    return {f"a2r-cuda[s={n}]": forced(n) for n in CUDA_SPLIT_SWEEP}


def run(shapes, device: torch.device, dtype: torch.dtype, half_masked: bool, allow_triton: bool,
        warmup: int, rep: int, out_json: str, out_png: str, split_sweep: bool = False) -> list[dict]:
    name = device_name(device)
    bandwidth = copy_gbps(device, nbytes=(256 << 20) if device.type == "cuda" else (64 << 20))
    print(f"device: {name}   copy bandwidth: {bandwidth:.1f} GB/s")
    providers = providers_for(device, allow_triton)
    if split_sweep:
        providers.update(cuda_split_providers(device))
    rows = []
    masked_variants = [1.0] + ([0.5] if half_masked else [])
    for (batch, length, vocab), masked_fraction in itertools.product(shapes, masked_variants):
        gen = torch.Generator(device=device).manual_seed(0)
        # Generated on the device in the benchmark dtype: [32, 1024, 151936] bf16 is 10 GB.
        logits = torch.randn(batch, length, vocab, generator=gen, device=device, dtype=dtype)
        mask_id = min(MASK_ID, vocab - 1)
        tokens = torch.randint(0, vocab - 1, (batch, length), generator=gen, device=device)
        masked = torch.arange(length, device=device) % round(1 / masked_fraction) == 0
        tokens[:, masked] = mask_id
        quota = torch.full((batch,), max(1, length // 8), dtype=torch.int64, device=device)
        logit_bytes = logits.numel() * logits.element_size()
        baseline_us = {}
        for provider, fn in providers.items():
            if provider.startswith("a2r-denoise") and device.type == "cpu" and \
                    batch * length * vocab > 2 * 64 * 32000 // 4:
                continue   # the Triton interpreter: only the smallest CPU shape
            if provider.startswith("a2r-cuda[s=") and batch * length > SPLIT_SWEEP_MAX_POSITIONS:
                continue
            work = tokens.clone()

            def step():
                work.copy_(tokens)     # every timed step starts from the same masked state
                fn(logits, work, mask_id, quota)
            try:
                seconds = time_fn(step, warmup=warmup, rep=rep, device=device)
            except torch.cuda.OutOfMemoryError:
                print(f"B={batch} L={length} V={vocab} {provider}: out of memory, skipped")
                torch.cuda.empty_cache()
                continue
            reset = time_fn(lambda: work.copy_(tokens), warmup=warmup, rep=rep, device=device)
            median_us = max(seconds - reset, 1e-9) * 1e6
            baseline_us[provider] = median_us
            rows.append({
                "device": name, "provider": provider, "B": batch, "L": length, "V": vocab,
                "dtype": str(dtype).replace("torch.", ""), "masked_fraction": masked_fraction,
                "median_us": median_us, "gbps": logit_bytes / (median_us * 1e-6) / 1e9,
                "copy_gbps": bandwidth,
            })
        for row in rows[len(rows) - len(baseline_us):]:
            for base in ("llada-torch", "llada-torch-sample", "fastdllm-torch"):
                if base in baseline_us:
                    row[f"speedup_vs_{base}"] = baseline_us[base] / row["median_us"]
            print(f"B={batch:3d} L={length:5d} V={vocab:6d} masked={masked_fraction:.1f} "
                  f"{row['provider']:>26s}: {row['median_us']:10.1f} us  {row['gbps']:8.1f} GB/s "
                  f"({row['gbps'] / bandwidth:5.1%} of copy)  x{row.get('speedup_vs_llada-torch', 1):.2f} vs llada")
    write_results(out_json, rows, key_fields=("device", "provider", "B", "L", "V", "dtype",
                                              "masked_fraction"))
    plot_rows = [dict(r, shape=f"B{r['B']} L{r['L']} V{r['V']}") for r in rows
                 if r["masked_fraction"] == 1.0]
    plot(out_png, plot_rows, x="shape", y="gbps", title=f"denoise_step, all masked, {name}",
         ylabel="logit GB/s", logy=True, ref_line=bandwidth)
    print(f"wrote {out_json} and {out_png}")
    return rows


# --------------------------------------------------------------------------- entropy-bound rows
# ak.entropy_bound_step against transformers' DiffusionGemma sampler step on the same logits.
# Two logit kinds: "flat" (randn: every vocabulary entry is a Gumbel-max candidate) and
# "lm-like" (a few peaked tokens over a randn bulk, divided by a DiffusionGemma temperature:
# the exact candidate pruning of the Gumbel-max skips most draws).
ENTROPY_BOUND = 0.1          # DiffusionGemma's default sampler_config
LM_LIKE_TEMPERATURE = 0.6    # inside DiffusionGemma's default schedule [0.4, 0.8]
LM_LIKE_PEAKS = 16           # peaked tokens per position


def lm_like_logits(batch, length, vocab, device, dtype, generator) -> torch.Tensor:
    """``(1.5 * randn + peaks) / 0.6`` with 16 random tokens per position raised by 8..16."""
    raw = torch.randn(batch, length, vocab, generator=generator, device=device) * 1.5
    peaks = torch.randint(0, vocab, (batch, length, LM_LIKE_PEAKS), generator=generator,
                          device=device)
    raw.scatter_add_(-1, peaks, torch.linspace(8.0, 16.0, LM_LIKE_PEAKS, device=device)
                     .expand(batch, length, -1).contiguous())
    return (raw / LM_LIKE_TEMPERATURE).to(dtype)


def hf_eb_sampler_step(sampler, logits: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """transformers' DiffusionGemma step after the temperature schedule (``_denoising_step``):
    fp32 softmax, multinomial, argmax, ``accept_canvas`` (Categorical entropy, sort, cumsum),
    ``renoise_canvas``."""
    batch, length, vocab = logits.shape
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    sample = torch.multinomial(probs.view(-1, vocab), num_samples=1).view(batch, length)
    torch.argmax(logits, dim=-1)
    accepted = sampler.accept_canvas(canvas, sample, logits, 1)
    return sampler.renoise_canvas(accepted, 1)


def entropy_bound_providers(device: torch.device, allow_triton: bool, length: int,
                            vocab: int) -> dict:
    """name -> fn(logits, canvas) running one step (canvas updated in place where ours)."""
    providers = {}
    backends = [("a2r-eb-step", "auto")]
    if device.type == "cuda" and allow_triton:
        backends.append(("a2r-eb-triton", "triton"))
    for name, backend in backends:
        providers[name] = (lambda logits, canvas, _b=backend:
                           ak.entropy_bound_step(logits, canvas, ENTROPY_BOUND, backend=_b))
    try:
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
            EntropyBoundSampler, EntropyBoundSamplerConfig)
    except ImportError:
        print("transformers has no DiffusionGemma: no hf-eb-sampler baseline")
        return providers
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=ENTROPY_BOUND), length,
                                  vocab, max_denoising_steps=1)
    providers["hf-eb-sampler"] = lambda logits, canvas: hf_eb_sampler_step(sampler, logits, canvas)
    return providers


def run_entropy_bound(shapes, device: torch.device, dtype: torch.dtype, allow_triton: bool,
                      warmup: int, rep: int, out_json: str) -> list[dict]:
    """Rows ``op = "entropy-bound"``: median time of one step per provider and logit kind."""
    name = device_name(device)
    bandwidth = copy_gbps(device, nbytes=(256 << 20) if device.type == "cuda" else (64 << 20))
    print(f"entropy-bound step   device: {name}   copy bandwidth: {bandwidth:.1f} GB/s")
    rows = []
    for (batch, length, vocab), kind in itertools.product(shapes, ("flat", "lm-like")):
        gen = torch.Generator(device=device).manual_seed(0)
        if kind == "flat":
            logits = torch.randn(batch, length, vocab, generator=gen, device=device, dtype=dtype)
        else:
            logits = lm_like_logits(batch, length, vocab, device, dtype, gen)
        canvas = torch.randint(0, vocab, (batch, length), generator=gen, device=device)
        logit_bytes = logits.numel() * logits.element_size()
        times = {}
        for provider, fn in entropy_bound_providers(device, allow_triton, length, vocab).items():
            work = canvas.clone()
            try:
                seconds = time_fn(lambda: fn(logits, work), warmup=warmup, rep=rep,
                                  device=device)
            except torch.cuda.OutOfMemoryError:
                print(f"B={batch} L={length} V={vocab} {provider}: out of memory, skipped")
                torch.cuda.empty_cache()
                continue
            times[provider] = seconds * 1e6
            rows.append({"device": name, "op": "entropy-bound", "provider": provider,
                         "B": batch, "L": length, "V": vocab,
                         "dtype": str(dtype).replace("torch.", ""), "logits": kind,
                         "median_us": seconds * 1e6,
                         "gbps": logit_bytes / seconds / 1e9, "copy_gbps": bandwidth})
        for row in rows[len(rows) - len(times):]:
            if "hf-eb-sampler" in times:
                row["speedup_vs_hf-eb-sampler"] = times["hf-eb-sampler"] / row["median_us"]
            print(f"B={batch:3d} L={length:5d} V={vocab:6d} {kind:>8s} {row['provider']:>14s}: "
                  f"{row['median_us']:12.1f} us  {row['gbps']:8.2f} GB/s "
                  f"({row['gbps'] / bandwidth:6.1%} of copy)  "
                  f"x{row.get('speedup_vs_hf-eb-sampler', float('nan')):.2f} vs hf-eb-sampler")
    write_results(out_json, rows, key_fields=("device", "op", "provider", "B", "L", "V", "dtype",
                                              "logits"))
    print(f"wrote {out_json}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (the CPU mode)")
    parser.add_argument("--half-masked", action="store_true",
                        help="also time every other position masked")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--rep", type=int, default=None)
    parser.add_argument("--cuda-split-sweep", action="store_true",
                        help="add a2r-cuda[s=N] rows (N CTAs per position over V forced) at the "
                        f"shapes with B * L <= {SPLIT_SWEEP_MAX_POSITIONS}")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated BxLxV shapes instead of the sweep, e.g. 8x256x126464")
    parser.add_argument("--ops", default="denoise",
                        help="comma-separated: denoise (denoise_step rows), entropy-bound "
                        "(entropy_bound_step rows; their --shapes default: 8x256x262144 on GPU, "
                        "2x64x32000 on CPU) (default: %(default)s)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    if quick:
        shapes = [(1, 32, 32000), (2, 64, 32000)]
        suffix = "_cpu" if device.type == "cpu" else "_quick"
        warmup, rep = args.warmup or 1, args.rep or 5
    else:
        shapes = [(b, l, v) for v in (126464, 151936) for b in (1, 8, 32) for l in (32, 256, 1024)]
        suffix = ""
        warmup, rep = args.warmup or 3, args.rep or 20
    if args.shapes:
        try:
            shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
        except ValueError:
            shapes = []
        if not shapes or any(len(shape) != 3 or min(shape) < 1 for shape in shapes):
            parser.error(f"--shapes: expected BxLxV[,BxLxV...] of positive ints, got {args.shapes!r}")
    ops = [op for op in args.ops.split(",") if op]
    if not ops or set(ops) - {"denoise", "entropy-bound"}:
        parser.error(f"--ops: expected denoise and/or entropy-bound, got {args.ops!r}")
    if "denoise" in ops:
        run(shapes, device, torch.bfloat16, args.half_masked or quick,
            allow_triton=device.type == "cuda" or ak.backend.triton_interpret(),
            warmup=warmup, rep=rep,
            out_json=os.path.join(RESULTS_DIR, f"denoise{suffix}.json"),
            out_png=os.path.join(RESULTS_DIR, f"denoise{suffix}.png"),
            split_sweep=args.cuda_split_sweep)
    if "entropy-bound" in ops:
        eb_shapes = shapes if args.shapes else (
            [(2, 64, 32000)] if quick else [(8, 256, 262144)])
        run_entropy_bound(eb_shapes, device, torch.bfloat16,
                          allow_triton=device.type == "cuda", warmup=warmup, rep=rep,
                          out_json=os.path.join(RESULTS_DIR, f"entropy_bound{suffix}.json"))


if __name__ == "__main__":
    main()
