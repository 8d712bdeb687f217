"""``a2r eval``'s answer checking (Math-Verify behind our own timeout) and its resumable records."""

import json
import os
import threading
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import a2r.eval.evaluate  # noqa: E402
from a2r.cli import main  # noqa: E402
from a2r.extract import extract_final_answer  # noqa: E402
from a2r.eval.grading import AnswerChecker  # noqa: E402
from a2r.demo.tiny import ensure_tiny_models  # noqa: E402

FAST = ["-n", "2", "--max-new-tokens", "4", "--synth-max-new-tokens", "3",
        "--thinker-gen-length", "8", "--thinker-block-length", "8", "--thinker-steps", "2",
        "--backend", "torch", "--no-progress", "--random-models"]


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(timeout_s=2.0) as c:
        yield c


# ------------------------------------------------------------------ Math-Verify


@pytest.mark.parametrize("prediction, gold, correct", [
    ("\\frac{1}{2}", "0.5", True),               # fractions
    ("3/4", "\\frac{3}{4}", True),
    ("\\dfrac{6}{8}", "3/4", True),
    ("\\frac{1}{3}", "0.33", False),
    ("1,234", "1234", True),                     # thousands separators
    ("1,234,567", "1234567", True),
    ("1{,}000", "1000", True),
    ("12,5", "125", False),                      # not a thousands separator
    ("1350", "1350", True),
    ("1349", "1350", False),
])
def test_math_verify_decides(checker, prediction, gold, correct):
    verdict = checker.check(prediction, gold)
    assert (verdict.correct, verdict.checker) == (correct, "math_verify")


def test_boxed_with_nested_braces(checker):
    text = "so the answer is \\boxed{\\frac{1}{\\sqrt{2}}} and we are done"
    answer = extract_final_answer(text)
    assert answer == "\\frac{1}{\\sqrt{2}}"
    verdict = checker.check(answer, "\\frac{\\sqrt{2}}{2}")
    assert verdict.correct and verdict.checker == "math_verify"
    assert checker.check("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt2}{2}").correct


def test_missing_answer_and_normalizer_fallback(checker):
    assert checker.check(None, "5").checker == "no_answer"
    assert not checker.check("", "5").correct
    verdict = checker.check("$", "$")             # Math-Verify extracts nothing from either
    assert verdict.checker == "normalizer" and "parsed nothing" in verdict.note
    with pytest.raises(ValueError, match="gold"):
        checker.check("5", "")


def test_pathological_input_is_bounded_by_our_timeout():
    # sympy would evaluate 9^(9^(9^9)) for ever; our timeout kills the worker, the normaliser
    # decides, and the record says so. Works off the main thread (no SIGALRM).
    with AnswerChecker(timeout_s=1.0) as checker:
        checker.check("1", "1")                  # worker started: startup is not in the budget
        box = {}

        def work():
            start = time.perf_counter()
            box["verdict"] = checker.check("9^{9^{9^{9}}}", "5")
            box["seconds"] = time.perf_counter() - start

        thread = threading.Thread(target=work)
        thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert box["seconds"] < 5
        assert box["verdict"].checker == "normalizer" and not box["verdict"].correct
        assert "timed out" in box["verdict"].note
        # The next check starts a fresh worker and Math-Verify decides again.
        assert checker.check("2", "2.0").checker == "math_verify"


def test_checker_rejects_bad_timeout():
    with pytest.raises(ValueError, match="timeout_s"):
        AnswerChecker(timeout_s=0)


# ------------------------------------------------------------------ resume


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    home = tmp_path_factory.getbasetemp() / "a2r_home"
    ensure_tiny_models(home)
    return home


def _questions(path, count=4):
    path.write_text("".join(json.dumps({"question": f"What is {i} + {i + 2}?",
                                        "answer": str(2 * i + 2)}) + "\n" for i in range(count)))
    return path


def test_resume_after_interrupt_gives_the_same_json(tiny_home, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("A2R_HOME", str(tiny_home))
    data = _questions(tmp_path / "qa.jsonl")
    full = tmp_path / "full" / "results.json"
    assert main(["eval", str(data), "--tiny", *FAST, "--out", str(full), "--mkdir", "--json"]) == 0

    real = a2r.eval.evaluate.evaluate_question
    evaluated = []

    def interrupt_at_question_2(pipeline, index, *args, **kwargs):
        if index == 2:
            raise KeyboardInterrupt                # Ctrl-C while question 2 is in flight
        evaluated.append(index)
        return real(pipeline, index, *args, **kwargs)

    resumed = tmp_path / "resumed" / "results.json"
    monkeypatch.setattr(a2r.eval.evaluate, "evaluate_question", interrupt_at_question_2)
    assert main(["eval", str(data), "--tiny", *FAST, "--out", str(resumed), "--mkdir"]) == 130
    records = resumed.with_suffix(".jsonl")
    assert len(records.read_text().splitlines()) == 2 and not resumed.exists()
    assert "rerun the same command to resume" in capsys.readouterr().err
    with records.open("a") as handle:              # a kill in the middle of writing record 2
        handle.write('{"index": 2, "question": "What is')

    def count(pipeline, index, *args, **kwargs):
        evaluated.append(index)
        return real(pipeline, index, *args, **kwargs)

    monkeypatch.setattr(a2r.eval.evaluate, "evaluate_question", count)
    assert main(["eval", str(data), "--tiny", *FAST, "--out", str(resumed), "--json"]) == 0
    assert evaluated == [0, 1, 2, 3]               # each question evaluated once in all
    strip = a2r.eval.evaluate.strip_timings
    assert strip(json.loads(resumed.read_text())) == strip(json.loads(full.read_text()))
    assert len(records.read_text().splitlines()) == 4

    # A rerun with other settings refuses the records (one-line error, exit 2).
    capsys.readouterr()
    assert main(["eval", str(data), "--tiny", *FAST, "--seed", "1", "--out", str(resumed)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0]


def test_eval_plot_and_checkers(tiny_home, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("A2R_HOME", str(tiny_home))
    data = _questions(tmp_path / "qa.jsonl", count=2)
    png = tmp_path / "acc.png"
    args = ["eval", str(data), "--tiny", *FAST, "-n", "4", "--no-thinker", "--plot", str(png),
            "--json", "--out", str(tmp_path / "r.json")]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(summary["accuracy_by_n"]) == ["1", "2", "4"]
    assert summary["accuracy_by_n"]["4"]["a2r"] == summary["accuracy"]["a2r"]
    assert summary["accuracy_by_n"]["4"]["cons_at_n"] == summary["accuracy"]["cons_at_n"]
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    for record in records:
        assert set(record["checkers"]) == {"pass_at_1", "cons_at_n", "a2r", "synthesizer_alone"}
        assert set(record["checkers"].values()) <= {"math_verify", "normalizer", "no_answer"}
    assert sum(summary["checkers"].values()) == 4 * len(records)
