"""vLLM's own attention backend against vLLM + A2R_TREE (a2r_kernels.vllm), n paths of one prompt.

    python benchmarks/bench_vllm.py                 # GPU: Qwen3-0.6B shape, n=32, P=8192, S=256
                                                    # CPU: issue 24's attention-heavy shape
    python benchmarks/bench_vllm.py --quick         # smoke run (CPU: tiny model, n=4, P=256)

CPU default (issue 24): ``--shape cpu-attn`` (Qwen3-shaped, 2 layers, hidden 256, 16 q / 8 kv
heads of 128, fp32), P=4096, S=32, ``--ns 16 1``, one thread (``OMP_NUM_THREADS=1``), and a
third provider, ``a2r-explorer``: ``a2r.sample_parallel(..., decoder=dec)`` on the same random
model through transformers, its prompt already in the decoder's cache (as vLLM's is in its
prefix cache). ``plan_us_per_step``: A2R_TREE's host time planning a decode step
(``a2r_kernels.vllm.stats.plan_ns``).

A random model of the given shape (``--shape qwen3-0.6b``: 28 layers, hidden 1024, 16 q / 8 kv
heads of 128, bf16; ``tiny``: 2 layers, hidden 128, 4 / 2 heads of 64, fp32) is saved once to
``--model-dir``. Each backend runs in its own process (vLLM picks the backend once per process;
``A2R_VLLM=0`` / ``1``), on the same random prompt of P tokens, sampling n paths of S tokens
(``ignore_eos``) in one request. The prompt is prefilled once first (max_tokens=1), so the timed
request's prompt comes from vLLM's prefix cache and its time is decode time. Per backend:

- ``decode_tokens_per_s``: n * S / seconds of the timed request (median of ``--reps``).
- ``attention_ms_per_step``: GPU time of attention kernels (names matching ``ATTENTION_KERNELS``)
  in a profiled request of ``PROFILE_TOKENS`` tokens, per decode step (all layers).
- ``kv_bytes_per_step``: K+V bytes the decode attention reads per step, all layers: A2R_TREE's
  own count (each shared block once); for the native backend, every path its whole sequence
  (``kv_bytes_unshared``, what paged decode reads).
- ``speedup``: decode tokens/s over the native backend's, measured in the same run.

Rows go to ``benchmarks/results/vllm_<cpu|gpu>.json`` keyed by device name. Without vLLM the
script says so and exits 0 (``a2r bench`` runs every script).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       vocab_size=151936, dtype="bfloat16"),
    "cpu-attn": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                     vocab_size=1024, dtype="float32"),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512,
                 dtype="float32"),
}
ATTENTION_KERNELS = ("flash", "fmha", "attn", "attention", "tree_attention", "merge_partials",
                     "paged")
PROFILE_TOKENS = 16


def build_model(shape: str, directory: Path) -> Path:
    """Save a random model of ``SHAPES[shape]`` (no tokenizer: prompts are token ids)."""
    path = directory / f"random-{shape}"
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    spec = dict(SHAPES[shape])
    dtype = getattr(torch, spec.pop("dtype"))
    config = Qwen3Config(**spec, max_position_embeddings=40960, tie_word_embeddings=True,
                         torch_dtype=dtype)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    return path


def worker(args) -> None:
    """One engine (backend from A2R_VLLM): the measurements above, as JSON to ``args.out``."""
    import torch
    from vllm import LLM, SamplingParams

    on_gpu = torch.cuda.is_available()
    options = dict(gpu_memory_utilization=args.gpu_memory_utilization,
                   max_model_len=args.prompt_tokens + args.new_tokens + 16,
                   max_num_seqs=max(*args.ns, 8), enable_prefix_caching=True, seed=0,
                   skip_tokenizer_init=True, enforce_eager=args.enforce_eager or not on_gpu)
    llm = LLM(str(args.model), dtype=SHAPES[args.shape]["dtype"], **options)
    prompt = [{"prompt_token_ids": torch.randint(
        10, SHAPES[args.shape]["vocab_size"], (args.prompt_tokens,),
        generator=torch.Generator().manual_seed(1)).tolist()}]

    llm.generate(prompt, SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
    Path(args.out).write_text(json.dumps({str(n): _measure(llm, prompt, n, args, on_gpu)
                                          for n in args.ns}))


def _measure(llm, prompt, n: int, args, on_gpu: bool) -> dict:
    """One n: the timed requests (median of ``--reps``), GPU attention time, KV bytes."""
    from vllm import SamplingParams

    def params(tokens: int):
        return SamplingParams(n=n, temperature=1.0, seed=2, max_tokens=tokens,
                              ignore_eos=True, detokenize=False)

    llm.generate(prompt, params(8), use_tqdm=False)   # warm-up (kernels, graphs)
    a2r = sys.modules.get("a2r_kernels.vllm")
    seconds = []
    for _ in range(args.reps):
        if a2r is not None:
            a2r.stats.reset()
        start = time.perf_counter()
        llm.generate(prompt, params(args.new_tokens), use_tqdm=False)
        seconds.append(time.perf_counter() - start)
    stats = a2r.stats.as_dict() if a2r is not None else {}
    used = bool(stats.get("tree_attention_calls"))

    attention_ms = None
    if on_gpu:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            llm.generate(prompt, params(PROFILE_TOKENS), use_tqdm=False)
        total_us = sum(e.self_device_time_total for e in prof.key_averages()
                       if any(k in e.key.lower() for k in ATTENTION_KERNELS))
        attention_ms = total_us / 1e3 / PROFILE_TOKENS

    # KV bytes one decode step reads (all layers), at the middle step of the timed request.
    config = json.loads((Path(args.model) / "config.json").read_text())
    per_token = (2 * config["num_hidden_layers"] * config["num_key_value_heads"]
                 * config["head_dim"] * (2 if SHAPES[args.shape]["dtype"] == "bfloat16" else 4))
    unshared = n * (args.prompt_tokens + args.new_tokens // 2) * per_token
    shared = (stats["kv_bytes_shared"] / stats["decode_steps"]) if used else None
    plan_us = stats["plan_ns"] / stats["decode_steps"] / 1e3 if used else None
    return {"seconds": statistics.median(seconds), "attention_ms_per_step": attention_ms,
            "kv_bytes_per_step": shared if used else unshared,
            "kv_bytes_per_step_unshared": unshared, "a2r_tree_ran": used,
            "plan_us_per_step": plan_us, "stats": stats}


def explorer_worker(args) -> None:
    """``a2r.sample_parallel`` with a TreeDecoder over the same model (transformers, this
    package's tree attention), the prompt prefilled once before the timed calls."""
    import torch
    from transformers import AutoModelForCausalLM

    import a2r
    from a2r_kernels import hf as akhf

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = torch.randint(10, SHAPES[args.shape]["vocab_size"], (1, args.prompt_tokens),
                        generator=torch.Generator().manual_seed(1))
    block_size = 16
    results = {}
    for n in args.ns:
        blocks = -(-args.prompt_tokens // block_size) + n * (-(-args.new_tokens // block_size) + 1)
        dec = akhf.TreeDecoder(model, blocks, block_size=block_size)

        def run(tokens: int):
            return a2r.sample_parallel(model, ids, n, tokens, temperature=1.0, seed=2,
                                       eos_token_id=[], decoder=dec)

        run(1)   # the prompt's blocks into the decoder's cache
        run(8)   # warm-up
        seconds = []
        for _ in range(args.reps):
            start = time.perf_counter()
            run(args.new_tokens)
            seconds.append(time.perf_counter() - start)
        results[str(n)] = {"seconds": statistics.median(seconds), "attention_ms_per_step": None,
                           "kv_bytes_per_step": None, "plan_us_per_step": None}
    Path(args.out).write_text(json.dumps(results))


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, n=4, P=256, S=16")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--ns", type=int, nargs="+", default=None,
                        help="paths per request (default GPU 32, CPU 16 1, quick 4)")
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help="P (default GPU 8192, CPU 4096)")
    parser.add_argument("--new-tokens", type=int, default=None, help="S (default GPU 256, CPU 32)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no CUDA graphs for either backend")
    parser.add_argument("--no-explorer", action="store_true", help="only the two vLLM rows")
    parser.add_argument("--model-dir", default=None, help="where the random model is saved")
    parser.add_argument("--worker", choices=["native", "a2r", "explorer"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    on_gpu = torch.cuda.is_available()
    default = ("tiny", [4], 256, 16) if args.quick else (
        ("qwen3-0.6b", [32], 8192, 256) if on_gpu else ("cpu-attn", [16, 1], 4096, 32))
    args.shape = args.shape or default[0]
    args.ns = args.ns or default[1]
    args.prompt_tokens = args.prompt_tokens or default[2]
    args.new_tokens = args.new_tokens or default[3]
    return args, on_gpu


def _run_worker(name: str, args, model: Path, on_gpu: bool) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    env = dict(os.environ, A2R_VLLM="1" if name == "a2r" else "0",
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if not on_gpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env.setdefault("OMP_NUM_THREADS", "1")
    command = [sys.executable, __file__, "--worker", name, "--model", str(model), "--out", out,
               "--shape", args.shape, "--ns", *map(str, args.ns), "--prompt-tokens",
               str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--reps",
               str(args.reps), "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    subprocess.run(command + (["--enforce-eager"] if args.enforce_eager else []), env=env,
                   check=True)
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


def main() -> None:
    args, on_gpu = _arguments()
    if args.worker == "explorer":
        return explorer_worker(args)
    if args.worker:
        return worker(args)
    if importlib.util.find_spec("vllm") is None:
        print("bench_vllm: vLLM is not installed here; nothing measured (see .ci/run for a "
              "vLLM venv)")
        return
    from common import device_name, write_results

    if args.gpu_memory_utilization is None:
        args.gpu_memory_utilization = 0.8 if on_gpu else 0.1
    model_dir = Path(args.model_dir or tempfile.gettempdir()) / "a2r-bench-vllm"
    model = build_model(args.shape, model_dir)
    providers = {"native": "vllm-native", "a2r": "vllm-a2r_tree"}
    if not args.no_explorer:
        providers["explorer"] = "a2r-explorer"
    results = {name: _run_worker(name, args, model, on_gpu) for name in providers}
    device = device_name("cuda" if on_gpu else "cpu")
    rows = []
    for n in map(str, args.ns):
        if not results["a2r"][n]["a2r_tree_ran"]:
            raise SystemExit("bench_vllm: A2R_VLLM=1 but the A2R_TREE backend did not run")
        tokens = int(n) * args.new_tokens
        native_tps = tokens / results["native"][n]["seconds"]
        for name, provider in providers.items():
            r = results[name][n]
            rows.append({
                "device": device, "provider": provider, "shape": args.shape, "n": int(n),
                "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                "enforce_eager": bool(args.enforce_eager or not on_gpu),
                "seconds": float(r["seconds"]),
                "decode_tokens_per_s": float(tokens / r["seconds"]),
                "attention_ms_per_step": r["attention_ms_per_step"],
                "kv_bytes_per_step": (float(r["kv_bytes_per_step"])
                                      if r["kv_bytes_per_step"] is not None else None),
                "plan_us_per_step": r["plan_us_per_step"],
                "speedup": float(tokens / r["seconds"] / native_tps),
            })
            row = rows[-1]
            print(f"n={n:>3} {provider:>15}: {row['decode_tokens_per_s']:10.1f} decode tok/s "
                  f"({row['seconds']:.2f} s)  attention "
                  f"{r['attention_ms_per_step'] or float('nan'):8.3f} ms/step  plan "
                  f"{r['plan_us_per_step'] or float('nan'):8.1f} us/step  x{row['speedup']:.2f}")
    path = HERE / "results" / f"vllm_{'gpu' if on_gpu else 'cpu'}.json"
    write_results(str(path), rows)
    print(f"wrote {path} ({device}{'' if on_gpu else '; CPU numbers, shared box'})")


if __name__ == "__main__":
    main()
