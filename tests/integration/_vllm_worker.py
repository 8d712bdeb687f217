"""One vLLM engine running every scenario of ``test_vllm.py``; writes the results as JSON.

    python _vllm_worker.py MODEL_DIR OUT.json

Run in its own process (one per backend): vLLM picks the attention backend once per process,
from ``A2R_VLLM`` in the environment (unset or 0: the platform's native backend; 1: A2R_TREE
through the ``vllm.general_plugins`` entry point, as a user would run it).

The engine is sized so that every scenario exercises what it names: ``BLOCK_SIZE``-token blocks
(full prompt blocks are shared by prefix caching), ``MAX_BATCHED_TOKENS`` tokens per step (a long
prompt is prefilled in chunks while other requests decode), and ``NUM_BLOCKS`` blocks in all
(the preemption scenario's requests outgrow the pool, so vLLM preempts and recomputes). The
seeded-sampling prompts fit in one step's budget (see ``scenarios``).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

BLOCK_SIZE = 32
MAX_BATCHED_TOKENS = 512
NUM_BLOCKS = 40
MAX_MODEL_LEN = 1024


def _text(seed: int, length: int) -> str:
    """A deterministic printable string (the tiny tokenizer is one token per character)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 +-*/=?"
    state, out = seed, []
    for _ in range(length):
        state = (state * 1103515245 + 12345) % 2 ** 31
        out.append(alphabet[state % len(alphabet)])
    return "".join(out)


def scenarios(tokenizer):
    """name -> (list of prompt token-id lists, list of SamplingParams kwargs, one per prompt)."""
    ids = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    greedy = dict(temperature=0.0, max_tokens=24)
    return {
        # two different prompts in one batch, greedy
        "greedy": ([ids("What is 12 * 7?"), ids(_text(1, 150))], [greedy, greedy]),
        # n=4 seeded samples per prompt: two trees (full prompt blocks shared) in one batch
        # (all 8 prefills in one step: vLLM 0.32's CPU runner fails on a seeded request whose
        # prefill is chunked, "CPU Generator does not use offset")
        "sampling": ([ids(_text(2, 40)), ids(_text(3, 50))],
                     [dict(n=4, temperature=1.0, seed=1234, max_tokens=24),
                      dict(n=4, temperature=1.0, seed=99, max_tokens=24)]),
        # short prompts decode while a long prompt is prefilled in MAX_BATCHED_TOKENS chunks
        "chunked": ([ids(_text(4, 20)), ids(_text(5, 30)), ids(_text(6, 25)),
                     ids(_text(7, 900))], [dict(temperature=0.0, max_tokens=40)] * 3 + [greedy]),
        # 8 requests of 60 + 150 tokens need 56 blocks of the 40: some are preempted, recomputed
        "preemption": ([ids(_text(10 + i, 60)) for i in range(8)],
                       [dict(temperature=0.0, max_tokens=150)] * 8),
    }


def _num_preemptions(llm) -> int:
    return int(sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"))


def main(model_dir: str, out_path: str) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    import torch

    # fp32 on CPU; on CUDA fp16, which vLLM's FLASH_ATTN (whose slot A2R_TREE takes) supports
    dtype = "float16" if torch.cuda.is_available() else "float32"
    start = time.perf_counter()
    llm = LLM(model_dir, dtype=dtype, enforce_eager=True, gpu_memory_utilization=0.1,
              seed=0, block_size=BLOCK_SIZE, max_num_batched_tokens=MAX_BATCHED_TOKENS,
              num_gpu_blocks_override=NUM_BLOCKS, max_model_len=MAX_MODEL_LEN,
              max_num_seqs=16, disable_log_stats=False)
    load_seconds = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The entry point imports the module in every vLLM process; A2R_VLLM=1 makes vLLM use it.
    a2r = sys.modules.get("a2r_kernels.vllm")
    results = {"load_seconds": load_seconds, "plugin_loaded": a2r is not None, "scenarios": {}}
    for name, (prompts, params) in scenarios(tokenizer).items():
        if a2r is not None:
            a2r.stats.reset()
        preempted_before = _num_preemptions(llm)
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               [SamplingParams(detokenize=False, **kw) for kw in params],
                               use_tqdm=False)
        results["scenarios"][name] = {
            "tokens": [[list(c.token_ids) for c in o.outputs] for o in outputs],
            "prompt_tokens": [len(p) for p in prompts],
            "num_preemptions": _num_preemptions(llm) - preempted_before,
            "stats": a2r.stats.as_dict() if a2r is not None else None,
            "seconds": time.perf_counter() - start,
        }
    with open(out_path, "w", encoding="utf-8") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
