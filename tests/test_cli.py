"""The ``a2r`` command line end to end on the embedded tiny models (in-process ``main(argv)``, plus
one subprocess run of the module), its JSON outputs, eval accounting and its one-line errors."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import a2r.explore  # noqa: E402
from a2r.cli import main  # noqa: E402
from a2r.demo.tiny import ensure_tiny_models  # noqa: E402

# Small budgets so each command runs in seconds on a loaded 2-core CPU.
FAST = ["-n", "2", "--max-new-tokens", "4", "--synth-max-new-tokens", "3",
        "--thinker-gen-length", "8", "--thinker-block-length", "8", "--thinker-steps", "2",
        "--backend", "torch"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # Same home as test_pipeline.py: the models are built once per session.
    home = tmp_path_factory.getbasetemp() / "a2r_home"
    return home, ensure_tiny_models(home)


@pytest.fixture(autouse=True)
def a2r_home(tiny, monkeypatch):
    monkeypatch.setenv("A2R_HOME", str(tiny[0]))


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ demo / run


def test_demo_json(capsys):
    code, out, _ = run_cli(capsys, "demo", *FAST, "--random-models", "--questions", "2", "--json")
    assert code == 0
    payload = json.loads(out)
    assert "untrained" in payload["note"] and "noise" in payload["note"]
    assert payload["models"]["mode"] == "asymmetric"
    assert payload["models"]["explorer"]["arch"] == "Qwen3ForCausalLM"
    assert payload["models"]["synthesizer"]["arch"] == "LlamaForCausalLM"
    assert payload["models"]["thinker"]["arch"] == "LlamaForCausalLM"
    assert len(payload["per_question"]) == 2
    for record in payload["per_question"]:
        stages = record["result"]["stages"]
        assert len(stages["explorer"]["texts"]) == 2
        assert 1 <= stages["explorer"]["generated_tokens"] <= 8
        assert record["tokens"]["thinker"] <= 8 and record["traces"]["nar"] is not None
        assert stages["synthesizer"]["generated_tokens"] <= 3
        assert record["kv_bytes_saved"] == stages["explorer"]["prompt_tokens"] * 1 * 512
        assert set(record["correct"]) == {"pass_at_1", "mean_at_1", "cons_at_n", "a2r",
                                          "synthesizer_alone", "nar_ar", "ar_ar"}


def test_demo_text_shows_every_stage(capsys):
    code, out, _ = run_cli(capsys, "demo", *FAST, "--random-models", "--no-thinker",
                           "--questions", "2")
    assert code == 0
    assert "untrained" in out and "noise" in out
    assert "Scoreboard: 2 held-out questions" in out and out.count("Worked example") == 1
    assert out.count("  path ") == 2 and "synthesizer (A2R):" in out
    assert "thinker trace" not in out


def test_run_asymmetric_with_thinker_json(capsys, tiny):
    _, paths = tiny
    code, out, _ = run_cli(capsys, "run", "--explorer", str(paths.explorer), "--synthesizer",
                           str(paths.synthesizer), "--thinker", str(paths.thinker), *FAST,
                           "--json", "What is 2+2?")
    assert code == 0
    payload = json.loads(out)
    assert payload["question"] == "What is 2+2?" and payload["mode"] == "asymmetric"
    assert payload["stages"]["thinker"] is not None and payload["trace"] is not None
    assert payload["models"]["thinker"]["path"] == str(paths.thinker)
    assert "What is 2+2?" in payload["stages"]["synthesizer"]["prompt"]


def test_run_symmetric_text(capsys, tiny):
    _, paths = tiny
    code, out, _ = run_cli(capsys, "run", "--explorer", str(paths.explorer), *FAST, "Hi?")
    assert code == 0
    assert "(symmetric)" in out and "prompts share" in out and "Final answer (A2R):" in out


def test_run_tiny_flag(capsys):
    code, out, _ = run_cli(capsys, "run", "--tiny", "--no-thinker", *FAST, "--json", "1+1?")
    assert code == 0 and json.loads(out)["stages"]["thinker"] is None


# ------------------------------------------------------------------ eval


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")   # a blank line too
    return path


def test_eval_on_tiny_models_writes_results(capsys, tmp_path):
    data = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+3?", "answer": "5"},
                                                {"question": "Half of 1?", "answer": "1/2"}])
    out_file = tmp_path / "out" / "results.json"
    code, out, _ = run_cli(capsys, "eval", str(data), "--tiny", *FAST, "--out", str(out_file),
                           "--mkdir", "--json", "--no-progress")
    assert code == 0
    summary = json.loads(out)
    full = json.loads(out_file.read_text())
    assert summary["num_questions"] == 2 and len(full["per_question"]) == 2
    for method, accuracy in summary["accuracy"].items():
        assert accuracy == sum(q["correct"][method] for q in full["per_question"]) / 2
    for q in full["per_question"]:
        for stage in ("explorer", "synthesizer"):
            assert q["tokens"][stage] == q["result"]["stages"][stage]["generated_tokens"]
    for stage in ("explorer", "thinker", "ar_thinker", "synthesizer", "synthesizer_alone",
                  "synthesizer_nar", "synthesizer_ar"):
        assert summary["tokens"][stage] == sum(q["tokens"][stage] for q in full["per_question"])
        assert summary["tokens"][stage] > 0
    assert summary["kv_bytes_saved"] == sum(q["result"]["kv_bytes_saved"]
                                            for q in full["per_question"])


def test_eval_accuracy_with_a_scripted_explorer(capsys, tmp_path, monkeypatch):
    """Known answers in, known accuracies out: pass@1, mean@1, Cons@N and A2R counted right."""
    tokenizer = None

    def scripted(model, input_ids, widths, max_new_tokens, sampling, **kwargs):
        from a2r.explore import ExploreResult

        nonlocal tokenizer
        (n,) = widths
        model = getattr(model, "model", model)   # a TreeDecoder runs over its model
        from transformers import AutoTokenizer
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model.name_or_path)
        prompt = tokenizer.decode(input_ids[0].tolist())
        if n == 1 and "Reference answers" not in prompt:  # synthesizer alone: right on B only
            texts = ["\\boxed{7}" if "Question B" in prompt else "\\boxed{0}"]
        elif n == 1:                                # synthesizer: right only on question A
            texts = ["\\boxed{5}" if "Question A" in prompt else "\\boxed{0}"]
        elif "Question A" in prompt:                # explorer A: 5, 4, 5 -> pass@1, Cons right
            texts = ["\\boxed{5}", "4", "</think>\\boxed{5.0}"]
        else:                                       # explorer B: 7, 8, 8 -> Cons wrong
            texts = ["\\boxed{7}", "8", "8"]
        return ExploreResult(sequences=[tokenizer(t, add_special_tokens=False)["input_ids"]
                                        for t in texts], prompt_len=input_ids.shape[1],
                             num_blocks=0, block_size=16, peak_blocks_used=0, peak_kv_bytes=0,
                             decode_steps=0)

    monkeypatch.setattr(a2r.explore, "explore", scripted)
    data = _write_jsonl(tmp_path / "qa.jsonl", [{"q": "Question A", "a": "5"},
                                                {"q": "Question B", "a": "7"}])
    code, out, _ = run_cli(capsys, "eval", str(data), "--tiny", "--no-thinker", "-n", "3",
                           "--question-key", "q", "--answer-key", "a", "--json", "--no-progress")
    assert code == 0
    accuracy = json.loads(out)["accuracy"]
    assert accuracy == {"pass_at_1": 1.0, "mean_at_1": pytest.approx((2 / 3 + 1 / 3) / 2),
                        "cons_at_n": 0.5, "a2r": 0.5, "synthesizer_alone": 0.5}


def test_eval_text_and_limit(capsys, tmp_path):
    data = _write_jsonl(tmp_path / "qa.jsonl", [{"question": f"{i}+1?", "answer": str(i + 1)}
                                                for i in range(5)])
    code, out, _ = run_cli(capsys, "eval", str(data), "--tiny", "--no-thinker", *FAST,
                           "--limit", "1")
    assert code == 0
    assert out.startswith("1 questions, N=2 paths")
    assert "pass@1" in out and "Cons@2" in out and "A2R" in out


# ------------------------------------------------------------------ errors: exit 2, one line


def _assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("a2r: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_model_directory(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--explorer", str(tmp_path / "nope"), "q")
    _assert_one_line_error(code, err, "explorer model directory not found", "nope")


def test_missing_thinker_and_synthesizer_directories(capsys, tiny, tmp_path):
    _, paths = tiny
    code, _, err = run_cli(capsys, "run", "--explorer", str(paths.explorer), "--synthesizer",
                           str(tmp_path / "s"), "q")
    _assert_one_line_error(code, err, "synthesizer model directory not found")
    code, _, err = run_cli(capsys, "run", "--explorer", str(paths.explorer), "--thinker",
                           str(tmp_path / "t"), "q")
    _assert_one_line_error(code, err, "thinker model directory not found")


def test_unsupported_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, _, err = run_cli(capsys, "run", "--explorer", str(tmp_path), "q")
    _assert_one_line_error(code, err, "model_type='bert'", "not a decoder-only causal LM")


@pytest.mark.parametrize("argv, fragment", [
    (["run", "q"], "--explorer DIR is required"),
    (["run", "--tiny", "--explorer", "x", "q"], "--tiny cannot be combined"),
    # Errors name the flag the user typed, not the A2RConfig field behind it.
    (["run", "--tiny", "--thinker-gen-length", "12", "--thinker-block-length", "8", "q"],
     "--thinker-gen-length (12) must be a multiple of --thinker-block-length (8)"),
    (["run", "--tiny", "--thinker-gen-length", "16", "--thinker-block-length", "8",
      "--thinker-steps", "3", "q"], "--thinker-steps (3) must be a multiple of the number of "
     "thinker blocks (2) when no --thinker-threshold is set"),
    (["run", "--tiny", "--top-p", "0", "q"], "--top-p must be in (0, 1]"),
    (["run", "--tiny", "--top-k", "-1", "q"], "--top-k must be >= 0"),
    (["run", "--tiny", "--min-p", "2", "q"], "--min-p must be in [0, 1]"),
    (["run", "--tiny", "--synth-max-new-tokens", "0", "q"], "--synth-max-new-tokens must be >= 1"),
    (["demo", "--thinker-threshold", "1.5"], "--thinker-threshold must be in (0, 1]"),
    (["run", "--tiny", "--device", "gpu0", "q"], "--device gpu0"),
    (["run", "--tiny", "--tensor-parallel-size", "2", "q"],
     "--tensor-parallel-size needs --engine vllm"),
    (["run", "--tiny", "--gpu-memory-utilization", "0.5", "q"],
     "--gpu-memory-utilization needs --engine vllm"),
    pytest.param(["run", "--tiny", "--engine", "vllm", "q"], "--engine vllm needs vLLM installed",
                 marks=pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                                          reason="vLLM is installed here")),
])
def test_bad_options(capsys, monkeypatch, argv, fragment):
    # Bad values are reported before any model is loaded (not after the explorer has run).
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr("a2r.pipeline.A2RPipeline.from_pretrained", no_loading)
    code, _, err = run_cli(capsys, *argv)
    _assert_one_line_error(code, err, fragment)
    assert not re.search(r"\b(top_p|top_k|min_p|[a-z]+_max_new_tokens|thinker_[a-z_]+)\b",
                         err), err


def test_references_too_long_hint_names_flags(monkeypatch):
    """A prompt the references made too long is reported with the flags that shorten it (the
    command line has no flag for answer_max_tokens, so it is left out)."""
    from a2r.launch import CLI_OPTION_NAMES
    from a2r.models import references_too_long_hint

    assert references_too_long_hint(CLI_OPTION_NAMES) == (
        "the references made it too long: lower --answer-max-chars or -n/--num-paths")
    assert "answer_max_tokens" in references_too_long_hint()   # the library keeps field names


def _scripted_texts(monkeypatch, texts_for):
    """a2r.explore.explore replaced: ``texts_for(prompt, n)`` gives each stage's texts."""
    tokenizers = {}

    def scripted(model, input_ids, widths, max_new_tokens, sampling, **kwargs):
        from transformers import AutoTokenizer

        from a2r.explore import ExploreResult

        (n,) = widths
        model = getattr(model, "model", model)   # a TreeDecoder runs over its model
        tokenizer = tokenizers.setdefault(model.name_or_path,
                                          AutoTokenizer.from_pretrained(model.name_or_path))
        texts = texts_for(tokenizer.decode(input_ids[0].tolist()), n)
        return ExploreResult(sequences=[tokenizer(t, add_special_tokens=False)["input_ids"]
                                        for t in texts], prompt_len=input_ids.shape[1],
                             num_blocks=0, block_size=16, peak_blocks_used=0, peak_kv_bytes=0,
                             decode_steps=0)

    monkeypatch.setattr(a2r.explore, "explore", scripted)


def test_no_answer_is_said_in_words(capsys, monkeypatch):
    _scripted_texts(monkeypatch, lambda prompt, n: ["no idea"] * n)
    code, out, _ = run_cli(capsys, "run", "--tiny", "--no-thinker", "-n", "2",
                           "What is 1 + 2 + 3?")
    assert code == 0
    assert "Final answer (A2R): no answer found (the synthesizer's output has no \\boxed{} " \
           "answer and no number)" in out
    assert "None" not in out and "A2R=(none)" in out


@pytest.mark.parametrize("question, off_task", [
    ("What is 347 + 85 + 912 + 6?", False),       # the task: a2r.demo.task.parse_question
    ("What is 12 * 7?", True),
    ("What is the capital of France?", True),
    ("What is 3 + 4?", True),                     # two terms: never drawn in training
])
def test_off_task_questions_on_the_trained_models_get_a_note(capsys, monkeypatch, question,
                                                             off_task):
    _scripted_texts(monkeypatch, lambda prompt, n: ["\\boxed{5}"] * n)
    code, out, _ = run_cli(capsys, "run", "--tiny", "--no-thinker", "-n", "2", "--json", question)
    assert code == 0
    note = json.loads(out)["note"]
    assert (note is not None) == off_task
    if off_task:
        assert "not of the task the embedded models were trained on" in note and "noise" in note
    code, out, _ = run_cli(capsys, "run", "--tiny", "--no-thinker", "-n", "2", question)
    assert ("their answers to it are noise" in out) == off_task


def test_eval_counts_off_task_questions(capsys, monkeypatch, tmp_path):
    _scripted_texts(monkeypatch, lambda prompt, n: ["\\boxed{5}"] * n)
    data = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is 1 + 2 + 2?", "answer": 5},
                                                {"question": "Capital of France?", "answer": "P"}])
    code, out, _ = run_cli(capsys, "eval", str(data), "--tiny", "--no-thinker", "-n", "2",
                           "--json", "--no-progress")
    assert code == 0
    assert "1 of the 2 questions are not of the task" in json.loads(out)["note"]


def test_gpt_neox_is_a_decoder_only_causal_lm(capsys, tmp_path):
    """GPT-NeoX / Pythia configs say is_decoder=False (every config's default); the architecture
    decides, so they run. Encoders with a causal-LM head (BERT) still need is_decoder=True."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from a2r.demo.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    assert config.is_decoder is False
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "neox")
    tokenizer.save_pretrained(tmp_path / "neox")
    code, out, err = run_cli(capsys, "run", "--explorer", str(tmp_path / "neox"), *FAST, "--json",
                             "What is 1 + 2 + 3?")
    assert code == 0, err
    assert json.loads(out)["models"]["explorer"]["arch"] == "GPTNeoXForCausalLM"
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert",
                                                               "is_decoder": False}))
    code, _, err = run_cli(capsys, "run", "--explorer", str(tmp_path / "bert"), "q")
    _assert_one_line_error(code, err, "not a decoder-only causal LM", "is_decoder=true")


@pytest.mark.parametrize("content, fragment", [
    ('{"question": "a", "answer": "1"}\nnot json\n', "qa.jsonl:2: not valid JSON"),
    ('{"question": "a"}\n', "qa.jsonl:1: needs keys 'question' and 'answer'"),
    ("\n\n", "no questions"),
])
def test_bad_eval_file(capsys, tmp_path, content, fragment):
    (tmp_path / "qa.jsonl").write_text(content)
    code, _, err = run_cli(capsys, "eval", str(tmp_path / "qa.jsonl"), "--tiny")
    _assert_one_line_error(code, err, fragment)
    code, _, err = run_cli(capsys, "eval", str(tmp_path / "missing.jsonl"), "--tiny")
    _assert_one_line_error(code, err, "eval file not found")


def test_argparse_errors_exit_2(capsys):
    # A range is A2RConfig.validate's (one line, exit 2, before any model loads), a value that
    # does not parse argparse's.
    assert main(["demo", "-n", "0"]) == 2
    assert capsys.readouterr().err == "a2r: error: -n/--num-paths must be >= 1, got 0\n"
    with pytest.raises(SystemExit) as exc:
        main(["demo", "-n", "x"])
    assert exc.value.code == 2
    assert "-n/--num-paths: expected an integer, got 'x'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_module_entry_point_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "a2r.cli", "run", "--explorer",
                           str(tmp_path / "missing"), "q"], capture_output=True, text=True,
                          timeout=300)
    _assert_one_line_error(proc.returncode, proc.stderr, "explorer model directory not found")
    assert proc.stdout == ""


# ------------------------------------------------------------------ bench


@pytest.fixture
def bench_dir(tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    script = textwrap.dedent("""
        import json, pathlib, sys
        log = pathlib.Path(__file__).with_suffix(".args.json")
        log.write_text(json.dumps(sys.argv[1:]))
        sys.exit({code})
    """)
    (bench / "bench_ok.py").write_text(script.format(code=0))
    (bench / "bench_fail.py").write_text(script.format(code=3))
    (bench / "common.py").write_text("")                      # not a bench_*.py script
    return bench


def test_bench_list_and_only(capsys, bench_dir):
    code, out, _ = run_cli(capsys, "bench", "--bench-dir", str(bench_dir), "--list")
    assert code == 0 and out.split() == ["bench_fail.py", "bench_ok.py"]
    code, _, err = run_cli(capsys, "bench", "--bench-dir", str(bench_dir), "--only", "zzz")
    _assert_one_line_error(code, err, "no benchmark scripts matched")


def test_bench_runs_scripts_quick_on_cpu(capsys, bench_dir):
    import torch

    code, out, _ = run_cli(capsys, "bench", "--bench-dir", str(bench_dir), "--only", "ok",
                           "--json")
    assert code == 0
    summary = json.loads(out)
    assert [r["script"] for r in summary["runs"]] == ["bench_ok.py"] and summary["failed"] == []
    expected = [] if torch.cuda.is_available() else ["--quick"]
    assert json.loads((bench_dir / "bench_ok.args.json").read_text()) == expected
    code, out, _ = run_cli(capsys, "bench", "--bench-dir", str(bench_dir), "--only", "ok",
                           "--quick", "--json")
    assert json.loads((bench_dir / "bench_ok.args.json").read_text()) == ["--quick"]
    code, out, _ = run_cli(capsys, "bench", "--bench-dir", str(bench_dir), "--only", "ok",
                           "--full", "--json")
    assert json.loads((bench_dir / "bench_ok.args.json").read_text()) == []


def test_bench_failure_exit_1(capsys, bench_dir):
    code, out, _ = run_cli(capsys, "bench", "--bench-dir", str(bench_dir), "--json")
    assert code == 1 and json.loads(out)["failed"] == ["bench_fail.py"]


def test_bench_missing_dir(capsys, tmp_path):
    code, _, err = run_cli(capsys, "bench", "--bench-dir", str(tmp_path / "none"))
    _assert_one_line_error(code, err, "benchmarks directory not found")


REPO_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def results_bench_dir(tmp_path):
    """A benchmarks directory whose script writes one row through benchmarks/common.py (the real
    one), a results/ file standing for a tracked one, and a script that skips itself."""
    bench = tmp_path / "benchmarks"
    (bench / "results").mkdir(parents=True)
    (bench / "results" / "rows_cpu.json").write_text("[]\n")
    (bench / "bench_rows.py").write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO_BENCHMARKS)!r})
        from common import results_dir, write_results
        write_results(os.path.join(results_dir(), "rows_cpu.json"), [{{"device": "cpu",
                      "provider": "p", "median_s": 1.0}}])
        """))
    from a2r.cli import BENCH_SKIPPED_EXIT_STATUS   # = common.SKIPPED_EXIT_STATUS (tested below)

    (bench / "bench_skips.py").write_text(textwrap.dedent(f"""
        import sys
        print("nothing to measure here")
        sys.exit({BENCH_SKIPPED_EXIT_STATUS})
        """))
    return bench


def test_bench_on_cpu_writes_to_a_scratch_directory_unless_out(capsys, monkeypatch,
                                                                results_bench_dir, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tracked = results_bench_dir / "results" / "rows_cpu.json"
    code, out, _ = run_cli(capsys, "bench", "--bench-dir", str(results_bench_dir), "--only",
                           "rows", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["scratch"] and summary["failed"] == []
    scratch = Path(summary["results_dir"])
    assert scratch != results_bench_dir / "results" and (scratch / "rows_cpu.json").is_file()
    assert tracked.read_text() == "[]\n"                  # the checkout's file is untouched
    code, out, _ = run_cli(capsys, "bench", "--bench-dir", str(results_bench_dir), "--only",
                           "rows")
    assert code == 0 and "a scratch directory: pass --out DIR to keep them" in out
    code, out, _ = run_cli(capsys, "bench", "--bench-dir", str(results_bench_dir), "--only",
                           "rows", "--out", str(tmp_path / "kept"), "--json")
    assert code == 0 and not json.loads(out)["scratch"]
    assert json.loads((tmp_path / "kept" / "rows_cpu.json").read_text())[0]["provider"] == "p"


def test_bench_reports_a_skipped_script_as_skipped(capsys, results_bench_dir):
    code, out, _ = run_cli(capsys, "bench", "--bench-dir", str(results_bench_dir), "--only",
                           "skips", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["skipped"] == ["bench_skips.py"] and summary["failed"] == []
    assert summary["runs"][0]["status"] == "skipped"
    code, out, _ = run_cli(capsys, "bench", "--bench-dir", str(results_bench_dir), "--only",
                           "skips")
    assert code == 0
    assert out.splitlines()[-1].startswith("0/1 benchmarks succeeded; skipped: bench_skips.py")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_bench_vllm_without_vllm_is_skipped(capsys):
    code, out, _ = run_cli(capsys, "bench", "--only", "vllm", "--json")
    assert code == 0 and json.loads(out)["skipped"] == ["bench_vllm.py"]


def test_bench_constants_match_benchmarks_common():
    import a2r.cli as cli

    spec = importlib.util.spec_from_file_location("a2r_bench_common", REPO_BENCHMARKS / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    assert cli.BENCH_RESULTS_DIR_ENV == common.RESULTS_DIR_ENV
    assert cli.BENCH_SKIPPED_EXIT_STATUS == common.SKIPPED_EXIT_STATUS


def test_bench_denoise_writes_where_a2r_bench_says(tmp_path):
    """The real script (the issue's `a2r bench --quick --only denoise`) on one tiny shape: its rows
    go to $A2R_BENCH_RESULTS_DIR, not to the tracked benchmarks/results/denoise_cpu.json."""
    tracked = REPO_BENCHMARKS / "results" / "denoise_cpu.json"
    before = tracked.read_bytes() if tracked.exists() else None
    env = {**os.environ, "A2R_BENCH_RESULTS_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO_BENCHMARKS / "bench_denoise.py"), "--quick",
                           "--shapes", "1x2x16", "--warmup", "1", "--rep", "1"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "denoise_cpu.json").read_text())[0]["V"] == 16
    assert (tracked.read_bytes() if tracked.exists() else None) == before
